"""Reports of a PonderTTT run: Oracle Recovery, summary.json, a Markdown table and PNG plots.

Reproduces the evaluation of PonderTTT's paper "When to Ponder: Adaptive Compute Allocation for
Code Generation via Test-Time Training" (deveworld/ponderTTT, later history): loss against compute
for every fixed mode and gate, and Oracle Recovery,

    OR = (L_B - L_gate) / (L_B - L_oracle(n_u)),

the share of the loss reduction over the gate's baseline B that the label-using oracle achieves
with the SAME number of updates n_u which the gate spends without labels (paper: 82-89% on GPT-2).

Definitions used here (also printed under the table):
* loss: mean next-token cross-entropy over all scored tokens of the evaluation chunks (token
  weighted), nats/token; ppl = exp(loss).
* cost: counted FLOPs of what ran over SKIP's (the runner's records), and measured wall-clock per
  chunk relative to the fixed SKIP run on the same chunks.
* update rate u: fraction of chunks run with an UPDATE_k (SKIP and STATIC take no inner step).
* baseline B (`baseline_of`): fixed:STATIC for gates that run STATIC on the chunks they do not
  update (the adaptive gates' default), fixed:SKIP for gates that skip to the bare backbone.
* L_oracle(n_u) (`exact_rate_references`): UPDATE the n_u chunks with the largest per-chunk
  advantage L_B - L_UPDATE_k of the fixed runs, B elsewhere: no interpolation between rates. Also
  the expected random gate at n_u, and the gate's own picks scored with the fixed runs' losses,
  which separates "does it pick the chunks that gain" from the effect of its carried state.
* Lookahead gates (which read chunk c's own statistics before scoring chunk c) and label-using
  oracles are listed in separate sections; a lookahead gate's Oracle Recovery is not comparable to
  a causal gate's, and the report prints the difference between each gate and its causal twin.
* Every loss, difference and recovery carries a 95% paired bootstrap interval (`ponder.stats`);
  the plots draw them.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ponder.stats import fmt_ci
from ponder.types import ACTIONS, ALL_ACTIONS, is_update
from ttt_common.files import atomic_write_text

SKIP_NAMES = ("fixed:SKIP", "SKIP")


def oracle_recovery(l_skip: float, l_policy: float, l_oracle: float) -> float:
    """(l_skip - l_policy) / (l_skip - l_oracle); NaN when the oracle gains nothing (denominator <= 1e-6 l_skip).

    Args:
        l_skip: loss without any test-time training.
        l_policy: loss of the gate being scored.
        l_oracle: loss of the budgeted oracle at the gate's update rate.
    Returns:
        the fraction (1.0 = the oracle's whole gain; negative = worse than SKIP).
    """
    denom = float(l_skip) - float(l_oracle)
    # below ~1e-6 relative, a difference of float32 mean losses is rounding noise, not a gain
    if not math.isfinite(denom) or denom <= max(1e-12, 1e-6 * abs(float(l_skip))):
        return float("nan")
    return (float(l_skip) - float(l_policy)) / denom


def _gate_of(record: dict) -> str:
    for key in ("gate", "mode", "name"):
        if record.get(key) is not None:
            return str(record[key])
    raise ValueError(f"record {record!r} has no 'gate' key naming the gate/mode that produced it")


def aggregate(records: list[dict]) -> dict[str, dict]:
    """Per gate: loss (token weighted), ppl, cost, update_rate, wall_s_per_chunk, n_chunks, n_tokens, actions."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[_gate_of(r)].append(r)
    out = {}
    for name, rows in groups.items():
        n_tok = sum(int(r["n_tokens"]) for r in rows)
        if n_tok <= 0:
            raise ValueError(f"gate {name!r}: its {len(rows)} records score no tokens (n_tokens sums to {n_tok})")
        loss = sum(float(r["loss"]) * int(r["n_tokens"]) for r in rows) / n_tok
        out[name] = {
            "loss": loss, "ppl": math.exp(loss), "n_chunks": len(rows), "n_tokens": n_tok,
            # counted FLOPs over SKIP's on the same chunks when the records carry them, else the mean cost
            "cost": (sum(float(r["flops"]) for r in rows) / sum(float(r["skip_flops"]) for r in rows)
                     if all(r.get("flops") and r.get("skip_flops") for r in rows)
                     else sum(float(r["cost"]) for r in rows) / len(rows)),
            "update_rate": sum(is_update(r["action"]) for r in rows) / len(rows),
            "wall_s_per_chunk": sum(float(r.get("wall_s") or 0.0) for r in rows) / len(rows),
            "actions": {a: sum(r["action"] == a for r in rows) for a in ALL_ACTIONS},
            "lookahead": any(bool(r.get("lookahead")) for r in rows) or name.startswith("recon-lookahead"),
            "uses_labels": any(bool(r.get("uses_labels")) for r in rows) or "oracle" in name,
        }
    return out


def update_action_of(name: str) -> str:
    """The update action a gate's budget is expressed in: its `:UPDATE_k` suffix, else UPDATE_1."""
    suffix = name.rpartition(":")[2]
    return suffix if suffix in ACTIONS[1:] else "UPDATE_1"


def oracle_curve(stats: dict[str, dict], update_action: str = "UPDATE_1") -> list[tuple[float, float]]:
    """Measured (update rate, loss) points of the budgeted oracle for `update_action`, sorted by rate.

    (0, L_skip) and (1, L of fixed:update_action) are included when those runs exist; points at the
    same rate keep the lowest loss.
    """
    pts: dict[float, float] = {}

    def add(u: float, loss: float) -> None:
        pts[u] = min(loss, pts.get(u, float("inf")))

    for name in SKIP_NAMES:
        if name in stats:
            add(0.0, stats[name]["loss"])
    for fixed in (f"fixed:{update_action}", update_action):
        if fixed in stats:
            add(1.0, stats[fixed]["loss"])
    for name, s in stats.items():
        if name.startswith("budgeted-oracle") and update_action_of(name) == update_action:
            add(float(s["update_rate"]), s["loss"])
    return sorted(pts.items())


def interpolate(curve: list[tuple[float, float]], u: float) -> float:
    """Piecewise-linear value of `curve` at `u` (NaN outside its range or with < 1 point)."""
    if not curve:
        return float("nan")
    for (u0, l0), (u1, l1) in zip(curve, curve[1:]):
        if u0 <= u <= u1:
            return l0 if u1 == u0 else l0 + (l1 - l0) * (u - u0) / (u1 - u0)
    if len(curve) == 1 and abs(curve[0][0] - u) < 1e-12:
        return curve[0][1]
    return float("nan")


def baseline_of(records: list[dict], gate: str) -> str:
    """The fixed run a gate's chunks without update are compared with: `fixed:STATIC` when every
    chunk it did not update ran STATIC (the adaptive gates' default skip action), else `fixed:SKIP`;
    `paper:fixed:SKIP` (the paper's SKIP, i.e. STATIC) for paper-protocol runs."""
    if gate.startswith("paper:"):
        return "paper:fixed:SKIP"
    skips = {r["action"] for r in records if _gate_of(r) == gate and not is_update(r["action"])}
    return "fixed:STATIC" if skips == {"STATIC"} else "fixed:SKIP"


def exact_rate_references(records: list[dict], gate: str, update_action: str = "UPDATE_1") -> dict[str, list[dict]]:
    """Per-chunk rows of three references of `gate` at its EXACT number of updates n_u (no interpolation).

    With B = `baseline_of(gate)` (fixed:STATIC for gates that skip to STATIC) and the per-chunk
    advantage g_k = L_B(k) - L_update(k) of the fixed runs (`per_chunk_gains`):

    * `oracle@<gate>`: UPDATE the n_u chunks with the largest token-weighted advantage (ties:
      earlier chunk first), i.e. `BudgetedOracleGate.make_plan` at rate n_u / N, every other chunk
      at L_B: the paper's recovery oracle (greedy top-u by per-chunk advantage).
    * `random@<gate>`: the EXPECTED loss of updating n_u chunks uniformly at random: every chunk at
      L_B(k) - (n_u / N) g_k.
    * `picks@<gate>`: the gate's own choice of chunks scored with the fixed runs' losses (L_update on
      the chunks it updated, L_B on the others). It differs from the gate's measured loss only by
      the carried state (the gate's own trajectory vs the fixed runs'): recovery computed from it
      measures "does the gate pick the chunks that gain" alone.

    Empty when B / fixed:update_action did not run on the gate's chunks, or n_u is 0.
    """
    from ponder.gates import BudgetedOracleGate

    rows = [r for r in records if _gate_of(r) == gate]
    base = baseline_of(records, gate)
    prefix = "paper:" if gate.startswith("paper:") else ""
    gains = per_chunk_gains(records, update_action, prefix, base.rpartition(":")[2])
    upd = _chunk_map(records, f"{prefix}fixed:{update_action}")
    keys = [(r["doc_id"], int(r["chunk_idx"])) for r in rows]
    if not rows or any(k not in gains for k in keys):
        return {}
    updated = {(r["doc_id"], int(r["chunk_idx"])) for r in rows if is_update(r["action"])}
    if not updated:
        return {}
    ntok = {(r["doc_id"], int(r["chunk_idx"])): int(r["n_tokens"]) for r in rows}
    u = len(updated) / len(keys)
    plan = BudgetedOracleGate.make_plan({k: gains[k] for k in keys}, u, n_tokens=ntok)
    out: dict[str, list[dict]] = {f"{ref}@{gate}": [] for ref in ("oracle", "random", "picks")}
    for k in keys:
        b = upd[k] + gains[k]
        row = {"doc_id": k[0], "chunk_idx": k[1], "n_tokens": ntok[k]}
        out[f"oracle@{gate}"].append(dict(row, gate=f"oracle@{gate}", loss=upd[k] if k in plan else b))
        out[f"random@{gate}"].append(dict(row, gate=f"random@{gate}", loss=b - u * gains[k]))
        out[f"picks@{gate}"].append(dict(row, gate=f"picks@{gate}", loss=upd[k] if k in updated else b))
    return out


def add_oracle_recovery(stats: dict[str, dict], records: list[dict] | None = None, n_boot: int = 1000,
                        seed: int = 0):
    """Fill into every gate's stats, in place: `baseline` (`baseline_of`), `oracle_loss` and
    `oracle_recovery` = (L_B - L_gate) / (L_B - L_oracle) against the oracle at the gate's exact
    update count, `random_loss` and `recovery_vs_random` = (L_random - L_gate) / (L_random - L_oracle)
    against the expected random gate at that count, `picks_recovery_vs_random` (the same with the
    gate's picks scored by the fixed runs: `exact_rate_references`), `wall_vs_skip`, and, with
    `records`, paired bootstrap intervals `<key>_ci` (`ponder.stats`) for the loss, the gains over
    SKIP and STATIC and the recoveries. Without `records` (stats only), recoveries are NaN.

    Returns the `ponder.stats.Bootstrap` used (None without records), for further paired intervals."""
    skip_name = next((n for n in SKIP_NAMES if n in stats), None)
    skip = stats.get(skip_name) if skip_name else None
    static_name = next((n for n in ("fixed:STATIC", "STATIC") if n in stats), None)
    for s in stats.values():
        if skip is not None and skip.get("wall_s_per_chunk"):
            s.setdefault("wall_vs_skip", s["wall_s_per_chunk"] / skip["wall_s_per_chunk"])
        for key in ("oracle_loss", "oracle_recovery", "random_loss", "recovery_vs_random", "picks_recovery_vs_random"):
            s.setdefault(key, float("nan"))
    if not records or skip is None:
        return None
    from ponder.stats import Bootstrap, interval

    refs: dict[str, list[dict]] = {}
    for name, s in stats.items():
        if name.startswith(("fixed:", "paper:fixed:")) or not (0 < s["update_rate"] < 1):
            continue
        refs.update(exact_rate_references(records, name, update_action_of(name)))
    rows = [dict(r, gate=_gate_of(r)) for r in records] + [r for v in refs.values() for r in v]
    boot = Bootstrap(rows, n_boot=n_boot, seed=seed)
    L = {g: boot.losses(g) for g in boot.gates()}
    point = {g: (sum(r["loss"] * r["n_tokens"] for r in v) / sum(r["n_tokens"] for r in v)) for g, v in refs.items()}

    def recovery(key: str, s: dict, top: str, value: float, lo: str, hi: str, bottom: str) -> None:
        # (L_top - L_value) / (L_top - L_bottom) and its paired bootstrap interval
        s[key] = oracle_recovery(top if isinstance(top, float) else point[top], value, point[bottom])
        with np.errstate(divide="ignore", invalid="ignore"):
            reps = (L[lo] - L[hi]) / (L[lo] - L[bottom])
        s[f"{key}_ci"] = interval(reps) if math.isfinite(s[key]) else (float("nan"),) * 2

    for name, s in stats.items():
        s["loss_ci"] = interval(L[name])
        s["gain_vs_skip"] = skip["loss"] - s["loss"]
        s["gain_vs_skip_ci"] = interval(L[skip_name] - L[name])
        paper = name.startswith("paper:") and "paper:fixed:SKIP" in stats
        ref_static = "paper:fixed:SKIP" if paper else static_name  # the paper's SKIP is our STATIC
        if ref_static and not (name.startswith("paper:") and not paper):
            s["gain_vs_static"] = stats[ref_static]["loss"] - s["loss"]
            s["gain_vs_static_ci"] = interval(L[ref_static] - L[name])
        o, r, p = f"oracle@{name}", f"random@{name}", f"picks@{name}"
        if o not in point:
            continue
        base = baseline_of(records, name)
        s["baseline"] = base
        s["oracle_ref"] = (f"top-{s['update_rate']:.3f} chunks by per-chunk advantage of "
                           f"{update_action_of(name)} over {base}")
        s["oracle_loss"], s["random_loss"] = point[o], point[r]
        recovery("oracle_recovery", s, float(stats[base]["loss"]), s["loss"], base, name, o)
        recovery("recovery_vs_random", s, r, s["loss"], r, name, o)
        recovery("picks_recovery_vs_random", s, r, point[p], r, p, o)
    stats_meta = {"n_docs": boot.n_docs, "n_chunks": boot.n_chunks, "n_boot": n_boot}
    for s in stats.values():
        s["bootstrap"] = stats_meta
    return boot


def _chunk_map(records: list[dict], gate: str, field: str = "loss") -> dict[tuple[str, int], float]:
    return {(r["doc_id"], int(r["chunk_idx"])): r.get(field) for r in records if _gate_of(r) == gate}


def per_chunk_gains(records: list[dict], update_action: str = "UPDATE_1", prefix: str = "",
                    base: str = "SKIP") -> dict[tuple[str, int], float]:
    """Advantage of every chunk under fixed:update_action over fixed:`base` (SKIP or STATIC): its
    `base` loss minus its loss (nats/token). `prefix` "paper:" reads the paper-protocol runs."""
    upd = _chunk_map(records, f"{prefix}fixed:{update_action}")
    ref = _chunk_map(records, f"{prefix}fixed:{base}")
    if not ref and base == "SKIP" and not prefix:  # the runner also stores each chunk's SKIP loss on every record
        ref = {(r["doc_id"], int(r["chunk_idx"])): r["skip_loss"] for r in records if r.get("skip_loss") is not None}
    return {k: ref[k] - v for k, v in upd.items() if k in ref and v is not None}


def _pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 3:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    # a constant signal (e.g. fixed or random gates) has no correlation: guard against rounding residue
    tiny = 1e-12 * n
    return sxy / math.sqrt(sxx * syy) if sxx > tiny * (1 + mx * mx) and syy > tiny * (1 + my * my) else float("nan")


def signal_correlations(records: list[dict], stats: dict[str, dict], boot=None) -> dict[str, dict]:
    """Does the gate pick the chunks that gain? Per non-fixed gate, with g_k the per-chunk advantage
    of its update action over its baseline (`baseline_of`: STATIC for gates that skip to STATIC) in
    the fixed runs: the Pearson correlation of its `gate_signal` with g_k, the mean g_k of the chunks
    it updated and of those it did not, and their difference; with `boot` (the paired bootstrap of
    `add_oracle_recovery`), 95% intervals of the three means over the same resampled chunks."""
    from ponder.stats import interval

    out = {}
    for name in stats:
        if name.startswith(("fixed:", "paper:fixed:")):
            continue
        base = baseline_of(records, name)
        prefix = "paper:" if name.startswith("paper:") else ""
        gains = per_chunk_gains(records, update_action_of(name), prefix, base.rpartition(":")[2])
        rows = [r for r in records if _gate_of(r) == name and (r["doc_id"], int(r["chunk_idx"])) in gains]
        pairs = [(float(r["gate_signal"]), gains[(r["doc_id"], int(r["chunk_idx"]))]) for r in rows
                 if r.get("gate_signal") is not None and math.isfinite(float(r["gate_signal"]))]
        upd = [gains[(r["doc_id"], int(r["chunk_idx"]))] for r in rows if is_update(r["action"])]
        skp = [gains[(r["doc_id"], int(r["chunk_idx"]))] for r in rows if not is_update(r["action"])]
        entry = {
            "baseline": base,
            "signal_gain_corr": _pearson([p[0] for p in pairs], [p[1] for p in pairs]),
            "n_signal": len(pairs),
            "mean_gain_updated": sum(upd) / len(upd) if upd else float("nan"),
            "mean_gain_skipped": sum(skp) / len(skp) if skp else float("nan"),
        }
        entry["gain_difference"] = entry["mean_gain_updated"] - entry["mean_gain_skipped"]
        if boot is not None and upd and skp:
            g, is_upd = np.zeros(len(boot.keys)), np.zeros(len(boot.keys))
            present = np.zeros(len(boot.keys))
            for r in rows:
                i = boot.index[(r["doc_id"], int(r["chunk_idx"]))]
                g[i], is_upd[i], present[i] = gains[(r["doc_id"], int(r["chunk_idx"]))], is_update(r["action"]), 1.0
            with np.errstate(divide="ignore", invalid="ignore"):
                mu = (boot.counts @ (g * is_upd)) / (boot.counts @ is_upd)
                ms = (boot.counts @ (g * present * (1 - is_upd))) / (boot.counts @ (present * (1 - is_upd)))
            entry["mean_gain_updated_ci"], entry["mean_gain_skipped_ci"] = interval(mu), interval(ms)
            entry["gain_difference_ci"] = interval(mu - ms)
        out[name] = entry
    return out


def gain_by_chunk_index(records: list[dict], n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per chunk index c: mean per-chunk gain of fixed:UPDATE_1 over fixed:SKIP and over fixed:STATIC
    (nats/token) with 95% bootstrap intervals over the documents that have a chunk c. Does the
    carried state make later chunks gain more (memory the backbone's window lacks)?"""
    from ponder.stats import interval

    upd, skip, static = (_chunk_map(records, f"fixed:{a}") for a in ("UPDATE_1", "SKIP", "STATIC"))
    rng = np.random.default_rng(seed)
    out = []
    for c in sorted({k[1] for k in upd}):
        keys = [k for k in upd if k[1] == c and k in skip]
        row = {"chunk_idx": c, "n_docs": len(keys)}
        for name, ref in (("vs_skip", skip), ("vs_static", static)):
            g = np.array([ref[k] - upd[k] for k in keys if k in ref])
            if g.size:
                boots = g[rng.integers(0, g.size, (n_boot, g.size))].mean(1)
                row[name], row[f"{name}_ci"] = float(g.mean()), interval(boots)
        out.append(row)
    return out


def paired_differences(records: list[dict], boot=None) -> list[dict]:
    """Measured gate-vs-gate differences on the same chunks, paired bootstrap intervals.

    Two families: every gate that is not fixed vs the measured `random` gate (the trajectory-aware
    comparison: both carry their own state, unlike the fixed-run oracle and the expected random of
    `recovery vs random`), and every `paper:X` vs its leak-free twin `X` (what reading the scored
    tokens buys; `paper:fixed:SKIP` pairs with `fixed:STATIC`). Each row: `gate`, `reference`,
    `gain` = L_reference - L_gate (positive: the gate is better) and `gain_ci`.
    """
    from ponder.stats import Bootstrap, interval

    names = list(dict.fromkeys(_gate_of(r) for r in records))
    pairs = [(n, "random") for n in names
             if "random" in names and not n.startswith(("fixed:", "paper:")) and n != "random"]
    # the paper's SKIP is the trained layer without an update: its leak-free twin is fixed:STATIC
    twin = {n: "fixed:STATIC" if n == "paper:fixed:SKIP" else n[len("paper:"):] for n in names if n.startswith("paper:")}
    pairs += [(n, t) for n, t in twin.items() if t in names]
    if not pairs:
        return []
    boot = boot or Bootstrap([dict(r, gate=_gate_of(r)) for r in records])
    point = aggregate(records)
    return [{"gate": g, "reference": ref, "gain": point[ref]["loss"] - point[g]["loss"],
             "gain_ci": interval(boot.losses(ref) - boot.losses(g))} for g, ref in pairs]


def paired_differences_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["## Measured paired differences", "",
             "Gain = L_reference - L_gate on the same chunks (positive: the gate is better), 95% paired bootstrap. "
             "Against the measured random gate both runs carry their own state, so this comparison holds even "
             "where an update's effect persists into later chunks (which the fixed-run oracle and expected-random "
             "references above ignore); `paper:X` vs `X` is what reading the scored tokens buys.", "",
             "| gate | reference | gain [95% CI] |", "| --- | --- | ---: |"]
    lines += [f"| {r['gate']} | {r['reference']} | {fmt_ci(r['gain'], *r['gain_ci'], '+.4f')} |" for r in rows]
    return lines + [""]


# -- Markdown --------------------------------------------------------------------------------------
def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, spec)


def _pct(x) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _sections(stats: dict[str, dict]) -> list[tuple[str, list[str]]]:
    def order(n: str) -> tuple:
        return (0 if n.startswith("fixed:") else 1, ACTIONS.index(n[6:]) if n.startswith("fixed:") and n[6:] in ACTIONS else 0, n)

    names = sorted(stats, key=order)
    paper = [n for n in names if n.startswith("paper:")]
    names = [n for n in names if not n.startswith("paper:")]
    causal = [n for n in names if not stats[n]["lookahead"] and not stats[n]["uses_labels"]]
    look = [n for n in names if stats[n]["lookahead"] and not stats[n]["uses_labels"]]
    labels = [n for n in names if stats[n]["uses_labels"]]
    return [("Fixed modes and causal gates (decide chunk c from tokens before c only)", causal),
            ("Lookahead gates: read chunk c's own statistics before scoring chunk c (NOT causal, reported apart)", look),
            ("Upper bounds that read the labels (not deployable)", labels),
            ("Paper protocol (--protocol paper): UPDATE steps on chunk c, then re-forwards and scores chunk c, so "
             "it READS THE SCORED TOKENS (not causal); its SKIP is the layer without an update (our STATIC), and "
             "'gain vs STATIC' and recoveries use that SKIP. Compare with the leak-free tables above", paper)]


def picks_markdown(stats: dict[str, dict], corr: dict[str, dict]) -> list[str]:
    """The "does the gate pick the chunks that gain?" section: per gate the mean per-chunk advantage
    of the chunks it updated vs skipped (with intervals), and its recovery vs random measured and
    as implied by its picks alone, with a verdict on whether the two views agree."""
    rows = [(n, c) for n, c in corr.items() if n in stats]
    if not rows:
        return []
    lines = ["## Does the gate pick the chunks that gain?", "",
             "Per-chunk advantage g = loss of the gate's baseline (fixed:STATIC for gates that skip to STATIC, "
             "else fixed:SKIP) - loss under fixed:UPDATE_k, on the same chunk. 'from picks' scores the gate's "
             "choice of chunks with those fixed-run losses; 'measured' is the gate's own run, whose carried "
             "state follows its own choices. Means are per chunk; 95% paired bootstrap intervals.", "",
             "| gate | baseline | corr(signal, g) | mean g, updated | mean g, not updated | difference | "
             "recovery vs random, measured | from picks | agree? |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]

    def ci(c, key):
        return fmt_ci(c.get(key), *(c.get(f"{key}_ci") or (None, None)), "+.4f")

    def pct(s, key):
        v, (lo, hi) = s.get(key), (s.get(f"{key}_ci") or (None, None))
        if v is None or not math.isfinite(v):
            return "—"
        ok = lo is not None and math.isfinite(lo) and math.isfinite(hi)
        return f"{100 * v:.0f}%" + (f" [{100 * lo:.0f}, {100 * hi:.0f}]" if ok else "")

    for n, c in rows:
        s = stats[n]
        lines.append(f"| {n} | {c.get('baseline', '—')} | {_fmt(c['signal_gain_corr'], '+.3f')} | "
                     f"{ci(c, 'mean_gain_updated')} | {ci(c, 'mean_gain_skipped')} | {ci(c, 'gain_difference')} | "
                     f"{pct(s, 'recovery_vs_random')} | {pct(s, 'picks_recovery_vs_random')} | {_agreement(s, c)} |")
    lines += ["", "Both views say the same when the gate's updated chunks gain more than its other chunks "
              "(difference > 0) exactly when its measured loss beats the random gate at its rate (recovery vs "
              "random > 0). Where they disagree, the 'from picks' column isolates the choice of chunks: the "
              "rest is the carried state of the gate's own trajectory (which the fixed runs do not share), "
              "or noise when the intervals include 0.", ""]
    return lines


def _agreement(s: dict, c: dict) -> str:
    """'yes' / 'no (...)' / '—': do the sign of the picks' difference of means and of the measured
    recovery vs random agree; when not, the reason read from the numbers."""
    diff, meas, picks = c.get("gain_difference"), s.get("recovery_vs_random"), s.get("picks_recovery_vs_random")
    if any(v is None or not math.isfinite(v) for v in (diff, meas)):
        return "—"
    if (diff > 0) == (meas > 0):
        return "yes"
    lo, hi = c.get("gain_difference_ci") or (float("nan"), float("nan"))
    if math.isfinite(lo) and lo <= 0 <= hi:
        return "no: neither is resolved (the difference's interval includes 0)"
    if picks is not None and math.isfinite(picks) and (picks > 0) == (diff > 0):
        return "no: its picks agree; its own carried state moves the measured loss"
    return "no"


def results_markdown(stats: dict[str, dict], summary: dict, corr: dict[str, dict] | None = None,
                     records: list[dict] | None = None) -> str:
    """The results.md text: one table per section, the causal-vs-lookahead difference, definitions."""
    lines = [f"# PonderTTT results: {summary.get('run', '')}".rstrip(), ""]
    meta = [(k, summary.get(k)) for k in ("base", "ttt_layer", "target_rate") if summary.get(k) is not None]
    data = summary.get("data") or {}
    if meta or data:
        lines.append(" · ".join([f"{k}: `{v}`" for k, v in meta] + [f"{k}: {v}" for k, v in data.items()]))
        lines.append("")
    lines += _gate_tables_markdown(stats)
    lines += _lookahead_markdown(stats)
    if corr:
        lines += picks_markdown(stats, corr)
    lines += _chunk_index_markdown(records)
    lines += paired_differences_markdown(summary.get("paired_differences") or [])
    lines += _DEFINITIONS_MARKDOWN
    return "\n".join(lines)


def _pct_ci(s: dict, key: str) -> str:
    """`s[key]` as a percentage with its `<key>_ci` interval ("—" when not finite)."""
    v = s.get(key)
    lo, hi = s.get(f"{key}_ci") or (None, None)
    if v is None or not math.isfinite(v):
        return "—"
    ok = lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
    return f"{100 * v:.1f}%" + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if ok else "")


def _gate_tables_markdown(stats: dict[str, dict]) -> list[str]:
    """One table of every gate's numbers per section, then the bootstrap's description."""
    header = ("| gate / mode | loss (nats/tok) [95% CI] | gain vs SKIP | gain vs STATIC | FLOPs vs SKIP | "
              "wall vs SKIP | update rate | L_oracle at rate | oracle recovery | recovery vs random |")
    sep = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"

    def ci(s, key, spec=".4f"):
        lo, hi = s.get(f"{key}_ci") or (None, None)
        return fmt_ci(s.get(key), lo, hi, spec)

    lines = []
    for title, names in _sections(stats):
        if not names:
            continue
        lines += [f"## {title}", "", header, sep]
        for n in names:
            s = stats[n]
            label = f"{n} (lookahead)" if s["lookahead"] else n
            lines.append(
                f"| {label} | {ci(s, 'loss')} | {ci(s, 'gain_vs_skip', '+.4f')} | {ci(s, 'gain_vs_static', '+.4f')} | "
                f"{_fmt(s['cost'], '.3f')} | {_fmt(s.get('wall_vs_skip'), '.2f')} | {_fmt(s['update_rate'], '.2f')} | "
                f"{_fmt(s.get('oracle_loss'), '.4f')} | {_pct_ci(s, 'oracle_recovery')} | "
                f"{_pct_ci(s, 'recovery_vs_random')} |")
        lines.append("")
    boot = next((s.get("bootstrap") for s in stats.values() if s.get("bootstrap")), None)
    if boot:
        lines += [f"Intervals: 95% paired bootstrap over {boot['n_docs']} held-out documents and the chunks within "
                  f"them ({boot['n_chunks']} chunks, {boot['n_boot']} replicates); every gate is scored on the same "
                  "resampled chunks.", ""]
    return lines


def _lookahead_markdown(stats: dict[str, dict]) -> list[str]:
    """Each causal gate beside its lookahead twin (none when no gate has one)."""
    pairs = [(n, n.replace("-lookahead", "")) for n in stats if "-lookahead" in n and n.replace("-lookahead", "") in stats]
    if not pairs:
        return []
    lines = ["## Causal vs lookahead", "",
             "| causal gate | lookahead twin | loss (causal) | loss (lookahead) | Δ loss | OR (causal) | OR (lookahead) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for look, causal in pairs:
        a, b = stats[causal], stats[look]
        lines.append(f"| {causal} | {look} | {a['loss']:.4f} | {b['loss']:.4f} | {b['loss'] - a['loss']:+.4f} | "
                     f"{_pct(a.get('oracle_recovery'))} | {_pct(b.get('oracle_recovery'))} |")
    lines += ["", "The lookahead twin reads chunk c's own reconstruction loss before chunk c is scored, so "
              "tokens late in chunk c influence how its early tokens are predicted; the causal gate uses "
              "chunk c-1's. The difference above is the price of causality.", ""]
    return lines


def _chunk_index_markdown(records: list[dict] | None) -> list[str]:
    """UPDATE_1's gain by chunk index (none without records)."""
    by_idx = gain_by_chunk_index(records) if records else []
    if not by_idx:
        return []
    lines = ["## Gain of UPDATE_1 by chunk index (does the carried state add memory?)", "",
             "| chunk index | documents | gain vs SKIP [95% CI] | gain vs STATIC [95% CI] |", "| ---: | ---: | ---: | ---: |"]
    for r in by_idx:
        lines.append(f"| {r['chunk_idx']} | {r['n_docs']} | {fmt_ci(r.get('vs_skip'), *(r.get('vs_skip_ci') or (None, None)), '+.4f')} | "
                     f"{fmt_ci(r.get('vs_static'), *(r.get('vs_static_ci') or (None, None)), '+.4f')} |")
    lines.append("")
    return lines


# the Definitions section of results.md
_DEFINITIONS_MARKDOWN = [
    "## Definitions", "",
    "* loss: token-weighted mean next-token cross-entropy on the held-out chunks; ppl = exp(loss).",
    "* SKIP: the backbone alone. STATIC: the trained adaptive layer with its inner updates off (the "
    "paper's SKIP corresponds to this). gain vs X = L_X - L_gate (positive: better than X); gain vs "
    "STATIC is what test-time training adds beyond a trained adapter.",
    "* FLOPs vs SKIP: counted matmul FLOPs (torch.utils.flop_counter) of everything that ran for the "
    "gate's chunks (backbone, adaptive layer, LM head, and the UPDATE_1 layer pass a reconstruction-"
    "reading gate needs for its signal on chunks it does not UPDATE_1) over the backbone's FLOPs on the "
    "same chunks. wall vs SKIP: measured seconds per chunk / those of fixed:SKIP (includes that pass).",
    "* update rate u: fraction of chunks run with an UPDATE_k (SKIP and STATIC take no inner step).",
    "* L_oracle at rate: the oracle at the gate's EXACT update count (no interpolation): UPDATE the "
    "n_u chunks with the largest per-chunk advantage (loss of the gate's baseline B - loss under "
    "fixed:UPDATE_k; labels), each scored with its fixed-run loss (the paper's greedy top-u oracle).",
    "* baseline B of a gate: fixed:STATIC when every chunk it did not update ran STATIC (the adaptive "
    "gates' default: they choose between the trained layer without and with an inner update), else "
    "fixed:SKIP (gates built with skip_action='SKIP', named '<gate>/SKIP').",
    "* oracle recovery = (L_B - L_gate) / (L_B - L_oracle(u)); recovery vs random = "
    "(L_random(u) - L_gate) / (L_random(u) - L_oracle(u)), L_random(u) = the expected loss of updating "
    "n_u chunks uniformly at random (0% = no better than random, 100% = the oracle); — when the oracle "
    "gains nothing or u is 0 or 1.", ""
]


# -- plots -----------------------------------------------------------------------------------------
def _style(name: str, s: dict) -> dict:
    if s["uses_labels"]:
        return {"marker": "*", "color": "0.45", "s": 140}
    if s["lookahead"]:
        return {"marker": "D", "facecolors": "none", "edgecolors": "tab:red", "s": 70, "linewidths": 1.6}
    if name.startswith("fixed:"):
        return {"marker": "o", "color": "tab:blue", "s": 50}
    return {"marker": "s", "color": "tab:green", "s": 60}


def plot_pareto(stats: dict[str, dict], path: Path) -> None:
    """Loss vs theoretical cost (left) and vs measured wall-clock relative to SKIP (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_wall = all(s.get("wall_vs_skip") is not None and math.isfinite(s["wall_vs_skip"]) for s in stats.values())
    axes_keys = [("cost", "avg FLOPs multiplier per chunk (SKIP = 1)")]
    if has_wall:
        axes_keys.append(("wall_vs_skip", "measured wall-clock per chunk / SKIP"))
    fig, axes = plt.subplots(1, len(axes_keys) + 1, figsize=(6.4 * (len(axes_keys) + 1), 4.8), squeeze=False)
    for ax, (key, xlabel) in zip(axes[0], axes_keys):
        fixed = [f"fixed:{a}" for a in ACTIONS if f"fixed:{a}" in stats]
        if len(fixed) > 1:
            ax.plot([stats[n][key] for n in fixed], [stats[n]["loss"] for n in fixed], "-", color="tab:blue",
                    alpha=0.5, lw=1, label="fixed modes")
        if key == "cost":
            curve = oracle_curve(stats, "UPDATE_1")
            if len(curve) > 1 and any(n.startswith("budgeted-oracle") for n in stats):
                ax.plot([1 + 2 * u for u, _ in curve], [lo for _, lo in curve], "--", color="0.45", lw=1,
                        label="budgeted oracle (labels), interpolated")
        xs = [s[key] for s in stats.values()]
        ys = [s["loss"] for s in stats.values()]
        dx = (max(xs) - min(xs)) or 1.0
        dy = (max(ys) - min(ys)) or 1.0
        placed: list[tuple[float, float]] = []
        for name, s in stats.items():
            label = f"{name} (lookahead)" if s["lookahead"] and not s["uses_labels"] else name
            ax.scatter([s[key]], [s["loss"]], zorder=3, **_style(name, s))
            lo, hi = s.get("loss_ci") or (float("nan"), float("nan"))
            if math.isfinite(lo) and math.isfinite(hi):  # 95% bootstrap interval of the loss
                ax.errorbar([s[key]], [s["loss"]], yerr=[[s["loss"] - lo], [hi - s["loss"]]], fmt="none",
                            ecolor="0.6", elinewidth=0.8, capsize=2, zorder=2)
            # stack the labels of (nearly) coinciding points instead of printing them on top of each other
            near = sum(abs(s[key] - px) < 0.03 * dx and abs(s["loss"] - py) < 0.03 * dy for px, py in placed)
            placed.append((s[key], s["loss"]))
            ax.annotate(label, (s[key], s["loss"]), textcoords="offset points", xytext=(6, 4 - 11 * near), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="o", color="tab:blue", ls="", label="fixed mode"),
        plt.Line2D([], [], marker="s", color="tab:green", ls="", label="causal gate"),
        plt.Line2D([], [], marker="D", color="tab:red", mfc="none", ls="", label="lookahead gate (not causal)"),
        plt.Line2D([], [], marker="*", color="0.45", ls="", ms=12, label="oracle (uses labels)"),
    ]
    axes[0][0].legend(handles=handles + axes[0][0].get_legend_handles_labels()[0], fontsize=8, loc="best")
    _plot_gain_intervals(stats, axes[0][-1])
    fig.suptitle("Loss vs compute: every mode and gate (lower left is better); bars: 95% paired bootstrap intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_gain_intervals(stats: dict[str, dict], ax) -> None:
    """Forest plot: each mode's and gate's gain over STATIC (over SKIP when STATIC did not run) with
    its 95% paired bootstrap interval. Paired intervals are much narrower than the loss intervals,
    which mostly reflect which documents were held out."""
    key = "gain_vs_static" if any(s.get("gain_vs_static") is not None for s in stats.values()) else "gain_vs_skip"
    names = [n for n in stats if stats[n].get(key) is not None and math.isfinite(stats[n][key])]
    for row, name in enumerate(names):
        s = stats[name]
        lo, hi = s.get(f"{key}_ci") or (float("nan"), float("nan"))
        style = _style(name, s)
        color = style.get("color", style.get("edgecolors", "k"))
        if math.isfinite(lo) and math.isfinite(hi):
            ax.plot([lo, hi], [row, row], color=color, lw=2, alpha=0.7)
        ax.scatter([s[key]], [row], zorder=3, **style)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{key.replace('_', ' ')} (nats/token), 95% paired bootstrap interval")
    ax.grid(axis="x", alpha=0.3)


def plot_gains(records: list[dict], stats: dict[str, dict], path: Path, corr: dict[str, dict] | None = None) -> bool:
    """Per-chunk advantages of UPDATE_1 over STATIC (over SKIP when STATIC did not run): their
    histogram (top) and, per gate, which chunks it updated (filled) or not (hollow) along the same
    axis, with the mean advantage of its updated (black) and other (grey) chunks and their 95%
    bootstrap intervals from `corr` (`signal_correlations`) (bottom)."""
    base = "STATIC" if any(_gate_of(r) == "fixed:STATIC" for r in records) else "SKIP"
    gains = per_chunk_gains(records, "UPDATE_1", base=base)
    if not gains:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(gains.values())
    gates = [n for n in stats if not n.startswith(("fixed:", "paper:")) and update_action_of(n) == "UPDATE_1"
             and baseline_of(records, n) == f"fixed:{base}"]
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(7.6, 2.6 + 0.45 * max(len(gates), 2) + 2.4), sharex=True,
                                   gridspec_kw={"height_ratios": [2.4, 0.45 * max(len(gates), 2) + 0.6]})
    ax0.hist(values, bins=20, color="0.7")
    ax0.axvline(0.0, color="k", lw=0.8)
    ax0.set_ylabel("chunks")
    ax0.set_title(f"Per-chunk advantage of UPDATE_1 over {base} (all {len(values)} held-out chunks, fixed runs)",
                  fontsize=10)
    for row, name in enumerate(gates):
        upd, skp = [], []
        for r in records:
            key = (r["doc_id"], int(r["chunk_idx"]))
            if _gate_of(r) == name and key in gains:
                (upd if is_update(r["action"]) else skp).append(gains[key])
        color = "0.45" if stats[name]["uses_labels"] else ("tab:red" if stats[name]["lookahead"] else "tab:green")
        # a small deterministic vertical jitter keeps chunks with equal gains apart
        jit = [0.28 * (((i * 7919) % 13) / 12 - 0.5) for i in range(len(skp) + len(upd))]
        ax1.scatter(skp, [row + j for j in jit[:len(skp)]], marker="o", facecolors="none", edgecolors=color,
                    alpha=0.6, s=28)
        ax1.scatter(upd, [row + j for j in jit[len(skp):]], marker="o", color=color, alpha=0.8, s=28)
        c = (corr or {}).get(name, {})
        for key, shade, dy in (("mean_gain_updated", "k", -0.3), ("mean_gain_skipped", "0.5", 0.3)):
            m = c.get(key)
            if m is None or not math.isfinite(m):
                continue
            ax1.plot([m, m], [row + dy - 0.12, row + dy + 0.12], color=shade, lw=1.8)
            lo, hi = c.get(f"{key}_ci") or (float("nan"), float("nan"))
            if math.isfinite(lo) and math.isfinite(hi):
                ax1.plot([lo, hi], [row + dy, row + dy], color=shade, lw=1.2)
    ax1.set_yticks(range(len(gates)))
    ax1.set_yticklabels([f"{n} (lookahead)" if stats[n]["lookahead"] and not stats[n]["uses_labels"] else n
                         for n in gates], fontsize=8)
    ax1.set_ylim(-0.6, max(len(gates), 1) - 0.4)
    ax1.invert_yaxis()
    ax1.axvline(0.0, color="k", lw=0.8)
    ax1.set_xlabel("advantage (nats/token). Dots: filled = updated, hollow = not. Bars: mean and 95% interval "
                   "(black: updated chunks, grey: the others)")
    ax1.xaxis.label.set_size(8)
    ax1.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- entry point -----------------------------------------------------------------------------------
def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_report(run_dir: str | Path, records: list[dict], summary: dict) -> None:
    """Write `summary.json`, `results.md`, `pareto.png` and `gains.png` (when fixed SKIP/UPDATE_1 ran).

    Args:
        run_dir: output folder (created).
        records: one dict per (gate, chunk): `ChunkRecord` fields plus `gate` (the gate's name),
            optionally `lookahead`, `uses_labels`, `skip_loss`.
        summary: the runner's summary; its `gates` entries are completed (never overwritten) with
            the statistics computed here from `records`, including `oracle_recovery`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not records:
        raise ValueError("write_report got no records: evaluate at least one gate or mode first")
    stats = aggregate(records)
    for name, given in (summary.get("gates") or {}).items():
        if name in stats:
            for k in ("lookahead", "uses_labels"):
                if k in given:
                    stats[name][k] = bool(given[k])
            if given.get("wall_vs_skip") is not None:
                stats[name]["wall_vs_skip"] = given["wall_vs_skip"]
    boot = add_oracle_recovery(stats, records)
    corr = signal_correlations(records, stats, boot)
    out = dict(summary)
    gates = {k: dict(v) for k, v in (summary.get("gates") or {}).items()}
    for name, s in stats.items():
        entry = gates.setdefault(name, {})
        for k, v in s.items():
            entry.setdefault(k, v)
        entry["oracle_recovery"], entry["oracle_loss"] = s["oracle_recovery"], s["oracle_loss"]
        entry["oracle_ref"] = s.get("oracle_ref")
        if name in corr:
            entry["signal"] = corr[name]
    out["gates"] = gates
    out["report"] = {"oracle_recovery": "(L_B - L_gate) / (L_B - L_oracle(u_gate)), B = the gate's baseline (STATIC or SKIP), oracle at its exact update count; see results.md",
                     "files": ["summary.json", "results.md", "pareto.png", "gains.png"]}
    out["gain_by_chunk_index"] = gain_by_chunk_index(records)
    out["paired_differences"] = paired_differences(records, boot)
    atomic_write_text(run_dir / "results.md", results_markdown(stats, out, corr, records))
    plot_pareto(stats, run_dir / "pareto.png")
    if not plot_gains(records, stats, run_dir / "gains.png", corr):
        out["report"]["files"].remove("gains.png")
    atomic_write_text(run_dir / "summary.json", json.dumps(_jsonable(out), indent=1))
