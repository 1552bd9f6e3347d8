"""Fast mini-batch dual form of the TTT inner loop (TTT-Linear and TTT-MLP).

Reproduces `TTTLinearBase.process_mini_batch` / `TTTMLPBase.process_mini_batch` and the scan of
`TTTBase.ttt` in test-time-training/ttt-lm-jax `ttt/models/ttt_layer.py`, value for value, and
extends it to any length and to an explicit state (see `official_port.ops.state.InnerState`).

Speed-relevant choices (all exact, none changes values beyond float rounding):
  * batch and heads are folded into one bmm batch, and the scan runs over mini-batches only;
  * each inner bias is folded into its weight as an extra row (`[W; b]`), with a column of ones
    appended to the inputs; then `Q K^T + 1` (the dual form's attention plus its bias term) is a
    single product `[Q, 1][K, 1]^T` and every update is one `baddbmm`;
  * everything that does not depend on the inner state (eta matrices, `E * tril(Q K^T + 1)`, the
    scaled keys of the update, targets) is computed for all mini-batches before the scan;
  * the output LayerNorm of all mini-batches runs once after the scan.

A call may start inside a mini-batch (the state's buffered tokens are prepended with zero queries)
and may end inside one (zero-padded with zero gates; its rows are causal because eta is
lower-triangular, and its update is not applied: those tokens go back to the state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from official_port.ops.state import InnerState, check_op_inputs

LN_EPS = 1e-6


def gelu_tanh_derivative(x: Tensor) -> Tensor:
    """d/dx of the tanh-approximate GELU with the official hand-rounded constants (`diff_gelu`).

    The reference formula; the scan uses the fused `_gelu_grad` (same values to 3e-10)."""
    tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    return 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)


def _ln_fwd_vjp(z: Tensor, target: Tensor, gamma: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head LayerNorm at z, residual R = LN(z) - target and G = J_LN(z)^T R.

    Uses ATen's fused LayerNorm forward/backward kernels (gamma is per head, so it is applied
    outside them). `native_layer_norm_backward` is itself differentiable, so the outer backward
    gets the second-order terms of the official code (checked against the autograd twin).
    """
    xhat, mean, rstd = torch.native_layer_norm(z, z.shape[-1:], None, None, LN_EPS)
    resid = torch.addcmul(beta, xhat, gamma) - target
    grad = torch.ops.aten.native_layer_norm_backward(resid * gamma, z, z.shape[-1:], mean, rstd, None, None,
                                                     [True, False, False])[0]
    return grad, resid


def _gelu_grad(grad_out: Tensor, x: Tensor) -> Tensor:
    """`grad_out * gelu'(x)` for the tanh GELU in one fused (twice differentiable) kernel. It uses
    the exact constants; the official `diff_gelu` rounds them (<= 3.1e-10 apart on N(0, 1) inputs,
    see the tests), far below float32 resolution."""
    return torch.ops.aten.gelu_backward(grad_out, x, approximate="tanh")


def _ln(z: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    return torch.addcmul(beta, F.layer_norm(z, z.shape[-1:], eps=LN_EPS), gamma)


def _finite_rows(G: Tensor) -> tuple[Tensor, Tensor]:
    """`[BH, m, c]` -> (G with its non-finite rows set to 0 by selection, `[BH, m, 1]` bool: row bad)."""
    bad = ~torch.isfinite(G).all(-1, keepdim=True)
    return G.masked_fill(bad, 0.0), bad


def _blocks(x: Tensor, n: int, m: int) -> Tensor:
    """[B, H, n*m, ...] -> [n, B*H, m, ...]: mini-batch leading so each scan step reads contiguous memory."""
    B, H = x.shape[:2]
    return x.reshape(B, H, n, m, *x.shape[3:]).movedim(2, 0).reshape(n, B * H, m, *x.shape[3:])


def _with_ones(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def dual_ttt(
    kind: str,
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    gate: Tensor,
    token_eta: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    state: InnerState,
    *,
    inner_steps: int = 1,
    output_stats: bool = False,
    init_params: tuple[Tensor, ...] | None = None,
    remat_group_size: int = 0,
) -> tuple[Tensor, InnerState, tuple[Tensor, Tensor, Tensor] | None]:
    """Mini-batch dual-form TTT inner loop; same contract as `official_port.ops.naive.naive_ttt`.

    Args:
        kind: "linear" (TTT-Linear) or "mlp" (TTT-MLP, hidden width 4d, tanh-GELU).
        XQ, XK, XV: `[B, H, T, d]` queries and keys (after RoPE) and values, any T >= 0.
        gate: `[B, H, T]` per-token gate `ttt_lr_mult * ttt_base_lr * sigmoid(x.w_h + b_h) / d`.
        token_eta: `[m]` per-row weights `max(0, 1/(i+1) + learnable_token_idx[i])`; m = mini-batch size.
        ln_weight, ln_bias: `[H, d]` the per-head `ttt_norm` LayerNorm.
        state: `InnerState` to start from (boundary params + the partial mini-batch so far).
        inner_steps: k >= 1. After each completed mini-batch's update, k-1 further steps
            `W <- W - (e*K)^T G(W)` on that mini-batch (e = last row of its eta); k = 1 is official.
        output_stats: also return the official per-mini-batch losses.
        init_params: learned initial params `[H, ...]` (for the `ttt_loss_mse_init` stat).
        remat_group_size: > 0 runs every group of that many mini-batches under
            `torch.utils.checkpoint` (recomputed in backward; identical gradients, less memory).

    Returns:
        out: `[B, H, T, d]`; state: the `InnerState` after the T tokens; stats: None or
        `(mse_init, mse_step_0, mse_step_1)` each `[B, H, n_done]` (mini-batches completed here).
    """
    check_op_inputs("dual_ttt", kind, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, inner_steps)
    if output_stats and init_params is None:
        raise ValueError("dual_ttt: output_stats=True needs init_params (the learned initial params)")
    B, H, T, d = XQ.shape
    m = token_eta.numel()
    r = state.num_buffered
    BH = B * H
    K = torch.cat([state.k, XK], dim=2) if r else XK
    V = torch.cat([state.v, XV], dim=2) if r else XV
    g = torch.cat([state.gate, gate], dim=2) if r else gate
    L = r + T
    n, n_full = -(-L // m), L // m
    if n == 0:
        return XQ.new_zeros(B, H, 0, d), state, (tuple(XQ.new_zeros(B, H, 0) for _ in range(3)) if output_stats else None)
    pad = n * m - L
    Q = F.pad(XQ, (0, 0, r, pad)) if (r or pad) else XQ
    Kp = F.pad(K, (0, 0, 0, pad)) if pad else K
    Vp = F.pad(V, (0, 0, 0, pad)) if pad else V
    gp = F.pad(g, (0, pad)) if pad else g  # zero gate: padded tokens never contribute a gradient

    # ---- everything that does not depend on the inner state, for all mini-batches at once
    Qb, Kb = _blocks(Q, n, m), _blocks(Kp, n, m)  # [n, BH, m, d]
    tgt = _blocks(Vp, n, m) - Kb  # reconstruction target V - K
    # [K, 1; Q, 1] per mini-batch in one buffer: one product gives K W and Q W
    KQa = Kb.new_empty(n, BH, 2 * m, d + 1)
    KQa[:, :, :m, :d] = Kb
    KQa[:, :, m:, :d] = Qb
    KQa[..., d] = 1.0
    Ka, Qa = KQa[:, :, :m], KQa[:, :, m:]  # [n, BH, m, d+1]
    # eta[i, s] = token_eta[i] * gate[s], lower-triangular (row i sees columns s <= i)
    E = (token_eta[:, None] * _blocks(gp.unsqueeze(-1), n, m).transpose(-1, -2)).tril()  # [n, BH, m, m]
    e_last = E[:, :, -1, :, None]  # [n, BH, m, 1]
    # E * tril(Q K^T + 1): dual-form attention + bias term. The causal mask selects (tril) rather
    # than multiplies: a NaN key at row s must not turn the 0 of row i < s into 0 * NaN.
    M1 = (E * (Qa @ Ka.transpose(-1, -2))).tril()
    eKt = (e_last * Ka).transpose(-1, -2)  # [n, BH, d+1, m]: the update (e*K)^T
    # Per-mini-batch views, split once: indexing `x[j]` inside the scan would make autograd
    # scatter every step's gradient into a zero tensor of the full size (quadratic in n).
    Ka, tgt, E, e_last, M1, KQa, eKt = (t.unbind(0) for t in (Ka, tgt, E, e_last, M1, KQa, eKt))
    # A non-finite key/value/gate at row s of a mini-batch makes G[s] non-finite; the products
    # `M @ G` would then spread it to rows i < s through M[i, s] = 0 (0 * NaN = NaN). Only then
    # (one check per call) the scan zeroes such rows of G before those products (rows i < s
    # multiply them by an exact 0, so they keep their values bit for bit) and sets rows >= s to NaN.
    # (A sum is one cheap pass; it is non-finite if any term is, and a finite-input overflow only
    # takes the guarded path, which gives the same values.)
    guard = not bool(torch.isfinite(K.sum() + V.sum() + g.sum()))
    gamma = ln_weight.unsqueeze(0).expand(B, H, d).reshape(BH, 1, d)
    beta = ln_bias.unsqueeze(0).expand(B, H, d).reshape(BH, 1, d)

    def fold(w, b):  # [B, H, i, o], [B, H, 1, o] -> [BH, i+1, o]
        return torch.cat([w, b], dim=-2).reshape(BH, w.shape[-2] + 1, w.shape[-1])

    if kind == "linear":
        W = (fold(*state.params),)
    else:
        W = (fold(state.params[0], state.params[1]), fold(state.params[2], state.params[3]))
    hidden = W[0].shape[-1]

    def grads_at(Wc, j):
        """G (and MLP's G1, X2) of mini-batch j at params Wc (the gradient half of a step)."""
        if kind == "linear":
            Z = Ka[j] @ Wc[0]
            G, R = _ln_fwd_vjp(Z, tgt[j], gamma, beta)
            return (G,), R
        Z1 = Ka[j] @ Wc[0]
        X2a = _with_ones(F.gelu(Z1, approximate="tanh"))
        G2, R = _ln_fwd_vjp(X2a @ Wc[1], tgt[j], gamma, beta)
        G1 = _gelu_grad(G2 @ Wc[1][:, :hidden].transpose(-1, -2), Z1)
        return (G1, G2, X2a), R

    # Without autograd the scan owns its params (fresh from `fold`): updates go in place and each
    # step's outputs straight into one buffer (same values; no per-step copies, no final stack).
    in_place = not torch.is_grad_enabled()

    def sub_prod(Wc, A, G):  # Wc - A @ G
        return Wc.baddbmm_(A, G, alpha=-1) if in_place else torch.baddbmm(Wc, A, G, alpha=-1)

    def apply_update(Wc, grads, j):
        if kind == "linear":
            return (sub_prod(Wc[0], eKt[j], grads[0]),)
        G1, G2, X2a = grads
        return (sub_prod(Wc[0], eKt[j], G1), sub_prod(Wc[1], (e_last[j] * X2a).transpose(-1, -2), G2))

    def mse_last(Wc, j):  # official stat: loss of the last token of mini-batch j at params Wc
        k_last = Ka[j][:, -1:]
        if kind == "linear":
            z = k_last @ Wc[0]
        else:
            z = _with_ones(F.gelu(k_last @ Wc[0], approximate="tanh")) @ Wc[1]
        return ((_ln(z, gamma, beta) - tgt[j][:, -1:]) ** 2).mean(dim=(-1, -2))

    def step(Wc, j, out=None):
        """Mini-batch j: pre-LN outputs Zb of its rows (written to `out` if given), and the params
        after it (if complete)."""
        if kind == "linear":
            ZZ = KQa[j] @ Wc[0]
            Z, Zq = ZZ[:, :m], ZZ[:, m:]
            G, R = _ln_fwd_vjp(Z, tgt[j], gamma, beta)
            Gc, bad = _finite_rows(G) if guard else (G, None)
            Zb = torch.baddbmm(Zq, M1[j], Gc, alpha=-1, out=out)
            grads = (G,)
        else:
            ZZ = KQa[j] @ Wc[0]
            Z1, Zq1 = ZZ[:, :m], ZZ[:, m:]
            X2a = _with_ones(F.gelu(Z1, approximate="tanh"))
            G2, R = _ln_fwd_vjp(X2a @ Wc[1], tgt[j], gamma, beta)
            G1 = _gelu_grad(G2 @ Wc[1][:, :hidden].transpose(-1, -2), Z1)
            G1c, bad = _finite_rows(G1) if guard else (G1, None)
            Xb2a = _with_ones(F.gelu(torch.baddbmm(Zq1, M1[j], G1c, alpha=-1), approximate="tanh"))
            M2 = (E[j] * (Xb2a @ X2a.transpose(-1, -2))).tril()  # E * tril(Xb2 X2^T + 1), by selection
            G2c, bad2 = _finite_rows(G2) if guard else (G2, None)
            Zb = torch.baddbmm(Xb2a @ Wc[1], M2, G2c, alpha=-1, out=out)
            bad = bad | bad2 if guard else None
            grads = (G1, G2, X2a)
        if guard:  # rows at and after a non-finite row are NaN (their inputs were)
            Zb = Zb.masked_fill_(bad.cumsum(-2) > 0, float("nan"))  # Zb is fresh: in place is safe
        stat = None
        if j < n_full:
            Wc = apply_update(Wc, grads, j)
            for _ in range(inner_steps - 1):
                Wc = apply_update(Wc, grads_at(Wc, j)[0], j)
            if output_stats:
                stat = ((R[:, -1] ** 2).mean(-1), mse_last(Wc, j))
        return Wc, Zb, stat

    def run(j0, j1, *Wc):
        zbs, st = [], []
        buf = Qb.new_empty(j1 - j0, BH, m, d) if in_place else None
        for j in range(j0, j1):
            Wc, Zb, stat = step(Wc, j, None if buf is None else buf[j - j0])
            zbs.append(Zb)
            if stat is not None:
                st.extend(stat)
        return (*Wc, torch.stack(zbs) if buf is None else buf, *st)

    use_remat = remat_group_size > 0 and torch.is_grad_enabled()
    group = remat_group_size if use_remat else n
    zb_parts, step_stats = [], []
    for j0 in range(0, n, group):
        j1 = min(n, j0 + group)
        if use_remat:
            res = checkpoint(run, j0, j1, *W, use_reentrant=False)
        else:
            res = run(j0, j1, *W)
        W, zb, st = tuple(res[:len(W)]), res[len(W)], res[len(W) + 1:]
        zb_parts.append(zb)
        step_stats.extend(st)
    Zb = torch.cat(zb_parts) if len(zb_parts) > 1 else zb_parts[0]  # [n, BH, m, d]
    out = Qb + _ln(Zb, gamma, beta)
    out = out.reshape(n, B, H, m, d).movedim(0, 2).reshape(B, H, n * m, d)[:, :, r:r + T]

    def unfold(Wc):
        i = Wc.shape[-2] - 1
        Wc = Wc.reshape(B, H, i + 1, Wc.shape[-1])
        return Wc[:, :, :i], Wc[:, :, i:]

    params = unfold(W[0]) if kind == "linear" else (*unfold(W[0]), *unfold(W[1]))
    tail = slice(n_full * m, L)
    new_state = InnerState(params, K[:, :, tail], V[:, :, tail], g[:, :, tail])

    stats = None
    if output_stats:
        init = tuple(p.unsqueeze(0).expand(B, *p.shape) for p in init_params)
        W0 = (fold(*init),) if kind == "linear" else (fold(init[0], init[1]), fold(init[2], init[3]))
        mse_init = [mse_last(W0, j) for j in range(n_full)]
        s0, s1 = step_stats[0::2], step_stats[1::2]

        def stk(xs):
            return torch.stack(xs, -1).reshape(B, H, len(xs)) if xs else XQ.new_zeros(B, H, 0)

        stats = (stk(mse_init), stk(s0), stk(s1))
    return out, new_state, stats


def dual_ttt_linear(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, **kwargs):
    """`dual_ttt("linear", ...)`: TTT-Linear."""
    return dual_ttt("linear", XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, **kwargs)


def dual_ttt_mlp(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, **kwargs):
    """`dual_ttt("mlp", ...)`: TTT-MLP."""
    return dual_ttt("mlp", XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, **kwargs)
