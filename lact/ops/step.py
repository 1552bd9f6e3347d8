"""One chunk step of the LaCT fast-weight operation in torch: the shared pieces of every path.

Apply the current fast weights to a chunk's queries, then (for every chunk but the last) take the
inner ascent direction on the chunk's keys/values, add momentum, orthogonalise (Muon), add and
renormalise. Op for op the formulas of a1600012888/LaCT `lact_llm/lact_model/ttt_operation.py`,
extended to a stack of r SwiGLU MLPs (see `lact.ops.chunk.lact_swiglu` for the semantics).

Used by the chunk loop (`lact.ops.chunk_loop.run_chunks`), hence by the autograd path and the
carried-state path (`lact.ops.chunk`) and the manual-backprop path (`lact.ops.manual_backprop`,
which recomputes this very step in backward, so the recomputation is bit-identical). `chunk_step`
is also the twin of the Triton kernels of `lact.ops.triton_update` (their backward is its VJP).

Layout (one row per batch x fast-weight head, ``n = B * H``): fast weights of MLP i ``w0 [n, d_h,
d_in]``, ``w1 [n, d_out, d_h]``, ``w2 [n, d_h, d_in]``; a chunk's queries and values feature-major
``[n, d, l]``, keys and rates token-major ``[n, l, d]`` / ``[n, l, 1]`` (the reference's layouts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lact.ops.helpers import silu_backprop, zeropower_via_newtonschulz5

# State of one MLP of the stack: [w0, w1, w2] (+ momentum buffers [m0, m1, m2]) (+ pre-norm main
# weights [p0, p1, p2]), always in this order.
LevelState = list[torch.Tensor]

RENORM_EPS = 1e-5  # added to the new row norm, as in the reference


@dataclass(frozen=True)
class LaCTOptions:
    """Static options of one call (everything that is not a tensor)."""

    chunk_size: int
    use_muon: bool = False
    prenorm: bool = False
    residual: bool = False
    greedy: bool = False
    has_momentum: bool = False
    kernel: str = "torch"  # "torch" or "triton" (`chunk_loop.resolve_kernel`; never "auto" here)



def chunk_bounds(seq_len: int, chunk_size: int) -> list[tuple[int, int, bool]]:
    """(start, end, update) of each chunk: updates at starts 0, c, ... < T - c, then the applied tail."""
    bounds = [(s, s + chunk_size, True) for s in range(0, seq_len - chunk_size, chunk_size)]
    tail_start = bounds[-1][1] if bounds else 0
    bounds.append((tail_start, seq_len, False))
    return bounds


def init_state(levels, opts: LaCTOptions) -> list[LevelState]:
    """The state entering the first chunk: the weights, zero momentum, main weights = weights."""
    state = []
    for w0, w1, w2 in levels:
        s = [w0, w1, w2]
        if opts.has_momentum:
            s += [torch.zeros_like(w0), torch.zeros_like(w1), torch.zeros_like(w2)]
        if opts.prenorm:
            s += [w0, w1, w2]
        state.append(s)
    return state


def row_norms(levels) -> list[list[torch.Tensor]]:
    """Row norms (over the last axis) of the initial weights: the renormalisation targets."""
    return [[w.norm(dim=2, keepdim=True) for w in level] for level in levels]


def chunk_inputs(q, k, v, lr0, lr1, lr2, momentum, s: int, e: int):
    """Slice chunk [s, e) in the reference's layouts: q, v as [n, d, l]; k, lrs as [n, l, d]."""
    qi = q[:, s:e, :].transpose(1, 2)
    ki = k[:, s:e, :]
    vi = v[:, s:e, :].transpose(1, 2)
    mi = None if momentum is None else momentum[:, s:e, :].mean(dim=1, keepdim=True)
    return qi, ki, vi, lr0[:, s:e, :], lr1[:, s:e, :], lr2[:, s:e, :], mi


def apply_fast_weights(weights, x: torch.Tensor, residual: bool) -> torch.Tensor:
    """Run the stack on x ``[n, d_in, l]`` (feature-major); returns ``[n, d_out, l]``."""
    for w0, w1, w2 in weights:
        h = torch.bmm(w2, x)
        gate = F.silu(torch.bmm(w0, x))
        y = torch.bmm(w1, gate * h)
        x = x + y if residual else y
    return x


def inner_gradients(weights, ki, vi, lr0i, lr1i, lr2i, residual: bool, greedy: bool):
    """Hand-written ascent direction of the inner objective for every MLP of the stack.

    End-to-end: the upstream gradient of ``sum_t <f(k_t), v_t>`` at the stack's output is v; it is
    backpropagated MLP by MLP (through the residual adds when `residual`). Greedy: every MLP gets
    v itself as upstream gradient, i.e. it ascends ``sum_t <MLP_i(h_i,t), v_t>`` on its own input
    h_i (the keys through MLP_1..MLP_{i-1} with the current weights), and nothing is propagated
    between MLPs. In both, the per-token rates scale each token's outer product: lr0 for w0, lr1
    for w1, lr2 for w2. For r = 1 these are exactly the reference's formulas.

    Args:
        weights: r tuples (w0, w1, w2).
        ki: ``[n, l, d_in]`` keys; vi: ``[n, d_out, l]`` values; lr*: ``[n, l, 1]``.

    Returns:
        r tuples (dw0, dw1, dw2), shaped like the weights.
    """
    x_tok = ki  # [n, l, d] token-major input of the current MLP
    x = ki.transpose(1, 2)  # [n, d, l]
    cache = []
    for i, (w0, w1, w2) in enumerate(weights):
        gate_before_act = torch.bmm(w0, x)
        hidden_before_mul = torch.bmm(w2, x)
        hidden = F.silu(gate_before_act, inplace=False) * hidden_before_mul
        cache.append((x_tok, gate_before_act, hidden_before_mul, hidden))
        if i < len(weights) - 1:
            y = torch.bmm(w1, hidden)
            x = x + y if residual else y
            x_tok = x.transpose(1, 2)

    grads = [None] * len(weights)
    g = vi  # upstream gradient at the output of the current MLP, [n, d_out, l]
    for i in reversed(range(len(weights))):
        w0, w1, w2 = weights[i]
        x_tok, gate_before_act, hidden_before_mul, hidden = cache[i]
        if greedy:
            g = vi
        dhidden = torch.bmm(w1.transpose(1, 2), g)
        dhidden_before_mul = dhidden * F.silu(gate_before_act, inplace=False)
        dgate = dhidden * hidden_before_mul
        dgate_before_act = silu_backprop(dgate, gate_before_act)
        dw1 = torch.bmm(g, (hidden.transpose(1, 2) * lr1i).type_as(g))
        dw0 = torch.bmm(dgate_before_act, (x_tok * lr0i).type_as(dgate_before_act))
        dw2 = torch.bmm(dhidden_before_mul, (x_tok * lr2i).type_as(dhidden_before_mul))
        grads[i] = (dw0, dw1, dw2)
        if i > 0 and not greedy:
            gx = torch.bmm(w0.transpose(1, 2), dgate_before_act) + torch.bmm(w2.transpose(1, 2), dhidden_before_mul)
            g = g + gx if residual else gx
    return grads


def update_state(state: list[LevelState], grads, norms, mi, opts: LaCTOptions) -> list[LevelState]:
    """One fast-weight step for every MLP: momentum, Muon, add, renormalise rows to `norms`."""
    new_state = []
    for lvl, (dws, lvl_norms) in zip(state, zip(grads, norms)):
        dws = list(dws)
        new = []
        if opts.has_momentum:
            moms = lvl[3:6]
            dws = [dw + mom * mi for dw, mom in zip(dws, moms)]
            new_moms = dws
        if opts.use_muon:
            dws = [zeropower_via_newtonschulz5(dw) for dw in dws]
        if opts.prenorm:
            mains = lvl[-3:]
            new_mains = [p + dw for p, dw in zip(mains, dws)]
            new = [p / (p.norm(dim=2, keepdim=True) + RENORM_EPS) * nrm for p, nrm in zip(new_mains, lvl_norms)]
        else:
            ws = [w + dw for w, dw in zip(lvl[:3], dws)]
            new = [w / (w.norm(dim=2, keepdim=True) + RENORM_EPS) * nrm for w, nrm in zip(ws, lvl_norms)]
        if opts.has_momentum:
            new += new_moms
        if opts.prenorm:
            new += new_mains
        new_state.append(new)
    return new_state


def chunk_step(state, norms, qi, ki, vi, lr0i, lr1i, lr2i, mi, opts: LaCTOptions, update: bool,
               part: str = "all"):
    """Apply the current weights to the chunk's queries, then (if `update`) update them (torch).

    `part` = "apply" / "update" computes only the query application / only the update: the two are
    independent given the state (manual backprop differentiates them one after the other).

    Returns:
        (o_i ``[n, d_out, l]`` or None for part "update", new state or None when `update` is False
        or part is "apply").
    """
    weights = [lvl[:3] for lvl in state]
    oi = None if part == "update" else apply_fast_weights(weights, qi, opts.residual)
    if not update or part == "apply":
        return oi, None
    grads = inner_gradients(weights, ki, vi, lr0i, lr1i, lr2i, opts.residual, opts.greedy)
    return oi, update_state(state, grads, norms, mi, opts)
