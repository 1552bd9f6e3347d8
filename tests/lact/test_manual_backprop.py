"""Manual backprop (`backprop="manual"`, `LaCTSwiGLUFunction`) vs autograd through the unrolled loop.

Every configuration (r in {1, 2, 3} x plain/residual/greedy x momentum x Muon x pre-norm) must give
the same output bit for bit (the forward runs the same `chunk_step`) and the same gradient for every
input; float64 `gradcheck` checks the manual backward against finite differences independently.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lact.ops import LaCTSwiGLUFunction, lact_swiglu
from lact.ops.chunk import check_lact_inputs
from lact.ops.manual_backprop import manual_lact_swiglu
from tests.helpers import assert_close
from tests.lact.inputs import NAMES, make_inputs


def run(levels, x, chunk, cot, backprop, grad_weights=True, grad_seq=True, **kw):
    levels = [tuple(w.clone().requires_grad_(grad_weights) for w in lvl) for lvl in levels]
    x = {k: (None if t is None else t.clone().requires_grad_(grad_seq)) for k, t in x.items()}
    o = lact_swiglu(levels, x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], chunk,
                    momentum=x["momentum"], backprop=backprop, **kw)
    ins = ([w for lvl in levels for w in lvl] if grad_weights else []) + (
        [x[n] for n in NAMES if x[n] is not None] if grad_seq else [])
    return o, torch.autograd.grad(o, ins, cot, allow_unused=True, materialize_grads=True)


MODES = ["plain", "residual", "greedy"]
FLAGS = list(itertools.product([False, True], repeat=3))  # momentum, muon, prenorm


def kwargs(mode, flags):
    mom, muon, pre = flags
    return mom, dict(use_muon=muon, prenorm=pre, residual=mode == "residual", greedy=mode == "greedy")


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "mom{}-muon{}-pre{}".format(*map(int, f)))
def test_manual_equals_autograd_every_config(r, mode, flags):
    mom, kw = kwargs(mode, flags)
    levels, x = make_inputs(r=r, momentum=mom, seed=10 + r)
    cot = torch.randn(2, 11, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    o_a, g_a = run(levels, x, 4, cot, "autograd", **kw)
    o_m, g_m = run(levels, x, 4, cot, "manual", **kw)
    assert torch.equal(o_m, o_a)
    for i, (gm, ga) in enumerate(zip(g_m, g_a)):
        assert torch.isfinite(gm).all()
        assert_close(f"grad {i}", ga, gm, 1e-10)


GRADCHECK_CONFIGS = [
    (1, "plain", (True, False, False)),
    (1, "plain", (True, False, True)),
    (2, "plain", (True, False, False)),
    (2, "residual", (True, False, True)),
    (2, "greedy", (True, False, False)),
    (3, "residual", (False, False, False)),
]


@pytest.mark.parametrize("r,mode,flags", GRADCHECK_CONFIGS, ids=lambda c: str(c))
def test_manual_gradcheck_float64(r, mode, flags):
    """Finite differences (float64) vs the manual backward on tiny shapes (Muon is bfloat16 inside,
    so it has no meaningful finite differences: it is covered by the autograd comparison above)."""
    mom, kw = kwargs(mode, flags)
    levels, x = make_inputs(r=r, n=1, d=3, d_h=4, T=5, momentum=mom, seed=3)
    # larger rates so the updates matter at this scale
    for n in ("lr0", "lr1", "lr2"):
        x[n] = x[n] * 5
    tensors = [w.clone().requires_grad_() for lvl in levels for w in lvl] + [
        x[n].clone().requires_grad_() for n in NAMES if x[n] is not None]

    def f(*ts):
        lv = [tuple(ts[3 * i: 3 * i + 3]) for i in range(r)]
        rest = ts[3 * r:]
        m = rest[6] if mom else None
        return lact_swiglu(lv, *rest[:6], 2, momentum=m, backprop="manual", **kw)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_manual_realistic_float32():
    """Float32 at a layer-like size: r = 2, residual, momentum, pre-norm, several chunks + remainder."""
    levels, x = make_inputs(r=2, n=2, d=32, d_h=64, T=120, dtype=torch.float32, seed=4)
    cot = torch.randn(2, 120, 32, generator=torch.Generator().manual_seed(2))
    kw = dict(residual=True, prenorm=True)
    o_a, g_a = run(levels, x, 32, cot, "autograd", **kw)
    o_m, g_m = run(levels, x, 32, cot, "manual", **kw)
    assert torch.equal(o_m, o_a)
    for i, (gm, ga) in enumerate(zip(g_m, g_a)):
        assert_close(f"grad {i}", ga, gm, 1e-5)


@pytest.mark.parametrize("grad_weights,grad_seq", [(False, True), (True, False)])
def test_partial_requires_grad(grad_weights, grad_seq):
    levels, x = make_inputs(r=2)
    cot = torch.randn(2, 11, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, g_a = run(levels, x, 4, cot, "autograd", grad_weights, grad_seq)
    _, g_m = run(levels, x, 4, cot, "manual", grad_weights, grad_seq)
    assert len(g_m) == len(g_a) > 0
    for i, (gm, ga) in enumerate(zip(g_m, g_a)):
        assert_close(f"grad {i}", ga, gm, 1e-10)


def test_low_rank_factors_get_gradients():
    """Low-rank w = left @ right + 0.5 I materialised outside the op (as the layer does)."""
    n, d, d_h, rank, T = 2, 6, 6, 2, 11
    g = torch.Generator().manual_seed(7)
    _, x = make_inputs(r=2, n=n, d=d, d_h=d_h, T=T)
    params = {f"{nm}{i}": torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3
              for i in range(2) for nm, shape in (("l0", (d_h, rank)), ("r0", (rank, d)), ("l2", (d_h, rank)),
                                                   ("r2", (rank, d)), ("w1", (d, d_h)))}
    cot = torch.randn(n, T, d, dtype=torch.float64, generator=g)

    def grads(backprop):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        eye = 0.5 * torch.eye(d_h, d, dtype=torch.float64)
        levels = [((p[f"l0{i}"] @ p[f"r0{i}"] + eye).expand(n, -1, -1), p[f"w1{i}"].expand(n, -1, -1),
                   (p[f"l2{i}"] @ p[f"r2{i}"] + eye).expand(n, -1, -1)) for i in range(2)]
        o = lact_swiglu(levels, x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], 4,
                        momentum=x["momentum"], backprop=backprop)
        return torch.autograd.grad(o, list(p.values()), cot)

    for i, (ga, gm) in enumerate(zip(grads("autograd"), grads("manual"))):
        assert ga.abs().max() > 0
        assert_close(f"grad {i}", ga, gm, 1e-10)


def _saved_bytes(backprop, T, r=2, keep_last=None):
    levels, x = make_inputs(r=r, n=1, d=16, d_h=16, T=T, dtype=torch.float32)
    levels = [tuple(w.requires_grad_() for w in lvl) for lvl in levels]
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    args = (x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if keep_last is None:
            lact_swiglu(levels, *args, 16, momentum=x["momentum"], backprop=backprop)
        else:
            _, opts = check_lact_inputs(levels, *args, 16, x["momentum"], False, False, False, False)
            manual_lact_swiglu(levels, *args, x["momentum"], opts, keep_last=keep_last)
    return total


def test_manual_saves_far_less_for_backward():
    """Autograd keeps every chunk's activations; manual keeps the inputs, one small state per chunk
    and the graph of the last `keep_last` chunks."""
    auto, auto2 = _saved_bytes("autograd", 192), _saved_bytes("autograd", 384)
    manual, manual2 = _saved_bytes("manual", 192), _saved_bytes("manual", 384)
    assert auto2 > 1.8 * auto
    assert manual < 0.25 * auto  # 12 chunks, the graph of 2 kept
    assert manual2 - manual < 0.05 * (auto2 - auto)  # growth with T: inputs + states only
    assert _saved_bytes("manual", 192, keep_last=0) < _saved_bytes("manual", 192, keep_last=1) < manual


@pytest.mark.parametrize("r,mode,flags", [(2, "residual", (True, True, True)), (3, "greedy", (True, False, False)),
                                          (1, "plain", (False, False, True))], ids=str)
@pytest.mark.parametrize("T", [3, 9, 11])  # one chunk, two chunks + tail, remainder
def test_recompute_everything_equals_kept_graph(r, mode, flags, T):
    """Keeping the graph of 0, 1, 2 or all trailing chunks gives the autograd numbers."""
    mom, kw = kwargs(mode, flags)
    levels, x = make_inputs(r=r, momentum=mom, T=T, seed=2)
    cot = torch.randn(2, T, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, g_a = run(levels, x, 4, cot, "autograd", **kw)
    for keep in (0, 1, 2, 99):
        lv = [tuple(w.clone().requires_grad_() for w in lvl) for lvl in levels]
        xx = {k: (None if t is None else t.clone().requires_grad_()) for k, t in x.items()}
        args = (xx["q"], xx["k"], xx["v"], xx["lr0"], xx["lr1"], xx["lr2"])
        _, opts = check_lact_inputs(lv, *args, 4, xx["momentum"], kw["use_muon"], kw["prenorm"],
                                    kw["residual"], kw["greedy"])
        o = manual_lact_swiglu(lv, *args, xx["momentum"], opts, keep_last=keep)
        ins = [w for lvl in lv for w in lvl] + [xx[n] for n in NAMES if xx[n] is not None]
        g_m = torch.autograd.grad(o, ins, cot, allow_unused=True, materialize_grads=True)
        for i, (gm, ga) in enumerate(zip(g_m, g_a)):
            assert_close(f"grad {i}", ga, gm, 1e-10)


def test_function_is_the_manual_path():
    levels, x = make_inputs(r=2)
    levels = [tuple(w.requires_grad_() for w in lvl) for lvl in levels]
    o = lact_swiglu(levels, x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], 4, backprop="manual")
    # the output's graph node is that autograd.Function's own backward (not autograd through the loop)
    assert getattr(o.grad_fn, "_forward_cls", None) is LaCTSwiGLUFunction


def test_manual_under_no_grad_builds_no_graph():
    levels, x = make_inputs(r=2)
    levels = [tuple(w.requires_grad_() for w in lvl) for lvl in levels]
    args = (x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], 4)
    with torch.no_grad():
        o = lact_swiglu(levels, *args, momentum=x["momentum"], backprop="manual")
    assert o.grad_fn is None and not o.requires_grad
    assert torch.equal(o, lact_swiglu(levels, *args, momentum=x["momentum"]).detach())


def test_bench_prints_ratios(capsys, tmp_path, monkeypatch):
    """The benchmark CLI end to end on a toy size; workers run in-process here (the CLI spawns a
    fresh subprocess per measurement, which only costs start-up time)."""
    import json

    import lact.bench as bench

    def in_process(cfg, mode, common):
        p = bench.build_parser()
        return bench.worker(p.parse_args(["--worker", "--mode", mode, "--r", str(cfg["r"]), "--T", str(cfg["T"]), *common]))

    monkeypatch.setattr(bench, "measure", in_process)
    out = tmp_path / "bench.json"
    bench.main(["--configs", "2:80", "--chunk", "16", "--n", "1", "--d", "8", "--d-h", "8", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "mem ratio" in printed and "time ratio" in printed
    row = json.loads(out.read_text())["rows"][0]
    assert row["r"] == 2 and row["T"] == 80
    assert row["manual"]["time_s"] > 0 and row["autograd"]["time_s"] > 0
    assert row["mem_ratio"] == row["manual"]["peak_bytes"] / row["autograd"]["peak_bytes"]


def test_manual_with_d_out_not_d_in():
    """A single MLP may map d_in -> d_out != d_in (as the reference allows)."""
    g = torch.Generator().manual_seed(8)
    n, d, d_out, d_h, T = 2, 6, 5, 8, 11
    levels = [(torch.randn(n, d_h, d, generator=g, dtype=torch.float64) * 0.4,
               torch.randn(n, d_out, d_h, generator=g, dtype=torch.float64) * 0.4,
               torch.randn(n, d_h, d, generator=g, dtype=torch.float64) * 0.4)]
    _, x = make_inputs(r=1, n=n, d=d, T=T)
    x["v"] = F.silu(torch.randn(n, T, d_out, generator=g, dtype=torch.float64))
    cot = torch.randn(n, T, d_out, generator=g, dtype=torch.float64)
    o_a, g_a = run(levels, x, 4, cot, "autograd", prenorm=True)
    o_m, g_m = run(levels, x, 4, cot, "manual", prenorm=True)
    assert o_m.shape == (n, T, d_out) and torch.equal(o_m, o_a)
    for i, (gm, ga) in enumerate(zip(g_m, g_a)):
        assert_close(f"grad {i}", ga, gm, 1e-10)


def test_bench_layer_mode_measures_the_whole_layer(capsys, tmp_path, monkeypatch):
    """`--layer`: the whole LaCTSWIGLULayer (toy config), both backprop modes, fresh-process contract kept."""
    import json

    import lact.bench as bench

    seen = []

    def in_process(cfg, mode, common):
        seen.append((cfg["r"], mode, common))
        p = bench.build_parser()
        return bench.worker(p.parse_args(["--worker", "--mode", mode, "--r", str(cfg["r"]), "--T", str(cfg["T"]), *common]))

    monkeypatch.setattr(bench, "measure", in_process)
    out = tmp_path / "bench.json"
    bench.main(["--layer", "--layer-config", "lact_debug", "--configs", "2:40", "--json", str(out)])
    assert "LaCTSWIGLULayer (lact_debug" in capsys.readouterr().out
    assert [(r, mode) for r, mode, _ in seen] == [(2, "autograd"), (2, "manual")]
    assert all("--layer" in common for _, _, common in seen)
    row = json.loads(out.read_text())["rows"][0]
    assert row["manual"]["time_s"] > 0 and row["autograd"]["time_s"] > 0 and "error" not in row["manual"]
