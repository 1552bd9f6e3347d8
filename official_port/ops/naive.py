"""Naive twin of the TTT inner loop: a readable per-token primal-form loop.

Reproduces what `TTTLinearBase.process_mini_batch` / `TTTMLPBase.process_mini_batch` of
test-time-training/ttt-lm-jax `ttt/models/ttt_layer.py` compute, written the long way: token i of a
mini-batch is produced by the inner model with parameters

    W_i = W_0 - token_eta[i] * sum_{s <= i} gate_s * grad_W loss_s(W_0),
    loss_s(W) = 1/2 || LN_h(f_W(k_s)) - (v_s - k_s) ||^2,

with W_0 the parameters at the mini-batch start, and the state moves to W_{m-1} when the
mini-batch completes. The per-token gradients come from `torch.autograd.grad` (graph kept, so the
outer gradients see the second-order terms), not from the hand-written formulas of the dual
form: the two are independent. Slow by design; use it to check `official_port.ops.dual`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from official_port.ops.state import InnerState, check_op_inputs

LN_EPS = 1e-6


def _ln(z: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Per-head LayerNorm; w, b: [B, H, 1, d] (already broadcast)."""
    return F.layer_norm(z, z.shape[-1:], eps=LN_EPS) * w + b


def _inner(kind: str, params: tuple[Tensor, ...], x: Tensor) -> Tensor:
    """The inner model f_W(x); x [B, H, n, d]."""
    if kind == "linear":
        W1, b1 = params
        return x @ W1 + b1
    W1, b1, W2, b2 = params
    return F.gelu(x @ W1 + b1, approximate="tanh") @ W2 + b2


def _token_grads(kind, params, k, v, w, b, create_graph):
    """Gradients wrt every inner parameter of loss_s at `params`, per (batch, head); k, v: [B, H, 1, d].

    `create_graph` keeps the graph of the gradient itself (needed when outer gradients are wanted:
    they must see the second-order terms); without it each token's graph is freed at once."""
    leaves = [p if p.requires_grad else p.detach().requires_grad_() for p in params]
    # Summing over (B, H) is harmless: every (b, h) owns its own slice of the parameters.
    loss = 0.5 * ((_ln(_inner(kind, leaves, k), w, b) - (v - k)) ** 2).sum()
    grads = torch.autograd.grad(loss, leaves, create_graph=create_graph)
    return grads


def _mse_last(kind, params, k, v, w, b) -> Tensor:
    """Official TTT stat: mean_k (LN(f(k_last)) - target_last)^2, per (batch, head)."""
    return ((_ln(_inner(kind, params, k), w, b) - (v - k)) ** 2).mean(dim=(-1, -2))


def _gated_grad_sum(kind, params, buf_k, buf_v, buf_g, w, b, grad_mode) -> list[Tensor]:
    """sum_j gate_j * grad of token j's loss at `params`, over the buffered tokens (`[B, H, d]` keys and
    values, `[B, H]` gates); zeros for an empty buffer."""
    acc = [torch.zeros_like(p) for p in params]
    for ks, vs, gs in zip(buf_k, buf_v, buf_g):
        grads = _token_grads(kind, params, ks[:, :, None], vs[:, :, None], w, b, grad_mode)
        acc = [a + gs[..., None, None] * g for a, g in zip(acc, grads)]
    return acc


def _stack_or_empty(like: Tensor, xs: list[Tensor], empty_shape: tuple[int, ...]) -> Tensor:
    """`xs` stacked on a new last dim, or zeros of `empty_shape` (like `like`) when there are none."""
    return torch.stack(xs, dim=-1) if xs else like.new_zeros(*empty_shape)


# long on purpose: the per-token reference reads as one loop (a third of its lines are the docstring)
def naive_ttt(
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
) -> tuple[Tensor, InnerState, tuple[Tensor, Tensor, Tensor] | None]:
    """Per-token primal-form TTT inner loop (the twin of `official_port.ops.dual.dual_ttt`).

    Args:
        kind: "linear" (TTT-Linear) or "mlp" (TTT-MLP, hidden width 4d, tanh-GELU).
        XQ, XK, XV: `[B, H, T, d]` queries and keys (after RoPE) and values, any T >= 0.
        gate: `[B, H, T]` per-token gate `ttt_lr_mult * ttt_base_lr * sigmoid(x.w_h + b_h) / d`.
        token_eta: `[m]` per-row weights `max(0, 1/(i+1) + learnable_token_idx[i])`; m = mini-batch size.
        ln_weight, ln_bias: `[H, d]` the per-head `ttt_norm` LayerNorm.
        state: `InnerState` to start from (boundary params + the partial mini-batch so far).
        inner_steps: k >= 1; after a mini-batch completes, k-1 further gradient steps on it.
        output_stats: also return the official per-mini-batch losses.
        init_params: learned initial params `[H, ...]` (for the `ttt_loss_mse_init` stat).

    Returns:
        out: `[B, H, T, d]` = `q + LN_h(f_{W_i}(q))`.
        state: the `InnerState` after the T tokens.
        stats: None, or `(mse_init, mse_step_0, mse_step_1)` each `[B, H, n_done]` for the
            mini-batches completed in this call.
    """
    check_op_inputs("naive_ttt", kind, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, inner_steps)
    if output_stats and init_params is None:
        raise ValueError("naive_ttt: output_stats=True needs init_params (the learned initial params)")
    grad_mode = torch.is_grad_enabled()
    if not grad_mode:  # nothing outside needs a graph: only the per-token gradient leaves get one
        XQ, XK, XV, gate, token_eta, ln_weight, ln_bias = (
            t.detach() for t in (XQ, XK, XV, gate, token_eta, ln_weight, ln_bias))
        init_params = tuple(p.detach() for p in init_params) if init_params is not None else None
    m, T = token_eta.numel(), XQ.shape[2]
    w, b = ln_weight[None, :, None, :], ln_bias[None, :, None, :]
    # without grad mode nothing is differentiated from outside: detached copies make the
    # per-token autograd below independent of how the state tensors were created
    params = tuple(state.params) if grad_mode else tuple(p.detach() for p in state.params)
    buf_k, buf_v, buf_g = list(state.k.unbind(2)), list(state.v.unbind(2)), list(state.gate.unbind(2))
    outs, stats = [], ([], [], [])
    with torch.enable_grad():
        # gradient sums of the tokens already buffered in the state, at the boundary params
        acc = _gated_grad_sum(kind, params, buf_k, buf_v, buf_g, w, b, grad_mode)
        for t in range(T):
            i = len(buf_k)  # row of this token inside its mini-batch
            k, v, q, g_t = XK[:, :, t:t + 1], XV[:, :, t:t + 1], XQ[:, :, t:t + 1], gate[:, :, t]
            grads = _token_grads(kind, params, k, v, w, b, grad_mode)
            acc = [a + g_t[..., None, None] * g for a, g in zip(acc, grads)]
            W_i = tuple(p - token_eta[i] * a for p, a in zip(params, acc))
            outs.append(q + _ln(_inner(kind, W_i, q), w, b))
            buf_k.append(k[:, :, 0])
            buf_v.append(v[:, :, 0])
            buf_g.append(g_t)
            if i == m - 1:  # mini-batch complete: its last-row parameters become the state
                start = params
                params = W_i
                for _ in range(inner_steps - 1):
                    step = _gated_grad_sum(kind, params, buf_k, buf_v, buf_g, w, b, grad_mode)
                    params = tuple(p - token_eta[m - 1] * a for p, a in zip(params, step))
                if output_stats:
                    init = tuple(p.unsqueeze(0) for p in init_params)
                    for out_stat, at in zip(stats, (init, start, params)):
                        out_stat.append(_mse_last(kind, at, k, v, w, b))
                buf_k, buf_v, buf_g = [], [], []
                acc = [torch.zeros_like(p) for p in params]
    B, H, _, d = XQ.shape
    out = torch.cat(outs, dim=2) if outs else XQ.new_zeros(B, H, 0, d)
    new_state = InnerState(params, _stack_or_empty(XQ, buf_k, (B, H, d, 0)).transpose(2, 3),
                           _stack_or_empty(XQ, buf_v, (B, H, d, 0)).transpose(2, 3),
                           _stack_or_empty(XQ, buf_g, (B, H, 0)))
    out_stats = tuple(_stack_or_empty(XQ, s, (B, H, 0)) for s in stats) if output_stats else None
    if not grad_mode:
        out = out.detach()
        new_state = new_state.detach()
        out_stats = tuple(s.detach() for s in out_stats) if out_stats is not None else None
    return out, new_state, out_stats


def naive_ttt_linear(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, **kwargs):
    """`naive_ttt("linear", ...)`: the TTT-Linear twin."""
    return naive_ttt("linear", XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, **kwargs)


def naive_ttt_mlp(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, **kwargs):
    """`naive_ttt("mlp", ...)`: the TTT-MLP twin."""
    return naive_ttt("mlp", XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, **kwargs)
