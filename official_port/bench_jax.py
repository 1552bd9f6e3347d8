"""Timing worker for `python -m official_port.bench --ref-jax PATH`: the official JAX layer.

Runs in a python that has jax and flax (the parity live-mode environment,
requirements/parity-jax.txt), never in the project's: it imports no torch and nothing of this
package. It loads `parity/live.py` by file path for the official import (with its torch
stand-in) and builds `ttt.models.ttt_layer.TTTLinear` / `TTTMLP` from the checkout at PATH with
the 125m layer shape, float32, matmul precision "highest" (as the parity fixtures), the official
`remat_mini_batch_group_size` 4 (the official layer always remats its scan, so its fwd+bwd
includes that recomputation). Forward is `jax.jit(layer.apply)`, fwd+bwd is `jax.jit` of
`jax.vjp` of it; the first call compiles (its time is reported apart as `compile_s`).

    <jax python> official_port/bench_jax.py --repo PATH --layer ttt_linear --batch 1 --seq-len 2048 \
        --repeats 3 --threads 1 --clock cpu --mode fwd

prints one JSON line: {"tok_s": ..., "sec": ..., "compile_s": ...}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True)
    ap.add_argument("--layer", choices=["ttt_linear", "ttt_mlp"], required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--repeats", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True, help="0 = XLA's default")
    ap.add_argument("--clock", choices=["wall", "cpu"], required=True)
    ap.add_argument("--mode", choices=["fwd", "fwd+bwd"], required=True)
    args = ap.parse_args(argv)
    if args.threads > 0:  # before jax is imported: XLA reads the flags once
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen="
                                   f"{'true' if args.threads > 1 else 'false'} "
                                   f"intra_op_parallelism_threads={args.threads}").strip()
    spec = importlib.util.spec_from_file_location(
        "_parity_live", Path(__file__).resolve().parents[1] / "parity" / "live.py")
    live = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(live)
    jax, jnp, _flax, M, T, _meta = live._import_official(args.repo)
    import numpy as np

    config = {"hidden_size": 768, "num_attention_heads": 12, "mini_batch_size": 16, "conv_width": 4,
              "max_sequence_length": args.seq_len, "rope_theta": 10000.0, "ttt_base_lr": 1.0,
              "initializer_range": 0.02, "remat_conv": "", "remat_mini_batch_group_size": 4}
    cls = "ttt.models.ttt_layer." + {"ttt_linear": "TTTLinear", "ttt_mlp": "TTTMLP"}[args.layer]
    _, layer = live._build(M, T, jnp, cls, config)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, args.seq_len, 768)).astype(np.float32))
    pos = jnp.asarray(np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), (args.batch, args.seq_len)))
    params = jax.jit(lambda key: layer.init(key, x, None, pos, True)["params"])(jax.random.PRNGKey(0))

    def forward(p, xx):
        return layer.apply({"params": p}, xx, None, pos, True)[0]

    if args.mode == "fwd":
        fn = jax.jit(forward)
        call = lambda: fn(params, x)  # noqa: E731
    else:
        def fwd_bwd(p, xx):
            out, pull = jax.vjp(forward, p, xx)
            return pull(2 * out / out.size)  # d mean(out^2) / d out, as the torch measurements

        fn = jax.jit(fwd_bwd)
        call = lambda: fn(params, x)  # noqa: E731
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    t0 = now()
    jax.block_until_ready(call())
    compile_s = now() - t0
    times = []
    for _ in range(args.repeats):
        t0 = now()
        jax.block_until_ready(call())
        times.append(now() - t0)
    best = min(times)
    print(json.dumps({"tok_s": args.batch * args.seq_len / best, "sec": best, "compile_s": compile_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
