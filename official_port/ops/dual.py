"""Fast mini-batch dual form of the TTT inner loop (TTT-Linear and TTT-MLP).

Reproduces `TTTLinearBase.process_mini_batch` / `TTTMLPBase.process_mini_batch` and the scan of
`TTTBase.ttt` in test-time-training/ttt-lm-jax `ttt/models/ttt_layer.py`, value for value, and
extends it to any length and to an explicit state (see `official_port.ops.state.InnerState`).

Layout: `dual_ttt_linear` and `dual_ttt_mlp` are the two ops (`dual_ttt(kind, ...)` picks one).
Each writes only what its inner model differs in (the per-mini-batch forward, gradients and
update); `_prepare` (state-independent tensors), `_scan` (the loop over mini-batches) and
`_finish` (output LayerNorm, new state, stats) are shared.

Speed-relevant choices (all exact, none changes values beyond float rounding):
  * batch and heads are folded into one bmm batch, and the scan runs over mini-batches only;
  * each inner bias is folded into its weight as an extra row (`[W; b]`, see `_fold`), with a
    column of ones appended to the inputs; then `Q K^T + 1` (the dual form's attention plus its
    bias term) is a single product `[Q, 1][K, 1]^T` and every update is one `baddbmm`;
  * everything that does not depend on the inner state (eta matrices, `E * tril(Q K^T + 1)`,
    targets) is computed for all mini-batches before the scan;
  * the output LayerNorm of all mini-batches runs once after the scan;
  * few large temporaries (on CPU each costs a pass over memory, plus page faults when fresh):
    keys and queries are copied once, from the caller's layout into the scan's buffer; the output
    is written in the layout the layer merges heads from; without autograd, ops write in place.

A call may start inside a mini-batch (the state's buffered tokens are prepended with zero queries)
and may end inside one (zero-padded with zero gates; its rows are causal because eta is
lower-triangular, and its update is not applied: those tokens go back to the state).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from official_port.ops.state import InnerState, check_op_inputs

LN_EPS = 1e-6

Params = tuple[Tensor, ...]  # folded inner params, each [BH, in+1, out]


def gelu_tanh_derivative(x: Tensor) -> Tensor:
    """d/dx of the tanh-approximate GELU with the official hand-rounded constants (`diff_gelu`).

    The reference formula; the scan uses the fused `_gelu_grad` (same values to 3e-10)."""
    tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    return 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)


_INPUT_GRAD_ONLY = [True, False, False]  # native_layer_norm_backward's output mask: d input only


def _ln_fwd_vjp(z: Tensor, neg_target: Tensor, gamma: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head LayerNorm at z, residual R = LN(z) - target and G = J_LN(z)^T R (given -target:
    `a + (K - V)` is bit for bit `a - (V - K)`).

    Uses ATen's fused LayerNorm forward/backward kernels (gamma is per head, so it is applied
    outside them). `native_layer_norm_backward` is itself differentiable, so the outer backward
    gets the second-order terms of the official code (checked against the autograd twin).
    """
    xhat, mean, rstd = torch.native_layer_norm(z, z.shape[-1:], None, None, LN_EPS)
    resid = torch.addcmul(beta, xhat, gamma) + neg_target
    grad = torch.ops.aten.native_layer_norm_backward(resid * gamma, z, z.shape[-1:], mean, rstd, None, None,
                                                     _INPUT_GRAD_ONLY)[0]
    return grad, resid


def _gelu_grad(grad_out: Tensor, x: Tensor) -> Tensor:
    """`grad_out * gelu'(x)` for the tanh GELU in one fused (twice differentiable) kernel. It uses
    the exact constants; the official `diff_gelu` rounds them (<= 3.1e-10 apart on N(0, 1) inputs,
    see the tests), far below float32 resolution."""
    return torch.ops.aten.gelu_backward(grad_out, x, approximate="tanh")


def _ln(z: Tensor, gamma: Tensor, beta: Tensor, in_place: bool = False) -> Tensor:
    """Per-head LayerNorm; `in_place` writes the affine over the normalised tensor (no autograd)."""
    y = F.layer_norm(z, z.shape[-1:], eps=LN_EPS)
    return torch.addcmul(beta, y, gamma, out=y) if in_place else torch.addcmul(beta, y, gamma)


def _finite_rows(G: Tensor) -> tuple[Tensor, Tensor]:
    """`[BH, m, c]` -> (G with its non-finite rows set to 0 by selection, `[BH, m, 1]` bool: row bad)."""
    bad = ~torch.isfinite(G).all(-1, keepdim=True)
    return G.masked_fill(bad, 0.0), bad


def _blocks(x: Tensor, n: int, m: int) -> Tensor:
    """[B, H, n*m, ...] -> [n, B, H, m, ...], a view (mini-batch index leading)."""
    return x.unflatten(2, (n, m)).movedim(2, 0)


def _with_ones(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def _fold(w: Tensor, b: Tensor) -> Tensor:
    """Weight `[B, H, i, o]` and bias `[B, H, 1, o]` -> `[B*H, i+1, o]` (`[W; b]`, bias as last row)."""
    B, H, i, o = w.shape
    return torch.cat([w, b], dim=-2).reshape(B * H, i + 1, o)


def _unfold(W: Tensor, B: int, H: int) -> tuple[Tensor, Tensor]:
    """Inverse of `_fold`: `[B*H, i+1, o]` -> (weight `[B, H, i, o]`, bias `[B, H, 1, o]`)."""
    i = W.shape[-2] - 1
    W = W.reshape(B, H, i + 1, W.shape[-1])
    return W[:, :, :i], W[:, :, i:]


def _fold_params(params: tuple[Tensor, ...]) -> Params:
    """`(W1, b1[, W2, b2])` with leading `[B, H]` -> one folded `[B*H, i+1, o]` tensor per layer."""
    return tuple(_fold(params[i], params[i + 1]) for i in range(0, len(params), 2))


def _unfold_params(W: Params, B: int, H: int) -> tuple[Tensor, ...]:
    return tuple(t for Wl in W for t in _unfold(Wl, B, H))


@dataclass
class _MiniBatches:
    """The state-independent tensors of one call, split per mini-batch (scan index j < n).

    Tuples hold one `[BH, ...]` tensor per mini-batch: indexing a stacked `x[j]` inside the scan
    would make autograd scatter every step's gradient into a zero tensor of the full size
    (quadratic in n). `Ka`, `Qa` carry the ones column of the folded bias; each is contiguous (a
    strided slice would cost the LayerNorm a copy per step).
    """

    B: int
    H: int
    m: int
    r: int  # tokens of the state's partial mini-batch, prepended to this call's
    T: int  # tokens of this call
    n: int  # mini-batches touched (the last may be partial)
    n_full: int  # mini-batches completed (their update is applied)
    K: Tensor  # [B, H, r+T, d] keys incl. the state's (for the new state's tail)
    V: Tensor
    g: Tensor  # [B, H, r+T]
    Qb: Tensor  # [n, BH, m, d] queries (zeros for the state's rows and the padding), a view of Qa's
    Ka: tuple[Tensor, ...]  # [BH, m, d+1]  [K, 1]
    Qa: tuple[Tensor, ...]  # [BH, m, d+1]  [Q, 1]
    neg_tgt: tuple[Tensor, ...]  # [BH, m, d]  K - V, the negated reconstruction target
    E: tuple[Tensor, ...]  # [BH, m, m]  eta[i, s] = token_eta[i] * gate[s], lower-triangular
    e_last: tuple[Tensor, ...]  # [BH, m, 1]  the last row of E (the update's weights)
    M1: tuple[Tensor, ...]  # [BH, m, m]  E * tril([Q, 1][K, 1]^T)
    gamma: Tensor  # [BH, 1, d] ttt_norm weight per (batch, head)
    beta: Tensor
    guard: bool  # some key/value/gate is non-finite: the scan isolates its rows (see `_scan`)


def _prepare(XQ: Tensor, XK: Tensor, XV: Tensor, gate: Tensor, token_eta: Tensor, ln_weight: Tensor,
             ln_bias: Tensor, state: InnerState) -> _MiniBatches:
    """Everything that does not depend on the inner state, for all mini-batches at once."""
    B, H, T, d = XQ.shape
    m = token_eta.numel()
    r = state.num_buffered
    K = torch.cat([state.k, XK], dim=2) if r else XK
    V = torch.cat([state.v, XV], dim=2) if r else XV
    g = torch.cat([state.gate, gate], dim=2) if r else gate
    L = r + T
    n, n_full = -(-L // m), L // m
    pad = n * m - L
    Q = F.pad(XQ, (0, 0, r, pad)) if (r or pad) else XQ
    Kp = F.pad(K, (0, 0, 0, pad)) if pad else K
    Vp = F.pad(V, (0, 0, 0, pad)) if pad else V
    gp = F.pad(g, (0, pad)) if pad else g  # zero gate: padded tokens never contribute a gradient

    # keys and queries go straight from the caller's layout into [n, B, H, m, d+1] buffers with the
    # ones column: each is copied once, and every step reads contiguous [BH, m, d+1]. One buffer
    # each: at 125m width and B 4 a shared one would pass glibc's 32 MB mmap ceiling and be faulted
    # in anew on every call.
    BH = B * H
    Ka, Qa = _with_ones(_blocks(Kp, n, m)), _with_ones(_blocks(Q, n, m))
    # K - V in the keys' (contiguous) layout; reshape copies only if a layout ever differs
    neg_tgt = torch.sub(Ka[..., :d], _blocks(Vp, n, m)).reshape(n, BH, m, d)
    Ka, Qa = Ka.reshape(n, BH, m, d + 1), Qa.reshape(n, BH, m, d + 1)
    E = (token_eta[:, None] * _blocks(gp.unsqueeze(-1), n, m).transpose(-1, -2)).tril().reshape(n, BH, m, m)
    e_last = E[:, :, -1, :, None]  # [n, BH, m, 1]
    # The causal mask selects (tril) rather than multiplies: a NaN key at row s must not turn the
    # 0 of row i < s into 0 * NaN.
    M1 = Qa @ Ka.transpose(-1, -2)
    M1 = (E * M1).tril() if torch.is_grad_enabled() else M1.mul_(E).tril_()
    # (A sum is one cheap pass; it is non-finite if any term is (K - V is wherever K or V is: inf - inf
    # is NaN), and a finite-input overflow only takes the guarded path, which gives the same values.)
    guard = not bool(torch.isfinite(neg_tgt.sum() + g.sum()))
    gamma = ln_weight.unsqueeze(0).expand(B, H, d).reshape(BH, 1, d)
    beta = ln_bias.unsqueeze(0).expand(B, H, d).reshape(BH, 1, d)
    Qb = Qa[..., :d]
    Ka, Qa, neg_tgt, E, e_last, M1 = (t.unbind(0) for t in (Ka, Qa, neg_tgt, E, e_last, M1))
    return _MiniBatches(B, H, m, r, T, n, n_full, K, V, g, Qb, Ka, Qa, neg_tgt, E, e_last, M1, gamma, beta,
                        guard)


def _sub_prod(W: Tensor, A: Tensor, G: Tensor, in_place: bool) -> Tensor:
    """`W - A @ G` (one baddbmm; in place when no autograd graph is recorded)."""
    return W.baddbmm_(A, G, alpha=-1) if in_place else torch.baddbmm(W, A, G, alpha=-1)


@dataclass
class _InnerModel:
    """What an inner model contributes to the shared scan (closures over one call's `_MiniBatches`).

    forward(W, j, out) -> (Zb [BH, m, d] pre-LN outputs of mini-batch j's rows (written to `out`
        when given), bad rows [BH, m, 1] or None, grads at W, residual R [BH, m, d]).
    grads_at(W, j) -> (grads, R): the gradient half of a step (for inner_steps > 1).
    update(W, grads, j) -> W after mini-batch j's step.
    mse_last(W, j) -> [BH]: the official stat, loss of mini-batch j's last token at W.
    """

    forward: Callable
    grads_at: Callable
    update: Callable
    mse_last: Callable


def _scan(mb: _MiniBatches, W: Params, model: _InnerModel, inner_steps: int, output_stats: bool,
          remat_group_size: int) -> tuple[Params, Tensor, list[Tensor]]:
    """Walk the mini-batches: returns (params after the last completed one, Zb `[n, BH, m, d]`,
    per completed mini-batch `[mse_step_0, mse_step_1]` flattened when `output_stats`).

    A non-finite key/value/gate at row s of a mini-batch makes G[s] non-finite; the products
    `M @ G` would then spread it to rows i < s through M[i, s] = 0 (0 * NaN = NaN). Only then
    (`mb.guard`, one check per call) the forward zeroes such rows of G before those products (rows
    i < s multiply them by an exact 0, so they keep their values bit for bit) and here rows >= s
    become NaN.
    """
    in_place = not torch.is_grad_enabled()  # then each step's outputs go straight into one buffer

    def run(j0, j1, *Wc):
        zbs, st = [], []
        buf = mb.Qb.new_empty(j1 - j0, *mb.Qb.shape[1:]) if in_place else None
        for j in range(j0, j1):
            Zb, bad, grads, R = model.forward(Wc, j, None if buf is None else buf[j - j0])
            if bad is not None:  # rows at and after a non-finite row are NaN (their inputs were)
                Zb = Zb.masked_fill_(bad.cumsum(-2) > 0, float("nan"))  # Zb is fresh: in place is safe
            zbs.append(Zb)
            if j < mb.n_full:
                Wc = model.update(Wc, grads, j)
                for _ in range(inner_steps - 1):
                    Wc = model.update(Wc, model.grads_at(Wc, j)[0], j)
                if output_stats:
                    st.extend(((R[:, -1] ** 2).mean(-1), model.mse_last(Wc, j)))
        return (*Wc, torch.stack(zbs) if buf is None else buf, *st)

    use_remat = remat_group_size > 0 and torch.is_grad_enabled()
    group = remat_group_size if use_remat else mb.n
    zb_parts, stats = [], []
    for j0 in range(0, mb.n, group):
        j1 = min(mb.n, j0 + group)
        res = checkpoint(run, j0, j1, *W, use_reentrant=False) if use_remat else run(j0, j1, *W)
        W, zb = tuple(res[:len(W)]), res[len(W)]
        zb_parts.append(zb)
        stats.extend(res[len(W) + 1:])
    return W, (torch.cat(zb_parts) if len(zb_parts) > 1 else zb_parts[0]), stats


def _finish(mb: _MiniBatches, W: Params, Zb: Tensor, step_stats: list[Tensor], model: _InnerModel,
            output_stats: bool, init_params: tuple[Tensor, ...] | None):
    """Output `q + LN(Zb)` as `[B, H, T, d]`, the new `InnerState` and the stats.

    The output is a `[B, H, T, d]` view of a `[B, T, H, d]` tensor: the layer's merge of the heads
    (`transpose(1, 2).reshape(B, T, D)`) is then free. Without autograd the sum is written there
    directly; with it, one copy moves it."""
    B, H, m, n, r, T = mb.B, mb.H, mb.m, mb.n, mb.r, mb.T
    d = Zb.shape[-1]
    grad = torch.is_grad_enabled()
    y = _ln(Zb, mb.gamma, mb.beta, in_place=not grad)
    if grad:
        out = (mb.Qb + y).view(n, B, H, m, d).permute(1, 0, 3, 2, 4).reshape(B, n * m, H, d)
    else:  # the same sum, written straight into the output layout (no large temporary)
        out = y.new_empty(B, n * m, H, d)
        torch.add(mb.Qb.view(n, B, H, m, d), y.view(n, B, H, m, d),
                  out=out.view(B, n, m, H, d).permute(1, 0, 3, 2, 4))
    out = out[:, r:r + T].transpose(1, 2)
    tail = slice(mb.n_full * m, r + T)
    new_state = InnerState(_unfold_params(W, B, H), mb.K[:, :, tail], mb.V[:, :, tail], mb.g[:, :, tail])
    if not output_stats:
        return out, new_state, None
    W0 = _fold_params(tuple(p.unsqueeze(0).expand(B, *p.shape) for p in init_params))
    mse_init = [model.mse_last(W0, j) for j in range(mb.n_full)]

    def stk(xs):
        return torch.stack(xs, -1).reshape(B, H, len(xs)) if xs else Zb.new_zeros(B, H, 0)

    return out, new_state, (stk(mse_init), stk(step_stats[0::2]), stk(step_stats[1::2]))


def _run_op(name: str, kind: str, make_model: Callable, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias,
            state: InnerState, inner_steps: int, output_stats: bool, init_params, remat_group_size: int):
    """Checks, `_prepare`, `_scan`, `_finish`: the part both ops share."""
    check_op_inputs(name, kind, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, inner_steps)
    if output_stats and init_params is None:
        raise ValueError(f"{name}: output_stats=True needs init_params (the learned initial params)")
    B, H, T, d = XQ.shape
    if state.num_buffered + T == 0:
        return XQ.new_zeros(B, H, 0, d), state, (tuple(XQ.new_zeros(B, H, 0) for _ in range(3)) if output_stats else None)
    mb = _prepare(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state)
    model = make_model(mb, not torch.is_grad_enabled())
    W, Zb, step_stats = _scan(mb, _fold_params(state.params), model, inner_steps, output_stats, remat_group_size)
    return _finish(mb, W, Zb, step_stats, model, output_stats, init_params)


def _linear_model(mb: _MiniBatches, in_place: bool) -> _InnerModel:
    """TTT-Linear pieces: f(k) = [k, 1] W, W `[BH, d+1, d]`; G = dLoss/dZ at Z = K W."""

    def grads_from(Z, j):  # Z = K_j W, [BH, m, d]
        G, R = _ln_fwd_vjp(Z, mb.neg_tgt[j], mb.gamma, mb.beta)
        return (G,), R

    def forward(W, j, out):
        (G,), R = grads_from(torch.bmm(mb.Ka[j], W[0]), j)
        Gc, bad = _finite_rows(G) if mb.guard else (G, None)
        # dual form: row i of Q W_i is Q_i W - sum_{s <= i} eta[i, s] (Q_i K_s^T + 1) G_s
        # (in place on the fresh product: `baddbmm(..., out=)` would first copy it there)
        Zb = torch.bmm(mb.Qa[j], W[0], out=out).baddbmm_(mb.M1[j], Gc, alpha=-1)
        return Zb, bad, (G,), R

    def grads_at(W, j):
        return grads_from(torch.bmm(mb.Ka[j], W[0]), j)

    def update(W, grads, j):  # W - (e K)^T G, as K^T (e G): e scales the narrower factor
        return (_sub_prod(W[0], mb.Ka[j].transpose(-1, -2), mb.e_last[j] * grads[0], in_place),)

    def mse_last(W, j):
        z = mb.Ka[j][:, -1:] @ W[0]
        return ((_ln(z, mb.gamma, mb.beta) + mb.neg_tgt[j][:, -1:]) ** 2).mean(dim=(-1, -2))

    return _InnerModel(forward, grads_at, update, mse_last)


def _gelu_with_ones(z: Tensor) -> Tensor:
    """`[gelu_tanh(z), 1]`: the second inner layer's input with its ones column."""
    return _with_ones(F.gelu(z, approximate="tanh"))


def _mlp_model(mb: _MiniBatches, in_place: bool, c_gelu: bool = False) -> _InnerModel:
    """TTT-MLP pieces: f(k) = [gelu([k, 1] W1), 1] W2, W1 `[BH, d+1, 4d]`, W2 `[BH, 4d+1, d]`;
    grads `(G1 [BH, m, 4d], G2 [BH, m, d], X2a [BH, m, 4d+1])`: dLoss/dZ1, dLoss/dZ2 and the
    second layer's input (with its ones column). `c_gelu`: the GELU and its derivative from the C
    kernels (no autograd; `dual_ttt_mlp`)."""
    gelu_with_ones, gelu_grad = _gelu_with_ones, _gelu_grad
    if c_gelu:
        from official_port.ops import c_scan  # here: c_scan imports this module

        gelu_with_ones, gelu_grad = functools.partial(c_scan.c_gelu_tanh, with_ones=True), c_scan.c_gelu_tanh_grad

    def grads_from(Z1, W, j):  # Z1 = K_j W1, [BH, m, 4d]
        W1, W2 = W
        hidden = W1.shape[-1]
        X2a = gelu_with_ones(Z1)
        G2, R = _ln_fwd_vjp(X2a @ W2, mb.neg_tgt[j], mb.gamma, mb.beta)
        G1 = gelu_grad(G2 @ W2[:, :hidden].transpose(-1, -2), Z1)
        return (G1, G2, X2a), R

    def forward(W, j, out):
        grads, R = grads_from(torch.bmm(mb.Ka[j], W[0]), W, j)
        G1, G2, X2a = grads
        G1c, bad = _finite_rows(G1) if mb.guard else (G1, None)
        Xb2a = gelu_with_ones(torch.baddbmm(torch.bmm(mb.Qa[j], W[0]), mb.M1[j], G1c, alpha=-1))
        M2 = (mb.E[j] * (Xb2a @ X2a.transpose(-1, -2))).tril()  # E * tril(Xb2 X2^T + 1), by selection
        G2c, bad2 = _finite_rows(G2) if mb.guard else (G2, None)
        Zb = torch.bmm(Xb2a, W[1], out=out).baddbmm_(M2, G2c, alpha=-1)
        return Zb, (bad | bad2 if mb.guard else None), grads, R

    def grads_at(W, j):
        return grads_from(torch.bmm(mb.Ka[j], W[0]), W, j)

    def update(W, grads, j):
        G1, G2, X2a = grads
        e = mb.e_last[j]
        return (_sub_prod(W[0], mb.Ka[j].transpose(-1, -2), e * G1, in_place),
                _sub_prod(W[1], X2a.transpose(-1, -2), e * G2, in_place))

    def mse_last(W, j):
        z = gelu_with_ones(mb.Ka[j][:, -1:] @ W[0]) @ W[1]
        return ((_ln(z, mb.gamma, mb.beta) + mb.neg_tgt[j][:, -1:]) ** 2).mean(dim=(-1, -2))

    return _InnerModel(forward, grads_at, update, mse_last)


def dual_ttt_linear(XQ: Tensor, XK: Tensor, XV: Tensor, gate: Tensor, token_eta: Tensor, ln_weight: Tensor,
                    ln_bias: Tensor, state: InnerState, *, inner_steps: int = 1, output_stats: bool = False,
                    init_params: tuple[Tensor, ...] | None = None, remat_group_size: int = 0):
    """TTT-Linear inner loop in the mini-batch dual form (same contract as `naive_ttt_linear`).

    Per mini-batch of m rows, with W `[d+1, d]` (bias folded) at its start and G = dLoss/dZ at
    Z = [K, 1] W: outputs `Q + LN(Q W - (E * tril(Q K^T + 1)) G)`, then `W <- W - (e K)^T G`.

    Args:
        XQ, XK, XV: `[B, H, T, d]` queries and keys (after RoPE) and values, any T >= 0.
        gate: `[B, H, T]` per-token gate `ttt_lr_mult * ttt_base_lr * sigmoid(x.w_h + b_h) / d`.
        token_eta: `[m]` per-row weights `max(0, 1/(i+1) + learnable_token_idx[i])`; m = mini-batch size.
        ln_weight, ln_bias: `[H, d]` the per-head `ttt_norm` LayerNorm.
        state: `InnerState` to start from: params `(W1 [B, H, d, d], b1 [B, H, 1, d])` and the
            partial mini-batch so far.
        inner_steps: k >= 1. After each completed mini-batch's update, k-1 further steps
            `W <- W - (e*K)^T G(W)` on that mini-batch (e = last row of its eta); k = 1 is official.
        output_stats: also return the official per-mini-batch losses.
        init_params: learned initial params `(W1 [H, d, d], b1 [H, 1, d])` (for `ttt_loss_mse_init`).
        remat_group_size: > 0 runs every group of that many mini-batches under
            `torch.utils.checkpoint` (recomputed in backward; identical gradients, less memory).

    Returns:
        out: `[B, H, T, d]`; state: the `InnerState` after the T tokens; stats: None or
        `(mse_init, mse_step_0, mse_step_1)` each `[B, H, n_done]` (mini-batches completed here).
    """
    return _run_op("dual_ttt_linear", "linear", _linear_model, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias,
                   state, inner_steps, output_stats, init_params, remat_group_size)


def dual_ttt_mlp(XQ: Tensor, XK: Tensor, XV: Tensor, gate: Tensor, token_eta: Tensor, ln_weight: Tensor,
                 ln_bias: Tensor, state: InnerState, *, inner_steps: int = 1, output_stats: bool = False,
                 init_params: tuple[Tensor, ...] | None = None, remat_group_size: int = 0, c_gelu: bool = False):
    """TTT-MLP inner loop (hidden width 4d, tanh-GELU) in the mini-batch dual form.

    Per mini-batch, with W1 `[d+1, 4d]`, W2 `[4d+1, d]` at its start, X2 = gelu([K, 1] W1) and
    G2 = dLoss/dZ2 at Z2 = [X2, 1] W2, G1 = (G2 W2^T) * gelu'(K W1): the first layer's outputs
    `Zb1 = Q W1 - (E * tril(Q K^T + 1)) G1`, then `Zb2 = [gelu(Zb1), 1] W2 - (E * tril(Xb2 X2^T + 1)) G2`
    and `Q + LN(Zb2)`; the params move by `(e K)^T G1` and `(e X2)^T G2`.

    Args: as `dual_ttt_linear`, with state params and `init_params`
        `(W1 [., H, d, 4d], b1 [., H, 1, 4d], W2 [., H, 4d, d], b2 [., H, 1, d])`; `c_gelu`: the GELU
        and its derivative in C (`c_scan.c_gelu_tanh`, `c_gelu_tanh_grad`: float32 CPU, no autograd,
        4d a multiple of 16; within ~2.5 float32 ulps of float64), the layer's no-grad path under
        `kernel="c"`/`"auto"`.
    Returns: as `dual_ttt_linear`.
    """
    model = functools.partial(_mlp_model, c_gelu=c_gelu) if c_gelu else _mlp_model
    return _run_op("dual_ttt_mlp", "mlp", model, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias,
                   state, inner_steps, output_stats, init_params, remat_group_size)


_OPS = {"linear": dual_ttt_linear, "mlp": dual_ttt_mlp}


def dual_ttt(kind: str, XQ: Tensor, XK: Tensor, XV: Tensor, gate: Tensor, token_eta: Tensor, ln_weight: Tensor,
             ln_bias: Tensor, state: InnerState, **kwargs):
    """Mini-batch dual-form TTT inner loop of `kind` ("linear" -> `dual_ttt_linear`, "mlp" ->
    `dual_ttt_mlp`); same contract as `official_port.ops.naive.naive_ttt`."""
    if kind not in _OPS:
        check_op_inputs("dual_ttt", kind, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state,
                        kwargs.get("inner_steps", 1))
    return _OPS[kind](XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, **kwargs)
