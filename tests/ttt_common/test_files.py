"""`ttt_common.files` (atomic writes, checked files, cache upkeep) and `train_utils.NonFiniteGuard`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ttt_common.files import (
    DamagedFileError,
    atomic_write,
    atomic_write_text,
    clean_stale_tmp,
    load_checked,
    prune_lru,
    save_checked,
)
from ttt_common.train_utils import NonFiniteGuard, NonFiniteLossError


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_write(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]  # the temporary file is gone
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_checked_file_round_trip_and_damage_detection(tmp_path):
    path = save_checked({"w": torch.arange(5.0)}, tmp_path / "x.pt")
    assert torch.equal(load_checked(path)["w"], torch.arange(5.0))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in the payload
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match="x.pt is damaged: sha256"):
        load_checked(path)
    path.write_bytes(data[: len(data) // 2].split(b"\n", 1)[1])  # no header at all
    with pytest.raises(DamagedFileError, match="header 'TTT-CHECKED v1' missing"):
        load_checked(path)
    other = save_checked([1], tmp_path / "y.pt", magic=b"OTHER v1 ")
    with pytest.raises(DamagedFileError, match="missing"):  # another kind's header is refused, not loaded
        load_checked(other)


def test_clean_stale_tmp_by_pid_and_by_age(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    live = tmp_path / f".a.pt.{os.getppid()}.tmp"  # the parent process is alive
    gone = tmp_path / f".b.pt.{dead_pid}.tmp"
    for p in (live, gone):
        p.write_bytes(b"x")
    assert clean_stale_tmp(tmp_path) == [gone]
    assert live.exists()
    os.utime(live, (0, 0))
    assert clean_stale_tmp(tmp_path, older_than_s=3600) == [live]


def test_prune_lru_deletes_oldest_first_and_spares_kept_entries(tmp_path):
    for i in range(4):
        f = tmp_path / f"{i}.pt"
        f.write_bytes(b"x" * 100)
        f.with_suffix(".json").write_text("{}")
        os.utime(f, (1000 + i, 1000 + i))
    removed = prune_lru(tmp_path, "*.pt", 250, keep=(tmp_path / "0.pt",), companions=(".json",))
    assert [p.name for p in removed] == ["1.pt", "2.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.json", "0.pt", "3.json", "3.pt"]
    assert prune_lru(tmp_path, "*.pt", None) == []
    assert len(prune_lru(tmp_path, "*.pt", 0)) == 2


def test_nonfinite_guard_skips_counts_and_stops_after_n_in_a_row():
    guard = NonFiniteGuard(max_in_a_row=2)
    assert guard.ok(1, 1.0, 0.5)
    assert not guard.ok(2, float("nan"))
    assert guard.ok(3, torch.tensor(2.0), torch.tensor(1.0))  # a finite step ends the streak
    assert not guard.ok(4, 1.0, float("inf"))
    assert guard.skipped == 2 and guard.in_a_row == 1
    with pytest.raises(NonFiniteLossError, match=r"step 5 \(doc 7\).*2 steps in a row \(3 skipped in all\)"):
        guard.ok(5, float("-inf"), where="doc 7")
    with pytest.raises(ValueError, match="max_in_a_row=0 must be >= 1"):
        NonFiniteGuard(max_in_a_row=0)
