"""Compare the three adaptive layers of PonderTTT side by side on the same cached data.

The layers: `official-linear` and `official-mlp` (the official TTT-Linear / TTT-MLP of
test-time-training/ttt-lm-jax, through `official_port`) and `ponder-simple` (PonderTTT's own simpler
layer, deveworld/ponderTTT @ 350afb5). Each is trained and evaluated by `ponder.runner.run_experiment`
with identical options (same base model, documents, chunking, training steps and gates; the backbone
cache is shared), then one table and one plot compare them.

Usage:

    python scripts/compare_ponder.py                      # the default experiment, all three layers
    python scripts/compare_ponder.py --steps 100 --target-rate 0.25 --tag r25
    python scripts/compare_ponder.py --layers official-linear,ponder-simple

Writes `results/compare_<tag>/`: one run folder per layer (chunks.jsonl, summary.json, results.md,
plots), `compare.md`, `compare.json` and `compare.png`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

from ponder.runner import add_arguments, identity_hash, resolve_preset, run_experiment, run_identity
from ponder.stats import fmt_ci
from ponder.types import ACTIONS

DEFAULT_LAYERS = ("official-linear", "official-mlp", "ponder-simple")
# gates shown in the comparison table (when the runs evaluated them), in this order
TABLE_GATES = ("recon", "ppo", "random", "recon-lookahead", "budgeted-oracle", "oracle")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    g = parser.add_argument_group("comparison")
    g.add_argument("--layers", default=",".join(DEFAULT_LAYERS),
                   help=f"comma-separated adaptive layers to compare (default: {','.join(DEFAULT_LAYERS)})")
    g.add_argument("--tag", default=None, help="suffix of the output folder results/compare_<tag> "
                   "(default: <base>-c<chunk size>-s<steps>-r<target rate>)")
    args = parser.parse_args(argv)
    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    bad = [s for s in layers if s not in DEFAULT_LAYERS]
    if bad or not layers:
        parser.error(f"--layers {args.layers!r}: each must be one of {DEFAULT_LAYERS}")
    args.layers = layers
    resolve_preset(args)  # the preset's chunking and steps name the output folder
    if args.run_name is not None:
        parser.error("--run-name is set per layer by this script; use --tag to name the comparison")
    return args


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, spec)


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}%"


def _ci(d: dict, key: str, spec: str = ".4f", scale: float = 1.0) -> str:
    """`d[key] [lo, hi]` from a gate's summary entry (its `<key>_ci`), times `scale`."""
    v, (lo, hi) = d.get(key), (d.get(f"{key}_ci") or (None, None))
    return fmt_ci(*(None if x is None else scale * x for x in (v, lo, hi)), spec)


def comparison_markdown(runs: dict[str, dict], tag: str) -> str:
    """One table: per layer the fixed modes' losses, and per gate loss / update rate / oracle recovery."""
    first = next(iter(runs.values()))
    lines = [f"# Adaptive layers compared: {tag}", "",
             f"base `{first.get('base')}`, target update rate {first.get('target_rate')}, data: "
             + ", ".join(f"{k} {v}" for k, v in (first.get("data") or {}).items()), "",
             "## Fixed modes (held-out loss, nats/token; wall-clock per chunk relative to SKIP in brackets)", "",
             "| layer | " + " | ".join(ACTIONS) + " | training (s) |",
             "| --- | " + " | ".join("---:" for _ in ACTIONS) + " | ---: |"]
    head = ["## Headline (95% paired bootstrap intervals over held-out documents and chunks, per layer)", "",
            "| layer | SKIP | STATIC | UPDATE_1 | UPDATE_1 gain vs SKIP | UPDATE_1 gain vs STATIC | "
            "recon oracle recovery (%) | recon recovery vs random (%) | UPDATE_1 wall vs SKIP |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for layer, s in runs.items():
        g = s["gates"]
        skip, static, upd, recon = (g.get(k) or {} for k in ("fixed:SKIP", "fixed:STATIC", "fixed:UPDATE_1", "recon"))
        head.append(f"| {layer} | {_ci(skip, 'loss')} | {_ci(static, 'loss')} | {_ci(upd, 'loss')} | "
                    f"{_ci(upd, 'gain_vs_skip', '+.4f')} | {_ci(upd, 'gain_vs_static', '+.4f')} | "
                    f"{_ci(recon, 'oracle_recovery', '.1f', 100.0)} | {_ci(recon, 'recovery_vs_random', '.1f', 100.0)} | "
                    f"{_fmt(upd.get('wall_vs_skip'), '.2f')} |")
    lines[4:4] = head + [""]
    for layer, s in runs.items():
        cells = []
        for a in ACTIONS:
            g = s["gates"].get(f"fixed:{a}") or {}
            cells.append(f"{_fmt(g.get('loss'), '.4f')} ({_fmt(g.get('wall_vs_skip'), '.2f')}x)" if g else "—")
        lines.append(f"| {layer} | " + " | ".join(cells) + f" | {_fmt((s.get('training') or {}).get('seconds'), '.0f')} |")
    gates = [g for g in TABLE_GATES if any(g in s["gates"] for s in runs.values())]
    if gates:
        lines += ["", "## Gates (loss / update rate / avg cost / oracle recovery at equal update rate)", "",
                  "| layer | " + " | ".join(f"{g} (lookahead)" if g.endswith("lookahead") else g for g in gates) + " |",
                  "| --- | " + " | ".join("---" for _ in gates) + " |"]
        for layer, s in runs.items():
            cells = []
            for name in gates:
                g = s["gates"].get(name)
                cells.append("—" if not g else f"{g['loss']:.4f} / u {g['update_rate']:.2f} / {g['cost']:.2f}x / "
                             f"OR {_pct(g.get('oracle_recovery'))}")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", "Oracle recovery = (L_SKIP - L_gate) / (L_SKIP - L_budgeted-oracle at the gate's update rate); "
              "lookahead gates read chunk c's own statistics before scoring it (not causal); oracles read labels. "
              "Per-layer details: `<layer>/results.md`.", ""]
    return "\n".join(lines)


def plot_comparison(runs: dict[str, dict], path: Path) -> None:
    """Loss vs avg cost per layer: fixed modes as a line, gates as markers (lookahead hollow, oracles stars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 5.2))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for (layer, s), color in zip(runs.items(), colors):
        fixed = [s["gates"][f"fixed:{a}"] for a in ACTIONS if f"fixed:{a}" in s["gates"]]
        ax.plot([g["cost"] for g in fixed], [g["loss"] for g in fixed], "-o", color=color, ms=5, label=f"{layer}: fixed modes")
        for name in TABLE_GATES:
            g = s["gates"].get(name)
            if not g:
                continue
            if g.get("uses_labels") or "oracle" in name:
                style = {"marker": "*", "s": 110, "color": color, "alpha": 0.6}
            elif g.get("lookahead") or name.endswith("lookahead"):
                style = {"marker": "D", "s": 50, "facecolors": "none", "edgecolors": color}
            else:
                style = {"marker": "s", "s": 50, "color": color}
            ax.scatter([g["cost"]], [g["loss"]], zorder=3, **style)
            ax.annotate(name, (g["cost"], g["loss"]), textcoords="offset points", xytext=(5, 3), fontsize=7, color=color)
    ax.set_xlabel("avg FLOPs multiplier per chunk (SKIP = 1)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title("Adaptive layers: loss vs compute (squares: causal gates, hollow: lookahead, stars: oracles)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_summary(run_dir: Path, returned: dict) -> dict:
    # the report's summary.json carries oracle recovery; the runner's returned dict may not
    path = run_dir / "summary.json"
    if path.exists():
        return json.loads(path.read_text())
    return returned


def compare(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    opts = copy.copy(args)
    del opts.layers, opts.tag
    opts.ttt_layer = ",".join(args.layers)  # every option but the layer is shared: hash them all
    tag = args.tag or (f"{Path(args.base).name}-c{args.chunk_size}-s{args.steps}-r{args.target_rate:g}-"
                       f"{identity_hash(run_identity(opts))}")
    out_dir = Path(args.out) / f"compare_{tag}"
    runs: dict[str, dict] = {}
    for layer in args.layers:
        run_args = copy.copy(args)
        run_args.ttt_layer, run_args.out, run_args.run_name = layer, str(out_dir), layer
        del run_args.layers, run_args.tag
        print(f"[compare] ---- {layer} ----", flush=True)
        returned = run_experiment(run_args)
        runs[layer] = _load_summary(out_dir / layer, returned)
    md = comparison_markdown(runs, tag)
    (out_dir / "compare.md").write_text(md)
    (out_dir / "compare.json").write_text(json.dumps(
        {layer: {"gates": s["gates"], "training": s.get("training"), "base": s.get("base")} for layer, s in runs.items()},
        indent=1, default=str))
    plot_comparison(runs, out_dir / "compare.png")
    print(md, flush=True)
    print(f"[compare] wrote {out_dir}/compare.md, compare.json, compare.png", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    """`python scripts/compare_ponder.py` / `ttt-compare-ponder` (errors: `ttt_common.cli.run_cli`)."""
    from ttt_common.cli import run_cli

    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    compare(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
