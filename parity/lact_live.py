"""Live whole-layer parity against a1600012888/LaCT's `LaCTSWIGLULayer`, and the generator of the bundled
layer fixtures (`parity/fixtures/lact/lact_layer_*`).

With `LACT_REF` pointing to a local checkout of a1600012888/LaCT (never copied into this repository),
`lact_llm/lact_model/layer_lact_swiglu.py` and `ttt_operation.py` are imported unmodified, the
reference layer is built with the same kwargs as ours and loads our (perturbed) parameters, and its
output and VJPs (input and every parameter) become a case in the fixture format (`parity/README.md`),
checked by `parity.lact_layer`.

Substituted, because they cannot run on a CPU machine (nothing else is):
    flash_attn.flash_attn_func  -> explicit causal window softmax (the same window (W - 1, 0));
    fla.modules.RMSNorm, RotaryEmbedding (Triton kernels) -> their formulas in plain torch
        (x * rsqrt(mean(x^2) + eps) * weight; GPT-NeoX non-interleaved RoPE, angles in float32);
    fla.models.utils.Cache      -> an empty class (no cache is used);
    ttt_operation_fused_kernel  -> absent (Triton; `use_fused_kernel=False`, the torch op runs);
    torch.compile               -> identity while importing (eager; the CUDA autocast is inert on CPU).
The stand-ins are registered in `sys.modules` only while the reference is imported. Padding masks
are not covered (the reference's padded path needs flash-attn's varlen kernel).

Usage:
    LACT_REF=/path/to/LaCT python -m parity --lact-live           # live cases, other seeds and shapes
    LACT_REF=/path/to/LaCT pytest parity/test_parity.py -k lact_live
    LACT_REF=/path/to/LaCT python -m parity.lact_live --out parity/fixtures/lact   # regenerate bundled
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

ENV_REF = "LACT_REF"
REF_DIR = "lact_llm/lact_model"
REF_FILES = ("layer_lact_swiglu.py", "ttt_operation.py")
LIVE_PREFIX = "live_"
BUNDLED_PREFIX = "lact_layer_"

_BASE = dict(hidden_size=32, num_attn_heads=4, num_lact_heads=2, inter_multi=1, window_size=8,
             lact_chunk_size=8, rope_theta=1000.0, max_position_embeddings=64, attn_qk_norm=True)
# The configurations (constructor kwargs of both layers). T is not a multiple of the chunk size,
# so every case also has a partial last chunk.
CONFIGS: dict[str, dict] = {
    "post_mom_lowrank_scale": dict(_BASE, use_momentum=True, w0_w2_low_rank=4, learnable_ttt_scale=True),
    "post_nomom_full_nowindow": dict(_BASE, use_momentum=False, window_size=None, inter_multi=2),
    "pre_mom_scale": dict(_BASE, ttt_prenorm=True, use_momentum=True, learnable_ttt_scale=True),
    "post_nope_novsilu_bias_w3": dict(_BASE, ttt_nope=True, no_v_silu=True, qkv_bias=True, window_size=3,
                                      attn_qk_norm=False, use_momentum=True),
    "post_muon_mom": dict(_BASE, use_muon=True, use_momentum=True, w0_w2_low_rank=4),
}
# (seed, batch, T) of the bundled cases and of the live ones (other seeds and shapes)
BUNDLED_SHAPE = (1, 2, 21)
LIVE_SHAPE = (101, 3, 29)


def case_names(live: bool) -> list[str]:
    return [(LIVE_PREFIX + BUNDLED_PREFIX if live else BUNDLED_PREFIX) + n for n in CONFIGS]


def reference_dir() -> Path | None:
    value = os.environ.get(ENV_REF, "").strip()
    return Path(value).expanduser() if value else None


def unavailable_reason() -> str:
    """Why live LaCT parity cannot run ('' when it can)."""
    repo = reference_dir()
    if repo is None:
        return f"environment variable {ENV_REF} is not set; point it to a checkout of a1600012888/LaCT"
    missing = [f for f in REF_FILES if not (repo / REF_DIR / f).is_file()]
    if missing:
        return f"{ENV_REF}={repo} is not a checkout of a1600012888/LaCT (missing {REF_DIR}/{', '.join(missing)})"
    try:
        import einops  # noqa: F401 - the reference layer needs it
    except ImportError:
        return "the reference layer imports einops: pip install einops"
    return ""


# --------------------------------------------------------------------------- stand-ins


def _stand_ins() -> dict[str, types.ModuleType]:
    import torch
    import torch.nn as nn

    class RMSNorm(nn.Module):
        def __init__(self, hidden_size, elementwise_affine=True, eps=1e-5, **_):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

        def forward(self, x):
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return y * self.weight if self.weight is not None else y

    class RotaryEmbedding(nn.Module):
        def __init__(self, dim, base=10000.0, **_):
            super().__init__()
            self.dim, self.base = dim, base

        def _rotate(self, x, offset):
            s, d = x.shape[1], self.dim
            inv_freq = 1.0 / (self.base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
            ang = (torch.arange(s, dtype=torch.float32) + offset)[:, None] * inv_freq[None]
            cos, sin = ang.cos().to(x.dtype)[None, :, None], ang.sin().to(x.dtype)[None, :, None]
            x1, x2 = x[..., : d // 2], x[..., d // 2:]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

        def forward(self, q, k, seqlen_offset=0, max_seqlen=None, cu_seqlens=None):
            if cu_seqlens is not None or not isinstance(seqlen_offset, int):
                raise NotImplementedError("stand-in RotaryEmbedding: packed or per-row offsets not covered")
            return self._rotate(q, seqlen_offset), self._rotate(k, seqlen_offset)

    def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)):
        if not causal:
            raise NotImplementedError("stand-in flash_attn_func: causal only")
        T, D = q.shape[1], q.shape[-1]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        allowed = (j <= i) if window_size[0] < 0 else (j <= i) & (i - j <= window_size[0])
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", p, v)

    def unsupported(*_, **__):
        raise NotImplementedError("stand-in: padded (varlen) attention and the Triton kernels are not covered")

    mods = {name: types.ModuleType(name) for name in (
        "fla", "fla.models", "fla.models.utils", "fla.modules", "flash_attn", "flash_attn.bert_padding")}
    mods["fla.models.utils"].Cache = type("Cache", (), {})
    mods["fla.modules"].RMSNorm, mods["fla.modules"].RotaryEmbedding = RMSNorm, RotaryEmbedding
    mods["flash_attn"].flash_attn_func = flash_attn_func
    mods["flash_attn"].flash_attn_varlen_func = unsupported
    for n in ("index_first_axis", "pad_input", "unpad_input"):
        setattr(mods["flash_attn.bert_padding"], n, unsupported)
    return mods


_LOADED: dict[str, types.ModuleType] = {}


def load_reference():
    """The reference `layer_lact_swiglu` module, imported from `LACT_REF` with the stand-ins above."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    src = str((reference_dir() / REF_DIR).resolve())
    if src in _LOADED:
        return _LOADED[src]
    import importlib

    import torch

    pkg_name = "_lact_reference"
    mods = _stand_ins()
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [src]  # the package's own __init__ (the HF model) is not executed
    fused = types.ModuleType(f"{pkg_name}.ttt_operation_fused_kernel")
    for n in ("postnorm_block_causal_lact_swiglu_fused_kernel_triton",
              "prenorm_block_causal_lact_swiglu_fused_kernel_triton"):
        setattr(fused, n, mods["flash_attn"].flash_attn_varlen_func)
    mods.update({pkg_name: pkg, fused.__name__: fused})
    saved = {n: sys.modules.get(n) for n in mods}
    compile_ = torch.compile
    torch.compile = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
    try:
        sys.modules.update(mods)
        layer_mod = importlib.import_module(f"{pkg_name}.layer_lact_swiglu")
    finally:
        torch.compile = compile_
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
        for n in [n for n in sys.modules if n.startswith(pkg_name + ".")]:
            sys.modules.pop(n)
    _LOADED[src] = layer_mod
    return layer_mod


def reference_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(reference_dir()), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------- cases


def make_case(name: str) -> tuple[dict, dict]:
    """(meta, arrays) of one case, with the reference layer's output and VJPs."""
    import numpy as np
    import torch

    from lact.layers import LaCTSWIGLULayer
    from parity.lact_layer import KIND, run_layer

    live = name.startswith(LIVE_PREFIX)
    key = name.removeprefix(LIVE_PREFIX).removeprefix(BUNDLED_PREFIX)
    if key not in CONFIGS:
        raise ValueError(f"unknown LaCT layer case {name!r}; known are {case_names(False) + case_names(True)}")
    kwargs = CONFIGS[key]
    seed, B, T = LIVE_SHAPE if live else BUNDLED_SHAPE
    seed += list(CONFIGS).index(key)
    # our layer's init, then every parameter moved off it (ones/zeros/identity would hide terms);
    # lr_proj's bias is raised so that the inner updates matter (lr ~ softplus(-1.9) ~ 0.14)
    torch.manual_seed(seed)
    ours = LaCTSWIGLULayer(**kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        ours.lr_proj.bias.add_(5.0)
    params = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    x = torch.randn(B, T, kwargs["hidden_size"], generator=g)
    cot = torch.randn(B, T, kwargs["hidden_size"], generator=g)

    ref_mod = load_reference()
    with contextlib.redirect_stdout(io.StringIO()):  # its LowRankFastWeight prints its shapes
        ref = ref_mod.LaCTSWIGLULayer(**kwargs)
    ref.load_state_dict(params, strict=True)  # same parameter names: fails loudly otherwise
    o, grads = run_layer(ref, x, cot)
    arrays = {f"param/{k}": v.numpy() for k, v in params.items()}
    arrays.update({"input/x": x.numpy(), "cotangent/o": cot.numpy(), "output/o": o.numpy()})
    arrays.update({f"grad/{k}": v.numpy() for k, v in grads.items()})
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    meta = {
        "case": name, "kind": KIND, "class": "lact_model.layer_lact_swiglu.LaCTSWIGLULayer",
        "reference": "a1600012888/LaCT", "reference_commit": reference_commit(), "seed": seed,
        "batch": B, "seq_len": T, "dtype": "float32", "layer": kwargs,
        "substituted": ["flash_attn_func -> explicit causal window softmax",
                        "fla RMSNorm / RotaryEmbedding (Triton) -> plain torch formulas",
                        "torch.compile -> eager"],
        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
    }
    return meta, arrays


def write_case(out_dir: Path, meta: dict, arrays: dict) -> Path:
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / f"{meta['case']}.npz", **arrays)
    path = out_dir / f"{meta['case']}.json"
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path


def generate_cases(out_dir: str | Path, names: list[str] | None = None, live: bool = True) -> list[Path]:
    """Write the live (or bundled) cases, all or `names`, to `out_dir`; returns the JSON paths."""
    names = case_names(live) if names is None else list(names)
    return [write_case(Path(out_dir), *make_case(n)) for n in names]


def main(argv: list[str] | None = None) -> int:
    from ttt_common.cli import run_cli

    return run_cli(_main, argv, prog="python -m parity.lact_live")


def _main(argv: list[str] | None = None) -> int:
    from ttt_common.cli import UsageError

    p = argparse.ArgumentParser(prog="python -m parity.lact_live", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="directory for <case>.npz + <case>.json")
    p.add_argument("--live", action="store_true", help="the live cases (default: the bundled ones)")
    args = p.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        raise UsageError(reason)
    for path in generate_cases(args.out, live=args.live):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
