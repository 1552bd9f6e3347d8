"""Learned gating policy: an actor-critic over per-chunk features, trained with PID-Lagrangian PPO.

Reproduces the learned-policy design of PonderTTT at commit 350afb5 (deveworld/ponderTTT):
`src/ponderttt/models/policy.py` (`PolicyNetwork`: a shared MLP trunk, a categorical actor head over
SKIP/UPDATE_1/UPDATE_2/UPDATE_4 and a value head; `compute_gae`),
`src/ponderttt/training/pid_lagrangian.py` (PPO's clipped objective, value loss and entropy bonus,
with a budget constraint whose Lagrange multiplier is set by a PID controller, after Stooke et al.,
"Responsive Safety in Reinforcement Learning by PID Lagrangian Methods", ICML 2020) and
`src/ponderttt/utils/features.py` (features: model confidence, activation statistics, sequence
statistics, history, budget left). That commit's rollout used placeholder rewards; here the
rollout runs the real environment.

What differs, and why:
* Features are the core's causal per-chunk features (`ChunkContext.features`: statistics of the
  tokens before chunk c only) plus this policy's own history (update rate and average cost so far
  in the document, previous action, position), normalised by running mean/std frozen after
  training. Chunk c's own tokens are never read, at training or evaluation.
* Reward of chunk c = -(LM loss of chunk c under the chosen action) / s - lambda * cost_c / budget,
  with s the standard deviation of the first rollout's loss rewards, so that lambda and the PID
  gains mean the same whatever the model's loss scale (an update gains a few hundredths of a nat
  or less). With `reward_baseline="skip"` (default) the chunk's SKIP loss is added back:
  `-(L_a - L_SKIP) / s`. SKIP scores with the frozen backbone's own logits, so L_SKIP depends on the
  data only, never on any action: adding it to every step changes no policy's ranking but removes
  the data-difficulty variance that would otherwise drown the few-hundredths-of-a-nat effect of
  an update in a CPU-sized number of samples. Labels are read only during training, on the train
  split.
* The multiplier follows Stooke et al.'s PID form (lambda = max(0, Kp e + I + Kd max(0, de)),
  I = max(0, I + Ki e)), with e the relative cost violation (avg cost - budget) / budget,
  instead of 350afb5's incremental update, so lambda falls back to 0 once the constraint is slack.
* Greedy evaluation of a policy trained stochastically can land far from the budget (a 60/40
  preference becomes 100/0), so after training, if the greedy policy overspends on the last
  training rollout's features, a single offset on the SKIP logit is raised until it does not.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ponder.gates import Gate, _check_rate, _check_update_action
from ponder.types import ACTIONS, flops_multiplier

COSTS = torch.tensor([flops_multiplier(a) for a in ACTIONS])
# the policy's own history features (appended after the core's feature keys)
HISTORY_KEYS = ("hist_position", "hist_update_rate", "hist_cost_ratio") + tuple(
    f"hist_prev_{a}" for a in ACTIONS
)


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
        gamma, gae_lambda: discount and GAE lambda; gamma is low because the data-driven variance
            of later chunks' losses swamps the small effect an update has on them.
        value_coef, entropy_coef: weights of the value loss and the entropy bonus.
        pid_kp, pid_ki, pid_kd: PID gains of the Lagrange multiplier (lambda is in units of the
            reward scale s per unit of relative cost; see the module docstring).
        lambda_init: initial multiplier.
        reward_baseline: "skip" (add back the chunk's SKIP loss, see the module docstring) or "none".
        max_seconds: stop starting new iterations after this wall-clock time.
        calibrate_greedy: calibrate the greedy SKIP-logit offset after training.
    """

    hidden: int = 64
    iterations: int = 12
    docs_per_iter: int = 4
    max_chunks_per_doc: int = 16
    epochs: int = 4
    minibatch_size: int = 32
    lr: float = 1e-2
    clip: float = 0.2
    gamma: float = 0.5
    gae_lambda: float = 0.9
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    pid_kp: float = 0.5
    pid_ki: float = 0.2
    pid_kd: float = 0.0
    lambda_init: float = 0.0
    reward_baseline: str = "skip"
    max_seconds: float = 45.0
    calibrate_greedy: bool = True

    def __post_init__(self):
        if self.reward_baseline not in ("skip", "none"):
            raise ValueError(f"reward_baseline={self.reward_baseline!r} must be 'skip' or 'none'")
        for name in ("hidden", "iterations", "docs_per_iter", "max_chunks_per_doc", "epochs", "minibatch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"gamma={self.gamma} and gae_lambda={self.gae_lambda} must be in [0, 1]")


class ActorCritic(nn.Module):
    """Shared two-layer tanh trunk, a categorical actor head (4 logits) and a scalar value head.

    Args:
        n_features: F, the length of the (normalised) feature vector.
        hidden: trunk width.
        n_actions: number of actions (4).
    """

    def __init__(self, n_features: int, hidden: int = 64, n_actions: int = len(ACTIONS)):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.actor = nn.Linear(hidden, n_actions)
        self.critic = nn.Linear(hidden, 1)
        # small actor init: the initial policy is close to uniform, so early rollouts explore
        nn.init.normal_(self.actor.weight, std=0.01)
        nn.init.zeros_(self.actor.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, F] -> (logits [N, A], value [N])."""
        h = self.trunk(x)
        return self.actor(h), self.critic(h).squeeze(-1)


class RunningNorm:
    """Running mean / variance of feature vectors (Chan et al.'s parallel update); frozen at evaluation."""

    def __init__(self, n: int):
        self.mean = torch.zeros(n, dtype=torch.float64)
        self.var = torch.ones(n, dtype=torch.float64)
        self.count = 0.0

    def update(self, x: torch.Tensor) -> None:
        """Fold rows x [N, F] into the statistics; NaN entries (missing features) take their column's mean."""
        x = x.to(torch.float64)
        col_mean = torch.nan_to_num(torch.nanmean(x, 0), nan=0.0) if self.count == 0 else self.mean
        x = torch.where(torch.isnan(x), col_mean.expand_as(x), x)
        n = x.shape[0]
        if n == 0:
            return
        bm, bv = x.mean(0), x.var(0, unbiased=False)
        tot = self.count + n
        delta = bm - self.mean
        self.mean = self.mean + delta * n / tot
        self.var = (self.var * self.count + bv * n + delta**2 * self.count * n / tot) / tot
        self.count = tot

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.to(torch.float64) - self.mean) / torch.sqrt(self.var + 1e-8)).clamp(-10, 10).float()


@dataclass
class PIDLagrangian:
    """Lagrange multiplier of a cost constraint set by a PID controller (Stooke et al. 2020).

    `update(avg_cost)` with e = (avg_cost - budget) / budget:
    I <- max(0, I + Ki e); lambda = max(0, Kp e + I + Kd max(0, e - e_prev)).
    """

    budget: float
    kp: float = 0.5
    ki: float = 0.2
    kd: float = 0.0
    integral: float = 0.0
    prev_error: float = 0.0
    value: float = 0.0
    history: list[float] = field(default_factory=list)

    def __post_init__(self):
        if not self.budget > 0:
            raise ValueError(f"PIDLagrangian budget={self.budget} must be > 0 (an average cost multiplier)")
        self.integral = max(self.integral, self.value)

    def update(self, avg_cost: float) -> float:
        e = (float(avg_cost) - self.budget) / self.budget
        self.integral = max(0.0, self.integral + self.ki * e)
        self.value = max(0.0, self.kp * e + self.integral + self.kd * max(0.0, e - self.prev_error))
        self.prev_error = e
        self.history.append(self.value)
        return self.value


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, last_value: float, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over one episode.

    Args:
        rewards, values: [T] per-step rewards and value estimates.
        last_value: value of the state after the last step (0 when the document ended).
    Returns:
        (advantages [T], returns [T] = advantages + values).
    """
    T = rewards.shape[0]
    adv = torch.zeros(T, dtype=torch.float64)
    next_value, gae = float(last_value), 0.0
    for t in range(T - 1, -1, -1):
        delta = float(rewards[t]) + gamma * next_value - float(values[t])
        gae = delta + gamma * lam * gae
        adv[t] = gae
        next_value = float(values[t])
    return adv, adv + values.to(torch.float64)


class FeatureEncoder:
    """Turns a `ChunkContext` into the policy's raw feature vector, tracking the document's history.

    Uses the core's numeric `ctx.features` (fixed key order, learned at the first context; a key
    missing later counts as its running mean) and the history of this policy's own decisions in the
    document. Never reads `ctx.current` or `ctx.oracle_losses`.
    """

    def __init__(self, target_rate: float, budget: float, keys: list[str] | None = None):
        self.target_rate = target_rate
        self.budget = budget
        self.keys = list(keys) if keys is not None else None
        self.reset()

    def reset(self) -> None:
        self.n, self.n_update, self.cost_sum, self.prev = 0, 0, 0.0, None

    def observe(self, action: str) -> None:
        self.n += 1
        self.n_update += action != "SKIP"
        self.cost_sum += flops_multiplier(action)
        self.prev = action

    @property
    def names(self) -> list[str]:
        return list(self.keys or []) + list(HISTORY_KEYS)

    def __call__(self, ctx: Any) -> torch.Tensor:
        feats = ctx.features or {}
        if self.keys is None:
            self.keys = sorted(k for k, v in feats.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        core = []
        for k in self.keys:
            v = feats.get(k)
            v = float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else float("nan")
            core.append(v)
        rate = self.n_update / self.n if self.n else self.target_rate
        cost_ratio = (self.cost_sum / self.n) / self.budget if self.n else 1.0
        hist = [math.log1p(float(ctx.chunk_idx)), rate, cost_ratio] + [float(self.prev == a) for a in ACTIONS]
        return torch.tensor(core + hist, dtype=torch.float64)


@contextlib.contextmanager
def _one_thread():
    """Run the policy's tiny matmuls on one thread: on a shared CPU, intra-op threads for 64-wide
    layers spend far more time synchronising than computing (measured ~20x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _fill_nan(x: torch.Tensor, norm: RunningNorm) -> torch.Tensor:
    # a missing feature (e.g. no previous chunk yet) counts as the average: 0 after normalisation
    return torch.where(torch.isnan(x), norm.mean.expand_as(x), x)


def _skip_loss(env: Any, ctx: Any) -> float:
    """The current chunk's SKIP loss (backbone logits: depends on the data only); training-time labels.

    Read from the env's cached backbone statistics when it has them (`env.skip_loss()`, or
    `env.docs[doc].chunks[c].skip_loss` of `ponder.env.PonderEnv`), else from `peek_losses`, which
    may run every action.
    """
    if hasattr(env, "skip_loss"):
        return float(env.skip_loss())
    try:
        return float(env.docs[ctx.doc_id].chunks[ctx.chunk_idx].skip_loss)
    except (AttributeError, KeyError, IndexError, TypeError):
        return float(env.peek_losses()["SKIP"])


class PPOPolicy:
    """The actor-critic, its feature encoder/normaliser, and PID-Lagrangian PPO training.

    Args:
        target_rate: the budget as an update rate: the cost budget is the average cost of running
            `update_action` on this fraction of chunks and SKIP on the rest, 1 + rate * (cost - 1).
        update_action: the action the budget is expressed in (the policy may use any of the 4).
        config: `PPOConfig`.
        seed: seeds the network init, action sampling and document order.
    """

    def __init__(self, target_rate: float, update_action: str = "UPDATE_1", config: PPOConfig | None = None,
                 seed: int = 0):
        self.target_rate = float(target_rate)
        self.update_action = update_action
        self.budget = 1.0 + self.target_rate * (flops_multiplier(update_action) - 1.0)
        self.config = config or PPOConfig()
        self.seed = int(seed)
        self.encoder = FeatureEncoder(self.target_rate, self.budget)
        self.net: ActorCritic | None = None
        self.norm: RunningNorm | None = None
        self.skip_offset = 0.0
        self.pid = PIDLagrangian(self.budget, self.config.pid_kp, self.config.pid_ki, self.config.pid_kd,
                                 value=self.config.lambda_init)
        self.log: list[dict] = []

    # -- network ------------------------------------------------------------------------------
    def _build(self, n_features: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = ActorCritic(n_features, self.config.hidden)
        self.norm = RunningNorm(n_features)

    def _obs(self, ctx: Any) -> torch.Tensor:
        raw = self.encoder(ctx)
        if self.net is None:
            self._build(raw.shape[0])
        return raw

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Greedy-evaluation logits of raw feature rows [N, F] -> [N, A] (SKIP offset applied)."""
        assert self.net is not None and self.norm is not None
        with torch.no_grad(), _one_thread():
            logits, _ = self.net(self.norm(_fill_nan(raw, self.norm)))
        logits = logits.clone()
        logits[:, 0] += self.skip_offset
        return logits

    # -- evaluation ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.encoder.reset()

    def act(self, ctx: Any) -> tuple[str, float]:
        """Greedy action for `ctx` and its probability margin signal (P(non-SKIP))."""
        if self.net is None:
            raise ValueError("PPO policy is not trained: call fit(env, train_doc_ids) or load() first")
        logits = self.logits(self._obs(ctx)[None])[0]
        probs = torch.softmax(logits, -1)
        return ACTIONS[int(torch.argmax(logits))], float(1.0 - probs[0])

    def observe(self, action: str) -> None:
        self.encoder.observe(action)

    # -- training -----------------------------------------------------------------------------
    def _rollout(self, env: Any, doc_ids: list[str], gen: torch.Generator) -> dict[str, Any]:
        cfg = self.config
        episodes = []
        for doc_id in doc_ids:
            self.encoder.reset()
            ctx = env.reset(doc_id)
            steps: dict[str, list] = {"raw": [], "action": [], "logp": [], "value": [], "loss": [], "cost": [],
                                      "base": []}
            while ctx is not None and len(steps["action"]) < cfg.max_chunks_per_doc:
                raw = self._obs(ctx)
                with torch.no_grad(), _one_thread():
                    logits, value = self.net(self.norm(_fill_nan(raw[None], self.norm)))
                dist = torch.distributions.Categorical(logits=logits[0])
                a = int(torch.multinomial(dist.probs, 1, generator=gen))
                base = _skip_loss(env, ctx) if cfg.reward_baseline == "skip" else 0.0
                record, ctx = env.step(ACTIONS[a])
                self.encoder.observe(ACTIONS[a])
                steps["raw"].append(raw)
                steps["action"].append(a)
                steps["logp"].append(float(dist.log_prob(torch.tensor(a))))
                steps["value"].append(float(value[0]))
                steps["loss"].append(float(record.loss))
                steps["cost"].append(float(record.cost))
                steps["base"].append(base)
            last_raw = self._obs(ctx) if ctx is not None else None
            episodes.append((steps, last_raw))
        return {"episodes": episodes}

    def _update(self, batch: dict[str, torch.Tensor], gen: torch.Generator, opt: torch.optim.Optimizer) -> dict:
        cfg = self.config
        n = batch["obs"].shape[0]
        adv = batch["adv"]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8) if n > 1 else adv
        stats = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0}
        count = 0
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.minibatch_size):
                idx = perm[i:i + cfg.minibatch_size]
                logits, value = self.net(batch["obs"][idx])
                dist = torch.distributions.Categorical(logits=logits)
                logp = dist.log_prob(batch["action"][idx])
                ratio = torch.exp(logp - batch["logp"][idx])
                a = adv[idx]
                policy_loss = -torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a).mean()
                value_loss = (value - batch["ret"][idx]).pow(2).mean()
                entropy = dist.entropy().mean()
                loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.net.parameters(), 0.5)
                opt.step()
                with torch.no_grad():
                    stats["approx_kl"] += float(((ratio - 1) - torch.log(ratio)).mean())
                stats["policy_loss"] += float(policy_loss.detach())
                stats["value_loss"] += float(value_loss.detach())
                stats["entropy"] += float(entropy.detach())
                count += 1
        return {k: v / max(count, 1) for k, v in stats.items()}

    def train(self, env: Any, doc_ids: list[str], verbose: bool = False) -> list[dict]:
        """Train with PID-Lagrangian PPO on the environment's documents `doc_ids` (TRAIN split).

        Returns the per-iteration log (avg loss, avg cost, update rate, lambda, PPO statistics).
        """
        if not doc_ids:
            raise ValueError("PPO training needs at least one training document id (doc_ids is empty)")
        cfg = self.config
        gen = torch.Generator().manual_seed(self.seed)
        order = [doc_ids[int(i)] for i in torch.randperm(len(doc_ids), generator=gen)]
        # one warm-up context fixes the feature layout and builds the network
        self.encoder.reset()
        self._obs(env.reset(order[0]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        reward_scale = None
        t0 = time.perf_counter()
        last_raw: list[torch.Tensor] = []
        for it in range(cfg.iterations):
            docs = [order[(it * cfg.docs_per_iter + j) % len(order)] for j in range(cfg.docs_per_iter)]
            roll = self._rollout(env, docs, gen)
            # the network work of this iteration runs on one thread (see _one_thread)
            with _one_thread():
                all_raw = torch.stack([r for steps, _ in roll["episodes"] for r in steps["raw"]])
                self.norm.update(all_raw)
                costs = torch.tensor([c for steps, _ in roll["episodes"] for c in steps["cost"]], dtype=torch.float64)
                lam = self.pid.value
                obs, acts, logps, advs, rets = [], [], [], [], []
                raw_rewards = torch.tensor(
                    [-(lo - b) for steps, _ in roll["episodes"] for lo, b in zip(steps["loss"], steps["base"])],
                    dtype=torch.float64)
                if reward_scale is None:
                    # one fixed scale s from the first rollout: LM-loss effects are O(1) in units of s whatever
                    # the model, so lambda (in units of s per unit of relative cost) and the PID gains are too
                    reward_scale = float(raw_rewards.std()) if raw_rewards.numel() > 1 and raw_rewards.std() > 0 else 1.0
                for steps, last in roll["episodes"]:
                    loss = torch.tensor(steps["loss"], dtype=torch.float64)
                    base = torch.tensor(steps["base"], dtype=torch.float64)
                    cost = torch.tensor(steps["cost"], dtype=torch.float64)
                    rewards = -(loss - base) / reward_scale - lam * cost / self.budget
                    last_value = 0.0
                    if last is not None:
                        with torch.no_grad():
                            last_value = float(self.net(self.norm(_fill_nan(last[None], self.norm)))[1][0])
                    # the rollout ran under the previous normaliser: recompute values and log-probs under
                    # the updated one, so PPO's ratio starts at exactly 1
                    o = self.norm(_fill_nan(torch.stack(steps["raw"]), self.norm))
                    with torch.no_grad():
                        logits, values = self.net(o)
                    values = values.to(torch.float64)
                    act = torch.tensor(steps["action"])
                    logp_old = torch.log_softmax(logits, -1).gather(1, act[:, None])[:, 0]
                    adv, ret = compute_gae(rewards, values, last_value, cfg.gamma, cfg.gae_lambda)
                    obs.append(o)
                    acts.append(act)
                    logps.append(logp_old)
                    advs.append(adv)
                    rets.append(ret)
                batch = {"obs": torch.cat(obs), "action": torch.cat(acts), "logp": torch.cat(logps).float(),
                         "adv": torch.cat(advs).float(), "ret": torch.cat(rets).float()}
                stats = self._update(batch, gen, opt)
            avg_cost = float(costs.mean())
            self.pid.update(avg_cost)
            entry = {"iteration": it, "avg_loss": float(torch.tensor([lo for s, _ in roll["episodes"] for lo in s["loss"]]).mean()),
                     "avg_gain": float(raw_rewards.mean()), "avg_cost": avg_cost, "budget": self.budget,
                     "update_rate": float((batch["action"] != 0).float().mean()), "lambda_used": lam,
                     "lambda_next": self.pid.value, "steps": int(batch["action"].numel()),
                     "seconds": time.perf_counter() - t0, **stats}
            self.log.append(entry)
            last_raw = [r for steps, _ in roll["episodes"] for r in steps["raw"]]
            if verbose:
                print(f"[ppo] it {it}: loss {entry['avg_loss']:.4f} cost {avg_cost:.2f}/{self.budget:.2f} "
                      f"rate {entry['update_rate']:.2f} lambda {self.pid.value:.4f}", flush=True)
            if time.perf_counter() - t0 > cfg.max_seconds:
                break
        if cfg.calibrate_greedy and last_raw:
            self.calibrate_offset(torch.stack(last_raw))
        self.encoder.reset()
        return self.log

    def calibrate_offset(self, raw: torch.Tensor) -> float:
        """Raise the SKIP logit just enough that the greedy actions on `raw` [N, F] cost <= the budget.

        The budget is an upper bound: a greedy policy that already meets it keeps offset 0 (forcing
        it to spend more would add updates the policy judged harmful). Otherwise the smallest offset
        in [0, 20] found by bisection.
        """
        def greedy_cost(offset: float) -> float:
            self.skip_offset = offset
            return float(COSTS[self.logits(raw).argmax(-1)].mean())

        if greedy_cost(0.0) <= self.budget:
            return 0.0
        lo, hi = 0.0, 20.0  # invariant: cost(lo) > budget >= cost(hi)
        if greedy_cost(hi) > self.budget:
            return hi
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if greedy_cost(mid) > self.budget else (lo, mid)
        self.skip_offset = hi
        return hi

    # -- persistence --------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        assert self.net is not None and self.norm is not None
        tensors = {f"net.{k}": v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}
        tensors["norm.mean"] = self.norm.mean.clone()
        tensors["norm.var"] = self.norm.var.clone()
        meta = {"keys": self.encoder.keys, "skip_offset": self.skip_offset, "norm_count": self.norm.count,
                "target_rate": self.target_rate, "update_action": self.update_action, "budget": self.budget,
                "seed": self.seed, "config": asdict(self.config), "lambda": self.pid.value, "log": self.log}
        return tensors, meta

    def save(self, path: str | Path) -> Path:
        """Write weights + normaliser to `path` (safetensors) and the rest to `path` with `.json`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(path)
        meta_path = path.with_suffix(".json")
        tmp = meta_path.with_name(meta_path.name + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(meta_path)
        return path

    def load(self, path: str | Path) -> None:
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        tensors = load_file(str(path))
        self.encoder.keys = meta["keys"]
        self.config = PPOConfig(**meta["config"])
        self._build(len(self.encoder.names))
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.norm.mean, self.norm.var = tensors["norm.mean"], tensors["norm.var"]
        self.norm.count = float(meta["norm_count"])
        self.skip_offset = float(meta["skip_offset"])
        self.log = meta.get("log", [])


class PPOGate(Gate):
    """The learned policy as a gate (`ppo`): greedy actions from causal features only.

    Args:
        target_rate: budget as an update rate of `update_action` (see `PPOPolicy`).
        update_action: the action the budget is expressed in.
        seed: training seed.
        config: `PPOConfig` (or a dict of its fields).
        verbose: print one line per PPO iteration.
    """

    needs_recon_pass = True  # its features include the previous chunk's reconstruction loss

    def __init__(self, target_rate: float, update_action: str = "UPDATE_1", seed: int = 0,
                 config: PPOConfig | dict | None = None, verbose: bool = True):
        super().__init__()
        self.target_rate = _check_rate(target_rate, "ppo")
        self.update_action = _check_update_action(update_action, "ppo")
        if isinstance(config, dict):
            config = PPOConfig(**config)
        self.policy = PPOPolicy(self.target_rate, update_action, config, seed)
        self.name = "ppo" if update_action == "UPDATE_1" else f"ppo:{update_action}"
        self.verbose = verbose
        self.train_seconds: float | None = None

    def fit(self, env: Any, doc_ids: list[str]) -> None:
        t0 = time.perf_counter()
        self.policy.train(env, doc_ids, verbose=self.verbose)
        self.train_seconds = time.perf_counter() - t0

    def reset(self, doc_id: str) -> None:
        super().reset(doc_id)
        self.policy.reset()

    def decide(self, ctx: Any) -> str:
        action, p_update = self.policy.act(ctx)
        self.last_signal = p_update
        return action

    def observe(self, record: Any) -> None:
        super().observe(record)
        self.policy.observe(record.action)

    def describe(self) -> dict:
        d = super().describe()
        d.update(update_action=self.update_action, budget_cost=self.policy.budget,
                 skip_offset=self.policy.skip_offset, train_seconds=self.train_seconds,
                 train_log=self.policy.log[-1] if self.policy.log else None)
        return d

    def _path(self, folder: str | Path) -> Path:
        return Path(folder) / f"policy_{self.name.replace(':', '_')}.safetensors"

    def save(self, folder: str | Path) -> Path:
        return self.policy.save(self._path(folder))

    def load(self, folder: str | Path) -> bool:
        path = self._path(folder)
        if not path.exists() or not path.with_suffix(".json").exists():
            return False
        meta = json.loads(path.with_suffix(".json").read_text())
        if (meta["target_rate"], meta["update_action"], meta["seed"]) != (
            self.target_rate, self.update_action, self.policy.seed
        ):
            return False
        self.policy.load(path)
        return True
