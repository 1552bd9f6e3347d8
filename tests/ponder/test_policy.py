"""Tests of ponder/rl.py and ponder/gates/ppo.py: GAE and PID by hand, PPO on a synthetic environment with a
known optimum, the learned gate's causality and persistence."""

from __future__ import annotations

import random

import pytest
import torch

from ponder.gates import build_gate
from ponder.gates.ppo import PPOConfig, PPOGate
from ponder.rl import PIDLagrangian, compute_gae
from ponder.types import ACTIONS, ALL_ACTIONS, ChunkContext, ChunkRecord, flops_multiplier, is_update
from tests.ponder.synthetic import ListEnv


class GainEnv(ListEnv):
    """Chunks whose update gain is predictable from a CAUSAL feature.

    Feature `prev_signal` of chunk c is +1 or -1 (drawn at random, shown before chunk c). UPDATE_k on
    a chunk with +1 lowers the loss below STATIC's by 0.2 + 0.01 k (bigger k: slightly better, much
    costlier); with -1 it raises it by 0.05. Half the chunks are +1, so at budget "update rate 0.5"
    the optimum is UPDATE_1 exactly on the +1 chunks. STATIC / SKIP losses vary a lot between chunks
    (data difficulty), as in real text.
    """

    def __init__(self, n_docs: int, n_chunks: int, seed: int):
        rng = random.Random(seed)
        self.docs = {}
        for d in range(n_docs):
            self.docs[f"d{seed}_{d}"] = [(rng.choice((-1.0, 1.0)), 3.0 + rng.gauss(0, 0.5)) for _ in range(n_chunks)]
        self.steps = 0

    def _features(self, chunks):
        return {"prev_signal": chunks[self.c][0], "noise": random.Random(self.c).random()}

    def losses(self):
        sig, skip = self.docs[self.doc][self.c]
        out = {"SKIP": skip, "STATIC": skip - 0.1}
        for a in ACTIONS[1:]:
            k = int(a.split("_")[1])
            out[a] = out["STATIC"] - (0.2 + 0.01 * k) if sig > 0 else out["STATIC"] + 0.05
        return out

    def peek_losses(self):
        return self.losses()

    def loss_of(self, action):
        return self.losses()[action]

    def step(self, action):
        self.steps += 1
        rec = ChunkRecord(self.doc, self.c, action, self.losses()[action], 10, flops_multiplier(action), 0.0)
        self.c += 1
        return rec, self._ctx()


def test_compute_gae_matches_hand_values():
    r = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    v = torch.tensor([0.5, 0.2, 1.0], dtype=torch.float64)
    adv, ret = compute_gae(r, v, last_value=0.3, gamma=0.9, lam=0.8)
    d2 = 2.0 + 0.9 * 0.3 - 1.0
    d1 = 0.0 + 0.9 * 1.0 - 0.2
    d0 = 1.0 + 0.9 * 0.2 - 0.5
    a2 = d2
    a1 = d1 + 0.72 * a2
    a0 = d0 + 0.72 * a1
    assert adv.tolist() == pytest.approx([a0, a1, a2])
    assert ret.tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 1.0])


def test_pid_lagrangian_by_hand():
    pid = PIDLagrangian(budget=2.0, kp=0.5, ki=0.1, kd=0.2)
    # e = (3 - 2) / 2 = 0.5: I = 0.05, lambda = 0.25 + 0.05 + 0.2 * 0.5 = 0.4
    assert pid.update(3.0) == pytest.approx(0.4)
    # e = 0.5 again: I = 0.1, no rise in e -> lambda = 0.25 + 0.1 = 0.35
    assert pid.update(3.0) == pytest.approx(0.35)
    # e = -0.5: I = 0.05, P = -0.25 -> lambda clipped at 0
    assert pid.update(1.0) == 0.0
    assert pid.integral == pytest.approx(0.05)
    with pytest.raises(ValueError, match="budget"):
        PIDLagrangian(budget=0.0)


def _train(seed=0, iterations=12, **kw):
    env = GainEnv(24, 12, seed=100)
    cfg = PPOConfig(iterations=iterations, docs_per_iter=6, max_chunks_per_doc=12, epochs=4, minibatch_size=32,
                    lr=1e-2, max_seconds=30, **kw)
    gate = build_gate("ppo", target_rate=0.5, seed=seed, config=cfg, verbose=False)
    gate.fit(env, env.doc_ids())
    return gate, env


def _evaluate(gate, env):
    out = []
    for doc_id in env.doc_ids():
        gate.reset(doc_id)
        ctx = env.reset(doc_id)
        while ctx is not None:
            sig = ctx.features["prev_signal"]
            a = gate.decide(ctx)
            rec, ctx = env.step(a)
            gate.observe(rec)
            out.append((sig, a, rec.cost, rec.loss))
    return out


def test_ppo_learns_budgeted_optimum_and_pid_drives_rate_to_budget():
    gate, _ = _train()
    log = gate.policy.log
    assert gate.policy.actions == ("STATIC", "UPDATE_1") and gate.policy.budget == 0.5
    # rewards are advantages over STATIC from the same state: the first rollout's scale is their std
    assert log[0]["reward_scale"] == pytest.approx(0.125, rel=0.25)  # +0.21 / -0.05, half each: std ~0.13
    assert max(e["lambda_next"] for e in log) >= 0.0
    last = sum(e["update_rate"] for e in log[-4:]) / 4
    assert abs(last - 0.5) < 0.2
    # evaluation on held-out documents: UPDATE on +1 chunks, STATIC on -1 chunks, at the target rate
    test_env = GainEnv(20, 12, seed=200)
    res = _evaluate(gate, test_env)
    assert {a for _, a, _, _ in res} == {"STATIC", "UPDATE_1"}
    pos = [a for s, a, _, _ in res if s > 0]
    neg = [a for s, a, _, _ in res if s < 0]
    assert sum(is_update(a) for a in pos) / len(pos) > 0.85
    assert sum(not is_update(a) for a in neg) / len(neg) > 0.85
    rate = sum(is_update(a) for _, a, _, _ in res) / len(res)
    assert abs(rate - 0.5) < 0.1
    # its loss beats STATIC everywhere by most of the optimum's gain, and random at the same rate gains ~0
    static = sum(test_env.docs[d][c][1] - 0.1 for d in test_env.docs for c in range(12)) / len(res)
    optimum = sum(0.21 for s, *_ in res if s > 0) / len(res)
    assert static - sum(lo for *_, lo in res) / len(res) > 0.8 * optimum
    # diagnostics: the feature that predicts the advantage is found, and the score follows it
    diag = gate.policy.diagnostics
    assert diag["best_feature"] == "prev_signal" and diag["feature_corr"]["prev_signal"] > 0.9
    assert diag["score_corr"] > 0.8 and diag["mean_advantage_updated"] > diag["mean_advantage_skipped"]


@pytest.mark.slow
def test_ppo_with_all_update_actions_prefers_the_cheap_one():
    gate, _ = _train(actions="all")
    assert gate.policy.actions == ("STATIC", "UPDATE_1", "UPDATE_2", "UPDATE_4")
    res = _evaluate(gate, GainEnv(20, 12, seed=200))
    pos = [a for s, a, _, _ in res if s > 0]
    assert sum(is_update(a) for a in pos) / len(pos) > 0.8
    assert sum(a == "UPDATE_1" for a in pos) / len(pos) > 0.5  # UPDATE_4 gains 0.03 more at 4x the budget


def test_ppo_is_deterministic_and_saves(tmp_path):
    g1, _ = _train(seed=3, iterations=3)
    g2, _ = _train(seed=3, iterations=3)
    for a, b in zip(g1.policy.net.parameters(), g2.policy.net.parameters()):
        assert torch.equal(a, b)
    assert g1.policy.log[-1]["avg_cost"] == g2.policy.log[-1]["avg_cost"]
    g1.save(tmp_path)
    g3 = PPOGate(0.5, seed=3, config=g1.policy.config)
    assert g3.load(tmp_path)
    assert g3.policy.rate.threshold == g1.policy.rate.initial_threshold
    assert not PPOGate(0.25, seed=3, config=g1.policy.config).load(tmp_path)
    assert not PPOGate(0.5, seed=3).load(tmp_path)  # trained with another configuration
    env = GainEnv(3, 6, seed=300)
    assert [a for _, a, _, _ in _evaluate(g1, env)] == [a for _, a, _, _ in _evaluate(g3, env)]


def test_ppo_features_are_causal():
    """The policy never reads ctx.current or ctx.oracle_losses: filling them changes nothing."""
    gate, _ = _train(seed=1, iterations=2)
    feats = {"prev_signal": 1.0, "noise": 0.3}
    gate.reset("x")
    a = gate.decide(ChunkContext("x", 0, 2, dict(feats)))
    s = gate.last_signal
    gate.reset("x")
    b = gate.decide(ChunkContext("x", 0, 2, dict(feats), current={"recon_loss": 99.0},
                                 oracle_losses={k: 0.0 for k in ALL_ACTIONS}))
    assert a == b and gate.last_signal == s


def test_ppo_config_validation():
    with pytest.raises(ValueError, match="reward_baseline"):
        PPOConfig(reward_baseline="mean")
    with pytest.raises(ValueError, match="actions"):
        PPOConfig(actions="some")
    with pytest.raises(ValueError, match="iterations"):
        PPOConfig(iterations=0)
    with pytest.raises(ValueError, match="not trained"):
        PPOGate(0.5).decide(ChunkContext("x", 0, 1, {}))
