"""The shared RMSNorm and RoPE (`ttt_common.modules`): each float path against its own formula, and the
LaCT (fla) and official (ttt-lm-jax) variants against each other."""

from __future__ import annotations

import pytest
import torch

from ttt_common.modules import (
    RMSNorm,
    RotaryEmbedding,
    apply_rotary_half,
    apply_rotary_interleaved,
    rope_cos_sin,
)


def _norm_pair(d: int = 16) -> tuple[RMSNorm, RMSNorm]:
    fla, official = RMSNorm(d, eps=1e-6), RMSNorm(d, eps=1e-6, scale_in_input_dtype=True)
    with torch.no_grad():
        w = torch.linspace(0.5, 1.5, d)
        fla.weight.copy_(w)
        official.weight.copy_(w)
    return fla, official


def test_rmsnorm_float_paths_follow_their_references():
    fla, official = _norm_pair()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)) * 3
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype)
        # float32 / float64: the two orders are the same operations, bit for bit
        assert torch.equal(fla.to(dtype)(xd), official.to(dtype)(xd)), dtype
    xb = x.bfloat16()
    xf = xb.float()
    normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)
    w = fla.weight.float()
    # fla: weight applied in float32, one rounding to bf16 at the end
    assert torch.equal(fla.float()(xb), (normed * w).bfloat16())
    # official: round the normalised value to bf16, then scale in bf16
    assert torch.equal(official.float()(xb), normed.bfloat16() * w.bfloat16())
    diff = (fla.float()(xb).float() - official.float()(xb).float()).abs()
    assert 0 < diff.max() <= 2 * 2**-8 * (normed.abs() * w).max()  # differ, by about one bf16 rounding


def test_rmsnorm_fused_residual_form():
    fla, _ = _norm_pair()
    x, r = torch.randn(2, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    y, s = fla.double()(x, r, prenorm=True)
    assert torch.equal(s, x + r) and torch.equal(y, fla(x + r))


def _half_to_interleaved(d: int) -> torch.Tensor:
    """Channel order taking the NeoX layout (i pairs with i + d/2) to the interleaved one (2i with 2i+1)."""
    return torch.stack((torch.arange(d // 2), torch.arange(d // 2) + d // 2), dim=-1).flatten()


@pytest.mark.parametrize("correctly_rounded", [False, True])
def test_rope_layouts_are_one_rotation_up_to_a_channel_permutation(correctly_rounded):
    d, theta = 8, 500.0
    x = torch.randn(2, 7, 3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(100, 107)
    cos, sin = rope_cos_sin(pos, d, theta, torch.float64, correctly_rounded=correctly_rounded)
    perm = _half_to_interleaved(d)
    half = apply_rotary_half(x, cos, sin)
    inter = apply_rotary_interleaved(x[..., perm], cos, sin)
    assert torch.equal(inter, half[..., perm])



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_interleaved_rope_complex_multiply_equals_the_real_pair_formula(dtype):
    """The complex-multiply implementation against the two real products written out here, bit for bit,
    on a non-contiguous [B, T, 2, H, D] view (queries and keys at once) with a [T, D/2] table; gradients
    through both agree."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 9, 3, 2, 16, dtype=torch.float64, generator=g).to(dtype)
    x = base.transpose(2, 3).requires_grad_(dtype != torch.bfloat16)  # [2, 9, 2, 3, 16], not contiguous
    real = torch.float64 if dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(torch.arange(40, 49), 16, 10000.0, real, correctly_rounded=True)
    x0, x1 = x.to(real)[..., 0::2], x.to(real)[..., 1::2]
    c, s = cos[:, None, None, :], sin[:, None, None, :]
    want = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(dtype)
    got = apply_rotary_interleaved(x, cos, sin)
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.equal(got, want)
    if x.requires_grad:
        w = torch.randn(x.shape, dtype=dtype, generator=g)
        (g_want,) = torch.autograd.grad((want * w).sum(), x)
        (g_got,) = torch.autograd.grad((got * w).sum(), x)
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_interleaved_rope_in_place_is_the_same_rotation(dtype):
    """`inplace=True` rotates a contiguous float32/float64 tensor in its own storage, bit for bit as the
    out-of-place call; a bfloat16 input (rotated in float32) or one that needs autograd gets a new tensor."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 2, 3, 16, dtype=torch.float64, generator=g).to(dtype)
    cos, sin = rope_cos_sin(torch.arange(7), 16, 10000.0, torch.float32, correctly_rounded=True)
    want = apply_rotary_interleaved(x, cos, sin)
    y = x.clone()
    got = apply_rotary_interleaved(y, cos, sin, inplace=True)
    assert torch.equal(got, want)
    assert (got.data_ptr() == y.data_ptr()) == (dtype != torch.bfloat16)
    if dtype != torch.bfloat16:
        assert torch.equal(y, want)  # rotated where it lies
        leaf = x.clone().requires_grad_()
        out = apply_rotary_interleaved(leaf, cos, sin, inplace=True)
        assert out.data_ptr() != leaf.data_ptr() and torch.equal(leaf, x) and torch.equal(out, want)

def test_rope_table_float_paths_and_rotation_properties():
    d, theta = 16, 10000.0
    pos = torch.arange(0, 8192, 7)
    c32, s32 = rope_cos_sin(pos, d, theta)  # fla: float32 cos/sin
    c64, s64 = rope_cos_sin(pos, d, theta, correctly_rounded=True)  # official: correctly rounded
    ang = pos.float()[:, None] * (1.0 / theta ** (torch.arange(0, d, 2).float() / d))
    assert torch.equal(c64, ang.double().cos().float()) and torch.equal(s64, ang.double().sin().float())
    # the two paths differ by at most a few float32 roundings
    assert (c32 - c64).abs().max() <= 4 * 2**-24 and (s32 - s64).abs().max() <= 4 * 2**-24
    # a rotation: norms kept; q.k depends on the distance only
    q, k = torch.randn(2, 1, 1, d, dtype=torch.float64).unbind(0)
    rope = RotaryEmbedding(d, base=theta)
    dots = []
    for offset in (0, 5, 40):
        qr, _ = rope(q, q, seqlen_offset=offset + 3)
        kr, _ = rope(k, k, seqlen_offset=offset)
        torch.testing.assert_close(qr.norm(), q.norm(), rtol=1e-7, atol=0)  # float32 cos/sin table
        dots.append(float((qr * kr).sum()))
    assert max(dots) - min(dots) < 1e-6 * max(abs(v) for v in dots)
    with pytest.raises(ValueError, match="dim=7 must be even"):
        RotaryEmbedding(7)
