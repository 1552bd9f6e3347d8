"""Readable reference twin of `lact.ops.chunk.lact_swiglu`: the apply-then-update loop under autograd.

Reproduces the semantics of `block_causal_lact_swiglu` / `prenorm_block_causal_lact_swiglu` of
a1600012888/LaCT, `lact_llm/lact_model/ttt_operation.py`, extended to stacks of r SwiGLU MLPs,
written independently of the fast path: token-major layouts, the MLP written as ``x @ w.T``, and
the inner gradient obtained with ``torch.autograd.grad(create_graph=True)`` of the weighted inner
objective instead of the hand-written chain rule. Tests compare the two paths, so agreement checks
the hand-written inner gradient (including the stack's end-to-end and greedy variants).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lact.ops.chunk import check_lact_inputs
from lact.ops.helpers import zeropower_via_newtonschulz5


def _mlp(w, x: torch.Tensor) -> torch.Tensor:
    """One SwiGLU fast-weight MLP on token-major x ``[n, l, d_in]`` -> ``[n, l, d_out]``."""
    w0, w1, w2 = w
    return (F.silu(x @ w0.transpose(1, 2)) * (x @ w2.transpose(1, 2))) @ w1.transpose(1, 2)


def _stack(ws, x: torch.Tensor, residual: bool) -> torch.Tensor:
    for w in ws:
        x = x + _mlp(w, x) if residual else _mlp(w, x)
    return x


def _inner_ascent(ws, k, v, lrs, residual: bool, greedy: bool):
    """Gradient of the lr-weighted inner objective(s) for every weight, with a differentiable graph.

    Weighting token t's term by lr_t equals using ``lr_t * v_t`` as target, since v enters the
    objective linearly; w0, w1, w2 use lr0, lr1, lr2, hence three objectives.
    """
    with torch.enable_grad():
        # Weights that do not require grad (frozen / inference) still need a graph here.
        ws = [[w if w.requires_grad else w.detach().requires_grad_() for w in lvl] for lvl in ws]
        out = []
        if greedy:
            h = k
            for lvl in ws:
                y = _mlp(lvl, h)
                grads = [
                    torch.autograd.grad((y * (lr * v)).sum(), w, create_graph=True)[0]
                    for w, lr in zip(lvl, lrs)
                ]
                out.append(grads)
                h = y  # the next MLP's input: a constant of ITS objective, no inner grad to lvl
        else:
            f = _stack(ws, k, residual)
            per_kind = []
            for j, lr in enumerate(lrs):  # j = 0, 1, 2 -> w0, w1, w2 of every MLP
                targets = [lvl[j] for lvl in ws]
                per_kind.append(torch.autograd.grad((f * (lr * v)).sum(), targets, create_graph=True))
            out = [[per_kind[j][i] for j in range(3)] for i in range(len(ws))]
    return out


def naive_lact_swiglu(
    fast_weights,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr0: torch.Tensor,
    lr1: torch.Tensor,
    lr2: torch.Tensor,
    chunk_size: int,
    momentum: torch.Tensor | None = None,
    use_muon: bool = False,
    prenorm: bool = False,
    residual: bool = False,
    greedy: bool = False,
) -> torch.Tensor:
    """Apply-then-update LaCT over chunks with a stack of SwiGLU MLPs; same contract as `lact_swiglu`.

    Args / Returns: as `lact.ops.chunk.lact_swiglu` (without `backprop`): fast_weights r tuples
    ``(w0 [n, d_h, d_in], w1 [n, d_out, d_h], w2 [n, d_h, d_in])``, ``q, k [n, T, d_in]``,
    ``v [n, T, d_out]``, ``lr0, lr1, lr2, momentum [n, T, 1]``; returns ``[n, T, d_out]``.
    """
    levels, _ = check_lact_inputs(
        fast_weights, q, k, v, lr0, lr1, lr2, chunk_size, momentum, use_muon, prenorm, residual, greedy
    )
    grad_mode = torch.is_grad_enabled()
    ws = [list(lvl) for lvl in levels]
    target_norms = [[w.norm(dim=2, keepdim=True) for w in lvl] for lvl in ws]
    mains = [list(lvl) for lvl in ws]  # pre-norm: unnormalised accumulators
    prev = [[torch.zeros_like(w) for w in lvl] for lvl in ws]  # momentum buffers
    T = q.shape[1]
    outs = []
    start = 0
    # Every chunk that leaves at least one token after it is applied, then learned from.
    while start + chunk_size < T:
        end = start + chunk_size
        outs.append(_stack(ws, q[:, start:end], residual))
        lrs = (lr0[:, start:end], lr1[:, start:end], lr2[:, start:end])
        steps = _inner_ascent(ws, k[:, start:end], v[:, start:end], lrs, residual, greedy)
        for i in range(len(ws)):
            for j in range(3):
                step = steps[i][j]
                if momentum is not None:
                    step = step + momentum[:, start:end].mean(dim=1, keepdim=True) * prev[i][j]
                    prev[i][j] = step
                if use_muon:
                    step = zeropower_via_newtonschulz5(step)
                if prenorm:
                    mains[i][j] = mains[i][j] + step
                    new = mains[i][j]
                else:
                    new = ws[i][j] + step
                ws[i][j] = new / (new.norm(dim=2, keepdim=True) + 1e-5) * target_norms[i][j]
        start = end
    outs.append(_stack(ws, q[:, start:], residual))  # the tail: applied, never learned from
    o = torch.cat(outs, dim=1).to(v.dtype)
    return o if grad_mode else o.detach()
