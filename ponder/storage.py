"""Checked, atomic files for PonderTTT (run checkpoints and backbone cache entries).

Every file is written as one header line `PONDERTTT-CHECKED v1 <sha256 of the rest>\\n` followed by
the `torch.save` bytes, to a temporary file that is then `os.replace`d: a reader sees the old file
or the whole new one, and `load_checked` refuses a file whose bytes do not match the recorded hash
(a flipped byte, a truncated copy) with `DamagedFileError` instead of unpickling garbage.

Also here: removing the temporary files a killed writer left behind (`clean_stale_tmp`) and the
size cap of the backbone cache (`prune_cache`).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

MAGIC = b"PONDERTTT-CHECKED v1 "


class DamagedFileError(ValueError):
    """A checked file is truncated, altered or not a checked file at all."""


def save_checked(payload, path: str | Path) -> Path:
    """`torch.save(payload)` to `path` with a sha256 header, atomically (temporary file + `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n")
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous file intact
    return path


def load_checked(path: str | Path):
    """Load a file written by `save_checked`, verifying its checksum first.

    Raises:
        FileNotFoundError: no such file.
        DamagedFileError: the header is missing or the bytes do not match the recorded sha256.
    """
    path = Path(path)
    data = path.read_bytes()
    head, sep, body = data.partition(b"\n")
    if not head.startswith(MAGIC) or not sep:
        raise DamagedFileError(f"{path} is not a checked PonderTTT file (missing header; truncated, or written by "
                               "an older version): delete it or rerun with --overwrite")
    want = head[len(MAGIC):].decode(errors="replace")
    got = hashlib.sha256(body).hexdigest()
    if got != want:
        raise DamagedFileError(f"{path} is damaged: sha256 {got[:12]}... != recorded {want[:12]}... "
                               f"({len(body)} bytes after the header)")
    return torch.load(io.BytesIO(body), weights_only=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(folder: str | Path) -> list[Path]:
    """Remove `.<name>.<pid>.tmp` files in `folder` whose writer process is gone; returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.glob(".*.tmp"):
        parts = p.name.rsplit(".", 2)
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue  # another live run is writing it
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def prune_cache(folder: str | Path, max_bytes: int, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Delete the least recently used `*.pt` entries (and their `.json`) until `folder` holds <= `max_bytes`.

    `keep`: entries never deleted (the ones the current run uses). Returns the deleted entries.
    """
    folder = Path(folder)
    if max_bytes <= 0 or not folder.is_dir():
        return []
    entries = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in entries)
    keep_set = {Path(k).resolve() for k in keep}
    removed = []
    for p in entries:
        if total <= max_bytes:
            break
        if p.resolve() in keep_set:
            continue
        total -= p.stat().st_size
        p.unlink(missing_ok=True)
        p.with_suffix(".json").unlink(missing_ok=True)
        removed.append(p)
    return removed
