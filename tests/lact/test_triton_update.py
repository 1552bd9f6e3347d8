"""Triton chunk-step kernels (`lact.ops.triton_update`) vs their torch twin (`lact.ops.step`).

Without CUDA they run in Triton's CPU interpreter: TRITON_INTERPRET is set only while each test
runs (the kernels are jitted lazily per value, see tests/conftest.py), float32 only (the
interpreter's bfloat16 arithmetic is wrong). Shapes are small and odd (dims below the 16-wide
blocks, several chunks, a partial last chunk) so masking is exercised; one case has d_h and the
chunk wider than one block to exercise the block loops. The gpu-marked test runs the compiled
kernels on CUDA (scripts/gpu_check.sh), bfloat16 included. Skips when triton is not installed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from lact.ops import lact_swiglu, lact_swiglu_with_state  # noqa: E402
from lact.ops.chunk_loop import resolve_kernel  # noqa: E402
from lact.ops.step import LaCTOptions, apply_fast_weights, chunk_inputs, chunk_step, init_state, row_norms  # noqa: E402
from tests.lact.inputs import NAMES, make_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

OUT_TOL = 1e-5  # parity tolerances, relative to max|ref|
GRAD_TOL = 5e-5


@pytest.fixture
def interpret(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run(levels, x, chunk, cot, backprop, kernel, **kw):
    levels = [tuple(w.clone().requires_grad_() for w in lvl) for lvl in levels]
    x = {k: (None if t is None else t.clone().requires_grad_()) for k, t in x.items()}
    o = lact_swiglu(levels, x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], chunk,
                    momentum=x["momentum"], backprop=backprop, kernel=kernel, **kw)
    ins = [w for lvl in levels for w in lvl] + [x[n] for n in NAMES if x[n] is not None]
    return o, torch.autograd.grad(o, ins, cot, allow_unused=True, materialize_grads=True)


def test_apply_kernel_matches_torch(interpret):
    from lact.ops.triton_update import swiglu_apply

    levels, x = make_inputs(r=2, d=6, d_h=40, T=37, dtype=torch.float32, seed=3)
    qi = x["q"].transpose(1, 2)
    for residual in (False, True):
        assert rel(swiglu_apply(levels, qi, residual), apply_fast_weights(levels, qi, residual)) < OUT_TOL


@pytest.mark.parametrize("variant", ["post", "pre", "muon"])
def test_update_kernel_matches_torch(interpret, variant):
    """One update chunk (l = 37 > one 32-token block, d_h = 40 > one 32-row block), fed a state
    with non-zero momentum buffers."""
    levels, x = make_inputs(r=1, d=6, d_h=40, T=40, dtype=torch.float32, momentum=True, seed=4)
    opts = LaCTOptions(chunk_size=37, use_muon=variant == "muon", prenorm=variant == "pre", has_momentum=True)
    norms = row_norms(levels)
    g = torch.Generator().manual_seed(9)
    state = [[t if i < 3 else torch.randn(t.shape, generator=g) * 0.1 for i, t in enumerate(init_state(levels, opts)[0])]]
    ins = chunk_inputs(x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], x["momentum"], 0, 37)
    o_ref, s_ref = chunk_step(state, norms, *ins, opts, True)
    o_tri, s_tri = chunk_step(state, norms, *ins, dataclasses.replace(opts, kernel="triton"), True)
    assert rel(o_tri, o_ref) < OUT_TOL
    assert len(s_tri[0]) == len(s_ref[0])
    # Muon rounds its input to bfloat16: round-off differences in dw can flip a bf16 rounding, so
    # the Muon step is compared at bf16 resolution; the dw feeding it (the new momentum buffers,
    # entries 3..5) is compared at the parity tolerance
    tol = 1e-2 if variant == "muon" else OUT_TOL
    for i, (a, b) in enumerate(zip(s_tri[0], s_ref[0])):
        assert rel(a, b) < (OUT_TOL if 3 <= i < 6 else tol), i


CASES = [  # (T, chunk, d_h, momentum, prenorm, backprop)
    (13, 4, 8, True, False, "autograd"),  # 3 update chunks + a 1-token tail
    (13, 4, 8, False, False, "manual"),
    (11, 3, 8, True, True, "manual"),
    (75, 34, 40, True, False, "manual"),  # chunks wider than a token block, d_h wider than a row block
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-c{}-dh{}-mom{}-pre{}-{}".format(*map(int, c[:5]), c[5]))
def test_lact_swiglu_triton_equals_torch(interpret, case):
    """Outputs and every gradient (weights, q, k, v, rates, momentum) of the whole op."""
    T, chunk, d_h, mom, pre, backprop = case
    levels, x = make_inputs(r=1, d=6, d_h=d_h, T=T, dtype=torch.float32, momentum=mom, seed=T + chunk)
    cot = torch.randn(2, T, 6, generator=torch.Generator().manual_seed(1))
    o_t, g_t = run(levels, x, chunk, cot, backprop, "torch", prenorm=pre)
    o_k, g_k = run(levels, x, chunk, cot, backprop, "triton", prenorm=pre)
    assert rel(o_k, o_t) < OUT_TOL
    assert len(g_k) == len(g_t)
    for i, (a, b) in enumerate(zip(g_k, g_t)):
        assert torch.isfinite(a).all(), i
        assert rel(a, b) < GRAD_TOL, i


def test_triton_stack_and_inference(interpret):
    """r = 2 residual stack (apply in Triton, update in torch): no-grad output, then outputs and
    every gradient with manual backprop."""
    levels, x = make_inputs(r=2, d=6, d_h=8, T=13, dtype=torch.float32, momentum=True, seed=5)
    args = (levels, x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], 4)
    with torch.no_grad():
        ref = lact_swiglu(*args, momentum=x["momentum"], residual=True)
        got = lact_swiglu(*args, momentum=x["momentum"], residual=True, kernel="triton", backprop="manual")
    assert rel(got, ref) < OUT_TOL
    cot = torch.randn(2, 13, 6, generator=torch.Generator().manual_seed(2))
    o_t, g_t = run(levels, x, 4, cot, "manual", "torch", residual=True)
    o_k, g_k = run(levels, x, 4, cot, "manual", "triton", residual=True)
    assert rel(o_k, o_t) < OUT_TOL
    for i, (a, b) in enumerate(zip(g_k, g_t)):
        assert rel(a, b) < GRAD_TOL, i


def test_carried_state_in_and_out(interpret):
    """A sequence fed in two pieces (the second starts mid-chunk from the first's carry): outputs,
    the final carried state and the gradients through both pieces equal the torch step's."""
    levels, x = make_inputs(r=1, d=6, d_h=8, T=15, dtype=torch.float32, momentum=True, seed=7)
    cot = torch.randn(2, 15, 6, generator=torch.Generator().manual_seed(3))

    def go(kernel):
        lv = [tuple(w.clone().requires_grad_() for w in lvl) for lvl in levels]
        xs = {k: t.clone().requires_grad_() for k, t in x.items()}
        outs, carry = [], None
        for s, e in ((0, 6), (6, 15)):
            piece = [xs[n][:, s:e] for n in NAMES]
            o, carry = lact_swiglu_with_state(lv if carry is None else None, *piece[:6], 4, momentum=piece[6],
                                              initial_state=carry, kernel=kernel)
            outs.append(o)
        o = torch.cat(outs, dim=1)
        final = [t for lvl in carry.state for t in lvl]
        loss = (o * cot).sum() + sum((t * t).sum() for t in final)
        ins = [w for lvl in lv for w in lvl] + [xs[n] for n in NAMES]
        return o, final, torch.autograd.grad(loss, ins)

    o_t, f_t, g_t = go("torch")
    o_k, f_k, g_k = go("triton")
    assert rel(o_k, o_t) < OUT_TOL
    for i, (a, b) in enumerate(zip(f_k, f_t)):
        assert rel(a, b) < OUT_TOL, ("state", i)
    for i, (a, b) in enumerate(zip(g_k, g_t)):
        assert rel(a, b) < GRAD_TOL, ("grad", i)


def test_kernel_is_really_used(interpret, monkeypatch):
    """kernel="triton" must reach the kernels (a broken launcher must fail the op)."""
    import lact.ops.triton_update as tu

    levels, x = make_inputs(r=1, d=6, d_h=8, T=9, dtype=torch.float32, seed=6)

    def boom(*a, **k):
        raise AssertionError("kernel called")

    monkeypatch.setattr(tu, "swiglu_apply", boom)
    with pytest.raises(AssertionError, match="kernel called"):
        lact_swiglu(levels, x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], 4, kernel="triton")


def test_resolve_kernel(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_kernel("auto", cpu) == "torch"  # auto = triton on CUDA only
    assert resolve_kernel("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="kernel must be one of"):
        resolve_kernel("cuda", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernel("triton", cpu) == "triton"  # allowed: the interpreter is on
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_kernel("triton", cpu)


def test_model_use_fused_kernel_maps_to_kernel(interpret):
    """use_fused_kernel=True -> "auto" (torch on CPU); forcing "triton" gives the same loss and grads."""
    from lact.modeling_lact import LaCTForCausalLM
    from tests.lact.test_modeling import tiny_config

    torch.manual_seed(0)
    model = LaCTForCausalLM(tiny_config(use_fused_kernel=True, use_momentum=True))
    layers = [m for m in model.modules() if hasattr(m, "ttt_kernel")]
    assert layers and all(m.ttt_kernel == "auto" for m in layers)
    assert all(m.ttt_kernel == "torch" for m in LaCTForCausalLM(tiny_config()).modules() if hasattr(m, "ttt_kernel"))
    ids = torch.randint(0, 32, (1, 21), generator=torch.Generator().manual_seed(2))

    def loss_and_grads(kernel):
        for m in layers:
            m.ttt_kernel = kernel
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    l_t, g_t = loss_and_grads("torch")
    l_k, g_k = loss_and_grads("triton")
    assert rel(l_k, l_t) < OUT_TOL
    assert len(g_k) == len(g_t)
    for i, (a, b) in enumerate(zip(g_k, g_t)):
        assert rel(a, b) < GRAD_TOL, i


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_760m_head(dtype):
    """Compiled kernels at the 760M fast-weight head (d = d_h = 384), 3 update chunks + a tail, manual
    backprop, against the torch step in the same dtype: fp32 at the parity tolerances; bf16 (inputs
    and fast weights) loosely, at bf16 resolution (accumulation order differs)."""
    T = 3 * 256 + 37
    levels, x = make_inputs(r=1, n=4, d=384, d_h=384, T=T, dtype=torch.float32, momentum=True, seed=11)
    levels = [tuple(w.to("cuda", dtype) for w in lvl) for lvl in levels]
    x = {k: t.to("cuda", dtype) for k, t in x.items()}
    cot = torch.randn(4, T, 384, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(dtype)
    o_t, g_t = run(levels, x, 256, cot, "manual", "torch")
    o_k, g_k = run(levels, x, 256, cot, "manual", "triton")
    out_tol, grad_tol = (OUT_TOL, GRAD_TOL) if dtype == torch.float32 else (3e-2, 6e-2)
    assert rel(o_k.float(), o_t.float()) < out_tol
    for i, (a, b) in enumerate(zip(g_k, g_t)):
        assert rel(a.float(), b.float()) < grad_tol, i
