"""The label-reading upper bounds that PonderTTT's Oracle Recovery is measured against: per chunk the
best action, and the budgeted oracle that updates the chunks with the largest advantage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ponder.gates.base import Gate, binary_name, check_rate, check_skip_action, check_update_action
from ponder.types import ALL_ACTIONS, UPDATE_ACTIONS, ChunkContext, flops_multiplier

if TYPE_CHECKING:
    from ponder.env import PonderEnv


class OracleGate(Gate):
    """Per chunk the action with the lowest LM loss (reads the labels: an upper bound, not a policy).

    `actions`: the candidates (default STATIC and every UPDATE_k, the choices of the adaptive gates).
    Ties go to the cheaper action. `last_signal` is the gain of the chosen action over the first
    candidate (nats/token).
    """

    uses_labels = True

    def __init__(self, actions: tuple[str, ...] = ("STATIC", *UPDATE_ACTIONS)):
        super().__init__()
        for a in actions:
            if a not in ALL_ACTIONS:
                raise ValueError(f"oracle action {a!r} must be one of {ALL_ACTIONS}")
        self.actions = tuple(actions)
        self.name = "oracle"

    def decide(self, ctx: ChunkContext) -> str:
        losses = ctx.oracle_losses
        if not losses or any(a not in losses for a in self.actions):
            raise ValueError(
                f"gate 'oracle' got ctx.oracle_losses={losses!r} for doc {ctx.doc_id!r} chunk {ctx.chunk_idx}: "
                f"the runner must fill it (with {self.actions}) for gates with uses_labels=True"
            )
        # min over (loss, cost) picks the cheaper action on exact ties
        best = min(self.actions, key=lambda a: (float(losses[a]), flops_multiplier(a)))
        self.last_signal = float(losses[self.actions[0]]) - float(losses[best])
        return best


class BudgetedOracleGate(Gate):
    """UPDATE exactly the `target_rate` fraction of evaluation chunks with the largest advantage (uses labels).

    Advantage of a chunk = L_skip_action - L_update_action on it (nats/token, weighted by its scored
    tokens when ranking the total loss reduction). The optimum over all subsets is combinatorial
    because the fast-weight state carried to later chunks depends on which chunks were updated, so
    `prepare` runs a two-pass approximation:

    1. run every evaluation document once with `update_action` on every chunk and read each
       chunk's advantage from `env.loss_of` (labels) at the state of that trajectory;
    2. plan UPDATE for the top `round(target_rate * n_chunks)` chunks of the whole evaluation set
       by advantage (ties: earlier chunk first), `skip_action` for the rest.

    The runner's pass then follows the plan, so the realised update rate equals the target up to
    rounding. Without `prepare`, `reset` raises: a budget over chunks needs every chunk's advantage
    first. `per_document=True` budgets each document separately instead of the whole set.
    """

    uses_labels = True

    def __init__(self, target_rate: float, update_action: str = "UPDATE_1", per_document: bool = False,
                 skip_action: str = "STATIC"):
        super().__init__()
        self.target_rate = check_rate(target_rate, "budgeted-oracle")
        self.update_action = check_update_action(update_action, "budgeted-oracle")
        self.skip_action = check_skip_action(skip_action, "budgeted-oracle")
        self.per_document = bool(per_document)
        self.name = binary_name("budgeted-oracle", update_action, skip_action)
        self.gains: dict[tuple[str, int], float] = {}
        self.n_tokens: dict[tuple[str, int], int] = {}
        self.plan: set[tuple[str, int]] = set()

    def prepare(self, env: PonderEnv, doc_ids: list[str]) -> None:
        """Pass 1 over the evaluation documents (see the class docstring); builds `self.plan`."""
        self.gains, self.n_tokens = {}, {}
        for doc_id in doc_ids:
            ctx = env.reset(doc_id)
            while ctx is not None:
                key = (doc_id, int(ctx.chunk_idx))
                self.gains[key] = env.loss_of(self.skip_action) - env.loss_of(self.update_action)
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

    def decide(self, ctx: ChunkContext) -> str:
        key = (ctx.doc_id, int(ctx.chunk_idx))
        losses = ctx.oracle_losses
        if losses and self.skip_action in losses and self.update_action in losses:
            self.last_signal = float(losses[self.skip_action]) - float(losses[self.update_action])
        else:
            self.last_signal = self.gains.get(key)
        return self.update_action if key in self.plan else self.skip_action

    def describe(self) -> dict:
        return dict(super().describe(), update_action=self.update_action, per_document=self.per_document,
                    planned=len(self.plan), chunks=len(self.gains))
