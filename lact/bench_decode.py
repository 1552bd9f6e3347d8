"""Decode speed of `LaCTForCausalLM`: tokens/s with the `LaCTCache` vs recomputing the whole prefix.

    python -m lact.bench_decode                       # 4K context, small model, one thread
    python -m lact.bench_decode --context 8192 --json results/bench_decode.json

Both modes decode greedily from the same random prompt of `--context` tokens. "cache" runs the prompt
once (prefill, timed apart) and then feeds one token per step with the carried state; "recompute" runs a
full forward of the whole prefix for every new token (what the reference LaCT model does, its cache being
disabled). The tokens both modes pick are compared (same model, same arithmetic up to round-off: they
agree unless two logits tie within round-off). Wall-clock timings on a shared machine are noisy: report the machine load with them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from lact import LaCTForCausalLM, LaCTSWIGLUConfig
from ttt_common.hf_compat import CACHE_NAME


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=4096, help="prompt length in tokens (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded with the cache (default %(default)s)")
    p.add_argument("--recompute-tokens", type=int, default=3,
                   help="tokens decoded by prefix recomputation (each is a full forward; default %(default)s)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="LaCT blocks (default %(default)s)")
    p.add_argument("--chunk", type=int, default=512, help="lact_chunk_size (default %(default)s)")
    p.add_argument("--window", type=int, default=512, help="attention window (default %(default)s)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    return p


def make_model(args) -> LaCTForCausalLM:
    config = LaCTSWIGLUConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attn_heads=args.hidden // 64
                              or 1, num_lact_heads=2, lact_chunk_size=args.chunk, window_size=args.window,
                              vocab_size=args.vocab, max_position_embeddings=args.context + args.new_tokens,
                              use_momentum=True, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(args.seed)
    return LaCTForCausalLM(config).eval()


@torch.no_grad()
def decode_cached(model, prompt: torch.Tensor, steps: int) -> tuple[list[int], float, float]:
    """(tokens, prefill seconds, decode seconds for `steps` tokens after the first)."""
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t0
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token)]
    cache = getattr(out, CACHE_NAME)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(token, use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache})
        cache = getattr(out, CACHE_NAME)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return tokens, prefill, time.perf_counter() - t0


@torch.no_grad()
def decode_recompute(model, prompt: torch.Tensor, steps: int) -> tuple[list[int], float]:
    """(tokens, seconds for `steps` tokens after the first), every token from a full forward of the prefix."""
    seq = torch.cat((prompt, model(prompt, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    t0 = time.perf_counter()
    for _ in range(steps):
        token = model(seq, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat((seq, token), dim=1)
    return seq[0, prompt.shape[1]:].tolist(), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """`python -m lact.bench_decode` (errors: `ttt_common.cli.run_cli`)."""
    from ttt_common.cli import run_cli

    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    from ttt_common.cli import UsageError

    args = build_parser().parse_args(argv)
    for name in ("context", "new_tokens", "recompute_tokens", "hidden", "layers", "chunk", "window", "vocab", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    torch.set_num_threads(args.threads)
    model = make_model(args)
    prompt = torch.randint(0, args.vocab, (1, args.context), generator=torch.Generator().manual_seed(args.seed))
    cached, prefill_s, cached_s = decode_cached(model, prompt, args.new_tokens)
    recomputed, recompute_s = decode_recompute(model, prompt, args.recompute_tokens)
    n = args.recompute_tokens
    agree = cached[: n + 1] == recomputed[: n + 1]
    result = {
        "context": args.context, "hidden": args.hidden, "layers": args.layers, "chunk": args.chunk,
        "window": args.window, "threads": args.threads, "load_avg_1min": os.getloadavg()[0],
        "prefill_s": prefill_s, "cache_tokens_per_s": args.new_tokens / cached_s,
        "recompute_tokens_per_s": n / recompute_s, "tokens_agree": agree,
    }
    result["speedup"] = result["cache_tokens_per_s"] / result["recompute_tokens_per_s"]
    print(f"LaCT decode at {args.context} tokens of context: hidden {args.hidden}, {args.layers} layers, chunk "
          f"{args.chunk}, window {args.window}, {args.threads} thread(s), load average {result['load_avg_1min']:.1f}")
    print(f"  prefill (once, with cache)  {prefill_s:8.2f} s")
    print(f"  cache                       {result['cache_tokens_per_s']:8.2f} tokens/s ({args.new_tokens} tokens)")
    print(f"  prefix recomputation        {result['recompute_tokens_per_s']:8.2f} tokens/s ({n} tokens)")
    print(f"  speed-up {result['speedup']:.0f}x; greedy tokens agree: {agree}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
