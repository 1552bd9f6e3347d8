"""Fault injection for the PonderTTT runner (outer training loop, backbone cache, run folder): the
CLI is killed with SIGKILL at random moments, rerun until it finishes, and its numbers must equal
those of an uninterrupted run (kill -9 leaves no chance to clean up: only atomic, checked writes and
the resume logic make this hold)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ponder.synthetic import make_tiny_gpt2

ROOT = Path(__file__).resolve().parents[2]


def _cmd(base, out, cache):
    return [sys.executable, str(ROOT / "scripts" / "run_ponder.py"), "--base", base, "--chunk-size", "16",
            "--max-train-docs", "3", "--max-eval-docs", "2", "--max-chunks-per-doc", "3", "--min-doc-chunks", "2",
            "--steps", "30", "--batch-chunks", "2", "--max-val-docs", "1", "--eval-every", "5", "--patience", "0",
            "--mini-batch-size", "4", "--compare-gates", "random,recon", "--out", str(out),
            "--run-name", "r", "--cache-dir", str(cache), "--no-progress"]


def _numbers(run_dir: Path) -> dict:
    """Every number of the run that does not measure time."""
    s = json.loads((run_dir / "summary.json").read_text())
    return {"gates": {k: (v["loss"], v["update_rate"], v["cost"]) for k, v in s["gates"].items()},
            "train": (s["training"]["steps"], s["training"]["final_loss"]),
            "chunks": [(r["gate"], r["doc_id"], r["chunk_idx"], r["action"], r["loss"])
                       for r in map(json.loads, (run_dir / "chunks.jsonl").read_text().splitlines())]}


@pytest.mark.slow  # ~1-3 minutes: several CLI start-ups (torch + transformers imports) on a loaded machine
def test_kill9_at_random_moments_then_rerun_gives_identical_results(tmp_path):
    base = make_tiny_gpt2(tmp_path / "tiny")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ref = subprocess.run(_cmd(base, tmp_path / "ref", tmp_path / "cache_ref"), capture_output=True, text=True,
                         env=env, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    t_full = float(json.loads((tmp_path / "ref" / "r" / "summary.json").read_text())["total_s"])

    rng = random.Random(0)
    out, cache = tmp_path / "out", tmp_path / "cache"
    kills = 0
    for _ in range(4):  # kill at random moments: start-up, caching, training, evaluation, writing
        proc = subprocess.Popen(_cmd(base, out, cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(0.5, 4.0 + t_full))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    final = subprocess.run(_cmd(base, out, cache), capture_output=True, text=True, env=env, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert _numbers(out / "r") == _numbers(tmp_path / "ref" / "r")
    assert not list((cache / "ponder").glob(".*.tmp")) and not list((out / "r").glob(".*.tmp"))
    assert kills >= 1  # at least one run was really interrupted
