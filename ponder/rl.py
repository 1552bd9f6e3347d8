"""The PPO machinery of the learned gate: actor-critic, feature encoder, running normaliser, GAE,
the PID-Lagrangian multiplier and PPO's clipped update. Plain pieces, no environment or gate.

Reproduces the learned-policy design of PonderTTT at commit 350afb5 (deveworld/ponderTTT):
`src/ponderttt/models/policy.py` (a shared MLP trunk, a categorical actor head and a value head;
`compute_gae`), `src/ponderttt/training/pid_lagrangian.py` (PPO's clipped objective, value loss and
entropy bonus, with a budget constraint whose Lagrange multiplier is set by a PID controller, after
Stooke et al., "Responsive Safety in Reinforcement Learning by PID Lagrangian Methods", ICML 2020)
and `src/ponderttt/utils/features.py` (per-chunk features plus history). The multiplier follows
Stooke et al.'s PID form (lambda = max(0, Kp e + I + Kd max(0, de)), I = max(0, I + Ki e)) with e
the relative constraint violation, instead of 350afb5's incremental update, so lambda falls back
to 0 once the constraint is slack.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ponder.types import INNER_STEPS, ChunkContext


class ActorCritic(nn.Module):
    """Shared two-layer tanh trunk, a categorical actor head and a scalar value head.

    Args:
        n_features: F, the length of the (normalised) feature vector.
        hidden: trunk width.
        n_actions: A, number of actions.
    """

    def __init__(self, n_features: int, hidden: int = 64, n_actions: int = 2):
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
    """Running mean / variance of feature vectors (Chan et al.'s parallel update); frozen at evaluation.

    Missing features are NaN in the raw rows: they count as their column's mean (0 after
    normalisation), so "no previous chunk yet" is neutral rather than an extreme value.
    """

    def __init__(self, n: int):
        self.mean = torch.zeros(n, dtype=torch.float64)
        self.var = torch.ones(n, dtype=torch.float64)
        self.count = 0.0

    def fill(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, F] with NaN entries replaced by their column's running mean."""
        x = x.to(torch.float64)
        return torch.where(torch.isnan(x), self.mean.expand_as(x), x)

    def update(self, x: torch.Tensor) -> None:
        """Fold rows x [N, F] into the statistics."""
        x = x.to(torch.float64)
        if x.shape[0] == 0:
            return
        col_mean = torch.nan_to_num(torch.nanmean(x, 0), nan=0.0) if self.count == 0 else self.mean
        x = torch.where(torch.isnan(x), col_mean.expand_as(x), x)
        n = x.shape[0]
        bm, bv = x.mean(0), x.var(0, unbiased=False)
        tot = self.count + n
        delta = bm - self.mean
        self.mean = self.mean + delta * n / tot
        self.var = (self.var * self.count + bv * n + delta**2 * self.count * n / tot) / tot
        self.count = tot

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float32 rows [N, F] (clipped to +-10)."""
        return ((self.fill(x) - self.mean) / torch.sqrt(self.var + 1e-8)).clamp(-10, 10).float()


@dataclass
class PIDLagrangian:
    """Lagrange multiplier of a cost constraint set by a PID controller (Stooke et al. 2020).

    `update(avg_cost)` with e = clip((avg_cost - budget) / budget, -1, 1):
    I <- max(0, I + Ki e); lambda = max(0, Kp e + I + Kd max(0, e - e_prev)).
    The clip keeps one far-over-budget rollout (a near-uniform start over actions of cost up to 4x
    the budget's unit) from winding the integral up so far that the policy collapses to never
    updating before the multiplier can come down (seen on the synthetic task without it).
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
            raise ValueError(f"PIDLagrangian budget={self.budget} must be > 0 (an average cost per chunk)")
        self.integral = max(self.integral, self.value)

    def update(self, avg_cost: float) -> float:
        e = min(1.0, max(-1.0, (float(avg_cost) - self.budget) / self.budget))
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
        (advantages [T], returns [T] = advantages + values), float64.
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

    Uses the core's numeric `ctx.features` (statistics of the tokens before chunk c: the previous
    chunk's reconstruction loss, losses, confidence, position, ...; fixed key order learned at the
    first context; a missing or non-finite value is NaN, i.e. its running mean) and the history of
    this policy's own decisions in the document: log(1 + chunk index), update rate so far, budget
    spent so far relative to the budget, and the previous action one-hot. Never reads `ctx.current`
    or `ctx.oracle_losses`.

    Args:
        actions: the policy's actions (index 0: the non-update action).
        costs: cost of each action (same order), in the budget's unit.
        budget: average cost per chunk allowed.
    """

    def __init__(self, actions: tuple[str, ...], costs: tuple[float, ...], budget: float,
                 keys: list[str] | None = None):
        self.actions, self.costs, self.budget = tuple(actions), tuple(costs), float(budget)
        self.keys = list(keys) if keys is not None else None
        self.reset()

    def reset(self) -> None:
        self.n, self.n_update, self.cost_sum, self.prev = 0, 0, 0.0, None

    def observe(self, action: str) -> None:
        self.n += 1
        self.n_update += INNER_STEPS[action] > 0
        self.cost_sum += self.costs[self.actions.index(action)] if action in self.actions else 0.0
        self.prev = action

    @property
    def names(self) -> list[str]:
        hist = ["hist_log_position", "hist_update_rate", "hist_cost_ratio"] + [f"hist_prev_{a}" for a in self.actions]
        return list(self.keys or []) + hist

    def __call__(self, ctx: ChunkContext) -> torch.Tensor:
        """[F] float64 raw features of `ctx` (NaN: missing)."""
        feats = ctx.features or {}
        if self.keys is None:
            self.keys = sorted(k for k, v in feats.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        core = []
        for k in self.keys:
            v = feats.get(k)
            core.append(float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else float("nan"))
        rate = self.n_update / self.n if self.n else float("nan")
        spent = (self.cost_sum / self.n) / self.budget if self.n else float("nan")
        hist = [math.log1p(float(ctx.chunk_idx)), rate, spent] + [float(self.prev == a) for a in self.actions]
        return torch.tensor(core + hist, dtype=torch.float64)


@contextlib.contextmanager
def one_thread():
    """Run the policy's tiny matmuls on one thread: on a shared CPU, intra-op threads for 64-wide
    layers spend far more time synchronising than computing (measured ~20x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def ppo_update(net: ActorCritic, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], *, epochs: int,
               minibatch_size: int, clip: float, value_coef: float, entropy_coef: float,
               gen: torch.Generator) -> dict[str, float]:
    """`epochs` passes of PPO's clipped objective over `batch` in shuffled minibatches.

    Args:
        batch: obs [N, F] (normalised), action [N] (int64), logp [N] (behaviour log-probs), adv [N]
            (normalised here to zero mean, unit std), ret [N] (value targets).
    Returns:
        mean policy loss, value loss, entropy and approximate KL over the minibatch steps.
    """
    n = batch["obs"].shape[0]
    adv = batch["adv"]
    adv = (adv - adv.mean()) / (adv.std() + 1e-8) if n > 1 else adv
    stats = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0}
    count = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, minibatch_size):
            idx = perm[i:i + minibatch_size]
            logits, value = net(batch["obs"][idx])
            dist = torch.distributions.Categorical(logits=logits)
            ratio = torch.exp(dist.log_prob(batch["action"][idx]) - batch["logp"][idx])
            a = adv[idx]
            policy_loss = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean()
            value_loss = (value - batch["ret"][idx]).pow(2).mean()
            entropy = dist.entropy().mean()
            opt.zero_grad()
            (policy_loss + value_coef * value_loss - entropy_coef * entropy).backward()
            nn.utils.clip_grad_norm_(net.parameters(), 0.5)
            opt.step()
            with torch.no_grad():
                stats["approx_kl"] += float(((ratio - 1) - torch.log(ratio)).mean())
            stats["policy_loss"] += float(policy_loss.detach())
            stats["value_loss"] += float(value_loss.detach())
            stats["entropy"] += float(entropy.detach())
            count += 1
    return {k: v / max(count, 1) for k, v in stats.items()}


def pearson(xs: torch.Tensor, ys: torch.Tensor) -> float:
    """Pearson correlation of two [N] tensors (NaN when either is constant or N < 3)."""
    x, y = xs.to(torch.float64), ys.to(torch.float64)
    ok = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[ok], y[ok]
    if x.numel() < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = float(torch.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum()) / den if den > 1e-12 else float("nan")
