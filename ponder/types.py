"""The action space, cost model and per-chunk records shared by PonderTTT's core and its gates.

Reproduces the action set and cost model of PonderTTT (deveworld/ponderTTT at commit 350afb5,
`src/ponderttt/experiments/train_baseline.py`: `action_to_steps`, `action_to_cost`): SKIP runs the
frozen backbone only (1x), UPDATE_k runs k self-supervised inner steps on top (1 + 2k x: one
forward plus k forward+backward passes of the adaptive layer, counted in backbone units).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ACTIONS: tuple[str, ...] = ("SKIP", "UPDATE_1", "UPDATE_2", "UPDATE_4")
# STATIC: the trained adaptive layer applied with its inner updates off (the carried fast weights
# are used as they are, and passed on unchanged). A baseline beside SKIP that separates "a trained
# adapter" from "test-time training", and what the adaptive gates run on a chunk they do not update
# (`ponder.gates.base`). The paper's SKIP (its TTT layer with no gradient step) is this STATIC; our
# SKIP is the bare backbone.
BASELINES: tuple[str, ...] = ("STATIC",)
ALL_ACTIONS: tuple[str, ...] = (*ACTIONS, *BASELINES)
UPDATE_ACTIONS: tuple[str, ...] = ("UPDATE_1", "UPDATE_2", "UPDATE_4")
INNER_STEPS: dict[str, int] = {"SKIP": 0, "UPDATE_1": 1, "UPDATE_2": 2, "UPDATE_4": 4, "STATIC": 0}


def check_action(action: str) -> str:
    """Return `action` if it is one of `ALL_ACTIONS`, else raise a ValueError naming the choices."""
    if action not in INNER_STEPS:
        raise ValueError(f"action={action!r} is not one of {ALL_ACTIONS}")
    return action


def is_update(action: str) -> bool:
    """True for the actions that take inner gradient steps (UPDATE_k); SKIP and STATIC take none."""
    return INNER_STEPS[check_action(action)] > 0


def flops_multiplier(action: str) -> float:
    """PonderTTT's NOMINAL cost of one chunk relative to SKIP: 1 for SKIP, 1 + 2k for UPDATE_k (and
    1 for STATIC). It overstates the real cost; the runner reports counted FLOPs (`PonderEnv`)."""
    k = INNER_STEPS[check_action(action)]
    return 1.0 if k == 0 else float(1 + 2 * k)


@dataclass
class ChunkContext:
    """What a gate may see when deciding chunk `chunk_idx` of document `doc_id`.

    `features` come ONLY from tokens before the chunk (previous chunk's reconstruction loss, the
    backbone's confidence on it, its LM loss, position, previous action, ...). `current` (the
    chunk's own self-supervised statistics) is filled only for gates with `lookahead=True`, and
    `oracle_losses` (LM loss of this chunk under every action, i.e. labels) only for gates with
    `uses_labels=True`.
    """

    doc_id: str
    chunk_idx: int
    n_chunks: int
    features: dict[str, float]
    budget_left: float | None = None
    current: dict[str, float] | None = None
    oracle_losses: dict[str, float] | None = None


@dataclass
class ChunkRecord:
    """The outcome of one chunk under one action.

    Attributes:
        loss: mean next-token cross-entropy (nats/token) over the chunk's scored tokens.
        n_tokens: number of scored tokens (chunk length - 1: each chunk is its own backbone window,
            so its first token has no prediction).
        cost: counted FLOPs of this chunk over the SKIP FLOPs of the same chunk (`flops / skip_flops`).
        wall_s: measured seconds for this chunk: the backbone forward (timed when it was cached)
            plus, for UPDATE_k, the adaptive layer and LM head.
        gate_signal: the number the gate based its decision on (None for fixed modes).
        flops / skip_flops: counted FLOPs of what ran for this chunk (backbone, adaptive layer, head
            and any pass the gate needed for its signal) and of SKIP on it (the backbone only).
        recon_loss: the adaptive layer's self-supervised reconstruction loss on this chunk at the
            carried state (before this chunk's updates).
    """

    doc_id: str
    chunk_idx: int
    action: str
    loss: float
    n_tokens: int
    cost: float
    wall_s: float
    gate_signal: float | None = None
    recon_loss: float | None = None
    flops: float | None = None
    skip_flops: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)
