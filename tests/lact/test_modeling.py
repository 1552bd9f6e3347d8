"""LaCT layer and model: reference transcription, original-style keys and checkpoints, HF save/load and
generate, causality, stacked configurations training, manual vs autograd backprop at model level."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from lact import LaCTForCausalLM, LaCTSWIGLUConfig, LaCTSWIGLULayer
from lact import layers as layers_mod
from lact import ops as lact_ops
from lact.layers import window_attention
from lact.modules import GatedMLP, RMSNorm, RotaryEmbedding
from ttt_common.hf_compat import enable_activation_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw) -> LaCTSWIGLUConfig:
    base = dict(hidden_size=16, num_hidden_layers=1, num_attn_heads=2, num_lact_heads=2, lact_chunk_size=8,
                window_size=8, vocab_size=32, intermediate_size=32, max_position_embeddings=64,
                initializer_range=0.02)
    base.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LaCTSWIGLUConfig(**base)


def tiny_model(seed: int = 0, dtype=torch.float32, **kw) -> LaCTForCausalLM:
    torch.manual_seed(seed)
    return LaCTForCausalLM(tiny_config(**kw)).to(dtype)


def perturb_params(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Move every parameter off its init (ones/zeros/identity) so each one matters in the checks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


# ------------------------------------------------------------------------------------------------
# independent transcriptions (written from the reference / fla formulas, not from lact/)
# ------------------------------------------------------------------------------------------------


def ref_rms(x, weight, eps):
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * weight


def ref_rope(x, theta):
    """GPT-NeoX RoPE on [b, s, h, d] at positions 0..s-1 (fla rotary_embedding_ref, non-interleaved;
    fla builds the angle table in float32 whatever the input dtype, then casts cos/sin)."""
    s, d = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(s, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = ang.cos().to(x.dtype)[None, :, None], ang.sin().to(x.dtype)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def ref_window_attention(q, k, v, window, key_mask=None):
    """Explicit masked softmax; query i sees keys j with i - window < j <= i (flash (window-1, 0))."""
    b, s, h, d = q.shape
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    allowed = (j <= i) & ((i - j) < window if window is not None else True)
    allowed = allowed[None, None].expand(b, h, s, s)
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bhij,bjhd->bihd", p, v)
    if key_mask is not None:
        o = o * key_mask[:, :, None, None].to(o.dtype)
    return o


def reference_layer_forward(layer: LaCTSWIGLULayer, x: torch.Tensor, attention=None) -> torch.Tensor:
    """The reference LaCTSWIGLULayer.forward (no cache, no mask) transcribed with explicit reshapes;
    the chunk op is the reference's single-MLP drop-in (checked against the official fixtures).
    `attention(q, k, v, window)` defaults to the explicit masked softmax."""
    attention = attention or ref_window_attention
    b, s, _ = x.shape
    H, D, nh = layer.num_heads, layer.head_dim, layer.num_fw_heads
    q, k, v = layer.qkv(x).chunk(3, dim=-1)
    if layer.attn_qk_norm:
        q, k = ref_rms(q, layer.q_norm.weight, 1e-5), ref_rms(k, layer.k_norm.weight, 1e-5)
    scale, offset = layer.qk_scale.view(1, 1, -1, 2), layer.qk_offset.view(1, 1, -1, 2)
    fq, fk, fv = q * scale[..., 0] + offset[..., 0], k * scale[..., 1] + offset[..., 1], v
    qh, kh = ref_rope(q.view(b, s, H, D), layer.rope_theta), ref_rope(k.view(b, s, H, D), layer.rope_theta)
    o = attention(qh, kh, v.view(b, s, H, D), layer.window_size).reshape(b, s, -1)

    def heads(t):  # "b s (n d) -> (b n) s d"
        return t.reshape(b, s, nh, -1).permute(0, 2, 1, 3).reshape(b * nh, s, -1)

    def unheads(t):  # "(b n) s d -> b s (n d)"
        return t.reshape(b, nh, s, -1).permute(0, 2, 1, 3).reshape(b, s, -1)

    fq, fk, fv = heads(fq), heads(fk), heads(fv)
    if layer.qkv_silu:
        fq, fk = F.silu(fq), F.silu(fk)
        if not layer.no_v_silu:
            fv = F.silu(fv)
    fq = fq / (fq.norm(dim=-1, keepdim=True) + 1e-5)
    fk = fk / (fk.norm(dim=-1, keepdim=True) + 1e-5)
    if not layer.ttt_nope:
        fq = heads(ref_rope(unheads(fq).reshape(b, s, H, D), layer.rope_theta).reshape(b, s, -1))
        fk = heads(ref_rope(unheads(fk).reshape(b, s, H, D), layer.rope_theta).reshape(b, s, -1))

    def fast(w):
        if isinstance(w, torch.nn.Module):
            eye = torch.eye(w.out_features, w.in_features, dtype=x.dtype)
            return w.w_left @ w.w_right + 0.5 * eye
        return w

    w0, w1, w2 = (fast(w).repeat(b, 1, 1) for w in (layer.w0, layer.w1, layer.w2))
    # the reference upcasts with .float(); in this float64 check the values stay float64
    lr = F.softplus(layer.lr_proj(x) + math.log(math.expm1(1e-3)))  # base lr 1e-3, "mamba"
    lr = lr.reshape(b, s, nh, 3).permute(0, 2, 1, 3).reshape(b * nh, s, 3)
    lr1, lr2, lr3 = lr[..., 0:1], lr[..., 1:2], lr[..., 2:3]
    mom = None
    if layer.use_momentum:
        mom = heads(torch.sigmoid(layer.momentum_proj[0](x)))
    op = lact_ops.prenorm_block_causal_lact_swiglu if layer.ttt_prenorm else lact_ops.block_causal_lact_swiglu
    fw_x = op(w0, w1, w2, fq, fk, fv, lr1, lr2, lr3, chunk_size=layer.lact_chunk_size,
              use_muon=layer.use_muon, momentum=mom)
    ttt = ref_rms(fw_x, layer.ttt_norm.weight, 1e-5)
    if layer.learnable_ttt_scale:
        ttt = ttt * heads(F.silu(layer.ttt_scale_proj(x)))
    return layer.o_proj(o + unheads(ttt))


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------


def test_modules_match_fla_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    rope = RotaryEmbedding(8, base=500.0)
    q, k = rope(x, x.flip(1))
    torch.testing.assert_close(q, ref_rope(x, 500.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, ref_rope(x.flip(1), 500.0), rtol=1e-6, atol=1e-6)
    assert not rope.state_dict()  # fla's inv_freq buffer is non-persistent

    norm = RMSNorm(8, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    res = torch.randn_like(x)
    y, new_res = norm(x, res, prenorm=True)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(y, ref_rms(x + res, norm.weight, 1e-6))

    # fla's GatedMLP width rule: int(h * ratio * 2/3) rounded up to a multiple of 256
    assert GatedMLP(1536, hidden_ratio=4).intermediate_size == 4096
    assert GatedMLP(90, hidden_ratio=4).intermediate_size == 256  # 240 -> 256
    assert GatedMLP(100, hidden_ratio=4).intermediate_size == 512  # 266 -> 512
    mlp = GatedMLP(8, intermediate_size=16).double()
    z = torch.randn(3, 8, dtype=torch.float64)
    expected = (F.silu(z @ mlp.gate_proj.weight.T) * (z @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(z), expected)


@pytest.mark.parametrize("window", [None, 1, 3, 7, 40])
def test_window_attention_matches_masked_softmax(window):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 11, 3, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(window_attention(q, k, v, window), ref_window_attention(q, k, v, window))
    key_mask = torch.ones(2, 11, dtype=torch.long)
    key_mask[0, :3] = 0  # left padding
    key_mask[1, 9:] = 0  # right padding
    got = window_attention(q, k, v, window, key_mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref_window_attention(q, k, v, window, key_mask))
    # an all-ones mask is the same as no mask
    torch.testing.assert_close(window_attention(q, k, v, window, torch.ones(2, 11)), window_attention(q, k, v, window))


# ------------------------------------------------------------------------------------------------
# r = 1 reproduces the reference layer
# ------------------------------------------------------------------------------------------------

LAYER_CASES = {
    # 4 attention heads of 4 vs 2 fast-weight heads of 8: the fast q, k RoPE runs over attention heads
    "post_lowrank_mom_4attnheads": dict(w0_w2_low_rank=4, use_momentum=True, num_attn_heads=4),
    "pre_full_nomom": dict(ttt_prenorm=True, use_momentum=False, learnable_ttt_scale=False, num_lact_heads=1),
    "post_qknorm_bias_nope_nov": dict(attn_qk_norm=True, qkv_bias=True, ttt_nope=True, no_v_silu=True,
                                      window_size=3, inter_multi=2),
    "post_nosilu_remainder": dict(qkv_silu=False, lact_chunk_size=5, w0_w2_low_rank=2, fp32_states=True),
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_r1_layer_matches_reference_transcription(case):
    cfg = tiny_config(**{"rope_theta": 1000.0, **LAYER_CASES[case]})
    torch.manual_seed(0)
    layer = LaCTSWIGLULayer.from_config(cfg).double()
    perturb_params(layer, seed=1)
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    x.requires_grad_(True)
    got = layer(x)[0]
    ref = reference_layer_forward(layer, x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # gradients of every parameter and of the input agree too
    cot = torch.randn_like(got)
    params = [x] + list(layer.parameters())
    g_got = torch.autograd.grad(got, params, cot)
    g_ref = torch.autograd.grad(reference_layer_forward(layer, x), params, cot)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_r1_layer_is_bit_identical_to_single_mlp_path_in_float32():
    """float32: the r = 1 layer and the transcription around the reference's single-MLP op agree
    bit for bit once the attention branch uses the same kernel (SDPA vs explicit softmax differ
    in round-off only, checked above)."""
    cfg = tiny_config(w0_w2_low_rank=4, use_momentum=True, window_size=None, rope_theta=1000.0)
    torch.manual_seed(0)
    layer = LaCTSWIGLULayer.from_config(cfg)
    perturb_params(layer, seed=2)
    x = torch.randn(2, 24, 16)
    with torch.no_grad():
        got = layer(x)[0]
        ref = reference_layer_forward(layer, x, attention=window_attention)
    assert torch.equal(got, ref)


# Keys and shapes the reference layer defines (layer_lact_swiglu.py __init__), listed by hand.
def reference_layer_keys(h, nh, d_h, rank, n_fw, qk_norm=False, qkv_bias=False):
    d = h // n_fw
    keys = {"qkv.weight": (3 * h, h), "o_proj.weight": (h, h), "w1": (n_fw, d, d_h),
            "lr_proj.weight": (3 * n_fw, h), "lr_proj.bias": (3 * n_fw,), "qk_scale": (h, 2),
            "qk_offset": (h, 2), "ttt_scale_proj.weight": (n_fw, h), "ttt_scale_proj.bias": (n_fw,),
            "ttt_norm.weight": (d,), "momentum_proj.0.weight": (n_fw, h), "momentum_proj.0.bias": (n_fw,)}
    if rank > 0:
        for w in ("w0", "w2"):
            keys[f"{w}.w_left"] = (n_fw, d_h, rank)
            keys[f"{w}.w_right"] = (n_fw, rank, d)
    else:
        keys["w0"] = keys["w2"] = (n_fw, d_h, d)
    if qk_norm:
        keys["q_norm.weight"] = keys["k_norm.weight"] = (h,)
    if qkv_bias:
        keys["qkv.bias"] = (3 * h,)
    return keys


@pytest.mark.parametrize("rank, qk_norm, bias", [(-1, False, False), (4, True, True)])
def test_r1_state_dict_keys_are_the_reference_ones(tmp_path, rank, qk_norm, bias):
    cfg = tiny_config(hidden_size=32, num_attn_heads=4, num_lact_heads=4, inter_multi=2, w0_w2_low_rank=rank,
                      attn_qk_norm=qk_norm, qkv_bias=bias)
    layer = LaCTSWIGLULayer.from_config(cfg)
    sd = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert sd == reference_layer_keys(32, 4, 16, rank, 4, qk_norm, bias)
    # save -> load into a fresh layer: identical outputs
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    other = LaCTSWIGLULayer.from_config(cfg)
    other.load_state_dict(torch.load(tmp_path / "layer.pt"))
    x = torch.randn(1, 12, 32)
    with torch.no_grad():
        assert torch.equal(layer(x)[0], other(x)[0])


def test_stacked_layer_adds_named_per_mlp_parameters():
    cfg = tiny_config(r=3, w0_w2_low_rank=4)
    sd = LaCTSWIGLULayer.from_config(cfg).state_dict()
    for i in range(3):
        for name, shape in (("w0.w_left", (2, 8, 4)), ("w0.w_right", (2, 4, 8)), ("w1", (2, 8, 8)),
                            ("w2.w_left", (2, 8, 4)), ("w2.w_right", (2, 4, 8))):
            assert tuple(sd[f"fast_mlps.{i}.{name}"].shape) == shape
    assert not any(k.startswith(("w0", "w1", "w2")) for k in sd)


# ------------------------------------------------------------------------------------------------
# model: original checkpoints, HF save/load, generate, causality
# ------------------------------------------------------------------------------------------------


def reference_model_keys(cfg) -> dict[str, tuple]:
    h, n_fw = cfg.hidden_size, cfg.num_lact_heads
    inter = cfg.intermediate_size
    keys = {"model.embeddings.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
            "lm_head.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        keys.update({p + "attn_norm.weight": (h,), p + "mlp_norm.weight": (h,),
                     p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                     p + "mlp.down_proj.weight": (h, inter)})
        for k, shape in reference_layer_keys(h, cfg.num_attn_heads, cfg.fw_hidden_dim, cfg.w0_w2_low_rank,
                                             n_fw).items():
            keys[p + "attn." + k] = shape
    return keys


def test_original_style_checkpoint_loads_unchanged(tmp_path):
    cfg = tiny_config(num_hidden_layers=2, w0_w2_low_rank=4)
    g = torch.Generator().manual_seed(3)
    state = {k: 0.1 * torch.randn(shape, generator=g) for k, shape in reference_model_keys(cfg).items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    # the config as the reference writes it: no r / residual_ttt / greedy_ttt / ttt_backprop keys
    raw = {k: v for k, v in cfg.to_dict().items() if k not in ("r", "residual_ttt", "greedy_ttt", "ttt_backprop")}
    raw["architectures"] = ["LaCTForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model, info = LaCTForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.r == 1
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("kw", [dict(), dict(r=2, w0_w2_low_rank=4, ttt_prenorm=True)])
def test_save_pretrained_round_trip_safetensors(tmp_path, kw):
    model = tiny_model(num_hidden_layers=2, **kw).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # via the Auto registration
    assert type(loaded) is LaCTForCausalLM
    x = torch.randint(0, 32, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_init_follows_reference_scheme():
    cfg = tiny_config(hidden_size=64, num_attn_heads=4, num_lact_heads=2, w0_w2_low_rank=8, r=2,
                      initializer_range=0.02, vocab_size=512, intermediate_size=256)
    torch.manual_seed(0)
    model = LaCTForCausalLM(cfg)
    layer = model.model.layers[0].attn
    assert abs(model.model.embeddings.weight.std().item() - 0.02) < 2e-3
    assert abs(layer.qkv.weight.std().item() - 0.02) < 2e-3
    assert torch.equal(layer.qk_scale, torch.ones(64, 2)) and torch.equal(layer.qk_offset, torch.zeros(64, 2))
    for mlp in layer.fast_mlps:
        assert abs(mlp.w1.std().item() - 1 / math.sqrt(32)) < 0.03  # 1 / sqrt(d_h)
        assert abs(mlp.w0.w_left.std().item() - 0.5 / math.sqrt(8)) < 0.03  # gain / sqrt(rank)
        assert abs(mlp.w0.w_right.std().item() - 0.5 / math.sqrt(32)) < 0.02  # gain / sqrt(d_in)
    assert torch.equal(layer.ttt_norm.weight, torch.ones(32))


def test_generate_greedy_equals_argmax_of_full_forwards():
    model = tiny_model(num_hidden_layers=2, r=2, w0_w2_low_rank=4).eval()
    perturb_params(model, seed=4, scale=0.05)
    prompt = torch.randint(0, 32, (2, 6))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("t", [7, 8, 10])  # chunk 4: last token of a chunk, first of the next, mid-chunk
def test_causality_future_tokens_do_not_move_past_logits(t):
    model = tiny_model(num_hidden_layers=2, r=2, lact_chunk_size=4, window_size=3, use_muon=True).eval()
    perturb_params(model, seed=5, scale=0.05)
    x = torch.randint(0, 32, (2, 24))
    y = x.clone()
    y[:, t + 1:] = (y[:, t + 1:] + 1 + torch.randint(0, 30, y[:, t + 1:].shape)) % 32
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().amax() > 1e-4


def test_fast_weights_carry_information_beyond_the_window():
    """One layer, window 2, chunk 4: a token in chunk 0 reaches position 20 only through the updated
    fast weights, so perturbing it must change logits there (and not before its own position)."""
    model = tiny_model(num_hidden_layers=1, lact_chunk_size=4, window_size=2).eval()
    perturb_params(model, seed=6, scale=0.05)
    x = torch.randint(0, 32, (1, 24))
    y = x.clone()
    y[0, 1] = (y[0, 1] + 5) % 32
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.equal(a[:, :1], b[:, :1])
    assert torch.equal(a[:, 3:4], b[:, 3:4])  # same chunk, outside the window: no update applied yet
    assert (a[:, 20] - b[:, 20]).abs().amax() > 1e-6


def test_errors_name_the_problem():
    model = tiny_model()
    x = torch.randint(0, 32, (1, 8))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(x, inputs_embeds=torch.zeros(1, 8, 16))
    layer = model.model.layers[0].attn
    with pytest.raises(ValueError, match=r"expected \[B, T, 16\]"):
        layer(torch.zeros(1, 8, 12))
    with pytest.raises(ValueError, match="padding mask"):
        layer(torch.zeros(1, 8, 16), attention_mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="r=0 must be an int >= 1"):
        LaCTSWIGLULayer(16, 2, 2, 1, 8, 8, r=0)


# ------------------------------------------------------------------------------------------------
# backprop modes
# ------------------------------------------------------------------------------------------------


def test_auto_backprop_is_manual_only_when_gradients_are_needed(monkeypatch):
    seen = []
    real = lact_ops.lact_swiglu

    def spy(*args, **kw):
        seen.append(kw["backprop"])
        return real(*args, **kw)

    monkeypatch.setattr(lact_ops, "lact_swiglu", spy)
    model = tiny_model()
    x = torch.randint(0, 32, (1, 32))  # 4 chunks of 8: manual saves memory (>= 2 update chunks)
    model(x, labels=x).loss.backward()
    with torch.no_grad():
        model(x)
    model.requires_grad_(False)
    model(x)
    assert seen == ["manual", "autograd", "autograd"]
    for mode in ("autograd", "manual"):
        m = tiny_model(ttt_backprop=mode)
        seen.clear()
        with torch.no_grad():
            m(x)
        assert seen == [mode]


MODEL_GRAD_CASES = {
    "r2_e2e_lowrank_mom": dict(r=2, w0_w2_low_rank=4, use_momentum=True),
    "r3_residual_prenorm_full": dict(r=3, residual_ttt=True, ttt_prenorm=True),
    "r2_greedy_nomom_remainder": dict(r=2, greedy_ttt=True, use_momentum=False, lact_chunk_size=5),
}


@pytest.mark.parametrize("case", MODEL_GRAD_CASES)
def test_manual_and_autograd_backprop_agree_at_model_level(case):
    grads, losses = {}, {}
    for mode in ("autograd", "manual"):
        model = tiny_model(seed=0, dtype=torch.float64, num_hidden_layers=2, ttt_backprop=mode,
                           **MODEL_GRAD_CASES[case])
        perturb_params(model, seed=7, scale=0.05)
        x = torch.randint(0, 32, (2, 19), generator=torch.Generator().manual_seed(8))
        loss = model(x, labels=x).loss
        loss.backward()
        losses[mode] = loss.detach()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.equal(losses["autograd"], losses["manual"])
    assert grads["autograd"].keys() == grads["manual"].keys()
    for name, g in grads["autograd"].items():
        torch.testing.assert_close(grads["manual"][name], g, rtol=1e-9, atol=1e-12, msg=name)
    fw = [n for n in grads["manual"] if ".fast_mlps." in n or n.endswith((".w1", ".w0", ".w2"))]
    assert fw and all(grads["manual"][n].abs().amax() > 0 for n in fw)


def test_manual_layer_recomputes_the_fast_weight_pieces_with_autograds_gradients(monkeypatch):
    """ttt_backprop="manual": the layer runs the fast-weight inputs (rescale, SiLU, L2 norm, RoPE) and
    output (RMSNorm, scale) under `_recomputed`; every gradient equals the autograd path's."""
    calls = []
    real = layers_mod._recomputed

    def spy(fn, *args):
        calls.append(fn.__name__)
        return real(fn, *args)

    monkeypatch.setattr(layers_mod, "_recomputed", spy)
    cfg = dict(r=2, w0_w2_low_rank=4, use_momentum=True, learnable_ttt_scale=True, rope_theta=1000.0)
    x = torch.randn(2, 29, 16, dtype=torch.float64)  # 3 update chunks of 8 + a partial one
    cot = torch.randn_like(x)
    grads = {}
    for mode in ("autograd", "manual"):
        torch.manual_seed(0)
        layer = LaCTSWIGLULayer.from_config(tiny_config(ttt_backprop=mode, **cfg)).double()
        perturb_params(layer, seed=4)
        xi = x.clone().requires_grad_()
        named = dict(layer.named_parameters())
        o = layer(xi)[0]
        grads[mode] = (o.detach(), torch.autograd.grad(o, [xi, *named.values()], cot))
    assert calls == ["_fast_inputs", "_fast_output"]  # manual only; autograd keeps every intermediate
    assert torch.equal(grads["autograd"][0], grads["manual"][0])
    for name, a, m in zip(["x", *named], grads["autograd"][1], grads["manual"][1]):
        torch.testing.assert_close(m, a, rtol=1e-9, atol=1e-12, msg=name)


def test_recomputed_pieces_save_only_their_inputs():
    """What `_recomputed` keeps for backward is its inputs (and parameters), none of the [B, T, hidden]
    intermediates that the plain call saves; values and gradients are bit-identical."""
    torch.manual_seed(0)
    layer = LaCTSWIGLULayer.from_config(tiny_config(use_momentum=True, learnable_ttt_scale=True))
    perturb_params(layer, seed=5)
    qkv = torch.randn(2, 19, 48).requires_grad_()
    fw_x = torch.randn(4, 19, 8).requires_grad_()
    hidden = torch.randn(2, 19, 16).requires_grad_()
    pieces = {"inputs": (layer._fast_inputs, (*qkv.chunk(3, dim=-1), 0)), "output": (layer._fast_output, (fw_x, hidden))}
    allowed = {t.untyped_storage().data_ptr() for t in (qkv, fw_x, hidden, *layer.parameters())}
    for name, (fn, args) in pieces.items():
        results = {}
        for how, run in (("plain", layers_mod._direct), ("recomputed", layers_mod._recomputed)):
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
                out = run(fn, *args)
            out = out if isinstance(out, tuple) else (out,)
            foreign = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in allowed]
            cot = [torch.ones_like(o) for o in out]
            results[how] = (out, torch.autograd.grad(out, [qkv, fw_x, hidden, *layer.parameters()], cot,
                                                     allow_unused=True, materialize_grads=True), foreign)
        assert results["plain"][2], f"{name}: the plain call saves intermediates (else this test proves nothing)"
        assert results["recomputed"][2] == [], f"{name}: recomputed piece saved {results['recomputed'][2]}"
        for a, b in zip(results["plain"][0] + results["plain"][1], results["recomputed"][0] + results["recomputed"][1]):
            assert torch.equal(a, b), name


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(9))
    grads = []
    for ckpt in (False, True):
        model = tiny_model(num_hidden_layers=2, r=2).train()
        if ckpt:
            enable_activation_checkpointing(model, {"use_reentrant": False})
            assert all(block.gradient_checkpointing for block in model.model.layers)
        model(x, labels=x).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# every stacked configuration trains
# ------------------------------------------------------------------------------------------------

STACK_MODES = [(False, False), (True, False), (False, True)]  # (residual, greedy); greedy+residual invalid
TRAIN_CASES = [
    pytest.param(r, res, greedy, low, muon, pre,
                 id=f"r{r}-{'res' if res else 'greedy' if greedy else 'plain'}-{'low' if low else 'full'}-"
                    f"{'muon' if muon else 'mom'}-{'pre' if pre else 'post'}")
    for r, (res, greedy), low, muon, pre in itertools.product([1, 2, 3], STACK_MODES, [True, False],
                                                              [False, True], [False, True])
    if not (r == 1 and greedy)  # r = 1: greedy is the end-to-end objective
]


@pytest.mark.parametrize("r, residual, greedy, low_rank, muon, prenorm", TRAIN_CASES)
def test_every_stacked_configuration_trains(r, residual, greedy, low_rank, muon, prenorm):
    model = tiny_model(seed=r, r=r, residual_ttt=residual, greedy_ttt=greedy,
                       w0_w2_low_rank=4 if low_rank else -1, use_momentum=True, use_muon=muon,
                       ttt_prenorm=prenorm, lact_chunk_size=8, window_size=8).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 32, (2, 32), generator=torch.Generator().manual_seed(10))
    losses = []
    for _ in range(3):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_fp32_states_with_bfloat16_activations():
    """bf16 model + fp32_states: the fast weights stay float32 (matmuls under autocast, as the
    reference's op) and the output tracks the float32 model."""
    model = tiny_model(num_hidden_layers=1, r=2, w0_w2_low_rank=4, fp32_states=True).eval()
    perturb_params(model, seed=11, scale=0.05)
    layer = model.model.layers[0].attn
    x = torch.randint(0, 32, (2, 20))
    with torch.no_grad():
        ref = model(x).logits
        model.to(torch.bfloat16)
        assert all(w.dtype == torch.float32 for ws in layer.initial_fast_weights(2) for w in ws)
        got = model(x).logits
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert (got.float() - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """CUDA float32 (SDPA window mask, or flash-attn only for half precision) == the CPU model."""
    model = tiny_model(num_hidden_layers=2, r=2, w0_w2_low_rank=4, window_size=5).eval()
    perturb_params(model, seed=12, scale=0.05)
    x = torch.randint(0, 32, (2, 24))
    with torch.no_grad():
        cpu = model(x).logits
        gpu = model.cuda()(x.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5)


def test_bf16_parameters_train_and_manual_matches_autograd():
    """FSDP2 bf16 mixed precision hands the layer bf16 parameters: the fast-weight states stay fp32
    (matmuls under autocast), and the manual backward recomputes under the forward's autocast."""
    from pathlib import Path

    cfg = LaCTSWIGLUConfig.from_json_file(str(Path(__file__).resolve().parents[2] / "configs/lact_debug_r2.json"))
    grads, losses = {}, {}
    for mode in ("manual", "autograd"):
        cfg.ttt_backprop = mode
        torch.manual_seed(0)
        model = LaCTForCausalLM(cfg).to(torch.bfloat16)
        ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
        out = model(ids, labels=ids)
        out.loss.backward()
        losses[mode] = out.loss.item()
        grads[mode] = [p.grad.float() for p in model.parameters() if p.requires_grad]
        assert all(torch.isfinite(g).all() for g in grads[mode])
    assert losses["manual"] == losses["autograd"]
    for a, b in zip(grads["manual"], grads["autograd"]):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max() + 1e-6


def test_auto_backprop_is_manual_only_when_it_helps():
    """`ttt_backprop="auto"`: manual when gradients are needed and there are >= 2 update chunks."""
    from pathlib import Path

    cfg = LaCTSWIGLUConfig.from_json_file(str(Path(__file__).resolve().parents[2] / "configs/lact_debug_r2.json"))
    cfg.ttt_backprop = "auto"
    layer = LaCTForCausalLM(cfg).model.layers[0].attn
    c = layer.lact_chunk_size
    long_x, short_x = torch.zeros(1, 3 * c, cfg.hidden_size), torch.zeros(1, c, cfg.hidden_size)
    assert layer.resolve_backprop(long_x) == "manual"
    assert layer.resolve_backprop(short_x) == "autograd"
    with torch.no_grad():
        assert layer.resolve_backprop(long_x) == "autograd"
