"""Speed and memory of the ported official TTT layers: dual form vs the per-token primal loop.

Measures forward (no grad) and forward+backward tokens/s and peak memory of `TTTLinear` and
`TTTMLP` at the official 125m layer size (hidden 768, 12 heads, mini-batch 16) for the fast dual
form (`official_port.ops.dual`) and the naive per-token primal twin (`official_port.ops.naive`).
Every measurement runs in a fresh subprocess so the CPU peak-RSS figure belongs to it alone.

    python scripts/bench_official.py                       # L 2048, batch 1 and 4, CPU
    python scripts/bench_official.py --seq-len 512 --batch 1 --repeats 3 --threads 1 --clock cpu
    python scripts/bench_official.py --device cuda

With `--ref PATH` (a local checkout of test-time-training/ttt-lm-pytorch, never copied into this
repository) it instead times this port against that implementation side by side: its `TTTLinear` /
`TTTMLP` built with the same shape (`share_qk` = the conv variant, `use_gate`, conv width 4), one
fresh process per measurement, the two implementations alternating (and swapping who goes first)
round by round. It prints every measurement as it finishes, then per-round and median ratios for
fwd and fwd+bwd at each batch size and thread count, and tokens/s as a fraction of the matmul
limit it measures itself: the GFLOP/s of a `[B*L, D] @ [D, D]` fp32 matmul with the same threads and
clock, divided by the layer's matmul FLOPs per token (the four D x D projections plus the dual form's
products; fwd+bwd counted as 3x fwd). The limit printed first comes from a fresh process; the share
in the table uses the one each of ours' processes measures right after its own runs (the same
moment: this machine's speed drifts up to 3x within minutes).

    python scripts/bench_official.py --ref /path/to/ttt-lm-pytorch --clock cpu --threads 1 2 --rounds 3

`--ref-jax PATH` adds the official JAX layer (a local checkout of test-time-training/ttt-lm-jax, run
by `--jax-python`, a python with the pins of requirements/parity-jax.txt, as parity's live mode;
timed by `official_port/bench_jax.py`: jit-compiled, compile time excluded). `--baseline PATH`
adds another checkout of this project (e.g. `git worktree add ../base main`) timed in the same
rounds, so a speed change is a ratio ours-new / ours-old under the same load. With several
implementations the order rotates each round.

`--keep-freed-memory` runs every measured process with glibc's mmap and trim thresholds at 2 GB
(`GLIBC_TUNABLES`), so memory a forward frees is reused by the next one instead of going back to the
OS and being faulted in again (~7,700 page faults per TTTLinear forward at B 1, ~1 us each here):
what jemalloc or tcmalloc do, as PyTorch's CPU performance guide advises. It applies to every
implementation alike; the default is glibc's own behaviour.

`--clock cpu` counts this process's CPU seconds: robust to other jobs with one thread, but with
several threads it also counts OpenMP spin-waiting, which under contention dwarfs the work: time
threads > 1 with the wall clock on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import time

# glibc tunables of --keep-freed-memory: freed blocks stay mapped (no mmap per large tensor, no trim)
KEEP_FREED_MEMORY = "glibc.malloc.mmap_threshold=2000000000:glibc.malloc.trim_threshold=2000000000"


def _ref_layer(ref_path: str, layer_name: str, config):
    """The reference implementation's layer of the same shape (imported from the user's checkout)."""
    sys.path.insert(0, ref_path)
    import torch
    import ttt as ref  # the user's checkout, imported only in this subprocess

    kind = {"ttt_linear": "linear", "ttt_mlp": "mlp"}[layer_name]
    rc = ref.TTTConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                       mini_batch_size=config.mini_batch_size, share_qk=True, use_gate=True, pre_conv=False,
                       conv_kernel=config.conv_width, ttt_layer_type=kind, ttt_base_lr=config.ttt_base_lr,
                       rope_theta=config.rope_theta)
    cls = ref.TTTLinear if kind == "linear" else ref.TTTMLP
    layer = cls(rc, layer_idx=0)

    def call(x):
        pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        return (layer(x, position_ids=pos), None, None)

    return layer, call


def _measure(q, layer_name: str, impl: str, batch: int, seq_len: int, repeats: int, device: str,
             threads: int, clock: str, mode: str, ref_path: str = "") -> None:
    import torch

    from official_port.configuration_ttt import TTTConfig
    from official_port.layers import TTT_LAYERS

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = TTTConfig.from_preset("125m-TTT", seq_modeling_block=layer_name)
    if impl == "ref":
        module, layer = _ref_layer(ref_path, layer_name, config)
        module.to(device)
    else:
        layer = module = TTT_LAYERS[layer_name](config).to(device)
        layer.use_naive = impl == "naive"
    x = torch.randn(batch, seq_len, config.hidden_size, device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            layer(x)

    def fwd_bwd():
        xg = x.detach().requires_grad_()
        out, _, _ = layer(xg)
        out.square().mean().backward()

    # one mode per process: the CPU peak-RSS growth then belongs to that mode alone
    fn = fwd if mode == "fwd" else fwd_bwd
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn()  # warm-up (allocator, lazy init)
    sync()
    times = []
    # "cpu" = this process's CPU seconds: on a machine shared with other jobs it does not count
    # the time other processes hold the cores (use it with --threads 1)
    now = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(repeats):
        t0 = now()
        fn()
        sync()
        times.append(now() - t0)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:  # peak RSS growth of this process over its state after building the layer
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    best = min(times)
    result = {mode: {"tok_s": batch * seq_len / best, "sec": best, "peak_mib": max(peak, 0) / 2**20,
                     "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                     # the matmul limit in this process right after the layer's runs: this machine's speed
                     # drifts up to 3x within minutes, so the share of the limit is taken from one moment
                     "matmul_gflops": _time_matmul(batch * seq_len, config.hidden_size, repeats, clock, device)}}
    q.put(result)


def _in_subprocess(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(q, *args))
    p.start()
    out = q.get()
    p.join()
    return out


def measure(*args, modes=("fwd", "fwd+bwd"), ref_path: str = "") -> dict:
    res = {}
    for mode in modes:
        res.update(_in_subprocess(_measure, *args, mode, ref_path))
    return res


def validate_args(args: argparse.Namespace) -> None:
    """Refuse values no measurement can use before any worker process starts."""
    from official_port.layers import TTT_LAYERS
    from ttt_common.cli import UsageError

    bad = [name for name in args.layers if name not in TTT_LAYERS]
    if bad:
        raise UsageError(f"--layers {' '.join(bad)}: not a TTT layer; choose from {' '.join(sorted(TTT_LAYERS))}")
    for flag, values in (("--seq-len", [args.seq_len]), ("--naive-seq-len", [args.naive_seq_len]),
                         ("--batch", args.batch), ("--repeats", [args.repeats])):
        if any(v < 1 for v in values):
            raise UsageError(f"{flag} {' '.join(map(str, values))} must be >= 1")
    if args.threads and any(t < 0 for t in args.threads):
        raise UsageError(f"--threads {' '.join(map(str, args.threads))} must be >= 0 (0 = torch default)")
    side_by_side = args.ref or args.ref_jax or args.baseline
    if args.threads and len(args.threads) > 1 and not side_by_side:
        raise UsageError("--threads takes one value without --ref/--ref-jax/--baseline")
    if args.ref and not os.path.isfile(os.path.join(args.ref, "ttt.py")):
        raise UsageError(f"--ref {args.ref!r}: no ttt.py there (expected a checkout of "
                         "test-time-training/ttt-lm-pytorch)")
    if args.ref_jax:
        if not os.path.isfile(os.path.join(args.ref_jax, "ttt", "models", "ttt_layer.py")):
            raise UsageError(f"--ref-jax {args.ref_jax!r}: no ttt/models/ttt_layer.py there (expected a checkout of "
                             "test-time-training/ttt-lm-jax)")
        try:
            probe = subprocess.run([args.jax_python, "-c", "import jax, flax"], capture_output=True, text=True)
            err = (probe.stderr.strip().splitlines() or [""])[-1] if probe.returncode else ""
        except OSError as exc:
            err = str(exc)
        if err:
            raise UsageError(f"--ref-jax: --jax-python {args.jax_python!r} cannot import jax and flax ({err}); "
                             "make a separate venv with requirements/parity-jax.txt and pass its python")
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "official_port", "bench.py")):
        raise UsageError(f"--baseline {args.baseline!r}: no official_port/bench.py there (expected another "
                         "checkout of this project)")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise UsageError(f"--device {args.device!r} must be 'cpu' or 'cuda[:N]'")


def _matmul_gflops(q, rows: int, width: int, repeats: int, threads: int, clock: str, device: str) -> None:
    """GFLOP/s of `[rows, width] @ [width, width]` fp32 (best of `repeats`) in this fresh process."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    q.put(_time_matmul(rows, width, repeats, clock, device))


def _time_matmul(rows: int, width: int, repeats: int, clock: str, device: str) -> float:
    """GFLOP/s of `[rows, width] @ [width, width]` fp32, best of `repeats` (after a warm-up)."""
    import torch

    a = torch.randn(rows, width, device=device)
    w = torch.randn(width, width, device=device)
    now = time.process_time if clock == "cpu" else time.perf_counter
    best = float("inf")
    for i in range(repeats + 1):
        t0 = now()
        for _ in range(4):
            a @ w
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:  # the first is a warm-up
            best = min(best, (now() - t0) / 4)
    return 2 * rows * width * width / best / 1e9


def layer_matmul_flops_per_token(layer_name: str, D: int, H: int, m: int) -> float:
    """Matmul FLOPs per token of a TTT layer's forward: the four D x D projections (wq, wv, wg, wo)
    plus the dual form's products per head (`[K;Q] W`, `Q K^T`, `M G`, the update, and for the MLP
    its second layer, the backward through it and `Xb2 X2^T`), biases folded as an extra row."""
    d = D // H
    proj = 4 * 2 * D * D
    if layer_name.startswith("ttt_linear"):
        per_mb = (2 * (2 * m) * (d + 1) * d + 2 * m * m * (d + 1) + 2 * m * m * d + 2 * (d + 1) * m * d)
    else:
        h = 4 * d
        per_mb = (2 * (2 * m) * (d + 1) * h + 2 * m * m * (d + 1)  # [K;Q] W1, Q K^T
                  + 2 * m * (h + 1) * d + 2 * m * d * h + 2 * m * m * h  # X2 W2, G2 W2^T, M1 G1
                  + 2 * m * m * (h + 1) + 2 * m * (h + 1) * d + 2 * m * m * d  # Xb2 X2^T, Xb2 W2, M2 G2
                  + 2 * (d + 1) * m * h + 2 * (h + 1) * m * d)  # the two updates
    return proj + H * per_mb / m


_BASE_WORKER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from official_port.bench import _measure


class _Print:
    def put(self, result):
        print(json.dumps(result))


_measure(_Print(), *json.loads(sys.argv[2]))
"""


def _last_json_line(proc: subprocess.CompletedProcess, what: str) -> dict:
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_base(base: str, layer_name: str, batch: int, args, mode: str) -> float:
    """tok/s of another checkout of this project (`--baseline`) in a fresh python (its own imports)."""
    payload = json.dumps([layer_name, "dual", batch, args.seq_len, args.repeats, args.device, args.threads_now,
                          args.clock, mode])
    proc = subprocess.run([sys.executable, "-c", _BASE_WORKER, base, payload], cwd=base, capture_output=True,
                          text=True)
    return _last_json_line(proc, f"--baseline {base}")[mode]["tok_s"]


def _measure_jax(args, layer_name: str, batch: int, mode: str) -> float:
    """tok/s of the official JAX layer (`--ref-jax`), timed by `official_port/bench_jax.py` in the jax python."""
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_jax.py")
    proc = subprocess.run([args.jax_python, worker, "--repo", args.ref_jax, "--layer", layer_name, "--batch",
                           str(batch), "--seq-len", str(args.seq_len), "--repeats", str(args.repeats), "--threads",
                           str(args.threads_now), "--clock", args.clock, "--mode", mode],
                          capture_output=True, text=True)
    return _last_json_line(proc, f"--ref-jax ({args.jax_python})")["tok_s"]


def compare_ref(args) -> int:
    """Side by side with the references (`--ref`, `--ref-jax`) and/or another checkout of this project
    (`--baseline`): fresh processes, implementations rotating their order round by round, per-round
    and median ratios ours / each other."""
    from official_port.configuration_ttt import TTTConfig

    cfg = TTTConfig.from_preset("125m-TTT")
    D, H, m = cfg.hidden_size, cfg.num_attention_heads, cfg.mini_batch_size
    modes = ("fwd", "fwd+bwd")
    others = [name for name, on in (("ref", args.ref), ("jax", args.ref_jax), ("base", args.baseline)) if on]
    impls = ["ours", *others]
    limits = {}
    for threads in args.threads:
        for batch in args.batch:
            g = _in_subprocess(_matmul_gflops, batch * args.seq_len, D, args.repeats, threads, args.clock,
                               args.device)
            limits[threads, batch] = g
            print(f"matmul limit: [{batch * args.seq_len}, {D}] @ [{D}, {D}] threads={threads}: "
                  f"{g:.1f} GFLOP/s", flush=True)
    cells = [(ln, b, th, mode) for ln in args.layers for b in args.batch for th in args.threads for mode in modes]
    tok = {c: {k: [] for k in impls} for c in cells}
    ours_gflops = {c: [] for c in cells}  # the matmul limit measured in each of ours' processes
    for rnd in range(args.rounds):
        for c in cells:
            ln, b, th, mode = c
            args.threads_now = th
            order = impls[rnd % len(impls):] + impls[:rnd % len(impls)]  # who goes first rotates
            got = {}
            for impl in order:
                if impl == "jax":
                    got[impl] = _measure_jax(args, ln, b, mode)
                elif impl == "base":
                    got[impl] = _measure_base(args.baseline, ln, b, args, mode)
                else:
                    r = measure(ln, "dual" if impl == "ours" else "ref", b, args.seq_len, args.repeats, args.device,
                                th, args.clock, modes=(mode,), ref_path=args.ref)
                    got[impl] = r[mode]["tok_s"]
                    if impl == "ours":
                        ours_gflops[c].append(r[mode]["matmul_gflops"])
            for k, v in got.items():
                tok[c][k].append(v)
            print(f"round {rnd + 1}/{args.rounds} {ln:<10} B={b} threads={th} {mode:<7}: "
                  + " ".join(f"{k} {got[k]:>7.0f}" for k in impls) + " tok/s  "
                  + " ".join(f"ours/{k} {got['ours'] / got[k]:.2f}x" for k in others), flush=True)
    print(f"\ndevice={args.device} clock={args.clock} L={args.seq_len} rounds={args.rounds} "
          f"malloc={'keep-freed-memory' if args.keep_freed_memory else 'glibc default'} "
          f"(best of {args.repeats} per process); medians over rounds; 'of limit' = tok/s x matmul FLOPs/token "
          "/ the matmul FLOP/s measured in the same process right after (fwd+bwd counted as 3x fwd); "
          "ref = ttt-lm-pytorch, jax = ttt-lm-jax, base = --baseline checkout")
    head = (f"{'layer':<10} {'B':>2} {'thr':>3} {'mode':<7} " + " ".join(f"{k + ' tok/s':>10}" for k in impls)
            + "  " + " ".join(f"{'ours/' + k:>9} {'per round':<18}" for k in others) + f" {'ours of limit':>13}")
    print(head)
    print("-" * len(head))
    rows = []
    for c in cells:
        ln, b, th, mode = c
        ours = tok[c]["ours"]
        fl = layer_matmul_flops_per_token(ln, D, H, m) * (3 if mode == "fwd+bwd" else 1)
        fracs = [o * fl / (g * 1e9) for o, g in zip(ours, ours_gflops[c])]
        frac = statistics.median(fracs)
        row = {"layer": ln, "batch": b, "threads": th, "mode": mode, "matmul_gflops": limits[th, b],
               "keep_freed_memory": args.keep_freed_memory,
               "ours_matmul_gflops": ours_gflops[c], "ours_of_limit_per_round": fracs, "ours_of_limit": frac,
               **{f"{k}_tok_s": tok[c][k] for k in impls}}
        line = f"{ln:<10} {b:>2} {th:>3} {mode:<7} " + " ".join(f"{statistics.median(tok[c][k]):>10.0f}" for k in impls)
        line += " "
        for k in others:
            ratios = [o / r for o, r in zip(ours, tok[c][k])]
            row[f"ratios_{k}"] = ratios
            line += f" {statistics.median(ratios):>8.2f}x {' '.join(f'{x:.2f}' for x in ratios):<18}"
        print(line + f" {frac:>13.2f}")
        rows.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python scripts/bench_official.py` / `ttt-bench-official` (errors: `ttt_common.cli.run_cli`)."""
    from ttt_common.cli import run_cli

    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence for the dual form")
    ap.add_argument("--naive-seq-len", type=int, default=256,
                    help="tokens per sequence for the per-token loop (it is slow; tok/s is length-independent)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch threads (0 = torch default; several values with --ref; default 0, with --ref 1 2)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or process CPU time (robust on a shared machine with --threads 1)")
    ap.add_argument("--layers", nargs="+", default=["ttt_linear", "ttt_mlp"])
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--ref", help="a local checkout of test-time-training/ttt-lm-pytorch: time it side by side")
    ap.add_argument("--ref-jax", help="a local checkout of test-time-training/ttt-lm-jax: time the official JAX "
                    "layer side by side, run by --jax-python")
    ap.add_argument("--jax-python", default=os.environ.get("TTT_LM_JAX_PYTHON", "python"),
                    help="a python with jax and flax (requirements/parity-jax.txt; default $TTT_LM_JAX_PYTHON)")
    ap.add_argument("--baseline", help="another checkout of this project (e.g. a git worktree of an older "
                    "commit): timed as 'base' in the same rounds (ours-new / ours-old ratios)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="with --ref/--ref-jax/--baseline: rounds of rotating order (median reported)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="run the measured processes with glibc keeping freed memory mapped (GLIBC_TUNABLES; "
                    "no page faults on reused buffers), as jemalloc/tcmalloc would; all implementations alike")
    args = ap.parse_args(argv)
    validate_args(args)
    if args.keep_freed_memory:  # read by glibc when a process starts: every worker spawned from here has it
        os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), KEEP_FREED_MEMORY]))
    if args.ref or args.ref_jax or args.baseline:
        args.threads = args.threads or [1, 2]
        args.layers = [ln for ln in args.layers if ln in ("ttt_linear", "ttt_mlp")]
        return compare_ref(args)
    args.threads = args.threads[0] if args.threads else 0

    rows = []
    for layer_name in args.layers:
        for batch in args.batch:
            impls = ["dual"] if args.skip_naive else ["dual", "naive"]
            res = {}
            for impl in impls:
                L = args.seq_len if impl == "dual" else min(args.seq_len, args.naive_seq_len)
                res[impl] = measure(layer_name, impl, batch, L, args.repeats, args.device, args.threads,
                                    args.clock)
                print(f"{layer_name} B={batch} {impl}: fwd {res[impl]['fwd']['tok_s']:.0f} tok/s, "
                      f"fwd+bwd {res[impl]['fwd+bwd']['tok_s']:.0f} tok/s", flush=True)
                res[impl]["seq_len"] = L
            rows.append((layer_name, batch, res))

    print(f"device={args.device} threads={args.threads or 'default'} clock={args.clock} repeats={args.repeats} (best of); "
          f"malloc={'keep-freed-memory' if args.keep_freed_memory else 'glibc default'}; "
          f"naive per-token loop measured at L={min(args.seq_len, args.naive_seq_len)}, dual at L={args.seq_len}")
    head = (f"{'layer':<11} {'B':>2} {'impl':<6} {'L':>5} {'fwd tok/s':>10} {'fwd MiB':>8} "
            f"{'f+b tok/s':>10} {'f+b MiB':>8}")
    print(head)
    print("-" * len(head))
    for layer_name, batch, res in rows:
        for impl, r in res.items():
            print(f"{layer_name:<11} {batch:>2} {impl:<6} {r['seq_len']:>5} {r['fwd']['tok_s']:>10.0f} "
                  f"{r['fwd']['peak_mib']:>8.0f} {r['fwd+bwd']['tok_s']:>10.0f} {r['fwd+bwd']['peak_mib']:>8.0f}")
        if "naive" in res:
            f = res["dual"]["fwd"]["tok_s"] / res["naive"]["fwd"]["tok_s"]
            fb = res["dual"]["fwd+bwd"]["tok_s"] / res["naive"]["fwd+bwd"]["tok_s"]
            print(f"{'':<11} {'':>2} ratio dual/naive: fwd {f:.1f}x, fwd+bwd {fb:.1f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{"layer": n, "batch": b, **r} for n, b, r in rows], fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
