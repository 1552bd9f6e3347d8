"""Triton kernels for the TTT-Linear mini-batch scan (forward and backward), beside the torch twin `dual.py`.

Reproduces the same values as `official_port.ops.dual.dual_ttt_linear` (test-time-training/ttt-lm-jax
`TTTLinearBase.process_mini_batch` scanned by `TTTBase.ttt`): one program per (batch, head) keeps the
inner `W [d, d]`, `b [d]` in registers in float32 and walks the mini-batches, so the whole scan is one
launch instead of several small kernels per mini-batch.

Per mini-batch j (rows i, columns s of the m x m block; e[i, s] = token_eta[i] * gate[s], s <= i):
    Z  = K W + b;   R = LN(Z) - (V - K);   G = J_LN(Z)^T R          (gradient of the inner loss)
    Zb = Q W + b - (e * tril(Q K^T + 1)) G                          (dual-form outputs)
    out = Q + LN(Zb);  if the mini-batch is complete:  W -= (e[m-1] * K)^T G,  b -= e[m-1] . G

Backward (`TritonTTTLinearFunction`): when gradients are needed the forward kernel also stores the
params entering every mini-batch (`n * d * (d + 1)` floats per (batch, head)). The backward kernel,
one program per (batch, head), walks the mini-batches in reverse carrying the adjoint of (W, b): per
mini-batch it rebuilds Z, G, Zb from the stored params and backpropagates through the output
LayerNorm, the dual-form product, the update (W' = W - (e K)^T G) and the LayerNorm VJP that defines
G (second-order terms included, as autograd through the twin has them). It writes the gradients of
Q, K, V and the gate per token, of token_eta / ln_weight / ln_bias per program (summed over the batch
in torch) and of the initial W, b; the buffered tokens of the initial state get theirs from the
first rows. Tested against autograd through `dual_ttt_linear` (tests/official_port/test_triton_ops.py).

Products use `input_precision="ieee"` (true float32): tf32, Triton's default on recent GPUs, would
round the inner updates and break parity with the torch twin (1e-5).

Limits: d and m must be powers of two (tl.arange), and `inner_steps == 1`, no stats, no remat; the
layer's dispatch falls back to the torch twin otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from official_port.ops.c_scan import c_compiler
from official_port.ops.dual import LN_EPS
from official_port.ops.state import InnerState, check_op_inputs
from ttt_common.triton_jit import jit_for_mode

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
    # Device functions shared by the four kernels (inlined by triton). Plain functions here: `_kernel`
    # jits them for the current TRITON_INTERPRET value with the kernel that calls them (ttt_common.triton_jit).

    def _head_constants(GAMMA, BETA, ETA, h, rd, rm, D: tl.constexpr, M: tl.constexpr):
        """Head h's LayerNorm gamma, beta [D], the token weights eta [M], eta[M-1] and the causal mask [M, M]."""
        gamma = tl.load(GAMMA + h * D + rd).to(tl.float32)
        beta = tl.load(BETA + h * D + rd).to(tl.float32)
        eta = tl.load(ETA + rm).to(tl.float32)  # [M] per-row token weights
        eta_last = tl.sum(tl.where(rm == M - 1, eta, 0.0), axis=0)
        causal = rm[:, None] >= rm[None, :]
        return gamma, beta, eta, eta_last, causal

    def _load_mini_batch(Q, K, V, G8, pid, T, j, rd, rm, D: tl.constexpr, M: tl.constexpr):
        """Mini-batch j of program pid: its [M, D] offsets, q, k, v [M, D], gate [M] and row indices, in float32."""
        rows = j * M + rm
        offs = pid * T * D + rows[:, None] * D + rd[None, :]
        q = tl.load(Q + offs).to(tl.float32)
        k = tl.load(K + offs).to(tl.float32)
        v = tl.load(V + offs).to(tl.float32)
        g = tl.load(G8 + pid * T + rows).to(tl.float32)
        return offs, rows, q, k, v, g

    def _ln_rows(z, eps, D: tl.constexpr):
        """LayerNorm core per row of z [M, D]: (z - mean, 1 / std [M], the normalised rows)."""
        zc = z - (tl.sum(z, axis=1) / D)[:, None]
        rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + eps)
        return zc, rstd, zc * rstd[:, None]

    def _ln_vjp_core(gx, xhat, D: tl.constexpr):
        """The LayerNorm VJP per row before its 1 / std factor, gx - mean(gx) - xhat mean(gx xhat), and
        mean(gx xhat) [M] (gx: the adjoint of the normalised rows xhat)."""
        c = tl.sum(gx * xhat, axis=1) / D
        return gx - (tl.sum(gx, axis=1) / D)[:, None] - xhat * c[:, None], c

    def _recon_grad(z, v, k, gamma, beta, eps, D: tl.constexpr):
        """G = J_LN(z)^T (LN(z) - (v - k)), the inner loss gradient at z [M, D], with the intermediates
        the backward kernels reuse: (G, zc, rstd, xhat, resid, gx, inner, c)."""
        zc, rstd, xhat = _ln_rows(z, eps, D)
        resid = gamma[None, :] * xhat + beta[None, :] - (v - k)
        gx = resid * gamma[None, :]
        inner, c = _ln_vjp_core(gx, xhat, D)
        return rstd[:, None] * inner, zc, rstd, xhat, resid, gx, inner, c

    def _recon_grad_vjp(dgrad, zc, rstd, xhat, resid, gx, inner, c, gamma, D: tl.constexpr):
        """Adjoint of `_recon_grad` (second order): from dG [M, D] to (dz, d resid, gamma's gradient [D])."""
        d_rstd = tl.sum(dgrad * inner, axis=1)
        dc = -rstd * tl.sum(dgrad * xhat, axis=1)
        dgx = rstd[:, None] * dgrad - (rstd * tl.sum(dgrad, axis=1) / D)[:, None] + (dc / D)[:, None] * xhat
        dxhat = -(rstd * c)[:, None] * dgrad + (dc / D)[:, None] * gx
        dres = dgx * gamma[None, :]
        dgam = tl.sum(dgx * resid + dres * xhat, axis=0)
        dxhat += dres * gamma[None, :]
        # xhat = LN core of z (rstd also enters G directly: d_rstd)
        d_rstd += tl.sum(dxhat * zc, axis=1)
        dzc = dxhat * rstd[:, None] - (d_rstd * rstd * rstd * rstd / D)[:, None] * zc
        return dzc - (tl.sum(dzc, axis=1) / D)[:, None], dres, dgam

    def _gelu_tanh(z):
        """tanh-approximate gelu with torch's constants: (t, gelu(z)), t = tanh(sqrt(2/pi) (z + 0.044715 z^3))
        written 2 sigmoid(2u) - 1 (no tanh in tl)."""
        k_beta = 0.7978845608028654  # sqrt(2 / pi)
        k_kappa = 0.044715
        t = 2.0 * tl.sigmoid(2.0 * k_beta * (z + k_kappa * z * z * z)) - 1.0
        return t, 0.5 * z * (1.0 + t)

    def _gelu_tanh_grad(z, t):
        """gelu'(z) of `_gelu_tanh` given its t."""
        # the constants as named locals, as in the kernels: the interpreter makes them float32 scalars, so
        # 3.0 * k_kappa rounds in float32 (a literal product would be folded in float64)
        k_beta = 0.7978845608028654
        k_kappa = 0.044715
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k_beta * (1.0 + 3.0 * k_kappa * z * z)

    def _out_ln_vjp(dout, zb, gamma, eps, D: tl.constexpr):
        """out = q + gamma LN(zb) + beta: (d zb [M, D], gamma's and beta's gradients [D]) from d out [M, D]."""
        _, rstd2, xhat2 = _ln_rows(zb, eps, D)
        dzb = rstd2[:, None] * _ln_vjp_core(dout * gamma[None, :], xhat2, D)[0]
        return dzb, tl.sum(dout * xhat2, axis=0), tl.sum(dout, axis=0)

    def _store_norm_grads(DGAMMA, DBETA, DETA, pid, rd, rm, dgam, dbet, deta, D: tl.constexpr, M: tl.constexpr):
        tl.store(DGAMMA + pid * D + rd, dgam)
        tl.store(DBETA + pid * D + rd, dbet)
        tl.store(DETA + pid * M + rm, deta)

    _DEVICE_FUNCTIONS = {f.__name__: f for f in (_head_constants, _load_mini_batch, _ln_rows, _ln_vjp_core,
                                                  _recon_grad, _recon_grad_vjp, _gelu_tanh, _gelu_tanh_grad,
                                                  _out_ln_vjp, _store_norm_grads)}

    def _ttt_linear_scan_fwd_kernel(
        Q, K, V, G8, ETA, GAMMA, BETA, W0, B0, OUT, WN, BN, WS, BS,
        H, n_blocks, n_full, eps,
        D: tl.constexpr, M: tl.constexpr, PREC: tl.constexpr, STORE: tl.constexpr,
    ):
        """One program per (b, h). Q/K/V/OUT: [BH, n*M, D]; G8 gate [BH, n*M]; W0/WN [BH, D, D]; B0/BN [BH, D].
        With STORE, the params entering every mini-batch go to WS [BH, n, D, D], BS [BH, n, D] (for backward)."""
        pid = tl.program_id(0)
        h = pid % H
        rd = tl.arange(0, D)
        rm = tl.arange(0, M)
        w = tl.load(W0 + pid * D * D + rd[:, None] * D + rd[None, :]).to(tl.float32)
        b = tl.load(B0 + pid * D + rd).to(tl.float32)
        gamma, beta, eta, eta_last, causal = _head_constants(GAMMA, BETA, ETA, h, rd, rm, D, M)
        T = n_blocks * M
        for j in range(n_blocks):
            offs, rows, q, k, v, g = _load_mini_batch(Q, K, V, G8, pid, T, j, rd, rm, D, M)
            if STORE:
                tl.store(WS + (pid * n_blocks + j) * D * D + rd[:, None] * D + rd[None, :], w)
                tl.store(BS + (pid * n_blocks + j) * D + rd, b)
            # inner loss gradient at the boundary params: G = J_LN(Z)^T (LN(Z) - (V - K))
            z = tl.dot(k, w, input_precision=PREC) + b[None, :]
            grad = _recon_grad(z, v, k, gamma, beta, eps, D)[0]
            # dual-form outputs: Q W + b - (e * tril(Q K^T + 1)) G
            e = tl.where(causal, eta[:, None] * g[None, :], 0.0)
            attn = e * (tl.dot(q, tl.trans(k), input_precision=PREC) + 1.0)
            zb = tl.dot(q, w, input_precision=PREC) + b[None, :] - tl.dot(attn, grad, input_precision=PREC)
            zbc, rstd2, _ = _ln_rows(zb, eps, D)
            out = q + gamma[None, :] * zbc * rstd2[:, None] + beta[None, :]
            tl.store(OUT + offs, out.to(OUT.dtype.element_ty))
            # update with the last row's weights (only a complete mini-batch updates the params)
            el = eta_last * g * (j < n_full).to(tl.float32)
            ek = k * el[:, None]
            w = w - tl.dot(tl.trans(ek), grad, input_precision=PREC)
            b = b - tl.sum(el[:, None] * grad, axis=0)
        tl.store(WN + pid * D * D + rd[:, None] * D + rd[None, :], w)
        tl.store(BN + pid * D + rd, b)


    def _ttt_linear_scan_bwd_kernel(
        Q, K, V, G8, ETA, GAMMA, BETA, WS, BS, DOUT, DWN, DBN,
        DQ, DK, DV, DG, DETA, DGAMMA, DBETA, DW0, DB0,
        H, n_blocks, n_full, eps,
        D: tl.constexpr, M: tl.constexpr, PREC: tl.constexpr,
    ):
        """One program per (b, h), mini-batches in reverse. Carries dW [D, D], db [D] (the adjoint of
        the params leaving the mini-batch, starting from DWN/DBN = the final state's); per mini-batch
        it rebuilds the forward from the saved entry params WS/BS and writes the token gradients
        DQ/DK/DV [BH, n*M, D], DG [BH, n*M]; per program DETA [BH, M], DGAMMA/DBETA [BH, D] (summed
        over b by the caller) and the initial params' DW0 [BH, D, D], DB0 [BH, D]."""
        pid = tl.program_id(0)
        h = pid % H
        rd = tl.arange(0, D)
        rm = tl.arange(0, M)
        dw = tl.load(DWN + pid * D * D + rd[:, None] * D + rd[None, :]).to(tl.float32)
        db = tl.load(DBN + pid * D + rd).to(tl.float32)
        gamma, beta, eta, eta_last, causal = _head_constants(GAMMA, BETA, ETA, h, rd, rm, D, M)
        dgam = tl.zeros([D], dtype=tl.float32)
        dbet = tl.zeros([D], dtype=tl.float32)
        deta = tl.zeros([M], dtype=tl.float32)
        T = n_blocks * M
        for jj in range(n_blocks):
            j = n_blocks - 1 - jj
            offs, rows, q, k, v, g = _load_mini_batch(Q, K, V, G8, pid, T, j, rd, rm, D, M)
            w = tl.load(WS + (pid * n_blocks + j) * D * D + rd[:, None] * D + rd[None, :])
            b = tl.load(BS + (pid * n_blocks + j) * D + rd)
            # ---- rebuild the forward of mini-batch j (as the forward kernel)
            z = tl.dot(k, w, input_precision=PREC) + b[None, :]
            grad, zc, rstd, xhat, resid, gx, inner, c_m = _recon_grad(z, v, k, gamma, beta, eps, D)
            e = tl.where(causal, eta[:, None] * g[None, :], 0.0)
            s1 = tl.dot(q, tl.trans(k), input_precision=PREC) + 1.0
            attn = e * s1
            zb = tl.dot(q, w, input_precision=PREC) + b[None, :] - tl.dot(attn, grad, input_precision=PREC)
            # ---- out = q + gamma * LN(zb) + beta
            dout = tl.load(DOUT + offs).to(tl.float32)
            dzb, dgam_o, dbet_o = _out_ln_vjp(dout, zb, gamma, eps, D)
            dgam += dgam_o
            dbet += dbet_o
            # ---- zb = q W + b - attn G,  attn = e * (q k^T + 1),  e[i, s] = eta[i] g[s] (s <= i)
            dq = dout + tl.dot(dzb, tl.trans(w), input_precision=PREC)
            dattn = -tl.dot(dzb, tl.trans(grad), input_precision=PREC)
            dgrad = -tl.dot(tl.trans(attn), dzb, input_precision=PREC)
            d_s = dattn * e
            de = tl.where(causal, dattn * s1, 0.0)
            dq += tl.dot(d_s, k, input_precision=PREC)
            dk = tl.dot(tl.trans(d_s), q, input_precision=PREC)
            deta += tl.sum(de * g[None, :], axis=1)
            dg = tl.sum(de * eta[:, None], axis=0)
            # ---- update W' = W - (el k)^T G, b' = b - el . G with el = eta_last * g (complete only)
            full = (j < n_full).to(tl.float32)
            el = eta_last * g * full
            d_ek = -tl.dot(grad, tl.trans(dw), input_precision=PREC)  # adjoint of el * k
            dgrad -= tl.dot(k * el[:, None], dw, input_precision=PREC) + el[:, None] * db[None, :]
            dk += el[:, None] * d_ek
            d_el = tl.sum(d_ek * k, axis=1) - tl.sum(grad * db[None, :], axis=1)
            dg += d_el * eta_last * full
            deta += tl.where(rm == M - 1, tl.sum(d_el * g, axis=0) * full, 0.0)
            dw += tl.dot(tl.trans(q), dzb, input_precision=PREC)
            db += tl.sum(dzb, axis=0)
            # ---- G = rstd * (gx - mean(gx) - xhat * mean(gx xhat)),  gx = gamma * resid
            dz, dres, dgam_g = _recon_grad_vjp(dgrad, zc, rstd, xhat, resid, gx, inner, c_m, gamma, D)
            dgam += dgam_g
            dbet += tl.sum(dres, axis=0)
            dv = -dres
            dk += dres
            # ---- z = k W + b
            dk += tl.dot(dz, tl.trans(w), input_precision=PREC)
            dw += tl.dot(tl.trans(k), dz, input_precision=PREC)
            db += tl.sum(dz, axis=0)
            tl.store(DQ + offs, dq)
            tl.store(DK + offs, dk)
            tl.store(DV + offs, dv)
            tl.store(DG + pid * T + rows, dg)
        tl.store(DW0 + pid * D * D + rd[:, None] * D + rd[None, :], dw)
        tl.store(DB0 + pid * D + rd, db)
        _store_norm_grads(DGAMMA, DBETA, DETA, pid, rd, rm, dgam, dbet, deta, D, M)


    def _ttt_mlp_scan_fwd_kernel(
        Q, K, V, G8, ETA, GAMMA, BETA, W1_0, B1_0, W2_0, B2_0, OUT, W1N, B1N, W2N, B2N, WS1, BS1, WS2, BS2,
        H, n_blocks, n_full, eps,
        D: tl.constexpr, F4: tl.constexpr, M: tl.constexpr, PREC: tl.constexpr, STORE: tl.constexpr,
    ):
        """TTT-MLP scan forward, one program per (b, h); the inner MLP x -> gelu(x W1 + b1) W2 + b2 with
        W1 [D, F4], W2 [F4, D] (F4 = 4 D) kept whole in registers in float32.

        Per mini-batch j (the twin is the "mlp" branch of `official_port.ops.dual.dual_ttt`):
            Z1 = K W1 + b1, X2 = gelu(Z1), Z2 = X2 W2 + b2; G2 = J_LN(Z2)^T (LN(Z2) - (V - K));
            G1 = (G2 W2^T) * gelu'(Z1)                                   (inner-loss gradients)
            Zb1 = Q W1 + b1 - (e * tril(Q K^T + 1)) G1;  Xb2 = gelu(Zb1)
            Zb = Xb2 W2 + b2 - (e * tril(Xb2 X2^T + 1)) G2;  out = Q + LN(Zb)
            complete mini-batch: W1 -= (el K)^T G1, b1 -= el . G1, W2 -= (el X2)^T G2, b2 -= el . G2
        with e[i, s] = token_eta[i] gate[s] (s <= i) and el = token_eta[m-1] gate. gelu is the tanh
        approximation with torch's constants; tanh(u) is written 2 sigmoid(2u) - 1 (no tanh in tl).
        With STORE, the params entering every mini-batch go to WS1/BS1/WS2/BS2 [BH, n, ...] (for backward).
        """
        pid = tl.program_id(0)
        h = pid % H
        rd = tl.arange(0, D)
        rf = tl.arange(0, F4)
        rm = tl.arange(0, M)
        w1 = tl.load(W1_0 + pid * D * F4 + rd[:, None] * F4 + rf[None, :]).to(tl.float32)
        b1 = tl.load(B1_0 + pid * F4 + rf).to(tl.float32)
        w2 = tl.load(W2_0 + pid * F4 * D + rf[:, None] * D + rd[None, :]).to(tl.float32)
        b2 = tl.load(B2_0 + pid * D + rd).to(tl.float32)
        gamma, beta, eta, eta_last, causal = _head_constants(GAMMA, BETA, ETA, h, rd, rm, D, M)
        T = n_blocks * M
        for j in range(n_blocks):
            offs, rows, q, k, v, g = _load_mini_batch(Q, K, V, G8, pid, T, j, rd, rm, D, M)
            if STORE:
                tl.store(WS1 + (pid * n_blocks + j) * D * F4 + rd[:, None] * F4 + rf[None, :], w1)
                tl.store(BS1 + (pid * n_blocks + j) * F4 + rf, b1)
                tl.store(WS2 + (pid * n_blocks + j) * F4 * D + rf[:, None] * D + rd[None, :], w2)
                tl.store(BS2 + (pid * n_blocks + j) * D + rd, b2)
            # inner forward on the keys and the gradients G2, G1 at the boundary params
            z1 = tl.dot(k, w1, input_precision=PREC) + b1[None, :]
            t1, x2 = _gelu_tanh(z1)
            z2 = tl.dot(x2, w2, input_precision=PREC) + b2[None, :]
            grad2 = _recon_grad(z2, v, k, gamma, beta, eps, D)[0]
            dgelu = _gelu_tanh_grad(z1, t1)
            grad1 = tl.dot(grad2, tl.trans(w2), input_precision=PREC) * dgelu
            # dual-form outputs, layer by layer
            e = tl.where(causal, eta[:, None] * g[None, :], 0.0)
            attn1 = e * (tl.dot(q, tl.trans(k), input_precision=PREC) + 1.0)
            zb1 = tl.dot(q, w1, input_precision=PREC) + b1[None, :] - tl.dot(attn1, grad1, input_precision=PREC)
            tb, xb2 = _gelu_tanh(zb1)
            attn2 = e * (tl.dot(xb2, tl.trans(x2), input_precision=PREC) + 1.0)
            zb = tl.dot(xb2, w2, input_precision=PREC) + b2[None, :] - tl.dot(attn2, grad2, input_precision=PREC)
            zbc, rstd2, _ = _ln_rows(zb, eps, D)
            out = q + gamma[None, :] * zbc * rstd2[:, None] + beta[None, :]
            tl.store(OUT + offs, out.to(OUT.dtype.element_ty))
            # update with the last row's weights (only a complete mini-batch updates the params)
            el = (eta_last * g * (j < n_full).to(tl.float32))[:, None]
            w1 = w1 - tl.dot(tl.trans(k * el), grad1, input_precision=PREC)
            b1 = b1 - tl.sum(el * grad1, axis=0)
            w2 = w2 - tl.dot(tl.trans(x2 * el), grad2, input_precision=PREC)
            b2 = b2 - tl.sum(el * grad2, axis=0)
        tl.store(W1N + pid * D * F4 + rd[:, None] * F4 + rf[None, :], w1)
        tl.store(B1N + pid * F4 + rf, b1)
        tl.store(W2N + pid * F4 * D + rf[:, None] * D + rd[None, :], w2)
        tl.store(B2N + pid * D + rd, b2)


    # long on purpose: one program's reverse sweep, the chain rule of the forward line by line (the pieces
    # it shares with the other kernels are the device functions above)
    def _ttt_mlp_scan_bwd_kernel(
        Q, K, V, G8, ETA, GAMMA, BETA, WS1, BS1, WS2, BS2, DOUT, DW1N, DB1N, DW2N, DB2N,
        DQ, DK, DV, DG, DETA, DGAMMA, DBETA, DW1, DB1, DW2, DB2,
        H, n_blocks, n_full, eps,
        D: tl.constexpr, F4: tl.constexpr, M: tl.constexpr, PREC: tl.constexpr,
    ):
        """TTT-MLP scan backward, one program per (b, h), mini-batches in reverse (the same scheme as
        the TTT-Linear backward): carries the adjoints of (W1, b1, W2, b2) leaving each mini-batch,
        rebuilds its forward from the stored entry params and backpropagates through every line of
        the forward (see `_ttt_mlp_scan_fwd_kernel`), gelu'' included (G1 holds gelu'(Z1))."""
        pid = tl.program_id(0)
        h = pid % H
        rd = tl.arange(0, D)
        rf = tl.arange(0, F4)
        rm = tl.arange(0, M)
        o1 = rd[:, None] * F4 + rf[None, :]  # [D, F4] offsets
        o2 = rf[:, None] * D + rd[None, :]  # [F4, D] offsets
        dw1 = tl.load(DW1N + pid * D * F4 + o1).to(tl.float32)
        db1 = tl.load(DB1N + pid * F4 + rf).to(tl.float32)
        dw2 = tl.load(DW2N + pid * F4 * D + o2).to(tl.float32)
        db2 = tl.load(DB2N + pid * D + rd).to(tl.float32)
        gamma, beta, eta, eta_last, causal = _head_constants(GAMMA, BETA, ETA, h, rd, rm, D, M)
        k_beta = 0.7978845608028654  # sqrt(2 / pi) and the cubic's weight, as in `_gelu_tanh`
        k_kappa = 0.044715
        dgam = tl.zeros([D], dtype=tl.float32)
        dbet = tl.zeros([D], dtype=tl.float32)
        deta = tl.zeros([M], dtype=tl.float32)
        T = n_blocks * M
        for jj in range(n_blocks):
            j = n_blocks - 1 - jj
            offs, rows, q, k, v, g = _load_mini_batch(Q, K, V, G8, pid, T, j, rd, rm, D, M)
            w1 = tl.load(WS1 + (pid * n_blocks + j) * D * F4 + o1)
            b1 = tl.load(BS1 + (pid * n_blocks + j) * F4 + rf)
            w2 = tl.load(WS2 + (pid * n_blocks + j) * F4 * D + o2)
            b2 = tl.load(BS2 + (pid * n_blocks + j) * D + rd)
            # ---- rebuild the forward of mini-batch j
            z1 = tl.dot(k, w1, input_precision=PREC) + b1[None, :]
            t1, x2 = _gelu_tanh(z1)
            u1 = k_beta * (1.0 + 3.0 * k_kappa * z1 * z1)  # d/dz of the tanh argument
            gp1 = 0.5 * (1.0 + t1) + 0.5 * z1 * (1.0 - t1 * t1) * u1  # gelu'(z1)
            z2 = tl.dot(x2, w2, input_precision=PREC) + b2[None, :]
            grad2, zc, rstd, xhat, resid, gx, inner, c_m = _recon_grad(z2, v, k, gamma, beta, eps, D)
            p1 = tl.dot(grad2, tl.trans(w2), input_precision=PREC)
            grad1 = p1 * gp1
            e = tl.where(causal, eta[:, None] * g[None, :], 0.0)
            s1 = tl.dot(q, tl.trans(k), input_precision=PREC) + 1.0
            attn1 = e * s1
            zb1 = tl.dot(q, w1, input_precision=PREC) + b1[None, :] - tl.dot(attn1, grad1, input_precision=PREC)
            tb, xb2 = _gelu_tanh(zb1)
            gpb = _gelu_tanh_grad(zb1, tb)
            s2 = tl.dot(xb2, tl.trans(x2), input_precision=PREC) + 1.0
            attn2 = e * s2
            zb = tl.dot(xb2, w2, input_precision=PREC) + b2[None, :] - tl.dot(attn2, grad2, input_precision=PREC)
            # ---- out = q + gamma * LN(zb) + beta
            dout = tl.load(DOUT + offs).to(tl.float32)
            dzb, dgam_o, dbet_o = _out_ln_vjp(dout, zb, gamma, eps, D)
            dgam += dgam_o
            dbet += dbet_o
            # ---- zb = xb2 W2 + b2 - (e * (xb2 x2^T + 1)) G2
            dxb2 = tl.dot(dzb, tl.trans(w2), input_precision=PREC)
            n_dw2 = tl.dot(tl.trans(xb2), dzb, input_precision=PREC)
            n_db2 = tl.sum(dzb, axis=0)
            da2 = -tl.dot(dzb, tl.trans(grad2), input_precision=PREC)
            dgrad2 = -tl.dot(tl.trans(attn2), dzb, input_precision=PREC)
            ds2 = da2 * e
            de = tl.where(causal, da2 * s2, 0.0)
            dxb2 += tl.dot(ds2, x2, input_precision=PREC)
            dx2 = tl.dot(tl.trans(ds2), xb2, input_precision=PREC)
            # ---- xb2 = gelu(zb1),  zb1 = q W1 + b1 - (e * (q k^T + 1)) G1
            dzb1 = dxb2 * gpb
            dq = dout + tl.dot(dzb1, tl.trans(w1), input_precision=PREC)
            n_dw1 = tl.dot(tl.trans(q), dzb1, input_precision=PREC)
            n_db1 = tl.sum(dzb1, axis=0)
            da1 = -tl.dot(dzb1, tl.trans(grad1), input_precision=PREC)
            dgrad1 = -tl.dot(tl.trans(attn1), dzb1, input_precision=PREC)
            ds1 = da1 * e
            de += tl.where(causal, da1 * s1, 0.0)
            dq += tl.dot(ds1, k, input_precision=PREC)
            dk = tl.dot(tl.trans(ds1), q, input_precision=PREC)
            deta += tl.sum(de * g[None, :], axis=1)
            dg = tl.sum(de * eta[:, None], axis=0)
            # ---- update: W1' = W1 - (el k)^T G1, b1' = b1 - el . G1, W2' = W2 - (el x2)^T G2, b2' likewise
            full = (j < n_full).to(tl.float32)
            el = eta_last * g * full
            d_ek = -tl.dot(grad1, tl.trans(dw1), input_precision=PREC)  # [M, D] adjoint of el * k
            d_ex = -tl.dot(grad2, tl.trans(dw2), input_precision=PREC)  # [M, F4] adjoint of el * x2
            dgrad1 -= tl.dot(k * el[:, None], dw1, input_precision=PREC) + el[:, None] * db1[None, :]
            dgrad2 -= tl.dot(x2 * el[:, None], dw2, input_precision=PREC) + el[:, None] * db2[None, :]
            dk += el[:, None] * d_ek
            dx2 += el[:, None] * d_ex
            d_el = (tl.sum(d_ek * k, axis=1) + tl.sum(d_ex * x2, axis=1)
                    - tl.sum(grad1 * db1[None, :], axis=1) - tl.sum(grad2 * db2[None, :], axis=1))
            dg += d_el * eta_last * full
            deta += tl.where(rm == M - 1, tl.sum(d_el * g, axis=0) * full, 0.0)
            dw1 += n_dw1
            db1 += n_db1
            dw2 += n_dw2
            db2 += n_db2
            # ---- G1 = (G2 W2^T) * gelu'(z1);  gelu''(z) = (1 - t^2) (u' + z (u''/2 - t u'^2))
            dp1 = dgrad1 * gp1
            gpp1 = (1.0 - t1 * t1) * (u1 + z1 * (3.0 * k_beta * k_kappa * z1 - t1 * u1 * u1))
            dz1 = dgrad1 * p1 * gpp1
            dgrad2 += tl.dot(dp1, w2, input_precision=PREC)
            dw2 += tl.dot(tl.trans(dp1), grad2, input_precision=PREC)
            # ---- G2 = rstd * (gx - mean(gx) - xhat * mean(gx xhat)),  gx = gamma * resid
            dz2, dres, dgam_g = _recon_grad_vjp(dgrad2, zc, rstd, xhat, resid, gx, inner, c_m, gamma, D)
            dgam += dgam_g
            dbet += tl.sum(dres, axis=0)
            dv = -dres
            dk += dres
            # ---- z2 = x2 W2 + b2,  x2 = gelu(z1),  z1 = k W1 + b1
            dx2 += tl.dot(dz2, tl.trans(w2), input_precision=PREC)
            dw2 += tl.dot(tl.trans(x2), dz2, input_precision=PREC)
            db2 += tl.sum(dz2, axis=0)
            dz1 += dx2 * gp1
            dk += tl.dot(dz1, tl.trans(w1), input_precision=PREC)
            dw1 += tl.dot(tl.trans(k), dz1, input_precision=PREC)
            db1 += tl.sum(dz1, axis=0)
            tl.store(DQ + offs, dq)
            tl.store(DK + offs, dk)
            tl.store(DV + offs, dv)
            tl.store(DG + pid * T + rows, dg)
        tl.store(DW1 + pid * D * F4 + o1, dw1)
        tl.store(DB1 + pid * F4 + rf, db1)
        tl.store(DW2 + pid * F4 * D + o2, dw2)
        tl.store(DB2 + pid * D + rd, db2)
        _store_norm_grads(DGAMMA, DBETA, DETA, pid, rd, rm, dgam, dbet, deta, D, M)


def _kernel(fn):
    """`fn` jitted for the current TRITON_INTERPRET value, with the device functions it calls."""
    return jit_for_mode(fn, _DEVICE_FUNCTIONS)


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


def _flat_inputs(XQ, XK, XV, gate, state: InnerState, m: int):
    """The kernels' float32 `[BH, n*m, ...]` layout of the padded sequence (see `_prepare`)."""
    B, H, T, d = XQ.shape
    Q, Kp, Vp, gp, K, V, g, n, n_full = _prepare(XQ, XK, XV, gate, state, m)
    f32 = torch.float32
    Qc, Kc, Vc = (x.reshape(B * H, n * m, d).to(f32).contiguous() for x in (Q, Kp, Vp))
    gc = gp.reshape(B * H, n * m).to(f32).contiguous()
    return Qc, Kc, Vc, gc, K, V, g, n, n_full


def _per_head(token_eta, ln_weight, ln_bias):
    return tuple(t.to(torch.float32).contiguous() for t in (token_eta, ln_weight, ln_bias))


def ttt_linear_scan_fwd(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state: InnerState,
                        save_params: bool = False):
    """Run the Triton forward (no autograd).

    Returns:
        `(out [B, H, T, d], new InnerState, saved)`; with `save_params`, saved = the float32 params
        entering every mini-batch `(W [BH, n, d, d], b [BH, n, d])` for `ttt_linear_scan_bwd`, else None.
    """
    B, H, T, d = XQ.shape
    m = token_eta.numel()
    r = state.num_buffered
    Qc, Kc, Vc, gc, K, V, g, n, n_full = _flat_inputs(XQ, XK, XV, gate, state, m)
    BH = B * H
    W0 = state.params[0].reshape(BH, d, d).to(torch.float32).contiguous()
    b0 = state.params[1].reshape(BH, d).to(torch.float32).contiguous()
    out = torch.empty_like(Qc)
    Wn, bn = torch.empty_like(W0), torch.empty_like(b0)
    saved = None
    if save_params:
        saved = (W0.new_empty(BH, n, d, d), W0.new_empty(BH, n, d))
    if n > 0:
        ws, bs = saved if save_params else (Wn, bn)  # unused pointers when not saving
        _kernel(_ttt_linear_scan_fwd_kernel)[(BH,)](
            Qc, Kc, Vc, gc, *_per_head(token_eta, ln_weight, ln_bias), W0, b0, out, Wn, bn, ws, bs,
            H, n, n_full, LN_EPS, D=d, M=m, PREC="ieee", STORE=save_params)
    else:
        Wn, bn = W0.clone(), b0.clone()
    out = out.reshape(B, H, n * m, d)[:, :, r:r + T].to(XQ.dtype)
    tail = slice(n_full * m, r + T)
    params = (Wn.reshape(B, H, d, d).to(XQ.dtype), bn.reshape(B, H, 1, d).to(XQ.dtype))
    return out, InnerState(params, K[:, :, tail], V[:, :, tail], g[:, :, tail]), saved


def ttt_linear_scan_bwd(d_out, d_W, d_b, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state: InnerState, saved):
    """Gradients of the scan by the Triton backward kernel (mini-batches in reverse).

    Args:
        d_out: `[B, H, T, d]`; d_W `[B, H, d, d]`, d_b `[B, H, 1, d]`: adjoints of the final params
            (None = zero). The inputs and `saved` as given to / returned by `ttt_linear_scan_fwd`.

    Returns:
        float32 gradients of (XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, W0, b0, state.k,
        state.v, state.gate), shaped like them.
    """
    B, H, T, d = XQ.shape
    m = token_eta.numel()
    r = state.num_buffered
    BH = B * H
    L = r + T
    Qc, Kc, Vc, gc, _, _, _, n, n_full = _flat_inputs(XQ, XK, XV, gate, state, m)
    f32 = torch.float32
    dO = F.pad(d_out.to(f32), (0, 0, r, n * m - L)).reshape(BH, n * m, d).contiguous()
    dWn = (torch.zeros(BH, d, d, dtype=f32, device=XQ.device) if d_W is None
           else d_W.reshape(BH, d, d).to(f32).contiguous())
    dbn = torch.zeros(BH, d, dtype=f32, device=XQ.device) if d_b is None else d_b.reshape(BH, d).to(f32).contiguous()
    dQ, dK, dV = (torch.empty_like(Qc) for _ in range(3))
    dG = torch.empty_like(gc)
    dEta, dGam, dBet = Qc.new_empty(BH, m), Qc.new_empty(BH, d), Qc.new_empty(BH, d)
    dW0, db0 = torch.empty_like(dWn), torch.empty_like(dbn)
    if n > 0:
        _kernel(_ttt_linear_scan_bwd_kernel)[(BH,)](
            Qc, Kc, Vc, gc, *_per_head(token_eta, ln_weight, ln_bias), saved[0], saved[1], dO, dWn, dbn,
            dQ, dK, dV, dG, dEta, dGam, dBet, dW0, db0, H, n, n_full, LN_EPS, D=d, M=m, PREC="ieee")
    else:
        dQ.zero_(), dK.zero_(), dV.zero_(), dG.zero_(), dEta.zero_(), dGam.zero_(), dBet.zero_()
        dW0, db0 = dWn, dbn
    dK, dV = (x.reshape(B, H, n * m, d)[:, :, :L] for x in (dK, dV))
    dG = dG.reshape(B, H, n * m)[:, :, :L]
    return (dQ.reshape(B, H, n * m, d)[:, :, r:L], dK[:, :, r:], dV[:, :, r:], dG[:, :, r:],
            dEta.sum(0), dGam.reshape(B, H, d).sum(0), dBet.reshape(B, H, d).sum(0),
            dW0.reshape(B, H, d, d), db0.reshape(B, H, 1, d), dK[:, :, :r], dV[:, :, :r], dG[:, :, :r])


class TritonTTTLinearFunction(torch.autograd.Function):
    """Triton forward (saving the params entering every mini-batch) and Triton backward.

    Memory: the saved params are `n * d * (d + 1)` floats per (batch, head), n = mini-batches
    (for d = 64, m = 16: 4x the size of one `[T, d]` input); nothing else is kept beyond the inputs.
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, W0, b0, sk, sv, sg):
        state = InnerState((W0, b0), sk, sv, sg)
        need = any(ctx.needs_input_grad)
        out, new, saved = ttt_linear_scan_fwd(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, need)
        if need:
            ctx.save_for_backward(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, W0, b0, sk, sv, sg, *saved)
        # the buffered tail is a slice of the inputs: return it as-is (non-differentiable copy
        # would break the graph), so only W, b come out of the Function
        return out, new.params[0], new.params[1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_W, d_b):
        XQ, XK, XV, gate, eta, lnw, lnb, W0, b0, sk, sv, sg, ws, bs = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(XQ)
        grads = ttt_linear_scan_bwd(d_out, d_W, d_b, XQ, XK, XV, gate, eta, lnw, lnb,
                                    InnerState((W0, b0), sk, sv, sg), (ws, bs))
        inputs = (XQ, XK, XV, gate, eta, lnw, lnb, W0, b0, sk, sv, sg)
        return tuple(g.to(x.dtype) if need else None for g, x, need in zip(grads, inputs, ctx.needs_input_grad))


def ttt_mlp_scan_fwd(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state: InnerState,
                     save_params: bool = False):
    """Run the Triton TTT-MLP forward (no autograd).

    Returns:
        `(out [B, H, T, d], new InnerState, saved)`; with `save_params`, saved = the float32 params
        entering every mini-batch (W1 [BH, n, d, 4d], b1 [BH, n, 1, 4d], W2 [BH, n, 4d, d], b2 [BH, n, 1, d])
        for `ttt_mlp_scan_bwd`, else None.
    """
    B, H, T, d = XQ.shape
    m = token_eta.numel()
    r = state.num_buffered
    Qc, Kc, Vc, gc, K, V, g, n, n_full = _flat_inputs(XQ, XK, XV, gate, state, m)
    BH, f = B * H, state.params[0].shape[-1]
    p0 = [p.reshape(BH, *p.shape[2:]).to(torch.float32).contiguous() for p in state.params]
    out = torch.empty_like(Qc)
    pn = [torch.empty_like(p) for p in p0]
    saved = None
    if save_params:
        saved = tuple(p.new_empty(BH, n, *p.shape[1:]) for p in p0)
    if n > 0:
        _kernel(_ttt_mlp_scan_fwd_kernel)[(BH,)](
            Qc, Kc, Vc, gc, *_per_head(token_eta, ln_weight, ln_bias), *p0, out, *pn, *(saved or pn),
            H, n, n_full, LN_EPS, D=d, F4=f, M=m, PREC="ieee", STORE=save_params)
    else:
        pn = [p.clone() for p in p0]
    out = out.reshape(B, H, n * m, d)[:, :, r:r + T].to(XQ.dtype)
    tail = slice(n_full * m, r + T)
    params = tuple(p.reshape(B, H, *p.shape[1:]).to(XQ.dtype) for p in pn)
    return out, InnerState(params, K[:, :, tail], V[:, :, tail], g[:, :, tail]), saved


def ttt_mlp_scan_bwd(d_out, d_params, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state: InnerState, saved):
    """Gradients of the TTT-MLP scan by the Triton backward kernel (mini-batches in reverse).

    Args:
        d_out: `[B, H, T, d]`; d_params: adjoints of the final (W1, b1, W2, b2). The inputs and
            `saved` as given to / returned by `ttt_mlp_scan_fwd`.

    Returns:
        float32 gradients of (XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, W1, b1, W2, b2,
        state.k, state.v, state.gate), shaped like them.
    """
    B, H, T, d = XQ.shape
    m = token_eta.numel()
    r = state.num_buffered
    BH = B * H
    L = r + T
    Qc, Kc, Vc, gc, _, _, _, n, n_full = _flat_inputs(XQ, XK, XV, gate, state, m)
    f32 = torch.float32
    dO = F.pad(d_out.to(f32), (0, 0, r, n * m - L)).reshape(BH, n * m, d).contiguous()
    dpn = [dp.reshape(BH, *p.shape[2:]).to(f32).contiguous() for dp, p in zip(d_params, state.params)]
    dQ, dK, dV = (torch.empty_like(Qc) for _ in range(3))
    dG = torch.empty_like(gc)
    dEta, dGam, dBet = Qc.new_empty(BH, m), Qc.new_empty(BH, d), Qc.new_empty(BH, d)
    dp0 = [torch.empty_like(x) for x in dpn]
    if n > 0:
        _kernel(_ttt_mlp_scan_bwd_kernel)[(BH,)](
            Qc, Kc, Vc, gc, *_per_head(token_eta, ln_weight, ln_bias), *saved, dO, *dpn,
            dQ, dK, dV, dG, dEta, dGam, dBet, *dp0, H, n, n_full, LN_EPS,
            D=d, F4=state.params[0].shape[-1], M=m, PREC="ieee")
    else:
        for x in (dQ, dK, dV, dG, dEta, dGam, dBet):
            x.zero_()
        dp0 = dpn
    dK, dV = (x.reshape(B, H, n * m, d)[:, :, :L] for x in (dK, dV))
    dG = dG.reshape(B, H, n * m)[:, :, :L]
    return (dQ.reshape(B, H, n * m, d)[:, :, r:L], dK[:, :, r:], dV[:, :, r:], dG[:, :, r:],
            dEta.sum(0), dGam.reshape(B, H, d).sum(0), dBet.reshape(B, H, d).sum(0),
            *(x.reshape(p.shape) for x, p in zip(dp0, state.params)), dK[:, :, :r], dV[:, :, :r], dG[:, :, :r])


class TritonTTTMLPFunction(torch.autograd.Function):
    """Triton TTT-MLP forward (saving the params entering every mini-batch) and Triton backward.

    Memory: the saved params are `n * (8 d^2 + 5 d)` floats per (batch, head), n = mini-batches (for
    d = 64, m = 16: 32x the size of one `[T, d]` input). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, W1, b1, W2, b2, sk, sv, sg):
        need = any(ctx.needs_input_grad)
        out, new, saved = ttt_mlp_scan_fwd(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias,
                                           InnerState((W1, b1, W2, b2), sk, sv, sg), need)
        if need:
            ctx.save_for_backward(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, W1, b1, W2, b2, sk, sv, sg,
                                  *saved)
        return (out, *new.params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, *d_params):
        t = ctx.saved_tensors
        inputs, saved = t[:14], t[14:]
        XQ, XK, XV, gate, eta, lnw, lnb, W1, b1, W2, b2, sk, sv, sg = inputs
        grads = ttt_mlp_scan_bwd(d_out, d_params, XQ, XK, XV, gate, eta, lnw, lnb,
                                 InnerState((W1, b1, W2, b2), sk, sv, sg), saved)
        return tuple(g.to(x.dtype) if need else None for g, x, need in zip(grads, inputs, ctx.needs_input_grad))


def triton_ttt(kind: str, XQ: Tensor, XK: Tensor, XV: Tensor, gate: Tensor, token_eta: Tensor,
               ln_weight: Tensor, ln_bias: Tensor, state: InnerState) -> tuple[Tensor, InnerState]:
    """TTT scan with the Triton kernels; same contract as `dual_ttt(kind, ...)` without its options.

    Forward and backward are Triton kernels for both kinds ("linear", "mlp").

    Args:
        XQ, XK, XV: `[B, H, T, d]` (d a power of two); gate: `[B, H, T]`;
        token_eta: `[m]` (m a power of two); ln_weight, ln_bias: `[H, d]`; state: `InnerState`.

    Returns:
        out `[B, H, T, d]` and the `InnerState` after the T tokens.
    """
    name = f"triton_ttt_{kind}"
    check_op_inputs(name, kind, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, 1)
    if not HAS_TRITON:
        raise ImportError(f"{name}: triton is not installed; use kernel='torch'")
    d, m = XQ.shape[-1], token_eta.numel()
    if not (_is_pow2(d) and _is_pow2(m)):
        raise ValueError(f"{name}: head_dim={d} and mini_batch_size={m} must be powers of two; "
                         "use kernel='torch' for other sizes")
    fn = TritonTTTLinearFunction if kind == "linear" else TritonTTTMLPFunction
    out, *params = fn.apply(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, *state.params,
                            state.k, state.v, state.gate)
    # the buffered tail is a slice of the inputs, taken here so that autograd sees it as one
    m_r = state.num_buffered + XQ.shape[2]
    tail = m_r - (m_r // m) * m
    K = torch.cat([state.k, XK], dim=2)
    V = torch.cat([state.v, XV], dim=2)
    g = torch.cat([state.gate, gate], dim=2)
    L = K.shape[2]
    return out, InnerState(tuple(params), K[:, :, L - tail:], V[:, :, L - tail:], g[:, :, L - tail:])


def triton_ttt_linear(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state):
    """`triton_ttt("linear", ...)`: TTT-Linear."""
    return triton_ttt("linear", XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state)


def triton_ttt_mlp(XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state):
    """`triton_ttt("mlp", ...)`: TTT-MLP."""
    return triton_ttt("mlp", XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state)


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when triton imports, 'c' on CPU when a C compiler is found
    (`official_port.ops.c_scan`), else 'torch'; checks the value."""
    if kernel not in ("torch", "triton", "c", "auto"):
        raise ValueError(f"kernel={kernel!r} must be 'torch', 'triton', 'c' or 'auto'")
    if kernel == "auto":
        if device.type == "cuda":
            return "triton" if HAS_TRITON else "torch"
        return "c" if (device.type == "cpu" and c_compiler() is not None) else "torch"
    return kernel
