"""The C TTT-Linear and TTT-MLP scans (`official_port.ops.c_scan`) vs their torch twins (`dual_ttt_linear`,
`dual_ttt_mlp`), and the layers' dispatch to them. Skips when no C compiler is found (the layers then run the twins)."""

import warnings
from pathlib import Path

import pytest
import torch

from official_port.configuration_ttt import TTTConfig
from official_port.layers import TTTMLP, TTTBase, TTTLinear, TTTLinearBase, TTTMLPBase
from official_port.ops import InnerState, c_scan, dual_ttt_linear, dual_ttt_mlp
from official_port.ops.triton_dual import resolve_kernel
from tests.helpers import assert_close

needs_cc = pytest.mark.skipif(c_scan.c_compiler() is None, reason="no C compiler")


def _inputs(B, H, T, d, m, r, seed=0, layer_layout=True, dtype=torch.float32, kind="linear"):
    """Op inputs of `kind`; queries/keys/values as `[B, H, T, d]` views of `[B, T, H, d]` tensors (as the
    layer passes them) or contiguous."""
    g = torch.Generator().manual_seed(seed)

    def rn(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    def qkv():
        return rn(B, T, H, d).transpose(1, 2) if layer_layout else rn(B, H, T, d)

    widths = [(d, d)] if kind == "linear" else [(d, 4 * d), (4 * d, d)]
    params = tuple(p for i, o in widths for p in (rn(B, H, i, o, scale=0.1), rn(B, H, 1, o, scale=0.1)))
    state = InnerState(params, rn(B, H, r, d), rn(B, H, r, d), (torch.rand(B, H, r, generator=g) * 0.5).to(dtype))
    return [qkv(), qkv(), qkv(), (torch.rand(B, H, T, generator=g) * 0.5).to(dtype),
            (torch.rand(m, generator=g) * 0.5 + 0.1).to(dtype), 1 + rn(H, d, scale=0.1), rn(H, d, scale=0.1)], state


_OPS = {"linear": (dual_ttt_linear, c_scan.c_ttt_linear), "mlp": (dual_ttt_mlp, c_scan.c_ttt_mlp)}


def _state64(st):
    return InnerState(tuple(p.double() for p in st.params), st.k.double(), st.v.double(), st.gate.double())


@needs_cc
@pytest.mark.parametrize("B,H,T,d,m,r", [(2, 3, 100, 64, 16, 0), (1, 2, 37, 32, 8, 5), (2, 2, 9, 16, 16, 3),
                                         (1, 3, 64, 48, 16, 0), (2, 1, 1, 64, 16, 15), (1, 2, 23, 32, 5, 2)],
                         ids=["T100", "buffered5", "no-update", "d48", "one-token-completes", "m5"])
@pytest.mark.parametrize("layer_layout", [True, False], ids=["BTHd", "BHTd"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_c_scan_matches_dual(B, H, T, d, m, r, layer_layout, kind):
    """Outputs and the whole new state against the torch twin (1e-5, as the Triton kernel), and as close to
    the float64 twin as the float32 twin is (an independent float64 reference)."""
    args, state = _inputs(B, H, T, d, m, r, layer_layout=layer_layout, kind=kind)
    twin, c_op = _OPS[kind]
    with torch.no_grad():
        ref, ref_state, _ = twin(*args, state)
        got, got_state = c_op(*args, state)
        exact, _, _ = twin(*(a.double() for a in args), _state64(state))
    assert got.shape == ref.shape == (B, H, T, d) and got.dtype == torch.float32
    assert_close("output", ref, got, 1e-5)
    assert len(got_state.params) == len(ref_state.params) == (2 if kind == "linear" else 4)
    for name, a, b in (*((f"param {i}", p_ref, p_got) for i, (p_ref, p_got) in
                         enumerate(zip(ref_state.params, got_state.params))),
                       ("k", ref_state.k, got_state.k), ("v", ref_state.v, got_state.v),
                       ("gate", ref_state.gate, got_state.gate)):
        assert a.shape == b.shape, name
        if a.numel():
            assert_close(f"state {name}", a, b, 1e-5)
    err_c = (got.double() - exact).abs().max().item()
    err_torch = (ref.double() - exact).abs().max().item()
    assert err_c <= 2 * err_torch + 1e-6, (err_c, err_torch)


@needs_cc
@pytest.mark.parametrize("d,m", [(256, 16), (64, 64)])
def test_c_mlp_scan_at_its_size_limit(d, m):
    """The TTT-MLP scan's largest rows (4 d m = 16384 floats per per-mini-batch array, on the C stack) on
    two threads (one of them an OpenMP worker where the compiler has OpenMP): the twin's values at 1e-5;
    one size past the limit is refused."""
    args, state = _inputs(1, 2, 2 * m + 3, d, m, 0, seed=7, kind="mlp")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            ref, ref_state, _ = dual_ttt_mlp(*args, state)
            got, got_state = c_scan.c_ttt_mlp(*args, state)
    finally:
        torch.set_num_threads(n)
    assert_close("output", ref, got, 1e-5)
    for p_ref, p_got in zip(ref_state.params, got_state.params):
        assert_close("params", p_ref, p_got, 1e-5)
    past = (d, 2 * m) if 2 * m <= 64 else (2 * d, m)
    assert c_scan.supports(d, m, "mlp") and not c_scan.supports(*past, "mlp") and c_scan.supports(*past)


@needs_cc
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_c_scan_split_equals_whole_and_is_causal(kind):
    """Split calls (through buffered tokens) equal one call; perturbing tokens after t leaves outputs up to
    t bit for bit and changes later ones."""
    args, state = _inputs(2, 2, 50, 32, 16, 0, seed=3, kind=kind)
    c_op = _OPS[kind][1]
    with torch.no_grad():
        whole, s_whole = c_op(*args, state)
        outs, st = [], state
        for a, b in ((0, 13), (13, 14), (14, 50)):
            o, st = c_op(*(x[:, :, a:b] for x in args[:4]), *args[4:], st)
            outs.append(o)
        assert_close("split output", whole, torch.cat(outs, 2), 1e-6)
        for p_whole, p_split in zip(s_whole.params, st.params):
            assert_close("split params", p_whole, p_split, 1e-6)
        for t in (7, 15, 20):
            pert = [x.clone() for x in args[:4]]
            for x in pert:
                x[:, :, t + 1:] += 1.0
            out, _ = c_op(*pert, *args[4:], state)
            assert torch.equal(out[:, :, :t + 1], whole[:, :, :t + 1])
            assert (out[:, :, t + 1:] - whole[:, :, t + 1:]).abs().max() > 1e-3


@pytest.fixture(params=["openmp", "python threads"])
def thread_split(request, monkeypatch, tmp_path):
    """Both ways a C call's rows go over threads: OpenMP inside the call, or Python threads for a library
    built without OpenMP (forced here); the test checks which one it got with `_expect_split`."""
    if request.param == "python threads":
        monkeypatch.setenv("TTT_CACHE_DIR", str(tmp_path))
        monkeypatch.setattr(c_scan, "_libs", {})
        monkeypatch.setattr(c_scan, "_build", lambda stem, defines: c_scan._compile(c_scan.c_compiler(), stem,
                                                                                    defines, ()))
    return request.param


def _expect_split(lib, thread_split):
    if thread_split == "openmp" and not lib.built_with_openmp():
        pytest.skip("the C compiler has no OpenMP")
    assert lib.built_with_openmp() == (thread_split == "openmp")


@needs_cc
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_c_scan_threads_give_the_same_bits(thread_split, kind):
    """(Batch, head) pairs split over threads compute exactly what one thread does."""
    args, state = _inputs(2, 3, 40, 32, 16, 0, seed=4, kind=kind)
    _expect_split(c_scan.load_library(32, 16, kind), thread_split)
    c_op = _OPS[kind][1]
    n = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one, s1 = c_op(*args, state)
            torch.set_num_threads(3)
            three, s3 = c_op(*args, state)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, three) and all(torch.equal(a, b) for a, b in zip(s1.params, s3.params))


@needs_cc
@pytest.mark.parametrize("name", ["XK", "XV", "gate"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_non_finite_input_returns_none(name, kind):
    """A NaN key/value/gate makes the C scan give up (None); the layer then runs the twin (below,
    `test_layer_dispatch`)."""
    args, state = _inputs(1, 2, 30, 32, 16, 0, seed=5, kind=kind)
    args[("XQ", "XK", "XV", "gate").index(name)][:, :, 12] = float("nan")
    with torch.no_grad():
        assert _OPS[kind][1](*args, state) is None


def _layer_pair(cls=TTTLinear, hidden=64, heads=2, seed=0):
    cfg = TTTConfig(hidden_size=hidden, num_attention_heads=heads, mini_batch_size=16, intermediate_size=64,
                    num_hidden_layers=1, vocab_size=64)
    torch.manual_seed(seed)
    ref = cls(cfg, kernel="torch")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    c = cls(cfg, kernel="auto")
    c.load_state_dict(ref.state_dict())
    return ref, c


def _count_calls(monkeypatch, name="c_ttt_linear_from_projections"):
    """A list that grows by one at each call of `c_scan.<name>` (the layer's TTT-Linear C scan by default)."""
    calls = []
    real = getattr(c_scan, name)
    monkeypatch.setattr(c_scan, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _scan_name(cls):
    return f"c_ttt_{cls.inner_kind}_from_projections"


@needs_cc
@pytest.mark.parametrize("cls", [TTTLinear, TTTLinearBase, TTTMLP, TTTMLPBase])
def test_layer_c_path_matches_torch(monkeypatch, cls):
    """kernel='auto' on CPU runs the convs, RoPE and scan in C for no-grad float32 calls: the same outputs
    and states as kernel='torch' (1e-5), whole, in pieces that start and end inside mini-batches (buffered
    tokens, conv cache), and at shifted positions."""
    ref, c = _layer_pair(cls)
    calls = _count_calls(monkeypatch, _scan_name(cls))
    x = torch.randn(2, 37, 64)
    pos = (torch.arange(37) + 5).expand(2, 37)
    with torch.no_grad():
        for kw in ({"position_ids": pos}, {}):
            want, _, s_want = ref(x, **kw)
            whole, _, s_got = c(x, **kw)
            assert_close("layer output", want, whole, 1e-5)
        outs, st_ref, st_c = [], None, None
        for a, b in ((0, 13), (13, 14), (14, 37)):
            o_ref, _, st_ref = ref(x[:, a:b], state=st_ref)
            o_c, _, st_c = c(x[:, a:b], state=st_c)
            assert_close(f"piece {a}:{b}", o_ref, o_c, 1e-5)
            assert_close(f"state k after {b}", st_ref.inner.k, st_c.inner.k, 1e-6)
            assert torch.equal(st_ref.inner.v, st_c.inner.v) and torch.equal(st_ref.inner.gate, st_c.inner.gate)
            if cls.has_conv:
                assert torch.equal(st_ref.conv_cache, st_c.conv_cache)
            for p_ref, p_c in zip(st_ref.inner.params, st_c.inner.params):
                assert_close("state params", p_ref, p_c, 1e-5)
            outs.append(o_c)
        assert_close("pieces vs whole", whole, torch.cat(outs, 1), 1e-5)
    assert len(calls) == 5 and st_c.seen_tokens == 37 and st_c.inner.num_buffered == 37 % 16


def _projection_inputs(B, H, T, d, m, r, seed=6):
    """`c_ttt_linear_from_projections` inputs (a width-4 conv with its cache, RoPE tables, positions) whose
    values are `[B, H, T, d]` views of a `[B, T, H, d]` tensor, as the layer passes them."""
    args, state = _inputs(B, H, T, d, m, r, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    D = H * d
    src, cache = torch.randn(B, T, D, generator=g), torch.randn(B, 3, D, generator=g)
    kern, bias = torch.randn(4, 2, D, generator=g) * 0.5, torch.randn(2, D, generator=g) * 0.1
    angles = torch.rand(m, d // 2, generator=g) * 6
    pos = (torch.arange(T) + r).remainder(m).expand(B, T)
    return (src, src, cache, kern, bias, angles.cos(), angles.sin(), pos, args[2], *args[3:], state)


@needs_cc
@pytest.mark.parametrize("T,r", [(45, 0), (30, 5), (32, 0)], ids=["tail", "buffered", "whole-mini-batches"])
def test_c_scan_output_over_its_values(T, r):
    """`out=` the values' own memory (the layer's value projection, free once the scan has read it) gives the
    same bits as a fresh output, and the new state keeps the values of an incomplete last mini-batch
    (copied before the scan overwrites them)."""
    inputs = _projection_inputs(2, 2, T, 32, 16, r)
    values = inputs[8].transpose(1, 2)  # [B, T, H, d], the memory XV views
    assert values.is_contiguous()
    with torch.no_grad():
        fresh, s_fresh = c_scan.c_ttt_linear_from_projections(*inputs)
        # the fresh call's state views the values (its tail), which the next call overwrites
        s_fresh = InnerState(tuple(p.clone() for p in s_fresh.params), s_fresh.k.clone(), s_fresh.v.clone(),
                             s_fresh.gate.clone())
        v_before = values.clone()
        got, s_got = c_scan.c_ttt_linear_from_projections(*inputs, out=values)
    assert got.data_ptr() == values.data_ptr() and not torch.equal(values, v_before)
    assert torch.equal(got, fresh)
    assert s_got.num_buffered == s_fresh.num_buffered == (r + T) % 16
    for name in ("k", "v", "gate"):
        assert torch.equal(getattr(s_got, name), getattr(s_fresh, name)), name
    for p_got, p_fresh in zip(s_got.params, s_fresh.params):
        assert torch.equal(p_got, p_fresh)


@needs_cc
def test_c_scan_output_buffer_errors():
    """An `out` of the wrong shape, or sharing memory with anything but the values' own elements, is refused."""
    B, H, T, d = 1, 2, 20, 32
    inputs = _projection_inputs(B, H, T, d, 16, 0)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"out must be a contiguous float32 CPU tensor \[B, T, H, d\]"):
            c_scan.c_ttt_linear_from_projections(*inputs, out=torch.empty(B, H, T, d + 16))
        with pytest.raises(ValueError, match="out may share memory with XV only"):
            c_scan.c_ttt_linear_from_projections(*inputs, out=inputs[0].view(B, T, H, d))
        values = torch.randn(B, H, T, d)  # contiguous [B, H, T, d]: XV's elements are not out's
        bad = list(inputs)
        bad[8] = values
        with pytest.raises(ValueError, match="not XV's own"):
            c_scan.c_ttt_linear_from_projections(*bad, out=values.view(B, T, H, d))


@needs_cc
def test_layer_c_path_respects_projection_hooks(monkeypatch):
    """The C path writes `wg`'s and `wo`'s products into this call's spare buffers only when they are plain
    `nn.Linear`s: with forward hooks on `wv`, `wg` and `wo` (here scaling their outputs) the hooks run and the
    output matches kernel='torch' with the same hooks."""
    ref, c = _layer_pair()
    calls = []
    real = c_scan.c_ttt_linear_from_projections
    monkeypatch.setattr(c_scan, "c_ttt_linear_from_projections",
                        lambda *a, **kw: calls.append(kw.get("out") is not None) or real(*a, **kw))
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        plain = c(x)[0]
        assert_close("plain layer", ref(x)[0], plain, 1e-5)
        for layer in (ref, c):
            for name, scale in (("wv", 0.5), ("wg", 2.0), ("wo", 3.0)):
                getattr(layer, name).register_forward_hook(lambda mod, inp, out, s=scale: out * s)
        hooked = c(x)[0]
        assert_close("hooked layer", ref(x)[0], hooked, 1e-5)
    assert calls == [True, False]  # the hooked wv's output is not overwritten
    assert (hooked - plain).abs().max() > 1e-2


@needs_cc
@pytest.mark.parametrize("t", [7, 15, 20])
@pytest.mark.parametrize("cls", [TTTLinear, TTTMLP])
def test_layer_c_path_is_causal(monkeypatch, t, cls):
    """Perturbing inputs after token t leaves the C path's outputs up to t bit for bit (conv, RoPE, scan)."""
    _, c = _layer_pair(cls)
    calls = _count_calls(monkeypatch, _scan_name(cls))
    x = torch.randn(1, 40, 64)
    pert = x.clone()
    pert[:, t + 1:] += 1.0
    with torch.no_grad():
        a, b = c(x)[0], c(pert)[0]
    assert len(calls) == 2
    assert torch.equal(a[:, :t + 1], b[:, :t + 1]) and (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3


@needs_cc
def test_layer_dispatch(monkeypatch):
    """Calls that need stats or inner_steps > 1 run the twin scan (then the C epilogue: 1e-5 of kernel='torch');
    autograd and float64 run everything in torch (bit for bit kernel='torch'); a NaN token makes the C scan
    give up and the twin isolates it as 'torch' does; TTT-MLP sizes past the C stack's limit run the twin."""
    ref, c = _layer_pair()
    calls, epilogue = _count_calls(monkeypatch), _count_calls(monkeypatch, "c_post_norm_gate")
    x = torch.randn(2, 37, 64)
    with torch.no_grad():
        for kw in ({"output_ttt_stats": True}, {"inner_steps": 2}):
            (want, s_want, _), (got, s_got, _) = ref(x, **kw), c(x, **kw)
            assert_close(f"output {kw}", want, got, 1e-5)
            if s_want is not None:
                assert all(torch.equal(a, b) for a, b in zip(s_want, s_got))
        assert not calls and len(epilogue) == 2
        assert torch.equal(c.double()(x.double())[0], ref.double()(x.double())[0])
    c.float(), ref.float()
    out = c(x)[0]  # autograd
    assert out.requires_grad and torch.equal(out, ref(x)[0]) and not calls and len(epilogue) == 2
    xn = x.clone()
    xn[:, 20] = float("nan")
    with torch.no_grad():
        a, b = ref(xn)[0], c(xn)[0]
    assert len(calls) == 1 and torch.equal(a.isnan(), b.isnan())
    assert_close("finite outputs around a NaN token", a.nan_to_num(), b.nan_to_num(), 1e-5)
    # TTT-MLP's rows of width 4d live on the C stack: 4 d m <= 16384 (the 125m layer: 4 * 64 * 16)
    big = TTTConfig(hidden_size=512, num_attention_heads=2, mini_batch_size=32, intermediate_size=64,
                    num_hidden_layers=1, vocab_size=64)
    with torch.no_grad():
        assert TTTMLP(c.config, kernel="c")._use_c(x, False, 1)
        assert TTTMLP(big, kernel="c")._use_c(torch.randn(1, 2, 512), False, 1) is False
        assert TTTLinear(big, kernel="c")._use_c(torch.randn(1, 2, 512), False, 1)


@needs_cc
def test_ttt_mlp_uses_the_c_epilogue_and_gelu(monkeypatch):
    """TTT-MLP under kernel='auto' runs its output epilogue in C; the calls its C scan does not cover (stats,
    inner_steps > 1) run the torch dual form with the GELU and GELU' from C: 1e-5 of 'torch', whole and
    in pieces through buffered tokens; with autograd, the torch path alone."""
    ref, c = _layer_pair(TTTMLP)
    calls = _count_calls(monkeypatch, "c_gelu_tanh")
    grad_calls = _count_calls(monkeypatch, "c_gelu_tanh_grad")
    scans = _count_calls(monkeypatch, "c_ttt_mlp_from_projections")
    x = torch.randn(2, 37, 64)
    with torch.no_grad():
        assert c._use_c_epilogue(x) and not ref._use_c_epilogue(x)
        assert c._use_c_gelu(x) and not ref._use_c_gelu(x)
        assert_close("TTT-MLP output", ref(x, inner_steps=2)[0], c(x, inner_steps=2)[0], 1e-5)
        assert len(calls) > 0 and len(grad_calls) > 0
        st_ref = st_c = None
        for a, b in ((0, 13), (13, 37)):
            o_ref, _, st_ref = ref(x[:, a:b], state=st_ref, output_ttt_stats=True)
            o_c, _, st_c = c(x[:, a:b], state=st_c, output_ttt_stats=True)
            assert_close(f"piece {a}:{b}", o_ref, o_c, 1e-5)
            for p_ref, p_c in zip(st_ref.inner.params, st_c.inner.params):
                assert_close("state params", p_ref, p_c, 1e-5)
    assert not scans
    n = len(calls)
    c(x)[0].sum().backward()  # autograd: the torch GELU
    assert len(calls) == n and not scans


@needs_cc
def test_c_gelu_values_and_derivative():
    """`c_gelu_tanh` (the epilogue's GELU) on a dense grid within 2e-6 relative of float64 where |gelu| > 1e-6,
    its ones column; `c_gelu_tanh_grad` within ~2.5 ulps of float64's `gelu_backward` on the grid and at
    three scales; the dual form with them within 1e-5 of without."""
    x = torch.linspace(-12, 12, 64 * 1000).reshape(1000, 64)
    want64 = torch.nn.functional.gelu(x.double(), approximate="tanh")
    got = c_scan.c_gelu_tanh(x)
    big = want64.abs() > 1e-6
    assert ((got.double() - want64).abs() / want64.abs())[big].max() < 2e-6
    ones = c_scan.c_gelu_tanh(x.view(10, 100, 64), with_ones=True)
    assert ones.shape == (10, 100, 65) and torch.equal(ones[..., :64].reshape(1000, 64), got)
    assert torch.equal(ones[..., 64], torch.ones(10, 100))
    gen = torch.Generator().manual_seed(5)
    cases = [(x, torch.ones_like(x))] + [tuple(torch.randn(40, 256, generator=gen) * scale for _ in range(2))
                                         for scale in (0.1, 1.0, 10.0)]
    for z, g in cases:
        want64 = torch.ops.aten.gelu_backward(g.double(), z.double(), approximate="tanh")
        got = c_scan.c_gelu_tanh_grad(g, z).double()
        # ~2.5 float32 ulps of the larger of |g| and the result (measured <= 2.2e-7 on the grid, where
        # ATen's float32 gelu_backward is off by up to 1.0e-6 for |x| > 4)
        assert ((got - want64).abs() <= 3e-7 * torch.maximum(g.double().abs(), want64.abs())).all()
    args, _ = _inputs(2, 2, 40, 16, 16, 0, seed=6)
    gen = torch.Generator().manual_seed(7)
    state = InnerState((*(torch.randn(2, 2, *s, generator=gen) * 0.1 for s in ((16, 64), (1, 64), (64, 16), (1, 16))),),
                       *(torch.zeros(2, 2, 0, 16) for _ in range(2)), torch.zeros(2, 2, 0))
    with torch.no_grad():
        want, s_want, _ = dual_ttt_mlp(*args, state)
        got, s_got, _ = dual_ttt_mlp(*args, state, c_gelu=True)
    assert_close("dual_ttt_mlp c_gelu", want, got, 1e-5)
    for a, b in zip(s_want.params, s_got.params):
        assert_close("dual_ttt_mlp c_gelu params", a, b, 1e-5)


@needs_cc
def test_c_gelu_bad_inputs():
    """One-line errors: a width not a multiple of 16, mismatched shapes, float64, autograd."""
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        c_scan.c_gelu_tanh(x[:, :20])
    with pytest.raises(ValueError, match="must match"):
        c_scan.c_gelu_tanh_grad(x[:2], x)
    with pytest.raises(ValueError, match="float32 CPU"):
        c_scan.c_gelu_tanh(x.double())
    with pytest.raises(ValueError, match="no autograd"):
        c_scan.c_gelu_tanh(x.requires_grad_())


def _epilogue_twin(Z, g, w, b, eps=1e-6):
    return torch.nn.functional.gelu(g, approximate="tanh") * torch.nn.functional.layer_norm(Z, Z.shape[-1:], w, b, eps)


@needs_cc
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_post_norm_gate_matches_torch(scale):
    """`c_post_norm_gate` against torch's post_norm, gelu and product: 1e-5 of the float32 twin, and no
    farther from the float64 twin than the float32 twin is (up to 1.25x of its max error)."""
    gen = torch.Generator().manual_seed(3)
    Z, g = (torch.randn(3, 50, 768, generator=gen) * scale for _ in range(2))
    w, b = torch.randn(768, generator=gen), torch.randn(768, generator=gen)
    want = _epilogue_twin(Z, g, w, b)
    want64 = _epilogue_twin(*(t.double() for t in (Z, g, w, b)))
    got = c_scan.c_post_norm_gate(Z, g.clone(), w, b, 1e-6)
    assert_close("c_post_norm_gate", want, got, 1e-5)
    assert (got.double() - want64).abs().max() <= 1.25 * (want.double() - want64).abs().max()
    # a non-contiguous Z is read through a copy; the result is written into g and returned
    gz = g.clone()
    out = c_scan.c_post_norm_gate(Z.transpose(0, 1).contiguous().transpose(0, 1), gz, w, b, 1e-6)
    assert out is gz and torch.equal(out, got)


@needs_cc
def test_post_norm_gate_gelu_values():
    """The C GELU (x sigmoid(2y) with its own exp) on a dense grid: within 2e-6 relative of float64 where
    |gelu| > 1e-6, and torch's values at NaN, +-inf, +-1e30, +-0."""
    x = torch.linspace(-12, 12, 768 * 100).reshape(100, 768)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, -0.0, 1e-30])
    x = torch.cat([x, special.repeat(96)[None]])
    Z, w, b = torch.randn_like(x), torch.zeros(768), torch.ones(768)  # LayerNorm output 1: the gate alone
    got = c_scan.c_post_norm_gate(Z, x.clone(), w, b, 1e-6)
    want64 = torch.nn.functional.gelu(x.double(), approximate="tanh")
    grid, big = slice(0, -1), want64[:-1].abs() > 1e-6
    assert ((got[grid].double() - want64[grid]).abs() / want64[grid].abs())[big].max() < 2e-6
    want = torch.nn.functional.gelu(x[-1], approximate="tanh")
    assert torch.equal(got[-1].isnan(), want.isnan())
    assert torch.equal(got[-1].nan_to_num(), want.nan_to_num())


@needs_cc
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the loaded libraries from /proc")
def test_c_kernels_run_on_torchs_openmp_runtime():
    """Built with OpenMP, the kernels bind to the libgomp torch loaded (one runtime, one pool of threads:
    a second runtime's threads would spin against torch's), not to a second copy."""
    libs = [c_scan.load_library(64, 16), c_scan.load_post_norm_gate()]
    if not all(lib.built_with_openmp() for lib in libs):
        pytest.skip("the C compiler has no OpenMP")
    torch_gomp = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*"))
    if not torch_gomp:
        pytest.skip("this torch does not ship libgomp")
    maps = Path("/proc/self/maps").read_text().splitlines()
    loaded = {Path(line.split()[-1]) for line in maps if "libgomp" in line}
    assert loaded == {torch_gomp[0].resolve()}, f"OpenMP runtimes loaded: {loaded}"


@needs_cc
def test_post_norm_gate_threads_and_bad_inputs(thread_split):
    """Rows split over threads give the same bits; bad inputs raise one-line errors."""
    Z, g = torch.randn(2, 33, 64), torch.randn(2, 33, 64)
    w, b = torch.randn(64), torch.randn(64)
    _expect_split(c_scan.load_post_norm_gate(), thread_split)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = c_scan.c_post_norm_gate(Z, g.clone(), w, b, 1e-6)
        torch.set_num_threads(3)
        three = c_scan.c_post_norm_gate(Z, g.clone(), w, b, 1e-6)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, three)
    with pytest.raises(ValueError, match="must match"):
        c_scan.c_post_norm_gate(Z, g[:, :5].clone(), w, b, 1e-6)
    with pytest.raises(ValueError, match="multiple of 16"):
        c_scan.c_post_norm_gate(Z[..., :40], g[..., :40].clone(), w[:40], b[:40], 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        c_scan.c_post_norm_gate(Z.transpose(0, 1), g.transpose(0, 1), w, b, 1e-6)
    with pytest.raises(ValueError, match="float32 CPU"):
        c_scan.c_post_norm_gate(Z.double(), g.double(), w.double(), b.double(), 1e-6)
    with pytest.raises(ValueError, match="no autograd"):
        c_scan.c_post_norm_gate(Z.requires_grad_(), g, w, b, 1e-6)


def test_resolve_kernel_and_build_failures(monkeypatch, tmp_path):
    """'auto' picks 'c' on CPU exactly when a compiler is found; without one, 'auto' warns once and runs
    the twin, and an explicit kernel='c' fails with a one-line reason."""
    assert resolve_kernel("auto", torch.device("cpu")) == ("c" if c_scan.c_compiler() else "torch")
    assert resolve_kernel("c", torch.device("cpu")) == "c"
    with pytest.raises(ValueError, match="'torch', 'triton', 'c' or 'auto'"):
        resolve_kernel("cpp", torch.device("cpu"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TTT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(c_scan, "_libs", {})
    monkeypatch.setattr(TTTBase, "_c_warned", False)
    assert c_scan.c_compiler() is None
    ref, c = _layer_pair()
    c.kernel = "c"
    x = torch.randn(1, 20, 64)
    with torch.no_grad(), pytest.raises(c_scan.CKernelUnavailable, match="no-such-cc"):
        c(x)
    c.kernel = "auto"  # resolves to 'torch' now; force the 'c' branch to see the fallback warning
    monkeypatch.setattr("official_port.layers.resolve_kernel", lambda k, dev: "c")
    with torch.no_grad(), pytest.warns(UserWarning, match="C scan is unavailable"):
        got = c(x)[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        c(x)  # once per process
        assert torch.equal(got, ref(x)[0])


@needs_cc
def test_bad_inputs_raise():
    args, state = _inputs(1, 2, 8, 32, 16, 0)
    with pytest.raises(ValueError, match="float32 CPU"):
        c_scan.c_ttt_linear(*(a.double() for a in args), _state64(state))
    bad, _ = _inputs(1, 2, 8, 24, 16, 0)
    with pytest.raises(ValueError, match="multiple of 16"):
        c_scan.c_ttt_linear(*bad, InnerState((torch.zeros(1, 2, 24, 24), torch.zeros(1, 2, 1, 24)),
                                             torch.zeros(1, 2, 0, 24), torch.zeros(1, 2, 0, 24),
                                             torch.zeros(1, 2, 0)))
    leaf = args[0].clone().requires_grad_()
    with pytest.raises(ValueError, match="no autograd"):
        c_scan.c_ttt_linear(leaf, *args[1:], state)
    # the layer entry point: positions index the [m, d] RoPE table, so they must be reduced modulo m
    src, XV = torch.randn(1, 8, 64), args[2]
    tables = [torch.ones(16, 16), torch.zeros(16, 16)]
    common = (torch.ones(1, 2, 64), torch.zeros(2, 64), *tables)
    with pytest.raises(ValueError, match=r"positions must be in \[0, m = 16\)"):
        c_scan.c_ttt_linear_from_projections(src, src, None, *common, torch.arange(8)[None] + 10, XV, *args[3:], state)
    with pytest.raises(ValueError, match="conv_kernel"):
        c_scan.c_ttt_linear_from_projections(src, src, None, torch.ones(1, 2, 32), *common[1:], torch.zeros(1, 8),
                                             XV, *args[3:], state)
