"""Files that are never seen half-written: atomic writes, checksummed torch files, cache upkeep.

One place for the write-to-a-temporary-name-then-`os.replace` pattern every writer here uses
(checkpoints, metrics, packed-data and backbone caches, tokenizer files, shard indexes):

- `atomic_write(path)`: a context manager yielding a file open on `.<name>.<pid>.tmp` beside
  `path`; on a clean exit the bytes are flushed, fsync'ed and `os.replace`d onto `path`, so a reader
  sees the old file or the whole new one; on an exception the temporary file is removed.
  `atomic_write_text` / `atomic_copy` are its one-line uses; `publish_dir` is the same for a
  folder built under a temporary name.
- `save_checked` / `load_checked`: `torch.save` bytes behind one header line
  `<magic><sha256 of the rest>\\n`; a file whose bytes do not match is refused with
  `DamagedFileError` instead of unpickled.
- `clean_stale_tmp`: temporary files a killed writer left behind; `prune_lru`: a size cap that deletes
  the least recently used entries of a cache folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

CHECKED_MAGIC = b"TTT-CHECKED v1 "


class DamagedFileError(ValueError):
    """A checked file is truncated, altered or not a checked file at all."""


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a power loss (best effort: some file
    systems refuse to open or sync directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_path(path: Path) -> Path:
    """The temporary name `atomic_write` uses for `path`: `.<name>.<pid>.tmp` in the same folder (same
    file system, so `os.replace` is atomic; the pid lets `clean_stale_tmp` tell a live writer's file)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open `path` for writing so that it appears whole or not at all.

    Args:
        path: the final file; its folder is created.
        mode: "wb" (default) or "w" (text, UTF-8).

    Yields:
        the open temporary file; write to it inside the `with` block.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode={mode!r} must be 'wb' or 'w'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a crash before this line leaves the previous file intact
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_write`). Returns the path."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy `src` to `dst` atomically: a concurrent reader never sees half of `dst`. Returns `dst`."""
    with open(src, "rb") as fin, atomic_write(dst) as fout:
        shutil.copyfileobj(fin, fout)
    return Path(dst)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename a folder built under a temporary name onto `final` (which must not exist), durably.

    The folder's entries are synced first, then the rename and the parent folder: after a crash the
    folder is either absent or complete. Returns `final`.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    return final


def save_checked(payload, path: str | os.PathLike, *, magic: bytes = CHECKED_MAGIC) -> Path:
    """`torch.save(payload)` to `path` behind a `<magic><sha256>\\n` header, atomically. Returns the path."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    with atomic_write(path) as f:
        f.write(magic + hashlib.sha256(body).hexdigest().encode() + b"\n")
        f.write(body)
    return Path(path)


def load_checked(path: str | os.PathLike, *, magic: bytes = CHECKED_MAGIC, fix: str = "delete it and write it again"):
    """Load a file written by `save_checked` (with the same `magic`), verifying its checksum first.

    Args:
        path: the file.
        magic: the header prefix it was written with.
        fix: what the user should do about a damaged file (ends the error message).

    Raises:
        FileNotFoundError: no such file.
        DamagedFileError: the header is missing or the bytes do not match the recorded sha256.
    """
    path = Path(path)
    data = path.read_bytes()
    head, sep, body = data.partition(b"\n")
    if not head.startswith(magic) or not sep:
        raise DamagedFileError(f"{path} is not a checked file of this kind (header {magic.decode().strip()!r} "
                               f"missing: truncated, or written by an older version): {fix}")
    want = head[len(magic):].decode(errors="replace")
    got = hashlib.sha256(body).hexdigest()
    if got != want:
        raise DamagedFileError(f"{path} is damaged: sha256 {got[:12]}... != recorded {want[:12]}... "
                               f"({len(body)} bytes after the header): {fix}")
    return torch.load(io.BytesIO(body), weights_only=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(folder: str | os.PathLike, pattern: str = ".*.tmp",
                    older_than_s: float | None = None) -> list[Path]:
    """Remove temporary files (`.<name>.<pid>.tmp`, see `tmp_path`) left behind by killed writers.

    Args:
        folder: where to look (a missing folder holds nothing).
        pattern: glob of the temporary files.
        older_than_s: None: a file is stale when the process named in it is gone (one machine).
            A number: when it was last modified longer ago than this (folders shared by several
            machines, where a pid says nothing; live writers take seconds).

    Returns:
        the removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.glob(pattern):
        try:
            if older_than_s is not None:
                stale = now - p.stat().st_mtime > older_than_s
            else:
                parts = p.name.rsplit(".", 2)
                pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
                stale = pid is None or pid == os.getpid() or not _pid_alive(pid)
            if stale:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:
            pass  # another process cleaned it first
    return removed


def prune_lru(folder: str | os.PathLike, pattern: str, max_bytes: int | None, keep: tuple[Path, ...] = (),
              companions: tuple[str, ...] = ()) -> list[Path]:
    """Delete the least recently modified entries matching `pattern` until they total <= `max_bytes`.

    Args:
        folder: the cache folder.
        pattern: glob of the entries (e.g. "*.pt").
        max_bytes: the cap (0 deletes every entry not kept); None: no cap.
        keep: entries never deleted (the ones the current run uses).
        companions: suffixes of side files deleted with an entry (e.g. (".json",)).

    Returns:
        the deleted entries.
    """
    folder = Path(folder)
    if max_bytes is None or not folder.is_dir():
        return []
    entries = []
    for p in folder.glob(pattern):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    keep_set = {Path(k).resolve() for k in keep}
    removed = []
    for _, size, p in sorted(entries):  # oldest use first
        if total <= max_bytes:
            break
        if p.resolve() in keep_set:
            continue
        total -= size
        p.unlink(missing_ok=True)
        for suffix in companions:
            p.with_suffix(suffix).unlink(missing_ok=True)
        removed.append(p)
    return removed
