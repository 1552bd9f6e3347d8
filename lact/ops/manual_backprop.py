"""Memory-efficient backward for the LaCT chunk operation: recompute each chunk in reverse.

Backpropagating the outer loss through the unrolled fast-weight updates with autograd keeps every
chunk's activations (keys, queries, the hand-written inner gradient, Newton-Schulz iterates) alive
until backward: memory grows with sequence length x stack depth. `LaCTSwiGLUFunction` instead runs
the chunk loop without a graph, keeps only the fast-weight state at each chunk boundary (weights,
momentum buffers, pre-norm main weights: a few ``[n, d_h, d]`` matrices per chunk and MLP), and in
backward walks the chunks in reverse: it rebuilds one chunk's step (`lact.ops.step.chunk_step`,
the very function the forward ran, so the recomputation is bit-identical) from its saved state and
takes its vector-Jacobian product, carrying the adjoint of the state to the previous chunk. Every
configuration of `lact.ops.chunk.lact_swiglu` is supported (any r, residual, greedy, momentum,
Muon, pre/post-norm) because the per-chunk VJP is taken by autograd on that shared step.

The forward keeps the graph of the last chunks (`KEEP_LAST`; by default the last update chunk and
the applied-only tail, built from detached leaves inside `forward`), so backward starts with them
without recomputation.
A recomputed update chunk is differentiated in two parts (query application, then the update),
which are independent given the state. Peak memory is then about one chunk's update graph plus
the boundary states, instead of every chunk's graph; the price is one extra graph-free forward of
every update chunk.

With ``kernel="triton"`` (`lact.ops.triton_update`) the graph-free forward sweep runs the Triton
chunk step; the rebuilt chunks of backward (and the kept segment) always run the torch step, whose
autograd gives the VJP: the saved boundary states then come from the kernels and agree with the
torch step's to float round-off (tested), not bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch

from lact.ops.chunk_loop import run_chunks
from lact.ops.step import LaCTOptions, chunk_bounds, init_state, row_norms


def _flat(state) -> list[torch.Tensor]:
    return [t for lvl in state for t in lvl]


def _unflat(flat: list[torch.Tensor], r: int) -> list[list[torch.Tensor]]:
    per = len(flat) // r
    return [list(flat[i * per : (i + 1) * per]) for i in range(r)]


SEQ_NAMES = ("q", "k", "v", "lr0", "lr1", "lr2", "momentum")


def _run_segment(state_flat, w_flat, seqs, bounds, opts: LaCTOptions, needs, r: int, part: str = "all") -> dict:
    """Rebuild consecutive chunks `bounds` under autograd from detached leaves.

    Leaves: the state entering the first chunk, the initial weights (only for the row-norm targets;
    they require grad when the weights need one) and the sequence slices of the segment. Returns a
    dict with the per-chunk outputs, the state after the segment (None if its last chunk is the
    applied-only tail) and the leaves. `part` = "apply" / "update" rebuilds only the query
    application / only the fast-weight update of a single chunk (the two are independent given the
    state, so backward can hold one of the two graphs at a time).
    """
    s0, e1 = bounds[0][0], bounds[-1][1]
    # Rebuilt chunks are differentiated by autograd: always the torch step (the Triton kernels are
    # forward-only; their numbers equal the torch step's to round-off).
    opts = dataclasses.replace(opts, kernel="torch")
    with torch.enable_grad():
        st = [t.detach().requires_grad_() for t in state_flat]
        wl = [w.detach().requires_grad_(needs["weights"]) for w in w_flat]
        norms = row_norms(_unflat(wl, r))
        sl = {name: None if t is None else t[:, s0:e1, :].detach().requires_grad_(needs[name])
              for name, t in seqs.items()}
        outs, state = run_chunks(_unflat(st, r), norms, [sl[name] for name in SEQ_NAMES], bounds, opts,
                                 offset=s0, part=part)
    final = _flat(state) if bounds[-1][2] and part != "apply" else None
    return {"bounds": bounds, "outs": outs, "final": final, "st": st, "wl": wl, "sl": sl}


def _segment_vjp(seg: dict, grad_o, g_state, needs) -> tuple[list, list | None, dict]:
    """VJP of one rebuilt segment. Returns (adjoint of its entry state, weight grads, slice grads)."""
    s0 = seg["bounds"][0][0]
    outputs = list(seg["outs"])
    grad_outputs = [grad_o[:, s:e, :].transpose(1, 2).to(o.dtype) for (s, e, _), o in zip(seg["bounds"], outputs)]
    if seg["final"] is not None and g_state is not None:
        outputs += seg["final"]
        grad_outputs += g_state
    names = [name for name in SEQ_NAMES if needs[name]]
    inputs = list(seg["st"]) + (list(seg["wl"]) if needs["weights"] else []) + [seg["sl"][n] for n in names]
    got = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    n_st, n_w = len(seg["st"]), len(seg["wl"]) if needs["weights"] else 0
    # Small state/weight adjoints are materialised; an unused sequence slice (k, v, lrs of an
    # applied-only part) stays None instead of costing a full zero tensor.
    got = [torch.zeros_like(x) if gx is None and i < n_st + n_w else gx for i, (x, gx) in enumerate(zip(inputs, got))]
    g_w = got[n_st : n_st + n_w] if needs["weights"] else None
    g_seq = {name: (s0, g) for name, g in zip(names, got[n_st + n_w :]) if g is not None}
    return got[:n_st], g_w, g_seq


def _split_index(n_chunks: int, keep_last: int) -> int:
    """Chunks from this index on are run with a graph in forward and kept for backward (the last
    `keep_last` chunks: 1 = the applied-only tail, 2 = also the last update chunk). Backward starts
    with them, so they need no recomputation."""
    return max(0, n_chunks - keep_last)


def lact_swiglu_fwd(levels, q, k, v, lr0, lr1, lr2, momentum, opts: LaCTOptions, needs=None,
                    keep_last: int = 0):
    """Forward; chunks before the split run without a graph.

    Returns:
        (output ``[n, T, d_out]``, flat states entering each chunk up to the split (inclusive),
        the kept segment (or None)).
    """
    if needs is None:
        needs = dict.fromkeys(("weights", *SEQ_NAMES), True)
        needs["momentum"] = momentum is not None
    bounds = chunk_bounds(q.shape[1], opts.chunk_size)
    split = _split_index(len(bounds), keep_last)
    entry = []
    outs, state = run_chunks(init_state(levels, opts), row_norms(levels), (q, k, v, lr0, lr1, lr2, momentum),
                             bounds[:split], opts, entry_states=entry)
    states = [_flat(s) for s in entry]
    kept = None
    if split < len(bounds):
        states.append(_flat(state))
        seqs = dict(zip(SEQ_NAMES, (q, k, v, lr0, lr1, lr2, momentum)))
        w_flat = [w for lvl in levels for w in lvl]
        kept = _run_segment(states[-1], w_flat, seqs, bounds[split:], opts, needs, len(levels))
        outs += [o.detach() for o in kept["outs"]]
    return torch.cat(outs, dim=2).transpose(1, 2).to(v.dtype), states, kept


def _recomputed_vjps(state, w_flat, seqs, seg_bounds, grad_o, g_state, opts: LaCTOptions, needs, r: int):
    """Rebuild the segment `seg_bounds` from its entry state and differentiate it: the
    `_segment_vjp` results, one per rebuilt part."""
    if len(seg_bounds) == 1 and seg_bounds[0][2]:
        # Recompute an update chunk: the same pieces of chunk_step from the same saved state give
        # the same numbers. Its query application and its update are independent given the
        # state: rebuild and differentiate them one after the other to halve the peak.
        results = []
        for part, g_in in (("update", g_state), ("apply", None)):
            seg = _run_segment(state, w_flat, seqs, seg_bounds, opts, needs, r, part)
            results.append(_segment_vjp(seg, grad_o, g_in, needs))
            del seg
        return results
    seg = _run_segment(state, w_flat, seqs, seg_bounds, opts, needs, r)
    return [_segment_vjp(seg, grad_o, g_state, needs)]


def _accumulate_vjps(results, g_w, grads: dict, seqs: dict, T: int, needs):
    """Add one segment's `_segment_vjp` results into the weight gradients `g_w` and the sequence
    gradients `grads` (in place); return the adjoint of the state entering the segment."""
    g_state, part_sum = None, {}
    for g_st, g_w_seg, g_seq in results:
        g_state = g_st if g_state is None else [a + b for a, b in zip(g_state, g_st)]
        if needs["weights"]:
            for i, g in enumerate(g_w_seg):
                g_w[i] += g
        for name, (s0, g) in g_seq.items():
            if part_sum.get(name) is None:
                part_sum[name] = (s0, g)
            else:  # defensive: a name reached by both parts of a chunk
                part_sum[name] = (s0, part_sum[name][1] + g)
    for name, (s0, g) in part_sum.items():
        if s0 == 0 and g.shape[1] == T:
            grads[name] = g
            continue
        if grads[name] is None:
            grads[name] = torch.zeros_like(seqs[name])
        grads[name][:, s0 : s0 + g.shape[1], :] = g
    return g_state


def _add_initial_state_adjoint(g_state, g_w, r: int, opts: LaCTOptions):
    """The first chunk's state is built from the initial weights: w itself, zero momentum and
    (pre-norm) main weights = w; route its adjoint `g_state` back into `g_w` (in place, returned)."""
    per = len(g_state) // r
    for lvl in range(r):
        for wi in range(3):
            g = g_state[lvl * per + wi]
            if opts.prenorm:
                g = g + g_state[lvl * per + per - 3 + wi]
            g_w[lvl * 3 + wi] += g
    return g_w


def lact_swiglu_bwd(grad_o, levels, q, k, v, lr0, lr1, lr2, momentum, states, opts: LaCTOptions, needs,
                    kept=None, keep_last: int = 0):
    """Reverse sweep over chunks, carrying the adjoint of the fast-weight state.

    Args:
        grad_o: ``[n, T, d_out]`` gradient of the output.
        states: the flat states entering each chunk, from `lact_swiglu_fwd`.
        needs: dict with booleans "weights", "q", "k", "v", "lr0", "lr1", "lr2", "momentum".
        kept: a one-element list holding the segment whose graph the forward kept (popped, so the
            graph is freed as soon as it has been walked), or None to rebuild it.

    Returns:
        (list of r [g_w0, g_w1, g_w2] or None, g_q, g_k, g_v, g_lr0, g_lr1, g_lr2, g_momentum),
        None where not needed.
    """
    r = len(levels)
    seqs = dict(zip(SEQ_NAMES, (q, k, v, lr0, lr1, lr2, momentum)))
    # Segments partition [0, T): every position's gradient is written at most once (buffers are
    # made on first write, zero where no segment reaches; a segment covering the whole sequence
    # hands its gradient over as is; a name no segment reaches gets None, i.e. zero).
    grads = dict.fromkeys(seqs)
    T = q.shape[1]
    w_flat = [w for lvl in levels for w in lvl]
    g_w = [torch.zeros_like(w) for w in w_flat] if needs["weights"] else None
    bounds = chunk_bounds(q.shape[1], opts.chunk_size)
    split = _split_index(len(bounds), keep_last)
    segments = [(j, [bounds[j]]) for j in range(split)]
    if split < len(bounds):
        segments.append((split, bounds[split:]))
    kept = kept.pop() if kept else None
    g_state = None
    for j, seg_bounds in reversed(segments):
        if kept is not None and j == split:
            seg, kept = kept, None
            results = [_segment_vjp(seg, grad_o, g_state, needs)]
            del seg
        else:
            results = _recomputed_vjps(states[j], w_flat, seqs, seg_bounds, grad_o, g_state, opts, needs, r)
        g_state = _accumulate_vjps(results, g_w, grads, seqs, T, needs)

    g_levels = _unflat(_add_initial_state_adjoint(g_state, g_w, r, opts), r) if needs["weights"] else None
    return (g_levels, grads["q"], grads["k"], grads["v"], grads["lr0"], grads["lr1"], grads["lr2"],
            grads["momentum"])


class LaCTSwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: forward = `lact_swiglu_fwd`, backward = `lact_swiglu_bwd`.

    ``apply(opts, r, keep_last, *tensors)`` with tensors = the r x (w0, w1, w2) flattened,
    then q, k, v, lr0, lr1, lr2 and (if ``opts.has_momentum``) momentum. Not twice differentiable.
    The forward keeps the graph of the last `keep_last` chunks (used once by the first backward; a
    repeated backward, e.g. in gradcheck, rebuilds it).
    """

    @staticmethod
    def forward(ctx, opts: LaCTOptions, r: int, keep_last: int, *tensors):
        levels, seqs = _split_tensors(tensors, r, opts)
        needs = _needs(ctx.needs_input_grad[3:], r, opts)
        o, states, kept = lact_swiglu_fwd(levels, *seqs, opts, needs, keep_last)
        ctx.save_for_backward(*tensors)
        # Boundary states and the kept segment are intermediates, not inputs/outputs: kept on ctx
        # (freed with the graph).
        ctx.states, ctx.kept = states, kept
        ctx.opts, ctx.r, ctx.keep_last, ctx.needs = opts, r, keep_last, needs
        # backward runs outside the caller's autocast region: remember it, so the recomputed
        # chunks use the same dtypes as the forward (fp32 states + half activations)
        dev = tensors[3 * r].device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_o):
        opts, r, needs = ctx.opts, ctx.r, ctx.needs
        levels, seqs = _split_tensors(ctx.saved_tensors, r, opts)
        # A graph can be walked once (later calls rebuild it); hand it over in a holder the callee
        # empties, so no frame keeps it alive after use.
        holder = [ctx.kept] if ctx.kept is not None else None
        ctx.kept = None
        dev, enabled, dtype = ctx.autocast
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            g_levels, *g_seqs = lact_swiglu_bwd(grad_o, levels, *seqs, ctx.states, opts, needs, holder,
                                                ctx.keep_last)
        ni = ctx.needs_input_grad[3:]
        g_w = [None] * (3 * r) if g_levels is None else [g for lvl in g_levels for g in lvl]
        g_w = [g if ni[i] else None for i, g in enumerate(g_w)]
        out = [None, None, None, *g_w, *g_seqs[:6]]
        if opts.has_momentum:
            out.append(g_seqs[6])
        return tuple(out)


def _split_tensors(tensors, r: int, opts: LaCTOptions):
    w_flat = tensors[: 3 * r]
    levels = [tuple(w_flat[3 * i : 3 * i + 3]) for i in range(r)]
    momentum = tensors[3 * r + 6] if opts.has_momentum else None
    return levels, (*tensors[3 * r : 3 * r + 6], momentum)


def _needs(ni, r: int, opts: LaCTOptions) -> dict:
    needs = {"weights": any(ni[: 3 * r])}
    for i, name in enumerate(SEQ_NAMES[:6]):
        needs[name] = bool(ni[3 * r + i])
    needs["momentum"] = bool(opts.has_momentum and ni[3 * r + 6])
    return needs


def manual_backprop_helps(seq_len: int, chunk_size: int) -> bool:
    """Whether `backprop="manual"` saves memory for this length: at least two update chunks
    (with one, autograd's graph is about as small). For a layer's `ttt_backprop="auto"` choice."""
    return len(chunk_bounds(seq_len, chunk_size)) >= 3


# Chunks whose forward graph is kept for backward: 2 = the last update chunk and the tail, which
# backward walks first, before any recomputation. Measured (760M-like shapes, T = 8K, r = 2, CPU):
# peak 0.46x of autograd at 0.97x its time, vs 0.47x / 1.11x when only the tail is kept (1).
KEEP_LAST = 2


def manual_lact_swiglu(levels, q, k, v, lr0, lr1, lr2, momentum, opts: LaCTOptions,
                       keep_last: int | None = None) -> torch.Tensor:
    """Validated entry used by `lact.ops.chunk.lact_swiglu(..., backprop="manual")` (levels and
    options from `lact.ops.chunk.check_lact_inputs`)."""
    tensors = [w for lvl in levels for w in lvl] + [q, k, v, lr0, lr1, lr2]
    if momentum is not None:
        tensors.append(momentum)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        # Nothing to differentiate (inference): the plain graph-free loop, no states kept.
        return lact_swiglu_fwd(levels, q, k, v, lr0, lr1, lr2, momentum, opts)[0]
    keep = KEEP_LAST if keep_last is None else keep_last
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep_last must be an int >= 0 (chunks whose graph is kept), got {keep!r}")
    return LaCTSwiGLUFunction.apply(opts, len(levels), keep, *tensors)
