"""Parity adapter for the official `CausalLM` (test-time-training/ttt-lm-jax `ttt/models/model.py`).

`run_case` handles fixtures with `meta["kind"] == "model"`: it builds `TTTForCausalLM` from the
case's own `config_full`, loads its `param/...` arrays through `official_port.convert_jax`, runs
the forward pass on `input/input_ids` and the gradient of the mean next-token loss, and compares
logits, loss and the gradient of every flax parameter. `run_checkpoint_case` handles
`meta["kind"] == "checkpoint"`: both streaming files beside the JSON must reproduce the logits.
Nothing about shapes is hard-coded: everything comes from the case.
"""

from __future__ import annotations

import numpy as np
import torch

from official_port.convert_jax import flax_params_to_state_dict, load_official_checkpoint, resolve_config
from official_port.modeling_ttt import TTTForCausalLM
from parity.fixtures import GRAD_TOL, OUTPUT_TOL, Case, Check, compare

__all__ = ["run_case", "run_checkpoint_case"]


def _flax_params(case: Case) -> dict[str, np.ndarray]:
    """`param/<path>` arrays keyed by their flax path joined with '/', using `param_paths` when given."""
    # A flax name with a slash inside (`ttt_norm/scale`) joins to the same string as a nested
    # path, and the converter takes the joined string; `param_paths` only confirms the split.
    paths = case.meta.get("param_paths", {})
    out = {}
    for key, value in case.arrays.items():
        if key.startswith("param/"):
            flax_path = paths.get(key)
            out["/".join(flax_path) if flax_path else key[len("param/"):]] = value
    return out


def _grad_index_maps(params: dict[str, np.ndarray], config) -> dict[str, tuple[str, np.ndarray]]:
    """For every flax key: (torch key, index array) such that `flax_grad = torch_grad.flatten()[index]`.

    Built by converting, once, arrays whose elements hold a global running index (exact in float32
    below 2^24): the converter's own transposes and reshapes then show where every flax element
    lands in the port's tensors, so no layout rule is duplicated here.
    """
    total = sum(v.size for v in params.values())
    if total >= 2**24:
        raise ValueError(f"{total} parameters are too many for the float32 index probe (max 2^24)")
    probe, owner, offset = {}, [], 0
    for key, v in params.items():
        probe[key] = (offset + np.arange(v.size, dtype=np.float64)).reshape(v.shape).astype(np.float32)
        owner.append((offset, key))
        offset += v.size
    starts = np.array([o for o, _ in owner])
    maps: dict[str, tuple[str, np.ndarray]] = {}
    for tk, t in flax_params_to_state_dict(probe, config).items():
        flat = t.reshape(-1).double().numpy().astype(np.int64)
        which = np.searchsorted(starts, flat, side="right") - 1
        if len(set(which.tolist())) != 1:
            raise AssertionError(f"{tk} is assembled from several flax parameters")
        first, key = owner[int(which[0])]
        pos = np.full(params[key].size, -1, dtype=np.int64)
        pos[flat - first] = np.arange(flat.size)
        if (pos < 0).any():
            raise AssertionError(f"{key}: not every element lands in {tk}")
        maps[key] = (tk, pos)
    return maps


def run_case(case: Case) -> list[Check]:
    """Compare logits, loss and every parameter gradient of one model fixture (see module docstring)."""
    if case.meta.get("kind") != "model":
        raise ValueError(f"{case.name}: run_case handles kind 'model', got {case.meta.get('kind')!r}")
    config = resolve_config(case.meta["config_full"])
    params = _flax_params(case)
    sd = flax_params_to_state_dict(params, config)
    model = TTTForCausalLM(config)
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    model.eval()  # no dropout anywhere; eval only keeps use_cache off the training path
    ids = torch.as_tensor(case.arrays["input/input_ids"]).long()
    ttt_lr_mult = float(case.meta.get("call", {}).get("ttt_lr_mult", 1.0))
    out = model(ids, labels=ids, use_cache=False, ttt_lr_mult=ttt_lr_mult)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    checks = [
        compare("output/logits", out.logits, case.arrays["output/logits"], OUTPUT_TOL),
        compare("output/loss", out.loss, case.arrays["output/loss"], OUTPUT_TOL),
    ]
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}
    if config.tie_word_embeddings:
        grads.pop("lm_head.weight", None)  # same Parameter as model.wte.weight (named_parameters dedups)
    maps = _grad_index_maps(params, config)
    for key in sorted(params):
        ref_key = "grad/param/" + key
        if ref_key not in case.arrays:
            checks.append(Check(ref_key, float("inf"), GRAD_TOL, note="reference gradient missing from the case"))
            continue
        tk, pos = maps[key]
        g = grads[tk].detach().reshape(-1).double().numpy()[pos].reshape(params[key].shape)
        checks.append(compare(ref_key, g, case.arrays[ref_key], GRAD_TOL))
    return checks


def run_checkpoint_case(case: Case) -> list[Check]:
    """Load both streaming files named in the checkpoint fixture's JSON and compare the logits."""
    if case.meta.get("kind") != "checkpoint":
        raise ValueError(f"{case.name}: run_checkpoint_case handles kind 'checkpoint', got {case.meta.get('kind')!r}")
    config = resolve_config(case.meta["config_overrides"])
    ids = torch.as_tensor(case.arrays["input/input_ids"]).long()
    tol = float(case.meta.get("tolerance", {}).get("output/logits", OUTPUT_TOL))
    checks = []
    for fname in sorted(case.meta["files"]):
        model = load_official_checkpoint(case.path.parent / fname, config)
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        checks.append(compare(f"{fname}: output/logits", logits, case.arrays["output/logits"], tol))
    return checks
