"""The PonderTTT experiment: cache the backbone, train the adaptive layer, evaluate modes and gates.

Reproduces the experiment of PonderTTT (deveworld/ponderTTT: fixed SKIP / UPDATE_k baselines of
`experiments/train_baseline.py` @ 350afb5, and the gating comparison of its later paper "When to
Ponder") in PyTorch on a frozen offline base model and the embedded standard-library code corpus:

1. resolve and load the frozen base (`ponder.backbone`), pick train / held-out documents (by
   file), chunk them, cache the backbone's hidden states and SKIP statistics (`ponder.cache`);
2. train the adaptive layer's slow weights on the train split with UPDATE_k (`ponder.train`), or
   reuse the finished checkpoint of the run folder when its configuration matches;
3. evaluate on the held-out documents the requested mode, every fixed mode and the gates
   (`ponder.gates`), chunk by chunk through `ponder.env.PonderEnv`;
4. write `results/<run>/`: `chunks.jsonl` (one record per chunk and gate), `summary.json`,
   `results.md`, PNG plots (`ponder.report`).

Evaluation protocol per gate: `fit` on the TRAIN documents, `prepare` on the eval documents (the
budgeted oracle only), then per eval document `reset` and per chunk: context (+ `budget_left`; +
`current` only for lookahead gates; + `oracle_losses` only for label-using gates) -> `decide` ->
`env.step` -> `observe`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ponder.types import ACTIONS, ALL_ACTIONS, INNER_STEPS, is_update

if TYPE_CHECKING:
    from ponder.env import PonderEnv
    from ponder.gates import Gate

DEFAULT_COMPARE = ("random", "recon", "recon-lookahead", "oracle", "budgeted-oracle", "ppo")
MODES = (*ALL_ACTIONS, "ADAPTIVE")
# what `--protocol paper` evaluates: the fixed modes, the paper's gate (its own chunk's recon loss),
# random, and the oracle at the target rate
PAPER_SPECS = ("fixed:SKIP", "fixed:UPDATE_1", "fixed:UPDATE_2", "fixed:UPDATE_4", "random", "recon-lookahead",
               "budgeted-oracle")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The experiment's command-line options (shared by scripts/run_ponder.py and scripts/compare_ponder.py)."""
    from ponder.adaptive import LAYER_KINDS

    g = parser.add_argument_group("model")
    g.add_argument("--base", default="auto", help="'auto' (GPT-2 if loadable, else SmolLM2-135M offline), a hub id or a folder")
    g.add_argument("--ttt-layer", default="official-linear", choices=LAYER_KINDS)
    g.add_argument("--mini-batch-size", type=int, default=16, help="TTT inner mini-batch size")
    g.add_argument("--num-heads", type=int, default=0, help="TTT heads (0: hidden // 64)")
    g.add_argument("--ttt-base-lr", type=float, default=1.0, help="official layers' base inner learning rate")
    g.add_argument("--simple-inner-lr", type=float, default=1e-2, help="ponder-simple's inner learning rate")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="HF dataset id or local files (default: the stdlib code corpus)")
    g.add_argument("--text-field", default="text")
    g.add_argument("--chunk-size", type=int, default=512)
    g.add_argument("--max-train-docs", type=int, default=8)
    g.add_argument("--max-eval-docs", type=int, default=6)
    g.add_argument("--max-chunks-per-doc", type=int, default=4)
    g.add_argument("--min-doc-chunks", type=int, default=2, help="only documents with at least this many chunks")
    g = parser.add_argument_group("training")
    g.add_argument("--steps", type=int, default=24, help="outer optimizer steps (one chunk each; ~1 epoch of the default data)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--train-mode", default="UPDATE_1", choices=[a for a in ACTIONS if a != "SKIP"])
    g.add_argument("--aux-recon-weight", type=float, default=0.0)
    g.add_argument("--overwrite", "--retrain", dest="overwrite", action="store_true",
                   help="delete the run folder's earlier results (checkpoint, tables) when its options differ, "
                        "and train afresh; without it a run folder is only ever resumed with identical options")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--mode", default="UPDATE_1", choices=MODES,
                   help="the requested mode (ADAPTIVE: the --gate specs); all fixed modes are always run too")
    g.add_argument("--gate", action="append", default=None, metavar="SPEC",
                   help="gate spec for ADAPTIVE (repeatable; default: recon)")
    g.add_argument("--compare-gates", default=",".join(DEFAULT_COMPARE),
                   help="comma-separated gates evaluated for comparison ('' for none)")
    g.add_argument("--target-rate", type=float, default=0.5, help="target update rate of the binary gates")
    g.add_argument("--protocol", default="causal", choices=("causal", "paper"),
                   help="'paper': ALSO evaluate with the paper's protocol (UPDATE steps on chunk c, re-forwards chunk "
                        "c and scores it, i.e. reads the scored tokens; SKIP = the layer without an update), "
                        "reported in its own table beside the leak-free numbers")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("output")
    g.add_argument("--out", default="results")
    g.add_argument("--run-name", default=None)
    g.add_argument("--cache-dir", default=None, help="default: $TTT_CACHE_DIR or .cache")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    g.add_argument("--no-progress", action="store_true")
    return parser


def default_args(**overrides) -> argparse.Namespace:
    args = add_arguments(argparse.ArgumentParser()).parse_args([])
    for k, v in overrides.items():
        if not hasattr(args, k):
            raise ValueError(f"unknown experiment option {k!r}")
        setattr(args, k, v)
    return args


# options that change no number of the run: they are not part of its identity
NOT_IDENTITY = ("out", "run_name", "cache_dir", "threads", "no_progress", "overwrite")


def run_identity(args: argparse.Namespace) -> dict:
    """Every option that can change a number of the run (all but `NOT_IDENTITY`), JSON-normalised."""
    return json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in NOT_IDENTITY}))


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or any(s.endswith(e) for e in (".json", ".jsonl", ".txt", ".py", ".arrow",
                                                                          ".parquet", ".csv", "*"))


def _validate(args: argparse.Namespace) -> None:
    """Check every option, file and gate spec before anything expensive (loading, caching, training)."""
    if args.chunk_size < 2:
        raise ValueError(f"--chunk-size {args.chunk_size} must be >= 2")
    for name in ("max_train_docs", "max_eval_docs", "max_chunks_per_doc", "min_doc_chunks", "mini_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("steps", "num_heads", "threads"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 0")
    for name in ("lr", "ttt_base_lr", "simple_inner_lr"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} {v} must be a finite number > 0")
    for name in ("weight_decay", "aux_recon_weight"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"--{name.replace('_', '-')} {v} must be a finite number >= 0")
    if args.min_doc_chunks > args.max_chunks_per_doc:
        raise ValueError(f"--min-doc-chunks {args.min_doc_chunks} > --max-chunks-per-doc {args.max_chunks_per_doc}")
    if not 0.0 < args.target_rate <= 1.0:
        raise ValueError(f"--target-rate {args.target_rate} must be in (0, 1]")
    if args.mode != "ADAPTIVE" and args.gate:
        raise ValueError(f"--gate is for --mode ADAPTIVE (got --mode {args.mode}); the fixed modes need no gate")
    if args.base not in ("auto",) and _looks_like_path(args.base) and not Path(args.base).expanduser().exists():
        raise FileNotFoundError(f"--base {args.base}: no such folder (give a model folder, a hub id or 'auto')")
    if args.dataset and args.dataset != "stdlib" and _looks_like_path(args.dataset):
        import glob

        if not glob.glob(str(Path(args.dataset).expanduser())):
            raise FileNotFoundError(f"--dataset {args.dataset}: no such file, folder or glob match")
    for spec in _gate_specs(args):  # builds each gate (cheap): an unknown spec fails now, not after training
        _build_gate(spec, args)


def _short(name: str) -> str:
    return Path(name).name.replace("/", "_")


def _summarise(records: list[dict]) -> dict:
    n_tok = sum(r["n_tokens"] for r in records)
    loss = sum(r["loss"] * r["n_tokens"] for r in records) / n_tok
    return {"loss": loss, "ppl": math.exp(loss), "n_chunks": len(records), "n_tokens": n_tok,
            # counted FLOPs of everything that ran over those of SKIP on the same chunks
            "cost": sum(r["flops"] for r in records) / sum(r["skip_flops"] for r in records),
            "update_rate": sum(is_update(r["action"]) for r in records) / len(records),
            "wall_s_per_chunk": sum(r["wall_s"] for r in records) / len(records),
            "actions": {a: sum(r["action"] == a for r in records) for a in ALL_ACTIONS}}


def backbone_flop_counter(backbone):
    """n_tokens -> counted matmul FLOPs of one backbone forward. A transformer's matmul FLOPs are
    exactly b T + c T^2 (projections and MLP: linear; attention scores and mixing: quadratic), so
    two counted forwards (T = 16 and 32) give every length; checked against a third in the tests."""
    from ponder.env import count_flops

    def at(n):
        return count_flops(lambda: backbone.forward_chunk(torch.zeros(1, n, dtype=torch.int64)))

    f1, f2 = at(16), at(32)
    c = (f2 - 2 * f1) / (32 * 32 - 2 * 16 * 16)
    b = (f1 - c * 16 * 16) / 16
    return lambda n: b * n + c * n * n


def evaluate_gate(env: PonderEnv, gate: Gate, doc_ids: list[str], target_rate: float | None = None) -> list[dict]:
    """Run `gate` over `doc_ids` with the runner's protocol; one dict per chunk (ChunkRecord + gate info)."""
    gate.prepare(env, doc_ids)
    rate = gate.target_rate or target_rate
    rows = []
    for doc_id in doc_ids:
        gate.reset(doc_id)
        ctx = env.reset(doc_id)
        used = 0
        while ctx is not None:
            if rate is not None:
                ctx.budget_left = rate * ctx.n_chunks - used  # update allowance left in this document, in chunks
            if gate.lookahead:
                ctx.current = env.current_stats()
            if gate.uses_labels:
                ctx.oracle_losses = env.peek_losses()
            action = gate.decide(ctx)
            signal = gate.last_signal
            chunk = env.docs[doc_id].chunks[ctx.chunk_idx]
            record, ctx = env.step(action, gate_signal=None if signal is None else float(signal),
                                   signal_pass=gate.needs_recon_pass)
            gate.observe(record)
            used += int(is_update(action))
            row = record.to_dict()
            row.update(gate=gate.name, lookahead=gate.lookahead, uses_labels=gate.uses_labels,
                       skip_loss=chunk.skip_loss)
            rows.append(row)
    return rows


def _line_set(text: str, min_len: int = 20) -> set[str]:
    """The distinctive lines of a document: stripped, at least `min_len` characters (short lines such
    as `return x` or `else:` are common to unrelated files)."""
    return {ln.strip() for ln in text.splitlines() if len(ln.strip()) >= min_len}


def content_split(train_texts: list[str], eval_texts: list[str], max_shared: float = 0.5) -> tuple[list[str], int]:
    """Drop held-out documents that share more than `max_shared` of their distinctive lines with the
    training documents (near-duplicates, e.g. generated codec tables; exact copies share all).

    Returns:
        (kept held-out texts, number dropped). A held-out document without distinctive lines is kept
        unless it is an exact copy of a training document.
    """
    train_lines: set[str] = set()
    exact = set()
    for t in train_texts:
        train_lines |= _line_set(t)
        exact.add(hashlib.sha256(t.encode("utf-8", "replace")).hexdigest())
    kept, dropped = [], 0
    for t in eval_texts:
        lines = _line_set(t)
        copy = hashlib.sha256(t.encode("utf-8", "replace")).hexdigest() in exact
        if copy or (lines and len(lines & train_lines) / len(lines) > max_shared):
            dropped += 1
        else:
            kept.append(t)
    return kept, dropped


def _load_data(args, backbone, cache_dir):
    from ponder.cache import build_cache, select_documents
    from ttt_common.data import load_texts

    texts = {split: load_texts(args.dataset, text_field=args.text_field, split=split) for split in ("train", "eval")}
    if not texts["eval"]:
        raise ValueError(f"--dataset {args.dataset or 'stdlib'}: its held-out split is empty")
    texts["eval"], dropped = content_split(texts["train"], texts["eval"])
    print(f"[run] content split: dropped {dropped} held-out documents sharing > 50% of their distinctive lines "
          "with the training documents (near-duplicates and exact copies)", flush=True)
    out = {}
    for split, n in (("train", args.max_train_docs), ("eval", args.max_eval_docs)):
        docs = select_documents(texts[split], backbone.tokenizer, n, args.chunk_size, min_chunks=args.min_doc_chunks,
                                max_chunks=args.max_chunks_per_doc, seed=args.seed, prefix=split)
        out[split] = build_cache(backbone, docs, args.chunk_size, cache_dir, desc=split,
                                 progress=not args.no_progress)
    return out["train"], out["eval"], dropped


def _gate_specs(args) -> list[str]:
    specs = [f"fixed:{a}" for a in ALL_ACTIONS]
    if args.mode == "ADAPTIVE":
        specs += list(args.gate or ["recon"])
    specs += [s.strip() for s in (args.compare_gates or "").split(",") if s.strip()]
    seen, out = set(), []
    for s in specs:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def run_experiment(args: argparse.Namespace | dict) -> dict:
    """Run the whole experiment (see module docstring). Returns the summary dict (also in summary.json)."""
    from ponder.adaptive import AdaptiveConfig, AdaptiveLM
    from ponder.backbone import default_cache_dir, load_backbone
    from ponder.env import PonderEnv
    from ponder.storage import DamagedFileError
    from ponder.train import TrainConfig, load_checkpoint, train

    if isinstance(args, dict):
        args = default_args(**args)
    _validate(args)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    identity = run_identity(args)
    run_name = args.run_name or (f"{args.ttt_layer}-{_short(args.base)}-c{args.chunk_size}-s{args.steps}-"
                                 f"{identity_hash(identity)}")
    run_dir = Path(args.out) / run_name
    claim_run_dir(run_dir, identity, args.overwrite)  # before the expensive part: a clash stops here

    backbone = load_backbone(args.base, cache_dir)
    print(f"[run] base model: {backbone.name} -- {backbone.reason}", flush=True)
    from ponder.cache import model_fingerprint

    claim_run_dir(run_dir, identity, args.overwrite, model=model_fingerprint(backbone))
    train_docs, eval_docs, n_dropped = _load_data(args, backbone, cache_dir)
    n_train = sum(len(d.chunks) for d in train_docs)
    n_eval = sum(len(d.chunks) for d in eval_docs)
    print(f"[run] data: {len(train_docs)} train docs ({n_train} chunks), {len(eval_docs)} held-out docs "
          f"({n_eval} chunks), chunk size {args.chunk_size}", flush=True)

    acfg = AdaptiveConfig(hidden_size=backbone.hidden_size, layer=args.ttt_layer, num_heads=args.num_heads,
                          mini_batch_size=args.mini_batch_size, ttt_base_lr=args.ttt_base_lr,
                          simple_inner_lr=args.simple_inner_lr)
    tcfg = TrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                       inner_steps=INNER_STEPS[args.train_mode], aux_recon_weight=args.aux_recon_weight,
                       seed=args.seed, save_every=max(1, min(25, args.steps)))
    model = AdaptiveLM(acfg, backbone.embedding)
    data_id = [d.doc_id for d in train_docs]
    try:
        ck = load_checkpoint(run_dir)
    except DamagedFileError as err:
        if not args.overwrite:
            raise ValueError(f"{err}; rerun with --overwrite to delete it and train afresh") from err
        print(f"[run] --overwrite: deleting the damaged {run_dir / 'ckpt.pt'}", flush=True)
        (run_dir / "ckpt.pt").unlink()
        ck = None
    if ck is not None and (ck.get("adaptive_config") != acfg.to_dict()
                           or json.loads(json.dumps(ck.get("train_config"))) != _jsonable(tcfg)
                           or (ck.get("extra") or {}).get("data_id") != data_id):
        if not args.overwrite:
            raise ValueError(f"{run_dir / 'ckpt.pt'} was trained with another configuration or other training "
                             "documents than this run's options give (the data changed?); rerun with --overwrite "
                             "to delete it and train afresh, or choose another --run-name")
        print(f"[run] --overwrite: {run_dir / 'ckpt.pt'} does not match this configuration: training afresh",
              flush=True)
        (run_dir / "ckpt.pt").unlink()
        ck = None
    start_step = ck["step"] if ck is not None and (run_dir / "ckpt.pt").exists() else 0
    t0 = time.perf_counter()
    if ck is not None and (run_dir / "ckpt.pt").exists():
        print(f"[run] resuming / reusing {run_dir}/ckpt.pt (step {ck['step']} of {tcfg.steps})", flush=True)
    result = train(model, train_docs, tcfg, run_dir, resume=True, progress=not args.no_progress,
                   extra={"data_id": data_id, "base": backbone.name})
    train_s = time.perf_counter() - t0
    losses, skips = result["losses"], result["skip_losses"]
    tail = max(1, len(losses) // 4)
    if losses:
        print(f"[run] training: {result['step']} steps in {train_s:.1f} s; last {tail} steps: LM loss "
              f"{sum(losses[-tail:]) / tail:.3f} vs backbone {sum(skips[-tail:]) / tail:.3f} on the same chunks", flush=True)

    if result["step"] != start_step and (run_dir / "gates").exists():
        shutil.rmtree(run_dir / "gates")  # calibrated for other slow weights: refit below

    bb_flops = backbone_flop_counter(backbone)
    eval_env = PonderEnv(model, eval_docs, backbone_flops=bb_flops)
    train_env = PonderEnv(model, train_docs, backbone_flops=bb_flops)
    eval_ids = eval_env.doc_ids()
    records: list[dict] = []
    gates_summary: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for spec in _gate_specs(args):
        t0 = time.perf_counter()
        try:
            gate = _build_gate(spec, args)
            if not gate.load(run_dir / "gates"):
                gate.fit(train_env, train_env.doc_ids())
                gate.save(run_dir / "gates")
            rows = evaluate_gate(eval_env, gate, eval_ids, args.target_rate)
        except (ImportError, NotImplementedError) as err:  # a gate that is not available here
            skipped[spec] = f"{type(err).__name__}: {err}"
            print(f"[run] gate {spec}: skipped ({skipped[spec]})", flush=True)
            continue
        summary = _summarise(rows)
        summary.update(spec=spec, lookahead=bool(gate.lookahead), uses_labels=bool(gate.uses_labels),
                       eval_s=time.perf_counter() - t0)
        gates_summary[gate.name] = summary
        records += rows
        print(f"[run] {gate.name:<18} loss {summary['loss']:.4f}  ppl {summary['ppl']:7.3f}  cost {summary['cost']:5.2f}x  "
              f"update rate {summary['update_rate']:.2f}  ({summary['eval_s']:.1f} s)", flush=True)

    if args.protocol == "paper":
        paper_env = PonderEnv(model, eval_docs, backbone_flops=bb_flops, protocol="paper")
        for spec in PAPER_SPECS:
            t0 = time.perf_counter()
            gate = _build_gate(spec, args)
            if not gate.load(run_dir / "gates"):
                gate.fit(train_env, train_env.doc_ids())  # the same unlabeled signal as the causal run
            rows = evaluate_gate(paper_env, gate, eval_ids, args.target_rate)
            name = f"paper:{gate.name}"
            for r in rows:
                r.update(gate=name, protocol="paper", lookahead=True)
            summary = _summarise(rows)
            summary.update(spec=spec, protocol="paper", lookahead=True, uses_labels=bool(gate.uses_labels),
                           eval_s=time.perf_counter() - t0)
            gates_summary[name] = summary
            records += rows
            print(f"[run] {name:<24} loss {summary['loss']:.4f}  update rate {summary['update_rate']:.2f}  "
                  "(paper protocol: reads the scored tokens)", flush=True)

    skip = gates_summary.get("SKIP") or gates_summary.get("fixed:SKIP")
    if skip is not None:
        for s in gates_summary.values():
            s["wall_vs_skip"] = s["wall_s_per_chunk"] / skip["wall_s_per_chunk"]
    requested = args.mode if args.mode != "ADAPTIVE" else (args.gate or ["recon"])[0]
    summary = {
        "run": run_name, "mode": args.mode, "requested": requested, "base": backbone.name, "base_reason": backbone.reason,
        "ttt_layer": args.ttt_layer, "protocol": args.protocol,
        "ttt_loss_weight": args.aux_recon_weight, "adaptive_config": acfg.to_dict(), "train_config": _jsonable(tcfg),
        "data": {"dataset": args.dataset or "stdlib", "chunk_size": args.chunk_size, "train_docs": len(train_docs),
                 "train_chunks": n_train, "eval_docs": len(eval_docs), "eval_chunks": n_eval,
                 "eval_tokens": sum(c.n_scored for d in eval_docs for c in d.chunks),
                 "eval_dropped_near_duplicates": n_dropped},
        "training": {"steps": result["step"], "seconds": train_s,
                     "final_loss": sum(losses[-tail:]) / tail if losses else None,
                     "final_skip_loss": sum(skips[-tail:]) / tail if losses else None},
        "target_rate": args.target_rate, "gates": gates_summary, "skipped_gates": skipped,
        "total_s": time.perf_counter() - t_start,
    }
    summary = _write_outputs(run_dir, records, summary)
    print((run_dir / "results.md").read_text(), flush=True)
    print(f"[run] wrote {run_dir} ({summary['total_s']:.0f} s total)", flush=True)
    return summary


RUN_FILE = "run.json"


def claim_run_dir(run_dir: Path, identity: dict, overwrite: bool = False, model: str | None = None) -> None:
    """Make `run_dir` this run's folder: resume it when its recorded options are `identity`, else stop.

    `run.json` records the options (and, once loaded, the base model's content fingerprint `model`).
    A folder holding results of other options (or of an unknown run) is left untouched and a
    ValueError names the differing options, unless `overwrite`: then its contents are deleted.
    """
    path = run_dir / RUN_FILE
    record = {"options": identity, "model_fingerprint": model}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {"options": None}
        diff = sorted(k for k in set(identity) | set(old.get("options") or {})
                      if (old.get("options") or {}).get(k, "<unset>") != identity.get(k, "<unset>"))
        if old.get("options") is None:
            diff = ["<unreadable run.json>"]
        if model is not None and old.get("model_fingerprint") not in (None, model):
            diff.append("base model weights")
        if not diff:
            if model is not None and old.get("model_fingerprint") is None:
                _write_json_atomic(path, record)
            return
        if not overwrite:
            shown = ", ".join(f"{k}: {(old.get('options') or {}).get(k, '<unset>')!r} -> {identity.get(k, '<unset>')!r}"
                              if k in identity or k in (old.get("options") or {}) else k for k in diff[:6])
            raise ValueError(f"run folder {run_dir} holds a run with other options ({shown}); choose another "
                             "--run-name (or leave it unset: the default name hashes the options) or pass "
                             "--overwrite to delete its results")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ValueError(f"run folder {run_dir} holds results without a {RUN_FILE} (an older version or another "
                         "program); choose another --run-name or pass --overwrite to delete them")
    if overwrite and run_dir.exists() and (path.exists() or any(run_dir.iterdir())):
        old_ok = path.exists() and json.loads(path.read_text()).get("options") == identity
        if not old_ok:
            print(f"[run] --overwrite: deleting the earlier results in {run_dir}", flush=True)
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, record)


def _write_json_atomic(path: Path, obj) -> None:
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _jsonable(cfg) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(cfg)))


def _build_gate(spec: str, args):
    from ponder.gates import build_gate

    if spec.startswith("fixed:"):
        return build_gate(spec)
    return build_gate(spec, target_rate=args.target_rate, seed=args.seed)


def _write_outputs(run_dir: Path, records: list[dict], summary: dict) -> dict:
    """chunks.jsonl here; summary.json, results.md and plots by `ponder.report` (completed summary returned)."""
    with open(run_dir / "chunks.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    from ponder.report import write_report

    write_report(run_dir, records, summary)
    return json.loads((run_dir / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """`python scripts/run_ponder.py` / `ttt-run-ponder`: bad input is one line on stderr + exit code 2
    (`ttt_common.cli.run_cli`; TTT_DEBUG=1 or --debug for the traceback)."""
    from ttt_common.cli import run_cli

    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    """Parse the options, run, return the exit code."""
    parser = add_arguments(argparse.ArgumentParser(description="PonderTTT experiment on a frozen LM: train the "
                                                   "adaptive TTT layer, evaluate SKIP / UPDATE_k / gates."))
    run_experiment(parser.parse_args(argv))
    return 0
