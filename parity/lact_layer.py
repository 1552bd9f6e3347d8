"""Parity adapter for whole-layer LaCT cases (`kind == "lact_layer"`).

A case holds the constructor kwargs of a1600012888/LaCT's `LaCTSWIGLULayer` (`meta["layer"]`, the
same names as `lact.layers.LaCTSWIGLULayer`), every parameter (`param/<state_dict key>`), the input
`input/x` [B, T, hidden], a cotangent `cotangent/o` and the reference's output `output/o` with the
VJPs `grad/input/x` and `grad/param/<key>`. Cases are made by `parity.lact_live` from the reference
layer itself (bundled ones in `parity/fixtures/lact/lact_layer_*`, live ones with `LACT_REF`).

Our layer is built with the same kwargs, loads the parameters strictly (the names must match the
reference's), and runs with ``ttt_backprop="autograd"`` and ``"manual"``; every tensor is compared.
Muon cases use `MUON_OUTPUT_TOL` / `MUON_GRAD_TOL` (bfloat16 Newton-Schulz, see `parity.fixtures`).
"""

from __future__ import annotations

import warnings

import torch

from parity.fixtures import GRAD_TOL, MUON_GRAD_TOL, MUON_OUTPUT_TOL, OUTPUT_TOL, Case, Check, compare

KIND = "lact_layer"


def build_layer(kwargs: dict, params: dict[str, torch.Tensor], backprop: str):
    """Our `LaCTSWIGLULayer` with the reference's kwargs and the given parameters (strict load)."""
    from lact.layers import LaCTSWIGLULayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = LaCTSWIGLULayer(**kwargs, ttt_backprop=backprop)
    layer.load_state_dict(params, strict=True)
    return layer


def run_layer(layer, x: torch.Tensor, cot: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(output, {"input/x" | "param/<key>": VJP with cot})."""
    x = x.detach().clone().requires_grad_()
    named = dict(layer.named_parameters())
    o = layer(x)[0]
    grads = torch.autograd.grad(o, [x, *named.values()], cot, allow_unused=True, materialize_grads=True)
    return o.detach(), {"input/x": grads[0], **{f"param/{k}": g for k, g in zip(named, grads[1:])}}


def run_case(case: Case) -> list[Check]:
    if case.meta.get("kind") != KIND:
        raise ValueError(f"case {case.name}: parity/lact_layer.py handles kind {KIND!r}, got {case.meta.get('kind')!r}")
    a = case.arrays
    kwargs = case.meta["layer"]
    params = {k[len("param/"):]: torch.tensor(v) for k, v in a.items() if k.startswith("param/")}
    muon = bool(kwargs.get("use_muon"))
    out_tol, grad_tol = (MUON_OUTPUT_TOL, MUON_GRAD_TOL) if muon else (OUTPUT_TOL, GRAD_TOL)
    checks = []
    for backprop in ("autograd", "manual"):
        layer = build_layer(kwargs, params, backprop)
        o, grads = run_layer(layer, torch.tensor(a["input/x"]), torch.tensor(a["cotangent/o"]))
        checks.append(compare(f"{backprop}/output/o", o, a["output/o"], out_tol))
        for name, g in grads.items():
            if f"grad/{name}" not in a:
                raise ValueError(f"case {case.name}: no reference gradient grad/{name}")
            checks.append(compare(f"{backprop}/grad/{name}", g, a[f"grad/{name}"], grad_tol))
    return checks
