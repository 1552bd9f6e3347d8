"""CUDA benchmark of the Triton kernels beside the torch paths (one run, one JSON file).

TTT-Linear scan (``--ops ttt_linear``), op level (the layer's inner loop only): inputs `[B, H, L, d]`
at the 125m head size (H=12, d=64, mini-batch 16), L in 2K..32K, fwd and fwd+bwd (ours triton: both
Triton kernels), tokens/s and peak CUDA memory; float32 and bfloat16
inputs (ours computes the scan in float32 like the layer does, so "bf16" is the input dtype; fla
runs at the input dtype). fla-org/flash-linear-attention's `chunk_ttt_linear` is timed when
`fla` imports; its call convention changed across releases, so an error is recorded, not raised.
TTT-MLP (impls ``torch_mlp``, ``triton_mlp``: its forward and backward kernels) on the same
inputs, rows with op "ttt_mlp".
Implementations alternate round by round so clock changes hit all alike.

LaCT chunk op (``--ops lact``): `lact.ops.lact_swiglu` at the 760M fast-weight shape of
a1600012888/LaCT (4 heads, d = d_h = 384, chunk 2048, momentum, post-norm, r = 1, batch 1; inputs
as `lact.bench.make_inputs`), backprop "autograd" and "manual" x kernel "torch" and "triton", fwd
and fwd+bwd, float32 and bfloat16 (inputs and fast weights cast), tokens/s and peak CUDA memory.
The reference's own fused path is timed by `python -m lact.bench --reference` (scripts/gpu_check.sh).

Usage (needs a GPU; nothing here runs on CPU):
    python -m official_port.bench_cuda --json results/bench_cuda.json
    python -m official_port.bench_cuda --ops lact --lact-lengths 8192 --json results/lact.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from official_port.ops import InnerState, dual_ttt_linear, dual_ttt_mlp
from official_port.ops.triton_dual import triton_ttt_linear, triton_ttt_mlp


def make_op_inputs(B: int, H: int, L: int, d: int, m: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale).to(dtype)

    q, k, v = (rn(B, H, L, d, scale=d ** -0.5) for _ in range(3))
    gate = (torch.rand(B, H, L, generator=g, device="cuda") / d).to(dtype)
    eta = 1.0 / torch.arange(1, m + 1, device="cuda", dtype=torch.float32)
    lnw, lnb = torch.ones(H, d, device="cuda"), torch.zeros(H, d, device="cuda")
    W0, b0 = rn(B, H, d, d, scale=0.02), torch.zeros(B, H, 1, d, device="cuda", dtype=dtype)
    return q, k, v, gate, eta, lnw, lnb, W0, b0


def _ours(op):
    def run(q, k, v, gate, eta, lnw, lnb, W0, b0):
        f32 = [t.float() for t in (q, k, v, gate)]
        empty = f32[0].new_zeros(*q.shape[:2], 0, q.shape[-1])
        state = InnerState((W0.float(), b0.float()), empty, empty, f32[0].new_zeros(*q.shape[:2], 0))
        out, st = op(*f32, eta, lnw, lnb, state)[:2]
        return out, st.params[0]
    return run


def _fla(q, k, v, gate, eta, lnw, lnb, W0, b0):
    from fla.ops.ttt import chunk_ttt_linear  # optional; raises ImportError when absent

    tr = [t.transpose(1, 2).contiguous() for t in (q, k, v)]  # fla: [B, T, H, d]
    e = (gate.transpose(1, 2).unsqueeze(-1)).contiguous()
    out, final = chunk_ttt_linear(tr[0], tr[1], tr[2], lnw.to(q.dtype), lnb.to(q.dtype), e, scale=1.0,
                                  eps=1e-6, chunk_size=16, initial_state=W0.contiguous(),
                                  initial_state_bias=b0.contiguous(), output_final_state=True)
    return out, final


def _ours_mlp(op):
    """TTT-MLP on the same inputs: W1 [d, 4d], W2 [4d, d] drawn from a fixed seed, zero biases."""
    def run(q, k, v, gate, eta, lnw, lnb, W0, b0):
        B, H, _, d = q.shape
        g = torch.Generator(device="cuda").manual_seed(1)
        W1 = torch.randn(B, H, d, 4 * d, generator=g, device="cuda") * 0.02
        W2 = torch.randn(B, H, 4 * d, d, generator=g, device="cuda") * 0.02
        b1, b2 = W1.new_zeros(B, H, 1, 4 * d), W1.new_zeros(B, H, 1, d)
        if W0.requires_grad:  # fwd+bwd: the initial params get gradients, as in the layer
            W1, W2 = W1.requires_grad_(), W2.requires_grad_()
        f32 = [t.float() for t in (q, k, v, gate)]
        empty = f32[0].new_zeros(B, H, 0, d)
        state = InnerState((W1, b1, W2, b2), empty, empty, f32[0].new_zeros(B, H, 0))
        out, st = op(*f32, eta, lnw, lnb, state)[:2]
        return out, st.params[0]
    return run


IMPLS = {"torch": _ours(dual_ttt_linear), "triton": _ours(triton_ttt_linear), "fla": _fla,
         "torch_mlp": _ours_mlp(dual_ttt_mlp), "triton_mlp": _ours_mlp(triton_ttt_mlp)}


def time_one(fn, inputs, backward: bool, repeats: int) -> dict:
    """Best wall time of `repeats` calls after one warm-up, and the peak memory above the inputs.
    `fn(*inputs)` returns a tuple of tensors; fwd+bwd backpropagates the mean square of each."""
    ins = [t.detach().requires_grad_(backward and t.is_floating_point()) for t in inputs]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up (compile, autotune)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if backward:
            outs = fn(*ins)
            sum(o.float().square().mean() for o in outs).backward()
        else:
            with torch.no_grad():
                fn(*ins)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base
    return {"seconds": best, "peak_bytes": int(peak)}


def run_ttt_linear_bench(lengths, dtypes, repeats: int, impls) -> list[dict]:
    """All (L, dtype, mode, impl) rows; impls alternate inside each (L, dtype, mode) round."""
    rows = []
    B, H, d, m = 1, 12, 64, 16
    for L in lengths:
        for dtype in dtypes:
            inputs = make_op_inputs(B, H, L, d, m, dtype)
            for backward in (False, True):
                for name in impls:
                    row = {"op": "ttt_mlp" if name.endswith("_mlp") else "ttt_linear", "impl": name, "L": L, "dtype": str(dtype).split(".")[-1],
                           "mode": "fwd+bwd" if backward else "fwd", "B": B, "H": H, "d": d}
                    try:
                        r = time_one(IMPLS[name], inputs, backward, repeats)
                        row.update(r, tokens_per_s=B * L / r["seconds"])
                    except Exception as e:  # record (fla missing / API drift / OOM), keep going
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


LACT_SHAPE = {"n": 4, "d": 384, "d_h": 384, "chunk": 2048}  # 760M: 4 fast-weight heads of 384
LACT_IMPLS = [(bp, k) for bp in ("autograd", "manual") for k in ("torch", "triton")]


def _lact_call(backprop: str, kernel: str):
    from lact.ops import lact_swiglu

    def run(w0, w1, w2, q, k, v, lr0, lr1, lr2, mom):
        return (lact_swiglu([(w0, w1, w2)], q, k, v, lr0, lr1, lr2, LACT_SHAPE["chunk"], momentum=mom,
                            backprop=backprop, kernel=kernel),)
    return run


def run_lact_bench(lengths, dtypes, repeats: int) -> list[dict]:
    """All (L, dtype, mode, backprop x kernel) rows of the LaCT chunk op, alternating implementations."""
    from lact.bench import make_inputs

    rows = []
    sh = LACT_SHAPE
    for L in lengths:
        for dtype in dtypes:
            levels, x = make_inputs(1, L, sh["n"], sh["d"], sh["d_h"], "cuda")
            inputs = [t.detach().to(dtype) for t in (*levels[0], *x.values())]
            for backward in (False, True):
                for backprop, kernel in LACT_IMPLS:
                    row = {"op": "lact_swiglu", "impl": f"{backprop}/{kernel}", "L": L,
                           "dtype": str(dtype).split(".")[-1], "mode": "fwd+bwd" if backward else "fwd", **sh}
                    try:
                        r = time_one(_lact_call(backprop, kernel), inputs, backward, repeats)
                        row.update(r, tokens_per_s=L / r["seconds"])
                    except Exception as e:  # record (OOM, a kernel failure) and keep going
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="2048,8192,32768", help="comma list of L")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--ops", default="ttt_linear,lact", help="comma list of ttt_linear, lact")
    p.add_argument("--impls", default="torch,triton,fla,torch_mlp,triton_mlp",
                   help="TTT scan implementations (the *_mlp ones: TTT-MLP)")
    p.add_argument("--lact-lengths", default="8192,16384,32768", help="comma list of L for the LaCT op")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda: needs a CUDA device (use official_port.bench on CPU)")
    ops = [x for x in a.ops.split(",") if x]
    unknown = set(ops) - {"ttt_linear", "lact"}
    if unknown:
        raise SystemExit(f"bench_cuda: --ops {sorted(unknown)} unknown; use ttt_linear and/or lact")
    dtypes = [getattr(torch, x) for x in a.dtypes.split(",")]
    rows = []
    if "ttt_linear" in ops:
        rows += run_ttt_linear_bench([int(x) for x in a.lengths.split(",")], dtypes, a.repeats,
                                     [x for x in a.impls.split(",") if x])
    if "lact" in ops:
        rows += run_lact_bench([int(x) for x in a.lact_lengths.split(",")], dtypes, a.repeats)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
