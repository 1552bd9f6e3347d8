"""Plain-PyTorch building blocks of the LaCT model: RMSNorm, rotary embedding, SwiGLU MLP.

Reproduces what the official LaCT model (a1600012888/LaCT, `lact_llm/lact_model/`) takes from
flash-linear-attention (`fla.modules.RMSNorm`, `fla.modules.RotaryEmbedding`,
`fla.modules.GatedMLP`). fla runs these as Triton kernels, which do not run on a CPU; the
modules here compute the same numbers with torch operations, under the same parameter names, so
state dicts are interchangeable:

- `RMSNorm`, `RotaryEmbedding`: defined once for both model families in `ttt_common.modules`
  (fla's float order is their default) and re-exported here. fla's RMSNorm default eps is 1e-5; the
  model passes `norm_eps` where the reference does; `forward(x, residual, prenorm=True)` is fla's
  fused "add residual then normalise" form. RoPE is the GPT-NeoX ("rotate half", not interleaved)
  layout; nothing of it is in the state dict, as in fla.
- `GatedMLP`: down(silu(gate(x)) * up(x)); with `intermediate_size=None` the width is
  int(hidden * hidden_ratio * 2 / 3) rounded up to a multiple of 256 (fla's rule). (The official
  TTT model's `SwiGLUMLP` computes the same function under the flax names w1/w2/w3.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ttt_common.modules import RMSNorm, RotaryEmbedding, rotate_half

__all__ = ["RMSNorm", "RotaryEmbedding", "rotate_half", "GatedMLP"]


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
