"""Live parity: fresh cases from the official JAX code (test-time-training/ttt-lm-jax), checked on the fly.

The bundled fixtures were made once, with fixed seeds and shapes. Live mode makes new ones with
other seeds and shapes (hidden 48/96, 3/4 heads, mini-batch 8, conv width 3, ttt_base_lr 0.5,
rope_theta 500, batch 1/3, all four layer classes and 2-layer `CausalLM`s), by running the
official modules `ttt/models/ttt_layer.py` and `ttt/models/model.py` unmodified, and then feeds
them through the same adapters as the bundled cases.

jax and torch are kept apart: this file is our side (the case list, the environment checks, the
subprocess call); `parity/live_jax.py` is the script the JAX environment's python runs as a
subprocess (`TTT_LM_JAX_PYTHON`, default `python`): it imports the official code from the checkout in
`TTT_LM_JAX`, writes each case as `<case>.npz` + `<case>.json` in the fixture format
(`parity/README.md`) to a directory, and our process loads them with `parity.fixtures.load_case`.
That script uses only the standard library, numpy, jax and flax (no torch, no `parity.*`).

The official `ttt/infra/jax_utils.py` imports torch at module level, only for seeding training
runs; as for the bundled fixtures, an empty stand-in module is registered under that name before
the official code is imported (after transformers has probed for the real torch, which the stand-in
would confuse), unless a real torch is installed there.

Usage:
    TTT_LM_JAX=/path/to/ttt-lm-jax TTT_LM_JAX_PYTHON=/path/to/jax-venv/bin/python python -m parity --live
    TTT_LM_JAX=... TTT_LM_JAX_PYTHON=... pytest parity/test_parity.py -k live
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from parity.live_jax import OFFICIAL_FILES

ENV_REPO = "TTT_LM_JAX"
ENV_PYTHON = "TTT_LM_JAX_PYTHON"
LIVE_PREFIX = "live_"

_LAYER_BASE = {"initializer_range": 0.02, "remat_conv": "", "remat_mini_batch_group_size": 1}

# The live cases. Every shape/seed differs from the bundled fixtures (hidden 64, 4 heads,
# mini-batch 16, conv width 4, ttt_base_lr 1.0, batch 2, seeds < 100). Layer cases: L must equal
# max_sequence_length (the official layer splits by the config value).
LIVE_CASES: list[dict] = [
    {
        "case": "live_layer_ttt_linear_h48_nh3_mb8_w3_b3",
        "kind": "layer",
        "class": "ttt.models.ttt_layer.TTTLinear",
        "seed": 101,
        "batch": 3,
        "config": {**_LAYER_BASE, "hidden_size": 48, "num_attention_heads": 3, "mini_batch_size": 8,
                   "max_sequence_length": 32, "conv_width": 3, "rope_theta": 10000.0, "ttt_base_lr": 0.5},
        "ttt_lr_mult": 1.0,
        "position_offsets": [0, 0, 0],
    },
    {
        "case": "live_layer_ttt_mlp_h96_nh4_mb8_w3_b1_pos5",
        "kind": "layer",
        "class": "ttt.models.ttt_layer.TTTMLP",
        "seed": 102,
        "batch": 1,
        "config": {**_LAYER_BASE, "hidden_size": 96, "num_attention_heads": 4, "mini_batch_size": 8,
                   "max_sequence_length": 24, "conv_width": 3, "rope_theta": 500.0, "ttt_base_lr": 0.5},
        "ttt_lr_mult": 0.7,
        "position_offsets": [5],
    },
    {
        "case": "live_layer_ttt_linear_base_h48_nh4_mb8_b3_rows",
        "kind": "layer",
        "class": "ttt.models.ttt_layer.TTTLinearBase",
        "seed": 103,
        "batch": 3,
        "config": {**_LAYER_BASE, "hidden_size": 48, "num_attention_heads": 4, "mini_batch_size": 8,
                   "max_sequence_length": 32, "conv_width": 3, "rope_theta": 10000.0, "ttt_base_lr": 0.5,
                   "remat_mini_batch_group_size": 2},
        "ttt_lr_mult": 1.0,
        "position_offsets": [0, 3, 11],
    },
    {
        "case": "live_layer_ttt_mlp_base_h96_nh3_mb8_b1",
        "kind": "layer",
        "class": "ttt.models.ttt_layer.TTTMLPBase",
        "seed": 104,
        "batch": 1,
        "config": {**_LAYER_BASE, "hidden_size": 96, "num_attention_heads": 3, "mini_batch_size": 8,
                   "max_sequence_length": 32, "conv_width": 3, "rope_theta": 10000.0, "ttt_base_lr": 0.5},
        "ttt_lr_mult": 1.3,
        "position_offsets": [0],
    },
    {
        "case": "live_model_ttt_linear_h48_nh3_mb8_w3_b3",
        "kind": "model",
        "class": "ttt.models.model.CausalLM",
        "seed": 105,
        "batch": 3,
        "config": {**_LAYER_BASE, "vocab_size": 96, "num_hidden_layers": 2, "hidden_size": 48,
                   "num_attention_heads": 3, "intermediate_size": 80, "max_sequence_length": 32,
                   "mini_batch_size": 8, "tie_word_embeddings": True, "rope_theta": 10000.0,
                   "ttt_base_lr": 0.5, "rms_norm_eps": 1e-6, "conv_width": 3, "pre_conv": True,
                   "seq_modeling_block": "ttt_linear"},
    },
    {
        "case": "live_model_ttt_mlp_h96_nh4_mb8_noconv_b1",
        "kind": "model",
        "class": "ttt.models.model.CausalLM",
        "seed": 106,
        "batch": 1,
        "config": {**_LAYER_BASE, "vocab_size": 64, "num_hidden_layers": 2, "hidden_size": 96,
                   "num_attention_heads": 4, "intermediate_size": 160, "max_sequence_length": 24,
                   "mini_batch_size": 8, "tie_word_embeddings": True, "rope_theta": 10000.0,
                   "ttt_base_lr": 0.5, "rms_norm_eps": 1e-6, "conv_width": 3, "pre_conv": False,
                   "seq_modeling_block": "ttt_mlp"},
    },
    {
        "case": "live_model_self_attention_h48_nh3_b3",
        "kind": "model",
        "class": "ttt.models.model.CausalLM",
        "seed": 107,
        "batch": 3,
        "config": {**_LAYER_BASE, "vocab_size": 80, "num_hidden_layers": 2, "hidden_size": 48,
                   "num_attention_heads": 3, "intermediate_size": 96, "max_sequence_length": 16,
                   "mini_batch_size": 8, "tie_word_embeddings": True, "rope_theta": 10000.0,
                   "ttt_base_lr": 0.5, "rms_norm_eps": 1e-6, "conv_width": 3, "pre_conv": False,
                   "seq_modeling_block": "self_attention"},
    },
]
LIVE_CASE_NAMES = [spec["case"] for spec in LIVE_CASES]


class LiveGenerationError(RuntimeError):
    """The JAX subprocess failed; the message carries the tail of its stderr."""


def official_dir() -> Path | None:
    """The official checkout named by `TTT_LM_JAX` (None when unset)."""
    value = os.environ.get(ENV_REPO, "").strip()
    return Path(value).expanduser() if value else None


def jax_python() -> str:
    """The python of the JAX environment (`TTT_LM_JAX_PYTHON`, default `python`)."""
    return os.environ.get(ENV_PYTHON, "").strip() or "python"


_PROBES: dict[tuple[str, str], str] = {}


def unavailable_reason() -> str:
    """Why live mode cannot run here ('' when it can). Probes the JAX python once per setting."""
    repo = official_dir()
    if repo is None:
        return (f"environment variable {ENV_REPO} is not set; point it to a checkout of "
                f"test-time-training/ttt-lm-jax (and {ENV_PYTHON} to a python with jax and flax)")
    missing = [f for f in OFFICIAL_FILES if not (repo / f).is_file()]
    if missing:
        return (f"{ENV_REPO}={repo} is not a checkout of test-time-training/ttt-lm-jax "
                f"(missing {', '.join(missing)})")
    python = jax_python()
    key = (str(repo), python)
    if key not in _PROBES:
        probe = "import jax, flax, numpy; print(jax.__version__, flax.__version__, numpy.__version__)"
        try:
            proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120,
                                  env=_subprocess_env())
            _PROBES[key] = "" if proc.returncode == 0 else (
                f"{ENV_PYTHON}={python} cannot import jax and flax: {_tail(proc.stderr, 1)} "
                "(install them there, see parity/README.md 'Live mode')")
        except (OSError, subprocess.TimeoutExpired) as exc:
            _PROBES[key] = f"{ENV_PYTHON}={python} cannot be run: {exc}"
    return _PROBES[key]


def _tail(text: str, n_lines: int = 15) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-n_lines:])


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")  # the fixtures were made on CPU; never grab a GPU here
    env.pop("PYTHONPATH", None)  # our tree must not shadow anything in the JAX environment
    return env


def _run_generator(args: list[str], timeout: float) -> str:
    repo = official_dir()
    reason = unavailable_reason()
    if reason:
        raise LiveGenerationError(reason)
    cmd = [jax_python(), str(Path(__file__).with_name("live_jax.py").resolve()), "--repo", str(repo), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_subprocess_env())
    except subprocess.TimeoutExpired as exc:
        raise LiveGenerationError(f"the JAX generator ran past {timeout:.0f} s: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        raise LiveGenerationError(
            f"the JAX generator failed (exit {proc.returncode}): {' '.join(cmd)}\n{_tail(proc.stderr)}")
    return proc.stdout


def generate_cases(out_dir: str | Path, names: list[str] | None = None, timeout: float = 900) -> list[Path]:
    """Write the live cases (all, or those in `names`) to `out_dir` with the official JAX code.

    Args:
        out_dir: directory that receives `<case>.npz` + `<case>.json` per case.
        names: subset of `LIVE_CASE_NAMES` (default all).
        timeout: seconds for the whole subprocess.

    Returns:
        The JSON paths written, in `LIVE_CASES` order.

    Raises:
        ValueError: an unknown name. LiveGenerationError: live mode unavailable or the JAX side failed.
    """
    names = LIVE_CASE_NAMES if names is None else list(names)
    unknown = sorted(set(names) - set(LIVE_CASE_NAMES))
    if unknown:
        raise ValueError(f"names: unknown live case(s) {unknown}; known are {LIVE_CASE_NAMES}")
    specs = [spec for spec in LIVE_CASES if spec["case"] in names]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".specs", delete=False) as f:
        json.dump(specs, f)
        spec_file = f.name
    try:
        _run_generator(["--specs", spec_file, "--out", str(out_dir)], timeout)
    finally:
        os.unlink(spec_file)
    paths = [out_dir / f"{spec['case']}.json" for spec in specs]
    missing = [p.name for p in paths if not p.is_file() or not p.with_suffix(".npz").is_file()]
    if missing:
        raise LiveGenerationError(f"the JAX generator exited cleanly but did not write {missing}")
    return paths


def replay_cases(case_jsons: list[str | Path], out_dir: str | Path, timeout: float = 900) -> list[Path]:
    """Recompute existing official cases with the official code, from their own params and inputs.

    The outputs are written as `<case>.npz` + `<case>.json` in `out_dir`. This checks the live
    generator itself (the way it calls the official modules, names keys, forms the VJP and the
    loss) against the bundled fixtures, independently of any port.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["--out", str(out_dir)]
    for path in case_jsons:
        args += ["--replay", str(Path(path).resolve())]
    _run_generator(args, timeout)
    return [out_dir / Path(p).name for p in case_jsons]
