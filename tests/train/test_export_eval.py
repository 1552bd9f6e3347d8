"""Held-out evaluation in the trainer and `python -m ttt_common.export` (DCP checkpoint -> HF folder).

The two check each other: the trainer's `eval_loss` at the last step is computed by the (1-rank FSDP2)
training model; the exported folder, loaded with `AutoModelForCausalLM.from_pretrained` (the packages
register their classes with the Auto factories on import), must give the same loss on the same held-out
sequences, so its logits are the trainer's. LaCT with r=1 and r=2 (stacked, manual backprop) and the
official TTT LM.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ttt_common.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
SEQ = 64
BASE = ["--seq-len", str(SEQ), "--max-docs", "20", "--lr", "3e-3", "--no-progress", "--log-every", "100",
        "--steps", "2", "--eval-every", "2", "--eval-batches", "2"]




def _eval_sequences(n: int) -> np.ndarray:
    """The first `n` held-out sequences the trainer evaluates on (stdlib eval split, GPT-2 BPE)."""
    from ttt_common.data import load_texts
    from ttt_common.packing import tokenize_and_pack
    from ttt_common.tokenizer import cache_dir, load_tokenizer

    texts = load_texts(None, split="eval")
    return np.asarray(tokenize_and_pack(texts, load_tokenizer(None), SEQ, cache_dir=cache_dir() / "packed")[:n])


def _loss(model, seqs: np.ndarray, batch: int) -> float:
    with torch.no_grad():
        losses = [model(input_ids=torch.from_numpy(seqs[i:i + batch].astype(np.int64)),
                        labels=torch.from_numpy(seqs[i:i + batch].astype(np.int64))).loss.item()
                  for i in range(0, len(seqs), batch)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("model, config, extra", [
    ("lact", "configs/train_debug_lact.json", []),
    ("lact", "configs/train_debug_lact.json", ["--set", "r=1", "ttt_backprop=\"autograd\""]),
    ("ttt", "configs/ttt_debug.json", ["--set", "num_hidden_layers=2"]),
], ids=["lact-r2-manual", "lact-r1", "ttt-linear"])
def test_export_loads_with_auto_class_and_matches_the_trainers_eval_loss(env, tmp_path, model, config, extra):
    from transformers import AutoModelForCausalLM

    import lact  # noqa: F401 - registers LaCT with the Auto classes
    import official_port  # noqa: F401 - registers TTT
    from ttt_common import trainer
    from ttt_common.export import main as export_main

    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert trainer.main(["--model", model, "--config", str(ROOT / config), *BASE, "--batch-size", "2", *extra, "--out", str(out)]) == 0
    recs = read_jsonl(out / "metrics.jsonl")
    assert [("eval_loss" in r) for r in recs] == [False, True]
    assert recs[-1]["eval_ppl"] == pytest.approx(math.exp(recs[-1]["eval_loss"]))

    hf = tmp_path / "hf"
    assert export_main([str(out / "checkpoints"), str(hf)]) == 0
    assert {"config.json", "model.safetensors"} <= {p.name for p in hf.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(hf).eval()
    assert type(loaded).__name__ == {"lact": "LaCTForCausalLM", "ttt": "TTTForCausalLM"}[model]
    if model == "lact":
        assert loaded.config.r == (1 if extra else 2)
    got = _loss(loaded, _eval_sequences(4), batch=2)  # 2 eval batches x batch 2 x 1 rank
    assert abs(got - recs[-1]["eval_loss"]) <= 1e-5 * abs(recs[-1]["eval_loss"]), (got, recs[-1]["eval_loss"])
    # and it is the trained model, not a fresh one: a fresh init scores ~ln(vocab)
    assert got < recs[0]["loss"] + 1.0


def test_export_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ttt_common.export", str(tmp_path / "nope"), str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "neither a checkpoint folder" in proc.stderr


@pytest.mark.slow  # a torchrun start-up: ~15 s idle, up to ~60 s loaded
def test_two_rank_sharded_checkpoint_exports_and_evaluates_like_one_process(env, tmp_path):
    from ttt_common import trainer
    from ttt_common.export import load_checkpoint_model

    common = ["--model", "lact", "--config", str(ROOT / "configs/train_debug_lact.json"), *BASE]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "scripts" / "train.py"), *common, "--batch-size", "1", "--out", str(tmp_path / "two")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(next((tmp_path / "two" / "checkpoints").glob("step-*/meta.json")).read_text())
    assert meta["world_size"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert trainer.main([*common, "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    rec_two, rec_one = (read_jsonl(tmp_path / n / "metrics.jsonl")[-1] for n in ("two", "one"))
    assert abs(rec_two["eval_loss"] - rec_one["eval_loss"]) <= 1e-5 * rec_one["eval_loss"]
    # the sharded checkpoint exports to a model whose held-out loss is the 2-rank trainer's
    # (weights are not compared with the 1-process run: Adam's first steps, g / sqrt(g^2), amplify the
    # reduction-order differences of near-zero gradients; the losses above already agree to 1e-5)
    loaded = load_checkpoint_model(tmp_path / "two" / "checkpoints")[0]
    got = _loss(loaded, _eval_sequences(4), batch=2)
    assert abs(got - rec_two["eval_loss"]) <= 1e-5 * rec_two["eval_loss"], (got, rec_two["eval_loss"])

def test_tensorboard_backend_records_the_same_numbers_as_the_jsonl(env, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ttt_common import trainer

    out = tmp_path / "tb"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert trainer.main(["--model", "lact", "--config", str(ROOT / "configs/train_debug_lact.json"), *BASE,
                             "--batch-size", "1", "--log-backend", "tensorboard", "--out", str(out)]) == 0
    recs = read_jsonl(out / "metrics.jsonl")
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss_metrics/loss")]
    assert [s for s, _ in loss] == [1, 2]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in recs], rel=1e-6)  # stored as float32
    assert acc.Scalars("eval/loss")[0].value == pytest.approx(recs[-1]["eval_loss"], rel=1e-6)


def test_unknown_or_missing_log_backend_is_refused(env, tmp_path, capsys):
    from ttt_common import trainer

    argv = ["--config", "train_debug_lact", "--steps", "1", "--out", str(tmp_path / "x")]
    assert trainer.main(argv + ["--log-backend", "tensorbord"]) == 2
    assert "did you mean 'tensorboard'?" in capsys.readouterr().err
