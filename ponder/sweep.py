"""Training-side sweep for choosing the presets: train the adaptive layer with several settings on
the same cached data and compare them on the VALIDATION documents only (carved from the training
files; the held-out test documents are never used), with the CPU seconds each setting used.

    python scripts/sweep_ponder.py --preset default --grid "lr=3e-4,1e-3,3e-3" --grid "batch_chunks=1,4"

Every option of `run_ponder.py` sets the shared data and model; each `--grid KEY=V1,V2` multiplies
the settings (keys: lr, batch_chunks, steps, eval_every, patience, weight_decay). One line per
setting goes to `<out>/sweep_<preset>.jsonl` and a table is printed: best validation loss and its
gain over the backbone (SKIP) on the validation tokens, the selected step, chunks seen, CPU seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

GRID_KEYS = {"lr": float, "batch_chunks": int, "steps": int, "eval_every": int, "patience": int,
             "weight_decay": float}


def parse_grid(items: list[str] | None) -> list[dict]:
    """["lr=1e-3,3e-3", "batch_chunks=1,4"] -> the product as a list of dicts (one empty dict without items)."""
    axes = []
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in GRID_KEYS or not values.strip():
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... with KEY one of {sorted(GRID_KEYS)}")
        try:
            axes.append([(key, GRID_KEYS[key](v)) for v in values.split(",") if v.strip()])
        except ValueError as err:
            raise ValueError(f"--grid {item!r}: {err}") from err
    return [dict(combo) for combo in itertools.product(*axes)]


def sweep(args: argparse.Namespace, grid: list[dict]) -> list[dict]:
    """Train one adaptive layer per grid point (no checkpoints), select on validation; one dict each."""
    from ponder.adaptive import AdaptiveConfig, AdaptiveLM
    from ponder.backbone import default_cache_dir, load_backbone
    from ponder.cache import build_cache, select_documents
    from ponder.runner import _cpu_s, _validate, resolve_preset, split_texts
    from ponder.train import TrainConfig, train
    from ponder.types import INNER_STEPS
    from ttt_common.train_utils import pin_malloc_mmap_threshold

    resolve_preset(args)
    _validate(args)
    if not args.max_val_docs:
        raise ValueError("a sweep compares settings on validation documents: --max-val-docs must be >= 1")
    pin_malloc_mmap_threshold()  # as in run_experiment: caching must not fragment the heap
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    backbone = load_backbone(args.base, cache_dir)
    train_texts, val_texts, _, _ = split_texts(args.dataset, args.text_field)  # the held-out texts stay unused
    docs = {}
    for split, texts, n in (("train", train_texts, args.max_train_docs), ("val", val_texts, args.max_val_docs)):
        sel = select_documents(texts, backbone.tokenizer, n, args.chunk_size, min_chunks=args.min_doc_chunks,
                               max_chunks=args.max_chunks_per_doc, seed=args.seed, prefix=split)
        docs[split] = build_cache(backbone, sel, args.chunk_size, cache_dir, desc=split, progress=not args.no_progress)
    n_train = sum(len(d.chunks) for d in docs["train"])
    acfg = AdaptiveConfig(hidden_size=backbone.hidden_size, layer=args.ttt_layer, num_heads=args.num_heads,
                          mini_batch_size=args.mini_batch_size, ttt_base_lr=args.ttt_base_lr,
                          simple_inner_lr=args.simple_inner_lr)
    out_path = Path(args.out) / f"sweep_{args.preset}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for point in grid:
        opts = {k: getattr(args, k) for k in GRID_KEYS} | point
        tcfg = TrainConfig(steps=opts["steps"], lr=opts["lr"], weight_decay=opts["weight_decay"],
                           batch_chunks=opts["batch_chunks"], eval_every=opts["eval_every"] or opts["steps"],
                           patience=opts["patience"], inner_steps=INNER_STEPS[args.train_mode],
                           aux_recon_weight=args.aux_recon_weight, seed=args.seed)
        torch.manual_seed(args.seed)
        model = AdaptiveLM(acfg, backbone.embedding)
        t0, c0 = time.perf_counter(), _cpu_s()
        res = train(model, docs["train"], tcfg, None, progress=not args.no_progress, val_docs=docs["val"])
        val_skip = res["curve"][-1]["val_skip_loss"]
        row = {**opts, "chunk_size": args.chunk_size, "train_chunks": n_train,
               "val_chunks": sum(len(d.chunks) for d in docs["val"]), "best_val_loss": res["best_val_loss"],
               "val_skip_loss": val_skip, "val_gain": val_skip - res["best_val_loss"], "selected_step": res["best_step"],
               "steps_run": res["step"], "chunks_seen": res["step"] * tcfg.batch_chunks,
               "stopped_early": res["stopped_early"], "wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0,
               "curve": res["curve"]}
        rows.append(row)
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[sweep] {point}: validation {row['best_val_loss']:.4f} vs SKIP {val_skip:.4f} (gain "
              f"{row['val_gain']:+.4f}) at step {row['selected_step']} of {row['steps_run']}, "
              f"{row['cpu_s']:.0f} CPU-s", flush=True)
    print(sweep_table(rows))
    return rows


def sweep_table(rows: list[dict]) -> str:
    lines = ["| lr | batch | steps run | selected step | chunks seen | val loss | val SKIP | val gain | CPU-s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['lr']:g} | {r['batch_chunks']} | {r['steps_run']} | {r['selected_step']} | "
                     f"{r['chunks_seen']} | {r['best_val_loss']:.4f} | {r['val_skip_loss']:.4f} | "
                     f"{r['val_gain']:+.4f} | {r['cpu_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ttt_common.cli import run_cli

    def _main(argv):
        from ponder.runner import add_arguments

        parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
        parser.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="a swept option (repeatable)")
        args = parser.parse_args(argv)
        grid = parse_grid(args.grid)
        del args.grid
        sweep(args, grid)
        return 0

    return run_cli(_main, argv)
