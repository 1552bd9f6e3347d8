"""Blocked sliding-window attention (issue 16, item 1): same values and gradients as the dense masked
reference, for odd lengths, windows below and above T, padding masks and the layer's head layouts, with
memory linear in T; and the LaCT layer's outputs unchanged against the dense kernel."""

from __future__ import annotations

import pytest
import torch

from lact.layers import LaCTSWIGLULayer
from lact.ops import window_attention as wa
from lact.ops.window_attention import blocked_window_attention, choose_impl, window_attention
from tests.lact.test_modeling import perturb_params, ref_window_attention, tiny_config


def qkv(B, T, H, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


CASES = [  # T, window, block: odd lengths, windows smaller and larger than T, block not dividing T
    (1, 4, 3), (13, 1, 4), (13, 5, 4), (29, 7, 8), (29, 29, 5), (31, 64, 8), (37, None, 6), (33, 8, 33),
]


@pytest.mark.parametrize("T,window,block", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_blocked_equals_dense_reference_forward_and_grads(T, window, block, padded):
    q, k, v = qkv(2, T, 3, 4, seed=T)
    mask = None
    if padded:
        mask = torch.ones(2, T, dtype=torch.long)
        mask[0, : T // 3] = 0  # left padding
        mask[1, T - T // 4:] = 0  # right padding
    got = window_attention(q, k, v, window, mask, impl="blocked", block_size=block)
    dense = window_attention(q, k, v, window, mask, impl="dense")
    ref = ref_window_attention(q, k, v, window, mask)  # independent transcription (tests/lact)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (q, k, v), cot)
    g_ref = torch.autograd.grad(ref, (q, k, v), cot)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("H,D", [(2, 8), (4, 4), (1, 16)])  # the tiny layer's attention head layouts
def test_blocked_equals_dense_in_float32_layouts(H, D):
    q, k, v = qkv(2, 45, H, D, seed=H, dtype=torch.float32)
    got = blocked_window_attention(q, k, v, 9, None, 16)
    torch.testing.assert_close(got, wa.dense_window_attention(q, k, v, 9), rtol=1e-5, atol=1e-6)


def test_auto_dispatch_choices():
    q = torch.zeros(1, 10, 2, 4)
    assert choose_impl(q, None, None) == "sdpa"
    assert choose_impl(q, 10, None) == "sdpa"
    assert choose_impl(q, 9, None) == "blocked"
    assert choose_impl(q, None, torch.ones(1, 10, dtype=torch.bool)) == "blocked"


def test_blocked_is_causal_under_future_perturbation():
    q, k, v = (x.detach() for x in qkv(1, 40, 2, 4, seed=3))
    out = window_attention(q, k, v, 6, impl="blocked", block_size=7)
    k2, v2, q2 = k.clone(), v.clone(), q.clone()
    for x in (q2, k2, v2):
        x[:, 23:] += 5.0
    out2 = window_attention(q2, k2, v2, 6, impl="blocked", block_size=7)
    assert torch.equal(out[:, :23], out2[:, :23])
    assert not torch.equal(out[:, 23:], out2[:, 23:])


def test_blocked_memory_is_linear_in_T(monkeypatch):
    """The largest score tensor the blocked kernel builds is [B, H, block, block + W - 1], whatever T."""
    sizes = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        sizes.append(attn_mask.numel() * q.shape[0] * q.shape[1] // attn_mask.shape[0] // attn_mask.shape[1])
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(wa.F, "scaled_dot_product_attention", spy)
    q, k, v = (x.detach() for x in qkv(1, 500, 2, 4, dtype=torch.float32))
    window_attention(q, k, v, 16, impl="auto", block_size=32)
    assert max(sizes) == 1 * 2 * 32 * (32 + 16 - 1)
    assert len(sizes) == -(-500 // 32)


@pytest.mark.parametrize("bad", [dict(window_size=0), dict(window_size=2.5), dict(impl="fast"),
                                 dict(block_size=0)])
def test_bad_arguments_are_named(bad):
    q, k, v = (x.detach() for x in qkv(1, 5, 1, 2))
    args = dict(window_size=2, impl="auto", block_size=4)
    args.update(bad)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        window_attention(q, k, v, args.pop("window_size"), **args)


@pytest.mark.parametrize("case", [dict(window_size=5), dict(window_size=None), dict(window_size=64),
                                  dict(window_size=3, num_attn_heads=4, use_momentum=True)])
def test_layer_outputs_unchanged_vs_dense_kernel(case, monkeypatch):
    cfg = tiny_config(**case)
    torch.manual_seed(0)
    layer = LaCTSWIGLULayer.from_config(cfg).double()
    perturb_params(layer, seed=1)
    x = torch.randn(2, 27, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 27, dtype=torch.long)
    mask[1, :4] = 0
    real = wa._kernel
    for m in (None, mask):
        with monkeypatch.context() as mp:  # blocks of 4 rows: many blocks at T = 27
            mp.setattr(wa, "_kernel", lambda q, k, v, w, ko, impl, bs: real(q, k, v, w, ko, impl, 4))
            got = layer(x, attention_mask=m)[0]
            g_got = torch.autograd.grad(got.square().sum(), [x, *layer.parameters()])
        with monkeypatch.context() as mp:
            mp.setattr(wa, "_kernel", lambda q, k, v, w, ko, impl, bs: real(q, k, v, w, ko, "dense", bs))
            ref = layer(x, attention_mask=m)[0]
            g_ref = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
