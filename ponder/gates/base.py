"""The gate protocol (`Gate`), argument checks, and the rate-tracking threshold the adaptive gates share.

Gate protocol (called by `ponder.runner.evaluate_gate`): `fit(env, train_doc_ids)` once on the
TRAIN split (unlabeled for training-free gates), `prepare(env, eval_doc_ids)` (only the budgeted
oracle looks at anything there: the evaluation documents' labels), then for every evaluation
document `reset(doc_id)` and per chunk `decide(ctx) -> action`, `observe(record)`. After `decide`,
`gate.last_signal` holds the number the decision was based on (for `ChunkRecord.gate_signal`).
`save(folder)` / `load(folder)` persist what `fit` learned so a run can reuse it.

Binary gates choose per chunk between their `update_action` (an UPDATE_k) and their
`skip_action`: STATIC by default (the trained layer without an inner update, the carried state
passed on unchanged), so a gate decides between a STATIC-like and an UPDATE chunk and its loss is
comparable with fixed:STATIC and fixed:UPDATE_k; `skip_action="SKIP"` (the bare backbone) is kept
for comparison with earlier runs.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from ponder.types import UPDATE_ACTIONS, ChunkContext, ChunkRecord

if TYPE_CHECKING:  # the env imports torch; gates are cheap to import without it
    from ponder.env import PonderEnv

# what a binary gate may do on a chunk it does not update
SKIP_ACTIONS: tuple[str, ...] = ("STATIC", "SKIP")
# keys looked up for the reconstruction signal (the core's names; the first one present wins)
PREV_RECON_KEYS = ("prev_recon_loss",)
CURRENT_RECON_KEYS = ("recon_loss",)


def check_rate(target_rate: float | None, spec: str) -> float:
    """`target_rate` as a float in (0, 1], else a ValueError naming the gate `spec`."""
    if target_rate is None:
        raise ValueError(
            f"gate {spec!r} needs a target update rate: pass target_rate in (0, 1] "
            "(e.g. --target-rate 0.5)"
        )
    rate = float(target_rate)
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"target_rate={target_rate!r} for gate {spec!r} must be in (0, 1]")
    return rate


def check_update_action(update_action: str, spec: str) -> str:
    if update_action not in UPDATE_ACTIONS:
        raise ValueError(f"update action {update_action!r} of gate {spec!r} must be one of {UPDATE_ACTIONS}")
    return update_action


def check_skip_action(skip_action: str, spec: str) -> str:
    if skip_action not in SKIP_ACTIONS:
        raise ValueError(f"skip action {skip_action!r} of gate {spec!r} must be one of {SKIP_ACTIONS} "
                         "(STATIC: the trained layer without an update; SKIP: the bare backbone)")
    return skip_action


def binary_name(spec: str, update_action: str, skip_action: str) -> str:
    """Table name of a binary gate: `spec`, `:UPDATE_k` unless UPDATE_1, `/SKIP` when it skips to the backbone."""
    name = spec if update_action == "UPDATE_1" else f"{spec}:{update_action}"
    return name if skip_action == "STATIC" else f"{name}/SKIP"


def lookup(values: dict[str, float] | None, keys: tuple[str, ...]) -> float | None:
    """The first finite value among `keys` in `values`, else None (e.g. chunk 0 has no previous chunk)."""
    if not values:
        return None
    for key in keys:
        value = values.get(key)
        if value is not None and math.isfinite(float(value)):
            return float(value)
    return None


def doc_seed(seed: int, doc_id: str) -> int:
    """A stable per-document seed: decisions do not depend on the order documents are evaluated in."""
    return (int(seed) * 1_000_003 + zlib.crc32(doc_id.encode())) % (2**32)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of `values` at `q` in [0, 1] (numpy's default method)."""
    if not values:
        raise ValueError("quantile of an empty list: calibration saw no signal values")
    xs = sorted(values)
    pos = min(max(q, 0.0), 1.0) * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class RateThreshold:
    """UPDATE when a score exceeds a threshold calibrated for a target rate, adapted online.

    Calibration: threshold = the `1 - target_rate` quantile of scores seen on training data; scale =
    their interquartile range. Online (`observe`): an EMA of the realised update indicator,
    `rate <- (1 - alpha) rate + alpha [updated]`, moves the threshold by
    `eta (rate - target_rate) scale`, so it rises when updating too often and falls when too rarely
    (one stream across documents). A chunk without a score UPDATEs while the EMA rate is at or below
    the target. Shared by the reconstruction gate and the learned gate, so both meet the same rate
    the same way.
    """

    def __init__(self, target_rate: float, ema_alpha: float = 0.1, eta: float = 0.5, spec: str = "gate",
                 threshold: float | None = None):
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha={ema_alpha} of gate {spec!r} must be in (0, 1]")
        if eta < 0:
            raise ValueError(f"eta={eta} of gate {spec!r} must be >= 0 (0 disables the online adaptation)")
        self.target_rate = target_rate
        self.ema_alpha, self.eta = float(ema_alpha), float(eta)
        self.threshold: float | None = threshold
        self.initial_threshold: float | None = threshold
        self.scale = 1.0
        self.ema_rate = target_rate
        self.calibration: list[float] = []

    def calibrate(self, scores: list[float]) -> None:
        self.calibration = [float(s) for s in scores if s is not None and math.isfinite(float(s))]
        self.threshold = quantile(self.calibration, 1.0 - self.target_rate)
        self.initial_threshold = self.threshold
        iqr = quantile(self.calibration, 0.75) - quantile(self.calibration, 0.25)
        spread = max(self.calibration) - min(self.calibration)
        self.scale = iqr if iqr > 0 else (spread if spread > 0 else max(abs(self.threshold), 1e-3))
        self.ema_rate = self.target_rate

    def restore(self, threshold: float, scale: float) -> None:
        self.threshold = self.initial_threshold = float(threshold)
        self.scale = float(scale)
        self.ema_rate = self.target_rate

    def update(self, score: float | None) -> bool:
        """True to UPDATE the chunk with this score (None: no score yet)."""
        if score is None:
            return self.ema_rate <= self.target_rate
        return score > self.threshold

    def observe(self, updated: bool) -> None:
        self.ema_rate = (1.0 - self.ema_alpha) * self.ema_rate + self.ema_alpha * float(updated)
        if self.threshold is not None:
            self.threshold += self.eta * (self.ema_rate - self.target_rate) * self.scale

    def describe(self) -> dict:
        return {"threshold": self.threshold, "initial_threshold": self.initial_threshold, "scale": self.scale,
                "ema_alpha": self.ema_alpha, "eta": self.eta, "n_calibration": len(self.calibration)}


class Gate:
    """Base class: decides one action per chunk.

    Attributes:
        name: label used in tables and plots.
        lookahead: True if `decide` reads `ctx.current` (chunk c's own statistics): not causal.
        uses_labels: True if `decide` reads `ctx.oracle_losses` (chunk c's LM losses): an upper bound.
        target_rate: target fraction of chunks run with an UPDATE_k (None for fixed modes / oracle).
        skip_action: what the gate runs on a chunk it does not update (STATIC or SKIP; None for
            fixed modes and the per-chunk oracle).
        last_signal: the number the last decision was based on (None if none).
        needs_recon_pass: True if `decide` reads a reconstruction loss (its own chunk's or the
            previous chunk's), which takes the adaptive layer's UPDATE_1 pass on every chunk: the
            runner charges that pass to the gate (FLOPs and seconds) on chunks not run with UPDATE_1.
    """

    name: str = "gate"
    lookahead: bool = False
    uses_labels: bool = False
    needs_recon_pass: bool = False

    def __init__(self) -> None:
        self.target_rate: float | None = None
        self.skip_action: str | None = None
        self.last_signal: float | None = None

    def fit(self, env: PonderEnv, doc_ids: list[str]) -> None:
        """Calibrate or train on the TRAIN split (default: nothing to learn)."""

    def prepare(self, env: PonderEnv, doc_ids: list[str]) -> None:
        """Look at the evaluation documents before they are run (only label-using oracles need it)."""

    def reset(self, doc_id: str) -> None:
        """Start a new document."""
        self.last_signal = None

    def decide(self, ctx: ChunkContext) -> str:
        raise NotImplementedError

    def observe(self, record: ChunkRecord) -> None:
        """See the outcome of the chunk just run; fills `record.gate_signal` if the runner left it empty."""
        if record.gate_signal is None and self.last_signal is not None:
            record.gate_signal = self.last_signal

    def describe(self) -> dict:
        """Metadata for reports: flags and the settings that define this gate."""
        return {"name": self.name, "lookahead": self.lookahead, "uses_labels": self.uses_labels,
                "target_rate": self.target_rate, "skip_action": self.skip_action}

    def save(self, folder: str | Path) -> Path | None:
        """Persist what `fit` learned under `folder`; returns the file written (None: nothing to save)."""
        return None

    def load(self, folder: str | Path) -> bool:
        """Restore what `save` wrote; returns False if there is nothing (then call `fit`)."""
        return False
