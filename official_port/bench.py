"""Speed and memory of the ported official TTT layers: dual form vs the per-token primal loop.

Measures forward (no grad) and forward+backward tokens/s and peak memory of `TTTLinear` and
`TTTMLP` at the official 125m layer size (hidden 768, 12 heads, mini-batch 16) for the fast dual
form (`official_port.ops.dual`) and the naive per-token primal twin (`official_port.ops.naive`).
Every measurement runs in a fresh subprocess so the CPU peak-RSS figure belongs to it alone.

    python scripts/bench_official.py                       # L 2048, batch 1 and 4, CPU
    python scripts/bench_official.py --seq-len 512 --batch 1 --repeats 3 --threads 1 --clock cpu
    python scripts/bench_official.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time


def _measure(q, layer_name: str, impl: str, batch: int, seq_len: int, repeats: int, device: str,
             threads: int, clock: str, mode: str) -> None:
    import torch

    from official_port.configuration_ttt import TTTConfig
    from official_port.layers import TTT_LAYERS

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = TTTConfig.from_preset("125m-TTT", seq_modeling_block=layer_name)
    layer = TTT_LAYERS[layer_name](config).to(device)
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

    result = {}
    fn = fwd if mode == "fwd" else fwd_bwd
    if True:  # one mode per process: the CPU peak-RSS growth then belongs to that mode alone
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
        result[mode] = {"tok_s": batch * seq_len / best, "sec": best, "peak_mib": max(peak, 0) / 2**20}
        layer.zero_grad(set_to_none=True)
    q.put(result)


def measure(*args) -> dict:
    res = {}
    for mode in ("fwd", "fwd+bwd"):
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_measure, args=(q, *args, mode))
        p.start()
        res.update(q.get())
        p.join()
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
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads} must be >= 0 (0 = torch default)")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise UsageError(f"--device {args.device!r} must be 'cpu' or 'cuda[:N]'")


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
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or process CPU time (robust on a shared machine with --threads 1)")
    ap.add_argument("--layers", nargs="+", default=["ttt_linear", "ttt_mlp"])
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    validate_args(args)

    rows = []
    for layer_name in args.layers:
        for batch in args.batch:
            impls = ["dual"] if args.skip_naive else ["dual", "naive"]
            res = {}
            for impl in impls:
                L = args.seq_len if impl == "dual" else min(args.seq_len, args.naive_seq_len)
                res[impl] = measure(layer_name, impl, batch, L, args.repeats, args.device, args.threads,
                                    args.clock)
                res[impl]["seq_len"] = L
            rows.append((layer_name, batch, res))

    print(f"device={args.device} threads={args.threads or 'default'} clock={args.clock} repeats={args.repeats} (best of); "
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
