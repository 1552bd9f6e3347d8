"""Chunk-by-chunk evaluation environment: a document is processed chunk after chunk under chosen actions.

Reproduces PonderTTT's per-chunk decision loop (deveworld/ponderTTT @ 350afb5: SKIP / UPDATE_k per
chunk with the fast-weight state carried across the chunks of a sequence), made strictly causal:
the context a gate sees for chunk c is built only from chunks < c (their tokens, the backbone's
confidence on them, the adaptive layer's reconstruction loss on them, their LM loss under the
action taken). Chunk c's own statistics (`current_stats`) and its losses under every action
(`peek_losses`, labels!) are offered separately, for lookahead gates and oracles only.

Every computed chunk result is memoised under (document, history of actions before it, action):
the carried state is a deterministic function of that history, so fixed modes, oracles and
policies evaluated one after another share work without changing any number (a memoised
`wall_s` is the time measured when it was first computed).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from ponder.adaptive import AdaptiveLM
from ponder.cache import CachedDoc
from ponder.types import ALL_ACTIONS, INNER_STEPS, ChunkContext, ChunkRecord, check_action, is_update

PROTOCOLS = ("causal", "paper")


def count_flops(fn: Callable[[], object]) -> float:
    """Matmul FLOPs of `fn()` as counted by `torch.utils.flop_counter` (elementwise ops are not
    counted: they are a small share here and the same rule applies to every action)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def head_only_flops(hidden_size: int, vocab_size: int) -> Callable[[int], float]:
    """A stand-in backbone FLOP count (the tied LM head alone, 2 T D V) for environments built
    without a backbone (tests); the runner passes the counted backbone instead."""
    return lambda n_tokens: 2.0 * n_tokens * hidden_size * vocab_size


class PonderEnv:
    """Runs cached documents through `AdaptiveLM` under per-chunk actions.

    Args:
        model: the trained adaptive model (used under `torch.no_grad`).
        cached_docs: documents with cached backbone outputs (`ponder.cache.build_cache`).
        max_memo: most chunk results kept (oldest evicted first; each holds a carried state).
        backbone_flops: n_tokens -> counted FLOPs of one backbone forward on a chunk of that many
            tokens (the SKIP cost; default `head_only_flops`, for tests).
        protocol: "causal" (default, leak-free) or "paper": the paper's evaluation, which READS THE
            SCORED TOKENS: UPDATE_k steps on chunk c and then scores chunk c re-forwarded through the
            updated weights (`AdaptiveLM.paper_reforward`), and SKIP is the paper's SKIP, the trained
            layer without an update (our STATIC). Gate contexts stay causal in both.

    Costs: every record carries the counted FLOPs of what ran for its chunk (`count_flops` on the
    adaptive layer and head, once per action and chunk length) and the SKIP FLOPs of the chunk.
    """

    def __init__(self, model: AdaptiveLM, cached_docs: list[CachedDoc], max_memo: int = 128,
                 backbone_flops: Callable[[int], float] | None = None, protocol: str = "causal"):
        if not cached_docs:
            raise ValueError("PonderEnv needs at least one cached document")
        self.model = model.eval()
        self.docs = {d.doc_id: d for d in cached_docs}
        if len(self.docs) != len(cached_docs):
            raise ValueError("PonderEnv: duplicate doc_id in cached_docs")
        self._memo: OrderedDict[tuple, dict] = OrderedDict()
        self.max_memo = max_memo
        self._doc: CachedDoc | None = None
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r} must be one of {PROTOCOLS}")
        self.protocol = protocol
        D, V = model.head_weight.shape[1], model.head_weight.shape[0]
        self.backbone_flops = backbone_flops or head_only_flops(D, V)
        self._flops: dict[tuple, float] = {}

    def doc_ids(self) -> list[str]:
        return list(self.docs)

    # -- episode ------------------------------------------------------------------------------------
    def reset(self, doc_id: str) -> ChunkContext:
        """Start document `doc_id` from the fresh state; returns the context of chunk 0."""
        if doc_id not in self.docs:
            raise KeyError(f"doc_id {doc_id!r} is not one of this env's {len(self.docs)} documents")
        self._doc = self.docs[doc_id]
        self._c = 0
        self._state = None
        self._history: tuple[str, ...] = ()
        self._prev: dict[str, float] = {}
        self._n_updates = 0
        return self.context()

    @property
    def chunk_idx(self) -> int:
        return self._c

    def done(self) -> bool:
        return self._doc is None or self._c >= len(self._doc.chunks)

    def context(self) -> ChunkContext:
        """The causal context of the current chunk (features from earlier chunks only)."""
        self._require_active()
        doc, c = self._doc, self._c
        prev = self._prev
        features = {
            "position": float(c),
            "has_prev": 1.0 if c > 0 else 0.0,
            "prev_recon_loss": prev.get("recon_loss", 0.0),
            "prev_loss": prev.get("loss", 0.0),
            "prev_skip_loss": prev.get("skip_loss", 0.0),
            "prev_gain": prev.get("skip_loss", 0.0) - prev.get("loss", 0.0),
            "prev_entropy": prev.get("entropy", 0.0),
            "prev_max_prob": prev.get("max_prob", 0.0),
            "prev_hidden_norm": prev.get("hidden_norm", 0.0),
            "prev_action_steps": prev.get("action_steps", 0.0),
            "update_rate_so_far": self._n_updates / c if c > 0 else 0.0,
        }
        return ChunkContext(doc_id=doc.doc_id, chunk_idx=c, n_chunks=len(doc.chunks), features=features)

    # -- computing chunk results --------------------------------------------------------------------
    def _require_active(self) -> None:
        if self._doc is None:
            raise RuntimeError("call reset(doc_id) first")
        if self._c >= len(self._doc.chunks):
            raise RuntimeError(f"document {self._doc.doc_id} is finished ({len(self._doc.chunks)} chunks); reset another")

    def _memoise(self, key: tuple, res: dict) -> dict:
        self._memo[key] = res
        while len(self._memo) > self.max_memo:
            self._memo.popitem(last=False)
        return res

    @torch.no_grad()
    def extra_flops(self, what: str, n_tokens: int) -> float:
        """Counted FLOPs beyond the backbone on an `n_tokens` chunk: `what` = an action (its layer
        pass + head; 0 for SKIP) or "signal" (the UPDATE_1 layer pass alone, no head: what a
        reconstruction-reading gate needs on a chunk it does not update with UPDATE_1)."""
        key = (what, n_tokens)
        if key not in self._flops:
            D = self.model.config.hidden_size
            h = torch.zeros(1, n_tokens, D)
            ids = torch.zeros(1, n_tokens, dtype=torch.int64)
            if what == "SKIP" and self.protocol == "paper":
                self._flops[key] = self.extra_flops("STATIC", n_tokens)
            elif what == "SKIP":
                self._flops[key] = 0.0
            elif self.protocol == "paper" and what != "signal" and is_update(what):
                k = INNER_STEPS[what]
                self._flops[key] = count_flops(
                    lambda: self.model.lm_loss(self.model.paper_reforward(h, None, k)[0], ids))
            elif what == "signal":
                self._flops[key] = count_flops(lambda: self.model.adapt(h, None, 1))
            else:
                k = INNER_STEPS[check_action(what)]
                self._flops[key] = count_flops(lambda: self.model.lm_loss(self.model.adapt(h, None, k)[0], ids))
        return self._flops[key]

    @torch.no_grad()
    def _layer_pass(self, inner_steps: int) -> dict:
        """The adaptive layer on the current chunk from the carried state (memoised; no LM head)."""
        key = (self._doc.doc_id, self._history, "pass", inner_steps)
        if key in self._memo:
            return self._memo[key]
        chunk = self._doc.chunks[self._c]
        t0 = time.perf_counter()
        adapted, recon, state = self.model.adapt(chunk.hidden[None], self._state, inner_steps)
        return self._memoise(key, {"adapted": adapted, "recon": float(recon[0]), "state": state,
                                   "seconds": time.perf_counter() - t0})

    @torch.no_grad()
    def _result(self, action: str) -> dict:
        """loss / new state / seconds / recon of the current chunk under `action` (memoised).

        `recon` is always the reconstruction loss of the UPDATE_1 pass from the carried state (each
        mini-batch's self-supervised loss before its own update), whatever the action, so the
        statistic means the same thing for every action; under SKIP that pass's state is discarded.
        """
        key = (self._doc.doc_id, self._history, action)
        if key in self._memo:
            return self._memo[key]
        chunk = self._doc.chunks[self._c]
        recon = self._layer_pass(1)["recon"]
        if self.protocol == "paper":
            if action == "SKIP":  # the paper's SKIP: the layer without an update
                return self._memoise(key, dict(self._result("STATIC")))
            if is_update(action):
                t0 = time.perf_counter()
                adapted, _, state = self.model.paper_reforward(chunk.hidden[None], self._state, INNER_STEPS[action])
                loss = float(self.model.lm_loss(adapted, chunk.input_ids[None]))
                wall = chunk.backbone_s + (time.perf_counter() - t0)
                return self._memoise(key, {"loss": loss, "state": state, "wall_s": wall, "recon": recon})
        if action == "SKIP":
            return self._memoise(key, {"loss": chunk.skip_loss, "state": self._state, "wall_s": chunk.backbone_s,
                                       "recon": recon})
        p = self._layer_pass(INNER_STEPS[action])  # STATIC: inner_steps=0
        t0 = time.perf_counter()
        loss = float(self.model.lm_loss(p["adapted"], chunk.input_ids[None]))
        wall = chunk.backbone_s + p["seconds"] + (time.perf_counter() - t0)
        return self._memoise(key, {"loss": loss, "state": p["state"], "wall_s": wall, "recon": recon})

    def loss_of(self, action: str) -> float:
        """LM loss of the current chunk under `action` from the current state (memoised). Uses LABELS:
        for oracles and for training a learned gate on the train split, never for a causal decision."""
        self._require_active()
        return float(self._result(check_action(action))["loss"])

    def peek_losses(self) -> dict[str, float]:
        """LM loss of the current chunk under every action (`ALL_ACTIONS`: the gate actions and STATIC)
        from the current state. Uses LABELS: for oracle gates only."""
        return {a: self.loss_of(a) for a in ALL_ACTIONS}

    def current_stats(self) -> dict[str, float]:
        """The current chunk's OWN self-supervised and confidence statistics (lookahead gates only)."""
        self._require_active()
        chunk = self._doc.chunks[self._c]
        return {"recon_loss": self._layer_pass(1)["recon"], "entropy": float(chunk.entropy.mean()),
                "max_prob": float(chunk.max_prob.mean())}

    def step(self, action: str, gate_signal: float | None = None, signal_pass: bool = False,
             ) -> tuple[ChunkRecord, ChunkContext | None]:
        """Process the current chunk under `action`; returns its record and the next context (None at the end).

        `signal_pass`: the deciding gate reads the reconstruction loss of the UPDATE_1 pass on this
        chunk (its own, or the next chunk's feature), so that pass is charged (FLOPs and seconds)
        whenever `action` is not UPDATE_1 (whose pass it is).
        """
        check_action(action)
        self._require_active()
        res = self._result(action)
        chunk = self._doc.chunks[self._c]
        n = int(chunk.input_ids.numel())
        skip_flops = float(self.backbone_flops(n))
        flops = skip_flops + self.extra_flops(action, n)
        wall = res["wall_s"]
        if signal_pass and action != "UPDATE_1":
            flops += self.extra_flops("signal", n)
            wall += self._layer_pass(1)["seconds"]
        record = ChunkRecord(doc_id=self._doc.doc_id, chunk_idx=self._c, action=action, loss=res["loss"],
                             n_tokens=chunk.n_scored, cost=flops / skip_flops, wall_s=wall,
                             gate_signal=gate_signal, recon_loss=res["recon"], flops=flops, skip_flops=skip_flops)
        self._state = res["state"]
        self._history = self._history + (action,)
        self._n_updates += int(is_update(action))
        self._prev = {"recon_loss": res["recon"], "loss": res["loss"], "skip_loss": chunk.skip_loss,
                      "entropy": float(chunk.entropy.mean()), "max_prob": float(chunk.max_prob.mean()),
                      "hidden_norm": float(chunk.hidden.norm(dim=-1).mean()),
                      "action_steps": float(INNER_STEPS[action])}
        self._c += 1
        return record, (None if self.done() else self.context())
