"""Paired two-stage bootstrap over documents and the chunks within them, for PonderTTT's tables.

Every gate is evaluated on the same held-out chunks, so the uncertainty of a loss, of a difference
between two gates and of an oracle recovery comes from which documents (and which of their chunks)
happened to be held out. One bootstrap replicate draws documents with replacement and, within each
drawn document, its chunks with replacement; every gate is then scored on that same multiset of
chunks (paired), so differences between gates keep their correlation. A statistic is any function
of the per-gate token-weighted losses (`Bootstrap.replicates` returns them, one column per gate),
and its interval is the percentile interval of the statistic over the replicates.
"""

from __future__ import annotations

import math

import numpy as np


class Bootstrap:
    """Resampling weights over the chunks of `records` (paired across gates).

    Args:
        records: per-chunk dicts with `doc_id`, `chunk_idx`, `n_tokens`, `loss` and a gate name
            under `gate`; every gate should cover the same chunks (missing chunks weigh 0).
        n_boot: replicates.
        seed: of the resampling.
    """

    def __init__(self, records: list[dict], n_boot: int = 1000, seed: int = 0):
        keys = sorted({(r["doc_id"], int(r["chunk_idx"])) for r in records})
        if not keys:
            raise ValueError("Bootstrap needs at least one record")
        self.keys = keys
        self.index = {k: i for i, k in enumerate(keys)}
        docs = sorted({k[0] for k in keys})
        by_doc = [[self.index[k] for k in keys if k[0] == d] for d in docs]
        rng = np.random.default_rng(seed)
        counts = np.zeros((n_boot, len(keys)))
        for b in range(n_boot):
            for d in rng.integers(0, len(docs), len(docs)):
                chunks = by_doc[d]
                np.add.at(counts[b], np.asarray(chunks)[rng.integers(0, len(chunks), len(chunks))], 1.0)
        self.counts = counts  # [n_boot, n_chunks]: how often each chunk is in each replicate
        self.n_docs, self.n_chunks = len(docs), len(keys)
        self._cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for r in records:
            name = r["gate"]
            if name not in self._cols:
                self._cols[name] = (np.zeros(len(keys)), np.zeros(len(keys)))
            tok_loss, tok = self._cols[name]
            i = self.index[(r["doc_id"], int(r["chunk_idx"]))]
            tok_loss[i] = float(r["loss"]) * int(r["n_tokens"])
            tok[i] = int(r["n_tokens"])

    def gates(self) -> list[str]:
        return list(self._cols)

    def losses(self, gate: str) -> np.ndarray:
        """[n_boot] token-weighted loss of `gate` in each replicate."""
        tok_loss, tok = self._cols[gate]
        return (self.counts @ tok_loss) / np.maximum(self.counts @ tok, 1e-12)

    def tokens(self, gate: str) -> np.ndarray:
        return self.counts @ self._cols[gate][1]


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite `values` (NaN, NaN when fewer than 10 are finite)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 10:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def fmt_ci(value, lo, hi, spec: str = ".4f") -> str:
    """`value [lo, hi]` (— for a missing value; the value alone when the interval is missing)."""
    if value is None or not math.isfinite(value):
        return "—"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return format(value, spec)
    return f"{format(value, spec)} [{format(lo, spec)}, {format(hi, spec)}]"
