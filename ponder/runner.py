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
import functools
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ponder.types import ACTIONS, ALL_ACTIONS, INNER_STEPS, is_update
from ttt_common.files import atomic_copy, atomic_write_text
from ttt_common.train_utils import pin_malloc_mmap_threshold

if TYPE_CHECKING:
    from ponder.env import PonderEnv
    from ponder.gates import Gate

DEFAULT_COMPARE = ("random", "recon", "recon-lookahead", "oracle", "budgeted-oracle", "ppo")
MODES = (*ALL_ACTIONS, "ADAPTIVE")
# what `--protocol paper` evaluates: the fixed modes, the paper's gate (its own chunk's recon loss),
# random, and the oracle at the target rate
PAPER_SPECS = ("fixed:SKIP", "fixed:UPDATE_1", "fixed:UPDATE_2", "fixed:UPDATE_4", "random", "recon-lookahead",
               "budgeted-oracle")


# Data and training options of each preset (README, ponder section: how they were chosen and what
# each yields). Both use 128-token chunks: the backbone sees each chunk alone, so the adaptive
# layer's state, carried across a document's chunks, is the only memory of what came before.
# default: what `make demo` runs, <= 8 minutes on 2 idle cores from a fresh clone (model conversion
#   and backbone caching included);
# full: ~40 minutes on 2 cores (measured 39 min, README); long files only (16 chunks = 2,048 tokens per document), so
#   the gain can be measured per chunk index across a whole document.
PRESETS: dict[str, dict] = {
    "default": dict(chunk_size=128, max_train_docs=40, max_val_docs=4, max_eval_docs=20, max_chunks_per_doc=4,
                    min_doc_chunks=2, steps=40, batch_chunks=4, eval_every=8, patience=2, lr=1e-3),
    "full": dict(chunk_size=128, max_train_docs=120, max_val_docs=8, max_eval_docs=20, max_chunks_per_doc=16,
                 min_doc_chunks=16, steps=400, batch_chunks=8, eval_every=40, patience=3, lr=1e-3),
}


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
    g = parser.add_argument_group("preset", "a preset sets the data / training options below that are not given "
                                  "explicitly (an explicit option always wins); see PRESETS in ponder/runner.py")
    g.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="'default': the <= 8-minute demo (make demo); 'full': ~40 minutes on 2 cores")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="HF dataset id or local files (default: the stdlib code corpus)")
    g.add_argument("--text-field", default="text")
    g.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (preset)")
    g.add_argument("--max-train-docs", type=int, default=None, help="training documents (preset)")
    g.add_argument("--max-val-docs", type=int, default=None,
                   help="validation documents, carved from the TRAINING files (never the test split), for "
                        "checkpoint selection and early stopping (preset; 0: no validation)")
    g.add_argument("--max-eval-docs", type=int, default=None, help="held-out (test) documents (preset)")
    g.add_argument("--max-chunks-per-doc", type=int, default=None, help="preset")
    g.add_argument("--min-doc-chunks", type=int, default=None,
                   help="only documents with at least this many chunks (preset)")
    g = parser.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None, help="outer optimizer steps (preset)")
    g.add_argument("--batch-chunks", type=int, default=None,
                   help="chunks per optimizer step, from as many documents (preset)")
    g.add_argument("--eval-every", type=int, default=None, help="validate every N steps (preset; 0: never)")
    g.add_argument("--patience", type=int, default=None,
                   help="stop after N validations without improvement (preset; 0: run all --steps)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (preset)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--train-mode", default="UPDATE_1", choices=[a for a in ACTIONS if a != "SKIP"])
    g.add_argument("--aux-recon-weight", type=float, default=0.0)
    g.add_argument("--init-from", default=None, metavar="RUN_DIR",
                   help="start from RUN_DIR/ckpt.pt when this run folder has no checkpoint yet: a finished "
                        "checkpoint whose model, training options and documents match this run's is reused "
                        "without training (re-evaluate a trained layer with other gate or evaluation options); "
                        "any mismatch stops with a message")
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
    """The options of `run_ponder.py` with no flags, `overrides` applied, then the preset resolved."""
    args = add_arguments(argparse.ArgumentParser()).parse_args([])
    for k, v in overrides.items():
        if not hasattr(args, k):
            raise ValueError(f"unknown experiment option {k!r}")
        setattr(args, k, v)
    return resolve_preset(args)


def resolve_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every preset option left unset (None) from `PRESETS[args.preset]`; explicit values are kept.
    Idempotent; returns `args` (changed in place)."""
    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} is not one of {sorted(PRESETS)}")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


# options that change no number of the run: they are not part of its identity (a preset is only a
# name for its values: the resolved values are)
NOT_IDENTITY = ("out", "run_name", "cache_dir", "threads", "no_progress", "overwrite", "preset", "init_from")


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
    for name in ("max_train_docs", "max_eval_docs", "max_chunks_per_doc", "min_doc_chunks", "mini_batch_size",
                 "batch_chunks"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("steps", "num_heads", "threads", "max_val_docs", "eval_every", "patience"):
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
    if args.eval_every and not args.max_val_docs:
        raise ValueError(f"--eval-every {args.eval_every} needs validation documents (--max-val-docs is 0); "
                         "pass --eval-every 0 to train without validation")
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
    if args.init_from and not (Path(args.init_from).expanduser() / "ckpt.pt").exists():
        raise FileNotFoundError(f"--init-from {args.init_from}: no ckpt.pt there (give a run folder of a finished run)")
    for spec in _gate_specs(args):  # builds each gate (cheap): an unknown spec fails now, not after training
        _build_gate(spec, args)


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    import os

    t = os.times()
    return t.user + t.system


def _loadavg() -> float | None:
    import os

    try:
        return os.getloadavg()[0]
    except OSError:
        return None


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


def validation_pool(train_texts: list[str], fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Carve validation documents out of the TRAINING texts (the test split is never read here).

    A text goes to the validation pool when the hash of its content falls in the first `fraction`
    (deterministic, independent of file order); validation texts that share more than half of their
    distinctive lines with the remaining training texts are dropped (`content_split`), so selection
    is not rewarded for memorising near-duplicates.

    Returns:
        (training texts, validation texts), disjoint.
    """
    def in_val(t: str) -> bool:
        return int(hashlib.sha256(t.encode("utf-8", "replace")).hexdigest()[:8], 16) < fraction * 16**8

    train = [t for t in train_texts if not in_val(t)]
    val, _ = content_split(train, [t for t in train_texts if in_val(t)])
    return train, val


@functools.lru_cache(maxsize=2)
def split_texts(dataset: str | None, text_field: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], int]:
    """(training, validation, held-out texts, held-out documents dropped as near-duplicates) of a corpus:
    the held-out split after `content_split` against ALL training files, the validation pool carved
    from the training files (`validation_pool`). Memoised per process: reading and comparing the
    corpus costs seconds, and repeated runs (tests, sweeps) need it once."""
    from ttt_common.data import load_texts

    texts = {split: load_texts(dataset, text_field=text_field, split=split) for split in ("train", "eval")}
    if not texts["eval"]:
        raise ValueError(f"--dataset {dataset or 'stdlib'}: its held-out split is empty")
    held_out, dropped = content_split(texts["train"], texts["eval"])
    train, val = validation_pool(texts["train"])
    return tuple(train), tuple(val), tuple(held_out), dropped


def _load_data(args, backbone, cache_dir):
    """Tokenized, chunked and cached train / validation / held-out documents (+ held-out documents dropped
    as near-duplicates of training ones)."""
    from ponder.cache import build_cache, select_documents

    train, val, held_out, dropped = split_texts(args.dataset, args.text_field)
    print(f"[run] content split: dropped {dropped} held-out documents sharing > 50% of their distinctive lines "
          "with the training documents (near-duplicates and exact copies)", flush=True)
    # without validation the whole training split trains (validation texts are training files)
    texts = {"train": list(train) if args.max_val_docs else list(train) + list(val), "val": list(val),
             "eval": list(held_out)}
    out = {}
    for split, n in (("train", args.max_train_docs), ("val", args.max_val_docs), ("eval", args.max_eval_docs)):
        if not n:
            out[split] = []
            continue
        docs = select_documents(texts[split], backbone.tokenizer, n, args.chunk_size, min_chunks=args.min_doc_chunks,
                                max_chunks=args.max_chunks_per_doc, seed=args.seed, prefix=split)
        out[split] = build_cache(backbone, docs, args.chunk_size, cache_dir, desc=split,
                                 progress=not args.no_progress)
    return out["train"], out["val"], out["eval"], dropped


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


def _matching_checkpoint(run_dir: Path, args: argparse.Namespace, acfg, tcfg, data_id: list) -> dict | None:
    """The run folder's checkpoint when it was trained with this configuration and these documents (after
    `--init-from` copied one in); a damaged or mismatching one stops with a message, or is deleted under
    --overwrite. None: train from scratch."""
    from ponder.storage import DamagedFileError
    from ponder.train import load_checkpoint

    if args.init_from and not (run_dir / "ckpt.pt").exists():
        src = Path(args.init_from).expanduser() / "ckpt.pt"
        atomic_copy(src, run_dir / "ckpt.pt")
        print(f"[run] --init-from: copied {src} (checked against this run's options below)", flush=True)
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
    return ck


def _evaluate_gates(args: argparse.Namespace, model, backbone, train_docs: list, eval_docs: list,
                    run_dir: Path) -> tuple[dict[str, dict], list[dict], dict[str, str]]:
    """Fit (or load) and evaluate every gate of the run on the held-out documents, then, with
    `--protocol paper`, the paper-protocol gates. Returns (summary per gate name, per-chunk records,
    gates skipped here with the reason)."""
    from ponder.env import PonderEnv

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
    return gates_summary, records, skipped


def _train_phase(args: argparse.Namespace, backbone, train_docs: list, val_docs: list, run_dir: Path):
    """Build the adaptive layer and train it (or resume / reuse the run folder's matching checkpoint),
    selecting on the validation documents. Returns (model, AdaptiveConfig, TrainConfig, train()'s
    result, the step it started from)."""
    from ponder.adaptive import AdaptiveConfig, AdaptiveLM
    from ponder.train import TrainConfig, train

    acfg = AdaptiveConfig(hidden_size=backbone.hidden_size, layer=args.ttt_layer, num_heads=args.num_heads,
                          mini_batch_size=args.mini_batch_size, ttt_base_lr=args.ttt_base_lr,
                          simple_inner_lr=args.simple_inner_lr)
    tcfg = TrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                       inner_steps=INNER_STEPS[args.train_mode], aux_recon_weight=args.aux_recon_weight,
                       seed=args.seed, save_every=max(1, min(25, args.steps)), batch_chunks=args.batch_chunks,
                       eval_every=args.eval_every if val_docs else 0, patience=args.patience)
    model = AdaptiveLM(acfg, backbone.embedding)
    data_id = [d.doc_id for d in train_docs] + [d.doc_id for d in val_docs]
    ck = _matching_checkpoint(run_dir, args, acfg, tcfg, data_id)
    start_step = ck["step"] if ck is not None and (run_dir / "ckpt.pt").exists() else 0
    t0 = time.perf_counter()
    if ck is not None and (run_dir / "ckpt.pt").exists():
        print(f"[run] resuming / reusing {run_dir}/ckpt.pt (step {ck['step']} of {tcfg.steps})", flush=True)
    result = train(model, train_docs, tcfg, run_dir, resume=True, progress=not args.no_progress,
                   extra={"data_id": data_id, "base": backbone.name}, val_docs=val_docs)
    train_s = time.perf_counter() - t0
    losses, skips = result["losses"], result["skip_losses"]
    tail = max(1, len(losses) // 4)
    if losses:
        print(f"[run] training: {result['step']} steps in {train_s:.1f} s; last {tail} steps: LM loss "
              f"{sum(losses[-tail:]) / tail:.3f} vs backbone {sum(skips[-tail:]) / tail:.3f} on the same chunks", flush=True)
    if result["curve"]:
        from ponder.train import write_curves

        write_curves(run_dir, result["curve"], title=f"{args.ttt_layer} on {_short(backbone.name)}, chunk "
                                                     f"{args.chunk_size}, batch {args.batch_chunks}, lr {args.lr:g}")
        last = result["curve"][-1]
        print(f"[run] validation: selected step {result['best_step']} (loss {result['best_val_loss']:.4f} vs backbone "
              f"{last['val_skip_loss']:.4f}){'; stopped early' if result['stopped_early'] else ''}; "
              f"curves in {run_dir}/curves.jsonl, curves.png", flush=True)
    return model, acfg, tcfg, result, start_step


def _print_data(args: argparse.Namespace, train_docs, val_docs, eval_docs, data_s: float) -> tuple[int, int, int]:
    """Print the data's sizes; return the chunk counts (train, validation, held-out)."""
    n_train = sum(len(d.chunks) for d in train_docs)
    n_val = sum(len(d.chunks) for d in val_docs)
    n_eval = sum(len(d.chunks) for d in eval_docs)
    print(f"[run] data ({data_s:.0f} s): {len(train_docs)} train docs ({n_train} chunks), {len(val_docs)} validation "
          f"docs ({n_val} chunks, from the training files), {len(eval_docs)} held-out docs ({n_eval} chunks), "
          f"chunk size {args.chunk_size}; {args.steps} steps x {args.batch_chunks} chunks = "
          f"{args.steps * args.batch_chunks / max(1, n_train):.1f} epochs at most", flush=True)
    return n_train, n_val, n_eval


def run_experiment(args: argparse.Namespace | dict) -> dict:
    """Run the whole experiment (see module docstring). Returns the summary dict (also in summary.json)."""
    from ponder.backbone import default_cache_dir, load_backbone

    if isinstance(args, dict):
        args = default_args(**args)
    resolve_preset(args)
    _validate(args)
    t_start, c_start = time.perf_counter(), _cpu_s()
    pin_malloc_mmap_threshold()  # else per-chunk logits temporaries fragment the heap (GBs on the full preset)
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
    from ponder.cache import model_fingerprint, retime_backbone

    claim_run_dir(run_dir, identity, args.overwrite, model=model_fingerprint(backbone))
    t0, c0 = time.perf_counter(), _cpu_s()
    train_docs, val_docs, eval_docs, n_dropped = _load_data(args, backbone, cache_dir)
    data_s, data_cpu = time.perf_counter() - t0, _cpu_s() - c0
    n_train, n_val, n_eval = _print_data(args, train_docs, val_docs, eval_docs, data_s)

    t0, c0 = time.perf_counter(), _cpu_s()
    model, acfg, tcfg, result, start_step = _train_phase(args, backbone, train_docs, val_docs, run_dir)
    train_s, train_cpu = time.perf_counter() - t0, _cpu_s() - c0
    losses, skips = result["losses"], result["skip_losses"]
    tail = max(1, len(losses) // 4)
    t_eval, c_eval = time.perf_counter(), _cpu_s()
    s_tok = retime_backbone(backbone, eval_docs)  # SKIP's cost measured now, beside the passes it is compared with
    print(f"[run] backbone re-timed for the wall-clock columns: {1e3 * s_tok * args.chunk_size:.0f} ms per "
          f"{args.chunk_size}-token chunk", flush=True)

    if result["step"] != start_step and (run_dir / "gates").exists():
        shutil.rmtree(run_dir / "gates")  # calibrated for other slow weights: refit below

    gates_summary, records, skipped = _evaluate_gates(args, model, backbone, train_docs, eval_docs, run_dir)

    eval_s, eval_cpu = time.perf_counter() - t_eval, _cpu_s() - c_eval
    print(f"[run] evaluation alone: {eval_s:.0f} s ({eval_cpu:.0f} CPU-s)", flush=True)
    skip = gates_summary.get("SKIP") or gates_summary.get("fixed:SKIP")
    if skip is not None:
        for s in gates_summary.values():
            s["wall_vs_skip"] = s["wall_s_per_chunk"] / skip["wall_s_per_chunk"]
    requested = args.mode if args.mode != "ADAPTIVE" else (args.gate or ["recon"])[0]
    summary = {
        "run": run_name, "preset": args.preset, "mode": args.mode, "requested": requested, "base": backbone.name, "base_reason": backbone.reason,
        "ttt_layer": args.ttt_layer, "protocol": args.protocol,
        "ttt_loss_weight": args.aux_recon_weight, "adaptive_config": acfg.to_dict(), "train_config": _jsonable(tcfg),
        "data": {"dataset": args.dataset or "stdlib", "chunk_size": args.chunk_size, "train_docs": len(train_docs),
                 "train_chunks": n_train, "train_tokens": sum(c.n_scored for d in train_docs for c in d.chunks),
                 "val_docs": len(val_docs), "val_chunks": n_val, "eval_docs": len(eval_docs), "eval_chunks": n_eval,
                 "eval_tokens": sum(c.n_scored for d in eval_docs for c in d.chunks),
                 "eval_dropped_near_duplicates": n_dropped},
        "training": {"steps": result["step"], "seconds": train_s, "batch_chunks": args.batch_chunks,
                     "selected_step": result["best_step"], "best_val_loss": result["best_val_loss"],
                     "stopped_early": result["stopped_early"], "curve": result["curve"],
                     "final_loss": sum(losses[-tail:]) / tail if losses else None,
                     "final_skip_loss": sum(skips[-tail:]) / tail if losses else None},
        "target_rate": args.target_rate, "gates": gates_summary, "skipped_gates": skipped,
        # wall-clock and CPU seconds (user + system, all threads) per phase: on a shared machine the CPU
        # seconds over the thread count estimate the idle wall-clock
        "timing": {"data_s": data_s, "train_s": train_s, "eval_s": eval_s, "data_cpu_s": data_cpu,
                   "train_cpu_s": train_cpu, "eval_cpu_s": eval_cpu, "total_cpu_s": _cpu_s() - c_start,
                   "threads": torch.get_num_threads(), "load_avg_1min_at_end": _loadavg()},
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
                atomic_write_text(path, json.dumps(record, indent=1))
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
    atomic_write_text(path, json.dumps(record, indent=1))


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
