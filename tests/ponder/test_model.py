"""Backbone, cache, adaptive composition and the chunk environment (ponder/backbone.py, cache.py,
adaptive.py, env.py, types.py), on a tiny random GPT-2 saved to a temp folder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ponder import cache as cache_mod
from ponder.adaptive import LAYER_KINDS, AdaptiveConfig, AdaptiveLM
from ponder.backbone import load_backbone, resolve_base
from ponder.cache import CachedDoc, build_cache, compute_chunk, select_documents
from ponder.env import PonderEnv
from ponder.types import ACTIONS, flops_multiplier
from tests.ponder.synthetic import make_tiny_gpt2

TEXT = ("def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
        "    def push(self, x):\n        self.items.append(x)\n\n    def pop(self):\n        return self.items.pop()\n") * 3


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_backbone(make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2")))


def test_cost_model():
    assert [flops_multiplier(a) for a in ACTIONS] == [1.0, 3.0, 5.0, 9.0]
    with pytest.raises(ValueError, match="UPDATE_3"):
        flops_multiplier("UPDATE_3")


def test_backbone_is_frozen_and_resolves_paths(backbone, tmp_path):
    assert not backbone.model.training
    assert all(not p.requires_grad for p in backbone.model.parameters())
    assert "local folder" in backbone.reason
    (tmp_path / "f.bin").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a model folder"):
        resolve_base(str(tmp_path / "f.bin"))
    assert resolve_base("some-org/some-model")[0] == "some-org/some-model"


def test_cached_skip_statistics_match_backbone_logits(backbone):
    ids = backbone.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:20]
    chunk = compute_chunk(backbone, ids)
    logits = backbone.model(torch.tensor([ids])).logits[0]
    ref = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    torch.testing.assert_close(-chunk.skip_logprob, ref, rtol=1e-5, atol=1e-5)
    p = logits.softmax(-1)
    torch.testing.assert_close(chunk.max_prob, p.max(-1).values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunk.entropy, -(p * p.clamp_min(1e-30).log()).sum(-1), rtol=1e-4, atol=1e-5)
    assert chunk.hidden.shape == (20, 32) and chunk.n_scored == 19


def test_cache_is_reused_and_keyed_by_chunking(backbone, tmp_path, monkeypatch):
    docs = select_documents([TEXT, "x = 1\n" * 40], backbone.tokenizer, 2, chunk_size=16, max_chunks=3)
    assert [len(c) for _, c in docs] == [3, 3]
    first = build_cache(backbone, docs, 16, tmp_path, progress=False)

    def boom(*a, **k):
        raise AssertionError("backbone recomputed despite a cache hit")

    monkeypatch.setattr(cache_mod, "compute_chunk", boom)
    again = build_cache(backbone, docs, 16, tmp_path, progress=False)
    torch.testing.assert_close(again[0].chunks[1].hidden, first[0].chunks[1].hidden)
    docs8 = select_documents([TEXT], backbone.tokenizer, 1, chunk_size=8, max_chunks=3)
    with pytest.raises(AssertionError, match="recomputed"):  # other chunking: other key
        build_cache(backbone, docs8, 8, tmp_path, progress=False)



def test_retime_backbone_replaces_stale_cached_times(backbone, tmp_path, monkeypatch):
    """A cache entry written on a loaded machine records a slow forward; the evaluation re-times the
    backbone now and scales by token count (a 16-token chunk costs twice an 8-token one)."""
    from ponder.cache import retime_backbone

    docs = build_cache(backbone, select_documents([TEXT], backbone.tokenizer, 1, chunk_size=16, max_chunks=3),
                       16, tmp_path, progress=False)
    for c in docs[0].chunks:
        c.backbone_s = 100.0  # as if written under heavy load
    clock = iter(range(1000))
    monkeypatch.setattr(cache_mod.time, "perf_counter", lambda: 0.5 * next(clock))  # every call "takes" 0.5 s
    s_tok = retime_backbone(backbone, docs, n_chunks=2)
    assert s_tok == pytest.approx(0.5 / 16)
    assert [c.backbone_s for c in docs[0].chunks] == pytest.approx([0.5 * c.input_ids.numel() / 16
                                                                   for c in docs[0].chunks])
    with pytest.raises(ValueError, match="at least one"):
        retime_backbone(backbone, [])

def _model(backbone, kind, gain=0.5, seed=0):
    torch.manual_seed(seed)
    m = AdaptiveLM(AdaptiveConfig(hidden_size=backbone.hidden_size, layer=kind, mini_batch_size=4,
                                  simple_inner_lr=0.1), backbone.embedding)
    with torch.no_grad():
        m.residual_gain.fill_(gain)
    return m.eval()


def test_zero_gain_reproduces_skip_exactly(backbone):
    ids = torch.tensor(backbone.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:24])
    hidden, logits = backbone.forward_chunk(ids[None])
    m = _model(backbone, "official-linear", gain=0.0)
    adapted, recon, _ = m.adapt(hidden, None, 2)
    torch.testing.assert_close(m.logits(adapted), logits, rtol=1e-5, atol=1e-5)  # tied head == backbone head
    assert torch.isfinite(recon).all()


def _doc_logits(backbone, model, ids, chunk_size, k):
    """Per-token logits of a whole document processed chunk by chunk with the carried state."""
    out, state = [], None
    for s in range(0, len(ids), chunk_size):
        hidden, _ = backbone.forward_chunk(torch.tensor([ids[s:s + chunk_size]]))
        adapted, _, state = model.adapt(hidden, state, k)
        out.append(model.logits(adapted)[0])
    return torch.cat(out)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("t", [8, 13], ids=["chunk_edge", "mid_chunk"])
def test_causality_across_chunk_boundaries(backbone, kind, t):
    ids = backbone.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:24]
    model = _model(backbone, kind)
    for k in (0, 1, 4):  # 0: STATIC
        with torch.no_grad():
            ref = _doc_logits(backbone, model, ids, 8, k)
            bad = ids[:t] + [(i * 7 + 11) % 50000 for i in ids[t:]]
            got = _doc_logits(backbone, model, bad, 8, k)
        # logits at positions <= t - 1 predict tokens <= t and may read tokens < t only
        torch.testing.assert_close(got[:t], ref[:t], rtol=0, atol=0)
        assert (got[t:] - ref[t:]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def cached(backbone, tmp_path_factory):
    docs = select_documents([TEXT, "import os\nprint(os.getcwd())\n" * 12], backbone.tokenizer, 2, chunk_size=12,
                            max_chunks=3)
    return build_cache(backbone, docs, 12, tmp_path_factory.mktemp("cache"), progress=False)


def _run(env, doc_id, actions, peek=False):
    env.reset(doc_id)
    recs = []
    for a in actions:
        if peek:
            env.peek_losses()
            env.current_stats()
        recs.append(env.step(a)[0])
    return recs


def test_env_skip_update_and_memo_do_not_change_numbers(backbone, cached):
    model = _model(backbone, "official-linear")
    env = PonderEnv(model, cached)
    doc = cached[0]
    recs = _run(env, doc.doc_id, ["SKIP", "UPDATE_2", "UPDATE_1"])
    assert recs[0].loss == pytest.approx(doc.chunks[0].skip_loss)
    # cost = counted FLOPs over SKIP's on the same chunk: every non-SKIP action pays at least the
    # tied head, 2 (T - 1) D V (counted by hand here), and UPDATE_2 more than UPDATE_1
    D, V = model.head_weight.shape[1], model.head_weight.shape[0]
    assert recs[0].cost == 1.0 and recs[0].flops == recs[0].skip_flops
    for r in recs[1:]:
        assert r.flops - r.skip_flops >= 2 * r.n_tokens * D * V
    # STATIC runs the official dual form with every inner learning rate x 0 (the same matmuls as
    # UPDATE_1), and its count says so: it is charged what actually runs
    assert env.extra_flops("UPDATE_2", 12) > env.extra_flops("UPDATE_1", 12) >= env.extra_flops("STATIC", 12) > 0
    # SKIP leaves the state untouched: chunk 1 under UPDATE_2 after SKIP == from the fresh state
    with torch.no_grad():
        adapted, _, _ = model.adapt(doc.chunks[1].hidden[None], None, 2)
        ref = float(model.lm_loss(adapted, doc.chunks[1].input_ids[None]))
    assert recs[1].loss == pytest.approx(ref, rel=1e-6)
    # peeking (all actions) and memoisation leave every number unchanged; a fresh env agrees
    again = _run(env, doc.doc_id, ["SKIP", "UPDATE_2", "UPDATE_1"], peek=True)
    fresh = _run(PonderEnv(model, cached, max_memo=1), doc.doc_id, ["SKIP", "UPDATE_2", "UPDATE_1"])
    for a, b, c in zip(recs, again, fresh):
        assert a.loss == b.loss == pytest.approx(c.loss, rel=1e-6)
        assert a.recon_loss == b.recon_loss == pytest.approx(c.recon_loss, rel=1e-6)


def _fast_weights(state):
    return tuple(state.inner.params) if hasattr(state, "inner") else (state.w0, state.w1, state.w2)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_static_applies_the_layer_without_inner_updates(backbone, kind):
    ids = torch.tensor(backbone.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:24])
    hidden, _ = backbone.forward_chunk(ids[None])
    model = _model(backbone, kind)
    with torch.no_grad():
        _, _, s1 = model.adapt(hidden[:, :12], None, 1)  # a state that has learned something
        out0, _, s_static = model.adapt(hidden[:, 12:], s1, 0)
        out1, _, s_upd = model.adapt(hidden[:, 12:], s1, 1)
    for a, b in zip(_fast_weights(s_static), _fast_weights(s1)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # STATIC never changes the fast weights
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(_fast_weights(s_upd), _fast_weights(s1)))
    assert (out0 - out1).abs().max() > 1e-6  # and its output differs from UPDATE_1's
    # piece by piece equals the whole chunk (and the state carries on unchanged)
    with torch.no_grad():
        state, parts = s1, []
        for t in range(12, 24, 4):
            o, _, state = model.adapt(hidden[:, t:t + 4], state, 0)
            parts.append(o)
    torch.testing.assert_close(torch.cat(parts, 1), out0, rtol=1e-5, atol=1e-5)


def test_env_static_is_a_baseline_not_an_update(backbone, cached):
    model = _model(backbone, "official-linear")
    env = PonderEnv(model, cached)
    doc = cached[0]
    recs = _run(env, doc.doc_id, ["UPDATE_1", "STATIC", "STATIC"])
    ctx = env.reset(doc.doc_id)
    env.step("UPDATE_1")
    _, ctx = env.step("STATIC")
    assert ctx.features["update_rate_so_far"] == pytest.approx(0.5)  # STATIC is no update
    with torch.no_grad():  # chunk 2 under STATIC reads the state UPDATE_1 left after chunk 0
        _, _, s0 = model.adapt(doc.chunks[0].hidden[None], None, 1)
        _, _, s1 = model.adapt(doc.chunks[1].hidden[None], s0, 0)
        adapted, _, _ = model.adapt(doc.chunks[2].hidden[None], s1, 0)
        ref = float(model.lm_loss(adapted, doc.chunks[2].input_ids[None]))
    assert recs[2].loss == pytest.approx(ref, rel=1e-6)
    assert 1.0 < recs[1].cost <= recs[0].cost


def test_backbone_flop_count_is_exact_at_other_lengths(backbone):
    from ponder.env import count_flops
    from ponder.runner import backbone_flop_counter

    f = backbone_flop_counter(backbone)
    direct = count_flops(lambda: backbone.forward_chunk(torch.zeros(1, 48, dtype=torch.int64)))
    assert f(48) == pytest.approx(direct, rel=1e-9)
    cfg = backbone.model.config  # the LM head alone is 2 T D V of it
    assert direct > 2 * 48 * cfg.n_embd * cfg.vocab_size


def test_env_context_uses_only_earlier_chunks(backbone, cached):
    model = _model(backbone, "ponder-simple")
    env = PonderEnv(model, cached)
    doc = cached[0]
    ctx0 = env.reset(doc.doc_id)
    assert ctx0.features["has_prev"] == 0.0 and ctx0.current is None and ctx0.oracle_losses is None
    stats = env.current_stats()
    rec, ctx1 = env.step("UPDATE_1")
    assert stats["recon_loss"] == pytest.approx(rec.recon_loss)
    assert ctx1.features["prev_recon_loss"] == pytest.approx(rec.recon_loss)
    assert ctx1.features["prev_loss"] == pytest.approx(rec.loss)
    # replacing chunk 1 (the chunk being decided) does not change the context of chunk 1
    other = CachedDoc(doc.doc_id, [doc.chunks[0], cached[1].chunks[0], doc.chunks[2]])
    env2 = PonderEnv(model, [other])
    env2.reset(doc.doc_id)
    _, ctx1b = env2.step("UPDATE_1")
    assert ctx1b.features == ctx1.features
    with pytest.raises(ValueError, match="UPDATE_8"):
        env.step("UPDATE_8")
    with pytest.raises(KeyError, match="nope"):
        env.reset("nope")


def test_adaptive_config_errors():
    with pytest.raises(ValueError, match="--ttt-layer 'lact'"):
        AdaptiveConfig(hidden_size=32, layer="lact")
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        AdaptiveConfig(hidden_size=32, num_heads=5)
    assert AdaptiveConfig(hidden_size=576).num_heads == 9


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_paper_protocol_reads_the_scored_tokens_and_default_does_not(kind):
    torch.manual_seed(0)
    emb = torch.randn(30, 16)
    model = AdaptiveLM(AdaptiveConfig(hidden_size=16, layer=kind, num_heads=2, mini_batch_size=4,
                                      simple_inner_lr=0.1), emb).eval()
    with torch.no_grad():
        model.residual_gain.fill_(0.5)
    h = torch.randn(1, 16, 16)
    bad = h.clone()
    bad[:, 12:] += 3.0 * torch.randn(1, 4, 16)  # change only the chunk's last mini-batch
    with torch.no_grad():
        causal, causal_bad = model.adapt(h, None, 1)[0], model.adapt(bad, None, 1)[0]
        paper, paper_bad = model.paper_reforward(h, None, 1)[0], model.paper_reforward(bad, None, 1)[0]
    torch.testing.assert_close(causal_bad[:, :12], causal[:, :12], rtol=0, atol=0)  # default: leak-free
    # paper: earlier outputs read later tokens (the causal outputs above are bit-identical, so any
    # difference well above float32 rounding is the dependence)
    assert (paper_bad[:, :12] - paper[:, :12]).abs().max() > 1e-6
    # and it is the chunk re-read through the weights the update produced, with no further update
    with torch.no_grad():
        _, _, after = model.adapt(h, None, 1)
        ref, _, _ = model.adapt(h, model.ttt.rewind(None, after, 1), 0)
    torch.testing.assert_close(paper, ref, rtol=0, atol=0)


def test_env_paper_protocol_skip_is_static():
    from tests.ponder.synthetic import synthetic_env

    causal = synthetic_env()
    from ponder.env import PonderEnv

    paper = PonderEnv(causal.model, list(causal.docs.values()), protocol="paper")
    doc = causal.doc_ids()[0]
    for env in (causal, paper):
        env.reset(doc)
    static = causal.step("STATIC")[0]
    skip_paper = paper.step("SKIP")[0]
    assert skip_paper.loss == static.loss and skip_paper.cost == static.cost  # the paper's SKIP = STATIC
    with pytest.raises(ValueError, match="protocol='leaky'"):
        PonderEnv(causal.model, list(causal.docs.values()), protocol="leaky")
