"""Gates: which chunks of a document get test-time training, and how much.

Reproduces the gating strategies of PonderTTT (deveworld/ponderTTT) and its paper "When to Ponder:
Adaptive Compute Allocation for Code Generation via Test-Time Training":

* `basic`: a fixed action for every chunk, and random UPDATE at a target rate (`gating/fixed.py`,
  `random.py`);
* `recon`: training-free reconstruction gating, a threshold calibrated on unlabeled data for a
  target rate and adapted online (`gating/reconstruction.py`, `gating/ema.py`);
* `oracle`: the label-reading upper bounds Oracle Recovery is measured against;
* `ppo`: the learned actor-critic of commit 350afb5 trained with PID-Lagrangian PPO
  (`ponder.gates.ppo`, pieces in `ponder.rl`).

The adaptive gates choose per chunk between an UPDATE_k and their skip action, STATIC by default
(the trained layer without an inner update): see `ponder.gates.base`.

Causality. Every gate except `recon-lookahead` and the label-using oracles decides chunk c from
`ctx.features` only, which the core fills from tokens before chunk c. The paper's own
reconstruction gate reads chunk c's reconstruction loss before deciding how chunk c is scored;
that variant is `recon-lookahead` (`lookahead = True`), never the default, and reported apart. The
oracles read `ctx.oracle_losses` (the labels of chunk c): upper bounds, `uses_labels = True`.

Registry: `build_gate(spec)` looks the spec's base name up in `GATES` (`register_gate` adds one);
the learned gate's module (torch) is imported only when a `ppo` gate is built.
"""

from __future__ import annotations

from collections.abc import Callable

from ponder.gates.base import (
    SKIP_ACTIONS,
    Gate,
    RateThreshold,
    check_rate,
    check_skip_action,
    check_update_action,
    quantile,
)
from ponder.gates.basic import FixedGate, RandomGate
from ponder.gates.oracle import BudgetedOracleGate, OracleGate
from ponder.gates.recon import ReconGate
from ponder.types import ACTIONS, ALL_ACTIONS

# the names build_gate understands (a trailing ":UPDATE_k" picks the update action of the binary gates)
GATE_SPECS = (
    "fixed:SKIP",
    "fixed:STATIC",
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

# base name -> factory(suffix, target_rate, seed, update_action, **kwargs)
GATES: dict[str, Callable[..., Gate]] = {}


def register_gate(base: str) -> Callable:
    """Decorator: register a factory `f(suffix, target_rate, seed, update_action, **kwargs) -> Gate`
    under the spec base name `base` (the part before ':')."""
    def add(factory: Callable[..., Gate]) -> Callable[..., Gate]:
        if base in GATES:
            raise ValueError(f"gate {base!r} is already registered")
        GATES[base] = factory
        return factory
    return add


@register_gate("fixed")
def _fixed(suffix, target_rate, seed, update_action, **kwargs):
    if suffix not in ALL_ACTIONS:
        raise ValueError(f"gate spec 'fixed:{suffix}': 'fixed:' must be followed by one of {ALL_ACTIONS}")
    return FixedGate(suffix)


@register_gate("random")
def _random(suffix, target_rate, seed, update_action, **kwargs):
    return RandomGate(target_rate, update_action=update_action, seed=seed, **kwargs)


@register_gate("oracle")
def _oracle(suffix, target_rate, seed, update_action, **kwargs):
    if suffix:
        raise ValueError(f"gate spec 'oracle:{suffix}': 'oracle' takes no suffix (it picks the best action)")
    return OracleGate(**kwargs)


@register_gate("budgeted-oracle")
def _budgeted(suffix, target_rate, seed, update_action, **kwargs):
    return BudgetedOracleGate(target_rate, update_action=update_action, **kwargs)


@register_gate("recon")
def _recon(suffix, target_rate, seed, update_action, **kwargs):
    return ReconGate(target_rate, update_action=update_action, lookahead=False, seed=seed, **kwargs)


@register_gate("recon-lookahead")
def _recon_lookahead(suffix, target_rate, seed, update_action, **kwargs):
    return ReconGate(target_rate, update_action=update_action, lookahead=True, seed=seed, **kwargs)


@register_gate("ppo")
def _ppo(suffix, target_rate, seed, update_action, **kwargs):
    check_rate(target_rate, "ppo")
    check_update_action(update_action, "ppo")
    from ponder.gates.ppo import PPOGate  # torch-heavy: imported on demand

    return PPOGate(target_rate=target_rate, update_action=update_action, seed=seed, **kwargs)


def build_gate(spec: str, target_rate: float | None = None, seed: int = 0, update_action: str | None = None,
               **kwargs) -> Gate:
    """Build a gate from its spec.

    Args:
        spec: one of `GATE_SPECS` (base names: `GATES`); the binary gates (`random`,
            `budgeted-oracle`, `recon`, `recon-lookahead`, `ppo`) accept a suffix `:UPDATE_k`
            choosing the update action.
        target_rate: target fraction of chunks run with an UPDATE_k, in (0, 1]; required by the
            binary gates.
        seed: seed of random decisions, calibration trajectories and PPO.
        update_action: the UPDATE_k of binary gates (default UPDATE_1; the spec suffix wins).
        **kwargs: passed to the gate's constructor (e.g. `skip_action="SKIP"`, `ema_alpha`,
            `config=PPOConfig(...)`).

    Returns:
        a `Gate`.
    """
    if not isinstance(spec, str):
        raise TypeError(f"gate spec must be a str such as 'recon', got {type(spec).__name__}: {spec!r}")
    base, _, suffix = spec.partition(":")
    if base not in GATES:
        raise ValueError(f"unknown gate spec {spec!r}: choose one of {GATE_SPECS} (binary gates accept ':UPDATE_k')")
    return GATES[base](suffix, target_rate, seed, suffix or update_action or "UPDATE_1", **kwargs)


__all__ = ["ACTIONS", "GATES", "GATE_SPECS", "SKIP_ACTIONS", "BudgetedOracleGate", "FixedGate", "Gate", "OracleGate",
           "RandomGate", "RateThreshold", "ReconGate", "build_gate", "check_skip_action", "quantile", "register_gate"]
