"""Parity adapter for the official TTT layer cases (`kind == "layer"`, class `ttt.models.ttt_layer.*`).

Builds `official_port.layers.<Class>` from the case's own config, loads the case's flax params
through `flax_layer_params_to_torch`, runs the forward with the case's position ids and
`ttt_lr_mult` and the VJP with its cotangent, and compares against the golden values of
test-time-training/ttt-lm-jax `ttt/models/ttt_layer.py` (see parity/README.md, sections 3-4).
"""

from __future__ import annotations

import numpy as np
import torch

from official_port.configuration_ttt import TTTConfig
from official_port.layers import TTT_LAYERS, flax_layer_params_to_torch, torch_layer_name_to_flax
from parity.fixtures import GRAD_TOL, OUTPUT_TOL, Case, Check, compare

CLASS_PREFIX = "ttt.models.ttt_layer."


def handles(case: Case) -> bool:
    """True for the layer cases of the official code."""
    return case.meta.get("kind") == "layer" and str(case.meta.get("class", "")).startswith(CLASS_PREFIX)


def _flax_layout(torch_name: str, grad: np.ndarray) -> np.ndarray:
    """Bring a gradient of a port parameter back to the flax layout of its reference."""
    if torch_name.endswith(".weight") and torch_name.split(".")[0] in ("wq", "wk", "wv", "wo", "wg"):
        return grad.T
    if torch_name in ("conv_q.weight", "conv_k.weight"):
        return np.transpose(grad, (2, 1, 0))
    if torch_name in ("learnable_ttt_lr_weight", "learnable_ttt_lr_bias"):
        return grad[..., None]
    return grad


def build_layer(case: Case) -> torch.nn.Module:
    """The port's layer for `case`, with the case's parameters loaded (float32)."""
    cls_name = case.meta["class"].rsplit(".", 1)[-1]
    by_name = {c.__name__: c for c in TTT_LAYERS.values()}
    if cls_name not in by_name:
        raise ValueError(f"case {case.name}: class {case.meta['class']!r} has no port")
    cfg = dict(case.meta["config_full"])
    cfg.update(case.meta.get("config_overrides") or {})
    config = TTTConfig(**cfg)
    layer = by_name[cls_name](config)
    flax_params = {k[len("param/"):]: v for k, v in case.arrays.items() if k.startswith("param/")}
    layer.load_state_dict(flax_layer_params_to_torch(flax_params, cls_name), strict=True)
    return layer


def run_case(case: Case) -> list[Check]:
    """Forward + VJP of one official layer case; one `Check` per compared tensor."""
    if not handles(case):
        raise ValueError(f"case {case.name} is not an official layer case (kind={case.meta.get('kind')!r}, "
                         f"class={case.meta.get('class')!r})")
    a = case.arrays
    layer = build_layer(case).float()
    x = torch.tensor(a["input/hidden_states"], dtype=torch.float32, requires_grad=True)
    pos = torch.tensor(a["input/position_ids"]).long()
    mult = float(a["input/ttt_lr_mult"]) if "input/ttt_lr_mult" in a else float(case.meta["call"].get("ttt_lr_mult", 1.0))
    out, stats, _ = layer(x, position_ids=pos, ttt_lr_mult=mult, output_ttt_stats=True)
    checks = [compare("output/ttt_output", out, a["output/ttt_output"], OUTPUT_TOL)]
    with torch.no_grad():  # the inference path: on CPU under kernel="auto", the C scans and epilogue
        inference = layer(x.detach(), position_ids=pos, ttt_lr_mult=mult)[0]
    checks.append(compare("output/ttt_output (no autograd)", inference, a["output/ttt_output"], OUTPUT_TOL))
    for i, s in enumerate(stats):
        key = f"output/stat_{i}"
        if key in a:
            checks.append(compare(key, s, a[key], OUTPUT_TOL))
    if "cotangent/ttt_output" in a:
        names = [n for n, _ in layer.named_parameters()]
        params = [p for _, p in layer.named_parameters()]
        cot = torch.tensor(a["cotangent/ttt_output"], dtype=torch.float32)
        grads = torch.autograd.grad(out, params + [x], grad_outputs=cot, allow_unused=True)
        to_flax = torch_layer_name_to_flax(case.meta["class"])
        for name, g, p in zip(names, grads[:-1], params):
            key = f"grad/param/{to_flax[name]}"
            if key not in a:
                continue
            g = torch.zeros_like(p) if g is None else g
            checks.append(compare(key, _flax_layout(name, g.detach().numpy()), a[key], GRAD_TOL))
        if "grad/input/hidden_states" in a:
            checks.append(compare("grad/input/hidden_states", grads[-1], a["grad/input/hidden_states"], GRAD_TOL))
    return checks
