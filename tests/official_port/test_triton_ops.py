"""Triton TTT-Linear scan (forward and backward kernels) vs its torch twin (`dual_ttt_linear`, gradients
by autograd through it), run by Triton's interpreter on CPU.

fp32 and small shapes only: the interpreter's bf16 arithmetic is wrong and it is slow. The
TRITON_INTERPRET variable is set only while each test runs (the kernel is jitted lazily per value),
so it never leaks into other tests. Skips when triton is not installed.
"""

import pytest
import torch

pytest.importorskip("triton")

from official_port.configuration_ttt import TTTConfig  # noqa: E402
from official_port.layers import TTTMLP, TTTLinear  # noqa: E402
from official_port.ops import InnerState, dual_ttt_linear, dual_ttt_mlp  # noqa: E402
from official_port.ops.triton_dual import resolve_kernel, triton_ttt_linear, triton_ttt_mlp  # noqa: E402


@pytest.fixture
def interpret(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(B, H, T, d, m, r, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rn(*s, scale=1.0):
        return torch.randn(*s, generator=g) * scale

    return [rn(B, H, T, d), rn(B, H, T, d), rn(B, H, T, d), torch.rand(B, H, T, generator=g) * 0.1,
            torch.rand(m, generator=g) * 0.5 + 0.1, 1 + rn(H, d, scale=0.1), rn(H, d, scale=0.1),
            rn(B, H, d, d, scale=0.1), rn(B, H, 1, d, scale=0.1),
            rn(B, H, r, d), rn(B, H, r, d), torch.rand(B, H, r, generator=g) * 0.1]


def _run(op, base):
    ins = [t.clone().requires_grad_() for t in base]
    out, st = op(*ins[:7], InnerState((ins[7], ins[8]), ins[9], ins[10], ins[11]))[:2]
    return ins, out, st


def _close(name, ref, got, tol):
    err = (ref - got).abs().max().item() / max(ref.abs().max().item(), 1e-12)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("T,r", [(37, 5), (32, 0), (9, 3)], ids=["T37-buffered5", "T32-whole", "T9-no-update"])
def test_triton_scan_matches_dual(interpret, T, r):
    """Odd lengths, several mini-batches, state in (incl. buffered tokens), final state out, all grads."""
    base = _inputs(1, 2, T, 16, 16, r)
    ref_in, ref_out, ref_st = _run(dual_ttt_linear, base)
    tri_in, tri_out, tri_st = _run(triton_ttt_linear, base)
    _close("out", ref_out, tri_out, 1e-5)
    _close("W", ref_st.params[0], tri_st.params[0], 1e-5)
    _close("b", ref_st.params[1], tri_st.params[1], 1e-5)
    assert tri_st.k.shape == ref_st.k.shape and torch.equal(tri_st.k, ref_st.k)
    assert torch.equal(tri_st.gate, ref_st.gate)
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(t.shape, generator=g) for t in (ref_out, ref_st.params[0], ref_st.params[1], ref_st.k)]
    for out, st in ((ref_out, ref_st), (tri_out, tri_st)):
        outs = [out, st.params[0], st.params[1]] + ([st.k] if st.k.numel() else [])
        torch.autograd.backward(outs, ups[:len(outs)])
    names = ["XQ", "XK", "XV", "gate", "token_eta", "ln_weight", "ln_bias", "W0", "b0", "k", "v", "gate_buf"]
    for name, a, b in zip(names, ref_in, tri_in):
        if a.numel():
            _close(f"d{name}", a.grad, b.grad, 5e-5)


def test_triton_backward_kernel_batch_and_output_only(interpret, monkeypatch):
    """B = 2 (per-head grads summed over the batch), a loss on the outputs only (zero adjoint of
    the final params): every gradient from the Triton backward kernel equals autograd through the
    torch twin; the backward really is the kernel (its launcher is called once)."""
    import official_port.ops.triton_dual as td

    calls = []
    real = td.ttt_linear_scan_bwd
    monkeypatch.setattr(td, "ttt_linear_scan_bwd", lambda *a: calls.append(1) or real(*a))
    base = _inputs(2, 2, 21, 16, 16, 3, seed=7)
    ref_in, ref_out, _ = _run(dual_ttt_linear, base)
    tri_in, tri_out, _ = _run(triton_ttt_linear, base)
    up = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(2))
    (ref_out * up).sum().backward()
    (tri_out * up).sum().backward()
    assert calls == [1]
    names = ["XQ", "XK", "XV", "gate", "token_eta", "ln_weight", "ln_bias", "W0", "b0", "k", "v", "gate_buf"]
    for name, a, b in zip(names, ref_in, tri_in):
        _close(f"d{name}", a.grad, b.grad, 5e-5)


def _mlp_inputs(B, H, T, d, m, r, seed=0):
    """TTT-MLP inputs: the linear ones with (W1 [d, 4d], b1, W2 [4d, d], b2) as the state params."""
    base = _inputs(B, H, T, d, m, r, seed)
    g = torch.Generator().manual_seed(seed + 100)
    f = 4 * d
    params = [torch.randn(B, H, d, f, generator=g) * d ** -0.5, torch.randn(B, H, 1, f, generator=g) * 0.1,
              torch.randn(B, H, f, d, generator=g) * f ** -0.5, torch.randn(B, H, 1, d, generator=g) * 0.1]
    return base[:7] + params + base[9:]


def _run_mlp(op, base):
    ins = [t.clone().requires_grad_() for t in base]
    out, st = op(*ins[:7], InnerState(tuple(ins[7:11]), ins[11], ins[12], ins[13]))[:2]
    return ins, out, st


@pytest.mark.parametrize("T,r", [(37, 5), (9, 3)], ids=["T37-buffered5", "T9-no-update"])
def test_triton_mlp_scan_matches_dual(interpret, monkeypatch, T, r):
    """TTT-MLP kernels: odd lengths, several mini-batches, state in (buffered tokens), final state
    (4 params) out; every gradient from the Triton backward kernel (its launcher runs once) equals
    autograd through the torch twin."""
    import official_port.ops.triton_dual as td

    calls = []
    real = td.ttt_mlp_scan_bwd
    monkeypatch.setattr(td, "ttt_mlp_scan_bwd", lambda *a: calls.append(1) or real(*a))
    base = _mlp_inputs(1, 2, T, 16, 16, r, seed=T)
    base[0:3] = [t * 0.5 for t in base[0:3]]
    ref_in, ref_out, ref_st = _run_mlp(dual_ttt_mlp, base)
    tri_in, tri_out, tri_st = _run_mlp(triton_ttt_mlp, base)
    _close("out", ref_out, tri_out, 1e-5)
    for i, (a, b) in enumerate(zip(ref_st.params, tri_st.params)):
        _close(f"param {i}", a, b, 1e-5)
    assert torch.equal(tri_st.k, ref_st.k) and torch.equal(tri_st.gate, ref_st.gate)
    g = torch.Generator().manual_seed(1)
    outs = [(o, *st.params) for o, st in ((ref_out, ref_st), (tri_out, tri_st))]
    ups = [torch.randn(t.shape, generator=g) for t in outs[0]]
    for o in outs:
        torch.autograd.backward(list(o), ups)
    assert calls == [1]
    names = ["XQ", "XK", "XV", "gate", "token_eta", "ln_weight", "ln_bias", "W1", "b1", "W2", "b2", "k", "v", "gate_buf"]
    for name, a, b in zip(names, ref_in, tri_in):
        _close(f"d{name}", a.grad, b.grad, 5e-5)


def test_triton_scan_is_causal(interpret):
    """Both kernels: perturbing tokens >= t (mid mini-batch) leaves outputs before t unchanged."""
    t = 21
    for op, run, make in ((triton_ttt_linear, _run, _inputs), (triton_ttt_mlp, _run_mlp, _mlp_inputs)):
        base = make(1, 1, 40, 16, 16, 0, seed=3)
        out = run(op, base)[1].detach()
        pert = [x.clone() for x in base]
        for i in (0, 1, 2):
            pert[i][:, :, t:] += 1.0
        pert[3][:, :, t:] += 0.05
        out2 = run(op, pert)[1].detach()
        assert torch.equal(out[:, :, :t], out2[:, :, :t]), op.__name__
        assert not torch.allclose(out[:, :, t:], out2[:, :, t:]), op.__name__


def test_layer_kernel_option(interpret):
    """kernel='triton' on both layers gives the dual form's output; 'auto' on CPU never picks triton (it picks
    the C scan or torch: tests/official_port/test_c_scan.py); bad values fail."""
    cfg = TTTConfig(hidden_size=32, num_attention_heads=2, mini_batch_size=16, intermediate_size=64,
                    num_hidden_layers=1, vocab_size=64)
    torch.manual_seed(0)
    x = torch.randn(1, 21, 32)
    for cls in (TTTLinear, TTTMLP):
        ref = cls(cfg, kernel="torch")
        tri = cls(cfg, kernel="triton")
        tri.load_state_dict(ref.state_dict())
        assert tri._use_triton(x.new_zeros(1, 1, 1, 16), False, 1)
        _close(f"{cls.__name__} out", ref(x)[0], tri(x)[0], 1e-5)
    assert resolve_kernel("auto", torch.device("cpu")) in ("c", "torch")
    with pytest.raises(ValueError, match="kernel="):
        TTTLinear(cfg, kernel="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_scan_cuda_head_size():
    """Compiled kernels at the real head size (d=64) and a long odd length vs the dual form on CUDA:
    outputs, final params and every gradient."""
    base = [t.cuda() for t in _inputs(2, 3, 301, 64, 16, 7, seed=5)]
    base[0:3] = [t * 64 ** -0.5 for t in base[0:3]]
    ref_in, ref_out, ref_st = _run(dual_ttt_linear, base)
    tri_in, tri_out, tri_st = _run(triton_ttt_linear, base)
    _close("out", ref_out, tri_out, 1e-5)
    _close("W", ref_st.params[0], tri_st.params[0], 1e-5)
    g = torch.Generator(device="cuda").manual_seed(1)
    ups = [torch.randn(t.shape, generator=g, device="cuda") for t in (ref_out, ref_st.params[0], ref_st.params[1])]
    for out, st in ((ref_out, ref_st), (tri_out, tri_st)):
        torch.autograd.backward([out, st.params[0], st.params[1]], ups)
    for i, (a, b) in enumerate(zip(ref_in, tri_in)):
        _close(f"grad {i}", a.grad, b.grad, 5e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_mlp_scan_cuda_head_size():
    """Compiled TTT-MLP kernels at the real head size (d=64, hidden 256), a long odd length, vs the dual
    form: outputs, final params and every gradient."""
    base = [t.cuda() for t in _mlp_inputs(2, 3, 301, 64, 16, 7, seed=5)]
    base[0:3] = [t * 64 ** -0.5 for t in base[0:3]]
    ref_in, ref_out, ref_st = _run_mlp(dual_ttt_mlp, base)
    tri_in, tri_out, tri_st = _run_mlp(triton_ttt_mlp, base)
    _close("out", ref_out, tri_out, 1e-5)
    for i, (a, b) in enumerate(zip(ref_st.params, tri_st.params)):
        _close(f"param {i}", a, b, 1e-5)
    g = torch.Generator(device="cuda").manual_seed(1)
    outs = [(o, *st.params) for o, st in ((ref_out, ref_st), (tri_out, tri_st))]
    ups = [torch.randn(t.shape, generator=g, device="cuda") for t in outs[0]]
    for o in outs:
        torch.autograd.backward(list(o), ups)
    for i, (a, b) in enumerate(zip(ref_in, tri_in)):
        _close(f"grad {i}", a.grad, b.grad, 5e-5)
