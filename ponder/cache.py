"""On-disk cache of the frozen backbone's per-chunk outputs, shared by every mode, gate and layer.

The frozen backbone dominates CPU time, and it is the same for SKIP, every UPDATE_k and every
policy, so it runs once per (base model, data, chunking). Per chunk we keep what the adaptive path
and SKIP need:

* `input_ids` [n] and the last hidden state after the final norm `hidden` [n, D] (fp32: the
  adaptive layer reads it);
* for SKIP and the gates, per-token statistics of the backbone's own prediction instead of its
  logits: `skip_logprob` [n - 1] (log-probability of the actual next token), `entropy` [n] and
  `max_prob` [n] of the predictive distribution. Full logits would be n x V floats: 100 MB per
  512-token chunk at V = 49,152, far too big to keep, while these three vectors are all SKIP's loss
  and the confidence features need;
* `backbone_s`: wall-clock seconds of the backbone forward on this chunk (the SKIP cost; the
  evaluation re-times it in its own run, `retime_backbone`).

Each chunk is its own backbone window (the backbone sees no earlier chunk; the adaptive layer's
carried state is what links the chunks of a document), and is scored on its n - 1 within-window
next-token predictions. There is one entry per document, streamed to disk as it is computed (an
interrupted caching run keeps the finished documents; presets that share documents share their
entries). An entry's key hashes the weights by content (every tensor, and the config without its
path: moving a model or `--cache-dir` does not duplicate entries), the chunking and the document's
token ids. Entries are checked files (`ponder.storage`): a damaged one is rebuilt, saying so. The cache folder is capped at $TTT_PONDER_CACHE_MAX_GB (default 8) by evicting the least
recently used entries; `rm -rf .cache/ponder` clears it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ponder.backbone import Backbone, default_cache_dir
from ponder.storage import DamagedFileError, clean_stale_tmp, load_checked, prune_cache, save_checked

CACHE_VERSION = 3  # 2: checked files, key by weight content (no model path); 3: one entry per document
DEFAULT_MAX_CACHE_GB = 8.0


@dataclass
class CachedChunk:
    """One chunk's backbone outputs (see module docstring); n = number of tokens in the chunk."""

    input_ids: torch.Tensor      # [n] int64
    hidden: torch.Tensor         # [n, D] float32
    skip_logprob: torch.Tensor   # [n - 1] float32: log p_backbone(token t+1 | tokens <= t)
    entropy: torch.Tensor        # [n] float32
    max_prob: torch.Tensor       # [n] float32
    backbone_s: float

    @property
    def n_scored(self) -> int:
        return int(self.input_ids.numel()) - 1

    @property
    def skip_loss(self) -> float:
        return float(-self.skip_logprob.mean())


@dataclass
class CachedDoc:
    doc_id: str
    chunks: list[CachedChunk]


def chunk_ids(ids: list[int], chunk_size: int, max_chunks: int | None = None) -> list[list[int]]:
    """Split a token list into consecutive chunks of `chunk_size` (the last may be shorter; chunks
    with fewer than 2 tokens have no prediction to score and are dropped)."""
    if chunk_size < 2:
        raise ValueError(f"chunk_size={chunk_size} must be >= 2 (a chunk is scored on its next-token predictions)")
    chunks = [ids[i:i + chunk_size] for i in range(0, len(ids), chunk_size)]
    chunks = [c for c in chunks if len(c) >= 2]
    return chunks[:max_chunks] if max_chunks is not None else chunks


def select_documents(texts: list[str], tokenizer, n_docs: int, chunk_size: int, min_chunks: int = 1,
                     max_chunks: int | None = None, seed: int = 0, prefix: str = "doc") -> list[tuple[str, list[list[int]]]]:
    """Pick up to `n_docs` documents (seeded shuffle) with at least `min_chunks` chunks, tokenized and chunked.

    Returns:
        list of (doc_id, chunks of token ids); doc_id = `<prefix>-<index in texts>-<sha1 of text>`.
    """
    if n_docs < 1:
        raise ValueError(f"n_docs={n_docs} must be >= 1")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    picked = []
    for i in order:
        ids = tokenizer(texts[i], add_special_tokens=False, verbose=False)["input_ids"]
        chunks = chunk_ids(ids, chunk_size, max_chunks)
        if len(chunks) < min_chunks:
            continue
        digest = hashlib.sha1(texts[i].encode("utf-8", "replace")).hexdigest()[:8]
        picked.append((f"{prefix}-{i}-{digest}", chunks))
        if len(picked) >= n_docs:
            break
    if not picked:
        raise ValueError(f"no document has >= {min_chunks} chunks of chunk_size={chunk_size}; lower --min-doc-chunks "
                         "or --chunk-size")
    return picked


def model_fingerprint(backbone: Backbone) -> str:
    """Identity of the weights by content: sha256 over every parameter and buffer (name, shape,
    dtype, bytes) and the model config without its path, so a moved or renamed copy of the same
    weights reuses the cache and a change anywhere in the weights does not. Memoised on the
    backbone object (hashing 135M parameters takes about a second)."""
    cached = getattr(backbone, "_content_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    cfg = backbone.model.config.to_dict()
    cfg.pop("_name_or_path", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(backbone.model.state_dict(keep_vars=False).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(str(len(backbone.tokenizer)).encode())
    fp = h.hexdigest()[:20]
    try:
        backbone._content_fingerprint = fp
    except AttributeError:
        pass
    return fp


def cache_key(backbone: Backbone, chunks: list[list[int]], chunk_size: int) -> str:
    """Key of one document's entry: weights (by content), chunking and the document's token ids."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{model_fingerprint(backbone)}|{chunk_size}".encode())
    for c in chunks:
        h.update(torch.tensor(c, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_chunk(backbone: Backbone, ids: list[int]) -> CachedChunk:
    """Run the backbone on one chunk and keep the cached quantities."""
    input_ids = torch.tensor(ids, dtype=torch.int64)
    t0 = time.perf_counter()
    hidden, logits = backbone.forward_chunk(input_ids[None])
    elapsed = time.perf_counter() - t0
    logp = F.log_softmax(logits[0], dim=-1)                              # [n, V]
    skip_logprob = logp[:-1].gather(-1, input_ids[1:, None])[:, 0]       # [n - 1]
    prob = logp.exp()
    entropy = -(prob * logp).sum(-1)
    max_prob = prob.max(-1).values
    return CachedChunk(input_ids, hidden[0].contiguous(), skip_logprob.contiguous(), entropy, max_prob, elapsed)


def retime_backbone(backbone: Backbone, docs: list[CachedDoc], n_chunks: int = 8) -> float:
    """Measure the backbone forward now and set every chunk's `backbone_s` from it.

    Why: a cache entry records the forward time of the run that wrote it, possibly on a loaded machine
    (entries written at load average 12-19 recorded ~5.7 s per 128-token chunk instead of ~0.3 s, which
    squeezed every "wall vs SKIP" ratio towards 1). The SKIP cost must be measured beside the adaptive
    passes it is compared with, so the evaluation re-times it: the median seconds per token over the first
    `n_chunks` chunks (after one untimed warm-up call), times each chunk's token count.

    Returns:
        seconds per token.
    """
    chunks = [c for d in docs for c in d.chunks][:max(1, n_chunks)]
    if not chunks:
        raise ValueError("retime_backbone needs at least one cached chunk")
    with torch.no_grad():
        backbone.forward_chunk(chunks[0].input_ids[None])
        per_token = []
        for c in chunks:
            t0 = time.perf_counter()
            backbone.forward_chunk(c.input_ids[None])
            per_token.append((time.perf_counter() - t0) / c.input_ids.numel())
    s_per_token = sorted(per_token)[len(per_token) // 2]
    for d in docs:
        for c in d.chunks:
            c.backbone_s = s_per_token * c.input_ids.numel()
    return s_per_token


def build_cache(backbone: Backbone, docs: list[tuple[str, list[list[int]]]], chunk_size: int,
                cache_dir: Path | None = None, desc: str = "backbone", progress: bool = True) -> list[CachedDoc]:
    """Cached backbone outputs for `docs`: each document's entry is loaded, or computed and saved
    atomically as soon as it is done (streamed: a killed run loses at most the document in progress).

    Args:
        docs: output of `select_documents`.
        chunk_size: the chunking used (part of the key).
        cache_dir: root (default `.cache/`); entries go to `<root>/ponder/<key>.pt`.
    """
    from tqdm.auto import tqdm

    root = Path(cache_dir or default_cache_dir()) / "ponder"
    for p in clean_stale_tmp(root):
        print(f"[cache] removed a leftover temporary file {p}", flush=True)
    n_total = sum(len(c) for _, c in docs)
    bar = tqdm(total=n_total, desc=f"[cache] {desc} forward", disable=not progress, mininterval=2.0)
    out, paths, reused, warm = [], [], 0, False
    for doc_id, chunks in docs:
        path = root / f"{cache_key(backbone, chunks, chunk_size)}.pt"
        paths.append(path)
        cached = None
        if path.exists():
            try:
                cached = load_checked(path)["chunks"]
            except DamagedFileError as err:
                print(f"[cache] {desc}: {err}; rebuilding it", flush=True)
            else:
                os.utime(path)  # most recently used: the size cap evicts others first
                reused += 1
        if cached is None:
            if not warm:  # one untimed call first: the first forward pays one-off start-up costs
                backbone.forward_chunk(torch.tensor([chunks[0]]))
                warm = True
            cached = [compute_chunk(backbone, ids) for ids in chunks]
            save_checked({"chunks": cached, "meta": {"base": backbone.name, "chunk_size": chunk_size,
                                                     "model_fingerprint": model_fingerprint(backbone),
                                                     "n_chunks": len(chunks)}}, path)
        out.append(CachedDoc(doc_id, cached))
        bar.update(len(chunks))
    bar.close()
    print(f"[cache] {desc}: reused {reused} of {len(docs)} documents, computed {len(docs) - reused} "
          f"({n_total} chunks in all) in {root}", flush=True)
    max_gb = float(os.environ.get("TTT_PONDER_CACHE_MAX_GB", DEFAULT_MAX_CACHE_GB))
    for p in prune_cache(root, int(max_gb * 2**30), keep=tuple(paths)):
        print(f"[cache] size cap {max_gb:g} GB (TTT_PONDER_CACHE_MAX_GB): evicted {p}", flush=True)
    return out
