"""Explicit state of the TTT inner loop, shared by the naive twin and the dual form.

Reproduces the carry of the scan in test-time-training/ttt-lm-jax `ttt/models/ttt_layer.py`
(`TTTBase.ttt`: the inner parameters at each mini-batch boundary), extended with the tokens of a
not yet completed mini-batch so a sequence can be processed in any split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INNER_KINDS = ("linear", "mlp")


@dataclass
class InnerState:
    """Inner-model state of one TTT layer for a batch of sequences.

    Attributes:
        params: the inner parameters at the last mini-batch boundary, each with leading `[B, H]`:
            linear `(W1 [B, H, d, d], b1 [B, H, 1, d])`,
            mlp `(W1 [B, H, d, 4d], b1 [B, H, 1, 4d], W2 [B, H, 4d, d], b2 [B, H, 1, d])`.
        k: `[B, H, r, d]` keys (after RoPE) of the r tokens of the current, incomplete mini-batch.
        v: `[B, H, r, d]` their values (the reconstruction target is `v - k`).
        gate: `[B, H, r]` their per-token learning-rate gates (see `ttt_gate`).

    Keeping the raw tokens of the partial mini-batch (rather than summed gradients) lets the next
    call recompute their gradients at the boundary parameters, which is what the dual form does,
    and lets `inner_steps > 1` re-run the completed mini-batch. r < mini_batch_size always.
    """

    params: tuple[Tensor, ...]
    k: Tensor
    v: Tensor
    gate: Tensor

    @property
    def num_buffered(self) -> int:
        return self.k.shape[2]

    @classmethod
    def initial(cls, params: tuple[Tensor, ...], batch_size: int) -> InnerState:
        """Start from per-head initial parameters `[H, ...]` (the learned ones), broadcast over B."""
        full = tuple(p.unsqueeze(0).expand(batch_size, *p.shape) for p in params)
        H, d = params[0].shape[0], params[0].shape[1]
        empty = params[0].new_zeros(batch_size, H, 0, d)
        return cls(full, empty, empty, params[0].new_zeros(batch_size, H, 0))

    def detach(self) -> InnerState:
        return InnerState(tuple(p.detach() for p in self.params), self.k.detach(), self.v.detach(),
                          self.gate.detach())

    def to(self, dtype: torch.dtype) -> InnerState:
        return InnerState(tuple(p.to(dtype) for p in self.params), self.k.to(dtype), self.v.to(dtype),
                          self.gate.to(dtype))


def check_op_inputs(name: str, kind: str, XQ: Tensor, XK: Tensor, XV: Tensor, gate: Tensor,
                    token_eta: Tensor, ln_weight: Tensor, ln_bias: Tensor, state: InnerState,
                    inner_steps: int) -> None:
    """Shared argument checks of the ops (clear errors before any arithmetic)."""
    if kind not in INNER_KINDS:
        raise ValueError(f"{name}: kind={kind!r} must be one of {INNER_KINDS}")
    if XQ.dim() != 4 or XK.shape != XQ.shape or XV.shape != XQ.shape:
        raise ValueError(f"{name}: XQ, XK, XV must all be [B, H, T, d]; got {tuple(XQ.shape)}, "
                         f"{tuple(XK.shape)}, {tuple(XV.shape)}")
    B, H, T, d = XQ.shape
    if not XQ.is_floating_point():
        raise TypeError(f"{name}: XQ must be a floating tensor, got {XQ.dtype}")
    if gate.shape != (B, H, T):
        raise ValueError(f"{name}: gate must be [B, H, T] = {(B, H, T)}, got {tuple(gate.shape)}")
    if token_eta.dim() != 1 or token_eta.numel() < 1:
        raise ValueError(f"{name}: token_eta must be [m] (one weight per mini-batch row), got "
                         f"{tuple(token_eta.shape)}")
    if ln_weight.shape != (H, d) or ln_bias.shape != (H, d):
        raise ValueError(f"{name}: ln_weight/ln_bias must be [H, d] = {(H, d)}, got "
                         f"{tuple(ln_weight.shape)} / {tuple(ln_bias.shape)}")
    n_params = 2 if kind == "linear" else 4
    if len(state.params) != n_params:
        raise ValueError(f"{name}: a {kind} inner model has {n_params} state params, got {len(state.params)}")
    if state.params[0].shape[:3] != (B, H, d):
        raise ValueError(f"{name}: state W1 must be [B, H, d, ...] = {(B, H, d)}..., got "
                         f"{tuple(state.params[0].shape)}")
    m = token_eta.numel()
    if state.k.shape[:2] != (B, H) or state.k.shape[2] >= m:
        raise ValueError(f"{name}: state.k must be [B, H, r, d] with r < mini_batch_size={m}, got "
                         f"{tuple(state.k.shape)}")
    if not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"{name}: inner_steps={inner_steps!r} must be an int >= 1 (1 = the official update)")
