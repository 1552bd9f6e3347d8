"""`generate()`, pipelines and Auto classes for both model families (official TTT, LaCT), checked against
full forwards of the generated sequences: greedy, sampling (top_k, top_p, temperature), eos, max_new_tokens,
num_return_sequences, batched prompts, padded batches, `pipeline("text-generation")`, save/load through
`AutoModelForCausalLM`, and the no-warnings contract (forward, loss backward and generate run with
warnings turned into errors)."""

from __future__ import annotations

import contextlib
import logging
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, pipeline
from transformers.utils import logging as hf_logging

import lact  # noqa: F401  (registers the Auto classes)
import official_port  # noqa: F401  (registers the Auto classes)
from lact import LaCTForCausalLM, LaCTSWIGLUConfig
from official_port import TTTConfig, TTTForCausalLM
from ttt_common.hf_compat import CACHE_NAME, enable_activation_checkpointing

VOCAB = 61
PAD = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def lact_config(vocab: int = VOCAB, **kw) -> LaCTSWIGLUConfig:
    # chunk 4, window 3: generating 10 tokens after a 6-token prompt crosses several chunk boundaries
    base = dict(hidden_size=16, num_hidden_layers=2, num_attn_heads=2, num_lact_heads=2, lact_chunk_size=4,
                window_size=3, vocab_size=vocab, intermediate_size=32, initializer_range=0.02, use_momentum=True,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base.update(kw)
    return LaCTSWIGLUConfig(**base)


def ttt_config(vocab: int = VOCAB, **kw) -> TTTConfig:
    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_sequence_length=32, mini_batch_size=4, conv_width=3, seq_modeling_block="ttt_linear",
                pre_conv=True, initializer_range=0.1, use_cache=True, bos_token_id=None, eos_token_id=None)
    base.update(kw)
    return TTTConfig(**base)


FAMILIES = {"lact": (LaCTForCausalLM, lact_config), "ttt": (TTTForCausalLM, ttt_config)}


def make_model(family: str, seed: int = 0, **kw):
    cls, config = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(config(**kw))
    with torch.no_grad():  # move constant-initialised parameters off their constants: every one matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def prompts(batch: int, length: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_forward_logits(model, seq: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, V] after `seq`, from one full forward without any cache."""
    with torch.no_grad():
        return model(seq, use_cache=False).logits[:, -1]


family_param = pytest.mark.parametrize("family", list(FAMILIES))


# ------------------------------------------------------------------ greedy, batching, length, eos
@family_param
def test_greedy_batched_equals_repeated_full_forward_and_single_prompts(family):
    model = make_model(family)
    x = prompts(3, 6)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    assert out.shape == (3, 16) and torch.equal(out[:, :6], x)
    for t in range(6, 16):
        assert torch.equal(out[:, t], full_forward_logits(model, out[:, :t]).argmax(-1)), t
    for i in range(3):  # a row of a batch is generated as the prompt alone
        alone = model.generate(x[i:i + 1], max_new_tokens=10, do_sample=False, pad_token_id=PAD)
        assert torch.equal(alone[0], out[i])
    one = model.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=PAD)
    assert torch.equal(one, out[:, :7])


@family_param
def test_eos_stops_a_row_and_pads_it(family):
    model = make_model(family)
    x = prompts(2, 5, seed=3)
    free = model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=PAD)[:, 5:]
    eos = int(free[0, 2])  # row 0 ends at its third new token
    pad = next(t for t in range(VOCAB) if t != eos)
    out = model.generate(x, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=pad)[:, 5:]
    expected = free.clone()
    ends = []
    for row in range(2):
        hits = (free[row] == eos).nonzero()
        if len(hits):
            end = int(hits[0]) + 1
            expected[row, end:] = pad
            ends.append(end)
        else:
            ends.append(8)
    assert out.shape[1] == max(ends)  # generation stops when every row has finished
    assert torch.equal(out, expected[:, :max(ends)])


@family_param
def test_beam_search_with_the_cache_equals_beam_search_recomputing(family):
    """Beam search reorders the cache rows (`reorder_cache`); without a cache every step recomputes."""
    model = make_model(family)
    x = prompts(2, 6, seed=6)
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(x, **kw), model.generate(x, use_cache=False, **kw))


# ------------------------------------------------------------------ sampling
@family_param
def test_sampling_draws_from_the_filtered_full_forward_distribution(family):
    model = make_model(family)
    x = prompts(2, 6, seed=4)
    top_k, top_p, temperature = 6, 0.8, 0.7
    torch.manual_seed(5)
    gen = model.generate(x, do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature, max_new_tokens=8,
                         num_return_sequences=3, pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    seq = gen.sequences
    assert seq.shape == (6, 14)
    assert torch.equal(seq[:, :6], x.repeat_interleave(3, dim=0))  # rows 3i..3i+2 continue prompt i
    for step, raw in enumerate(gen.logits):
        t = 6 + step
        # the cached decode saw the same logits a full forward of the sampled prefix gives
        ref = full_forward_logits(model, seq[:, :t])
        torch.testing.assert_close(raw, ref, rtol=0, atol=1e-4)
        # the sampled token lies in the top-k and in the top-p nucleus of softmax(logits / temperature)
        probs = torch.softmax(ref / temperature, dim=-1)
        top = probs.topk(top_k, dim=-1)
        kept = top.values / top.values.sum(-1, keepdim=True)
        mass_before = kept.cumsum(-1) - kept  # probability of the strictly higher-ranked kept tokens
        for row in range(seq.shape[0]):
            rank = (top.indices[row] == seq[row, t]).nonzero()
            assert len(rank) == 1, (step, row)
            assert mass_before[row, int(rank[0])] < top_p + 1e-6, (step, row)
    new = seq[:, 6:].reshape(2, 3, 8)
    assert any(not torch.equal(new[i, 0], new[i, j]) for i in range(2) for j in (1, 2))  # it does sample
    greedy = model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    top1 = model.generate(x, do_sample=True, top_k=1, temperature=0.5, max_new_tokens=8, pad_token_id=PAD)
    assert torch.equal(top1, greedy)  # top_k = 1 sampling is greedy


# ------------------------------------------------------------------ padding, contract
@family_param
def test_left_padded_batch_is_refused_with_the_reason(family):
    model = make_model(family)
    x = prompts(2, 6)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding, as a tokenizer with padding_side="left" makes
    with pytest.raises(ValueError, match="left padding"):
        model.generate(x, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD)


def test_lact_padding_with_a_cache_is_refused_and_right_padding_is_harmless_without():
    model = make_model("lact")
    x = prompts(2, 9)
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    with pytest.raises(ValueError, match="decoding with a cache"):
        model.generate(x, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():  # causality: a right-padded row's real positions are those of the unpadded prefix
        padded = model(x, attention_mask=mask).logits[1, :6]
        alone = model(x[1:, :6]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-6)


@family_param
def test_cache_under_either_name_and_unknown_kwargs_refused(family):
    model = make_model(family)
    x = prompts(1, 7)
    with torch.no_grad():
        first = model(x[:, :5], use_cache=True)
        cache = getattr(first, CACHE_NAME)
        with pytest.raises(TypeError, match="not both"):
            model(x[:, 5:], cache=cache, past_key_values=cache)
        with pytest.raises(TypeError, match="unexpected keyword argument.*bogus"):
            model(x, bogus=1)
        got = model(x[:, 5:], **{CACHE_NAME: cache}).logits
        want = model(x, use_cache=False).logits[:, 5:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ pipeline, Auto classes
@pytest.fixture(scope="module")
def tokenizer():
    from ttt_common.tokenizer import load_tokenizer

    return load_tokenizer()  # the offline GPT-2 BPE, never the hub


@family_param
def test_text_generation_pipeline(family, tokenizer):
    model = make_model(family, vocab=len(tokenizer))
    text = "def add(a, b):\n    return"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pipeline is normal use too: no warning
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
        out = pipe(text, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    ids = tokenizer(text, return_tensors="pt").input_ids
    direct = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out[0]["generated_text"] == tokenizer.decode(direct[0])
    assert out[0]["generated_text"].startswith(text) and len(direct[0]) == len(ids[0]) + 6


@family_param
def test_auto_classes_load_a_saved_model(family, tmp_path):
    model = make_model(family)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.config)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    x = prompts(2, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert torch.equal(loaded.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=PAD),
                       model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=PAD))


# ------------------------------------------------------------------ no warnings in normal use
@family_param
def test_normal_use_emits_no_warnings(family, caplog):
    """Build, forward, loss backward (with and without activation checkpointing) and generate, with
    every warning turned into an error. Nothing is filtered: no warning here is outside our control.
    transformers also reports deprecations through its logger (e.g. "`past_key_values` ... deprecated"),
    so no WARNING record may appear either (its library logger does not propagate by default)."""
    caplog.set_level(logging.WARNING)
    hf_logging.enable_propagation()
    x = prompts(2, 9)
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        stack.callback(hf_logging.disable_propagation)
        warnings.simplefilter("error")
        model = make_model(family).train()
        model(x, labels=x).loss.backward()
        enable_activation_checkpointing(model, {"use_reentrant": False})
        model(x, labels=x).loss.backward()
        model.eval()
        with torch.no_grad():
            model(x)
        model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        model.generate(x, max_new_tokens=5, do_sample=True, top_k=5, top_p=0.9, temperature=0.8, pad_token_id=PAD)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
