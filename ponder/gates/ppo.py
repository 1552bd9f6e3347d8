"""The learned policy as a gate (`ppo`): PID-Lagrangian PPO on the training documents (`ponder.policy`),
then decisions from causal features only, at the target update rate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from ponder.gates.base import Gate, binary_name, check_rate, check_skip_action, check_update_action
from ponder.policy import PPOConfig, PPOPolicy
from ponder.types import ChunkContext, ChunkRecord

if TYPE_CHECKING:
    from ponder.env import PonderEnv


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
