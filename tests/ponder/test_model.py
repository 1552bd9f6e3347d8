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

TEXT = ("def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
        "    def push(self, x):\n        self.items.append(x)\n\n    def pop(self):\n        return self.items.pop()\n") * 3


def make_tiny_gpt2(folder):
    """A tiny random GPT-2 with GPT-2's real (offline) BPE tokenizer, saved to `folder`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ttt_common.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=50256, eos_token_id=50256)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    load_tokenizer("gpt2").save_pretrained(folder)
    return str(folder)


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
    for k in (1, 4):
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
    assert [r.cost for r in recs] == [1.0, 5.0, 3.0]
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
