"""LaCT chunk operations: the fast path (`lact_swiglu`, autograd or manual backprop) and its twin."""

from lact.ops.chunk import (
    LaCTCarry,
    LaCTOptions,
    block_causal_lact_swiglu,
    chunk_lact_swiglu,
    lact_swiglu,
    lact_swiglu_with_state,
    prenorm_block_causal_lact_swiglu,
)
from lact.ops.helpers import l2_norm, silu_backprop, zeropower_via_newtonschulz5
from lact.ops.manual_backprop import LaCTSwiGLUFunction, manual_backprop_helps
from lact.ops.naive import naive_lact_swiglu

__all__ = [
    "LaCTCarry",
    "LaCTOptions",
    "LaCTSwiGLUFunction",
    "block_causal_lact_swiglu",
    "chunk_lact_swiglu",
    "l2_norm",
    "lact_swiglu",
    "lact_swiglu_with_state",
    "manual_backprop_helps",
    "naive_lact_swiglu",
    "prenorm_block_causal_lact_swiglu",
    "silu_backprop",
    "zeropower_via_newtonschulz5",
]
