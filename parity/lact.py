"""Parity adapter for the LaCT chunk-operation fixtures (`parity/fixtures/lact`).

Golden values come from a1600012888/LaCT, `lact_llm/lact_model/ttt_operation.py` (see
`parity/README.md`, "LaCT chunk-operation fixtures"). Op cases (`kind == "lact_op"`) run
`lact.ops.lact_swiglu` twice, with ``backprop="autograd"`` and ``backprop="manual"``, from the
case's own arrays and call options, and compare the output and the vector-Jacobian product for
every input. Helper cases (`kind == "lact_helper"`) compare Newton-Schulz and `l2_norm`.

Muon op cases use `MUON_OUTPUT_TOL` / `MUON_GRAD_TOL` (see `parity.fixtures`): our Newton-Schulz and
update repeat the reference's operations in the same order and dtypes (bfloat16), which reproduces
the reference bit for bit on the same CPU and torch, but the bfloat16 chaos makes a fixture made on
another CPU reproducible only structurally (the reference itself misses it there). The Newton-Schulz
helper case stays at the normal tolerance.
"""

from __future__ import annotations

import torch

from lact.ops import l2_norm, lact_swiglu, zeropower_via_newtonschulz5
from parity.fixtures import GRAD_TOL, MUON_GRAD_TOL, MUON_OUTPUT_TOL, OUTPUT_TOL, Case, Check, compare

INPUTS = ("w0", "w1", "w2", "q", "k", "v", "lr0", "lr1", "lr2", "momentum")
FUNCTIONS = {"block_causal_lact_swiglu": False, "prenorm_block_causal_lact_swiglu": True}


def run_op(case: Case, backprop: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the op on a case's inputs; return (output, {input name: VJP with the case's cotangent})."""
    a = case.arrays
    fn = case.meta["function"]
    if fn not in FUNCTIONS:
        raise ValueError(f"case {case.name}: unknown LaCT function {fn!r}, expected one of {sorted(FUNCTIONS)}")
    call = case.meta["call"]
    x = {n: torch.tensor(a[f"input/{n}"], requires_grad=True) for n in INPUTS if f"input/{n}" in a}
    if bool(call.get("momentum")) != ("momentum" in x):
        raise ValueError(f"case {case.name}: call.momentum={call.get('momentum')} but input/momentum "
                         f"{'present' if 'momentum' in x else 'absent'}")
    o = lact_swiglu(
        [(x["w0"], x["w1"], x["w2"])], x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"],
        int(call["chunk_size"]), momentum=x.get("momentum"), use_muon=bool(call["use_muon"]),
        prenorm=FUNCTIONS[fn], backprop=backprop,
    )
    names = list(x)
    # A single-chunk case never updates: k, v, lrs are unused and their VJP is zero.
    grads = torch.autograd.grad(o, [x[n] for n in names], torch.tensor(a["cotangent/o"]),
                                allow_unused=True, materialize_grads=True)
    return o, dict(zip(names, grads))


def run_case(case: Case) -> list[Check]:
    """One Check per compared tensor (per backprop mode for op cases)."""
    kind = case.meta.get("kind")
    a = case.arrays
    if kind == "lact_helper":
        checks = []
        for key in ("G", "G_tall"):
            got = zeropower_via_newtonschulz5(torch.tensor(a[f"input/{key}"])).float()
            checks.append(compare(f"ns_{key}", got, a[f"output/ns_{key}"], OUTPUT_TOL))
        checks.append(compare("l2_norm_x", l2_norm(torch.tensor(a["input/x"])), a["output/l2_norm_x"], OUTPUT_TOL))
        return checks
    if kind != "lact_op":
        raise ValueError(f"case {case.name}: parity/lact.py handles kinds lact_op/lact_helper, got {kind!r}")
    checks = []
    muon = bool(case.meta["call"]["use_muon"])
    out_tol, grad_tol = (MUON_OUTPUT_TOL, MUON_GRAD_TOL) if muon else (OUTPUT_TOL, GRAD_TOL)
    for backprop in ("autograd", "manual"):
        o, grads = run_op(case, backprop)
        checks.append(compare(f"{backprop}/output/o", o, a["output/o"], out_tol))
        for name, g in grads.items():
            checks.append(compare(f"{backprop}/grad/input/{name}", g, a[f"grad/input/{name}"], grad_tol))
    missing = [k for k in a if k.startswith("grad/input/") and k.split("/")[-1] not in grads]
    if missing:
        raise ValueError(f"case {case.name}: fixture grads {missing} have no matching input")
    return checks
