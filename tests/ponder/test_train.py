"""Outer training (ponder/train.py): exact resume, atomic checkpoints, frozen head, learning."""

from __future__ import annotations

import pytest
import torch

from ponder.adaptive import AdaptiveConfig, AdaptiveLM
from ponder.cache import CachedChunk, CachedDoc
from ponder.train import CKPT_NAME, TrainConfig, load_checkpoint, train

V, D = 40, 16


def _docs(seed=0, n_docs=3, n_chunks=3, T=12):
    """Synthetic cached documents: hidden states carry the next token's embedding direction, so the
    adaptive path can learn something the (random) head alone does not know."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, D, generator=g)
    docs = []
    for d in range(n_docs):
        chunks = []
        for _ in range(n_chunks):
            ids = torch.randint(0, V, (T,), generator=g)
            nxt = torch.cat([ids[1:], ids[:1]])
            hidden = 0.3 * torch.randn(T, D, generator=g) + 0.5 * emb[nxt].roll(1, dims=-1)
            logp = torch.log_softmax(hidden @ emb.T, -1)
            p = logp.exp()
            chunks.append(CachedChunk(ids, hidden, logp[:-1].gather(-1, ids[1:, None])[:, 0], -(p * logp).sum(-1),
                                      p.max(-1).values, 0.01))
        docs.append(CachedDoc(f"doc{d}", chunks))
    return docs, emb


def _model(emb, kind="official-linear"):
    torch.manual_seed(0)
    return AdaptiveLM(AdaptiveConfig(hidden_size=D, layer=kind, num_heads=2, mini_batch_size=4), emb)


@pytest.mark.parametrize("kind", ["official-linear", "ponder-simple"])
def test_resume_is_exact(tmp_path, kind):
    docs, emb = _docs()
    cfg = TrainConfig(steps=7, lr=1e-2, seed=3, save_every=1, aux_recon_weight=0.1 if kind == "ponder-simple" else 0.0)
    full_model = _model(emb, kind)
    full = train(full_model, docs, cfg, tmp_path / "full", progress=False)

    part_model = _model(emb, kind)
    first = train(part_model, docs, cfg, tmp_path / "part", stop_after=4, progress=False)
    assert first["step"] == 4
    del part_model  # "crash": a new process builds a new model and resumes from the checkpoint
    torch.manual_seed(12345)  # the resumed run must not depend on the RNG state it starts with
    resumed_model = _model(emb, kind)
    resumed = train(resumed_model, docs, cfg, tmp_path / "part", progress=False)
    assert resumed["step"] == 7
    assert resumed["losses"] == full["losses"]  # bit-identical
    for (n, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), n
    assert not list((tmp_path / "part").glob("*.tmp"))  # atomic writes leave no temporary files
    ck = load_checkpoint(tmp_path / "part")
    assert ck["step"] == 7 and ck["stream"]["pos"] >= 1


def test_training_learns_and_keeps_head_frozen(tmp_path):
    docs, emb = _docs()
    model = _model(emb)
    head_before = model.head_weight.clone()
    out = train(model, docs, TrainConfig(steps=30, lr=2e-2, seed=0, save_every=100), None, progress=False)
    assert torch.equal(model.head_weight, head_before)
    assert not model.head_weight.requires_grad
    assert "head_weight" not in model.state_dict()  # the backbone's head is not part of the checkpoint
    early, late = sum(out["losses"][:6]) / 6, sum(out["losses"][-6:]) / 6
    skip = sum(out["skip_losses"][-6:]) / 6
    assert late < early - 0.1 and late < skip  # the adaptive path beats the bare head on this data


def test_reusing_a_finished_checkpoint_trains_nothing(tmp_path):
    docs, emb = _docs()
    cfg = TrainConfig(steps=3, seed=0, save_every=1)
    train(_model(emb), docs, cfg, tmp_path, progress=False)
    mtime = (tmp_path / CKPT_NAME).stat().st_mtime_ns
    out = train(_model(emb), docs, cfg, tmp_path, progress=False)
    assert out["step"] == 3 and (tmp_path / CKPT_NAME).stat().st_mtime_ns == mtime


def test_bad_config_raises():
    with pytest.raises(ValueError, match="inner_steps=0"):
        TrainConfig(inner_steps=0)
    with pytest.raises(ValueError, match="at least one cached document"):
        train(_model(_docs()[1]), [], TrainConfig(steps=1), None, progress=False)


def test_lanes_give_each_step_chunks_of_different_documents():
    from ponder.train import ChunkStream

    docs, _ = _docs(n_docs=6, n_chunks=3)
    stream = ChunkStream(docs, seed=1, lanes=3)
    epoch = [stream.next() for _ in range(18)]
    assert sorted(epoch) == [(d, c) for d in range(6) for c in range(3)]  # every chunk once per epoch
    for i in range(0, 18, 3):
        assert len({d for d, _ in epoch[i:i + 3]}) == 3  # one step: 3 documents
    for d in range(6):
        assert [c for dd, c in epoch if dd == d] == [0, 1, 2]  # in order within a document
    one = ChunkStream(docs, seed=1, lanes=1)
    seq = [one.next() for _ in range(18)]
    assert all(len({d for d, _ in seq[i:i + 3]}) == 1 for i in range(0, 18, 3))  # one lane: document by document


def test_resume_with_batches_and_validation_is_exact(tmp_path):
    docs, emb = _docs(n_docs=4)
    val, _ = _docs(seed=1, n_docs=2)
    cfg = TrainConfig(steps=8, lr=2e-2, seed=2, save_every=4, batch_chunks=3, eval_every=2, patience=0)
    full_model = _model(emb)
    full = train(full_model, docs, cfg, tmp_path / "full", progress=False, val_docs=val)
    part = train(_model(emb), docs, cfg, tmp_path / "part", stop_after=5, progress=False, val_docs=val)
    assert part["step"] == 5 and len(part["curve"]) == 2
    torch.manual_seed(999)
    resumed_model = _model(emb)
    resumed = train(resumed_model, docs, cfg, tmp_path / "part", progress=False, val_docs=val)
    assert resumed["losses"] == full["losses"] and resumed["curve"] == full["curve"]
    assert resumed["best_step"] == full["best_step"]
    for (n, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), n
    assert [r["step"] for r in full["curve"]] == [2, 4, 6, 8]
    # the model ends with the selected (best validation) weights: its validation loss is the minimum
    from ponder.train import validation_loss

    best = min(r["val_loss"] for r in full["curve"])
    assert full["best_val_loss"] == best
    assert validation_loss(full_model, val, 1)[0] == pytest.approx(best, abs=1e-6)


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    import ponder.train as train_mod

    docs, emb = _docs(n_docs=4)
    val, _ = _docs(seed=1, n_docs=1)
    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.0])  # best at the 2nd validation, then 2 worse ones

    monkeypatch.setattr(train_mod, "validation_loss", lambda *a: (next(scripted), 9.0))
    model = _model(emb)
    cfg = TrainConfig(steps=20, lr=2e-2, seed=0, save_every=100, batch_chunks=2, eval_every=2, patience=2)
    out = train(model, docs, cfg, tmp_path / "es", progress=False, val_docs=val)
    assert out["stopped_early"] and out["step"] == 8 and out["best_step"] == 4
    # a rerun of the stopped run trains nothing more and ends with the same selected weights
    again_model = _model(emb)
    again = train(again_model, docs, cfg, tmp_path / "es", progress=False, val_docs=val)
    assert again["step"] == 8
    # the selected weights are those after step 4: the same as a 4-step run without validation
    ref = _model(emb)
    train(ref, docs, TrainConfig(steps=4, lr=2e-2, seed=0, save_every=100, batch_chunks=2), None, progress=False)
    for m in (model, again_model):
        for (n, a), (_, b) in zip(ref.state_dict().items(), m.state_dict().items()):
            assert torch.equal(a, b), n


def test_validation_needs_documents():
    docs, emb = _docs()
    with pytest.raises(ValueError, match="eval_every=2 needs validation documents"):
        train(_model(emb), docs, TrainConfig(steps=2, eval_every=2), None, progress=False)
    with pytest.raises(ValueError, match="batch_chunks=0"):
        TrainConfig(batch_chunks=0)
