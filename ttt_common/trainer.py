"""Train a LaCT or TTT language model with FSDP2, on one CPU up to many GPUs.

The torchtitan recipe (`pytorch/torchtitan`, `torchtitan/trainer.py`): build the model on the meta
device, apply activation checkpointing -> torch.compile -> FSDP2 from the outside
(`ttt_common/parallelize.py`), materialise, load weights initialised by the model's own `_init_weights`
(computed once on rank 0 on the CPU with `--seed` and broadcast, so any world size starts from the
same weights as one process), then loop: gradient accumulation, clipping, AdamW with linear warmup +
cosine decay, non-finite steps skipped and counted (`train_utils.NonFiniteGuard`: N in a row stop the run), DCP checkpoints (`ttt_common/checkpoint.py`) at an
interval, at the end and on SIGTERM; `--resume` continues the exact loss trajectory.

Commands (see README):

    # CPU, one process, tiny LaCT (r=2, manual backprop, GPT-2 vocabulary), < 1 min on 2 idle cores
    python scripts/train.py --model lact --config configs/train_debug_lact.json --seq-len 128 \
        --batch-size 2 --steps 20 --max-docs 50 --out results/train_cpu
    # CPU, two gloo ranks (FSDP2)
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 scripts/train.py --model lact \
        --config configs/train_debug_lact.json --seq-len 128 --batch-size 1 --steps 20 --max-docs 50
    # one GPU (bf16 by default on CUDA)
    torchrun --standalone --nproc_per_node=1 scripts/train.py --model lact --config configs/<cfg>.json ...
    # 8 GPUs, the 816M r=2 recipe: bash scripts/train_tttdr_2-layer-mlp.sh
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ttt_common.checkpoint import Checkpointer, CheckpointError, model_fingerprint
from ttt_common.cli import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PREEMPTED, UsageError, debug_enabled, run_cli
from ttt_common.config_files import resolve_config
from ttt_common.metrics import MetricsLogger, peak_memory_gib
from ttt_common.packing import PackedLoader, tokenize_and_pack
from ttt_common.parallelize import materialize, meta_parameters, parallelize
from ttt_common.train_utils import (
    NonFiniteGuard,
    NonFiniteLossError,
    grad_norm_and_clip,
    lr_at,
    param_groups,
    rng_state,
    set_rng_state,
)

# --model -> (module, model class, config class). "llama" is a plain transformers baseline (attention
# only) that runs through the same code path.
MODELS = {
    "lact": ("lact", "LaCTForCausalLM", "LaCTSWIGLUConfig"),
    "ttt": ("official_port", "TTTForCausalLM", "TTTConfig"),
    "llama": ("transformers", "LlamaForCausalLM", "LlamaConfig"),
}

# keys the official configs carry that the model keeps as plain attributes without using them (the upstream
# LaCT configs hold `attention_bias`); accepted so those files load unchanged
_CARRIED_CONFIG_KEYS = {"lact": {"attention_bias"}}

# config keys that differ between saves of the same model and must not fail a resume
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype",
                         "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "use_cache")


# a bad command-line argument or config: reported as one line, exit code 2 (ttt_common/cli.py)
__all__ = ["UsageError", "main", "build_parser", "run"]


# any one of these marks a folder as a tokenizer folder (fast, sentencepiece, BPE, WordPiece)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def validate_inputs(args: argparse.Namespace) -> None:
    """Files the options name exist and hold something: checked before any model, data or process group.

    (Option values are checked by `validate_args`, the config by `load_model_config`.)
    """
    from ttt_common.data import local_data_files

    tok = args.tokenizer
    if tok not in (None, "gpt2") and (_looks_like_path(tok) or Path(tok).expanduser().exists()):
        path = Path(tok).expanduser()
        if not path.exists():
            raise UsageError(f"--tokenizer {tok}: no such folder (pass a tokenizer folder, a Hugging Face id, or "
                             "nothing for GPT-2's BPE, which works offline)")
        if not path.is_dir():
            raise UsageError(f"--tokenizer {tok} is a file; pass the folder that holds the tokenizer files")
        if not any((path / name).exists() for name in _TOKENIZER_FILES):
            raise UsageError(f"--tokenizer {tok}: the folder holds none of {', '.join(_TOKENIZER_FILES)}; pass a "
                             "folder written by a tokenizer's save_pretrained")
    if args.dataset in (None, "stdlib"):
        return
    files = local_data_files(args.dataset)
    if files is None:
        if Path(args.dataset).exists():
            raise UsageError(f"--dataset {args.dataset}: no data files there (expected one of .json, .jsonl, .txt, "
                             ".py, .arrow, .parquet, .csv)")
        if _looks_like_path(args.dataset):
            raise UsageError(f"--dataset {args.dataset}: no such file or directory (pass an existing local path, a "
                             "Hugging Face dataset id, or nothing for the standard-library code corpus)")
        return  # a hub id: loaded (or refused) later
    empty = [f for f in files if _is_blank(Path(f))]
    if len(empty) == len(files):
        raise UsageError(f"--dataset {args.dataset}: {'the file is' if len(files) == 1 else f'all {len(files)} files are'} "
                         "empty (no documents to train on)")


def _is_blank(path: Path, limit: int = 1 << 16) -> bool:
    """True for an empty or whitespace-only file (files above `limit` bytes are assumed to hold data)."""
    size = path.stat().st_size
    return size == 0 or (size <= limit and not path.read_bytes().strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default=None, metavar="TOML",
                   help="job file holding any of these options (tables [model], [data], ... or top level; keys are "
                        "option names with '_' or '-'); options given on the command line override it")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=sorted(MODELS), default="lact", help="model family (default lact)")
    m.add_argument("--config", default=None,
                   help="model config: a JSON file, a bundled config name (e.g. lact_debug_r2), or with --model ttt "
                        "an official preset (125m, 125m-TTT, ..., 1b-TTT)")
    m.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override model-config keys, values parsed as JSON (e.g. --set num_hidden_layers=2)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None,
                   help="a prepared corpus folder (python -m ttt_common.prepare_data: streamed from memory-mapped "
                        "shards), an HF dataset id or a local file/dir/glob (jsonl, json, txt, arrow, parquet, csv; "
                        "read whole into memory); default: the Python standard library's code")
    d.add_argument("--text-field", default="text", help="column holding the text (default text)")
    d.add_argument("--max-docs", type=int, default=None, help="use at most this many documents")
    d.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id; default: GPT-2 BPE, offline")
    d.add_argument("--seq-len", type=int, default=2048, help="tokens per packed sequence (default 2048)")
    d.add_argument("--eval-data", default=None,
                   help="held-out data: a prepared corpus folder (all of it is held out) or a --dataset spec (its "
                        "eval split); default: the eval split of --dataset")
    d.add_argument("--eval-every", type=int, default=0,
                   help="held-out loss / perplexity every N steps and at the end (0: never; default 0)")
    d.add_argument("--eval-batches", type=int, default=8,
                   help="micro-batches per rank in each evaluation (a fixed held-out set; default 8)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch PER RANK (default 1)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    o.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    o.add_argument("--steps", type=int, default=100, help="optimizer steps = cosine schedule length (default 100)")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr (default 0.1)")
    o.add_argument("--clip", type=float, default=1.0, help="max gradient L2 norm; <= 0 disables (default 1.0)")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of matrices (default 0.1)")
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.95)
    o.add_argument("--seed", type=int, default=0, help="seed of weights, data order and RNG (default 0)")
    s = p.add_argument_group("systems")
    prec = s.add_mutually_exclusive_group()
    prec.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                      help="bf16 compute (FSDP2 MixedPrecisionPolicy, fp32 master weights); default on CUDA")
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="fp32; default on CPU")
    s.add_argument("--compile", action="store_true", help="torch.compile each block")
    s.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads per process (torch.set_num_threads); default: torch's choice. "
                        "On a shared CPU 1-2 is often much faster than the default")
    s.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations in backward")
    s.add_argument("--no-fsdp", action="store_true",
                   help="single process only: plain module (autocast for bf16) instead of a 1-rank FSDP2 model")
    c = p.add_argument_group("checkpoints and logs")
    c.add_argument("--checkpoint-dir", default=None, help="DCP checkpoint folder (default: <out>/checkpoints)")
    c.add_argument("--checkpoint-interval", type=int, default=0,
                   help="also save every N steps (0: no step-based saves; default 0)")
    c.add_argument("--checkpoint-minutes", type=float, default=30.0,
                   help="save when this many minutes passed since the last save (0: never by time; default 30). "
                        "Saves also happen at the end and on SIGTERM/SIGINT (then exit code 75)")
    c.add_argument("--keep-checkpoints", type=int, default=3, help="complete checkpoints kept (default 3)")
    c.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (start fresh if none)")
    c.add_argument("--log-every", type=int, default=10, help="stdout line every N steps (JSONL: every step)")
    c.add_argument("--out", default="results/train", help="run folder: metrics.jsonl, loss.png, checkpoints/")
    c.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    c.add_argument("--log-backend", default="", metavar="NAMES",
                   help="extra metric sinks, comma-separated: tensorboard (<out>/tensorboard), wandb; "
                        "metrics.jsonl is always written")
    c.add_argument("--max-nonfinite-in-a-row", type=int, default=10, metavar="N",
                   help="a step with a non-finite loss or grad norm is skipped and counted; N in a row stop the run "
                        "with an error (the model has diverged; default 10)")
    c.add_argument("--inject-nonfinite", default="", metavar="STEPS",
                   help="debugging: comma-separated 1-based steps whose loss is multiplied by NaN (the step "
                        "must be skipped and counted)")
    return p


# --------------------------------------------------------------------------------------------- config
def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _looks_like_path(spec: str) -> bool:
    """A local path (not a hub id like "org/name"): absolute, relative, or with a data-file suffix."""
    if any(c in spec for c in "*?["):
        return False  # a glob: load_texts reports when it matches nothing
    return spec.startswith((".", "/", "~")) or Path(spec).suffix in (".json", ".jsonl", ".txt", ".py", ".arrow",
                                                                      ".parquet", ".csv")


def validate_args(args: argparse.Namespace) -> None:
    """Raise UsageError for values no run can use, naming the flag, value and rule."""
    rules = [("--seq-len", args.seq_len, args.seq_len >= 2, ">= 2"),
             ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
             ("--grad-accum", args.grad_accum, args.grad_accum >= 1, ">= 1"),
             ("--steps", args.steps, args.steps >= 1, ">= 1"),
             ("--warmup-steps", args.warmup_steps, args.warmup_steps >= 0, ">= 0"),
             ("--lr", args.lr, args.lr > 0 and math.isfinite(args.lr), "> 0"),
             ("--min-lr-ratio", args.min_lr_ratio, 0.0 <= args.min_lr_ratio <= 1.0, "in [0, 1]"),
             ("--weight-decay", args.weight_decay, args.weight_decay >= 0, ">= 0"),
             ("--checkpoint-interval", args.checkpoint_interval, args.checkpoint_interval >= 0, ">= 0"),
             ("--checkpoint-minutes", args.checkpoint_minutes,
              args.checkpoint_minutes >= 0 and math.isfinite(args.checkpoint_minutes), ">= 0"),
             ("--keep-checkpoints", args.keep_checkpoints, args.keep_checkpoints >= 1, ">= 1"),
             ("--log-every", args.log_every, args.log_every >= 1, ">= 1"),
             ("--eval-every", args.eval_every, args.eval_every >= 0, ">= 0"),
             ("--eval-batches", args.eval_batches, args.eval_batches >= 1, ">= 1"),
             ("--max-nonfinite-in-a-row", args.max_nonfinite_in_a_row, args.max_nonfinite_in_a_row >= 1, ">= 1")]
    if args.threads is not None:
        rules.append(("--threads", args.threads, args.threads >= 1, ">= 1"))
    if args.max_docs is not None:
        rules.append(("--max-docs", args.max_docs, args.max_docs >= 1, ">= 1"))
    for flag, value, ok, rule in rules:
        if not ok:
            raise UsageError(f"{flag}={value} must be {rule}")
    from ttt_common.metrics import BACKENDS

    args.log_backends = [b.strip() for b in args.log_backend.split(",") if b.strip()]
    for b in args.log_backends:
        if b not in BACKENDS:
            close = difflib.get_close_matches(b, sorted(BACKENDS), n=1)
            raise UsageError(f"--log-backend {b!r} is not one of {sorted(BACKENDS)}"
                             + (f"; did you mean {close[0]!r}?" if close else ""))
        if importlib.util.find_spec(b) is None:
            raise UsageError(f"--log-backend {b} needs the {b} package: pip install {b}")
    try:
        args.nonfinite_steps = {int(s) for s in args.inject_nonfinite.split(",") if s.strip()}
    except ValueError as err:
        raise UsageError(f"--inject-nonfinite={args.inject_nonfinite!r} must be comma-separated step numbers") from err


def load_model_config(args: argparse.Namespace):
    """The config object of `--model` built from `--config` (+ `--set`), with readable errors."""
    module_name, model_name, config_name = MODELS[args.model]
    raw = _preset(args)
    if raw is None:
        try:
            path = resolve_config(args.config)
        except FileNotFoundError as err:
            raise UsageError(f"--config {err}") from err
        try:
            raw = json.loads(path.read_text())
        except ValueError as err:
            raise UsageError(f"--config {args.config} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise UsageError(f"--config {args.config} must hold a JSON object, got {type(raw).__name__}")
    try:
        module = importlib.import_module(module_name)
        model_cls, config_cls = getattr(module, model_name), getattr(module, config_name)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"--model {args.model}: cannot import {module_name}.{model_name}/{config_name} ({err})") from err
    known = config_keys(config_cls) | _CARRIED_CONFIG_KEYS.get(args.model, set())
    for key in raw:
        check_config_key(key, known, f"--config {args.config}", config_name)
    for item in args.set:
        if "=" not in item:
            raise UsageError(f"--set {item!r} must look like key=value")
        key, value = item.split("=", 1)
        check_config_key(key, known, f"--set {item}", config_name)
        raw[key] = _parse_value(value)
    expected = getattr(config_cls, "model_type", None)
    given = raw.get("model_type")
    if given is not None and expected and given != expected:
        raise UsageError(f"--config {args.config} has model_type={given!r} but --model {args.model} expects "
                         f"{expected!r}; pass the matching --model or config")
    raw.pop("model_type", None)
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if key in raw and (not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1):
            raise UsageError(f"--config {args.config}: {key}={raw[key]!r} must be a positive integer")
    try:
        config = config_cls(**raw)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--config {args.config} is not a valid {config_name}: {err}") from err
    return model_cls, config


def _preset(args) -> dict | None:
    """The config dict of an official TTT preset named by --config (`125m-TTT`, ...), else None."""
    if args.model != "ttt" or Path(args.config).suffix == ".json" or Path(args.config).exists():
        return None
    from official_port.configuration_ttt import CONFIGS

    return dict(CONFIGS[args.config]) if args.config in CONFIGS else None


def config_keys(config_cls) -> set[str]:
    """Every key `config_cls` understands: its __init__ arguments and the attributes of a default instance
    (for Hugging Face configs that includes the PretrainedConfig base keys such as `bos_token_id`)."""
    params = inspect.signature(config_cls.__init__).parameters
    keys = {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    try:
        default = config_cls()
        keys |= set(default.to_dict() if hasattr(default, "to_dict") else vars(default))
    except (TypeError, ValueError):
        pass
    keys.add("model_type")
    return keys


def check_config_key(key: str, known: set[str], where: str, config_name: str) -> None:
    """UsageError for a key `config_cls` would silently ignore, naming the closest valid key."""
    if key in known:
        return
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
    raise UsageError(f"{where}: unknown {config_name} key {key!r}{hint}")


def config_dict(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    return {k: v for k, v in sorted(d.items()) if k not in _VOLATILE_CONFIG_KEYS}


# --------------------------------------------------------------------------------------------- setup
def setup_distributed(force_pg: bool) -> tuple[int, int, torch.device]:
    """Join torchrun's group (env://) or make a 1-rank group; NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, device_id=device if cuda else None)
    elif force_pg:
        # plain `python`: a 1-rank group on an in-memory store, so FSDP2 and DCP run the same code path
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def build_model(model_cls, config, args, rank: int, world: int, device: torch.device, use_fsdp: bool):
    """Meta build -> parallelize -> materialise -> weights from the model's own init on rank 0."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full_state = {}
    if rank == 0 or not use_fsdp:
        # the model's __init__ runs post_init -> _init_weights: seeded here, identical for any world size
        torch.manual_seed(args.seed)
        reference = model_cls(config)
        full_state = reference.state_dict()
        if not use_fsdp:
            model = reference.to(device)
    if use_fsdp:
        with meta_parameters():
            model = model_cls(config)
        bf16 = args.precision == "bf16"
        parallelize(model, activation_checkpointing=args.activation_checkpointing, compile=args.compile,
                    fsdp=True, param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        materialize(model, device)
        set_model_state_dict(model, full_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        dist.barrier()
    else:
        parallelize(model, activation_checkpointing=args.activation_checkpointing, compile=args.compile, fsdp=False)
    del full_state
    model.train()
    return model


def load_data(args, tokenizer, rank: int, world: int, split: str = "train", dataset: str | None = None):
    """`[N, seq_len]` token rows: a prepared corpus (memory-mapped shards, streamed), or raw text packed in
    memory (rank 0 tokenises and caches, the others read its cache)."""
    import torch.distributed as dist

    from ttt_common.data import load_texts
    from ttt_common.shards import TokenShards, is_prepared
    from ttt_common.tokenizer import cache_dir

    source = dataset if dataset is not None else args.dataset
    if is_prepared(source):
        shards = TokenShards(source, args.seq_len)
        ours = f"{getattr(tokenizer, 'name_or_path', '') or 'gpt2'}|{len(tokenizer)}"
        if shards.index.get("tokenizer") != ours:
            raise UsageError(f"{source} was tokenised with {shards.index.get('tokenizer')!r} but this run uses "
                             f"{ours!r} (--tokenizer {args.tokenizer or 'gpt2'}); pass the same --tokenizer")
        return shards
    if split == "eval" and dataset is None and is_prepared(args.dataset):
        raise UsageError(f"--dataset {args.dataset} is a prepared corpus (no eval split): pass --eval-data")
    texts = load_texts(source, text_field=args.text_field, split=split,
                       max_docs=args.max_docs if split == "train" else None)
    folder = cache_dir() / "packed"
    if rank == 0:
        data = tokenize_and_pack(texts, tokenizer, args.seq_len, cache_dir=folder)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        data = tokenize_and_pack(texts, tokenizer, args.seq_len, cache_dir=folder)
    return data


def data_fingerprint(args, tokenizer, data, source: str | None) -> dict:
    """What identifies the training data: source spec, tokenizer, and a content hash of the packed tokens
    (so a resume on other data is refused even when the number and length of sequences match)."""
    if hasattr(data, "fingerprint"):  # prepared shards: hashed when written, nothing to read now
        digest = data.fingerprint
    else:
        h = hashlib.sha256()
        step = 1 << 16  # rows per chunk
        for i in range(0, data.shape[0], step):
            h.update(np.ascontiguousarray(data[i:i + step]).tobytes())
        digest = h.hexdigest()
    return {"source": source or "stdlib", "max_docs": args.max_docs,
            "tokenizer": f"{getattr(tokenizer, 'name_or_path', '') or 'gpt2'}|{len(tokenizer)}",
            "shape": [int(x) for x in data.shape], "sha256": digest}


def check_data_fingerprint(saved: dict | None, current: dict) -> None:
    if saved is None:
        return  # a checkpoint from before fingerprints: the loader still checks count and length
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in sorted(set(saved) | set(current))
             if saved.get(k) != current.get(k)]
    if diffs:
        raise UsageError("--resume: the training data differ from the checkpoint's (" + "; ".join(diffs) + "); resume "
                         "with the same --dataset, --max-docs, --tokenizer and --seq-len, or start a new --out")


# --------------------------------------------------------------------------------------------- loop
class StopFlag:
    """Set by SIGTERM or SIGINT (torchrun forwards both to every rank; Ctrl-C reaches the whole process
    group); agreed on by all ranks after each step so they stop at the same step and save one consistent
    checkpoint. The same all-reduce carries rank 0's "a time-based save is due", so clocks that differ
    between ranks never split the ranks."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.raised = False
        self.signal = None
        self._previous = {}

    def install(self) -> None:
        def handler(signum, frame):
            self.raised = True
            self.signal = signum

        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, handler)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def agreed(self, device: torch.device, save_due: bool = False) -> tuple[bool, bool]:
        """(stop now, save now) as agreed by all ranks: any rank's signal, rank 0's clock."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return self.raised, save_due
        due = save_due and dist.get_rank() == 0
        t = torch.tensor([1.0 if self.raised else 0.0, 1.0 if due else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0].item() > 0), bool(t[1].item() > 0)


def train_step(model, optimizer, loader, args, device, step: int, autocast) -> tuple[float, float]:
    """One optimizer step over `--grad-accum` micro-batches. Returns (global mean loss, grad norm).

    The step is skipped (no optimizer update, gradients dropped) when the loss or the gradient norm is
    not finite; the caller counts it.
    """
    import torch.distributed as dist

    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    for _ in range(args.grad_accum):
        batch = loader.next_batch().to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        if step in args.nonfinite_steps:
            loss = loss * float("nan")
        # every micro-batch holds the same number of target tokens, so the mean of per-micro-batch means
        # (and FSDP's mean over ranks) is the mean over the global batch
        (loss / args.grad_accum).backward()
        loss_sum += loss.detach().float()
    if dist.is_initialized():
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    world = dist.get_world_size() if dist.is_initialized() else 1
    loss_value = float(loss_sum) / (args.grad_accum * world)
    norm = grad_norm_and_clip(model, args.clip)
    if math.isfinite(loss_value) and math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm


@torch.no_grad()
def evaluate(model, eval_data, args, device, rank: int, world: int, autocast) -> dict:
    """Held-out mean loss (nats/token) and perplexity over a fixed set of sequences.

    The set is the first `eval_batches * batch_size * world` sequences of `eval_data` (fewer when it holds
    fewer, rounded down to whole global micro-batches), the same at every evaluation; rank r reads its
    slice of each global micro-batch. Every micro-batch has the same number of targets, so the mean of
    the per-batch means is the token mean.
    """
    import torch.distributed as dist

    global_batch = args.batch_size * world
    n_batches = min(args.eval_batches, eval_data.shape[0] // global_batch)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float32)
    for b in range(n_batches):
        start = b * global_batch + rank * args.batch_size
        batch = torch.from_numpy(eval_data[start:start + args.batch_size].astype("int64")).to(device)
        with autocast:
            total += model(input_ids=batch, labels=batch).loss.detach().float()
    if dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    model.train(was_training)
    loss = float(total) / (n_batches * world)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": n_batches * global_batch *
            (args.seq_len - 1)}


def check_run_inputs(args: argparse.Namespace, config, tokenizer) -> bool:
    """Refuse, before any process group exists, a run that cannot work; fill `--precision`'s default.

    Returns whether the process was started by torchrun (RANK and WORLD_SIZE set).
    """
    n_tok = len(tokenizer)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None or vocab < n_tok:
        raise UsageError(f"--config {args.config}: vocab_size={vocab} does not cover the tokenizer's {n_tok} tokens "
                         f"(--tokenizer {args.tokenizer or 'gpt2'}); set vocab_size >= {n_tok} in the config or pass "
                         f"--set vocab_size={n_tok}. The model is not resized automatically.")
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and args.seq_len > max_pos:
        print(f"warning: --seq-len {args.seq_len} exceeds the config's max_position_embeddings={max_pos}; "
              "positions beyond it were never seen by such a model's design", file=sys.stderr)
    if args.eval_data is not None and _looks_like_path(args.eval_data) and not Path(args.eval_data).exists():
        raise UsageError(f"--eval-data {args.eval_data}: no such file or directory")
    if args.dataset is not None and _looks_like_path(args.dataset) and not Path(args.dataset).exists():
        raise UsageError(f"--dataset {args.dataset}: no such file or directory (pass an existing local path, a "
                         "Hugging Face dataset id, or nothing for the standard-library code corpus)")
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.no_fsdp and distributed and int(os.environ["WORLD_SIZE"]) > 1:
        raise UsageError("--no-fsdp runs one process only; drop it under torchrun with several ranks")
    if args.precision is None:
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    return distributed


def open_checkpointer(args: argparse.Namespace, distributed: bool) -> tuple[Checkpointer, int | None]:
    """The run's `Checkpointer` and its latest complete step (None: none). Rank 0 cleans what an
    interrupted save left; an existing checkpoint without `--resume` is refused (nothing is overwritten)."""
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(args.out) / "checkpoints"
    checkpointer = Checkpointer(ckpt_dir, keep=args.keep_checkpoints)
    # decided before any process group exists, so a refused start costs nothing
    if not distributed or int(os.environ.get("RANK", 0)) == 0:
        for line in checkpointer.clean_stale():
            print(f"checkpoints: {line} (left by an interrupted save)", file=sys.stderr)
    existing = checkpointer.latest_step() if ckpt_dir.exists() else None
    if existing is not None and not args.resume:
        raise UsageError(f"--checkpoint-dir {ckpt_dir} already holds a checkpoint (step {existing}); pass --resume "
                         "to continue it, or choose another --checkpoint-dir / --out")
    return checkpointer, existing


@dataclasses.dataclass
class TrainRun:
    """What one training run holds between steps (built by `build_run`, advanced by `train_loop`)."""

    args: argparse.Namespace
    config: object
    device: torch.device
    rank: int
    world: int
    loader: PackedLoader
    data_fp: dict
    eval_data: np.ndarray | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    fingerprint: dict
    autocast: contextlib.AbstractContextManager
    checkpointer: Checkpointer
    n_sequences: int = 0
    step: int = 0
    tokens_seen: int = 0
    guard: NonFiniteGuard = dataclasses.field(default_factory=NonFiniteGuard)

    def trajectory_args(self) -> dict:
        """The flags a resumed run must share with the saved one for the loss trajectory to continue."""
        return {k: getattr(self.args, k) for k in ("batch_size", "grad_accum", "seq_len", "lr", "warmup_steps",
                                                   "steps", "min_lr_ratio", "clip", "weight_decay", "seed")}

    def save(self, logger: MetricsLogger) -> None:
        """Collective: a DCP checkpoint of the model, optimizer and this rank's loop state at `step`."""
        state = {"step": self.step, "loader": self.loader.state_dict(), "rng": rng_state(self.device),
                 "skipped_steps": self.guard.skipped, "tokens_seen": self.tokens_seen,
                 "trajectory_args": self.trajectory_args(), "data_fingerprint": self.data_fp}
        path = self.checkpointer.save(self.step, self.model, self.optimizer, state, self.fingerprint)
        logger.write(f"saved checkpoint {path}")

    def restore(self, step: int) -> None:
        """Load checkpoint `step` into the model, optimizer, loader, RNG and counters; warn (rank 0) about
        flags that differ from the saved run's."""
        self.step, state = self.checkpointer.load(self.model, self.optimizer, step=step, fingerprint=self.fingerprint)
        check_data_fingerprint(state.get("data_fingerprint"), self.data_fp)
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"], self.device)
        self.guard.skipped, self.tokens_seen = int(state["skipped_steps"]), int(state["tokens_seen"])
        for key, value in state.get("trajectory_args", {}).items():
            if getattr(self.args, key, value) != value and self.rank == 0:
                print(f"warning: resuming with --{key.replace('_', '-')}={getattr(self.args, key)} but the checkpoint "
                      f"was written with {value}; the loss trajectory will differ", file=sys.stderr)


def build_run(args: argparse.Namespace, model_cls, config, tokenizer, checkpointer: Checkpointer,
              rank: int, world: int, device: torch.device) -> TrainRun:
    """Data (train, eval), model (meta -> parallelize -> init), AdamW and the model fingerprint."""
    torch.manual_seed(args.seed)
    data = load_data(args, tokenizer, rank, world)
    loader = PackedLoader(data, args.batch_size, rank=rank, world_size=world, seed=args.seed)
    data_fp = data_fingerprint(args, tokenizer, data, args.dataset)
    eval_data = None
    if args.eval_every:
        eval_data = load_data(args, tokenizer, rank, world, split="eval", dataset=args.eval_data)
        if eval_data.shape[0] < args.batch_size * world:
            raise UsageError(f"the eval data hold {eval_data.shape[0]} sequences, fewer than one global micro-batch "
                             f"({args.batch_size} x {world} ranks); give more --eval-data or a shorter --seq-len")
    model = build_model(model_cls, config, args, rank, world, device, not args.no_fsdp)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(args.beta1, args.beta2), eps=1e-8)
    fingerprint = model_fingerprint(model, {"model": args.model, **config_dict(config)})
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if (args.no_fsdp and args.precision == "bf16") else contextlib.nullcontext())
    return TrainRun(args=args, config=config, device=device, rank=rank, world=world, loader=loader, data_fp=data_fp,
                    eval_data=eval_data, model=model, optimizer=optimizer, fingerprint=fingerprint,
                    autocast=autocast, checkpointer=checkpointer, n_sequences=int(data.shape[0]),
                    guard=NonFiniteGuard(args.max_nonfinite_in_a_row))


def open_logger(run_: TrainRun, start_step: int) -> MetricsLogger:
    """The metrics logger (rank 0 writes), its first line, and `run_args.json` in the run folder."""
    args, out = run_.args, Path(run_.args.out)
    logger = MetricsLogger(out, total_steps=args.steps, start_step=start_step, enabled=run_.rank == 0,
                           log_every=args.log_every, progress=not args.no_progress,
                           backends=args.log_backends, run_config={k: v for k, v in vars(args).items()
                                                                   if isinstance(v, (int, float, str, bool))})
    n_params = sum(p.numel() for p in run_.model.parameters())
    logger.write(f"model {args.model} ({type(run_.config).__name__}) {n_params / 1e6:.2f}M params | world {run_.world} | "
                 f"device {run_.device.type} | {args.precision} | fsdp {not args.no_fsdp} | "
                 f"AC {args.activation_checkpointing} | compile {args.compile} | {run_.n_sequences} sequences x "
                 f"{args.seq_len} tokens | global batch {args.batch_size * run_.world * args.grad_accum} seqs"
                 + (f" | resumed at step {start_step}" if start_step else ""))
    if run_.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_args.json").write_text(json.dumps({k: v for k, v in vars(args).items()
                                                       if k not in ("nonfinite_steps", "log_backends")},
                                                      indent=1, sort_keys=True))
    return logger


def train_loop(run_: TrainRun, logger: MetricsLogger, stop: StopFlag) -> bool:
    """Steps from `run_.step` to `--steps`: schedule, step, metrics, evaluation, interval/time/signal saves,
    and a final save. Returns True when a signal stopped it."""
    args, device = run_.args, run_.device
    tokens_per_step = args.batch_size * run_.world * args.grad_accum * args.seq_len
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stopped_by_signal = False
    last_saved = run_.step if run_.step else None
    last_save_time = time.monotonic()
    while run_.step < args.steps:
        lr = lr_at(run_.step, lr=args.lr, warmup_steps=args.warmup_steps, total_steps=args.steps,
                   min_lr_ratio=args.min_lr_ratio)
        for group in run_.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss, norm = train_step(run_.model, run_.optimizer, run_.loader, args, device, run_.step + 1, run_.autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        run_.step += 1
        run_.tokens_seen += tokens_per_step
        finite = run_.guard.ok(run_.step, loss, norm)  # raises after --max-nonfinite-in-a-row
        if not finite:
            logger.write(f"step {run_.step}: non-finite loss {loss} / grad norm {norm}: optimizer step skipped "
                         f"({run_.guard.skipped} skipped so far)")
        record = {"loss": loss, "grad_norm": norm, "lr": lr, "tokens_per_s": tokens_per_step / dt,
                  "step_time_s": dt, "peak_mem_gib": peak_memory_gib(device), "skipped_steps": run_.guard.skipped,
                  "tokens_seen": run_.tokens_seen, "skipped": not finite}
        if run_.eval_data is not None and (run_.step % args.eval_every == 0 or run_.step == args.steps):
            record.update(evaluate(run_.model, run_.eval_data, args, device, run_.rank, run_.world, run_.autocast))
        logger.log(record, run_.step)
        time_due = bool(args.checkpoint_minutes) and time.monotonic() - last_save_time >= 60 * args.checkpoint_minutes
        stop_now, save_now = stop.agreed(device, time_due)
        if stop_now:
            stopped_by_signal = True
            break
        step_due = bool(args.checkpoint_interval) and run_.step % args.checkpoint_interval == 0
        if (step_due or save_now) and run_.step < args.steps:
            run_.save(logger)
            last_saved = run_.step
            last_save_time = time.monotonic()
    if last_saved != run_.step:
        run_.save(logger)
    return stopped_by_signal


def run(args: argparse.Namespace) -> int:
    """Check the inputs, start the process group, build, resume, loop, and report; returns the exit code
    (0, or `EXIT_PREEMPTED` after a signal: the last step was saved, `--resume` continues it)."""
    import torch.distributed as dist

    from ttt_common.tokenizer import load_tokenizer

    validate_args(args)
    model_cls, config = load_model_config(args)
    tokenizer = load_tokenizer(args.tokenizer)
    distributed = check_run_inputs(args, config, tokenizer)
    checkpointer, existing = open_checkpointer(args, distributed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(force_pg=not args.no_fsdp)
    stop = StopFlag()
    try:
        run_ = build_run(args, model_cls, config, tokenizer, checkpointer, rank, world, device)
        if args.resume and existing is not None:
            run_.restore(existing)
        logger = open_logger(run_, run_.step)
        stop.install()
        stopped_by_signal = train_loop(run_, logger, stop)
        if stopped_by_signal:
            logger.write(f"stopped by signal at step {run_.step}; resume with the same command plus --resume "
                         f"(exit code {EXIT_PREEMPTED})")
        logger.close(plot=True)
        out = Path(args.out)
        if rank == 0 and not stopped_by_signal:
            print(f"done: {run_.step} steps, {run_.guard.skipped} skipped; metrics in {out / 'metrics.jsonl'}, "
                  f"plot {out / 'loss.png'}", flush=True)
        return EXIT_PREEMPTED if stopped_by_signal else 0
    finally:
        stop.uninstall()
        if dist.is_initialized():
            dist.destroy_process_group()


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the `toml` extra installs tomli
        try:
            import tomli as tomllib
        except ModuleNotFoundError as err:
            raise UsageError("--job needs Python >= 3.11 or the tomli package (pip install 'ttt-toolkit[toml]')") from err
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as err:
        raise UsageError(f"--job {path}: no such file") from err
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"--job {path} is not valid TOML: {err}") from err


def job_defaults(parser: argparse.ArgumentParser, job: str) -> dict:
    """The options a TOML job file sets, as argparse dests; unknown keys are refused naming the closest option.

    Tables only group keys for the reader (`[model]`, `[data]`, `[optimisation]`, ...): every key must be an
    option of this CLI, spelt with `_` or `-` (`seq_len` or `seq-len`); `set` is a list of KEY=VALUE strings.
    """
    path = resolve_job(job)
    options = {a.dest: a for a in parser._actions if a.dest not in ("help", "job")}
    flat: dict = {}
    for key, value in _load_toml(path).items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            flat[k.replace("-", "_")] = v
    for key, value in flat.items():
        if key not in options:
            close = difflib.get_close_matches(key, sorted(options), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"--job {job}: unknown option {key!r}{hint}")
        action = options[key]
        if action.const is not None and action.nargs == 0 and key == "precision":
            continue
        if isinstance(action, argparse._StoreTrueAction) and not isinstance(value, bool):
            raise UsageError(f"--job {job}: {key} must be true or false, got {value!r}")
        if action.choices is not None and value not in action.choices:
            raise UsageError(f"--job {job}: {key}={value!r} must be one of {sorted(action.choices)}")
        if action.type is not None and not isinstance(value, bool) and value is not None:
            try:
                value = action.type(value)
            except (TypeError, ValueError) as err:
                raise UsageError(f"--job {job}: {key}={value!r} is not a valid {action.type.__name__}") from err
        flat[key] = value
    if "precision" in flat and flat["precision"] not in ("bf16", "fp32"):
        raise UsageError(f"--job {job}: precision={flat['precision']!r} must be 'bf16' or 'fp32'")
    return flat


def resolve_job(job: str) -> Path:
    """A job file path, or the name of a bundled one (configs/jobs/<name>.toml)."""
    path = Path(job)
    if path.is_file():
        return path
    bundled = Path(__file__).resolve().parent / "configs" / "jobs" / f"{job}.toml"
    if bundled.is_file():
        return bundled
    return path  # _load_toml reports it missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line over job file over defaults."""
    parser = build_parser()
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--job", default=None)
    known, _ = peek.parse_known_args(argv)
    if known.job is not None:
        parser.set_defaults(**job_defaults(parser, known.job))
    args = parser.parse_args(argv)
    if args.config is None:
        raise UsageError("--config is required (on the command line or in the --job file)")
    return args


def main(argv: list[str] | None = None) -> int:
    """`python scripts/train.py` / `ttt-train`: errors are one line + exit code (`ttt_common.cli.run_cli`)."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        validate_inputs(args)
        return run(args)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError) as err:
        if debug_enabled():
            raise
        prefix = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as err:  # the run diverged: not a bug, not bad input; the message says what to do
        if debug_enabled():
            raise
        prefix = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED


if __name__ == "__main__":
    sys.exit(main())
