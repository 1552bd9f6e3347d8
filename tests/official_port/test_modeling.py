"""Tests of `official_port.modeling_ttt` (parity with the official JAX model: the bundled fixtures in
parity/test_parity.py): causality, any length, incremental decoding == full forward, generate(), gradient checkpointing, bf16 on
CUDA, save/load and Auto registration."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import official_port  # noqa: F401  (registers the Auto classes)
from official_port import TTTCache, TTTConfig, TTTForCausalLM
from ttt_common.hf_compat import CACHE_NAME, enable_activation_checkpointing

VOCAB = 61


def tiny_config(block: str = "ttt_linear", pre_conv: bool = True, **kw) -> TTTConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_sequence_length=32, mini_batch_size=4, conv_width=3, seq_modeling_block=block,
                pre_conv=pre_conv, initializer_range=0.1, use_cache=True, bos_token_id=0, eos_token_id=1)
    base.update(kw)
    return TTTConfig(**base)


def tiny_model(block: str = "ttt_linear", pre_conv: bool = True, seed: int = 0, **kw) -> TTTForCausalLM:
    torch.manual_seed(seed)
    model = TTTForCausalLM(tiny_config(block, pre_conv, **kw))
    # move the constant-initialised parameters (norm scales, biases, token offsets) off their
    # constants, as the parity fixtures do, so every parameter influences the outputs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def ids_for(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


BLOCKS = [("ttt_linear", True), ("ttt_mlp", True), ("self_attention", False), ("self_attention", True),
          ("ttt_linear_base", False), ("ttt_mlp_base", False)]
BLOCK_IDS = [f"{b}{'-preconv' if c else ''}" for b, c in BLOCKS]


# The bundled model and checkpoint fixtures run once, in parity/test_parity.py.


# ------------------------------------------------------------------ causality and any length
@pytest.mark.parametrize(("block", "pre_conv"), BLOCKS, ids=BLOCK_IDS)
def test_causal_and_any_length(block, pre_conv):
    model = tiny_model(block, pre_conv)
    ids = ids_for(2, 19)  # 19: not a multiple of the mini-batch size 4
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for t in (8, 10):  # a mini-batch edge and the middle of a mini-batch
            perturbed = ids.clone()
            perturbed[:, t:] = (perturbed[:, t:] + 7) % VOCAB
            out = model(perturbed, use_cache=False).logits
            torch.testing.assert_close(out[:, :t], full[:, :t], rtol=0, atol=1e-6)
            assert (out[:, t] - full[:, t]).abs().max() > 1e-3  # the perturbation does reach position t
            prefix = model(ids[:, :t], use_cache=False).logits  # a prefix alone == the prefix of the whole
            torch.testing.assert_close(prefix, full[:, :t], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ incremental decoding
# prefill lengths that are not multiples of the mini-batch size 4 (and a 1-token prefill)
PREFILLS = [5, 6, 5, 1, 7, 3]


@pytest.mark.parametrize(("block", "pre_conv", "prefill"), [(b, c, p) for (b, c), p in zip(BLOCKS, PREFILLS)],
                         ids=[f"{i}-prefill{p}" for i, p in zip(BLOCK_IDS, PREFILLS)])
def test_prefill_then_decode_matches_full_forward(block, pre_conv, prefill):
    model = tiny_model(block, pre_conv)
    ids = ids_for(2, 14)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prefill], use_cache=True)
        assert isinstance(out[CACHE_NAME], TTTCache) and out[CACHE_NAME].get_seq_length() == prefill
        pieces = [out.logits]
        cache = out[CACHE_NAME]
        t = prefill
        for step in (1, 1, 3, 1, 2):  # token by token, plus a few multi-token chunks
            step = min(step, ids.shape[1] - t)
            if step == 0:
                break
            out = model(ids[:, t:t + step], cache=cache, use_cache=True)
            cache = out[CACHE_NAME]
            pieces.append(out.logits)
            t += step
        while t < ids.shape[1]:
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out[CACHE_NAME]
            pieces.append(out.logits)
            t += 1
    inc = torch.cat(pieces, dim=1)
    assert full.abs().max() > 0.5  # logits of a meaningful size, so 1e-4 is a real bound
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("block", "pre_conv"), [("ttt_linear", True), ("self_attention", False)])
def test_greedy_generate_matches_repeated_full_forward(block, pre_conv):
    model = tiny_model(block, pre_conv, eos_token_id=None)  # no early stop: compare all new tokens
    prompt = ids_for(2, 6)
    new = 5
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(new):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert gen.shape == (2, 6 + new)
    assert torch.equal(gen, seq)


def test_reorder_cache_selects_rows():
    model = tiny_model("ttt_mlp", True)
    ids = ids_for(2, 8)
    with torch.no_grad():
        cache = model(ids[:, :6])[CACHE_NAME]
        cache.reorder_cache(torch.tensor([1, 1, 0]))  # beam search may duplicate and swap rows
        out = model(ids[[1, 1, 0], 6:], cache=cache).logits
        ref = model(ids[[1, 1, 0]], use_cache=False).logits[:, 6:]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ padding, loss, errors
def test_attention_left_padding_equals_unpadded_row():
    model = tiny_model("self_attention", False)
    ids = ids_for(1, 9)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = model(padded, attention_mask=mask, use_cache=False).logits[:, 3:]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_ttt_left_padding_is_refused_right_padding_is_harmless():
    model = tiny_model("ttt_linear", True)
    ids = ids_for(1, 9)
    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=left)
    right = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=right).logits[:, :7],
                                   model(ids[:, :7]).logits, rtol=0, atol=1e-5)


def test_loss_is_mean_shifted_cross_entropy_and_ignores_minus_100():
    model = tiny_model("ttt_mlp", True)
    ids = ids_for(2, 11)
    out = model(ids, labels=ids)
    logp = torch.log_softmax(out.logits.double(), -1)
    manual = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(out.loss.double(), manual, rtol=1e-6, atol=0)
    labels = ids.clone()
    labels[:, 5:] = -100
    out2 = model(ids, labels=labels)
    manual2 = -logp[:, :4].gather(-1, ids[:, 1:5, None]).mean()
    torch.testing.assert_close(out2.loss.double(), manual2, rtol=1e-6, atol=0)


def test_cache_under_either_name_and_unknown_kwargs_refused():
    """transformers 5.24 passes the cache as `cache=`, older releases as `past_key_values=`: both carry the
    state; a keyword the model does not know is a TypeError, never silently dropped."""
    model = tiny_model("ttt_linear", True).eval()
    ids = ids_for(1, 12)
    full = model(ids).logits
    for name in ("cache", "past_key_values"):
        cache = model(ids[:, :7], use_cache=True)[CACHE_NAME]
        step = model(ids[:, 7:], use_cache=True, **{name: cache}).logits
        torch.testing.assert_close(step, full[:, 7:], atol=1e-5, rtol=1e-4)
    with pytest.raises(TypeError, match="not both"):
        model(ids, cache=cache, past_key_values=cache)
    with pytest.raises(TypeError, match="unexpected keyword argument.*past_kv"):
        model(ids, past_kv=cache)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("ttt_linear", True)
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="labels must have shape"):
        model(ids_for(1, 5), labels=ids_for(1, 4))
    with pytest.raises(TypeError, match="TTTCache"):
        class NotOurs:
            def get_seq_length(self):
                return 3
        model(ids_for(1, 5), cache=NotOurs())
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids_for(1, 5), attention_mask=torch.ones(1, 3))


def test_ttt_stats_per_block():
    model = tiny_model("ttt_linear", True)
    out = model(ids_for(2, 12), output_ttt_stats=True, output_hidden_states=True)
    assert len(out.ttt_stats) == 2 and all(len(s) == 4 for s in out.ttt_stats)
    assert all(s.shape == (3,) for s in out.ttt_stats[0])  # 12 tokens = 3 mini-batches of 4
    assert len(out.hidden_states) == 3
    ids = ids_for(2, 12)
    with torch.no_grad():
        one = model(ids, use_cache=False).logits
        two = model(ids, use_cache=False, inner_steps=2).logits
        as_tuple = model(ids, use_cache=False, return_dict=False)
    assert (one - two).abs().max() > 1e-4  # inner_steps reaches the TTT layers
    assert torch.equal(as_tuple[0], one)


# ------------------------------------------------------------------ gradient checkpointing
@pytest.mark.parametrize("how", ["remat_block", "activation_checkpointing_enable"])
def test_gradient_checkpointing_gives_identical_gradients(how):
    ids = ids_for(2, 10)
    ref_model = tiny_model("ttt_mlp", True).train()
    ref_model(ids, labels=ids).loss.backward()
    if how == "remat_block":
        model = tiny_model("ttt_mlp", True, remat_block="nothing_saveable").train()
    else:
        model = tiny_model("ttt_mlp", True).train()
        enable_activation_checkpointing(model)  # transformers' default checkpoint function, current API
    assert all(b.gradient_checkpointing for b in model.model.h)
    calls = []
    hook = model.model.h[0].seq_modeling_block.register_forward_hook(lambda *a: calls.append(1))
    model(ids, labels=ids).loss.backward()
    hook.remove()
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing really ran
    for (name, p), (_, q) in zip(ref_model.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-7, msg=name)


# ------------------------------------------------------------------ save / load / Auto
def test_save_pretrained_round_trip_and_auto_classes(tmp_path):
    model = tiny_model("ttt_linear", True)
    ids = ids_for(2, 9)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, TTTForCausalLM)
    assert reloaded.lm_head.weight is reloaded.model.wte.weight  # tie survives the round trip
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    fields = {k: v for k, v in tiny_config().to_diff_dict().items() if k != "model_type"}
    cfg = AutoConfig.for_model("ttt", **fields)
    assert isinstance(cfg, TTTConfig)
    assert isinstance(AutoModelForCausalLM.from_config(cfg), TTTForCausalLM)


def test_untied_head_round_trip(tmp_path):
    model = tiny_model("self_attention", False, tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.wte.weight
    model.save_pretrained(tmp_path)
    reloaded = TTTForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_init_follows_official_initializers():
    torch.manual_seed(0)
    model = TTTForCausalLM(tiny_config("ttt_linear", True, initializer_range=0.02, hidden_size=64,
                                       intermediate_size=256, vocab_size=512))
    blk = model.model.h[0]
    assert abs(model.model.wte.weight.std().item() - 0.02) < 0.002
    assert abs(blk.feed_forward.w1.weight.std().item() - 0.02) < 0.002
    assert torch.equal(blk.seq_norm.weight, torch.ones(64))
    assert torch.equal(blk.conv.conv1.bias, torch.zeros(64))
    # flax nn.Conv default: LeCun normal, variance 1 / fan_in with fan_in = conv_width (depthwise)
    assert abs(blk.conv.conv1.weight.std().item() - 3 ** -0.5) < 0.1
    assert torch.equal(blk.seq_modeling_block.learnable_token_idx, torch.zeros(4))


# ------------------------------------------------------------------ bf16 autocast
def _check_bf16_autocast(device: str) -> None:
    model = tiny_model("ttt_linear", True).to(device)
    ids = ids_for(2, 16).to(device)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(ids, labels=ids, use_cache=True)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16  # the matmuls really ran in bf16
    err = (out.logits.float() - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, err
    state = out[CACHE_NAME].layers[0]["seq"]
    assert all(p.dtype == torch.float32 for p in state.inner.params)  # inner state stays fp32
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_autocast_cpu_close_to_fp32():
    _check_bf16_autocast("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_cuda_close_to_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_bf16_autocast("cuda")


def test_bf16_parameters_forward_backward():
    """FSDP2 bf16 mixed precision hands the model bf16 parameters: the inner loop runs in fp32 and
    its output is cast back before post_norm (a bf16 LayerNorm weight meets a bf16 input)."""
    from official_port import TTTConfig, TTTForCausalLM

    for block in ("ttt_linear", "ttt_mlp"):
        cfg = TTTConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, mini_batch_size=4, pre_conv=True, seq_modeling_block=block)
        torch.manual_seed(0)
        ref = TTTForCausalLM(cfg)
        half = TTTForCausalLM(cfg).to(torch.bfloat16)
        half.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
        ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
        out = half(ids, labels=ids)
        out.loss.backward()
        assert all(torch.isfinite(p.grad.float()).all() for p in half.parameters() if p.grad is not None)
        assert abs(out.loss.item() - ref(ids, labels=ids).loss.item()) < 5e-2
