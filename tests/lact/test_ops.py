"""LaCT chunk operations: fast path vs readable twin vs reference fixtures, causality, validation.

Fixtures: a1600012888/LaCT `ttt_operation.py` run eagerly (parity/fixtures/lact, see
parity/README.md). The twin (`naive_lact_swiglu`) takes the inner gradient with autograd, the fast
path (`lact_swiglu`) writes it by hand, so their agreement on stacks checks the hand-written
end-to-end / greedy / residual inner gradients.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lact.ops import (
    block_causal_lact_swiglu,
    l2_norm,
    lact_swiglu,
    naive_lact_swiglu,
    prenorm_block_causal_lact_swiglu,
    zeropower_via_newtonschulz5,
)
from parity.fixtures import (
    BUNDLED,
    GRAD_TOL,
    MUON_GRAD_TOL,
    MUON_OUTPUT_TOL,
    OUTPUT_TOL,
    find_cases,
    load_case,
)
from tests.helpers import assert_close, max_rel
from tests.lact.inputs import NAMES, make_inputs

FIXTURES = find_cases(BUNDLED / "lact")
OP_CASES = [p for p in FIXTURES if load_case(p).meta["kind"] == "lact_op"]




def leaves(levels, x):
    levels = [tuple(w.clone().requires_grad_() for w in lvl) for lvl in levels]
    x = {k: (None if t is None else t.clone().requires_grad_()) for k, t in x.items()}
    return levels, x


def flat_inputs(levels, x):
    return [w for lvl in levels for w in lvl] + [x[n] for n in NAMES if x[n] is not None]


def run(fn, levels, x, chunk, cot, **kw):
    levels, x = leaves(levels, x)
    o = fn(levels, x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], chunk, momentum=x["momentum"], **kw)
    ins = flat_inputs(levels, x)
    grads = torch.autograd.grad(o, ins, cot, allow_unused=True, materialize_grads=True)
    return o, grads


# ---------------------------------------------------------------- fixtures of the reference


@pytest.mark.parametrize("path", OP_CASES, ids=lambda p: p.stem)
def test_naive_twin_matches_reference_fixture(path):
    """The readable twin against the reference; the fast path (autograd and manual backprop) meets these
    fixtures once, in parity/test_parity.py (parity/lact.py)."""
    case = load_case(path)
    a, call = case.arrays, case.meta["call"]
    prenorm = case.meta["function"].startswith("prenorm")
    t = {k.split("/")[1]: torch.tensor(v) for k, v in a.items() if k.startswith("input/")}
    levels = [(t["w0"], t["w1"], t["w2"])]
    x = {n: t.get(n) for n in NAMES}
    cot = torch.tensor(a["cotangent/o"])
    o, grads = run(naive_lact_swiglu, levels, x, call["chunk_size"], cot, use_muon=call["use_muon"], prenorm=prenorm)
    # bfloat16 Muon is chaotic in float32 (parity/README.md): against a fixture made on another CPU only a
    # structural check is possible (see parity.fixtures.MUON_OUTPUT_TOL); the bitwise tests below pin the
    # fast path to the reference's operation order on this machine.
    out_tol, grad_tol = (MUON_OUTPUT_TOL, MUON_GRAD_TOL) if call["use_muon"] else (OUTPUT_TOL, GRAD_TOL)
    assert_close("output o", a["output/o"], o, out_tol)
    names = ["w0", "w1", "w2"] + [n for n in NAMES if x[n] is not None]
    for name, g in zip(names, grads):
        assert torch.isfinite(g).all()
        assert_close(f"grad {name}", a[f"grad/input/{name}"], g, grad_tol)
    if call["use_muon"]:
        # the loose structural tolerances still reject a twin that returns zeros or flips a gradient's sign
        with pytest.raises(AssertionError, match="max rel error"):
            assert_close("zero output", a["output/o"], torch.zeros_like(o), out_tol)
        for name, g in zip(names, grads):
            for wrong in (torch.zeros_like(g), -g):
                with pytest.raises(AssertionError, match="max rel error"):
                    assert_close(f"wrong grad {name}", a[f"grad/input/{name}"], wrong, grad_tol)


def test_fast_path_is_bitwise_reference_on_muon_fixture():
    """Mirroring the reference op for op reproduces even the chaotic bfloat16 Muon case exactly."""
    case = load_case(BUNDLED / "lact" / "lact_post_mom_muon.json")
    a = {k: torch.tensor(v) for k, v in case.arrays.items()}
    o = block_causal_lact_swiglu(
        a["input/w0"], a["input/w1"], a["input/w2"], a["input/q"], a["input/k"], a["input/v"],
        a["input/lr0"], a["input/lr1"], a["input/lr2"], case.meta["call"]["chunk_size"], True, a["input/momentum"],
    )
    assert torch.equal(o, a["output/o"])


def test_helpers_match_reference():
    """Stricter than the fixture's parity run (bitwise Newton-Schulz, l2_norm to 1e-6, a singular-value
    property), hence this second use of `lact_helper_ops`."""
    case = load_case(BUNDLED / "lact" / "lact_helper_ops.json")
    a = {k: torch.tensor(v) for k, v in case.arrays.items()}
    ns = zeropower_via_newtonschulz5(a["input/G"])
    assert ns.dtype == torch.bfloat16 and ns.shape == a["input/G"].shape
    assert torch.equal(ns.float(), a["output/ns_G"])
    assert torch.equal(zeropower_via_newtonschulz5(a["input/G_tall"]).float(), a["output/ns_G_tall"])
    assert_close("l2_norm", a["output/l2_norm_x"], l2_norm(a["input/x"]), 1e-6)
    # independent property: NS output has singular values near 1 (loosely: bf16, 5 steps)
    s = torch.linalg.svdvals(ns.double())
    assert s.min() > 0.5 and s.max() < 1.5


# ---------------------------------------------------------------- fast path vs twin on stacks

MODES = ["plain", "residual", "greedy"]
FLAGS = list(itertools.product([False, True], repeat=3))  # momentum, muon, prenorm


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "mom{}-muon{}-pre{}".format(*map(int, f)))
def test_chunk_matches_naive_twin(r, mode, flags):
    mom, muon, pre = flags
    levels, x = make_inputs(r=r, momentum=mom, seed=r)
    cot = torch.randn(2, 11, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    kw = dict(use_muon=muon, prenorm=pre, residual=mode == "residual", greedy=mode == "greedy")
    o_ref, g_ref = run(naive_lact_swiglu, levels, x, 4, cot, **kw)
    o, g = run(lact_swiglu, levels, x, 4, cot, **kw)
    # float64: the bf16 cast inside Muon sees the same values from both paths
    assert_close("output", o_ref, o, 1e-9)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_close(f"grad {i}", b, a, 1e-8)


def test_r1_stack_equals_reference_wrappers_bitwise():
    levels, x = make_inputs(r=1, dtype=torch.float32)
    for pre, wrapper in ((False, block_causal_lact_swiglu), (True, prenorm_block_causal_lact_swiglu)):
        args = (x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"])
        o_stack = lact_swiglu(levels, *args, 4, momentum=x["momentum"], prenorm=pre)
        o_wrap = wrapper(*levels[0], *args, 4, False, x["momentum"])
        assert torch.equal(o_stack, o_wrap)
        # for one MLP the greedy local objective IS the end-to-end one
        assert torch.equal(o_stack, lact_swiglu(levels, *args, 4, momentum=x["momentum"], prenorm=pre, greedy=True))


def test_greedy_and_residual_change_stacked_outputs():
    levels, x = make_inputs(r=2)
    args = (x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], 4)
    e2e = lact_swiglu(levels, *args)
    greedy = lact_swiglu(levels, *args, greedy=True)
    res = lact_swiglu(levels, *args, residual=True)
    # first chunk: no update yet, greedy == e2e; later chunks see different updates
    assert torch.equal(e2e[:, :4], greedy[:, :4])
    assert max_rel(greedy[:, 4:], e2e[:, 4:]) > 1e-6
    assert max_rel(e2e, res) > 1e-3


def test_updates_increase_inner_objective():
    """One update must raise sum_t lr <f(k_t), v_t> on the chunk it learned from (ascent)."""
    levels, x = make_inputs(r=2, T=8, momentum=False)
    x["q"] = torch.cat([x["k"][:, :4], x["k"][:, :4]], dim=1)  # chunk 2 queries = chunk 1 keys
    o = lact_swiglu(levels, x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], 4)
    before = (o[:, :4] * x["v"][:, :4]).sum()
    after = (o[:, 4:] * x["v"][:, :4]).sum()
    assert after > before


# ---------------------------------------------------------------- causality


@pytest.mark.parametrize("impl", ["chunk", "naive", "manual"])
@pytest.mark.parametrize("mode", MODES)
def test_causality(impl, mode):
    C, T = 4, 13
    levels, x = make_inputs(r=2, T=T, momentum=True)
    kw = dict(residual=mode == "residual", greedy=mode == "greedy", use_muon=False)

    def out(xx):
        args = (xx["q"], xx["k"], xx["v"], xx["lr0"], xx["lr1"], xx["lr2"], C)
        if impl == "naive":
            return naive_lact_swiglu(levels, *args, momentum=xx["momentum"], **kw)
        return lact_swiglu(levels, *args, momentum=xx["momentum"], backprop="autograd" if impl == "chunk" else "manual", **kw)

    base = out(x)
    g = torch.Generator().manual_seed(5)
    for t in (4, 6):  # a chunk edge and mid-chunk
        for name in NAMES:
            xx = dict(x)
            xx[name] = x[name].clone()
            xx[name][:, t:] += torch.rand(xx[name][:, t:].shape, generator=g, dtype=torch.float64)
            o = out(xx)
            chunk_start = (t // C) * C
            # nothing of positions >= t reaches earlier outputs; within t's chunk only q acts
            assert torch.equal(o[:, :t], base[:, :t]), (name, t)
            if name != "q":
                assert torch.equal(o[:, : chunk_start + C], base[:, : chunk_start + C]), (name, t)
            # and the perturbation does reach later chunks (the test would be vacuous otherwise)
            assert not torch.equal(o[:, chunk_start + C :], base[:, chunk_start + C :]), (name, t)


def test_remainder_and_single_chunk():
    levels, x = make_inputs(r=2, T=6)
    args = (x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"])
    # T <= chunk: no update, plain application of the initial stack
    o = lact_swiglu(levels, *args, 6, momentum=x["momentum"])
    h = x["q"]
    for w0, w1, w2 in levels:
        h = (F.silu(h @ w0.mT) * (h @ w2.mT)) @ w1.mT
    assert torch.allclose(o, h, rtol=0, atol=1e-12)
    # T a multiple of the chunk: the last full chunk is applied only, so it equals T = 2 chunks - 1 token + 1
    o4 = lact_swiglu(levels, *args, 3, momentum=x["momentum"])
    o_pad = lact_swiglu(levels, *(a[:, :5] for a in args), 3, momentum=x["momentum"][:, :5])
    assert torch.equal(o4[:, :5], o_pad)


# ---------------------------------------------------------------- validation


def test_bad_inputs_raise_clear_errors():
    levels, x = make_inputs(r=2)
    args = (x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"])
    with pytest.raises(ValueError, match="greedy=True with residual=True"):
        lact_swiglu(levels, *args, 4, greedy=True, residual=True)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        lact_swiglu(levels, *args, 0)
    with pytest.raises(ValueError, match="backprop must be one of"):
        lact_swiglu(levels, *args, 4, backprop="jax")
    with pytest.raises(TypeError, match="fast_weights must be a list"):
        lact_swiglu(levels[0][0], *args, 4)
    with pytest.raises(ValueError, match="lr1 must be"):
        lact_swiglu(levels, x["q"], x["k"], x["v"], x["lr0"], x["lr1"].expand(-1, -1, 3), x["lr2"], 4)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        lact_swiglu(levels, x["q"], x["k"][:, :5], *args[2:], 4)
    # d_out != d_in: fine for one MLP, impossible for a stack's inner MLPs
    lv1, x1 = make_inputs(r=1, d_out=5)
    a1 = (x1["q"], x1["k"], x1["v"], x1["lr0"], x1["lr1"], x1["lr2"])
    assert lact_swiglu(lv1, *a1, 4).shape == (2, 11, 5)
    lv2, _ = make_inputs(r=2, d_out=5)
    bad = [lv1[0], lv1[0]]  # MLP 0 maps 6 -> 5 != 6
    with pytest.raises(ValueError, match="d_out == d_in for every MLP but the last"):
        lact_swiglu(bad, *a1, 4)
    with pytest.raises(ValueError, match="residual=True needs every MLP to keep its width"):
        lact_swiglu(lv1, *a1, 4, residual=True)
    with pytest.raises(ValueError, match="greedy=True makes each MLP regress v"):
        lact_swiglu(lv2, *a1, 4, greedy=True)
