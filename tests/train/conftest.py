"""Shared set-up of the trainer tests."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path_factory, monkeypatch):
    """Shared tokenizer/packing cache; one intra-op thread (as the subprocesses); the environment for
    subprocess runs of the trainer."""
    cache = tmp_path_factory.getbasetemp() / "ttt_cache"
    monkeypatch.setenv("TTT_CACHE_DIR", str(cache))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {**os.environ, "TTT_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torch.set_num_threads(threads)
