"""Plain-PyTorch building blocks of the LaCT model: RMSNorm, rotary embedding, SwiGLU MLP.

Reproduces what the official LaCT model (a1600012888/LaCT, `lact_llm/lact_model/`) takes from
flash-linear-attention (`fla.modules.RMSNorm`, `fla.modules.RotaryEmbedding`,
`fla.modules.GatedMLP`). fla runs these as Triton kernels, which do not run on a CPU; the
functions here compute the same numbers with torch operations, under the same parameter names, so
state dicts are interchangeable:

- `RMSNorm`: y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 for half-precision inputs and cast
  back (fla upcasts inside its kernel). fla's default eps is 1e-5; the model passes `norm_eps` where the reference does.
  `forward(x, residual, prenorm=True)` is fla's fused "add residual then normalise" form.
- `RotaryEmbedding`: GPT-NeoX ("rotate half", not interleaved) RoPE; inv_freq =
  base ** (-arange(0, D, 2) / D) in float32, positions in float32, cos/sin cast to the input dtype.
  Nothing of it is in the state dict, as in fla (whose `inv_freq` buffer is non-persistent).
- `GatedMLP`: down(silu(gate(x)) * up(x)); with `intermediate_size=None` the width is
  int(hidden * hidden_ratio * 2 / 3) rounded up to a multiple of 256 (fla's rule).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis (fla `RMSNorm` numerics, plain torch).

    Args:
        hidden_size: size D of the normalised (last) axis.
        elementwise_affine: learn a per-channel `weight` [D] (initialised to ones).
        eps: added to the mean square before the square root.
    """

    def __init__(self, hidden_size: int, elementwise_affine: bool = True, eps: float = 1e-5):
        super().__init__()
        self.hidden_size = hidden_size
        self.elementwise_affine = elementwise_affine
        self.eps = eps
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
        # half-precision inputs are normalised in float32; float32/float64 stay as they are
        xf = x.float() if x.element_size() < 4 else x
        y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(xf.dtype)
        y = y.to(dtype)
        return (y, x) if prenorm else y


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last axis (GPT-NeoX RoPE pairing: channel i with i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, GPT-NeoX layout (fla `RotaryEmbedding` with interleaved=False).

    Args:
        dim: head dimension D (even).
        base: RoPE theta.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding dim={dim} must be even (pairs of channels are rotated)")
        self.dim = dim
        self.base = float(base)

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """base ** (-arange(0, D, 2) / D) in float32 [D/2].

        Recomputed at every call instead of held in a buffer (fla keeps a non-persistent one): a
        buffer would come back uninitialised when the model is built on the meta device or loaded
        by `from_pretrained`, and the cost is negligible.
        """
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        return 1.0 / (self.base**exponent)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables [len(positions), D/2] for integer positions (float32 math, then `dtype`)."""
        freqs = torch.outer(positions.to(torch.float32), self.inv_freq(positions.device))
        return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)

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
        T = q.shape[1]
        positions = torch.arange(seqlen_offset, seqlen_offset + T, device=q.device)
        cos, sin = self.cos_sin(positions, q.dtype)
        # [T, D/2] -> [1, T, 1, D]: the two halves share each frequency
        cos = torch.cat((cos, cos), dim=-1)[None, :, None, :]
        sin = torch.cat((sin, sin), dim=-1)[None, :, None, :]
        q = q * cos + rotate_half(q) * sin
        k = k * cos.to(k.dtype) + rotate_half(k) * sin.to(k.dtype)
        return q, k


class GatedMLP(nn.Module):
    """SwiGLU feed-forward block: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases.

    Args:
        hidden_size: model width.
        hidden_ratio: width multiplier used when `intermediate_size` is None (default 4).
        intermediate_size: explicit inner width; None -> fla's rounded 2/3 * ratio * hidden rule.
        hidden_act: only "swish" (SiLU) is supported.
    """

    def __init__(
        self,
        hidden_size: int,
        hidden_ratio: int | None = None,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
    ):
        super().__init__()
        if hidden_act != "swish":
            raise ValueError(f"GatedMLP hidden_act={hidden_act!r} is not supported; use 'swish'")
        if hidden_ratio is None:
            hidden_ratio = 4
        if intermediate_size is None:
            intermediate_size = int(hidden_size * hidden_ratio * 2 / 3)
            intermediate_size = 256 * ((intermediate_size + 255) // 256)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> [..., hidden]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
