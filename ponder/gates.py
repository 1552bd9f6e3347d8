"""Gates: which chunks of a document get test-time training, and how much.

Reproduces the gating strategies of PonderTTT (deveworld/ponderTTT):

* the baselines of its paper "When to Ponder: Adaptive Compute Allocation for Code Generation via
  Test-Time Training" (`src/ponderttt/gating/fixed.py`, `random.py`): a fixed action for every
  chunk, and random UPDATE at a target rate;
* its training-free reconstruction gating (`gating/reconstruction.py`, `gating/ema.py`): UPDATE
  when the adaptive layer's self-supervised reconstruction loss exceeds a threshold that is
  calibrated on unlabeled data for a target update rate and then adapted online so that the
  realised rate tracks the target;
* the oracles that the paper's Oracle Recovery is measured against (per chunk the best action,
  and the budgeted oracle that updates the X% of chunks with the largest gain);
* the learned actor-critic policy of commit 350afb5 (`models/policy.py`), trained with PPO under a
  PID-Lagrangian budget (see `ponder/policy.py`).

Causality. Every gate here except `recon-lookahead` and the label-using oracles decides chunk c
from `ctx.features` only, which the core fills from tokens before chunk c. The paper's own
reconstruction gate reads chunk c's reconstruction loss before deciding how chunk c is scored, so
chunk c's later tokens influence the scores of its earlier tokens; that variant is offered as
`recon-lookahead` (`lookahead = True`), never the default, and reported apart. The oracles read
`ctx.oracle_losses` (the labels of chunk c): they are upper bounds, flagged `uses_labels = True`.

Gate protocol (called by `ponder.runner`): `fit(env, train_doc_ids)` once on the TRAIN split
(unlabeled for training-free gates), optionally `prepare(env, eval_doc_ids)` (only the budgeted
oracle needs it: it looks at the evaluation documents' labels), then for every evaluation document
`reset(doc_id)` and per chunk `decide(ctx) -> action`, `observe(record)`. After `decide`,
`gate.last_signal` holds the number the decision was based on (for `ChunkRecord.gate_signal`).
`save(folder)` / `load(folder)` persist what `fit` learned so a run can reuse it.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path
from typing import Any

from ponder.types import ACTIONS, ALL_ACTIONS, flops_multiplier, is_update

# the names build_gate understands (a trailing ":UPDATE_k" picks the update action of the binary gates)
GATE_SPECS = (
    "fixed:SKIP",
    "fixed:UPDATE_1",
    "fixed:UPDATE_2",
    "fixed:UPDATE_4",
    "random",
    "oracle",
    "budgeted-oracle",
    "recon",
    "recon-lookahead",
    "ppo",
)

# keys looked up for the reconstruction signal (the core's names; the first one present wins)
PREV_RECON_KEYS = ("prev_recon_loss",)
CURRENT_RECON_KEYS = ("recon_loss",)


def _check_rate(target_rate: float | None, spec: str) -> float:
    if target_rate is None:
        raise ValueError(
            f"gate {spec!r} needs a target update rate: pass target_rate in (0, 1] "
            "(e.g. --target-rate 0.5)"
        )
    rate = float(target_rate)
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"target_rate={target_rate!r} for gate {spec!r} must be in (0, 1]")
    return rate


def _check_update_action(update_action: str, spec: str) -> str:
    if update_action not in ACTIONS or update_action == "SKIP":
        raise ValueError(
            f"update action {update_action!r} of gate {spec!r} must be one of {ACTIONS[1:]}"
        )
    return update_action


def _lookup(values: dict[str, float] | None, keys: tuple[str, ...]) -> float | None:
    """The first finite value among `keys` in `values`, else None (e.g. chunk 0 has no previous chunk)."""
    if not values:
        return None
    for key in keys:
        value = values.get(key)
        if value is not None and math.isfinite(float(value)):
            return float(value)
    return None


def _doc_seed(seed: int, doc_id: str) -> int:
    # a stable per-document seed: decisions do not depend on the order documents are evaluated in
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


class Gate:
    """Base class: decides one action per chunk.

    Attributes:
        name: label used in tables and plots.
        lookahead: True if `decide` reads `ctx.current` (chunk c's own statistics): not causal.
        uses_labels: True if `decide` reads `ctx.oracle_losses` (chunk c's LM losses): an upper bound.
        target_rate: target fraction of chunks that are not SKIP (None for fixed modes / oracle).
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
        self.last_signal: float | None = None

    def fit(self, env: Any, doc_ids: list[str]) -> None:
        """Calibrate or train on the TRAIN split (default: nothing to learn)."""

    def prepare(self, env: Any, doc_ids: list[str]) -> None:
        """Look at the evaluation documents before they are run (only label-using oracles need it)."""

    def reset(self, doc_id: str) -> None:
        """Start a new document."""
        self.last_signal = None

    def decide(self, ctx: Any) -> str:
        raise NotImplementedError

    def observe(self, record: Any) -> None:
        """See the outcome of the chunk just run; fills `record.gate_signal` if the runner left it empty."""
        if getattr(record, "gate_signal", None) is None and self.last_signal is not None:
            try:
                record.gate_signal = self.last_signal
            except AttributeError:  # frozen/immutable record: the runner keeps its own copy
                pass

    def describe(self) -> dict:
        """Metadata for reports: flags and the settings that define this gate."""
        return {
            "name": self.name,
            "lookahead": self.lookahead,
            "uses_labels": self.uses_labels,
            "target_rate": self.target_rate,
        }

    def save(self, folder: str | Path) -> Path | None:
        """Persist what `fit` learned under `folder`; returns the file written (None: nothing to save)."""
        return None

    def load(self, folder: str | Path) -> bool:
        """Restore what `save` wrote; returns False if there is nothing (then call `fit`)."""
        return False


class FixedGate(Gate):
    """The same action for every chunk (`fixed:SKIP`, `fixed:UPDATE_k`): PonderTTT's fixed modes."""

    def __init__(self, action: str):
        super().__init__()
        if action not in ALL_ACTIONS:
            raise ValueError(f"fixed gate action {action!r} must be one of {ALL_ACTIONS} (spec 'fixed:UPDATE_1')")
        self.action = action
        self.name = f"fixed:{action}"
        self.target_rate = 1.0 if is_update(action) else 0.0

    def decide(self, ctx: Any) -> str:
        self.last_signal = None
        return self.action


class RandomGate(Gate):
    """UPDATE with probability `target_rate`, else SKIP; seeded per (seed, document)."""

    def __init__(self, target_rate: float, update_action: str = "UPDATE_1", seed: int = 0):
        super().__init__()
        self.target_rate = _check_rate(target_rate, "random")
        self.update_action = _check_update_action(update_action, "random")
        self.seed = int(seed)
        self.name = "random" if update_action == "UPDATE_1" else f"random:{update_action}"
        self._rng = random.Random(self.seed)

    def reset(self, doc_id: str) -> None:
        super().reset(doc_id)
        self._rng = random.Random(_doc_seed(self.seed, doc_id))

    def decide(self, ctx: Any) -> str:
        u = self._rng.random()
        self.last_signal = u
        return self.update_action if u < self.target_rate else "SKIP"


class OracleGate(Gate):
    """Per chunk the action with the lowest LM loss (reads the labels: an upper bound, not a policy).

    Ties go to the cheaper action. `last_signal` is the gain of the chosen action over SKIP (nats/token).
    """

    uses_labels = True

    def __init__(self, actions: tuple[str, ...] = ACTIONS):
        super().__init__()
        for a in actions:
            if a not in ACTIONS:
                raise ValueError(f"oracle action {a!r} must be one of {ACTIONS}")
        self.actions = tuple(actions)
        self.name = "oracle"

    def decide(self, ctx: Any) -> str:
        losses = ctx.oracle_losses
        if not losses:
            raise ValueError(
                f"gate 'oracle' got ctx.oracle_losses={losses!r} for doc {ctx.doc_id!r} chunk {ctx.chunk_idx}: "
                "the runner must fill it for gates with uses_labels=True"
            )
        # min over (loss, cost) picks the cheaper action on exact ties
        best = min(self.actions, key=lambda a: (float(losses[a]), flops_multiplier(a)))
        if "SKIP" in losses:
            self.last_signal = float(losses["SKIP"]) - float(losses[best])
        return best


class BudgetedOracleGate(Gate):
    """UPDATE exactly the `target_rate` fraction of evaluation chunks with the largest gain (uses labels).

    Gain of a chunk = L_SKIP - L_update for that chunk (nats/token, weighted by its scored tokens
    when ranking the total loss reduction). The optimum over all subsets is combinatorial because
    the fast-weight state carried to later chunks depends on which chunks were updated, so
    `prepare` runs a two-pass approximation:

    1. run every evaluation document once with `update_action` on every chunk and read each
       chunk's gain from `env.peek_losses()` (labels) at the state of that trajectory;
    2. plan UPDATE for the top `round(target_rate * n_chunks)` chunks of the whole evaluation set
       by gain (ties: earlier chunk first), SKIP for the rest.

    The runner's pass then follows the plan, so the realised update rate equals the target up to
    rounding. Without `prepare`, `reset` raises: a budget over chunks needs every chunk's gain first.
    `per_document=True` budgets each document separately instead of the whole set.
    """

    uses_labels = True

    def __init__(self, target_rate: float, update_action: str = "UPDATE_1", per_document: bool = False):
        super().__init__()
        self.target_rate = _check_rate(target_rate, "budgeted-oracle")
        self.update_action = _check_update_action(update_action, "budgeted-oracle")
        self.per_document = bool(per_document)
        self.name = "budgeted-oracle" if update_action == "UPDATE_1" else f"budgeted-oracle:{update_action}"
        self.gains: dict[tuple[str, int], float] = {}
        self.n_tokens: dict[tuple[str, int], int] = {}
        self.plan: set[tuple[str, int]] = set()
        self._doc: str | None = None

    def prepare(self, env: Any, doc_ids: list[str]) -> None:
        """Pass 1 over the evaluation documents (see the class docstring); builds `self.plan`."""
        self.gains, self.n_tokens = {}, {}
        for doc_id in doc_ids:
            ctx = env.reset(doc_id)
            while ctx is not None:
                losses = env.peek_losses()
                key = (doc_id, int(ctx.chunk_idx))
                self.gains[key] = float(losses["SKIP"]) - float(losses[self.update_action])
                record, ctx = env.step(self.update_action)
                self.n_tokens[key] = int(record.n_tokens)
        self.plan = self.make_plan(self.gains, self.target_rate, self.per_document, self.n_tokens)

    @staticmethod
    def make_plan(
        gains: dict[tuple[str, int], float],
        target_rate: float,
        per_document: bool = False,
        n_tokens: dict[tuple[str, int], int] | None = None,
    ) -> set[tuple[str, int]]:
        """The (doc_id, chunk_idx) keys to UPDATE: the top `round(rate * n)` by token-weighted gain."""
        groups: dict[str, list[tuple[str, int]]] = {}
        for key in gains:
            groups.setdefault(key[0] if per_document else "", []).append(key)
        plan: set[tuple[str, int]] = set()
        for keys in groups.values():
            n_update = int(round(target_rate * len(keys)))
            weight = (lambda k: n_tokens.get(k, 1)) if n_tokens else (lambda k: 1)
            ranked = sorted(keys, key=lambda k: (-gains[k] * weight(k), k[0], k[1]))
            plan.update(ranked[:n_update])
        return plan

    def reset(self, doc_id: str) -> None:
        super().reset(doc_id)
        if not self.gains:
            raise ValueError(
                "gate 'budgeted-oracle' has no plan: call gate.prepare(env, eval_doc_ids) before evaluating "
                "(it needs to see every evaluation chunk's gain first)"
            )
        self._doc = doc_id

    def decide(self, ctx: Any) -> str:
        key = (ctx.doc_id, int(ctx.chunk_idx))
        if ctx.oracle_losses:
            self.last_signal = float(ctx.oracle_losses["SKIP"]) - float(ctx.oracle_losses[self.update_action])
        else:
            self.last_signal = self.gains.get(key)
        return self.update_action if key in self.plan else "SKIP"

    def describe(self) -> dict:
        d = super().describe()
        d.update(update_action=self.update_action, per_document=self.per_document, planned=len(self.plan),
                 chunks=len(self.gains))
        return d


class ReconGate(Gate):
    """Training-free reconstruction gating: UPDATE when the reconstruction loss exceeds a threshold.

    Signal. Causal (default): the previous chunk's self-supervised reconstruction loss
    (`ctx.features["prev_recon_loss"]`), i.e. only tokens before chunk c. Lookahead
    (`lookahead=True`, the paper's variant): chunk c's own reconstruction loss at the carried state
    (`ctx.current["recon_loss"]`), read before chunk c is scored.

    Calibration (`fit`, unlabeled): run the training documents with random decisions at the target
    rate (so the carried states resemble the gated run's), collect the signal of every chunk and
    set the threshold to its `1 - target_rate` quantile. Labels are never read.

    Online adaptation (`observe`): an EMA of the realised update indicator,
    `rate <- (1 - alpha) * rate + alpha * [action != SKIP]`, moves the threshold by
    `eta * (rate - target_rate) * scale` (scale: the calibration signals' interquartile range), so
    the threshold rises when updating too often and falls when too rarely. It carries across
    documents (one stream), like the paper's gate.

    Chunks without a signal (chunk 0 for the causal gate) UPDATE while the EMA rate is at or below the
    target and SKIP otherwise.
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
    ):
        super().__init__()
        spec = "recon-lookahead" if lookahead else "recon"
        self.target_rate = _check_rate(target_rate, spec)
        self.update_action = _check_update_action(update_action, spec)
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha={ema_alpha} of gate {spec!r} must be in (0, 1]")
        if eta < 0:
            raise ValueError(f"eta={eta} of gate {spec!r} must be >= 0 (0 disables the online adaptation)")
        self.lookahead = bool(lookahead)
        self.name = spec if update_action == "UPDATE_1" else f"{spec}:{update_action}"
        self.ema_alpha = float(ema_alpha)
        self.eta = float(eta)
        self.seed = int(seed)
        self.fit_max_chunks = int(fit_max_chunks)
        self.threshold: float | None = threshold
        self.initial_threshold: float | None = threshold
        self.scale: float = 1.0
        self.ema_rate: float = self.target_rate
        self.calibration: list[float] = []

    # -- signal -------------------------------------------------------------------------------
    def signal(self, ctx: Any) -> float | None:
        """The reconstruction loss this gate thresholds (None when there is none yet)."""
        if self.lookahead:
            return _lookup(ctx.current, CURRENT_RECON_KEYS)
        if (ctx.features or {}).get("has_prev", 1.0) == 0.0:
            return None  # chunk 0: the core fills prev_* with placeholders, not measurements
        return _lookup(ctx.features, PREV_RECON_KEYS)

    # -- calibration --------------------------------------------------------------------------
    def calibrate(self, signals: list[float]) -> None:
        """Threshold = the (1 - target_rate) quantile of `signals`; scale = their interquartile range."""
        self.calibration = [float(s) for s in signals if s is not None and math.isfinite(float(s))]
        self.threshold = quantile(self.calibration, 1.0 - self.target_rate)
        self.initial_threshold = self.threshold
        iqr = quantile(self.calibration, 0.75) - quantile(self.calibration, 0.25)
        spread = max(self.calibration) - min(self.calibration)
        self.scale = iqr if iqr > 0 else (spread if spread > 0 else max(abs(self.threshold), 1e-3))
        self.ema_rate = self.target_rate

    def fit(self, env: Any, doc_ids: list[str]) -> None:
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
                action = self.update_action if rng.random() < self.target_rate else "SKIP"
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
    def decide(self, ctx: Any) -> str:
        if self.threshold is None:
            raise ValueError(f"gate {self.name!r} is not calibrated: call fit(env, train_doc_ids) or load()")
        s = self.signal(ctx)
        self.last_signal = s
        if s is None:
            return self.update_action if self.ema_rate <= self.target_rate else "SKIP"
        return self.update_action if s > self.threshold else "SKIP"

    def observe(self, record: Any) -> None:
        super().observe(record)
        updated = 1.0 if record.action != "SKIP" else 0.0
        self.ema_rate = (1.0 - self.ema_alpha) * self.ema_rate + self.ema_alpha * updated
        if self.threshold is not None:
            self.threshold += self.eta * (self.ema_rate - self.target_rate) * self.scale

    def describe(self) -> dict:
        d = super().describe()
        d.update(update_action=self.update_action, threshold=self.threshold,
                 initial_threshold=self.initial_threshold, scale=self.scale, ema_alpha=self.ema_alpha,
                 eta=self.eta, n_calibration=len(self.calibration))
        return d

    # -- persistence --------------------------------------------------------------------------
    def _path(self, folder: str | Path) -> Path:
        return Path(folder) / f"gate_{self.name.replace(':', '_')}.json"

    def save(self, folder: str | Path) -> Path:
        path = self._path(folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"threshold": self.initial_threshold, "scale": self.scale, "target_rate": self.target_rate,
                 "lookahead": self.lookahead, "update_action": self.update_action,
                 "n_calibration": len(self.calibration)}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)
        return path

    def load(self, folder: str | Path) -> bool:
        path = self._path(folder)
        if not path.exists():
            return False
        state = json.loads(path.read_text())
        if (state["target_rate"], state["lookahead"], state["update_action"]) != (
            self.target_rate, self.lookahead, self.update_action
        ):
            return False  # calibrated for another setting: recalibrate
        self.threshold = self.initial_threshold = float(state["threshold"])
        self.scale = float(state["scale"])
        self.ema_rate = self.target_rate
        return True


def build_gate(
    spec: str,
    target_rate: float | None = None,
    seed: int = 0,
    update_action: str | None = None,
    **kwargs: Any,
) -> Gate:
    """Build a gate from its spec.

    Args:
        spec: one of `GATE_SPECS`; the binary gates (`random`, `budgeted-oracle`, `recon`,
            `recon-lookahead`) accept a suffix `:UPDATE_k` choosing the update action.
        target_rate: target fraction of non-SKIP chunks, in (0, 1]; required by `random`,
            `budgeted-oracle`, `recon`, `recon-lookahead` and `ppo` (whose cost budget is the
            average cost of updating this fraction of chunks with `update_action`).
        seed: seed of random decisions, calibration trajectories and PPO.
        update_action: the UPDATE_k of binary gates (default UPDATE_1; the spec suffix wins).
        **kwargs: passed to the gate's constructor (e.g. `ema_alpha`, `PPOConfig` fields via `config=`).

    Returns:
        a `Gate`.
    """
    if not isinstance(spec, str):
        raise TypeError(f"gate spec must be a str such as 'recon', got {type(spec).__name__}: {spec!r}")
    base, _, suffix = spec.partition(":")
    if base == "fixed":
        if suffix not in ALL_ACTIONS:
            raise ValueError(f"gate spec {spec!r}: 'fixed:' must be followed by one of {ALL_ACTIONS}")
        return FixedGate(suffix)
    action = suffix or update_action or "UPDATE_1"
    if base == "random":
        return RandomGate(target_rate, update_action=action, seed=seed, **kwargs)
    if base == "oracle":
        if suffix:
            raise ValueError(f"gate spec {spec!r}: 'oracle' takes no suffix (it picks among all {ACTIONS})")
        return OracleGate(**kwargs)
    if base == "budgeted-oracle":
        return BudgetedOracleGate(target_rate, update_action=action, **kwargs)
    if base == "recon":
        return ReconGate(target_rate, update_action=action, lookahead=False, seed=seed, **kwargs)
    if base == "recon-lookahead":
        return ReconGate(target_rate, update_action=action, lookahead=True, seed=seed, **kwargs)
    if base == "ppo":
        from ponder.policy import PPOGate  # torch-heavy: imported on demand

        rate = _check_rate(target_rate, "ppo")
        _check_update_action(action, "ppo")
        return PPOGate(target_rate=rate, update_action=action, seed=seed, **kwargs)
    raise ValueError(f"unknown gate spec {spec!r}: choose one of {GATE_SPECS} (binary gates accept ':UPDATE_k')")
