"""Training-free reconstruction gating of PonderTTT (deveworld/ponderTTT, `gating/reconstruction.py`,
`gating/ema.py`): UPDATE when the adaptive layer's self-supervised reconstruction loss exceeds a
threshold calibrated on unlabeled data for a target rate and adapted online."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from ponder.gates.base import (
    CURRENT_RECON_KEYS,
    PREV_RECON_KEYS,
    Gate,
    RateThreshold,
    binary_name,
    check_rate,
    check_skip_action,
    check_update_action,
    lookup,
)
from ponder.types import ChunkContext, ChunkRecord, is_update
from ttt_common.files import atomic_write_text

if TYPE_CHECKING:
    from ponder.env import PonderEnv


class ReconGate(Gate):
    """UPDATE when the reconstruction loss exceeds a threshold, else `skip_action` (default STATIC).

    Signal. Causal (default): the previous chunk's self-supervised reconstruction loss
    (`ctx.features["prev_recon_loss"]`), i.e. only tokens before chunk c. Lookahead
    (`lookahead=True`, the paper's variant): chunk c's own reconstruction loss at the carried state
    (`ctx.current["recon_loss"]`), read before chunk c is scored: chunk c's later tokens then
    influence how its earlier tokens are scored, so it is never the default and is reported apart.

    Calibration (`fit`, unlabeled): run the training documents with random decisions at the target
    rate (so the carried states resemble the gated run's), collect the signal of every chunk and
    calibrate a `RateThreshold` (threshold at the `1 - target_rate` quantile, EMA adaptation online,
    carried across documents as in the paper's gate). Labels are never read. Chunks without a
    signal (chunk 0 for the causal gate) UPDATE while the EMA rate is at or below the target.
    """

    needs_recon_pass = True

    def __init__(
        self,
        target_rate: float,
        update_action: str = "UPDATE_1",
        lookahead: bool = False,
        ema_alpha: float = 0.1,
        eta: float = 0.5,
        seed: int = 0,
        fit_max_chunks: int = 400,
        threshold: float | None = None,
        skip_action: str = "STATIC",
    ):
        super().__init__()
        spec = "recon-lookahead" if lookahead else "recon"
        self.target_rate = check_rate(target_rate, spec)
        self.update_action = check_update_action(update_action, spec)
        self.skip_action = check_skip_action(skip_action, spec)
        self.lookahead = bool(lookahead)
        self.name = binary_name(spec, update_action, skip_action)
        self.rate = RateThreshold(self.target_rate, ema_alpha, eta, spec, threshold)
        self.seed = int(seed)
        self.fit_max_chunks = int(fit_max_chunks)

    # the threshold's state, readable as before
    @property
    def threshold(self) -> float | None:
        return self.rate.threshold

    @property
    def scale(self) -> float:
        return self.rate.scale

    @property
    def calibration(self) -> list[float]:
        return self.rate.calibration

    # -- signal -------------------------------------------------------------------------------
    def signal(self, ctx: ChunkContext) -> float | None:
        """The reconstruction loss this gate thresholds (None when there is none yet)."""
        if self.lookahead:
            return lookup(ctx.current, CURRENT_RECON_KEYS)
        if (ctx.features or {}).get("has_prev", 1.0) == 0.0:
            return None  # chunk 0: the core fills prev_* with placeholders, not measurements
        return lookup(ctx.features, PREV_RECON_KEYS)

    # -- calibration --------------------------------------------------------------------------
    def calibrate(self, signals: list[float]) -> None:
        """Threshold = the (1 - target_rate) quantile of `signals`; scale = their interquartile range."""
        self.rate.calibrate(signals)

    def fit(self, env: PonderEnv, doc_ids: list[str]) -> None:
        """Collect unlabeled signals on the training documents and calibrate (see the class docstring)."""
        rng = random.Random(self.seed)
        signals: list[float] = []
        n = 0
        for doc_id in doc_ids:
            ctx = env.reset(doc_id)
            while ctx is not None and n < self.fit_max_chunks:
                if self.lookahead:
                    ctx.current = env.current_stats()
                s = self.signal(ctx)
                if s is not None:
                    signals.append(s)
                action = self.update_action if rng.random() < self.target_rate else self.skip_action
                _, ctx = env.step(action)
                n += 1
            if n >= self.fit_max_chunks:
                break
        if not signals:
            raise ValueError(
                f"gate {self.name!r}: calibration on {len(doc_ids)} training documents saw no "
                f"reconstruction signal (looked for {CURRENT_RECON_KEYS if self.lookahead else PREV_RECON_KEYS} "
                f"in ctx.{'current' if self.lookahead else 'features'}); give it documents of >= 2 chunks"
            )
        self.calibrate(signals)

    # -- decisions ----------------------------------------------------------------------------
    def decide(self, ctx: ChunkContext) -> str:
        if self.rate.threshold is None:
            raise ValueError(f"gate {self.name!r} is not calibrated: call fit(env, train_doc_ids) or load()")
        s = self.signal(ctx)
        self.last_signal = s
        return self.update_action if self.rate.update(s) else self.skip_action

    def observe(self, record: ChunkRecord) -> None:
        super().observe(record)
        self.rate.observe(is_update(record.action))

    def describe(self) -> dict:
        return dict(super().describe(), update_action=self.update_action, **self.rate.describe())

    # -- persistence --------------------------------------------------------------------------
    def _path(self, folder: str | Path) -> Path:
        return Path(folder) / f"gate_{self.name.replace(':', '_').replace('/', '_')}.json"

    def _identity(self) -> list:
        return [self.target_rate, self.lookahead, self.update_action, self.skip_action]

    def save(self, folder: str | Path) -> Path:
        path = self._path(folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"threshold": self.rate.initial_threshold, "scale": self.rate.scale, "identity": self._identity(),
                 "n_calibration": len(self.rate.calibration)}
        atomic_write_text(path, json.dumps(state, indent=1))
        return path

    def load(self, folder: str | Path) -> bool:
        path = self._path(folder)
        if not path.exists():
            return False
        state = json.loads(path.read_text())
        if state.get("identity") != self._identity():
            return False  # calibrated for another setting (or by an older version): recalibrate
        self.rate.restore(state["threshold"], state["scale"])
        return True
