"""Parity adapter for PonderTTT's own layer (`ponderttt.models.ttt_layer.TTTLayer`, deveworld/ponderTTT @ 350afb5).

Builds `ponder.simple_layer.PonderSimpleTTTLayer` from the case's own config, loads its parameters,
runs the mode named by `meta["call"]["enable_internal_updates"]`, and compares the output,
`ttt_loss` and the VJP (with the stored cotangent) wrt every parameter and the input.
"""

from __future__ import annotations

import torch

from parity.fixtures import GRAD_TOL, OUTPUT_TOL, Case, Check, compare
from ponder.simple_layer import PonderSimpleTTTLayer, SimpleTTTConfig

# torch parameter name -> (flax key, transposed?)
_PARAMS = {"qkv_proj.weight": ("qkv_proj/kernel", True), "output_proj.weight": ("output_proj/kernel", True),
           "fast_w0": ("fast_w0", False), "fast_w1": ("fast_w1", False), "fast_w2": ("fast_w2", False)}


def handles(case: Case) -> bool:
    return str(case.meta.get("class", "")).startswith("ponderttt.")


def run_case(case: Case) -> list[Check]:
    """Run one PonderTTT layer case; one Check per compared tensor."""
    meta, arrays = case.meta, case.arrays
    if not handles(case):
        raise ValueError(f"case {case.name}: class {meta.get('class')!r} is not a ponderttt class")
    cfg = dict(meta["config"])
    call = meta.get("call", {})
    config = SimpleTTTConfig(
        hidden_dim=int(cfg["hidden_dim"]), num_heads=int(cfg["num_heads"]), head_dim=int(cfg["head_dim"]),
        ttt_hidden_dim=int(cfg["ttt_hidden_dim"]), chunk_size=int(cfg["chunk_size"]),
        max_seq_length=int(cfg.get("max_seq_length", 8192)), dropout_rate=float(cfg.get("dropout_rate", 0.0)),
        inner_lr=float(call.get("inner_learning_rate") or 1e-3))
    layer = PonderSimpleTTTLayer(config).eval()  # eval: deterministic, as the fixtures were made
    layer.load_flax_params({key: arrays[f"param/{key}"] for key, _ in _PARAMS.values()})

    x = torch.tensor(arrays["input/hidden_states"], requires_grad=True)
    out, stats = layer(x, enable_internal_updates=bool(call.get("enable_internal_updates", False)))
    checks = [compare("output/ttt_output", out, arrays["output/ttt_output"], OUTPUT_TOL)]
    if "output/ttt_loss" in arrays:
        checks.append(compare("output/ttt_loss", stats["ttt_loss"], arrays["output/ttt_loss"], OUTPUT_TOL))

    cot = torch.tensor(arrays["cotangent/ttt_output"])
    named = dict(layer.named_parameters())
    params = [named[n] for n in _PARAMS]
    grads = torch.autograd.grad(out, [x, *params], grad_outputs=cot)
    checks.append(compare("grad/input/hidden_states", grads[0], arrays["grad/input/hidden_states"], GRAD_TOL))
    for (key, transposed), g in zip(_PARAMS.values(), grads[1:]):
        ref_key = f"grad/param/{key}"
        if ref_key in arrays:
            checks.append(compare(ref_key, g.T if transposed else g, arrays[ref_key], GRAD_TOL))
    return checks
