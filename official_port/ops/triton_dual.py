"""Triton kernel for the TTT-Linear mini-batch scan (forward), beside its torch twin `dual.py`.

Reproduces the same values as `official_port.ops.dual.dual_ttt_linear` (test-time-training/ttt-lm-jax
`TTTLinearBase.process_mini_batch` scanned by `TTTBase.ttt`): one program per (batch, head) keeps the
inner `W [d, d]`, `b [d]` in registers in float32 and walks the mini-batches, so the whole scan is one
launch instead of several small kernels per mini-batch.

Per mini-batch j (rows i, columns s of the m x m block; e[i, s] = token_eta[i] * gate[s], s <= i):
    Z  = K W + b;   R = LN(Z) - (V - K);   G = J_LN(Z)^T R          (gradient of the inner loss)
    Zb = Q W + b - (e * tril(Q K^T + 1)) G                          (dual-form outputs)
    out = Q + LN(Zb);  if the mini-batch is complete:  W -= (e[m-1] * K)^T G,  b -= e[m-1] . G

Backward: `TritonTTTLinearFunction.backward` recomputes the scan with the torch twin under autograd
and differentiates it (exact, same gradients as `dual_ttt_linear`). A fused Triton backward is not
written yet; the forward kernel is what the GPU benchmark times as fwd-only.

Products use `input_precision="ieee"` (true float32): tf32, Triton's default on recent GPUs, would
round the inner updates and break parity with the torch twin (1e-5).

Limits: d and m must be powers of two (tl.arange), and `inner_steps == 1`, no stats, no remat; the
layer's dispatch falls back to the torch twin otherwise.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from official_port.ops.dual import LN_EPS, dual_ttt
from official_port.ops.state import InnerState, check_op_inputs

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # optional dependency: the torch twin is always available
    triton = tl = None
    HAS_TRITON = False


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


if HAS_TRITON:

    def _ttt_linear_scan_fwd_kernel(
        Q, K, V, G8, ETA, GAMMA, BETA, W0, B0, OUT, WN, BN,
        H, n_blocks, n_full, eps,
        D: tl.constexpr, M: tl.constexpr, PREC: tl.constexpr,
    ):
        """One program per (b, h). Q/K/V/OUT: [BH, n*M, D]; G8 gate [BH, n*M]; W0/WN [BH, D, D]; B0/BN [BH, D]."""
        pid = tl.program_id(0)
        h = pid % H
        rd = tl.arange(0, D)
        rm = tl.arange(0, M)
        w = tl.load(W0 + pid * D * D + rd[:, None] * D + rd[None, :]).to(tl.float32)
        b = tl.load(B0 + pid * D + rd).to(tl.float32)
        gamma = tl.load(GAMMA + h * D + rd).to(tl.float32)
        beta = tl.load(BETA + h * D + rd).to(tl.float32)
        eta = tl.load(ETA + rm).to(tl.float32)  # [M] per-row token weights
        eta_last = tl.sum(tl.where(rm == M - 1, eta, 0.0), axis=0)
        causal = rm[:, None] >= rm[None, :]
        T = n_blocks * M
        for j in range(n_blocks):
            rows = j * M + rm
            offs = pid * T * D + rows[:, None] * D + rd[None, :]
            q = tl.load(Q + offs).to(tl.float32)
            k = tl.load(K + offs).to(tl.float32)
            v = tl.load(V + offs).to(tl.float32)
            g = tl.load(G8 + pid * T + rows).to(tl.float32)
            # inner loss gradient at the boundary params: G = J_LN(Z)^T (LN(Z) - (V - K))
            z = tl.dot(k, w, input_precision=PREC) + b[None, :]
            mu = tl.sum(z, axis=1) / D
            zc = z - mu[:, None]
            rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + eps)
            xhat = zc * rstd[:, None]
            resid = gamma[None, :] * xhat + beta[None, :] - (v - k)
            gx = resid * gamma[None, :]
            grad = rstd[:, None] * (gx - (tl.sum(gx, axis=1) / D)[:, None]
                                    - xhat * (tl.sum(gx * xhat, axis=1) / D)[:, None])
            # dual-form outputs: Q W + b - (e * tril(Q K^T + 1)) G
            e = tl.where(causal, eta[:, None] * g[None, :], 0.0)
            attn = e * (tl.dot(q, tl.trans(k), input_precision=PREC) + 1.0)
            zb = tl.dot(q, w, input_precision=PREC) + b[None, :] - tl.dot(attn, grad, input_precision=PREC)
            mu2 = tl.sum(zb, axis=1) / D
            zbc = zb - mu2[:, None]
            rstd2 = 1.0 / tl.sqrt(tl.sum(zbc * zbc, axis=1) / D + eps)
            out = q + gamma[None, :] * zbc * rstd2[:, None] + beta[None, :]
            tl.store(OUT + offs, out.to(OUT.dtype.element_ty))
            # update with the last row's weights (only a complete mini-batch updates the params)
            el = eta_last * g * (j < n_full).to(tl.float32)
            ek = k * el[:, None]
            w = w - tl.dot(tl.trans(ek), grad, input_precision=PREC)
            b = b - tl.sum(el[:, None] * grad, axis=0)
        tl.store(WN + pid * D * D + rd[:, None] * D + rd[None, :], w)
        tl.store(BN + pid * D + rd, b)


_JITTED: dict = {}


def _scan_kernel():
    """The jitted scan kernel. Decorated lazily, once per TRITON_INTERPRET value: triton decides
    between compiled and interpreted at decoration time, and the CPU tests set the variable only
    while they run (so it never leaks into the rest of the suite)."""
    key = os.environ.get("TRITON_INTERPRET", "0")
    if key not in _JITTED:
        _JITTED[key] = triton.jit(_ttt_linear_scan_fwd_kernel)
    return _JITTED[key]


def _prepare(XQ, XK, XV, gate, state: InnerState, m: int):
    """Prepend the state's buffered tokens (zero queries), pad to whole mini-batches (zero gates)."""
    r = state.num_buffered
    K = torch.cat([state.k, XK], dim=2) if r else XK
    V = torch.cat([state.v, XV], dim=2) if r else XV
    g = torch.cat([state.gate, gate], dim=2) if r else gate
    L = r + XQ.shape[2]
    n = -(-L // m)
    pad = n * m - L
    Q = F.pad(XQ, (0, 0, r, pad))
    return Q, F.pad(K, (0, 0, 0, pad)), F.pad(V, (0, 0, 0, pad)), F.pad(g, (0, pad)), K, V, g, n, L // m


def ttt_linear_scan_fwd(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state: InnerState):
    """Run the Triton forward; returns `(out [B, H, T, d], new InnerState)` (no autograd)."""
    B, H, T, d = XQ.shape
    m = token_eta.numel()
    r = state.num_buffered
    Q, Kp, Vp, gp, K, V, g, n, n_full = _prepare(XQ, XK, XV, gate, state, m)
    BH = B * H
    f32 = torch.float32
    Qc, Kc, Vc = (x.reshape(BH, n * m, d).to(f32).contiguous() for x in (Q, Kp, Vp))
    gc = gp.reshape(BH, n * m).to(f32).contiguous()
    W0 = state.params[0].reshape(BH, d, d).to(f32).contiguous()
    b0 = state.params[1].reshape(BH, d).to(f32).contiguous()
    out = torch.empty_like(Qc)
    Wn, bn = torch.empty_like(W0), torch.empty_like(b0)
    if n > 0:
        _scan_kernel()[(BH,)](
            Qc, Kc, Vc, gc, token_eta.to(f32).contiguous(), ln_weight.to(f32).contiguous(),
            ln_bias.to(f32).contiguous(), W0, b0, out, Wn, bn, H, n, n_full, LN_EPS, D=d, M=m, PREC="ieee")
    else:
        Wn, bn = W0.clone(), b0.clone()
    out = out.reshape(B, H, n * m, d)[:, :, r:r + T].to(XQ.dtype)
    tail = slice(n_full * m, r + T)
    params = (Wn.reshape(B, H, d, d).to(XQ.dtype), bn.reshape(B, H, 1, d).to(XQ.dtype))
    return out, InnerState(params, K[:, :, tail], V[:, :, tail], g[:, :, tail])


class TritonTTTLinearFunction(torch.autograd.Function):
    """Triton forward; backward by recomputing the torch twin under autograd (exact gradients)."""

    @staticmethod
    def forward(ctx, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, W0, b0, sk, sv, sg):
        state = InnerState((W0, b0), sk, sv, sg)
        out, new = ttt_linear_scan_fwd(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state)
        ctx.save_for_backward(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, W0, b0, sk, sv, sg)
        # the buffered tail is a slice of the inputs: return it as-is (non-differentiable copy
        # would break the graph), so only W, b come out of the Function
        return out, new.params[0], new.params[1]

    @staticmethod
    def backward(ctx, d_out, d_W, d_b):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        needs = [i for i, t in enumerate(inputs) if t.requires_grad]
        with torch.enable_grad():
            XQ, XK, XV, gate, eta, lnw, lnb, W0, b0, sk, sv, sg = inputs
            out, new, _ = dual_ttt("linear", XQ, XK, XV, gate, eta, lnw, lnb, InnerState((W0, b0), sk, sv, sg))
            outs, grads_out = [], []
            for o, go in ((out, d_out), (new.params[0], d_W), (new.params[1], d_b)):
                if go is not None and o.requires_grad:
                    outs.append(o)
                    grads_out.append(go)
            grads = [None] * len(inputs)
            if needs and outs:
                got = torch.autograd.grad(outs, [inputs[i] for i in needs], grads_out, allow_unused=True)
                for i, gr in zip(needs, got):
                    grads[i] = gr
        return tuple(grads)


def triton_ttt_linear(XQ: Tensor, XK: Tensor, XV: Tensor, gate: Tensor, token_eta: Tensor,
                      ln_weight: Tensor, ln_bias: Tensor, state: InnerState) -> tuple[Tensor, InnerState]:
    """TTT-Linear scan with the Triton forward; same contract as `dual_ttt_linear` (no stats).

    Args:
        XQ, XK, XV: `[B, H, T, d]` (d a power of two); gate: `[B, H, T]`;
        token_eta: `[m]` (m a power of two); ln_weight, ln_bias: `[H, d]`; state: `InnerState`.

    Returns:
        out `[B, H, T, d]` and the `InnerState` after the T tokens.
    """
    check_op_inputs("triton_ttt_linear", "linear", XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, 1)
    if not HAS_TRITON:
        raise ImportError("triton_ttt_linear: triton is not installed; use kernel='torch'")
    d, m = XQ.shape[-1], token_eta.numel()
    if not (_is_pow2(d) and _is_pow2(m)):
        raise ValueError(f"triton_ttt_linear: head_dim={d} and mini_batch_size={m} must be powers of two; "
                         "use kernel='torch' for other sizes")
    W0, b0 = state.params
    out, W, b = TritonTTTLinearFunction.apply(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias,
                                              W0, b0, state.k, state.v, state.gate)
    m_r = state.num_buffered + XQ.shape[2]
    tail = m_r - (m_r // m) * m
    K = torch.cat([state.k, XK], dim=2)
    V = torch.cat([state.v, XV], dim=2)
    g = torch.cat([state.gate, gate], dim=2)
    L = K.shape[2]
    return out, InnerState((W, b), K[:, :, L - tail:], V[:, :, L - tail:], g[:, :, L - tail:])


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when triton imports, else 'torch'; checks the value."""
    if kernel not in ("torch", "triton", "auto"):
        raise ValueError(f"kernel={kernel!r} must be 'torch', 'triton' or 'auto'")
    if kernel == "auto":
        return "triton" if (HAS_TRITON and device.type == "cuda") else "torch"
    return kernel
