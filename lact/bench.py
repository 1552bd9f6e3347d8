"""Benchmark the LaCT chunk operation or the whole layer: peak memory and time of fwd + bwd, autograd vs manual.

Shapes follow the official 760M config of a1600012888/LaCT
(`lact_llm/configs/760M_lact_swiglu_nh4_fwlow_rank_momentum.json`: hidden 1536, num_lact_heads 4
-> fast-weight head dim 384, inter_multi 1 -> d_h 384, lact_chunk_size 2048, use_momentum true,
use_muon false, post-norm), batch 1, so ``n = 4`` rows; a stack of r such MLPs.

Method: every (r, T, mode) measurement runs in a FRESH subprocess (``python -m lact.bench --worker``)
so allocator state never leaks between them. The worker builds the inputs, warms up on a tiny
problem, then runs forward + backward (sum of the output as loss) once for memory and
``--repeats`` more times for time. Memory on CPU = the process's peak RSS during the memory call
(``VmHWM``, reset to the current RSS just before the call through ``/proc/self/clear_refs``)
minus its RSS just before it, with glibc told (mallopt) to serve large blocks by
mmap so that freed tensors leave RSS: the bytes the call itself needed at its peak. If the
pre-call peak (imports) was higher than the call's peak the number is a lower bound and is marked
"<". On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call. Time =
minimum wall clock of the timed calls, run with glibc's usual heap reuse (mmap threshold 32 MiB).
The machine's other load makes single timings noisy: use ``--repeats`` when it matters.

With ``--layer`` the whole `LaCTSWIGLULayer` is measured instead (``--layer-config``, default the
760M config above, with ``r`` replaced; batch 1, fp32, input ``[1, T, hidden]`` requiring grad, loss =
sum of the output): window attention, projections, RoPE, norms and the chunk op together, with
``ttt_backprop`` set to the mode. Its default sizes are ``LAYER_CONFIGS`` (8K, 16K, 32K).

With ``--reference PATH`` (a checkout's `lact_llm/lact_model/ttt_operation.py`; never copied into
this repository) the r = 1 rows also time the reference `block_causal_lact_swiglu`, imported at
run time with `torch.compile` replaced by the identity (its CUDA autocast decorator is inert on CPU).

Usage:
    python -m lact.bench                                    # r in {1,2,4} x T in {2K,4K,8K} + r=2 at 16K
    python -m lact.bench --configs 2:8192 --repeats 2 --reference /path/to/ttt_operation.py
    python -m lact.bench --layer                            # whole layer, r in {1,2,4} x {8K,16K,32K}
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_CONFIGS = "1:2048,1:4096,1:8192,2:2048,2:4096,2:8192,2:16384,4:2048,4:4096,4:8192"
LAYER_CONFIGS = "1:8192,1:16384,1:32768,2:8192,2:16384,2:32768,4:8192,4:16384,4:32768"
LAYER_CONFIG = "760M_lact_swiglu_nh4_fwlow_rank_momentum"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    """Peak RSS: VmHWM (resettable, see `_reset_peak`) where available, else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux clear_refs "5"), if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _mallopt(mmap_threshold: int, trim_threshold: int) -> None:
    """Set glibc's malloc thresholds (no-op where glibc is absent)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _load_reference(path: str):
    import torch

    compile_ = torch.compile
    torch.compile = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
    try:
        spec = importlib.util.spec_from_file_location("lact_reference_ttt_operation", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        torch.compile = compile_
    return mod


def make_inputs(r: int, T: int, n: int, d: int, d_h: int, device: str, seed: int = 0):
    """Layer-like fp32 inputs (requires_grad): weights ~ N(0, 1/fan_in), q/k L2-normalised SiLU,
    v SiLU, softplus rates around 1e-3 (the layer's `base_lr`), sigmoid momentum."""
    import torch
    import torch.nn.functional as F

    from lact.ops import l2_norm

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    levels = [
        tuple(t.requires_grad_() for t in (rnd(n, d_h, d, scale=d**-0.5), rnd(n, d, d_h, scale=d_h**-0.5),
                                           rnd(n, d_h, d, scale=d**-0.5)))
        for _ in range(r)
    ]
    x = {
        "q": l2_norm(F.silu(rnd(n, T, d))),
        "k": l2_norm(F.silu(rnd(n, T, d))),
        "v": F.silu(rnd(n, T, d)),
        "lr0": F.softplus(rnd(n, T, 1) - 6.9),
        "lr1": F.softplus(rnd(n, T, 1) - 6.9),
        "lr2": F.softplus(rnd(n, T, 1) - 6.9),
        "momentum": torch.sigmoid(rnd(n, T, 1)),
    }
    x = {k: t.requires_grad_() for k, t in x.items()}
    return levels, x


def worker(args) -> dict:
    """One measurement in this (fresh) process; returns a dict printed as JSON."""

    import torch

    from lact.ops import lact_swiglu

    torch.set_num_threads(args.threads) if args.threads else None
    # Memory call: large blocks straight from mmap (returned to the OS on free), so RSS tracks live
    # tensors rather than glibc's retained heap (set before anything is allocated, and the heap
    # trimmed before the baseline is read, so that no freed block can hide an allocation).
    _mallopt(mmap_threshold=128 * 1024, trim_threshold=128 * 1024)
    cuda = args.device.startswith("cuda")
    if args.layer:
        return _timed(args, *_layer_problem(args), cuda=cuda)
    levels, x = make_inputs(args.r, args.T, args.n, args.d, args.d_h, args.device)
    if args.mode == "reference":
        ref = _load_reference(args.reference)

        def fn():
            return ref.block_causal_lact_swiglu(*levels[0], x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"],
                                                chunk_size=args.chunk, use_muon=False, momentum=x["momentum"])
    elif args.mode in ("manual_recompute_all", "manual_keep2"):  # ablations of manual_backprop.KEEP_LAST
        import lact.ops.manual_backprop as mb

        mb.KEEP_LAST = 0 if args.mode == "manual_recompute_all" else 2

        def fn():
            return lact_swiglu(levels, x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], args.chunk,
                               momentum=x["momentum"], backprop="manual")
    else:
        def fn():
            return lact_swiglu(levels, x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], args.chunk,
                               momentum=x["momentum"], backprop=args.mode)

    def step():
        o = fn()
        o.sum().backward()
        for t in [w for lvl in levels for w in lvl] + list(x.values()):
            t.grad = None
        del o

    def warm_up():
        # a tiny problem of the same widths: one-time library initialisation stays out of both the
        # timing and the memory baseline
        wl, wx = make_inputs(args.r, 130, args.n, args.d, args.d_h, args.device, seed=1)
        lact_swiglu(wl, wx["q"], wx["k"], wx["v"], wx["lr0"], wx["lr1"], wx["lr2"], 64, momentum=wx["momentum"],
                    backprop="manual" if args.mode.startswith("manual") else "autograd").sum().backward()

    return _timed(args, step, warm_up, cuda=cuda)


def _layer_problem(args):
    """(step, warm_up) for the whole layer: `LaCTSWIGLULayer` of ``--layer-config`` with r = args.r."""
    import torch

    from lact.configuration_lact import LaCTSWIGLUConfig
    from lact.layers import LaCTSWIGLULayer
    from ttt_common.config_files import resolve_config

    if args.mode not in ("autograd", "manual"):
        raise ValueError(f"--layer measures modes 'autograd' and 'manual', not {args.mode!r}")
    cfg = LaCTSWIGLUConfig.from_json_file(str(resolve_config(args.layer_config)))
    cfg.r = args.r
    cfg.ttt_backprop = args.mode
    torch.manual_seed(0)
    layer = LaCTSWIGLULayer.from_config(cfg, 0).to(args.device)
    g = torch.Generator().manual_seed(0)

    def run(T):
        x = torch.randn(1, T, cfg.hidden_size, generator=g).to(args.device).requires_grad_()
        layer(x)[0].sum().backward()
        layer.zero_grad(set_to_none=True)

    def step():
        run(args.T)

    def warm_up():
        run(min(args.T, 2 * cfg.lact_chunk_size + 3))  # every code path (full and partial chunks)

    return step, warm_up


def _timed(args, step, warm_up, cuda: bool) -> dict:
    """Warm up, then one memory call and ``args.repeats`` timed calls of `step` (see the docstring)."""
    import gc

    import torch

    warm_up()
    gc.collect()
    _malloc_trim()
    _reset_peak()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, peak_before = _rss_bytes(), _maxrss_bytes()
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    first_time = time.perf_counter() - t0
    if cuda:
        peak, lower_bound = torch.cuda.max_memory_allocated() - base, False
    else:
        peak_after = _maxrss_bytes()
        peak, lower_bound = peak_after - base, peak_after <= peak_before
    # Timing calls: a large threshold (blocks reused from the heap, as glibc's default converges
    # to), since per-allocation mmap page faults would penalise the path that frees more often.
    _mallopt(mmap_threshold=32 * 2**20, trim_threshold=2**30)
    if args.repeats == 0:  # memory only: the time is the memory call's (mmap page faults included)
        return {"peak_bytes": peak, "lower_bound": lower_bound, "time_s": first_time, "times": [],
                "first_call_s": first_time}
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"peak_bytes": peak, "lower_bound": lower_bound, "time_s": min(times), "times": times,
            "first_call_s": first_time}


def measure(cfg: dict, mode: str, common: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lact.bench", "--worker", "--mode", mode, "--r", str(cfg["r"]), "--T", str(cfg["T"])]
    res = subprocess.run(cmd + common, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt_mb(m: dict) -> str:
    if "error" in m:
        return "error"
    return ("<" if m["lower_bound"] else "") + f"{m['peak_bytes'] / 2**20:.0f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=None, help=f"comma list of r:T (default: {DEFAULT_CONFIGS}; with "
                   "--layer: LAYER_CONFIGS)")
    p.add_argument("--n", type=int, default=4, help="rows = batch x fast-weight heads (760M: 1 x 4)")
    p.add_argument("--d", type=int, default=384, help="fast-weight head dim (760M: 1536 / 4)")
    p.add_argument("--d-h", dest="d_h", type=int, default=384, help="SwiGLU hidden dim (760M: inter_multi 1)")
    p.add_argument("--chunk", type=int, default=2048, help="lact_chunk_size (760M: 2048)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per measurement (min is reported); 0: "
                   "memory only, the time is then the memory call's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    p.add_argument("--reference", default=None, help="path of the reference ttt_operation.py (r = 1 rows)")
    p.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    p.add_argument("--layer", action="store_true", help="measure the whole LaCT layer (default sizes: "
                   f"{LAYER_CONFIGS})")
    p.add_argument("--layer-config", dest="layer_config", default=LAYER_CONFIG,
                   help="bundled config name or JSON path of the layer (default: %(default)s)")
    # worker-only arguments
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="autograd", help=argparse.SUPPRESS)
    p.add_argument("--r", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, default=2048, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python scripts/bench_lact.py` / `ttt-bench-lact` (errors: `ttt_common.cli.run_cli`)."""
    from ttt_common.cli import run_cli

    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    from ttt_common.cli import UsageError

    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.reference and not os.path.isfile(args.reference):
        raise UsageError(f"--reference {args.reference!r} is not a file (expected .../lact_model/ttt_operation.py)")
    if args.configs is None:
        args.configs = LAYER_CONFIGS if args.layer else DEFAULT_CONFIGS
    if args.layer and args.reference:
        raise UsageError("--reference times the reference chunk op: it does not combine with --layer")
    try:
        cfgs = [dict(r=int(a), T=int(b)) for a, b in (c.split(":") for c in args.configs.split(","))]
    except ValueError as err:
        raise UsageError(f"--configs must be a comma list of r:T like 2:8192, got {args.configs!r}") from err
    common = ["--n", str(args.n), "--d", str(args.d), "--d-h", str(args.d_h), "--chunk", str(args.chunk),
              "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads)]
    if args.reference:
        common += ["--reference", args.reference]
    if args.layer:
        common += ["--layer", "--layer-config", args.layer_config]
        print(f"LaCTSWIGLULayer ({args.layer_config}, r replaced) fwd+bwd, batch 1, fp32, device={args.device}; "
              "memory = peak RSS delta (CUDA: max allocated delta) in MiB")
    else:
        print(f"LaCT chunk op fwd+bwd, n={args.n} d={args.d} d_h={args.d_h} chunk={args.chunk} momentum, post-norm, "
              f"fp32, device={args.device}; memory = peak RSS delta (CUDA: max allocated delta) in MiB")
    head = f"{'r':>2} {'T':>6} | {'auto MiB':>9} {'manual MiB':>10} {'mem ratio':>9} | {'auto s':>8} {'manual s':>8} {'time ratio':>10}"
    if args.reference:
        head += f" | {'ref MiB':>8} {'ref s':>7} {'auto/ref':>8}"
    print(head)
    rows = []
    for cfg in cfgs:
        a = measure(cfg, "autograd", common)
        m = measure(cfg, "manual", common)
        row = {**cfg, "autograd": a, "manual": m}
        line = f"{cfg['r']:>2} {cfg['T']:>6} | {_fmt_mb(a):>9} {_fmt_mb(m):>10} "
        if "error" not in a and "error" not in m:
            row["mem_ratio"] = m["peak_bytes"] / a["peak_bytes"]
            row["time_ratio"] = m["time_s"] / a["time_s"]
            line += f"{row['mem_ratio']:>9.2f} | {a['time_s']:>8.2f} {m['time_s']:>8.2f} {row['time_ratio']:>10.2f}"
        else:
            line += f"{'-':>9} | {a.get('error', '')} {m.get('error', '')}"
        if args.reference and cfg["r"] == 1:
            ref = measure(cfg, "reference", common)
            row["reference"] = ref
            if "error" not in ref and "error" not in a:
                line += f" | {_fmt_mb(ref):>8} {ref['time_s']:>7.2f} {a['time_s'] / ref['time_s']:>8.2f}"
            else:
                line += f" | {ref.get('error', '')}"
        print(line, flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
