"""Live parity, JAX side: the script `parity.live` runs in the JAX environment (`TTT_LM_JAX_PYTHON`).

It imports the official modules from a test-time-training/ttt-lm-jax checkout unmodified, builds each
requested case (a layer or a 2-layer `CausalLM`, perturbed parameters, a VJP with a random
cotangent, or the loss gradient), and writes `<case>.npz` + `<case>.json` in the fixture format
(`parity/README.md`); `--replay` recomputes a stored official case from its own params and inputs.

Runs in another python than ours: it may import only the standard library at module level (numpy,
jax and flax inside functions) and never torch or `parity.*`, so `parity.live` can import this file
for its constants without pulling in jax.

Usage (what `parity.live` runs):
    $TTT_LM_JAX_PYTHON parity/live_jax.py --repo <ttt-lm-jax checkout> --out <dir> --specs <specs.json>
    $TTT_LM_JAX_PYTHON parity/live_jax.py --repo <checkout> --out <dir> --replay <case.json> ...
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

# the official files the cases come from (their sha256 goes into every case's metadata)
OFFICIAL_FILES = ("ttt/models/ttt_layer.py", "ttt/models/model.py", "ttt/infra/jax_utils.py")


def _import_official(repo: str):
    """Import the official modules from `repo` with the torch stand-in; returns (jax, jnp, flax, M, T, meta)."""
    import importlib.util
    import types

    sys.path.insert(0, repo)
    # transformers probes for torch with importlib.util.find_spec at import time, which raises on a
    # module without __spec__: let it see the real situation first, then register the stand-in.
    import transformers  # noqa: F401
    from transformers import FlaxLogitsWarper, PretrainedConfig  # noqa: F401
    from transformers.modeling_flax_outputs import ModelOutput  # noqa: F401

    stubbed = []
    if importlib.util.find_spec("torch") is None:
        sys.modules["torch"] = types.ModuleType("torch")  # the official code uses it only to seed training
        stubbed.append("torch")

    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", False)
    jax.config.update("jax_default_matmul_precision", "highest")
    import jaxlib
    from ttt.models import model as M
    from ttt.models import ttt_layer as T

    meta = {
        "versions": {
            "python": ".".join(map(str, sys.version_info[:3])), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__, "numpy": np.__version__,
            "transformers": transformers.__version__, "platform": jax.default_backend(),
            "jax_enable_x64": False, "jax_default_matmul_precision": "highest",
        },
        "stubbed_modules": stubbed,
        "official_repo": "test-time-training/ttt-lm-jax",
        "official_files_sha256": {
            f: hashlib.sha256((Path(repo) / f).read_bytes()).hexdigest() for f in OFFICIAL_FILES
        },
        "generator": "parity/live.py",
        "format_version": 1,
    }
    return jax, jnp, flax, M, T, meta


def _flatten(flax, params) -> dict[tuple, object]:
    from flax.core import unfreeze

    return flax.traverse_util.flatten_dict(unfreeze(params))


def _perturb(params_flat: dict, rng, np) -> tuple[dict, dict]:
    """Add noise to every parameter whose init is a constant (norm scales, biases, token offsets).

    Otherwise scales of 1 and biases of 0 would hide wrong handling of those parameters.
    """
    out, record = {}, {}
    for keys, value in params_flat.items():
        value = np.asarray(value, dtype=np.float32)
        if value.size and np.all(value == value.flat[0]):
            const = float(value.flat[0])
            std = 0.1 if const == 1.0 else (0.01 if keys[-1] == "learnable_token_idx" else 0.05)
            value = (value + std * rng.standard_normal(value.shape)).astype(np.float32)
            record["/".join(keys)] = {"initial_constant": const, "noise_std": std}
        out[keys] = value
    return out, record


def _config_dict(cfg) -> dict:
    full = cfg.to_dict()
    full.pop("output_ttt_stats", None)  # the layer overwrites it from its call argument
    return json.loads(json.dumps(full, default=str))


def _layer_arrays(jax, jnp, np, layer, params, x, pos, mult, cot) -> dict:
    """Forward (with stats) and VJP of one official layer; arrays in the fixture key naming."""

    def forward(p, xx):
        out, stats = layer.apply({"params": p}, xx, None, pos, True, output_ttt_stats=True, ttt_lr_mult=mult)
        return out, stats

    def forward_and_vjp(p, xx, c):
        # one compiled function for outputs, stats and the VJP: compiling is most of the cost here
        out, pull, stats = jax.vjp(forward, p, xx, has_aux=True)
        grad_p, grad_x = pull(c)
        return out, stats, grad_p, grad_x

    out, stats, grad_p, grad_x = jax.jit(forward_and_vjp)(params, x, jnp.asarray(cot))
    arrays = {"output/ttt_output": np.asarray(out)}
    for i, stat in enumerate(stats):
        if stat is not None:  # absent statistics are skipped, keeping the official tuple index
            arrays[f"output/stat_{i}"] = np.asarray(stat)
    return arrays, grad_p, np.asarray(grad_x)


def _model_arrays(jax, jnp, np, lm, params, ids) -> tuple[dict, object]:
    """Logits, mean next-token cross-entropy and its parameter gradient of an official CausalLM."""

    def loss_fn(p):
        logits = lm.apply({"params": p}, ids).logits
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
        return nll.mean(), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return {"output/logits": np.asarray(logits), "output/loss": np.asarray(loss, dtype=np.float32)}, grads


_MEANINGS = {
    "input/hidden_states": "layer input, [batch, seq, hidden_size], N(0,1)",
    "input/position_ids": "[batch, seq] int32 (layer: passed as position_ids; model: arange, not passed)",
    "input/ttt_lr_mult": "scalar passed as ttt_lr_mult (multiplies eta)",
    "input/input_ids": "[batch, seq] int32 token ids, uniform in [0, vocab_size)",
    "output/ttt_output": "first element of the layer's return value, [batch, seq, hidden_size]",
    "output/logits": "[batch, seq, vocab_size]",
    "output/loss": "mean next-token cross-entropy over t = 0..L-2",
    "cotangent/ttt_output": "cotangent of the VJP, N(0,1)",
    "grad/input/hidden_states": "VJP of output/ttt_output with cotangent/ttt_output wrt the input",
}


def _meaning(key: str) -> str:
    if key in _MEANINGS:
        return _MEANINGS[key]
    if key.startswith("param/"):
        return "parameter value used for the run (flax layout, after the constant-init perturbation)"
    if key.startswith("grad/param/"):
        return "gradient wrt " + key[len("grad/"):]
    if key.startswith("output/stat_"):
        return f"ttt stat {key[len('output/stat_'):]} (official order), [n_mini_batch]"
    return ""


def _write_case(out_dir: Path, name: str, meta: dict, arrays: dict, np) -> None:
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    meta = dict(meta)
    meta["arrays"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype), "meaning": _meaning(k)}
                      for k, v in arrays.items()}
    np.savez_compressed(out_dir / f"{name}.npz", **arrays)
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=False))


def _params_to_arrays(flat: dict, np, prefix: str) -> tuple[dict, dict]:
    arrays, paths = {}, {}
    for keys, value in flat.items():
        key = f"{prefix}{'/'.join(keys)}"
        arrays[key] = np.asarray(value, dtype=np.float32)
        paths[key] = list(keys)
    return arrays, paths


def _build(M, T, jnp, cls_name: str, config: dict):
    cfg = M.ModelConfig(**config)
    kwargs = {"dtype": jnp.float32, "param_dtype": jnp.float32, "precision": None}
    if cls_name.startswith("ttt.models.ttt_layer."):
        return cfg, getattr(T, cls_name.rsplit(".", 1)[1])(cfg, **kwargs)
    if cls_name == "ttt.models.model.CausalLM":
        return cfg, M.CausalLM(cfg, **kwargs)
    raise ValueError(f"class {cls_name!r} is not an official layer or ttt.models.model.CausalLM")


def _generate_one(spec: dict, out_dir: Path, ctx) -> None:
    jax, jnp, flax, M, T, base_meta = ctx
    import numpy as np

    seed, batch, kind = int(spec["seed"]), int(spec["batch"]), spec["kind"]
    cfg, module = _build(M, T, jnp, spec["class"], spec["config"])
    seq_len = int(spec["config"]["max_sequence_length"])
    rng = np.random.default_rng(seed)
    meta = {**base_meta, "case": spec["case"], "set": "live", "kind": kind, "class": spec["class"],
            "module_kwargs": {"dtype": "float32", "param_dtype": "float32", "precision": None},
            "config_overrides": spec["config"], "seed": seed, "batch": batch, "seq_len": seq_len,
            "init": f"module.init(jax.random.PRNGKey({seed}), <inputs of this case>)['params']",
            "note": "live case generated by parity/live_jax.py"}
    if kind == "layer":
        hidden = int(spec["config"]["hidden_size"])
        x = rng.standard_normal((batch, seq_len, hidden)).astype(np.float32)
        offsets = np.asarray(spec["position_offsets"], dtype=np.int32)
        pos = (np.arange(seq_len, dtype=np.int32)[None, :] + offsets[:, None]).astype(np.int32)
        mult = float(spec["ttt_lr_mult"])
        params = jax.jit(lambda key: module.init(key, x, None, pos, True, output_ttt_stats=True,
                                                 ttt_lr_mult=mult)["params"])(jax.random.PRNGKey(seed))
        flat, perturbed = _perturb(_flatten(flax, params), rng, np)
        params = flax.traverse_util.unflatten_dict(flat)
        cot = rng.standard_normal((batch, seq_len, hidden)).astype(np.float32)
        outputs, grad_p, grad_x = _layer_arrays(jax, jnp, np, module, params, x, pos, mult, cot)
        arrays, paths = _params_to_arrays(flat, np, "param/")
        arrays.update({"input/hidden_states": x, "input/position_ids": pos,
                       "input/ttt_lr_mult": np.asarray(mult, dtype=np.float32), **outputs,
                       "cotangent/ttt_output": cot, "grad/input/hidden_states": grad_x})
        arrays.update(_params_to_arrays(_flatten(flax, grad_p), np, "grad/param/")[0])
        meta.update({"call": {"signature": "layer.apply({'params': params}, hidden_states, None, position_ids, "
                                           "True, output_ttt_stats=True, ttt_lr_mult=ttt_lr_mult)",
                              "output_ttt_stats": True, "ttt_lr_mult": mult,
                              "position_offsets": offsets.tolist()},
                     "gradient_of": "sum(output/ttt_output * cotangent/ttt_output)  (i.e. VJP with that cotangent)",
                     "stat_keys": sorted(k for k in outputs if k.startswith("output/stat_"))})
    else:
        vocab = int(spec["config"]["vocab_size"])
        ids = rng.integers(0, vocab, size=(batch, seq_len)).astype(np.int32)
        params = jax.jit(lambda key: module.init(key, ids)["params"])(jax.random.PRNGKey(seed))
        flat, perturbed = _perturb(_flatten(flax, params), rng, np)
        params = flax.traverse_util.unflatten_dict(flat)
        outputs, grads = _model_arrays(jax, jnp, np, module, params, ids)
        arrays, paths = _params_to_arrays(flat, np, "param/")
        arrays.update({"input/input_ids": ids,
                       "input/position_ids": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                                             (batch, seq_len)).copy(),
                       **outputs})
        arrays.update(_params_to_arrays(_flatten(flax, grads), np, "grad/param/")[0])
        meta.update({"call": {"signature": "CausalLM.apply({'params': params}, input_ids)", "ttt_lr_mult": 1.0},
                     "gradient_of": "output/loss", "loss_value": float(outputs["output/loss"])})
    meta.update({"config_full": _config_dict(cfg), "param_paths": paths, "perturbed_params": perturbed})
    _write_case(out_dir, spec["case"], meta, arrays, np)


def _replay_one(json_path: Path, out_dir: Path, ctx) -> None:
    """Recompute a stored official case from its own params and inputs (see `replay_cases`)."""
    jax, jnp, flax, M, T, base_meta = ctx
    import numpy as np

    meta = json.loads(json_path.read_text())
    with np.load(json_path.with_suffix(".npz")) as z:
        stored = {k: z[k] for k in z.files}
    flat = {tuple(meta["param_paths"][k]): stored[k] for k in stored if k.startswith("param/")}
    params = flax.traverse_util.unflatten_dict(flat)
    _, module = _build(M, T, jnp, meta["class"], meta["config_overrides"])
    if meta["kind"] == "layer":
        outputs, grad_p, grad_x = _layer_arrays(
            jax, jnp, np, module, params, stored["input/hidden_states"], stored["input/position_ids"],
            float(stored["input/ttt_lr_mult"]), stored["cotangent/ttt_output"])
        arrays = {**outputs, "grad/input/hidden_states": grad_x}
        grads = grad_p
    elif meta["kind"] == "model":
        arrays, grads = _model_arrays(jax, jnp, np, module, params, stored["input/input_ids"])
    else:
        raise ValueError(f"{json_path.name}: kind {meta['kind']!r} cannot be replayed (layer or model only)")
    inverse = {tuple(v): k for k, v in meta["param_paths"].items()}
    for keys, value in _flatten(flax, grads).items():
        arrays["grad/" + inverse[keys]] = np.asarray(value)
    _write_case(out_dir, json_path.stem, {**base_meta, "case": meta["case"], "kind": meta["kind"],
                                          "class": meta["class"], "replay_of": str(json_path)}, arrays, np)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Generate parity cases with the official JAX code "
                                                 "(run by parity.live in the JAX environment).")
    parser.add_argument("--repo", required=True, help="checkout of test-time-training/ttt-lm-jax")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--specs", help="JSON file with a list of case specs (see LIVE_CASES)")
    parser.add_argument("--replay", action="append", default=[], type=Path,
                        help="an official <case>.json to recompute from its own params and inputs")
    args = parser.parse_args(argv)
    ctx = _import_official(args.repo)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.specs:
        for spec in json.loads(Path(args.specs).read_text()):
            _generate_one(spec, args.out, ctx)
            print(f"wrote {spec['case']}", flush=True)
    for path in args.replay:
        _replay_one(path, args.out, ctx)
        print(f"replayed {path.stem}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
