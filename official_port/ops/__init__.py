"""TTT inner-loop ops of the official TTT layers (test-time-training/ttt-lm-jax `ttt_layer.py`).

fla style: the fast mini-batch dual form (`dual_ttt*`) beside its readable per-token twin
(`naive_ttt*`), one signature, explicit `InnerState` in and out. Two fused scans, each tested
against the dual form, live in their own modules and are reached through the layers' `kernel`
option: `c_scan` (TTT-Linear and TTT-MLP inference and the gated output epilogue on CPU, C compiled on
first use) and `triton_dual` (GPU).
"""

from official_port.ops.dual import dual_ttt, dual_ttt_linear, dual_ttt_mlp, gelu_tanh_derivative
from official_port.ops.naive import naive_ttt, naive_ttt_linear, naive_ttt_mlp
from official_port.ops.state import INNER_KINDS, InnerState

__all__ = [
    "INNER_KINDS",
    "InnerState",
    "dual_ttt",
    "dual_ttt_linear",
    "dual_ttt_mlp",
    "gelu_tanh_derivative",
    "naive_ttt",
    "naive_ttt_linear",
    "naive_ttt_mlp",
]
