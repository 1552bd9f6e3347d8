"""Chunked LaCT SwiGLU fast-weight operation: apply-then-update over chunks, stacks of r MLPs.

Reproduces `block_causal_lact_swiglu` (post-norm) and `prenorm_block_causal_lact_swiglu` (pre-norm)
of a1600012888/LaCT, `lact_llm/lact_model/ttt_operation.py`, and extends them to a stack of r SwiGLU
fast-weight MLPs (residual or not, end-to-end or greedy inner objectives). For r = 1 the arithmetic
is the reference's, op for op (same layouts, same order, same dtype casts), so outputs and
gradients agree with the reference to float32 round-off and Muon (bfloat16 Newton-Schulz) matches
bit for bit on the same CPU/torch.

Layout (one row per batch x fast-weight head, ``n = B * H``):
    fast weights of MLP i: ``w0 [n, d_h, d_in]``, ``w1 [n, d_out, d_h]``, ``w2 [n, d_h, d_in]``;
    ``MLP_i(x) = w1 (silu(w0 x) * (w2 x))`` per token.
    ``q, k [n, T, d_in]``, ``v [n, T, d_out]``, ``lr0, lr1, lr2, momentum [n, T, 1]``.

Semantics (see `lact_swiglu` for the stack): the sequence is cut into chunks of `chunk_size`; every
chunk but the last is first applied to its queries with the current fast weights, then used to
update them; the last chunk (the remainder, a full chunk when T is a multiple of `chunk_size`, the
whole sequence when ``T <= chunk_size``) is applied only. The update ascends
``sum_t lr_t <f(k_t), v_t>`` (lr0/lr1/lr2 weight the w0/w1/w2 gradients), optionally with momentum
(chunk-mean momentum times the previous step) and Muon, then renormalises every weight row to the
L2 norm that row had in the INITIAL weights (post-norm), or keeps unnormalised "main" weights and
uses their renormalised copy (pre-norm).

The per-chunk step lives in `lact.ops.step` and the chunk loop in `lact.ops.chunk_loop`; this module
runs them under plain autograd and with a carried state, and dispatches to the manual-backprop path
(`lact.ops.manual_backprop`, which runs the same loop and recomputes the same step in backward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lact.ops.chunk_loop import resolve_kernel, run_chunks
from lact.ops.manual_backprop import manual_lact_swiglu
from lact.ops.step import LaCTOptions, LevelState, chunk_bounds, init_state, row_norms

FastWeights = Sequence[Sequence[torch.Tensor]]

BACKPROP_MODES = ("autograd", "manual")


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_lact_inputs(
    fast_weights, q, k, v, lr0, lr1, lr2, chunk_size, momentum, use_muon, prenorm, residual, greedy
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], LaCTOptions]:
    """Validate a call of `lact_swiglu` / `naive_lact_swiglu`; return (levels, options).

    Raises:
        TypeError / ValueError naming the argument, its value, the rule and a fix.
    """
    _check_options(fast_weights, chunk_size, use_muon, prenorm, residual, greedy)
    n, T, d_in, d_out = _check_activations(q, k, v, lr0, lr1, lr2, momentum)
    levels = _check_levels(fast_weights, n, d_in, d_out, residual, greedy)
    opts = LaCTOptions(
        chunk_size=chunk_size,
        use_muon=use_muon,
        prenorm=prenorm,
        residual=residual,
        greedy=greedy,
        has_momentum=momentum is not None,
    )
    return levels, opts


def _check_options(fast_weights, chunk_size, use_muon, prenorm, residual, greedy) -> None:
    """The container of the fast weights, the chunk size and the boolean flags."""
    if isinstance(fast_weights, torch.Tensor) or not isinstance(fast_weights, (list, tuple)):
        raise TypeError(
            "fast_weights must be a list of r tuples (w0, w1, w2), got "
            f"{type(fast_weights).__name__}; for a single MLP pass [(w0, w1, w2)]"
        )
    if len(fast_weights) < 1:
        raise ValueError("fast_weights must hold at least one (w0, w1, w2) tuple (r >= 1), got an empty list")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    for name, flag in (("use_muon", use_muon), ("prenorm", prenorm), ("residual", residual), ("greedy", greedy)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if greedy and residual:
        raise ValueError(
            "greedy=True with residual=True is not supported: the greedy local objective of MLP_i "
            "targets v with MLP_i's own output, which a residual stack does not produce; "
            "turn one of them off"
        )


def _check_activations(q, k, v, lr0, lr1, lr2, momentum) -> tuple[int, int, int, int]:
    """q, k [n, T, d_in], v [n, T, d_out], lr0..2 and momentum [n, T, 1]; returns (n, T, d_in, d_out)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("lr0", lr0), ("lr1", lr1), ("lr2", lr2)):
        _check_tensor(name, t, 3)
    n, T, d_in = q.shape
    if T < 1:
        raise ValueError(f"q must hold at least one token, got shape {tuple(q.shape)}")
    if tuple(k.shape) != (n, T, d_in):
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != (n, T):
        raise ValueError(f"v must be [n, T, d_out] with n, T = {n}, {T} (from q), got {tuple(v.shape)}")
    d_out = v.shape[2]
    for name, t in (("lr0", lr0), ("lr1", lr1), ("lr2", lr2)):
        if tuple(t.shape) != (n, T, 1):
            raise ValueError(
                f"{name} must be [n, T, 1] = {(n, T, 1)} (one learning rate per token, lr_dim = 1), "
                f"got {tuple(t.shape)}"
            )
    if momentum is not None:
        _check_tensor("momentum", momentum, 3)
        if tuple(momentum.shape) != (n, T, 1):
            raise ValueError(f"momentum must be [n, T, 1] = {(n, T, 1)} or None, got {tuple(momentum.shape)}")
    return n, T, d_in, d_out


def _check_levels(fast_weights, n: int, d_in: int, d_out: int, residual: bool,
                  greedy: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each MLP's (w0 [n, d_h, x], w1 [n, y, d_h], w2 like w0), chained x -> y from d_in to d_out."""
    levels = []
    r = len(fast_weights)
    x_dim = d_in
    for i, level in enumerate(fast_weights):
        if not isinstance(level, (list, tuple)) or len(level) != 3:
            raise TypeError(f"fast_weights[{i}] must be a tuple (w0, w1, w2), got {type(level).__name__}")
        w0, w1, w2 = level
        for nm, w in (("w0", w0), ("w1", w1), ("w2", w2)):
            _check_tensor(f"fast_weights[{i}].{nm}", w, 3)
        if w0.shape[0] != n or w0.shape[2] != x_dim:
            where = "q's last dim" if i == 0 else f"the output dim of MLP {i - 1}"
            raise ValueError(
                f"fast_weights[{i}].w0 must be [n, d_h, d_in] with n={n} and d_in={x_dim} ({where}), "
                f"got {tuple(w0.shape)}"
            )
        if tuple(w2.shape) != tuple(w0.shape):
            raise ValueError(f"fast_weights[{i}].w2 must have w0's shape {tuple(w0.shape)}, got {tuple(w2.shape)}")
        if w1.shape[0] != n or w1.shape[2] != w0.shape[1]:
            raise ValueError(
                f"fast_weights[{i}].w1 must be [n, d_out, d_h] with n={n}, d_h={w0.shape[1]}, got {tuple(w1.shape)}"
            )
        out_dim = w1.shape[1]
        _check_level_width(i, r, x_dim, out_dim, d_out, tuple(w1.shape), residual, greedy)
        levels.append((w0, w1, w2))
        x_dim = out_dim
    return levels


def _check_level_width(i: int, r: int, x_dim: int, out_dim: int, d_out: int, w1_shape: tuple,
                       residual: bool, greedy: bool) -> None:
    """MLP i of r maps x_dim -> out_dim: the last must output v's d_out; stacks, residual and greedy
    need the widths that their chaining / targets require."""
    if i == r - 1 and out_dim != d_out:
        raise ValueError(f"the last MLP's w1 must output v's dim {d_out}, got w1 shape {w1_shape}")
    if i < r - 1 and out_dim != x_dim:
        raise ValueError(
            f"a stack of r={r} MLPs needs d_out == d_in for every MLP but the last; MLP {i} maps "
            f"{x_dim} -> {out_dim} (w1 {w1_shape}): use d_out == d_in or r = 1"
        )
    if residual and out_dim != x_dim:
        raise ValueError(
            f"residual=True needs every MLP to keep its width (h + MLP(h)); MLP {i} maps {x_dim} -> "
            f"{out_dim}: use d_out == d_in or residual=False"
        )
    if greedy and out_dim != d_out:
        raise ValueError(
            f"greedy=True makes each MLP regress v (dim {d_out}); MLP {i} outputs {out_dim}: "
            "use d_out == d_in or greedy=False"
        )


# --------------------------------------------------------------------------------------------
# the autograd path
# --------------------------------------------------------------------------------------------


def lact_swiglu_autograd(levels, q, k, v, lr0, lr1, lr2, momentum, opts: LaCTOptions) -> torch.Tensor:
    """The chunk loop under plain autograd (the outer gradient flows through every update)."""
    outs, _ = run_chunks(init_state(levels, opts), row_norms(levels), (q, k, v, lr0, lr1, lr2, momentum),
                         chunk_bounds(q.shape[1], opts.chunk_size), opts)
    return torch.cat(outs, dim=2).transpose(1, 2).to(v.dtype)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def lact_swiglu(
    fast_weights: FastWeights,
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
    backprop: str = "autograd",
    kernel: str = "torch",
) -> torch.Tensor:
    """Block-causal LaCT with a stack of r SwiGLU fast-weight MLPs (apply, then update, per chunk).

    The fast-weight function is ``f = MLP_r o ... o MLP_1`` (``h_{i+1} = h_i + MLP_i(h_i)`` when
    `residual`). Every chunk but the last is applied with the current weights, then each MLP's
    (w0, w1, w2) moves along its inner ascent direction ``dw`` (see `inner_gradients`), with
    momentum ``dw <- dw + mean_chunk(momentum) * dw_prev`` (kept as the next ``dw_prev``), Muon
    ``dw <- NS5(dw)``, then ``w <- renorm(w + dw)`` (post-norm) or ``main <- main + dw,
    w = renorm(main)`` (pre-norm), renorm rescaling every row to its norm in the INITIAL weights.

    Inner objectives:
        * end-to-end (``greedy=False``): every MLP ascends ``sum_t lr_t <f(k_t), v_t>``, the inner
          gradient flowing back through the whole stack;
        * greedy (``greedy=True``): MLP_i ascends ``sum_t lr_t <MLP_i(h_i,t), v_t>`` on its own
          input ``h_i = MLP_{i-1} o ... o MLP_1 (k_t)`` taken as a constant of the inner
          objective (no inner gradient flows between MLPs). The OUTER gradient still flows
          through h_i. Needs every MLP to output v's width; not combinable with `residual`.
        For r = 1 both are the reference objective.

    Args:
        fast_weights: r tuples ``(w0 [n, d_h, d_in], w1 [n, d_out, d_h], w2 [n, d_h, d_in])``,
            one row per batch x head (materialise low-rank weights before the call).
        q, k: ``[n, T, d_in]`` fast queries/keys. v: ``[n, T, d_out]`` fast values.
        lr0, lr1, lr2: ``[n, T, 1]`` per-token learning rates of w0, w1, w2 (shared by all MLPs).
        chunk_size: tokens per update chunk.
        momentum: ``[n, T, 1]`` per-token momentum or None (no momentum).
        use_muon: orthogonalise each update with bfloat16 Newton-Schulz (as the reference).
        prenorm: False = `block_causal_lact_swiglu`, True = `prenorm_block_causal_lact_swiglu`.
        residual: residual stack. greedy: greedy per-MLP objectives (see above).
        backprop: "autograd" (backpropagate through the unrolled loop) or "manual"
            (`LaCTSwiGLUFunction`: keeps the state at chunk boundaries, recomputes each chunk in
            backward; same outputs, much less memory).
        kernel: "torch", "triton" or "auto" (see `resolve_kernel`): which implementation runs each
            chunk step. "triton" runs the step's forward in the kernels of `lact.ops.triton_update`
            (the apply for every MLP; gradient + momentum + update for r = 1; Muon, pre-norm main
            weights and r > 1 updates stay in torch); gradients are the torch step's VJP (with
            "manual", the graph-free forward sweep runs the kernels and backward recomputes chunks
            with the torch step). Under autocast the torch step runs.

    Returns:
        ``[n, T, d_out]`` in v's dtype.
    """
    levels, opts = check_lact_inputs(
        fast_weights, q, k, v, lr0, lr1, lr2, chunk_size, momentum, use_muon, prenorm, residual, greedy
    )
    opts = dataclasses.replace(opts, kernel=resolve_kernel(kernel, q.device))
    if backprop == "autograd":
        return lact_swiglu_autograd(levels, q, k, v, lr0, lr1, lr2, momentum, opts)
    if backprop == "manual":
        return manual_lact_swiglu(levels, q, k, v, lr0, lr1, lr2, momentum, opts)
    raise ValueError(f"backprop must be one of {BACKPROP_MODES}, got {backprop!r}")


chunk_lact_swiglu = lact_swiglu


def block_causal_lact_swiglu(
    w0, w1, w2, q, k, v, lr0, lr1, lr2, chunk_size: int = 2048, use_muon: bool = False, momentum=None,
    backprop: str = "autograd", kernel: str = "torch",
) -> torch.Tensor:
    """Drop-in for the reference's post-norm op (single MLP); see `lact_swiglu` for shapes."""
    return lact_swiglu([(w0, w1, w2)], q, k, v, lr0, lr1, lr2, chunk_size, momentum=momentum,
                       use_muon=use_muon, prenorm=False, backprop=backprop, kernel=kernel)


def prenorm_block_causal_lact_swiglu(
    w0, w1, w2, q, k, v, lr0, lr1, lr2, chunk_size: int = 2048, use_muon: bool = False, momentum=None,
    backprop: str = "autograd", kernel: str = "torch",
) -> torch.Tensor:
    """Drop-in for the reference's pre-norm op (single MLP); see `lact_swiglu` for shapes."""
    return lact_swiglu([(w0, w1, w2)], q, k, v, lr0, lr1, lr2, chunk_size, momentum=momentum,
                       use_muon=use_muon, prenorm=True, backprop=backprop, kernel=kernel)


# --------------------------------------------------------------------------------------------
# carried state: decoding and processing a sequence in pieces
# --------------------------------------------------------------------------------------------


@dataclass
class LaCTCarry:
    """Everything `lact_swiglu_with_state` needs to continue a sequence where it stopped.

    Attributes:
        state: per MLP the `LevelState` at the last chunk boundary whose chunk was already used for an
            update (weights, momentum buffers, pre-norm main weights; see `init_state`).
        norms: row norms of the INITIAL weights (the renormalisation targets, `row_norms`).
        pending: the current, not yet used chunk: ``(k [n, p, d_in], v [n, p, d_out], lr0, lr1, lr2
            [n, p, 1], momentum [n, p, 1] or None)`` with 1 <= p <= chunk_size tokens, or None before
            the first token. A full pending chunk (p = chunk_size) is used for its update only when the
            next token arrives: in a full forward the last chunk is applied, never used.
        seen: tokens consumed so far.
    """

    state: list[LevelState]
    norms: list[list[torch.Tensor]]
    pending: tuple | None
    seen: int

    def map_tensors(self, fn) -> LaCTCarry:
        """A copy with `fn` applied to every tensor (e.g. selecting batch rows for beam search)."""
        pending = None if self.pending is None else tuple(None if t is None else fn(t) for t in self.pending)
        return LaCTCarry([[fn(t) for t in lvl] for lvl in self.state], [[fn(t) for t in lvl] for lvl in self.norms],
                         pending, self.seen)


def lact_swiglu_with_state(
    fast_weights: FastWeights | None,
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
    initial_state: LaCTCarry | None = None,
    kernel: str = "torch",
) -> tuple[torch.Tensor, LaCTCarry]:
    """`lact_swiglu` that starts from / returns a carried state, so a sequence can be fed in pieces.

    Feeding tokens 0..T-1 in any split (one at a time when decoding) gives the outputs of one
    `lact_swiglu` call on the whole sequence: the pending (last, not yet used) chunk's keys, values,
    learning rates and momenta are kept, and a chunk updates the weights once a token after it arrives
    (the prefill rule "every chunk but the last"), with the same `chunk_step` arithmetic. Only the
    queries differ in shape (one token instead of a chunk), so outputs agree to round-off.

    Args:
        fast_weights: the initial weights as for `lact_swiglu` (used only when `initial_state` is None;
            may be None otherwise).
        q, k, v, lr0, lr1, lr2, momentum: the NEW tokens, shapes as in `lact_swiglu` (T >= 1).
        chunk_size, use_muon, prenorm, residual, greedy: as in `lact_swiglu`; must not change
            between the pieces of one sequence.
        initial_state: the `LaCTCarry` returned by the previous piece, or None to start a sequence.
        kernel: as in `lact_swiglu` (may change between pieces).

    Returns:
        (o ``[n, T, d_out]`` in v's dtype, the `LaCTCarry` after these tokens). Gradients flow through
        the whole unrolled computation (plain autograd; no manual backprop).
    """
    if initial_state is None:
        levels, opts = check_lact_inputs(
            fast_weights, q, k, v, lr0, lr1, lr2, chunk_size, momentum, use_muon, prenorm, residual, greedy
        )
        carry = LaCTCarry(init_state(levels, opts), row_norms(levels), None, 0)
    else:
        carry = initial_state
        levels, opts = check_lact_inputs(
            [lvl[:3] for lvl in carry.state], q, k, v, lr0, lr1, lr2, chunk_size, momentum, use_muon, prenorm,
            residual, greedy,
        )
        if (carry.pending is not None and carry.pending[5] is not None) != opts.has_momentum:
            raise ValueError("momentum must be given for every piece of a sequence or for none")
    opts = dataclasses.replace(opts, kernel=resolve_kernel(kernel, q.device))
    p = 0
    if carry.pending is not None:
        pk, pv, plr0, plr1, plr2, pm = carry.pending
        p = pk.shape[1]
        k, v = torch.cat((pk, k), dim=1), torch.cat((pv, v), dim=1)
        lr0, lr1, lr2 = torch.cat((plr0, lr0), dim=1), torch.cat((plr1, lr1), dim=1), torch.cat((plr2, lr2), dim=1)
        if momentum is not None:
            momentum = torch.cat((pm, momentum), dim=1)
    # local frame: position 0 = first pending token, which sits on a chunk boundary of the sequence
    q = torch.cat((q.new_zeros(q.shape[0], p, q.shape[2]), q), dim=1) if p else q
    bounds = chunk_bounds(k.shape[1], opts.chunk_size)
    # queries of the new tokens only (none for a chunk that is entirely pending)
    outs, state = run_chunks(carry.state, carry.norms, (q, k, v, lr0, lr1, lr2, momentum), bounds, opts, q_skip=p)
    tail_start = bounds[-1][0]  # the last chunk is never used for an update
    pending = tuple(None if t is None else t[:, tail_start:] for t in (k, v, lr0, lr1, lr2, momentum))
    o = torch.cat(outs, dim=2).transpose(1, 2).to(v.dtype)
    return o, LaCTCarry(state, carry.norms, pending, carry.seen + q.shape[1] - p)
