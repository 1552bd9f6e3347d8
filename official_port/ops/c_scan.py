"""TTT-Linear forward scan in C for CPU inference, beside the torch twin `dual.py`.

Computes what `official_port.ops.dual.dual_ttt_linear` computes (test-time-training/ttt-lm-jax
`TTTLinearBase.process_mini_batch` scanned by `TTTBase.ttt`), for float32 calls without autograd:
one C loop per (batch, head) keeps the inner `W [d, d]`, `b [d]` in cache and walks the
mini-batches (the algebra is in `csrc/ttt_linear_scan.c`). It reads queries, keys and values in
the caller's layout and writes the output straight into `[B, T, H, d]`, so none of the twin's
large temporaries (blocked copies, `E * tril(Q K^T + 1)` for all mini-batches, the output
LayerNorm's passes) exist. At the 125m width on one thread it replaces ~60 ms of the twin's
~65 ms per 2048 tokens (`scripts/bench_official.py`).

The source is compiled on first use with the system C compiler (`$CC`, else `cc`/`gcc`; about
a second) for the head dim and mini-batch size at hand, with `-march=native`, and cached under
`$TTT_CACHE_DIR/kernels` keyed by source, flags, compiler and CPU. (Batch, head) pairs are split
over `torch.get_num_threads()` threads (ctypes releases the GIL during the call).

Limits: float32, no autograd, `inner_steps == 1`, no stats, d a multiple of 16 (<= 256),
m <= 64; a non-finite gate or inner gradient makes `c_ttt_linear` return None so that the caller
reruns the twin (which isolates such rows as the official values require). The layer dispatch
(`official_port.layers.TTTBase`, `kernel="auto"` or `"c"`) applies these rules.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from official_port.ops.dual import LN_EPS
from official_port.ops.state import InnerState, check_op_inputs
from ttt_common.tokenizer import cache_dir

_SOURCE = Path(__file__).with_name("csrc") / "ttt_linear_scan.c"
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c11", "-shared", "-fPIC")
_MAX_D, _MAX_M = 256, 64


class CKernelUnavailable(RuntimeError):
    """The C scan cannot be built here (no compiler, or it failed)."""


def c_compiler() -> str | None:
    """The compiler the kernel would be built with (`$CC` when set, else cc or gcc on PATH), or None."""
    cc = os.environ.get("CC")
    return shutil.which(cc) if cc else (shutil.which("cc") or shutil.which("gcc"))


def supports(d: int, m: int) -> bool:
    """Head dim and mini-batch size the C scan handles."""
    return d % 16 == 0 and 16 <= d <= _MAX_D and 1 <= m <= _MAX_M


def _cpu_tag() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags (a cache shared by two
    machines must not hand one the other's instructions)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


_libs: dict[tuple[int, int], ctypes.CDLL | Exception] = {}
_lock = threading.Lock()


def load_library(d: int, m: int) -> ctypes.CDLL:
    """The compiled scan for head dim d and mini-batch size m (built and cached on first use)."""
    with _lock:
        if (d, m) not in _libs:
            try:
                _libs[(d, m)] = _build(d, m)
            except CKernelUnavailable as e:
                _libs[(d, m)] = e
        lib = _libs[(d, m)]
    if isinstance(lib, Exception):
        raise lib
    return lib


def _build(d: int, m: int) -> ctypes.CDLL:
    cc = c_compiler()
    if cc is None:
        why = f"$CC={os.environ['CC']!r} not found" if os.environ.get("CC") else "no cc or gcc on PATH"
        raise CKernelUnavailable(f"no C compiler ({why}); use kernel='torch'")
    flags = [*_FLAGS, f"-DHD={d}", f"-DMB={m}"]
    source = _SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CKernelUnavailable(f"C compiler {cc!r} does not run: {e}") from e
    tag = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                     _cpu_tag().encode()])).hexdigest()[:16]
    folder = cache_dir() / "kernels"
    lib_path = folder / f"ttt_linear_scan-d{d}-m{m}-{tag}.so"
    try:
        if not lib_path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{lib_path.name}.{os.getpid()}.tmp"
            res = subprocess.run([cc, *flags, str(_SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
            if res.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise CKernelUnavailable(f"compiling {_SOURCE.name} with {cc} failed: {res.stderr.strip()[:500]}")
            os.replace(tmp, lib_path)  # atomic: a concurrent process sees the old name or the whole file
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:  # unwritable cache folder, a library that does not load
        raise CKernelUnavailable(f"building or loading {lib_path}: {e}") from e
    fn = lib.ttt_linear_scan
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64] * 5 + [ptr, i64, i64, i64] * 4 + [ptr, ptr, ptr, ctypes.c_float, ptr, ptr, ptr]
    fn.restype = ctypes.c_int
    return lib


_pools: dict[int, ThreadPoolExecutor] = {}


def _run_split(fn, BH: int, args_for) -> list[int]:
    """Call fn on [bh0, bh1) ranges, one per torch thread (the calls release the GIL)."""
    nt = max(1, min(torch.get_num_threads(), BH))
    if nt == 1:
        return [fn(*args_for(0, BH))]
    bounds = [BH * i // nt for i in range(nt + 1)]
    with _lock:
        if nt not in _pools:
            _pools[nt] = ThreadPoolExecutor(max_workers=nt, thread_name_prefix="ttt_c_scan")
        pool = _pools[nt]
    return list(pool.map(lambda i: fn(*args_for(bounds[i], bounds[i + 1])), range(nt)))


def c_ttt_linear(XQ: Tensor, XK: Tensor, XV: Tensor, gate: Tensor, token_eta: Tensor, ln_weight: Tensor,
                 ln_bias: Tensor, state: InnerState) -> tuple[Tensor, InnerState] | None:
    """TTT-Linear scan in C; the contract of `dual_ttt_linear` without its options, or None when a
    gate or an inner gradient is non-finite (rerun the torch twin then).

    Args:
        XQ, XK, XV: `[B, H, T, d]` float32 on CPU, any strides with a contiguous last axis (the
            layer passes views of `[B, T, H, d]` tensors); gate: `[B, H, T]`; token_eta: `[m]`;
            ln_weight, ln_bias: `[H, d]`; state: `InnerState`.

    Returns:
        out `[B, H, T, d]` (a view of a `[B, T, H, d]` tensor, as the twin's) and the `InnerState`
        after the T tokens; or None.

    Raises:
        ValueError for autograd inputs, another dtype or device, unsupported sizes;
        CKernelUnavailable when the kernel cannot be built here.
    """
    name = "c_ttt_linear"
    check_op_inputs(name, "linear", XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, 1)
    tensors = (XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, *state.params, state.k, state.v, state.gate)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError(f"{name}: no autograd (inputs require grad); use the torch dual form")
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError(f"{name}: float32 CPU tensors only; use the torch dual form")
    B, H, T, d = XQ.shape
    m = token_eta.numel()
    if not supports(d, m):
        raise ValueError(f"{name}: head_dim={d} must be a multiple of 16 (<= {_MAX_D}) and "
                         f"mini_batch_size={m} <= {_MAX_M}")
    fn = load_library(d, m).ttt_linear_scan
    r = state.num_buffered
    K = torch.cat([state.k, XK], dim=2) if r else XK
    V = torch.cat([state.v, XV], dim=2) if r else XV
    g = torch.cat([state.gate, gate], dim=2) if r else gate
    L = r + T
    Q, K, V = (t if t.stride(-1) == 1 else t.contiguous() for t in (XQ, K, V))
    tok, lw, lb = (t.contiguous() for t in (token_eta, ln_weight, ln_bias))
    W = torch.empty(B * H, d, d)
    W.view(B, H, d, d).copy_(state.params[0])
    b = torch.empty(B * H, d)
    b.view(B, H, 1, d).copy_(state.params[1])
    out = torch.empty(B, T, H, d)
    strides = [a for t in (Q, K, V) for a in (t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))]
    strides += [g.data_ptr(), g.stride(0), g.stride(1), g.stride(2)]
    rest = [tok.data_ptr(), lw.data_ptr(), lb.data_ptr(), LN_EPS, W.data_ptr(), b.data_ptr(), out.data_ptr()]
    codes = _run_split(fn, B * H, lambda bh0, bh1: (H, L, r, bh0, bh1, *strides, *rest))
    if any(codes):
        return None
    tail = slice(L // m * m, L)
    new_state = InnerState((W.view(B, H, d, d), b.view(B, H, 1, d)), K[:, :, tail], V[:, :, tail], g[:, :, tail])
    return out.transpose(1, 2), new_state
