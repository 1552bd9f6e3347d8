"""Load official JAX TTT checkpoints and flattened flax parameter dicts into `TTTForCausalLM`.

Reproduces the reading side of test-time-training/ttt-lm-jax `ttt/infra/checkpoint.py`
(`StreamingCheckpointer.load_checkpoint`: a msgpack stream of `[key, flax.serialization.to_bytes(leaf)]`
pairs, floats stored as bfloat16) with `msgpack` + numpy only, and maps the flax parameter tree of
`ttt/models/model.py` (`CausalLM`) onto this port's `state_dict` through one declarative name map
(torchtitan `state_dict_adapter` style). The TTT layer part of the map lives once, in
`official_port.layers.flax_layer_params_to_torch`.

Command line (writes a Hugging Face folder and reloads it as a check):

    python -m official_port.convert_jax CHECKPOINT --config JSON_OR_PRESET --out DIR

CHECKPOINT is a `streaming_params` / `streaming_train_state` file, or an `.npz` of flattened flax
params (keys `model/...`, optionally prefixed `param/` as in the parity fixtures).

Every parameter's values are checked before conversion (`check_param_values`): a non-finite value,
or one implausibly far outside its tensor (damaged bytes: a flipped exponent bit turns a 0.02 weight
into ~1e3), stops the conversion with the key, index and value (`--value-check warn` only warns).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import msgpack
import numpy as np
import torch

from official_port.configuration_ttt import CONFIGS, TTTConfig
from official_port.layers import TTT_LAYERS, flax_layer_params_to_torch
from official_port.modeling_ttt import TTTForCausalLM

__all__ = [
    "flax_params_to_state_dict",
    "read_streaming_checkpoint",
    "load_official_checkpoint",
    "load_flax_params",
    "resolve_config",
    "check_param_values",
    "MODEL_KEY_MAP",
]

# ----------------------------------------------------------------------------------------------
# the name map
# ----------------------------------------------------------------------------------------------


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _dense(a: np.ndarray) -> np.ndarray:
    # flax Dense kernel is [in, out]; nn.Linear.weight is [out, in]
    return a.T


def _depthwise_conv(a: np.ndarray) -> np.ndarray:
    # flax depthwise Conv kernel [w, 1, D] -> nn.Conv1d(groups=D).weight [D, 1, w] (no flip: both correlate)
    return np.transpose(a, (2, 1, 0))


# flax key (`{}` = block index) -> (torch key, transform). The TTT layer under
# `model/h/{}/seq_modeling_block/` is mapped by the layer's own `flax_layer_params_to_torch`.
MODEL_KEY_MAP: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "model/wte/embedding": ("model.wte.weight", _same),
    "model/ln_f/kernel": ("model.ln_f.weight", _same),
    "lm_head/kernel": ("lm_head.weight", _dense),  # only without tied embeddings
    "model/h/{}/seq_norm/kernel": ("model.h.{}.seq_norm.weight", _same),
    "model/h/{}/ffn_norm/kernel": ("model.h.{}.ffn_norm.weight", _same),
    "model/h/{}/feed_forward/w1/kernel": ("model.h.{}.feed_forward.w1.weight", _dense),
    "model/h/{}/feed_forward/w2/kernel": ("model.h.{}.feed_forward.w2.weight", _dense),
    "model/h/{}/feed_forward/w3/kernel": ("model.h.{}.feed_forward.w3.weight", _dense),
    "model/h/{}/conv/conv_norm/kernel": ("model.h.{}.conv.conv_norm.weight", _same),
    "model/h/{}/conv/conv1/kernel": ("model.h.{}.conv.conv1.weight", _depthwise_conv),
    "model/h/{}/conv/conv1/bias": ("model.h.{}.conv.conv1.bias", _same),
    # self-attention blocks
    "model/h/{}/seq_modeling_block/wq/kernel": ("model.h.{}.seq_modeling_block.wq.weight", _dense),
    "model/h/{}/seq_modeling_block/wk/kernel": ("model.h.{}.seq_modeling_block.wk.weight", _dense),
    "model/h/{}/seq_modeling_block/wv/kernel": ("model.h.{}.seq_modeling_block.wv.weight", _dense),
    "model/h/{}/seq_modeling_block/wo/kernel": ("model.h.{}.seq_modeling_block.wo.weight", _dense),
}

_BLOCK_RE = re.compile(r"^model/h/(\d+)/(.*)$")
_TTT_PREFIX = "seq_modeling_block/"


def _expected_state(config: TTTConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the port's state_dict, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = TTTForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # tied to model.wte.weight: no flax parameter
    return shapes


def flax_params_to_state_dict(params: Mapping[str, np.ndarray], config: TTTConfig) -> dict[str, torch.Tensor]:
    """Map flat flax params of the official `CausalLM` to this port's state_dict.

    Args:
        params: `{"model/h/0/seq_modeling_block/wq/kernel": array, ...}`: keys are the flax tree
            path from the CausalLM scope joined with "/" (a slash inside a flax name, e.g.
            `ttt_norm/scale`, stays as is); values numpy arrays (or tensors) in flax layout.
        config: the model's `TTTConfig`.
    Returns:
        `{torch key: float tensor}` covering every parameter of `TTTForCausalLM(config)` (without
        `lm_head.weight` when tied); load with `model.load_state_dict(sd, strict=False)` + `tie_weights()`
        or use `load_flax_params`.
    Raises:
        ValueError listing every missing key, unexpected key and shape mismatch at once.
    """
    expected = _expected_state(config)
    layer_to_torch = None
    if config.seq_modeling_block != "self_attention":
        layer_cls_name = TTT_LAYERS[config.seq_modeling_block].__name__

        def layer_to_torch(sub):
            return flax_layer_params_to_torch(sub, layer_cls_name)

    sd = _StateDictBuilder(expected)
    ttt_groups: dict[str, dict[str, np.ndarray]] = {}

    for key, value in params.items():
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        m = _BLOCK_RE.match(key)
        if m is None:
            if key in MODEL_KEY_MAP:
                torch_key, fn = MODEL_KEY_MAP[key]
                sd.put(key, value.shape, torch_key, fn(value))
            else:
                sd.unexpected.append(key)
            continue
        idx, rest = m.group(1), m.group(2)
        template = f"model/h/{{}}/{rest}"
        if template in MODEL_KEY_MAP and (layer_to_torch is None or not rest.startswith(_TTT_PREFIX)):
            torch_key, fn = MODEL_KEY_MAP[template]
            sd.put(key, value.shape, torch_key.format(idx), fn(value))
        elif rest.startswith(_TTT_PREFIX) and layer_to_torch is not None:
            ttt_groups.setdefault(idx, {})[rest[len(_TTT_PREFIX):]] = value
        else:
            sd.unexpected.append(key)

    for idx, sub in ttt_groups.items():
        prefix = f"model.h.{idx}.seq_modeling_block."
        try:
            layer_sd = layer_to_torch(sub)
        except (KeyError, ValueError) as e:
            sd.problems.append(f"model/h/{idx}/seq_modeling_block: {e}")
            continue
        for k, v in layer_sd.items():
            sd.put(f"model/h/{idx}/seq_modeling_block -> {k}", tuple(v.shape), prefix + k, v)

    missing = sorted(k for k in expected if k not in sd.out and k not in sd.misshaped)
    if missing or sd.unexpected or sd.problems:
        raise _mismatch_error(config, missing, sd.unexpected, sd.problems)
    return sd.out


class _StateDictBuilder:
    """Collects converted tensors under their torch keys, with every unexpected key and shape problem."""

    def __init__(self, expected: dict[str, tuple[int, ...]]):
        self.expected = expected
        self.out: dict[str, torch.Tensor] = {}
        self.unexpected: list[str] = []
        self.problems: list[str] = []
        self.misshaped: set[str] = set()

    def put(self, flax_key: str, flax_shape: tuple[int, ...], torch_key: str, value) -> None:
        if torch_key not in self.expected:
            self.unexpected.append(flax_key)
            return
        t = torch.as_tensor(np.ascontiguousarray(value)) if not isinstance(value, torch.Tensor) else value
        if tuple(t.shape) != self.expected[torch_key]:
            self.problems.append(f"{flax_key}: shape {tuple(flax_shape)} maps to {torch_key} {tuple(t.shape)}, "
                                 f"but the model expects {self.expected[torch_key]}")
            self.misshaped.add(torch_key)
            return
        self.out[torch_key] = t.detach().clone().float() if t.is_floating_point() else t.detach().clone()


def _mismatch_error(config: TTTConfig, missing: list[str], unexpected: list[str], problems: list[str]) -> ValueError:
    """One error listing every missing key, unexpected key and shape problem, with the fix."""
    lines = [f"flax params do not match TTTForCausalLM({config.seq_modeling_block}, "
             f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, pre_conv={config.pre_conv}, "
             f"tie_word_embeddings={config.tie_word_embeddings}):"]
    if missing:
        lines.append(f"  missing (no flax parameter maps to them): {missing}")
    if unexpected:
        lines.append(f"  unexpected flax keys (not part of this config): {sorted(unexpected)}")
    lines += [f"  {p}" for p in problems]
    lines.append("  fix: build the config the checkpoint was trained with (num_hidden_layers, "
                 "seq_modeling_block, pre_conv, tie_word_embeddings, sizes).")
    return ValueError("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# value sanity check
# ----------------------------------------------------------------------------------------------

# A value is implausible when |x| > OUTLIER_RATIO * median|x| of its tensor AND |x| > OUTLIER_MIN_ABS.
# Trained weights sit within ~10x their tensor's median magnitude (the bundled checkpoint: <= 7.2x; large
# LMs' outlier weights reach a few hundred x); one flipped bfloat16 exponent bit multiplies a value by
# 2**16 or more. The absolute floor keeps near-zero tensors (biases) from flagging small values.
OUTLIER_RATIO = 1e4
OUTLIER_MIN_ABS = 1.0
VALUE_CHECK_MODES = ("error", "warn", "off")


def check_param_values(params: Mapping[str, np.ndarray], mode: str = "error") -> list[str]:
    """Look for damaged values in flat flax params: non-finite, or implausibly large for their tensor.

    Args:
        params: `{flax key: array}` as returned by `read_streaming_checkpoint`.
        mode: "error" raises, "warn" warns (`UserWarning`), "off" skips the check.
    Returns:
        one line per damaged tensor (empty when every value is plausible).
    Raises:
        ValueError (mode "error") naming every damaged tensor: key, count, first index and value, the
        rule, and the fix.
    """
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"value_check={mode!r} must be one of {VALUE_CHECK_MODES}")
    if mode == "off":
        return []
    problems = []
    for key, value in params.items():
        a = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if a.dtype.kind != "f" or a.size == 0:
            continue
        mag = np.abs(a)  # in the stored dtype: no float64 copy of a large embedding
        bad = ~np.isfinite(mag)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            problems.append(f"{key}: {int(bad.sum())} non-finite value(s), first at {idx} = {a[idx]}")
            continue
        median = float(np.median(mag))
        limit = max(OUTLIER_MIN_ABS, OUTLIER_RATIO * median)
        big = mag > limit
        if big.any():
            idx = tuple(int(i) for i in np.argwhere(big)[0])
            problems.append(f"{key}: {int(big.sum())} value(s) above {limit:.3g} (= max({OUTLIER_MIN_ABS:g}, "
                            f"{OUTLIER_RATIO:g} x the tensor's median |x| {median:.3g})), first at {idx} = {a[idx]:.6g}")
    if problems and mode == "error":
        raise ValueError("the checkpoint holds damaged values (corrupted bytes?):\n  " + "\n  ".join(problems)
                         + "\n  fix: re-copy or re-save the checkpoint; if these values are genuine, convert with "
                           "--value-check warn (value_check='warn')")
    if problems and mode == "warn":
        warnings.warn("implausible checkpoint values (converted anyway):\n  " + "\n  ".join(problems),
                      UserWarning, stacklevel=2)
    return problems


# ----------------------------------------------------------------------------------------------
# the streaming msgpack format
# ----------------------------------------------------------------------------------------------

_EXT_NDARRAY = 1  # flax.serialization._MsgpackExtType.ndarray
_EXT_NPSCALAR = 3  # flax.serialization._MsgpackExtType.npscalar


def _decode_buffer(dtype_name: str, buf: bytes, shape) -> np.ndarray:
    if dtype_name == "bfloat16":
        # bfloat16 = the upper 16 bits of a float32
        bits = np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16
        arr = bits.view(np.float32)
    else:
        arr = np.frombuffer(buf, dtype=np.dtype(dtype_name))
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)  # the official restore casts every float to float32
    return arr.reshape(shape) if shape is not None else arr.reshape(())


def _ext_hook(code: int, data: bytes):
    if code == _EXT_NDARRAY:
        shape, dtype_name, buf = msgpack.unpackb(data, raw=False)
        return _decode_buffer(dtype_name, buf, tuple(shape))
    if code == _EXT_NPSCALAR:
        dtype_name, buf = msgpack.unpackb(data, raw=False)
        return _decode_buffer(dtype_name, buf, None)
    return msgpack.ExtType(code, data)


def _model_key(key: list[str]) -> str | None:
    """The '/'-joined CausalLM-scope key of a stream entry, or None for non-model entries."""
    if len(key) > 2 and key[0] == "params" and key[1] == "params":  # TrainState.params = {"params": tree}
        key = key[2:]
    # params files start at the tree root; step, opt_state/... and anything else are skipped
    return "/".join(key) if key[0] in ("model", "lm_head") else None


def read_streaming_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Read the model parameters of an official `streaming_params` / `streaming_train_state` file.

    Entries are read one at a time (the file is never loaded whole); optimizer state and `step`
    are skipped. bfloat16 tensors are decoded to float32 exactly.

    Args:
        path: the checkpoint file.
    Returns:
        `{"model/h/0/seq_modeling_block/wq/kernel": float32 array, ...}` (CausalLM scope, '/'-joined).
    Raises:
        FileNotFoundError; ValueError when the file is not such a stream (garbage, truncated, no
        model parameters).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    params: dict[str, np.ndarray] = {}
    n_entries = 0
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, read_size=16 << 20, max_buffer_size=0, raw=False)
        try:
            for entry in unpacker:
                n_entries += 1
                if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], (list, tuple))
                        or not entry[0] or not all(isinstance(c, str) for c in entry[0])
                        or not isinstance(entry[1], bytes)):
                    raise ValueError(f"entry {n_entries} is {type(entry).__name__} {str(entry)[:80]!r}, "
                                     "not a [key path, payload bytes] pair")
                key = _model_key(list(entry[0]))
                if key is None:
                    continue
                value = msgpack.unpackb(entry[1], ext_hook=_ext_hook, raw=False)
                if not isinstance(value, np.ndarray):
                    raise ValueError(f"entry {'/'.join(entry[0])} holds {type(value).__name__}, not an array")
                params[key] = value
        except ValueError as e:
            raise ValueError(f"{path} is not an official streaming checkpoint (msgpack stream of "
                             f"[key, flax bytes] pairs): {e}") from e
        except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError, msgpack.exceptions.StackError,
                TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not an official streaming checkpoint: {type(e).__name__}: {e}") from e
        # a stream cut mid-entry leaves undecoded bytes in the unpacker
        if unpacker.tell() != path.stat().st_size:
            raise ValueError(f"{path} is truncated or has trailing garbage: the msgpack stream ends at byte "
                             f"{unpacker.tell()} of {path.stat().st_size} (re-copy or re-save the checkpoint)")
    if not params:
        raise ValueError(f"{path} holds {n_entries} entries but no model parameters "
                         "(expected keys starting with params/params/model/ or model/)")
    return params


# ----------------------------------------------------------------------------------------------
# loading into a model
# ----------------------------------------------------------------------------------------------


def resolve_config(config: TTTConfig | Mapping | str | Path) -> TTTConfig:
    """A `TTTConfig` from a config object, a dict, a preset name (`"125m-TTT"`) or a JSON file.

    A JSON file may hold the config fields directly, or a parity-fixture JSON with `config_full`
    or `config_overrides`.
    """
    if isinstance(config, TTTConfig):
        return config
    if isinstance(config, Mapping):
        d = dict(config)
        if "config_full" in d:
            d = d["config_full"]
        elif "config_overrides" in d:
            d = d["config_overrides"]
        return TTTConfig(**d)
    if isinstance(config, (str, Path)):
        if str(config) in CONFIGS:
            return TTTConfig.from_preset(str(config))
        p = Path(config)
        if p.is_file():
            return resolve_config(json.loads(p.read_text()))
        raise ValueError(f"config={str(config)!r} is neither a preset ({sorted(CONFIGS)}) nor an existing JSON file")
    raise TypeError(f"config must be a TTTConfig, dict, preset name or JSON path, got {type(config).__name__}")


def load_flax_params(params: Mapping[str, np.ndarray], config, value_check: str = "error") -> TTTForCausalLM:
    """Build `TTTForCausalLM(config)` in eval mode holding the given flat flax params (float32).

    `value_check` ("error", "warn", "off"): what `check_param_values` does with damaged values.
    """
    config = resolve_config(config)
    check_param_values(params, value_check)
    sd = flax_params_to_state_dict(params, config)
    model = TTTForCausalLM(config)
    result = model.load_state_dict(sd, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise ValueError(f"internal mapping error: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    return model.eval()


def load_official_checkpoint(path: str | Path, config, value_check: str = "error") -> TTTForCausalLM:
    """Load an official `streaming_params` / `streaming_train_state` file (or an `.npz` of flat flax
    params) into `TTTForCausalLM(config)`; `config` as in `resolve_config`, `value_check` as in
    `load_flax_params`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".npz":
        try:
            with np.load(path) as z:
                params = {k[len("param/"):] if k.startswith("param/") else k: z[k] for k in z.files
                          if not k.startswith(("input/", "output/", "grad/", "cotangent/", "intermediate/"))}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{path} is not a readable .npz of flax params ({type(e).__name__}: {e}); "
                             "re-copy or re-save it") from e
    else:
        params = read_streaming_checkpoint(path)
    return load_flax_params(params, config, value_check)


def main(argv: list[str] | None = None) -> int:
    """`python -m official_port.convert_jax` / `ttt-convert-jax`: bad input is one line on stderr and exit
    code 2, a reload mismatch exit code 1 (`ttt_common.cli.run_cli`; TTT_DEBUG=1 for the traceback)."""
    from ttt_common.cli import run_cli

    return run_cli(_main, argv)


def validate_cli_args(args: argparse.Namespace) -> TTTConfig:
    """Check the CLI's options before reading the checkpoint; returns the resolved config."""
    from ttt_common.cli import UsageError

    try:
        config = resolve_config(args.config)
    except (ValueError, TypeError) as e:  # a bad preset name, invalid JSON, a field TTTConfig refuses
        raise UsageError(f"--config {args.config}: {e}") from e
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise UsageError(f"checkpoint {ckpt} does not exist")
    if not ckpt.is_file():
        raise UsageError(f"checkpoint {ckpt} is not a file (pass the streaming_params / streaming_train_state "
                         "file itself, or an .npz)")
    if ckpt.stat().st_size == 0:
        raise UsageError(f"checkpoint {ckpt} is empty (0 bytes): re-copy or re-save it")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; choose a folder path")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: cannot write under {parent}")
    return config


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="streaming_params / streaming_train_state file, or .npz of flax params")
    parser.add_argument("--config", required=True, help=f"JSON file or preset ({', '.join(CONFIGS)})")
    parser.add_argument("--out", required=True, help="output folder (Hugging Face save_pretrained)")
    parser.add_argument("--value-check", choices=VALUE_CHECK_MODES, default="error",
                        help="damaged values (non-finite, implausibly large for their tensor): error (default), "
                             "warn, or off")
    args = parser.parse_args(argv)
    # everything cheap first: the checkpoint may be gigabytes
    config = validate_cli_args(args)

    model = load_official_checkpoint(args.checkpoint, config, value_check=args.value_check)
    model.save_pretrained(args.out)
    reloaded = TTTForCausalLM.from_pretrained(args.out).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, min(32, model.config.max_sequence_length)),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, reloaded(ids).logits
    diff = (a - b).abs().max().item()
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint} -> {args.out}: {n:,} parameters, "
          f"{model.config.seq_modeling_block}, reload max|logit diff| = {diff:.3g}")
    if diff != 0.0:
        print("ERROR: the reloaded model differs from the converted one")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
