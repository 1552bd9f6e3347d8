"""Tokenise documents and pack them into fixed-length training sequences, with a resumable position.

The usual LM pre-training packing (as in nanoGPT's `data/*/prepare.py` and torchtitan's
`HuggingFaceDataset`): every document is tokenised, followed by the end-of-text token, all documents
are concatenated, and the stream is cut into sequences of `seq_len` tokens (the tail that does not
fill a sequence is dropped). Sequences are visited in a seeded random order, a new permutation each
epoch; the loader's whole state is `(epoch, position)`, so a resumed run reads exactly the batches
the interrupted one would have read.

Sharding for data parallelism is by index: optimizer step `s`, micro-batch `m` and rank `r` read
global sequences `[base + (m * world + r) * B, ... + B)` with `base = s * accum * world * B`. A run
on one process with batch `world * B` therefore reads the same global batch as `world` ranks with
batch `B` each.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ttt_common.files import atomic_write, clean_stale_tmp, prune_lru

# the packed-array cache is keyed by content (texts, tokenizer, seq_len), so its entries never go stale, but
# every new corpus / seq_len adds one: least recently used entries beyond this size are deleted
DEFAULT_CACHE_CAP_BYTES = int(float(os.environ.get("TTT_PACKED_CACHE_GB", "4")) * 2**30)
_TMP_MAX_AGE_S = 3600  # a `.tmp` older than this was left by a killed writer (live writers take seconds)


def prune_cache(folder: str | os.PathLike, max_bytes: int = DEFAULT_CACHE_CAP_BYTES, keep: Path | None = None) -> list[Path]:
    """Delete least recently used `packed-*.npy` entries until the folder holds <= `max_bytes`, and `.tmp`
    files left by killed writers. `keep` (the entry just used) is never deleted. Returns what was deleted."""
    # by age, not by pid: ranks on several machines may share the cache folder
    removed = clean_stale_tmp(folder, ".packed-*.tmp", older_than_s=_TMP_MAX_AGE_S)
    return removed + prune_lru(folder, "packed-*.npy", max_bytes, keep=(keep,) if keep is not None else ())


def tokenize_and_pack(texts: list[str], tokenizer, seq_len: int, cache_dir: str | os.PathLike | None = None,
                      batch_docs: int = 256) -> np.ndarray:
    """Tokenise `texts`, join them with the tokenizer's EOS token and cut into `seq_len`-token rows.

    Args:
        texts: documents.
        tokenizer: a Hugging Face tokenizer with `eos_token_id`.
        seq_len: tokens per sequence (the model shifts labels itself, so `seq_len - 1` targets per row).
        cache_dir: when given, the packed array is cached there as `.npy`, keyed by a hash of the
            texts, the tokenizer's vocabulary size and name, and `seq_len`.
        batch_docs: documents per tokenizer call.

    Returns:
        int32 array `[N, seq_len]`, N >= 1.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a sequence needs at least one next-token target)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; documents cannot be "
                         "separated when packing; use a tokenizer with an end-of-text token")
    cache_file = None
    if cache_dir is not None:
        h = hashlib.sha256()
        h.update(f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|{eos}|{seq_len}|{len(texts)}".encode())
        for t in texts:
            h.update(hashlib.sha256(t.encode("utf-8", errors="replace")).digest())
        cache_file = Path(cache_dir) / f"packed-{h.hexdigest()[:20]}.npy"
        if cache_file.exists():
            try:
                # memory-mapped: ranks share the page cache instead of each holding a copy
                arr = np.load(cache_file, mmap_mode="r")
                if arr.ndim == 2 and arr.shape[1] == seq_len:
                    os.utime(cache_file)  # mark as recently used for prune_cache
                    return arr
            except (OSError, ValueError):
                pass  # a damaged cache entry is rebuilt below
    ids: list[np.ndarray] = []
    for i in range(0, len(texts), batch_docs):
        enc = tokenizer(texts[i:i + batch_docs], add_special_tokens=False)["input_ids"]
        for doc in enc:
            ids.append(np.asarray(doc + [eos], dtype=np.int32))
    stream = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    n = len(stream) // seq_len
    if n < 1:
        raise ValueError(f"the data hold {len(stream)} tokens, fewer than one sequence of seq_len={seq_len}; "
                         "give more documents or a shorter --seq-len")
    arr = np.ascontiguousarray(stream[: n * seq_len].reshape(n, seq_len))
    if cache_file is not None:
        # atomic: concurrent ranks never read half a file (a file object: np.save appends ".npy" to names)
        with atomic_write(cache_file) as f:
            np.save(f, arr)
        prune_cache(cache_file.parent, keep=cache_file)
    return arr


class PackedLoader:
    """Deterministic, resumable, rank-sharded batches over a packed `[N, seq_len]` array.

    Args:
        data: int array `[N, seq_len]` (from `tokenize_and_pack`).
        batch_size: sequences per micro-batch per rank (B).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        seed: seed of the per-epoch permutations.
        shuffle: visit sequences in a seeded random order (else in order).

    State: `epoch` and `position` (global sequence index within the epoch's order); `state_dict()`
    / `load_state_dict()` save and restore both.
    """

    def __init__(self, data: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if data.ndim != 2:
            raise ValueError(f"data must be [N, seq_len], got shape {tuple(data.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        global_batch = batch_size * world_size
        if data.shape[0] < global_batch:
            raise ValueError(f"the data hold {data.shape[0]} sequences, fewer than one global micro-batch of "
                             f"batch_size {batch_size} x world size {world_size}; give more data or a smaller "
                             "--batch-size / --seq-len")
        self.data = data
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = self.data.shape[0]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def next_batch(self) -> torch.Tensor:
        """The next micro-batch of this rank: int64 `[B, seq_len]`. All ranks must call it in lockstep."""
        global_batch = self.batch_size * self.world_size
        if self.position + global_batch > self.data.shape[0]:
            # the tail smaller than one global batch is skipped so that every rank starts the new epoch together
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        start = self.position + self.rank * self.batch_size
        idx = self._order[start:start + self.batch_size]
        self.position += global_batch
        return torch.from_numpy(self.data[idx].astype(np.int64))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_sequences": int(self.data.shape[0]), "seq_len": int(self.data.shape[1])}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_sequences", "seq_len"):
            if key in state and int(state[key]) != int(self.state_dict()[key]):
                raise ValueError(f"data loader state was saved with {key}={state[key]} but the current data have "
                                 f"{key}={self.state_dict()[key]}; resume with the same --dataset, --max-docs, "
                                 "--tokenizer and --seq-len")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        self._order = self._permutation(self.epoch)


def main(argv: list[str] | None = None) -> int:
    """`python -m ttt_common.packing clean [--max-gb G]`: empty (or shrink) the packed-data cache."""
    import argparse

    from ttt_common.tokenizer import cache_dir

    p = argparse.ArgumentParser(prog="python -m ttt_common.packing", description=main.__doc__)
    p.add_argument("command", choices=["clean"])
    p.add_argument("--max-gb", type=float, default=0.0, help="keep the most recently used entries up to this size "
                                                             "(default 0: delete all)")
    args = p.parse_args(argv)
    if args.max_gb < 0:
        raise ValueError(f"--max-gb={args.max_gb} must be >= 0")
    folder = cache_dir() / "packed"
    removed = prune_cache(folder, int(args.max_gb * 2**30))
    print(f"{folder}: removed {len(removed)} files")
    return 0


if __name__ == "__main__":
    from ttt_common.cli import run_cli

    sys.exit(run_cli(main, prog="python -m ttt_common.packing"))
