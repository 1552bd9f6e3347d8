"""Tests of ponder/report.py: Oracle Recovery by hand, aggregation, and the files write_report produces."""

from __future__ import annotations

import json
import math

import pytest

from ponder.report import (
    add_oracle_recovery,
    aggregate,
    interpolate,
    oracle_curve,
    oracle_recovery,
    per_chunk_gains,
    write_report,
)
from ponder.types import flops_multiplier, is_update

# per chunk (doc d0/d1, chunks 0..3): SKIP loss and UPDATE_1 loss; n_tokens 10 everywhere
SKIP = [3.0, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0]
UPD = [2.6, 2.9, 3.1, 2.8, 1.9, 2.0, 1.5, 2.1]
KEYS = [(f"d{i // 4}", i % 4) for i in range(8)]
GAINS = [s - u for s, u in zip(SKIP, UPD)]  # 0.4 0.1 -0.1 0.2 0.1 0.0 0.5 -0.1


def _records(gate, actions, lookahead=False, uses_labels=False, signals=None):
    rows = []
    for i, ((doc, c), a) in enumerate(zip(KEYS, actions)):
        loss = SKIP[i] if a == "SKIP" else UPD[i]
        rows.append({"gate": gate, "doc_id": doc, "chunk_idx": c, "action": a, "loss": loss, "n_tokens": 10,
                     "cost": flops_multiplier(a), "wall_s": 0.1 if a == "SKIP" else 0.3,
                     "gate_signal": None if signals is None else signals[i], "recon_loss": 1.0,
                     "lookahead": lookahead, "uses_labels": uses_labels, "skip_loss": SKIP[i]})
    return rows


def _all_records():
    S, U = "SKIP", "UPDATE_1"
    recs = _records("fixed:SKIP", [S] * 8)
    recs += _records("fixed:UPDATE_1", [U] * 8)
    # budgeted oracle at rate 0.5: the 4 largest gains are chunks 6 (0.5), 0 (0.4), 3 (0.2), and 1 or 4 (0.1)
    recs += _records("budgeted-oracle", [U, U, S, U, S, S, U, S], uses_labels=True)
    # a causal gate at rate 0.5 that picks chunks 0, 2, 4, 5: gains 0.4 - 0.1 + 0.1 + 0.0
    recs += _records("recon", [U, S, U, S, U, U, S, S], signals=[2.0, 0.0, 1.5, 0.1, 1.0, 1.2, 0.2, 0.3])
    # its lookahead twin picks 0, 3, 6, 4: gains 0.4 + 0.2 + 0.5 + 0.1
    recs += _records("recon-lookahead", [U, S, S, U, U, S, U, S], lookahead=True,
                     signals=[2.0, 0.0, 0.1, 1.5, 1.0, 0.2, 2.5, 0.3])
    # a gate at rate 0.25 (2 of 8): chunks 0 and 7 -> needs interpolation of the oracle curve
    recs += _records("random", [U, S, S, S, S, S, S, U], signals=[0.1] * 8)
    return recs


def test_oracle_recovery_formula_by_hand():
    assert oracle_recovery(3.0, 2.8, 2.6) == pytest.approx(0.5)
    assert oracle_recovery(3.0, 2.6, 2.6) == pytest.approx(1.0)
    assert oracle_recovery(3.0, 3.1, 2.8) == pytest.approx(-0.5)
    assert math.isnan(oracle_recovery(3.0, 2.9, 3.0))  # the oracle gains nothing: undefined
    assert math.isnan(oracle_recovery(3.0, 2.9, 3.2))


def test_aggregate_is_token_weighted():
    rows = [{"gate": "g", "doc_id": "a", "chunk_idx": 0, "action": "SKIP", "loss": 1.0, "n_tokens": 30, "cost": 1.0,
             "wall_s": 1.0},
            {"gate": "g", "doc_id": "a", "chunk_idx": 1, "action": "UPDATE_2", "loss": 3.0, "n_tokens": 10, "cost": 5.0,
             "wall_s": 3.0}]
    s = aggregate(rows)["g"]
    assert s["loss"] == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)
    assert s["ppl"] == pytest.approx(math.exp(1.5))
    assert s["cost"] == pytest.approx(3.0) and s["update_rate"] == pytest.approx(0.5)
    assert s["actions"]["UPDATE_2"] == 1
    with pytest.raises(ValueError, match="gate"):
        aggregate([{"doc_id": "a"}])


def test_oracle_recovery_at_equal_rate_by_hand():
    stats = aggregate(_all_records())
    add_oracle_recovery(stats, _all_records(), n_boot=200)
    l_skip = sum(SKIP) / 8
    l_bo = l_skip - (0.5 + 0.4 + 0.2 + 0.1) / 8  # the budgeted run updates 0, 1, 3, 6
    assert stats["budgeted-oracle"]["loss"] == pytest.approx(l_bo)
    assert stats["budgeted-oracle"]["oracle_recovery"] == pytest.approx(1.0)
    l_recon = l_skip - (0.4 - 0.1 + 0.1 + 0.0) / 8
    assert stats["recon"]["oracle_loss"] == pytest.approx(l_bo)  # same rate 0.5: no interpolation
    assert stats["recon"]["oracle_recovery"] == pytest.approx((l_skip - l_recon) / (l_skip - l_bo))
    assert stats["recon"]["oracle_recovery"] == pytest.approx(0.4 / 1.2)
    assert stats["recon-lookahead"]["oracle_recovery"] == pytest.approx(1.2 / 1.2)
    # rate 0.25 (2 of 8): the oracle at exactly 2 updates (chunks 6 and 0), no interpolation
    l_or = l_skip - (0.5 + 0.4) / 8
    assert stats["random"]["oracle_loss"] == pytest.approx(l_or)
    l_rand = l_skip - (0.4 - 0.1) / 8
    assert stats["random"]["oracle_recovery"] == pytest.approx((l_skip - l_rand) / (l_skip - l_or))
    # the expected random gate at 2 of 8: every chunk gains a quarter of its gain
    l_exp = l_skip - 0.25 * sum(GAINS) / 8
    assert stats["random"]["random_loss"] == pytest.approx(l_exp)
    assert stats["recon"]["recovery_vs_random"] == pytest.approx(
        (l_skip - 0.5 * sum(GAINS) / 8 - l_recon) / (l_skip - 0.5 * sum(GAINS) / 8 - l_bo))
    # paired bootstrap intervals bracket the point values
    for name in ("recon", "budgeted-oracle", "fixed:UPDATE_1"):
        lo, hi = stats[name]["loss_ci"]
        assert lo <= stats[name]["loss"] <= hi
        lo, hi = stats[name]["gain_vs_skip_ci"]
        assert lo <= stats[name]["gain_vs_skip"] <= hi
    assert stats["fixed:SKIP"]["gain_vs_skip_ci"] == (0.0, 0.0)  # paired: SKIP minus itself is exactly 0
    assert math.isnan(stats["fixed:SKIP"]["oracle_recovery"])  # rate 0
    assert stats["fixed:UPDATE_1"]["wall_vs_skip"] == pytest.approx(3.0)


def test_oracle_curve_and_interpolation():
    stats = aggregate(_all_records())
    curve = oracle_curve(stats)
    assert [u for u, _ in curve] == [0.0, 0.5, 1.0]
    assert interpolate([(0.0, 3.0), (0.5, 2.6), (1.0, 2.5)], 0.25) == pytest.approx(2.8)
    assert interpolate([(0.0, 3.0), (0.5, 2.6), (1.0, 2.5)], 0.75) == pytest.approx(2.55)
    assert math.isnan(interpolate([(0.0, 3.0), (0.5, 2.6)], 0.75))
    gains = per_chunk_gains(_all_records())
    assert [gains[k] for k in KEYS] == pytest.approx(GAINS)


def test_write_report_files(tmp_path):
    recs = _all_records()
    summary = {"run": "unit", "base": "tiny", "ttt_layer": "official-linear", "target_rate": 0.5,
               "gates": {"recon": {"spec": "recon", "eval_s": 1.0}}}
    write_report(tmp_path, recs, summary)
    for name in ("summary.json", "results.md", "pareto.png", "gains.png"):
        assert (tmp_path / name).stat().st_size > 0
    for png in ("pareto.png", "gains.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image as mpimg

        img = mpimg.imread(tmp_path / png)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
        assert float(img[..., :3].std()) > 0.01  # not a blank canvas
    out = json.loads((tmp_path / "summary.json").read_text())
    assert out["gates"]["recon"]["spec"] == "recon"  # runner fields are kept
    assert out["gates"]["recon"]["oracle_recovery"] == pytest.approx(1 / 3)
    assert out["gates"]["fixed:SKIP"]["oracle_recovery"] is None  # NaN -> null in JSON
    # signal/gain correlation of the causal gate, by hand
    sig = out["gates"]["recon"]["signal"]
    assert sig["mean_gain_updated"] == pytest.approx((0.4 - 0.1 + 0.1 + 0.0) / 4)
    assert sig["mean_gain_skipped"] == pytest.approx((0.1 + 0.2 + 0.5 - 0.1) / 4)
    md = (tmp_path / "results.md").read_text()
    causal_part, rest = md.split("## Lookahead gates", 1)
    assert "| recon |" in causal_part and "recon-lookahead" not in causal_part
    look_part, labels_part = rest.split("## Upper bounds", 1)
    assert "| recon-lookahead (lookahead) |" in look_part
    assert "| budgeted-oracle |" in labels_part.split("## Causal vs lookahead")[0]
    assert "33.3%" in causal_part and "100.0%" in look_part
    twin_row = next(line for line in md.splitlines() if line.startswith("| recon | recon-lookahead |"))
    assert "| -0.1000 |" in twin_row  # Δ loss = -(1.2 - 0.4) / 8
    with pytest.raises(ValueError, match="no records"):
        write_report(tmp_path, [], summary)


def _tiny_ponder_env(n_docs, seed):
    """D1's real PonderEnv over a tiny random adaptive model and random cached 'backbone' outputs."""
    from tests.ponder.synthetic import synthetic_env

    return synthetic_env(n_docs, seed, doc_prefix=f"s{seed}d")


@pytest.mark.slow
def test_all_gates_with_the_real_env_and_report(tmp_path):
    """Integration: every gate spec (PPO included) fits on one PonderEnv, runs on another through the
    runner's protocol, and the report's numbers agree with the records."""
    from ponder.gates import GATE_SPECS, build_gate
    from ponder.gates.ppo import PPOConfig
    from ponder.runner import evaluate_gate

    train_env, eval_env = _tiny_ponder_env(2, seed=1), _tiny_ponder_env(2, seed=2)
    records = []
    for spec in GATE_SPECS:
        kw = {"config": PPOConfig(iterations=2, docs_per_iter=2), "verbose": False} if spec == "ppo" else {}
        gate = build_gate(spec, target_rate=None if spec.startswith("fixed") or spec == "oracle" else 0.5, **kw)
        gate.fit(train_env, train_env.doc_ids())
        rows = evaluate_gate(eval_env, gate, eval_env.doc_ids(), 0.5)
        assert len(rows) == 6
        records += rows
    by_gate = {}
    for r in records:
        by_gate.setdefault(r["gate"], []).append(r)
    assert sum(is_update(r["action"]) for r in by_gate["budgeted-oracle"]) == 3  # exactly half of 6 chunks
    assert {r["action"] for r in by_gate["budgeted-oracle"]} == {"STATIC", "UPDATE_1"}
    assert all(r["action"] == "SKIP" for r in by_gate["fixed:SKIP"])
    write_report(tmp_path, records, {"run": "integration", "gates": {}})
    out = json.loads((tmp_path / "summary.json").read_text())
    assert set(out["gates"]) == {g for g in by_gate}
    bo = out["gates"]["budgeted-oracle"]
    assert bo["oracle_recovery"] == pytest.approx(1.0) or bo["oracle_recovery"] is None
    static = out["gates"]["fixed:STATIC"]["loss"]  # the adaptive gates skip to STATIC: their baseline
    for name in ("recon", "ppo", "random"):
        g = out["gates"][name]
        if g["oracle_recovery"] is not None:
            assert g["baseline"] == "fixed:STATIC"
            assert g["oracle_recovery"] == pytest.approx(oracle_recovery(static, g["loss"], g["oracle_loss"]))


def test_compare_script_table_and_plot(tmp_path):
    """ponder/compare.py's table and plot from per-layer summaries (the runs themselves are the runner's)."""
    from ponder import compare as mod

    stats = aggregate(_all_records())
    add_oracle_recovery(stats, _all_records(), n_boot=100)
    runs = {layer: {"base": "tiny", "target_rate": 0.5, "data": {"eval_chunks": 8}, "training": {"seconds": 1.0},
                    "gates": {k: dict(v, loss=v["loss"] + 0.01 * i) for k, v in stats.items()}}
            for i, layer in enumerate(("official-linear", "ponder-simple"))}
    md = mod.comparison_markdown(runs, "unit")
    row = next(line for line in md.splitlines() if line.startswith("| ponder-simple |") and "OR" in line)
    assert "OR 33.3%" in row  # recon's oracle recovery, copied from the run summary
    head = next(line for line in md[md.index("## Headline"):].splitlines() if line.startswith("| ponder-simple |"))
    assert head.count("[") >= 4  # losses and gains with their bootstrap intervals
    assert "| official-linear | 2.5000 (1.00x) | 2.3625 (3.00x)" in md
    mod.plot_comparison(runs, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        mod.parse_args(["--layers", "nope"])


def test_gain_by_chunk_index_by_hand():
    from ponder.report import gain_by_chunk_index

    rows = gain_by_chunk_index(_all_records(), n_boot=200)
    assert [r["chunk_idx"] for r in rows] == [0, 1, 2, 3] and all(r["n_docs"] == 2 for r in rows)
    for r in rows:  # chunk c of d0 and of d1
        want = (GAINS[r["chunk_idx"]] + GAINS[4 + r["chunk_idx"]]) / 2
        assert r["vs_skip"] == pytest.approx(want)
        lo, hi = r["vs_skip_ci"]
        assert lo <= want <= hi
        assert "vs_static" not in r  # no fixed:STATIC run in these records


# -- gates that skip to STATIC: their baseline, exact-count oracle and picks ----------------------------------
STATIC = [x - 0.05 for x in SKIP]
ADV = [st - u for st, u in zip(STATIC, UPD)]  # advantage over STATIC: GAINS - 0.05


def _static_records():
    S, T, U = "SKIP", "STATIC", "UPDATE_1"
    recs = _records("fixed:SKIP", [S] * 8) + _records("fixed:UPDATE_1", [U] * 8)
    for row in _records("fixed:STATIC", [S] * 8):
        recs.append(dict(row, action=T, loss=STATIC[KEYS.index((row["doc_id"], row["chunk_idx"]))]))
    picks = [U, T, U, T, U, U, T, T]
    for gate, bonus in (("recon", 0.0), ("ppo", 0.2)):  # ppo: its own trajectory scores its updates 0.2 better
        for i, ((doc, c), a) in enumerate(zip(KEYS, picks)):
            loss = UPD[i] - bonus if a == U else STATIC[i]
            recs.append({"gate": gate, "doc_id": doc, "chunk_idx": c, "action": a, "loss": loss, "n_tokens": 10,
                         "cost": 1.2, "wall_s": 0.2, "gate_signal": float(i), "recon_loss": 1.0,
                         "lookahead": False, "uses_labels": False, "skip_loss": SKIP[i]})
    return recs


def test_static_skip_gates_are_scored_against_static_at_their_exact_count():
    from ponder.report import baseline_of, exact_rate_references, signal_correlations

    recs = _static_records()
    assert baseline_of(recs, "recon") == "fixed:STATIC" and baseline_of(_all_records(), "recon") == "fixed:SKIP"
    assert per_chunk_gains(recs, base="STATIC") == pytest.approx({k: a for k, a in zip(KEYS, ADV)})
    refs = exact_rate_references(recs, "recon")
    # the oracle at 4 updates takes the 4 largest advantages: chunks 6, 0, 3 and (tie at 0.05) d0's chunk 1
    updated = {(r["doc_id"], r["chunk_idx"]) for r, s in zip(refs["oracle@recon"], STATIC) if r["loss"] != s}
    assert updated == {KEYS[6], KEYS[0], KEYS[3], KEYS[1]}
    stats = aggregate(recs)
    boot = add_oracle_recovery(stats, recs, n_boot=300)
    l_static = sum(STATIC) / 8
    l_or, l_rand = l_static - 1.0 / 8, l_static - 0.5 * sum(ADV) / 8
    l_gate = l_static - (ADV[0] + ADV[2] + ADV[4] + ADV[5]) / 8
    r = stats["recon"]
    assert r["baseline"] == "fixed:STATIC"
    assert r["oracle_loss"] == pytest.approx(l_or) and r["random_loss"] == pytest.approx(l_rand)
    assert r["oracle_recovery"] == pytest.approx((l_static - l_gate) / (l_static - l_or))  # 0.2
    assert r["recovery_vs_random"] == pytest.approx((l_rand - l_gate) / (l_rand - l_or))
    assert r["picks_recovery_vs_random"] == pytest.approx(r["recovery_vs_random"])  # its losses ARE the fixed runs'
    assert r["gain_vs_static"] == pytest.approx(l_static - l_gate)
    # ppo picks the same chunks: same picks recovery, but its own trajectory makes its measured loss better
    p = stats["ppo"]
    assert p["picks_recovery_vs_random"] == pytest.approx(r["picks_recovery_vs_random"])
    assert p["recovery_vs_random"] == pytest.approx((l_rand - (l_gate - 0.8 / 8)) / (l_rand - l_or))
    corr = signal_correlations(recs, stats, boot)
    c = corr["recon"]
    assert c["baseline"] == "fixed:STATIC"
    assert c["mean_gain_updated"] == pytest.approx((ADV[0] + ADV[2] + ADV[4] + ADV[5]) / 4)
    assert c["mean_gain_skipped"] == pytest.approx((ADV[1] + ADV[3] + ADV[6] + ADV[7]) / 4)
    for key in ("mean_gain_updated", "mean_gain_skipped", "gain_difference"):
        lo, hi = c[f"{key}_ci"]
        assert lo <= c[key] <= hi and hi > lo
    from ponder.report import _agreement

    assert _agreement(stats["recon"], corr["recon"]) == "yes"  # both negative: it picks the wrong chunks
    assert _agreement(stats["ppo"], corr["ppo"]).startswith("no")


def test_report_with_static_gates_writes_intervals(tmp_path):
    recs = _static_records()
    write_report(tmp_path, recs, {"run": "static", "gates": {}})
    md = (tmp_path / "results.md").read_text()
    section = md.split("## Does the gate pick the chunks that gain?", 1)[1].split("## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| recon |"))
    assert "fixed:STATIC" in row and "[" in row and "| yes |" in row
    out = json.loads((tmp_path / "summary.json").read_text())
    assert out["gates"]["recon"]["oracle_recovery"] == pytest.approx(0.2)
    assert len(out["gates"]["recon"]["signal"]["gain_difference_ci"]) == 2
    for png in ("pareto.png", "gains.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_differences_by_hand():
    """Gates vs the measured random gate and paper:X vs X, against sums computed here; a paper twin
    that is 0.1 better on one chunk must show exactly that (token-weighted over 8 equal chunks)."""
    from ponder.report import paired_differences, results_markdown

    recs = _all_records()
    for row in _records("fixed:UPDATE_1", ["UPDATE_1"] * 8):
        better = row["chunk_idx"] == 2 and row["doc_id"] == "d1"
        recs.append(dict(row, gate="paper:fixed:UPDATE_1", loss=row["loss"] - (0.1 if better else 0.0)))
    rows = {(r["gate"], r["reference"]): r for r in paired_differences(recs)}
    assert set(rows) == {("budgeted-oracle", "random"), ("recon", "random"), ("recon-lookahead", "random"),
                         ("paper:fixed:UPDATE_1", "fixed:UPDATE_1")}

    def mean_loss(gate):
        return sum(r["loss"] for r in recs if r["gate"] == gate) / 8

    for (gate, ref), r in rows.items():
        assert r["gain"] == pytest.approx(mean_loss(ref) - mean_loss(gate))
        lo, hi = r["gain_ci"]
        assert lo <= r["gain"] + 1e-12 and r["gain"] - 1e-12 <= hi
    assert rows[("paper:fixed:UPDATE_1", "fixed:UPDATE_1")]["gain"] == pytest.approx(0.1 / 8)
    text = results_markdown(aggregate(recs), {"run": "t", "paired_differences": list(rows.values())}, None, recs)
    assert "## Measured paired differences" in text and "| recon | random | " in text
    # the paper's SKIP (the layer without an update) is compared with fixed:STATIC, not the bare backbone
    static = _static_records()
    static += [dict(r, gate="paper:fixed:SKIP") for r in static if r["gate"] == "fixed:STATIC"]
    rows = {(r["gate"], r["reference"]): r for r in paired_differences(static)}
    assert rows[("paper:fixed:SKIP", "fixed:STATIC")]["gain"] == pytest.approx(0.0)
