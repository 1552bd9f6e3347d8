"""Building blocks both model families share: RMSNorm and rotary position embedding (RoPE).

Defined once here; `lact/modules.py` and `official_port/` import them. The two references order
their float operations differently, and each family keeps its reference's order, named by an
argument rather than written twice (`tests/ttt_common/test_modules.py` compares the variants):

- `RMSNorm(scale_in_input_dtype=False)`: fla (`fla.modules.RMSNorm`, used by LaCT) multiplies the
  weight in float32 and then casts; `scale_in_input_dtype=True` is the official ttt-lm-jax order
  (`ttt/models/model.py` `RMSNorm`: normalise in float32, cast back, then scale), used by
  `official_port`. The two agree bit for bit in float32 and float64; in bf16/fp16 they may differ
  by a rounding of the input dtype.
- RoPE: one angle table (`rope_cos_sin`: inverse frequencies and `position * freq` in float32),
  whose cos/sin fla evaluates in float32 (LaCT's default) and the official code in numpy, i.e.
  correctly rounded (`correctly_rounded=True`: evaluated in float64, then rounded; `official_port`);
  applied in one of the two channel layouts the checkpoints fix: `apply_rotary_half` (GPT-NeoX
  "rotate half", fla `RotaryEmbedding(interleaved=False)`, math in the input dtype, as fla) and
  `apply_rotary_interleaved` (pairs `(x[2i], x[2i+1])`, the official `apply_rotary_emb`, math in
  float32, as the official code). The layouts are the same rotation up to a permutation of channels.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis: y = x / sqrt(mean(x^2) + eps) * weight.

    Half-precision inputs are normalised in float32; float32 / float64 inputs stay as they are.

    Args:
        hidden_size: size D of the normalised (last) axis.
        elementwise_affine: learn a per-channel `weight` [D] (initialised to ones).
        eps: added to the mean square before the square root (fla's default 1e-5).
        scale_in_input_dtype: False (fla, LaCT): multiply by the weight in float32, then cast to the
            input dtype. True (official ttt-lm-jax, `official_port`): cast the normalised value to
            the input dtype first, then multiply by the weight in that dtype.
    """

    def __init__(self, hidden_size: int, elementwise_affine: bool = True, eps: float = 1e-5,
                 scale_in_input_dtype: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.scale_in_input_dtype = scale_in_input_dtype
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalise `x` (or `x + residual`).

        Args:
            x: [..., D].
            residual: optional [..., D] added to `x` before normalising (fla's fused form).
            prenorm: also return the (un-normalised) sum, the new residual stream.

        Returns:
            y [..., D] in x's dtype, or (y, x + residual) when `prenorm`.
        """
        if residual is not None:
            x = x + residual
        dtype = x.dtype
        xf = x.float() if x.element_size() < 4 else x
        y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
        if self.weight is None:
            y = y.to(dtype)
        elif self.scale_in_input_dtype:
            y = y.to(dtype) * self.weight.to(dtype)
        else:
            y = (y * self.weight.to(xf.dtype)).to(dtype)
        return (y, x) if prenorm else y


# ---------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """base ** (-arange(0, D, 2) / D) in float32, [D/2] (fla and the official precompute alike)."""
    if dim % 2 != 0:
        raise ValueError(f"rotary dim={dim} must be even (pairs of channels are rotated)")
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    return 1.0 / (base**exponent)


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float, dtype: torch.dtype = torch.float32,
                 correctly_rounded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotation angles, [*positions.shape, D/2] in `dtype`.

    The angle `position * inv_freq` is a float32 product (the official code forms it in float64 and
    rounds: the same number, since a product of two float32 values is exact in float64).

    Args:
        positions: integer positions, any shape (e.g. [T] or [B, T]).
        dim: head dimension D (even).
        base: RoPE theta.
        dtype: of the returned tables (float32, or float64 for float64 models).
        correctly_rounded: False: cos/sin in float32 (fla, whose float path LaCT's tests transcribe
            bit for bit); True: in float64, then cast to `dtype` (the official numpy table; `official_port`).
    """
    angles = positions.to(torch.float32)[..., None] * rope_inv_freq(dim, base, positions.device)
    if correctly_rounded:
        angles = angles.double()
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last axis (GPT-NeoX RoPE pairing: channel i with i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _broadcast_table(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B or 1, T, D/2] or [T, D/2] -> broadcastable against x [B, T, ..., D/2]."""
    if t.dim() == 2:
        t = t[None]
    return t.reshape(*t.shape[:2], *([1] * (x.dim() - 3)), t.shape[-1])


def apply_rotary_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX layout: rotate channel i with channel i + D/2, in x's dtype (fla's order).

    Args:
        x: [B, T, ..., D].
        cos, sin: [T, D/2] or [B, T, D/2] (any float dtype; cast to x's).

    Returns:
        x's shape and dtype.
    """
    cos = _broadcast_table(torch.cat((cos, cos), dim=-1), x).to(x.dtype)  # the two halves share each frequency
    sin = _broadcast_table(torch.cat((sin, sin), dim=-1), x).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             inplace: bool = False) -> torch.Tensor:
    """Official layout: rotate each pair `(x[2i], x[2i+1])` (ttt-lm-jax `apply_rotary_emb`).

    Args:
        x: [B, T, ..., D] (e.g. [B, T, H, D], or [B, T, 2, H, D] for queries and keys at once).
        cos, sin: [T, D/2] or [B, T, D/2].
        inplace: rotate x itself when it allows it (contiguous float32/float64, outside autograd),
            saving a tensor of x's size; same values.

    Returns:
        x's shape and dtype; the math is in float32 (float64 for float64 inputs), as the official code.
    """
    real = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(real).unflatten(-1, (-1, 2)).contiguous()  # view_as_complex needs unit-stride pairs
    c, s = _broadcast_table(cos, xf[..., 0]).to(real), _broadcast_table(sin, xf[..., 0]).to(real)
    # (x0 + i x1)(c + i s) = (x0 c - x1 s) + i (x0 s + x1 c): the pair rotation as one complex multiply,
    # bit-identical to the two real products (tests/ttt_common/test_modules.py) and ~13x faster on CPU
    # than strided real ops on the interleaved halves (33 -> 2.5 ms for a 125m layer's q and k, L 2048)
    if inplace and xf.data_ptr() == x.data_ptr() and not (torch.is_grad_enabled() and x.requires_grad):
        torch.view_as_complex(xf).mul_(torch.complex(c, s))
        return x
    rotated = torch.view_as_real(torch.view_as_complex(xf) * torch.complex(c, s))
    return rotated.flatten(-2).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of q and k, GPT-NeoX layout (fla `RotaryEmbedding`, interleaved=False).

    No buffer: the angle table is recomputed at every call (fla keeps a non-persistent `inv_freq`
    buffer, which would come back uninitialised from a meta-device build or `from_pretrained`; the
    cost is negligible). Nothing of it is in the state dict, as in fla.

    Args:
        dim: head dimension D (even).
        base: RoPE theta.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        rope_inv_freq(dim, base)  # refuses an odd dim now rather than at the first call
        self.dim = dim
        self.base = float(base)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, seqlen_offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k.

        Args:
            q, k: [B, T, H, D].
            seqlen_offset: position of the first token (0 without a cache).

        Returns:
            (q, k) rotated, same shapes and dtypes.
        """
        positions = torch.arange(seqlen_offset, seqlen_offset + q.shape[1], device=q.device)
        cos, sin = rope_cos_sin(positions, self.dim, self.base)
        return apply_rotary_half(q, cos, sin), apply_rotary_half(k, cos, sin)
