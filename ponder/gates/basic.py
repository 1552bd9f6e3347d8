"""The baselines of PonderTTT's paper (`src/ponderttt/gating/fixed.py`, `random.py` of
deveworld/ponderTTT): one fixed action for every chunk, and UPDATE at random at a target rate."""

from __future__ import annotations

import random

from ponder.gates.base import Gate, binary_name, check_rate, check_skip_action, check_update_action, doc_seed
from ponder.types import ALL_ACTIONS, ChunkContext, is_update


class FixedGate(Gate):
    """The same action for every chunk (`fixed:SKIP`, `fixed:STATIC`, `fixed:UPDATE_k`)."""

    def __init__(self, action: str):
        super().__init__()
        if action not in ALL_ACTIONS:
            raise ValueError(f"fixed gate action {action!r} must be one of {ALL_ACTIONS} (spec 'fixed:UPDATE_1')")
        self.action = action
        self.name = f"fixed:{action}"
        self.target_rate = 1.0 if is_update(action) else 0.0

    def decide(self, ctx: ChunkContext) -> str:
        self.last_signal = None
        return self.action


class RandomGate(Gate):
    """`update_action` with probability `target_rate`, else `skip_action`; seeded per (seed, document)."""

    def __init__(self, target_rate: float, update_action: str = "UPDATE_1", seed: int = 0,
                 skip_action: str = "STATIC"):
        super().__init__()
        self.target_rate = check_rate(target_rate, "random")
        self.update_action = check_update_action(update_action, "random")
        self.skip_action = check_skip_action(skip_action, "random")
        self.seed = int(seed)
        self.name = binary_name("random", update_action, skip_action)
        self._rng = random.Random(self.seed)

    def reset(self, doc_id: str) -> None:
        super().reset(doc_id)
        self._rng = random.Random(doc_seed(self.seed, doc_id))

    def decide(self, ctx: ChunkContext) -> str:
        u = self._rng.random()
        self.last_signal = u
        return self.update_action if u < self.target_rate else self.skip_action

    def describe(self) -> dict:
        return dict(super().describe(), update_action=self.update_action, seed=self.seed)
