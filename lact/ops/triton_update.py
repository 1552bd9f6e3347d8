"""Triton kernels for one LaCT chunk step, beside their torch twin `lact.ops.step.chunk_step`.

Two kernels, both one program per (batch x head row, block):

* `_swiglu_apply_kernel` (program = row x block of tokens): ``o = w1 (silu(w0 x) * (w2 x))``,
  looping over the hidden width d_h in blocks so the ``[d_h, l]`` hidden activations never reach
  memory (twin: `lact.ops.step.apply_fast_weights`; a stack of r MLPs launches it once per MLP).
* `_grad_momentum_update_kernel` (program = row x block of d_h hidden units): the chunk's inner
  ascent direction of a single MLP (twin: `lact.ops.step.inner_gradients` with r = 1), plus
  momentum (``dw + mean_chunk(momentum) * dw_prev``), plus, for the post-norm update without Muon,
  ``w + dw`` with the row renormalisation of w0 and w2. A program owns d_h rows of w0/w2 (whole
  rows, so their renormalisation is fused) and the matching d_h columns of w1; w1's rows span every
  program, so its renormalisation is one small torch op after the kernel. Muon (bfloat16
  Newton-Schulz) and the pre-norm main weights stay in torch, fed by the kernel's ``dw``.

Which parts run where (`triton_chunk_step`): the apply runs in Triton for every MLP of a stack; the
gradient + momentum + update runs in Triton for r = 1 (a stack of r > 1 MLPs updates in torch,
its inner gradient flowing between MLPs).

Gradients: the kernels are forward-only. Without a graph (the graph-free forward sweep of
`lact.ops.manual_backprop`, inference) `triton_chunk_step` launches them directly; when a graph is
needed it wraps them in `_TritonChunkStep`, whose backward rebuilds the step with the torch twin
under autograd and takes its vector-Jacobian product (the same VJP the manual-backprop path takes).
So "triton" speeds up forward work; backward costs what the torch step's recomputation costs.

Dtypes: operands keep their dtype in the matmuls (float32 runs IEEE, not TF32, to match torch),
accumulation and the elementwise chain are float32, results are stored in the weights' dtype. Under
autocast the torch twin runs instead (see `lact.ops.chunk_loop`). Correctness is tested in
Triton's interpreter (float32, tests/lact/test_triton_update.py); bfloat16 only on a GPU
(scripts/gpu_check.sh runs the gpu-marked tests), because the interpreter's bfloat16 is wrong.
"""

from __future__ import annotations

import dataclasses

import torch

from lact.ops.step import RENORM_EPS, LaCTOptions, chunk_step, update_state
from ttt_common.triton_jit import jit_for_mode

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # optional dependency: the torch twin is always available
    triton = tl = None
    HAS_TRITON = False

MIN_BLOCK = 16  # tl.dot needs every block dim >= 16
BLOCK_L = 32  # tokens per program (apply) / per loop step (update)
BLOCK_H = 32  # hidden rows per loop step (apply) / per program (update)


def _block(d: int, cap: int | None = None) -> int:
    b = max(MIN_BLOCK, triton.next_power_of_2(d))
    return b if cap is None else min(b, cap)


def _precision(dtype: torch.dtype) -> str:
    # torch's default float32 matmul is IEEE; match it (Triton's default would be TF32 on a GPU)
    return "ieee" if dtype == torch.float32 else "tf32"


if HAS_TRITON:

    def _swiglu_apply_kernel(
        x_ptr, w0_ptr, w1_ptr, w2_ptr, o_ptr,
        L, D_IN, D_H, D_OUT,
        sx_n, sx_d, sx_l,
        sw0_n, sw0_h, sw0_d,
        sw1_n, sw1_o, sw1_h,
        so_n, so_d, so_l,
        RESIDUAL: tl.constexpr, PRECISION: tl.constexpr,
        BD_IN: tl.constexpr, BD_OUT: tl.constexpr, BH: tl.constexpr, BL: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_l = tl.program_id(1)
        offs_l = pid_l * BL + tl.arange(0, BL)
        offs_i = tl.arange(0, BD_IN)
        offs_o = tl.arange(0, BD_OUT)
        m_l = offs_l < L
        m_i = offs_i < D_IN
        m_o = offs_o < D_OUT
        x = tl.load(x_ptr + pid_n * sx_n + offs_i[:, None] * sx_d + offs_l[None, :] * sx_l,
                    mask=m_i[:, None] & m_l[None, :], other=0.0)
        acc = tl.zeros([BD_OUT, BL], dtype=tl.float32)
        for h0 in range(0, D_H, BH):
            offs_h = h0 + tl.arange(0, BH)
            m_h = offs_h < D_H
            w_off = pid_n * sw0_n + offs_h[:, None] * sw0_h + offs_i[None, :] * sw0_d
            w_mask = m_h[:, None] & m_i[None, :]
            w0 = tl.load(w0_ptr + w_off, mask=w_mask, other=0.0)
            w2 = tl.load(w2_ptr + w_off, mask=w_mask, other=0.0)
            g = tl.dot(w0, x, input_precision=PRECISION)  # [BH, BL] gate before the activation
            hh = tl.dot(w2, x, input_precision=PRECISION)  # [BH, BL]
            a = g * tl.sigmoid(g) * hh
            w1 = tl.load(w1_ptr + pid_n * sw1_n + offs_o[:, None] * sw1_o + offs_h[None, :] * sw1_h,
                         mask=m_o[:, None] & m_h[None, :], other=0.0)
            acc += tl.dot(w1, a.to(w1.dtype), input_precision=PRECISION)
        if RESIDUAL:  # needs D_IN == D_OUT (checked by the op's validation), so x's block is o's block
            acc += x.to(tl.float32)
        tl.store(o_ptr + pid_n * so_n + offs_o[:, None] * so_d + offs_l[None, :] * so_l,
                 acc.to(o_ptr.dtype.element_ty), mask=m_o[:, None] & m_l[None, :])

    # long on purpose: one fused Triton program (gradients, momentum, update); its argument list alone is
    # a third of it, and splitting would add device-function plumbing for one caller
    def _grad_momentum_update_kernel(
        k_ptr, v_ptr, lr0_ptr, lr1_ptr, lr2_ptr, mi_ptr,
        w0_ptr, w1_ptr, w2_ptr, m0_ptr, m1_ptr, m2_ptr, n0_ptr, n2_ptr,
        dw0_ptr, dw1_ptr, dw2_ptr, nw0_ptr, nw1_ptr, nw2_ptr,
        L, D_IN, D_H, D_OUT,
        sk_n, sk_l, sk_d,
        sv_n, sv_d, sv_l,
        slr_n, slr_l,
        sw0_n, sw0_h, sw0_d,
        sw1_n, sw1_o, sw1_h,
        EPS,
        HAS_MOM: tl.constexpr, FUSE_UPDATE: tl.constexpr, PRECISION: tl.constexpr,
        BD_IN: tl.constexpr, BD_OUT: tl.constexpr, BH: tl.constexpr, BL: tl.constexpr,
    ):
        # Contiguous [n, ...] buffers share the weights' strides: w0/w2/m0/m2/dw0/dw2/nw0/nw2 use
        # sw0_*, w1/m1/dw1/nw1 use sw1_* (the launcher makes them contiguous).
        pid_n = tl.program_id(0)
        pid_h = tl.program_id(1)
        offs_h = pid_h * BH + tl.arange(0, BH)
        offs_i = tl.arange(0, BD_IN)
        offs_o = tl.arange(0, BD_OUT)
        m_h = offs_h < D_H
        m_i = offs_i < D_IN
        m_o = offs_o < D_OUT
        off0 = pid_n * sw0_n + offs_h[:, None] * sw0_h + offs_i[None, :] * sw0_d  # [BH, BD_IN]
        mask0 = m_h[:, None] & m_i[None, :]
        off1 = pid_n * sw1_n + offs_o[:, None] * sw1_o + offs_h[None, :] * sw1_h  # [BD_OUT, BH]
        mask1 = m_o[:, None] & m_h[None, :]
        w0 = tl.load(w0_ptr + off0, mask=mask0, other=0.0)
        w2 = tl.load(w2_ptr + off0, mask=mask0, other=0.0)
        w1 = tl.load(w1_ptr + off1, mask=mask1, other=0.0)
        w1t = tl.trans(w1)  # [BH, BD_OUT]
        dw0 = tl.zeros([BH, BD_IN], dtype=tl.float32)
        dw2 = tl.zeros([BH, BD_IN], dtype=tl.float32)
        dw1 = tl.zeros([BD_OUT, BH], dtype=tl.float32)
        for l0 in range(0, L, BL):
            offs_l = l0 + tl.arange(0, BL)
            m_l = offs_l < L
            # padded tokens load k = v = lr = 0, so they add nothing to any gradient
            kt = tl.load(k_ptr + pid_n * sk_n + offs_i[:, None] * sk_d + offs_l[None, :] * sk_l,
                         mask=m_i[:, None] & m_l[None, :], other=0.0)  # [BD_IN, BL]
            v = tl.load(v_ptr + pid_n * sv_n + offs_o[:, None] * sv_d + offs_l[None, :] * sv_l,
                        mask=m_o[:, None] & m_l[None, :], other=0.0)  # [BD_OUT, BL]
            lr_off = pid_n * slr_n + offs_l * slr_l
            lr0 = tl.load(lr0_ptr + lr_off, mask=m_l, other=0.0).to(tl.float32)
            lr1 = tl.load(lr1_ptr + lr_off, mask=m_l, other=0.0).to(tl.float32)
            lr2 = tl.load(lr2_ptr + lr_off, mask=m_l, other=0.0).to(tl.float32)
            g = tl.dot(w0, kt, input_precision=PRECISION)  # [BH, BL]
            hh = tl.dot(w2, kt, input_precision=PRECISION)
            sig = tl.sigmoid(g)
            silu = g * sig
            hidden = silu * hh
            dhidden = tl.dot(w1t, v, input_precision=PRECISION)  # [BH, BL]
            dhh = dhidden * silu
            dg = dhidden * hh * sig * (1.0 + g * (1.0 - sig))  # silu_backprop
            # the outer products run in the input dtype (as the twin's `.type_as`), accumulating in fp32
            dt = kt.dtype
            ktf = kt.to(tl.float32)
            dw1 += tl.dot(v, tl.trans((hidden * lr1[None, :]).to(dt)), input_precision=PRECISION)
            dw0 += tl.dot(dg.to(dt), tl.trans((ktf * lr0[None, :]).to(dt)), input_precision=PRECISION)
            dw2 += tl.dot(dhh.to(dt), tl.trans((ktf * lr2[None, :]).to(dt)), input_precision=PRECISION)
        if HAS_MOM:
            mi = tl.load(mi_ptr + pid_n).to(tl.float32)
            dw0 += mi * tl.load(m0_ptr + off0, mask=mask0, other=0.0).to(tl.float32)
            dw2 += mi * tl.load(m2_ptr + off0, mask=mask0, other=0.0).to(tl.float32)
            dw1 += mi * tl.load(m1_ptr + off1, mask=mask1, other=0.0).to(tl.float32)
        tl.store(dw0_ptr + off0, dw0.to(dw0_ptr.dtype.element_ty), mask=mask0)
        tl.store(dw2_ptr + off0, dw2.to(dw2_ptr.dtype.element_ty), mask=mask0)
        tl.store(dw1_ptr + off1, dw1.to(dw1_ptr.dtype.element_ty), mask=mask1)
        if FUSE_UPDATE:
            # post-norm: w <- (w + dw) / (|row| + eps) * |row of the initial w|; w1's rows are not
            # whole here, so w1 + dw1 is stored unnormalised and renormalised by the launcher.
            # dw is rounded to its stored dtype first, as the twin adds the stored dw.
            t0 = tl.load(n0_ptr + pid_n * D_H + offs_h, mask=m_h, other=0.0).to(tl.float32)
            t2 = tl.load(n2_ptr + pid_n * D_H + offs_h, mask=m_h, other=0.0).to(tl.float32)
            new0 = w0.to(tl.float32) + dw0.to(dw0_ptr.dtype.element_ty).to(tl.float32)
            new2 = w2.to(tl.float32) + dw2.to(dw2_ptr.dtype.element_ty).to(tl.float32)
            new0 = new0 / (tl.sqrt(tl.sum(new0 * new0, axis=1)) + EPS)[:, None] * t0[:, None]
            new2 = new2 / (tl.sqrt(tl.sum(new2 * new2, axis=1)) + EPS)[:, None] * t2[:, None]
            new1 = w1.to(tl.float32) + dw1.to(dw1_ptr.dtype.element_ty).to(tl.float32)
            tl.store(nw0_ptr + off0, new0.to(nw0_ptr.dtype.element_ty), mask=mask0)
            tl.store(nw2_ptr + off0, new2.to(nw2_ptr.dtype.element_ty), mask=mask0)
            tl.store(nw1_ptr + off1, new1.to(nw1_ptr.dtype.element_ty), mask=mask1)


# --------------------------------------------------------------------------------------------
# launchers (no autograd)
# --------------------------------------------------------------------------------------------


def swiglu_apply(weights, x: torch.Tensor, residual: bool) -> torch.Tensor:
    """Triton twin of `lact.ops.step.apply_fast_weights`: x ``[n, d_in, l]`` -> ``[n, d_out, l]``."""
    for w0, w1, w2 in weights:
        n, d_h, d_in = w0.shape
        d_out = w1.shape[1]
        L = x.shape[2]
        o = torch.empty(n, d_out, L, device=x.device, dtype=w1.dtype)
        grid = (n, triton.cdiv(L, BLOCK_L))
        jit_for_mode(_swiglu_apply_kernel)[grid](
            x, w0, w1, w2, o, L, d_in, d_h, d_out,
            *x.stride(), *w0.stride(), *w1.stride(), *o.stride(),
            RESIDUAL=residual, PRECISION=_precision(w0.dtype),
            BD_IN=_block(d_in), BD_OUT=_block(d_out), BH=_block(d_h, BLOCK_H), BL=BLOCK_L,
        )
        x = o
    return x


def grad_momentum_update(level: list[torch.Tensor], norms, ki, vi, lr0i, lr1i, lr2i, mi, opts: LaCTOptions):
    """Triton twin of `inner_gradients` + `update_state` for ONE MLP (r = 1).

    Args:
        level: the MLP's state [w0, w1, w2] (+ [m0, m1, m2] with momentum) (+ pre-norm mains).
        norms: the renormalisation targets [n0 [n, d_h, 1], n1 [n, d_out, 1], n2 [n, d_h, 1]].
        ki ``[n, l, d_in]``, vi ``[n, d_out, l]``, lr*i ``[n, l, 1]``, mi ``[n, 1, 1]`` or None.

    Returns:
        the new state of the level, laid out as `update_state` lays it out.
    """
    w0, w1, w2 = (w.contiguous() for w in level[:3])
    n, d_h, d_in = w0.shape
    d_out = w1.shape[1]
    L = ki.shape[1]
    moms = [m.contiguous() for m in level[3:6]] if opts.has_momentum else [w0, w1, w2]
    fuse = not opts.use_muon and not opts.prenorm
    dws = [torch.empty_like(w) for w in (w0, w1, w2)]
    news = [torch.empty_like(w) for w in (w0, w1, w2)] if fuse else dws
    lrs = [t.reshape(n, L).contiguous() for t in (lr0i, lr1i, lr2i)]  # one stride pair for all three
    n0 = norms[0].reshape(n, d_h).contiguous()
    n2 = norms[2].reshape(n, d_h).contiguous()
    mi_flat = mi.reshape(n).contiguous() if opts.has_momentum else n0
    grid = (n, triton.cdiv(d_h, BLOCK_H))
    jit_for_mode(_grad_momentum_update_kernel)[grid](
        ki, vi, lrs[0], lrs[1], lrs[2], mi_flat,
        w0, w1, w2, moms[0], moms[1], moms[2], n0, n2,
        dws[0], dws[1], dws[2], news[0], news[1], news[2],
        L, d_in, d_h, d_out,
        *ki.stride(), *vi.stride(), *lrs[0].stride(), *w0.stride(), *w1.stride(),
        RENORM_EPS,
        HAS_MOM=opts.has_momentum, FUSE_UPDATE=fuse, PRECISION=_precision(w0.dtype),
        BD_IN=_block(d_in), BD_OUT=_block(d_out), BH=_block(d_h, BLOCK_H), BL=BLOCK_L,
    )
    if fuse:
        nw1 = news[1]
        news[1] = nw1 / (nw1.norm(dim=2, keepdim=True) + RENORM_EPS) * norms[1]
        return news + (dws if opts.has_momentum else [])
    # Muon and/or pre-norm: the torch update from the kernel's dw. Momentum is already added, so
    # `update_state` gets an options copy without momentum and the new buffers are put back here.
    no_mom = dataclasses.replace(opts, has_momentum=False, kernel="torch")
    base = list(level[:3]) + (list(level[-3:]) if opts.prenorm else [])
    new = update_state([base], [dws], [norms], None, no_mom)[0]
    if opts.has_momentum:
        new = new[:3] + dws + new[3:]
    return new


def _torch_opts(opts: LaCTOptions) -> LaCTOptions:
    return dataclasses.replace(opts, kernel="torch")


def _step_forward(state, norms, qi, ki, vi, lr0i, lr1i, lr2i, mi, opts: LaCTOptions, update: bool):
    """`chunk_step` with the kernels and no graph; a stack (r > 1) updates in torch."""
    weights = [lvl[:3] for lvl in state]
    oi = swiglu_apply(weights, qi, opts.residual)
    if not update:
        return oi, None
    if len(state) == 1:
        return oi, [grad_momentum_update(state[0], norms[0], ki, vi, lr0i, lr1i, lr2i, mi, opts)]
    return oi, chunk_step(state, norms, qi, ki, vi, lr0i, lr1i, lr2i, mi, _torch_opts(opts), True)[1]


# --------------------------------------------------------------------------------------------
# autograd: forward in Triton, VJP of the torch twin
# --------------------------------------------------------------------------------------------


class _TritonChunkStep(torch.autograd.Function):
    """``apply(opts, update, sizes, *tensors)``: tensors = flat state, flat norms, qi, ki, vi, lr0i,
    lr1i, lr2i (+ mi). Returns (oi, *flat new state). Backward rebuilds `chunk_step` in torch."""

    @staticmethod
    def forward(ctx, opts, update, sizes, *tensors):
        state, norms, ins = _unpack(tensors, sizes, opts)
        oi, new = _step_forward(state, norms, *ins, opts, update)
        ctx.save_for_backward(*tensors)
        ctx.opts, ctx.update, ctx.sizes = opts, update, sizes
        flat_new = [t for lvl in new for t in lvl] if update else []
        return (oi, *flat_new)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[3:])]
            state, norms, ins = _unpack(leaves, ctx.sizes, ctx.opts)
            oi, new = chunk_step(state, norms, *ins, _torch_opts(ctx.opts), ctx.update)
            outs = [oi] + ([t for lvl in new for t in lvl] if ctx.update else [])
            wanted = [x for x in leaves if x.requires_grad]
            # an output no loss reached has grad None: it contributes nothing
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
        got = iter(got)
        return (None, None, None, *[next(got) if x.requires_grad else None for x in leaves])


def _unpack(tensors, sizes, opts: LaCTOptions):
    per_level, r = sizes
    n_state = per_level * r
    flat_state = list(tensors[:n_state])
    flat_norms = list(tensors[n_state : n_state + 3 * r])
    rest = list(tensors[n_state + 3 * r :])
    state = [flat_state[i * per_level : (i + 1) * per_level] for i in range(r)]
    norms = [flat_norms[3 * i : 3 * i + 3] for i in range(r)]
    ins = rest[:7] if opts.has_momentum else [*rest[:6], None]
    return state, norms, ins


def triton_chunk_step(state, norms, qi, ki, vi, lr0i, lr1i, lr2i, mi, opts: LaCTOptions, update: bool,
                      part: str = "all"):
    """`lact.ops.step.chunk_step` with the Triton kernels; same arguments and returns. A partial
    step (part "apply" / "update", rebuilt only under autograd by manual backprop) runs in torch."""
    if part != "all":
        return chunk_step(state, norms, qi, ki, vi, lr0i, lr1i, lr2i, mi, opts, update, part)
    if not HAS_TRITON:
        raise ImportError("kernel='triton' needs the triton package (pip install triton); use kernel='torch'")
    tensors = [t for lvl in state for t in lvl] + [t for lvl in norms for t in lvl]
    tensors += [qi, ki, vi, lr0i, lr1i, lr2i] + ([mi] if opts.has_momentum else [])
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _step_forward(state, norms, qi, ki, vi, lr0i, lr1i, lr2i, mi, opts, update)
    per_level = len(state[0])
    out = _TritonChunkStep.apply(opts, update, (per_level, len(state)), *tensors)
    oi, flat_new = out[0], list(out[1:])
    if not update:
        return oi, None
    return oi, [flat_new[i * per_level : (i + 1) * per_level] for i in range(len(state))]
