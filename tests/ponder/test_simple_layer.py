"""PonderTTT's own layer (ponder/simple_layer.py): parity with the JAX fixtures, the analytic inner
gradient against autograd, the leak of the original update mode, and the causal variant."""

from __future__ import annotations

import pytest
import torch

from parity.fixtures import BUNDLED, find_cases, load_case
from parity.ponder import run_case
from ponder.simple_layer import PonderSimpleTTTLayer, SimpleTTTConfig, swiglu_fast_weights, swiglu_mse_grads

CASES = find_cases(BUNDLED / "ponder")


def test_bundled_cases_exist():
    assert {p.stem for p in CASES} >= {"ponder_simple_ff", "ponder_simple_ttt", "ponder_simple_ttt_b1",
                                       "ponder_simple_ttt_initstd"}


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_parity_with_jax_fixture(path):
    checks = run_case(load_case(path))
    assert len(checks) == 8  # output, ttt_loss, input grad, 5 parameter grads
    failed = [(c.name, c.max_rel, c.tol) for c in checks if not c.passed]
    assert not failed, failed


def test_parity_detects_skipped_update():
    # the update changes the output by 17% of max in this case: a port without it must fail
    case = load_case(BUNDLED / "ponder" / "ponder_simple_ttt.json")
    case.meta["call"]["inner_learning_rate"] = 1e-12
    checks = {c.name: c for c in run_case(case)}
    assert not checks["output/ttt_output"].passed


def _layer(D=8, H=2, F=12, C=4, lr=0.05, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = SimpleTTTConfig(hidden_dim=D, num_heads=H, head_dim=D // H, ttt_hidden_dim=F, chunk_size=C,
                          dropout_rate=0.0, inner_lr=lr, fast_init_std=0.3)
    return PonderSimpleTTTLayer(cfg).to(dtype).eval()


@pytest.mark.parametrize("shared", [True, False], ids=["shared_W", "per_row_W"])
def test_analytic_inner_gradient_matches_autograd(shared):
    torch.manual_seed(1)
    B, C, D, F = 3, 5, 6, 7
    u, v = torch.randn(B, C, D, dtype=torch.float64), torch.randn(B, C, D, dtype=torch.float64)
    shape0, shape1 = ((D, F), (F, D)) if shared else ((B, D, F), (B, F, D))
    w0, w2 = torch.randn(*shape0, dtype=torch.float64), torch.randn(*shape0, dtype=torch.float64)
    w1 = torch.randn(*shape1, dtype=torch.float64)
    loss, grads = swiglu_mse_grads(u, v, w0, w1, w2)
    for b in range(B):
        ws = [w.detach().clone().requires_grad_(True) for w in (w0, w1, w2)]
        sel = ws if shared else [w[b] for w in ws]
        ref_loss = (swiglu_fast_weights(u[b], sel[0], sel[1], sel[2]) - v[b]).pow(2).mean()
        ref = torch.autograd.grad(ref_loss, ws)
        torch.testing.assert_close(loss[b], ref_loss.detach(), rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g[b], r if shared else r[b], rtol=1e-10, atol=1e-12)


def test_outer_gradient_through_inner_updates_gradcheck():
    layer = _layer(D=4, H=2, F=5, C=3)
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    params = [layer.fast_w0, layer.fast_w1]

    def f(x, w0, w1):
        layer.fast_w0.data, layer.fast_w1.data = w0.detach(), w1.detach()
        state = layer.init_state(2)
        state.w0, state.w1 = w0.expand(2, -1, -1), w1.expand(2, -1, -1)
        return layer.forward_causal(x, state=state, inner_steps=2)[0]

    w = [p.detach().clone().requires_grad_(True) for p in params]
    assert torch.autograd.gradcheck(f, (x, *w), eps=1e-6, atol=1e-6)


def test_original_update_mode_leaks_within_chunk_and_across_rows():
    layer = _layer()
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    out, _ = layer(x, enable_internal_updates=True)
    x2 = x.clone()
    x2[:, 3] += 1.0  # last token of chunk 0
    out2, _ = layer(x2, enable_internal_updates=True)
    assert (out2[:, :3] - out[:, :3]).abs().max() > 1e-6  # earlier tokens of the chunk moved: not causal
    x3 = x.clone()
    x3[1] += 1.0  # another row
    out3, _ = layer(x3, enable_internal_updates=True)
    assert (out3[0] - out[0]).abs().max() > 1e-6  # row 0 depends on row 1 through the shared W


@pytest.mark.parametrize("t", [3, 4, 6], ids=["mid_mb_end", "mb_edge", "mid_mb"])
@pytest.mark.parametrize("k", [1, 4])
def test_causal_variant_is_causal_and_rows_independent(t, k):
    layer = _layer()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    out, stats, _ = layer.forward_causal(x, inner_steps=k)
    x2 = x.clone()
    x2[:, t:] += torch.randn_like(x2[:, t:])
    out2, _, _ = layer.forward_causal(x2, inner_steps=k)
    torch.testing.assert_close(out2[:, :t], out[:, :t], rtol=0, atol=0)
    assert (out2[:, t:] - out[:, t:]).abs().max() > 1e-6
    x3 = x.clone()
    x3[1] += 1.0
    out3, _, _ = layer.forward_causal(x3, inner_steps=k)
    torch.testing.assert_close(out3[0], out[0], rtol=0, atol=0)
    assert stats["recon_loss"].shape == (2, 3)


def test_causal_variant_split_equals_whole_and_updates_matter():
    layer = _layer()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    whole, stats, s_whole = layer.forward_causal(x, inner_steps=2)
    a, _, s = layer.forward_causal(x[:, :4], inner_steps=2)
    b, _, s = layer.forward_causal(x[:, 4:], state=s, inner_steps=2)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.w1, s_whole.w1, rtol=1e-12, atol=1e-12)
    assert s.seen_tokens == 12
    # k = 0 is the carried W without update; every later mini-batch then differs
    frozen, _, s0 = layer.forward_causal(x, inner_steps=0)
    torch.testing.assert_close(frozen[:, :4], whole[:, :4], rtol=1e-12, atol=1e-12)
    assert (frozen[:, 4:] - whole[:, 4:]).abs().max() > 1e-4
    torch.testing.assert_close(s0.w0, layer.fast_w0.expand(2, -1, -1))
    # the recon statistic of mini-batch 0 is the loss at the slow weights, equal for any k
    _, stats4, _ = layer.forward_causal(x, inner_steps=4)
    torch.testing.assert_close(stats4["recon_loss"][:, 0], stats["recon_loss"][:, 0])
    assert (stats4["recon_loss"][:, 1:] < stats["recon_loss"][:, 1:]).float().mean() > 0.5


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="num_heads \\* head_dim"):
        SimpleTTTConfig(hidden_dim=8, num_heads=3, head_dim=2)
    layer = _layer()
    with pytest.raises(ValueError, match="multiple of chunk_size=4"):
        layer(torch.randn(1, 6, 8, dtype=torch.float64), enable_internal_updates=True)
    with pytest.raises(ValueError, match="x must be a \\[B, T, D=8\\]"):
        layer.forward_causal(torch.randn(1, 6, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="inner_steps"):
        layer.forward_causal(torch.randn(1, 6, 8, dtype=torch.float64), inner_steps=-1)
