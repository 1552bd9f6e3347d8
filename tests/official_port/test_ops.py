"""Dual form (`official_port.ops.dual`) against its per-token primal twin (`official_port.ops.naive`).

Float64, tiny shapes, odd lengths; outputs, final states, stats and every gradient; split
processing, causality, inner_steps > 1 and remat.
"""

import pytest
import torch

from official_port.ops import InnerState, dual_ttt, naive_ttt
from tests.helpers import assert_close

B, H, D_HEAD, M = 2, 2, 4, 8
DT = torch.float64


def make_inputs(kind, T, seed=0, d=D_HEAD, m=M):
    g = torch.Generator().manual_seed(seed)

    def rn(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=DT) * scale).requires_grad_()

    hid = d if kind == "linear" else 4 * d
    init = (rn(H, d, hid, scale=0.3), rn(H, 1, hid, scale=0.1))
    if kind == "mlp":
        init = init + (rn(H, hid, d, scale=0.3), rn(H, 1, d, scale=0.1))
    XQ, XK, XV = rn(B, H, T, d), rn(B, H, T, d), rn(B, H, T, d)
    # gates of the size the layer produces (sigmoid / head_dim), a bit larger to make updates visible
    gate = (torch.rand(B, H, T, generator=g, dtype=DT) * 2 / d).requires_grad_()
    token_eta = (1 / torch.arange(1, m + 1, dtype=DT) + 0.02 * torch.randn(m, generator=g, dtype=DT)).requires_grad_()
    lw, lb = rn(H, d, scale=0.1), rn(H, d, scale=0.1)
    with torch.no_grad():
        lw.add_(1.0)
    return dict(XQ=XQ, XK=XK, XV=XV, gate=gate, token_eta=token_eta, ln_weight=lw, ln_bias=lb), init


def run(op, kind, inp, init, state=None, **kw):
    state = state if state is not None else InnerState.initial(init, B)
    return op(kind, inp["XQ"], inp["XK"], inp["XV"], inp["gate"], inp["token_eta"], inp["ln_weight"],
              inp["ln_bias"], state, init_params=init, **kw)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("T, inner_steps", [(37, 1), (19, 2), (3, 1)])
def test_dual_matches_naive_outputs_and_grads(kind, T, inner_steps):
    inp, init = make_inputs(kind, T)
    o1, s1, st1 = run(dual_ttt, kind, inp, init, inner_steps=inner_steps, output_stats=True)
    o2, s2, st2 = run(naive_ttt, kind, inp, init, inner_steps=inner_steps, output_stats=True)
    tol = 1e-11
    assert_close("output", o2, o1, tol)
    for i, (a, b) in enumerate(zip(s1.params, s2.params)):
        assert_close(f"final param {i}", b, a, tol)
    assert torch.equal(s1.k, s2.k) and torch.equal(s1.gate, s2.gate)
    assert s1.num_buffered == T % M
    for a, b in zip(st1, st2):
        if T >= M:
            assert a.shape == (B, H, T // M)
            assert_close("stat", b, a, tol)
        else:
            assert a.numel() == 0
    # one random cotangent on the outputs and on every final-state param
    g = torch.Generator().manual_seed(1)
    cots = [torch.randn(o1.shape, generator=g, dtype=DT)] + [torch.randn(p.shape, generator=g, dtype=DT)
                                                             for p in s1.params]
    wrt = list(inp.values()) + list(init)

    def loss(o, s):
        return sum((c * t).sum() for c, t in zip(cots, [o, *s.params]))

    g1 = torch.autograd.grad(loss(o1, s1), wrt, allow_unused=True)
    g2 = torch.autograd.grad(loss(o2, s2), wrt, allow_unused=True)
    names = list(inp) + [f"init{i}" for i in range(len(init))]
    for name, a, b in zip(names, g1, g2):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(f"grad {name}", b, a, tol * 10)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_dual_from_partial_state_matches_naive(kind):
    """A state holding 5 buffered tokens (mid mini-batch) continues identically in both ops."""
    inp, init = make_inputs(kind, 25, seed=3)
    with torch.no_grad():
        first = {k: (v[:, :, :13] if v.dim() >= 3 else v) for k, v in inp.items()}
        _, state, _ = run(naive_ttt, kind, first, init)
        assert state.num_buffered == 5
        rest = {k: (v[:, :, 13:] if v.dim() >= 3 else v) for k, v in inp.items()}
        o1, s1, _ = run(dual_ttt, kind, rest, init, state=state)
        o2, s2, _ = run(naive_ttt, kind, rest, init, state=state)
        assert_close("output", o2, o1, 1e-8)
        for i, (a, b) in enumerate(zip(s1.params, s2.params)):
            assert_close(f"final param {i}", b, a, 1e-8)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("split", [[5, 11, 21], [8, 8, 8, 13], [1] * 10 + [27]])
def test_split_processing_equals_whole(kind, split):
    inp, init = make_inputs(kind, 37, seed=4)
    with torch.no_grad():
        whole, s_whole, _ = run(dual_ttt, kind, inp, init)
        state, outs, i = None, [], 0
        for n in split:
            part = {k: (v[:, :, i:i + n] if v.dim() >= 3 else v) for k, v in inp.items()}
            o, state, _ = run(dual_ttt, kind, part, init, state=state)
            outs.append(o)
            i += n
    assert_close("output", whole, torch.cat(outs, 2), 1e-12)
    for i, (a, b) in enumerate(zip(state.params, s_whole.params)):
        assert_close(f"final param {i}", b, a, 1e-12)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("t", [7, 8, 20])  # last row of a mini-batch, first row, mid mini-batch
def test_causality(kind, t):
    inp, init = make_inputs(kind, 30, seed=5)
    with torch.no_grad():
        base, _, _ = run(dual_ttt, kind, inp, init)
        pert = {k: v.clone() for k, v in inp.items()}
        for k in ("XQ", "XK", "XV", "gate"):
            pert[k][:, :, t + 1:] += 1.0
        out, _, _ = run(dual_ttt, kind, pert, init)
    assert torch.equal(out[:, :, :t + 1], base[:, :, :t + 1])
    assert (out[:, :, t + 1:] - base[:, :, t + 1:]).abs().max() > 1e-3  # the perturbation is seen later


@pytest.mark.parametrize("op", [dual_ttt, naive_ttt], ids=["dual", "naive"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("name", ["XK", "XV", "gate"])
def test_nan_at_t_leaves_earlier_outputs_finite_and_identical(op, kind, name):
    """A NaN input at token t (mid mini-batch) must not reach outputs before t: causal masks select,
    they do not multiply (0 * NaN = NaN). Outputs from t on are NaN (their inputs were)."""
    t = 12  # row 4 of the second mini-batch: rows 8..11 share its mini-batch
    inp, init = make_inputs(kind, 21, seed=8)
    with torch.no_grad():
        base, _, _ = run(op, kind, inp, init)
        bad = {k: v.clone() for k, v in inp.items()}
        bad[name][:, :, t] = float("nan")
        out, _, _ = run(op, kind, bad, init)
    assert torch.isfinite(out[:, :, :t]).all()
    assert torch.equal(out[:, :, :t], base[:, :, :t])
    assert torch.isnan(out[:, :, t:]).all()


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_inner_steps_change_only_later_mini_batches(kind):
    inp, init = make_inputs(kind, 24, seed=6)
    with torch.no_grad():
        o1, s1, _ = run(dual_ttt, kind, inp, init, inner_steps=1)
        o3, s3, _ = run(dual_ttt, kind, inp, init, inner_steps=3)
    assert torch.equal(o1[:, :, :M], o3[:, :, :M])
    assert (o1[:, :, M:] - o3[:, :, M:]).abs().max() > 1e-4
    assert (s1.params[0] - s3.params[0]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("group", [1, 2])
def test_remat_gives_identical_gradients(kind, group):
    inp, init = make_inputs(kind, 37, seed=7)
    wrt = list(inp.values()) + list(init)
    grads = []
    for remat in (0, group):
        o, s, _ = run(dual_ttt, kind, inp, init, remat_group_size=remat)
        grads.append(torch.autograd.grad(o.sin().sum() + s.params[0].sum(), wrt))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)


@pytest.mark.slow
def test_gradcheck_dual_tiny():
    """Float64 finite differences on a tiny case (second-order terms through G included)."""
    torch.manual_seed(8)
    m = 4
    for kind in ("linear", "mlp"):
        hid = 2 if kind == "linear" else 8
        p = [torch.randn(1, 2, hid, dtype=DT) * 0.5, torch.randn(1, 1, hid, dtype=DT) * 0.1]
        if kind == "mlp":
            p += [torch.randn(1, hid, 2, dtype=DT) * 0.5, torch.randn(1, 1, 2, dtype=DT) * 0.1]
        xs = [torch.randn(1, 1, 6, 2, dtype=DT) for _ in range(3)]
        gate = torch.rand(1, 1, 6, dtype=DT)
        te = 1 / torch.arange(1, m + 1, dtype=DT)
        lw, lb = torch.ones(1, 2, dtype=DT) + 0.1 * torch.randn(1, 2, dtype=DT), 0.1 * torch.randn(1, 2, dtype=DT)
        leaves = [t.requires_grad_() for t in (*xs, gate, te, lw, lb, *p)]

        def f(*a, kind=kind):
            o, s, _ = dual_ttt(kind, *a[:7], InnerState.initial(tuple(a[7:]), 1))
            return o, *s.params

        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def test_official_gelu_derivative_matches_fused_kernel():
    """The scan uses ATen's tanh-GELU backward; the official hand-rounded `diff_gelu` agrees to 1e-9."""
    from official_port.ops.dual import _gelu_grad, gelu_tanh_derivative

    x = torch.linspace(-8, 8, 2001, dtype=DT)
    assert (gelu_tanh_derivative(x) - _gelu_grad(torch.ones_like(x), x)).abs().max() < 1e-9
    xr = x.clone().requires_grad_()
    auto = torch.autograd.grad(torch.nn.functional.gelu(xr, approximate="tanh").sum(), xr)[0]
    assert (auto - _gelu_grad(torch.ones_like(x), x)).abs().max() < 1e-14


def test_bad_inputs_raise():
    inp, init = make_inputs("linear", 5)
    st = InnerState.initial(init, B)
    with pytest.raises(ValueError, match="inner_steps"):
        run(dual_ttt, "linear", inp, init, inner_steps=0)
    with pytest.raises(ValueError, match="kind"):
        run(dual_ttt, "conv", inp, init)
    with pytest.raises(ValueError, match="gate"):
        dual_ttt("linear", inp["XQ"], inp["XK"], inp["XV"], inp["gate"][:, :, :2], inp["token_eta"],
                 inp["ln_weight"], inp["ln_bias"], st)
    with pytest.raises(ValueError, match="mlp inner model"):
        run(dual_ttt, "mlp", inp, init)
