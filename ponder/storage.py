"""Checked, atomic files for PonderTTT (run checkpoints and backbone cache entries).

The mechanics live in `ttt_common.files` (atomic write, sha256 header, stale temporary files, LRU
size cap); this module fixes PonderTTT's header, `PONDERTTT-CHECKED v1 <sha256 of the rest>\\n`
(files written before the move still load), its advice for a damaged file, and the backbone cache's
entry layout (`*.pt` plus a `.json` description).
"""

from __future__ import annotations

from pathlib import Path

from ttt_common.files import DamagedFileError, clean_stale_tmp, prune_lru
from ttt_common.files import load_checked as _load_checked
from ttt_common.files import save_checked as _save_checked

__all__ = ["MAGIC", "DamagedFileError", "save_checked", "load_checked", "clean_stale_tmp", "prune_cache"]

MAGIC = b"PONDERTTT-CHECKED v1 "


def save_checked(payload, path: str | Path) -> Path:
    """`torch.save(payload)` to `path` with PonderTTT's sha256 header, atomically."""
    return _save_checked(payload, path, magic=MAGIC)


def load_checked(path: str | Path):
    """Load a file written by `save_checked`, verifying its checksum first.

    Raises:
        FileNotFoundError: no such file.
        DamagedFileError: the header is missing or the bytes do not match the recorded sha256.
    """
    return _load_checked(path, magic=MAGIC, fix="delete it or rerun with --overwrite")


def prune_cache(folder: str | Path, max_bytes: int, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Delete the least recently used `*.pt` entries (and their `.json`) until `folder` holds <= `max_bytes`.

    `max_bytes` <= 0: no cap. `keep`: entries never deleted (the ones the current run uses). Returns the deleted
    entries.
    """
    return prune_lru(folder, "*.pt", max_bytes if max_bytes > 0 else None, keep=keep, companions=(".json",))
