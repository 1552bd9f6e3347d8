"""Pre-tokenised corpora as memory-mapped token shards: write once, stream fixed-length sequences.

A prepared corpus is a folder:

    index.json          tokenizer, vocabulary, EOS id, dtype, source, and per shard: file, tokens, sha256
    shard-00000.bin     raw little-endian token ids (uint16 when the vocabulary fits, else uint32)
    shard-00001.bin     ...

Documents are tokenised, each followed by EOS, and appended to one token stream cut into shard files of
about `shard_tokens` tokens (a document may span two shards). Readers see the stream through
`np.memmap`: a sequence is copied out of the page cache when it is read, so a corpus far larger than RAM
trains with the memory of one batch. `TokenShards` presents the stream as a read-only `[N, seq_len]`
array (sequence i = tokens `[i * seq_len, (i + 1) * seq_len)`), which is what `PackedLoader` indexes: the
rank sharding, seeded order and exact `(epoch, position)` resume state of packed data carry over
unchanged. The corpus fingerprint (sha256 over the shard hashes, tokenizer and source) is what the
trainer stores to refuse a resume on other data; it costs nothing at start-up because the shard hashes
were computed when writing.

Reading needs no data-loader worker processes: a batch is B memcpy's of `seq_len` tokens from the page
cache (the kernel's read-ahead does the I/O), microseconds against a training step of milliseconds or
more, and keeping it in the training process keeps the resume state one `(epoch, position)` pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ttt_common.files import publish_dir

INDEX = "index.json"
FORMAT_VERSION = 1


def is_prepared(path: str | os.PathLike | None) -> bool:
    return path is not None and (Path(path) / INDEX).is_file()


class ShardWriter:
    """Append token ids to a new prepared corpus; `close()` writes `index.json` and makes it visible.

    Writes go to `<out>.tmp/` and are renamed to `out` at the end, so a crash leaves no half corpus
    that a trainer could read.

    Args:
        out: folder to create (must not exist).
        vocab_size: tokenizer size (decides uint16 / uint32).
        shard_tokens: tokens per shard file (the last one holds the rest).
        meta: stored in index.json (tokenizer name, eos id, source ...).
    """

    def __init__(self, out: str | os.PathLike, vocab_size: int, shard_tokens: int = 1 << 28, meta: dict | None = None):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens={shard_tokens} must be >= 1")
        self.out = Path(out)
        if self.out.exists():
            raise FileExistsError(f"{self.out} already exists; choose another output folder or delete it")
        self.tmp = self.out.with_name(self.out.name + ".tmp")
        if self.tmp.exists():  # left by an interrupted run
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
        self.vocab_size = vocab_size
        self.shard_tokens = shard_tokens
        self.meta = dict(meta or {})
        self.shards: list[dict] = []
        self._file = None
        self._hash = None
        self._count = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):05d}.bin"
        self._file = open(self.tmp / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})
        self._count = 0

    def _finish_shard(self) -> None:
        self._file.close()
        self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
        self._file = None

    def write(self, ids) -> None:
        """Append token ids (any int sequence) to the stream."""
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{arr.min()}, {arr.max()}]")
        arr = arr.astype(self.dtype).ravel()
        while arr.size:
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._count
            piece, arr = arr[:room], arr[room:]
            data = piece.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += piece.size
            if self._count == self.shard_tokens:
                self._finish_shard()

    def close(self) -> Path:
        if self._file is not None:
            self._finish_shard()
        if not self.shards or sum(s["tokens"] for s in self.shards) == 0:
            shutil.rmtree(self.tmp)
            raise ValueError("no tokens were written: the input holds no text")
        index = {"format_version": FORMAT_VERSION, "dtype": self.dtype.name, "vocab_size": self.vocab_size,
                 "num_tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards, **self.meta}
        index["fingerprint"] = _fingerprint(index)
        (self.tmp / INDEX).write_text(json.dumps(index, indent=1))
        return publish_dir(self.tmp, self.out)


def _fingerprint(index: dict) -> str:
    h = hashlib.sha256()
    for key in ("dtype", "vocab_size", "tokenizer", "eos_token_id", "source"):
        h.update(f"{key}={json.dumps(index.get(key), sort_keys=True)}|".encode())
    for s in index["shards"]:
        h.update(f"{s['tokens']}:{s['sha256']}|".encode())
    return h.hexdigest()


class TokenShards:
    """A prepared corpus as a read-only `[N, seq_len]` int array over memory-mapped shards.

    Supports `shape`, `ndim`, `len()`, and indexing rows by an int, a slice or an int array; each read
    copies just the requested rows out of the maps. The trailing `num_tokens % seq_len` tokens are unused.

    Args:
        folder: a prepared corpus (holding index.json).
        seq_len: tokens per sequence.
    """

    def __init__(self, folder: str | os.PathLike, seq_len: int):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / INDEX).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.folder}: not a prepared corpus ({INDEX} unreadable: {err}); "
                             "run python -m ttt_common.prepare_data") from err
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2")
        dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.shards: list[np.memmap] = []
        for s in self.index["shards"]:
            path = self.folder / s["file"]
            expected = s["tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                size = path.stat().st_size if path.is_file() else "missing"
                raise ValueError(f"{path}: {size} bytes, expected {expected} ({s['tokens']} tokens); the prepared "
                                 "corpus is damaged: prepare it again")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.offsets = np.cumsum([0] + [len(m) for m in self.shards])  # stream offset of each shard
        self.num_tokens = int(self.offsets[-1])
        self.seq_len = seq_len
        n = self.num_tokens // seq_len
        if n < 1:
            raise ValueError(f"{self.folder} holds {self.num_tokens} tokens, fewer than one sequence of "
                             f"seq_len={seq_len}")
        self.shape = (n, seq_len)
        self.ndim = 2
        self.fingerprint = self.index.get("fingerprint", "")

    def __len__(self) -> int:
        return self.shape[0]

    def _tokens(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens `[start, stop)`, across shard boundaries."""
        out = np.empty(stop - start, dtype=np.int64)
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo = pos - self.offsets[k]
            take = min(stop - pos, len(self.shards[k]) - lo)
            out[pos - start:pos - start + take] = self.shards[k][lo:lo + take]
            pos += take
            k += 1
        return out

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(self.shape[0]))
        if np.isscalar(idx):
            i = int(idx)
            if not -self.shape[0] <= i < self.shape[0]:
                raise IndexError(f"sequence {i} out of range for {self.shape[0]} sequences")
            i %= self.shape[0]
            return self._tokens(i * self.seq_len, (i + 1) * self.seq_len)
        rows = np.asarray(idx).reshape(-1)
        out = np.empty((len(rows), self.seq_len), dtype=np.int64)
        for j, i in enumerate(rows):
            out[j] = self[int(i)]
        return out
