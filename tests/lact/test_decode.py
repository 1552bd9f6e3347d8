"""LaCT decoding with a carried state (`LaCTCache`, `lact_swiglu_with_state`): token by token and in
pieces == one full forward, across several chunk boundaries, for every fast-weight variant.

Muon: the update is orthogonalised in bfloat16 (as the reference), and the LaCT recurrence is chaotic
there: a float32 round-off difference in a layer's input (decoding multiplies [1, d] rows where the full
forward multiplies [T, d] blocks, so BLAS sums in another order) can flip one bfloat16 rounding and the
trajectories part (measured: ~2e-2 on the logits after 19 tokens). Exact agreement is therefore tested in
float64, where round-off (~1e-16) is far below a bfloat16 ulp and flips do not happen, and at the op
level in float32, where the keys and values are bit-identical inputs and so the updates are too.
"""

from __future__ import annotations

import json

import pytest
import torch

from lact import LaCTForCausalLM
from lact.layers import cached_window_attention, window_attention
from lact.ops import lact_swiglu, lact_swiglu_with_state
from tests.lact.test_modeling import perturb_params, tiny_config
from ttt_common.hf_compat import CACHE_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


# chunk 4, window 3, 19 tokens: four chunk boundaries, a full pending chunk at t = 8, 12, 16
VARIANTS = {
    "r1": dict(use_momentum=False),
    "r1-momentum": dict(use_momentum=True),
    "r2-stacked": dict(r=2, use_momentum=False),
    "r2-residual-prenorm": dict(r=2, residual_ttt=True, ttt_prenorm=True),
    "low-rank": dict(w0_w2_low_rank=4),
    "muon": dict(use_muon=True),
    "r2-greedy-muon": dict(r=2, greedy_ttt=True, use_muon=True),
}


def _model(kw, dtype):
    torch.manual_seed(0)
    model = LaCTForCausalLM(tiny_config(num_hidden_layers=2, lact_chunk_size=4, window_size=3, **kw)).to(dtype).eval()
    perturb_params(model, seed=1, scale=0.05)
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_token_by_token_and_two_halves_equal_full_forward(name):
    kw = VARIANTS[name]
    dtype = torch.float64 if kw.get("use_muon") else torch.float32  # see the module docstring
    model = _model(kw, dtype)
    x = torch.randint(0, 32, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x).logits
        cache, steps = None, []
        for t in range(x.shape[1]):
            out = model(x[:, t:t + 1], use_cache=True, **{CACHE_NAME: cache})
            cache = getattr(out, CACHE_NAME)
            steps.append(out.logits)
        assert cache.get_seq_length() == 19
        first = model(x[:, :9], use_cache=True)
        second = model(x[:, 9:], cache=getattr(first, CACHE_NAME))  # the name transformers >= 5.24 uses
        third = model(x[:, 9:], past_key_values=getattr(first, CACHE_NAME))  # and the older one
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.cat((first.logits, second.logits), 1), full, rtol=0, atol=1e-4)
    assert torch.equal(second.logits, third.logits)


@pytest.mark.parametrize("kw", [dict(), dict(use_muon=True), dict(prenorm=True, residual=True), dict(greedy=True)],
                         ids=["plain", "muon", "prenorm-residual", "greedy"])
def test_op_with_state_in_pieces_equals_whole(kw):
    """Float32, identical inputs: the carried op is the full op up to the queries' matmul shapes."""
    g = torch.Generator().manual_seed(3)
    n, T, d, d_h, chunk = 4, 23, 8, 12, 5
    levels = [tuple(torch.randn(*s, generator=g) / 3 for s in ((n, d_h, d), (n, d, d_h), (n, d_h, d)))
              for _ in range(2)]
    q, k, v = (torch.nn.functional.normalize(torch.randn(n, T, d, generator=g), dim=-1) for _ in range(3))
    lrs = [0.1 * torch.rand(n, T, 1, generator=g) for _ in range(3)]
    mom = torch.rand(n, T, 1, generator=g)
    whole = lact_swiglu(levels, q, k, v, *lrs, chunk, momentum=mom, **kw)
    for cuts in ([11], list(range(1, T)), [5, 10, 15, 20]):  # on and off chunk boundaries, every token
        state, outs = None, []
        for s, e in zip([0] + cuts, cuts + [T]):
            o, state = lact_swiglu_with_state(levels if state is None else None, q[:, s:e], k[:, s:e], v[:, s:e],
                                              *[x[:, s:e] for x in lrs], chunk, momentum=mom[:, s:e],
                                              initial_state=state, **kw)
            outs.append(o)
        torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-6)
        assert state.seen == T and state.pending[0].shape[1] == 3  # 23 = 4 chunks of 5 + 3 pending


@pytest.mark.parametrize("window", [1, 3, None])
def test_cached_window_attention_matches_full_window_attention(window):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 10, 2, 4, generator=g) for _ in range(3))
    full = window_attention(q, k, v, window)
    for p in (0, 6, 9):
        past = slice(max(p - (window or p) + 1, 0) if window else 0, p)  # only the window's keys are cached
        out = cached_window_attention(q[:, p:], k[:, p:], v[:, p:], k[:, past], v[:, past], window)
        torch.testing.assert_close(out, full[:, p:], rtol=0, atol=1e-6)
    # a NaN value poisons exactly the queries whose window holds it
    v_bad = v.clone()
    v_bad[0, 7, 1, 0] = float("nan")
    out = cached_window_attention(q[:, 8:], k[:, 8:], v_bad[:, 8:], k[:, :8], v_bad[:, :8], window)
    reach = torch.tensor([window is None or 8 - 7 < window, window is None or 9 - 7 < window])
    assert torch.equal(out[0, :, 1].isnan().any(-1), reach) and not out[1].isnan().any()


def test_cache_holds_only_the_window_and_one_pending_chunk():
    model = _model(dict(use_momentum=True), torch.float32)
    x = torch.randint(0, 32, (2, 14))
    with torch.no_grad():
        cache = getattr(model(x, use_cache=True), CACHE_NAME)
    for entry in cache.layers:
        assert entry.keys.shape[1] == 2 and entry.values.shape[1] == 2  # window 3: two past keys
        assert entry.fast.pending[0].shape[1] == 2  # 14 = 3 chunks of 4 + 2 pending
        assert entry.seen == 14


def test_reorder_cache_selects_batch_rows():
    model = _model(dict(r=2), torch.float32)
    x = torch.randint(0, 32, (3, 10))
    with torch.no_grad():
        cache = getattr(model(x, use_cache=True), CACHE_NAME)
        cache.reorder_cache(torch.tensor([2, 0]))
        nxt = torch.randint(0, 32, (3, 1))
        got = model(nxt[[2, 0]], cache=cache).logits
        want = model(torch.cat((x, nxt), 1)[[2, 0]]).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_bench_decode_runs_and_both_modes_pick_the_same_tokens(tmp_path, capsys):
    from lact.bench_decode import main

    out = tmp_path / "bench.json"
    assert main(["--context", "40", "--new-tokens", "3", "--recompute-tokens", "2", "--hidden", "16", "--chunk", "8",
                 "--window", "4", "--vocab", "32", "--json", str(out)]) == 0
    assert "tokens/s" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["tokens_agree"] and result["cache_tokens_per_s"] > 0


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_feeds_one_token_per_step_with_the_cache(use_cache):
    model = _model(dict(r=2), torch.float32)
    lengths = []
    model.model.embeddings.register_forward_hook(lambda mod, inp, out: lengths.append(inp[0].shape[1]))
    x = torch.randint(1, 32, (2, 6))
    out = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=use_cache)
    assert lengths == ([6, 1, 1, 1, 1] if use_cache else [6, 7, 8, 9, 10])  # without: the whole prefix each step
    seq = x
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat((seq, model(seq).logits[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(out, seq)
