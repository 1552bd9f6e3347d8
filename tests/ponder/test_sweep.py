"""The presets' training sweep (ponder/sweep.py): grid parsing, and a tiny sweep that reads only
training-side files."""

from __future__ import annotations

import json

import pytest

from ponder.sweep import parse_grid


def test_grid_is_the_product_of_its_axes():
    grid = parse_grid(["lr=1e-3,3e-3", "batch-chunks=1,4"])
    assert grid == [{"lr": 1e-3, "batch_chunks": 1}, {"lr": 1e-3, "batch_chunks": 4},
                    {"lr": 3e-3, "batch_chunks": 1}, {"lr": 3e-3, "batch_chunks": 4}]
    assert parse_grid(None) == [{}]
    for bad, msg in (("lr", "expected KEY=V1"), ("chunk_size=64", "KEY one of"), ("steps=x", "invalid literal")):
        with pytest.raises(ValueError, match=msg):
            parse_grid([bad])


@pytest.mark.slow  # ~30-60 s: loads and tokenizes the stdlib corpus
def test_tiny_sweep_compares_settings_on_validation(tmp_path):
    from ponder.runner import default_args
    from ponder.sweep import sweep
    from tests.ponder.synthetic import make_tiny_gpt2

    base = make_tiny_gpt2(tmp_path / "tiny")
    args = default_args(base=base, chunk_size=16, max_train_docs=2, max_val_docs=1, max_eval_docs=1,
                        max_chunks_per_doc=2, min_doc_chunks=2, steps=2, batch_chunks=2, eval_every=1, patience=0,
                        mini_batch_size=4, out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                        no_progress=True)
    rows = sweep(args, parse_grid(["lr=1e-3,1e-2"]))
    assert [r["lr"] for r in rows] == [1e-3, 1e-2]
    for r in rows:
        assert r["best_val_loss"] == min(c["val_loss"] for c in r["curve"])
        assert r["val_gain"] == pytest.approx(r["val_skip_loss"] - r["best_val_loss"])
    saved = [json.loads(x) for x in (tmp_path / "out" / "sweep_default.jsonl").read_text().splitlines()]
    assert [s["lr"] for s in saved] == [1e-3, 1e-2]
