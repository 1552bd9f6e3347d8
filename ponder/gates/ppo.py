"""The learned gate (`ppo`): an actor-critic over causal per-chunk features, trained with
PID-Lagrangian PPO on the training documents (the pieces: `ponder.rl`), then deciding at the
target update rate from causal features only.

Reproduces the learned policy of PonderTTT at commit 350afb5 (deveworld/ponderTTT,
`models/policy.py`, `training/pid_lagrangian.py`); that commit's rollout used placeholder rewards,
here the rollout runs the real environment. What differs, and why:

* Actions. By default the policy chooses, like the other adaptive gates, between the skip action
  (STATIC: the trained layer without an update) and one UPDATE_k (`actions="binary"`), so "PPO at
  a matched update rate" is comparable with random and the reconstruction gate; `actions="all"`
  offers every UPDATE_k as in 350afb5.
* Reward of chunk c = (L_skip(c) - L_a(c)) / s - lambda cost_a / budget: the per-chunk advantage of
  the chosen action over the skip action FROM THE SAME STATE (`env.loss_of`, labels, train split
  only), so the skip action earns exactly 0 and the data difficulty of a chunk, which dwarfs the
  effect of an update, cancels. s = the standard deviation of the update's per-chunk advantage in
  the first rollout, so lambda and the PID gains mean the same whatever the loss scale.
  cost_a = k / k_update (inner steps relative to the update action), budget = the target rate.
* Budget. The multiplier lambda is set by a PID controller on the rollout's average cost
  (`ponder.rl.PIDLagrangian`). At evaluation the policy's preference for updating (best update
  logit minus the skip logit) is thresholded by a `RateThreshold` calibrated on the last rollouts'
  features for the target rate and adapted online, exactly as the reconstruction gate's signal,
  so the learned gate meets the same update rate (`match_rate=False`: greedy argmax instead).
* Features: `ponder.rl.FeatureEncoder` (the core's causal features, incl. the previous chunk's
  reconstruction loss and the chunk index, plus the policy's own history). Chunk c's tokens are
  never read, at training or evaluation.
* Evidence. Training also records, for every rollout chunk, the update's advantage over the skip
  action, and reports (`diagnostics`) its scale, how often it is positive, each feature's
  correlation with it and the trained score's: whether the features can predict the advantage at
  all decides whether any gate can beat random.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save

from ponder.gates.base import (
    Gate,
    RateThreshold,
    binary_name,
    check_rate,
    check_skip_action,
    check_update_action,
)
from ponder.rl import (
    ActorCritic,
    FeatureEncoder,
    PIDLagrangian,
    RunningNorm,
    compute_gae,
    one_thread,
    pearson,
    ppo_update,
)
from ponder.types import INNER_STEPS, UPDATE_ACTIONS, ChunkContext, ChunkRecord
from ttt_common.files import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from ponder.env import PonderEnv


@dataclass
class PPOConfig:
    """Hyper-parameters of the policy and its training (defaults: < 60 s of env steps on 2 CPU cores).

    Attributes:
        hidden: width of the two hidden layers of the shared trunk.
        iterations: PPO iterations (rollout, then `epochs` passes of minibatch updates).
        docs_per_iter: training documents per rollout (cycled through the given doc ids).
        max_chunks_per_doc: chunks per document and rollout (longer documents are truncated and
            bootstrapped with the value of the next chunk).
        epochs, minibatch_size, lr: the PPO optimisation (Adam).
        clip: PPO ratio clip epsilon.
        gamma, gae_lambda: discount and GAE lambda; gamma is low because an update's effect on later
            chunks (through the carried state) is small beside the noise of their own advantages.
        value_coef, entropy_coef: weights of the value loss and the entropy bonus.
        pid_kp, pid_ki, pid_kd: PID gains of the Lagrange multiplier (lambda is in units of the
            reward scale s per unit of relative cost; see the module docstring).
        lambda_init: initial multiplier.
        reward_baseline: "skip_action" (reward = advantage over the skip action from the same state,
            see the module docstring) or "none" (reward = -L_a / s).
        actions: "binary" (skip action or the update action) or "all" (skip action or any UPDATE_k).
        match_rate: evaluate by thresholding the update preference for the target rate (default)
            instead of greedy argmax.
        calib_iters: how many of the last rollouts calibrate that threshold.
        diagnostics: also compute the update's advantage on chunks where it was not taken (one more
            layer pass per such chunk, training only) for `PPOPolicy.diagnostics`.
        max_seconds: stop starting new iterations after this wall-clock time.
    """

    hidden: int = 64
    iterations: int = 12
    docs_per_iter: int = 4
    max_chunks_per_doc: int = 16
    epochs: int = 4
    minibatch_size: int = 32
    lr: float = 1e-2
    clip: float = 0.2
    gamma: float = 0.25
    gae_lambda: float = 0.9
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    pid_kp: float = 0.5
    pid_ki: float = 0.2
    pid_kd: float = 0.0
    lambda_init: float = 0.0
    reward_baseline: str = "skip_action"
    actions: str = "binary"
    match_rate: bool = True
    calib_iters: int = 4
    diagnostics: bool = True
    max_seconds: float = 45.0

    def __post_init__(self):
        if self.reward_baseline not in ("skip_action", "none"):
            raise ValueError(f"reward_baseline={self.reward_baseline!r} must be 'skip_action' or 'none'")
        if self.actions not in ("binary", "all"):
            raise ValueError(f"actions={self.actions!r} must be 'binary' or 'all'")
        for name in ("hidden", "iterations", "docs_per_iter", "max_chunks_per_doc", "epochs", "minibatch_size",
                     "calib_iters"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"gamma={self.gamma} and gae_lambda={self.gae_lambda} must be in [0, 1]")


@dataclass
class Episode:
    """One document's rollout: per step the raw features, sampled action index, its log-prob and
    value, the LM loss, the skip action's loss from the same state, the cost and (diagnostics) the
    update's advantage over the skip action; `last_raw` the features after the last step (None at
    the document's end)."""

    raw: list[torch.Tensor] = field(default_factory=list)
    action: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    base: list[float] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    advantage: list[float] = field(default_factory=list)
    last_raw: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.action)


class PPOPolicy:
    """The actor-critic, its feature encoder / normaliser, and PID-Lagrangian PPO training.

    Args:
        target_rate: the budget: average inner steps per chunk relative to `update_action`'s, i.e.
            the update rate when only `update_action` is offered.
        update_action: the UPDATE_k of the binary policy (and the budget's unit).
        skip_action: what a chunk without update runs (STATIC or SKIP).
        config: `PPOConfig`.
        seed: seeds the network init, action sampling and document order.
    """

    def __init__(self, target_rate: float, update_action: str = "UPDATE_1", config: PPOConfig | None = None,
                 seed: int = 0, skip_action: str = "STATIC"):
        self.target_rate = float(target_rate)
        self.update_action, self.skip_action = update_action, skip_action
        self.config = config or PPOConfig()
        self.seed = int(seed)
        updates = UPDATE_ACTIONS if self.config.actions == "all" else (update_action,)
        self.actions: tuple[str, ...] = (skip_action, *updates)
        self.costs = tuple(INNER_STEPS[a] / INNER_STEPS[update_action] for a in self.actions)
        self.budget = self.target_rate
        self.encoder = FeatureEncoder(self.actions, self.costs, self.budget)
        self.net: ActorCritic | None = None
        self.norm: RunningNorm | None = None
        self.rate = RateThreshold(self.target_rate, spec="ppo")
        self.pid = PIDLagrangian(self.budget, self.config.pid_kp, self.config.pid_ki, self.config.pid_kd,
                                 value=self.config.lambda_init)
        self.log: list[dict] = []
        self.diagnostics: dict = {}

    # -- network ------------------------------------------------------------------------------
    def _build(self, n_features: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = ActorCritic(n_features, self.config.hidden, len(self.actions))
        self.norm = RunningNorm(n_features)

    def _obs(self, ctx: ChunkContext) -> torch.Tensor:
        raw = self.encoder(ctx)
        if self.net is None:
            self._build(raw.shape[0])
        return raw

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw feature rows [N, F] -> (logits [N, A], values [N]) without gradients."""
        with torch.no_grad(), one_thread():
            return self.net(self.norm(raw))

    def score(self, raw: torch.Tensor) -> torch.Tensor:
        """[N] preference for updating: the best update logit minus the skip action's logit."""
        logits, _ = self.forward(raw)
        return logits[:, 1:].max(-1).values - logits[:, 0]

    # -- evaluation ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.encoder.reset()

    def act(self, ctx: ChunkContext) -> tuple[str, float]:
        """The action for `ctx` and the score it was based on."""
        if self.net is None:
            raise ValueError("PPO policy is not trained: call fit(env, train_doc_ids) or load() first")
        logits, _ = self.forward(self._obs(ctx)[None])
        logits = logits[0]
        score = float(logits[1:].max() - logits[0])
        if self.config.match_rate:
            if not self.rate.update(score):
                return self.actions[0], score
            return self.actions[1 + int(torch.argmax(logits[1:]))], score
        return self.actions[int(torch.argmax(logits))], score

    def observe(self, action: str) -> None:
        self.encoder.observe(action)
        if self.config.match_rate:
            self.rate.observe(INNER_STEPS[action] > 0)

    # -- training -----------------------------------------------------------------------------
    def _rollout(self, env: PonderEnv, doc_ids: list[str], gen: torch.Generator) -> list[Episode]:
        """Sample the stochastic policy on `doc_ids`; labels (`env.loss_of`) are read for the rewards."""
        episodes = []
        for doc_id in doc_ids:
            ep = Episode()
            self.encoder.reset()
            ctx = env.reset(doc_id)
            while ctx is not None and len(ep) < self.config.max_chunks_per_doc:
                raw = self._obs(ctx)
                logits, _ = self.forward(raw[None])
                probs = torch.softmax(logits[0].double(), -1)
                a = int(torch.multinomial(probs, 1, generator=gen))
                action = self.actions[a]
                base = env.loss_of(self.actions[0]) if self.config.reward_baseline == "skip_action" else 0.0
                if self.config.diagnostics:
                    ep.advantage.append(env.loss_of(self.actions[0]) - env.loss_of(self.update_action))
                record, ctx = env.step(action)
                self.encoder.observe(action)
                ep.raw.append(raw)
                ep.action.append(a)
                ep.logp.append(float(torch.log(probs[a])))
                ep.loss.append(float(record.loss))
                ep.base.append(float(base))
                ep.cost.append(self.costs[a])
            ep.last_raw = self._obs(ctx) if ctx is not None else None
            episodes.append(ep)
        return episodes

    def _reward_scale(self, episodes: list[Episode]) -> float:
        adv = [x for ep in episodes for x in (ep.advantage or [b - lo for b, lo in zip(ep.base, ep.loss)])]
        s = float(torch.tensor(adv, dtype=torch.float64).std()) if len(adv) > 1 else 0.0
        return s if math.isfinite(s) and s > 0 else 1.0

    def _batch(self, episodes: list[Episode], scale: float, lam: float) -> dict[str, torch.Tensor]:
        """PPO's batch: normalised observations, actions, behaviour log-probs (under the current
        normaliser, so the ratio starts at exactly 1), GAE advantages and returns."""
        cfg = self.config
        obs, acts, logps, advs, rets = [], [], [], [], []
        for ep in episodes:
            rewards = (torch.tensor(ep.base, dtype=torch.float64) - torch.tensor(ep.loss, dtype=torch.float64)) / scale
            rewards = rewards - lam * torch.tensor(ep.cost, dtype=torch.float64) / self.budget
            last_value = 0.0 if ep.last_raw is None else float(self.forward(ep.last_raw[None])[1][0])
            o = self.norm(torch.stack(ep.raw))
            with torch.no_grad():
                logits, values = self.net(o)
            act = torch.tensor(ep.action)
            adv, ret = compute_gae(rewards, values.double(), last_value, cfg.gamma, cfg.gae_lambda)
            obs.append(o)
            acts.append(act)
            logps.append(torch.log_softmax(logits, -1).gather(1, act[:, None])[:, 0])
            advs.append(adv)
            rets.append(ret)
        return {"obs": torch.cat(obs), "action": torch.cat(acts), "logp": torch.cat(logps),
                "adv": torch.cat(advs).float(), "ret": torch.cat(rets).float()}

    def train(self, env: PonderEnv, doc_ids: list[str], verbose: bool = False) -> list[dict]:
        """Train with PID-Lagrangian PPO on the environment's documents `doc_ids` (TRAIN split), then
        calibrate the rate threshold and compute the diagnostics. Returns the per-iteration log."""
        if not doc_ids:
            raise ValueError("PPO training needs at least one training document id (doc_ids is empty)")
        cfg = self.config
        gen = torch.Generator().manual_seed(self.seed)
        order = [doc_ids[int(i)] for i in torch.randperm(len(doc_ids), generator=gen)]
        self.encoder.reset()
        self._obs(env.reset(order[0]))  # one warm-up context fixes the feature layout and builds the network
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        scale, t0, recent = None, time.perf_counter(), []
        for it in range(cfg.iterations):
            docs = [order[(it * cfg.docs_per_iter + j) % len(order)] for j in range(cfg.docs_per_iter)]
            episodes = self._rollout(env, docs, gen)
            recent = (recent + [episodes])[-cfg.calib_iters:]
            scale = scale or self._reward_scale(episodes)
            lam = self.pid.value
            with one_thread():
                self.norm.update(torch.stack([r for ep in episodes for r in ep.raw]))
                batch = self._batch(episodes, scale, lam)
                stats = ppo_update(self.net, opt, batch, epochs=cfg.epochs, minibatch_size=cfg.minibatch_size,
                                   clip=cfg.clip, value_coef=cfg.value_coef, entropy_coef=cfg.entropy_coef, gen=gen)
            self._log_iteration(it, episodes, batch, stats, lam, scale, time.perf_counter() - t0, verbose)
            if time.perf_counter() - t0 > cfg.max_seconds:
                break
        rows = [ep for eps in recent for ep in eps]
        raw = torch.stack([r for ep in rows for r in ep.raw])
        self.rate.calibrate(self.score(raw).tolist())
        self.diagnostics = self._diagnose(rows, raw, scale)
        self.encoder.reset()
        return self.log

    def _log_iteration(self, it: int, episodes: list[Episode], batch: dict, stats: dict, lam: float, scale: float,
                       seconds: float, verbose: bool) -> None:
        costs = [c for ep in episodes for c in ep.cost]
        avg_cost = sum(costs) / len(costs)
        self.pid.update(avg_cost)
        loss = [x for ep in episodes for x in ep.loss]
        gain = [b - lo for ep in episodes for b, lo in zip(ep.base, ep.loss)]
        entry = {"iteration": it, "avg_loss": sum(loss) / len(loss), "avg_gain": sum(gain) / len(gain),
                 "avg_cost": avg_cost, "budget": self.budget, "update_rate": float((batch["action"] != 0).float().mean()),
                 "lambda_used": lam, "lambda_next": self.pid.value, "reward_scale": scale,
                 "steps": int(batch["action"].numel()), "seconds": seconds, **stats}
        self.log.append(entry)
        if verbose:
            print(f"[ppo] it {it}: gain over {self.actions[0]} {entry['avg_gain']:+.5f} cost {avg_cost:.2f}/"
                  f"{self.budget:.2f} rate {entry['update_rate']:.2f} lambda {self.pid.value:.3f}", flush=True)

    def _diagnose(self, episodes: list[Episode], raw: torch.Tensor, scale: float) -> dict:
        """Can the features predict the update's advantage? Computed on the last rollouts (train split)."""
        adv = torch.tensor([x for ep in episodes for x in ep.advantage], dtype=torch.float64)
        if adv.numel() != raw.shape[0] or adv.numel() < 3:
            return {}
        score = self.score(raw).double()
        upd = torch.tensor([self.rate.update(float(s)) for s in score])
        corr = {name: pearson(raw[:, i], adv) for i, name in enumerate(self.encoder.names)}
        finite = {k: v for k, v in corr.items() if math.isfinite(v)}
        return {"n_chunks": int(adv.numel()), "reward_scale": scale, "mean_advantage": float(adv.mean()),
                "std_advantage": float(adv.std()), "frac_positive": float((adv > 0).double().mean()),
                "feature_corr": corr,
                "best_feature": max(finite, key=lambda k: abs(finite[k])) if finite else None,
                "score_corr": pearson(score, adv),
                "mean_advantage_updated": float(adv[upd].mean()) if upd.any() else float("nan"),
                "mean_advantage_skipped": float(adv[~upd].mean()) if (~upd).any() else float("nan")}

    # -- persistence --------------------------------------------------------------------------
    def identity(self) -> dict:
        """What a saved policy must match to be reused."""
        return {"target_rate": self.target_rate, "update_action": self.update_action, "skip_action": self.skip_action,
                "seed": self.seed, "config": asdict(self.config)}

    def save(self, path: str | Path) -> Path:
        """Write weights + normaliser to `path` (safetensors) and the rest to `path` with `.json`."""
        if self.net is None or self.norm is None:
            raise ValueError("PPO policy is not trained: nothing to save")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}
        tensors["norm.mean"], tensors["norm.var"] = self.norm.mean.clone(), self.norm.var.clone()
        meta = {"identity": self.identity(), "keys": self.encoder.keys, "norm_count": self.norm.count,
                "threshold": self.rate.initial_threshold, "scale": self.rate.scale, "lambda": self.pid.value,
                "log": self.log, "diagnostics": self.diagnostics}
        with atomic_write(path) as f:
            f.write(save(tensors, metadata={"format": "pt"}))
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1, default=lambda x: None))
        return path

    def load(self, path: str | Path) -> bool:
        """Restore what `save` wrote; False (nothing loaded) when it is missing or was trained otherwise."""
        path = Path(path)
        if not path.exists() or not path.with_suffix(".json").exists():
            return False
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("identity") != json.loads(json.dumps(self.identity())):
            return False
        tensors = load_file(str(path))
        self.encoder.keys = meta["keys"]
        self._build(len(self.encoder.names))
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.norm.mean, self.norm.var = tensors["norm.mean"], tensors["norm.var"]
        self.norm.count = float(meta["norm_count"])
        if meta["threshold"] is not None:
            self.rate.restore(meta["threshold"], meta["scale"])
        self.log, self.diagnostics = meta.get("log", []), meta.get("diagnostics", {})
        return True


class PPOGate(Gate):
    """Learned gate: `update_action` or `skip_action` (or any UPDATE_k with `config.actions="all"`).

    Args:
        target_rate: the budget as an update rate of `update_action` (see `PPOPolicy`).
        update_action: the UPDATE_k it chooses (and the budget's unit).
        seed: training seed.
        config: `PPOConfig` (or a dict of its fields).
        verbose: print one line per PPO iteration.
        skip_action: STATIC (default) or SKIP.
    """

    needs_recon_pass = True  # its features include the previous chunk's reconstruction loss

    def __init__(self, target_rate: float, update_action: str = "UPDATE_1", seed: int = 0,
                 config: PPOConfig | dict | None = None, verbose: bool = True, skip_action: str = "STATIC"):
        super().__init__()
        self.target_rate = check_rate(target_rate, "ppo")
        self.update_action = check_update_action(update_action, "ppo")
        self.skip_action = check_skip_action(skip_action, "ppo")
        if isinstance(config, dict):
            config = PPOConfig(**config)
        self.policy = PPOPolicy(self.target_rate, update_action, config, seed, skip_action)
        self.name = binary_name("ppo", update_action, skip_action)
        self.verbose = verbose
        self.train_seconds: float | None = None

    def fit(self, env: PonderEnv, doc_ids: list[str]) -> None:
        t0 = time.perf_counter()
        self.policy.train(env, doc_ids, verbose=self.verbose)
        self.train_seconds = time.perf_counter() - t0

    def reset(self, doc_id: str) -> None:
        super().reset(doc_id)
        self.policy.reset()

    def decide(self, ctx: ChunkContext) -> str:
        action, score = self.policy.act(ctx)
        self.last_signal = score
        return action

    def observe(self, record: ChunkRecord) -> None:
        super().observe(record)
        self.policy.observe(record.action)

    def describe(self) -> dict:
        return dict(super().describe(), update_action=self.update_action, threshold=self.policy.rate.threshold,
                    train_seconds=self.train_seconds, train_log=self.policy.log[-1] if self.policy.log else None,
                    diagnostics=self.policy.diagnostics)

    def _path(self, folder: str | Path) -> Path:
        return Path(folder) / f"policy_{self.name.replace(':', '_').replace('/', '_')}.safetensors"

    def save(self, folder: str | Path) -> Path:
        return self.policy.save(self._path(folder))

    def load(self, folder: str | Path) -> bool:
        return self.policy.load(self._path(folder))
