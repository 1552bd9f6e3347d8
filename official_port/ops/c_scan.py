"""The TTT-Linear and TTT-MLP forward scans in C for CPU inference, beside the torch twin `dual.py`.

Computes what `official_port.ops.dual.dual_ttt_linear` / `dual_ttt_mlp` compute (test-time-training/
ttt-lm-jax `process_mini_batch` of `TTTLinearBase` / `TTTMLPBase`, scanned by `TTTBase.ttt`), for float32
calls without autograd: one C loop walks the mini-batches of every (batch, head), keeping the inner
parameters in cache (the algebra is in `csrc/ttt_linear_scan.c` and `csrc/ttt_mlp_scan.c`; what they share
in `csrc/scan_common.h`). It reads the caller's layout and writes the output straight into
`[B, T, H, d]`, so none of the twin's large temporaries (blocked copies, `E * tril(Q K^T + 1)` for all
mini-batches, the output LayerNorm's passes) exist. Two entry points per kind: `c_ttt_linear` /
`c_ttt_mlp` (the op's contract: rotated queries and keys in) and `c_ttt_linear_from_projections` /
`c_ttt_mlp_from_projections` (the layer's: the causal convs and RoPE run inside the loop, row by row,
so their outputs are never built). At the 125m width, one thread, L 2048, B 1, the TTT-Linear op takes
12.5 ms where its twin takes 48.8 (44.5 vs 170.5 ms at B 4); the TTT-MLP op 63.8 ms against 118.6 for
its twin with the C GELU.

`c_post_norm_gate` (`csrc/post_norm_gate.c`) is the layers' output epilogue in one pass,
`gelu_tanh(g) * LayerNorm(Z)`, for TTT-Linear and TTT-MLP alike: 1.6 ms where torch's three passes
take 4.2 (B 1, width 768, one thread). `c_gelu_tanh` / `c_gelu_tanh_grad` are the same GELU and its
derivative for TTT-MLP's dual form (`dual_ttt_mlp(c_gelu=True)`): 30 and 39 us per [12, 16, 256] step
where ATen's take 86 and 93.

Each source is compiled on first use with the system C compiler (`$CC`, else `cc`/`gcc`; 0.25 s
here), the scan for the head dim and mini-batch size at hand, with `-march=native`, and cached under
`$TTT_CACHE_DIR/kernels` keyed by source (with `csrc/*.h`), flags, compiler and CPU, with `-fopenmp`
where the compiler has it. (Batch, head) pairs, or the epilogue's rows, are split over
`torch.get_num_threads()` threads: OpenMP threads inside the C call, which are torch's own pool when
torch loaded libgomp (the usual Linux wheels; csrc/threads.h says why that matters), else Python
threads (ctypes releases the GIL).

Limits of the scans: float32, no autograd, `inner_steps == 1`, no stats, d a multiple of 16 (<= 256),
m <= 64, for TTT-MLP 4 d m <= 16384 (its rows live on the C stack); a non-finite gate or inner
gradient makes the entry points return None so that the caller reruns the twin (which isolates such
rows as the official values require). The layer's dispatch
(`official_port.layers.TTTBase._use_c` and `_use_c_epilogue`, `kernel="auto"` or `"c"`) applies these
rules.
"""

from __future__ import annotations

import ctypes
import functools
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

_CSRC = Path(__file__).with_name("csrc")
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c11", "-shared", "-fPIC")
_MAX_D, _MAX_M = 256, 64
_MAX_MLP_ROWS = 16384  # 4d x m floats per mini-batch array of the TTT-MLP scan


class CKernelUnavailable(RuntimeError):
    """The C scan cannot be built here (no compiler, or it failed)."""


def c_compiler() -> str | None:
    """The compiler the kernel would be built with (`$CC` when set, else cc or gcc on PATH), or None."""
    return _find_compiler(os.environ.get("CC"), os.environ.get("PATH"))


@functools.lru_cache(maxsize=16)
def _find_compiler(cc: str | None, path: str | None) -> str | None:
    # cached per ($CC, $PATH): the layer's dispatch asks on every call, and a PATH search costs ~20 us
    return shutil.which(cc, path=path) if cc else (shutil.which("cc", path=path) or shutil.which("gcc", path=path))


def supports(d: int, m: int, kind: str = "linear") -> bool:
    """Head dim and mini-batch size the C scan of `kind` ("linear", "mlp") handles."""
    ok = d % 16 == 0 and 16 <= d <= _MAX_D and 1 <= m <= _MAX_M
    # TTT-MLP's per-mini-batch rows of width 4d live on the C stack: at most ~0.5 MB of them
    return ok and (kind == "linear" or 4 * d * m <= _MAX_MLP_ROWS)


def _cpu_tag() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags (a cache shared by two
    machines must not hand one the other's instructions)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class _ScanArgs(ctypes.Structure):
    """`scan_args` of csrc/scan_common.h, field for field (what each holds is documented there)."""

    _fields_ = [(n, _I64) for n in ("H", "D", "T", "r", "w")] + [
        ("qsrc", _PTR), *((n, _I64) for n in ("qsb", "qsh", "qst")),
        ("ksrc", _PTR), *((n, _I64) for n in ("ksb", "ksh", "kst")),
        ("cache", _PTR), ("csb", _I64), ("cst", _I64), ("kern", _PTR), ("cbias", _PTR),
        ("pos", _PTR), ("psb", _I64), ("pst", _I64), ("cosx", _PTR), ("sinx", _PTR),
        ("kbuf", _PTR), *((n, _I64) for n in ("kbsb", "kbsh", "kbst")),
        ("v", _PTR), *((n, _I64) for n in ("vsb", "vsh", "vst")),
        ("gate", _PTR), *((n, _I64) for n in ("gsb", "gsh", "gst")),
        ("token_eta", _PTR), ("ln_w", _PTR), ("ln_b", _PTR), ("eps", ctypes.c_float),
        ("W", _PTR), ("bias", _PTR), ("W2", _PTR), ("bias2", _PTR), ("out", _PTR), ("k_tail", _PTR),
        ("n_tail", _I64)]


class _EpilogueArgs(ctypes.Structure):
    """`epilogue_args` of csrc/post_norm_gate.c."""

    _fields_ = [("z", _PTR), ("g", _PTR), ("w", _PTR), ("b", _PTR), ("eps", ctypes.c_float), ("D", _I64)]


class _GeluArgs(ctypes.Structure):
    """`gelu_args` of csrc/post_norm_gate.c."""

    _fields_ = [("x", _PTR), ("g", _PTR), ("out", _PTR), ("n", _I64), ("ones", _I64)]


# each source's entry points: `<name>(args, lo, hi)` runs rows [lo, hi); `<name>_threads(args, n, nt)` all n
# rows on nt OpenMP threads (csrc/threads.h)
_ENTRIES = {"ttt_linear_scan": ("ttt_linear_scan",), "ttt_mlp_scan": ("ttt_mlp_scan",),
            "post_norm_gate": ("post_norm_gelu_gate", "gelu_tanh_rows")}
_libs: dict[tuple, ctypes.CDLL | Exception] = {}
_lock = threading.Lock()


def load_library(d: int, m: int, kind: str = "linear") -> ctypes.CDLL:
    """The compiled scan of `kind` for head dim d and mini-batch size m (built and cached on first use)."""
    return _load(f"ttt_{kind}_scan", HD=d, MB=m)


def load_post_norm_gate() -> ctypes.CDLL:
    """The compiled output epilogue of `c_post_norm_gate` (built and cached on first use)."""
    return _load("post_norm_gate")


def _load(stem: str, **defines: int) -> ctypes.CDLL:
    """`csrc/<stem>.c` compiled with these `-D` defines, once per process (a failure is kept and re-raised)."""
    key = (stem, *sorted(defines.items()))
    with _lock:
        if key not in _libs:
            try:
                _libs[key] = _build(stem, defines)
            except CKernelUnavailable as e:
                _libs[key] = e
        lib = _libs[key]
    if isinstance(lib, Exception):
        raise lib
    return lib


def _build(stem: str, defines: dict[str, int]) -> ctypes.CDLL:
    cc = c_compiler()
    if cc is None:
        why = f"$CC={os.environ['CC']!r} not found" if os.environ.get("CC") else "no cc or gcc on PATH"
        raise CKernelUnavailable(f"no C compiler ({why}); use kernel='torch'")
    try:  # with OpenMP where the compiler has it (see csrc/threads.h), else without
        return _compile(cc, stem, defines, ("-fopenmp",))
    except CKernelUnavailable:
        return _compile(cc, stem, defines, ())


def _compile(cc: str, stem: str, defines: dict[str, int], extra_flags: tuple[str, ...]) -> ctypes.CDLL:
    src = _CSRC / f"{stem}.c"
    flags = [*_FLAGS, *extra_flags, *(f"-D{k}={v}" for k, v in defines.items())]
    source = b"".join(f.read_bytes() for f in [src, *sorted(_CSRC.glob("*.h"))])  # and the headers it may include
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CKernelUnavailable(f"C compiler {cc!r} does not run: {e}") from e
    tag = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                     _cpu_tag().encode()])).hexdigest()[:16]
    folder = cache_dir() / "kernels"
    lib_path = folder / "-".join([stem, *(f"{k.lower()}{v}" for k, v in defines.items()), f"{tag}.so"])
    try:
        if not lib_path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{lib_path.name}.{os.getpid()}.tmp"
            res = subprocess.run([cc, *flags, str(src), "-o", str(tmp), "-lm"], capture_output=True, text=True)
            if res.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise CKernelUnavailable(f"compiling {src.name} with {cc} failed: {res.stderr.strip()[:500]}")
            os.replace(tmp, lib_path)  # atomic: a concurrent process sees the old name or the whole file
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:  # unwritable cache folder, a library that does not load
        raise CKernelUnavailable(f"building or loading {lib_path}: {e}") from e
    for name in _ENTRIES[stem]:
        for fn in (getattr(lib, name), getattr(lib, name + "_threads")):
            fn.argtypes, fn.restype = [_PTR, _I64, _I64], ctypes.c_int
    lib.built_with_openmp.restype = ctypes.c_int
    return lib


_pools: dict[int, ThreadPoolExecutor] = {}


def _run(lib: ctypes.CDLL, entry: str, args: ctypes.Structure, n: int) -> bool:
    """Entry point `entry` on rows [0, n) of args over `torch.get_num_threads()` threads; True when all
    rows went through (the scan stops at a non-finite value)."""
    nt = max(1, min(torch.get_num_threads(), n))
    fn, ref = getattr(lib, entry), ctypes.addressof(args)
    if nt == 1:
        return fn(ref, 0, n) == 0
    if lib.built_with_openmp():
        return getattr(lib, entry + "_threads")(ref, n, nt) == 0
    # no OpenMP: ranges on Python threads (ctypes releases the GIL)
    bounds = [n * i // nt for i in range(nt + 1)]
    with _lock:
        if nt not in _pools:
            _pools[nt] = ThreadPoolExecutor(max_workers=nt, thread_name_prefix="ttt_c_kernel")
        pool = _pools[nt]
    return not any(pool.map(lambda i: fn(ref, bounds[i], bounds[i + 1]), range(nt)))


def _check(name: str, tensors: tuple[Tensor, ...], d: int, m: int, kind: str = "linear") -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError(f"{name}: no autograd (inputs require grad); use the torch dual form")
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors if t.is_floating_point()):
        raise ValueError(f"{name}: float32 CPU tensors only; use the torch dual form")
    if not supports(d, m, kind):
        mlp = f", and 4 head_dim mini_batch_size <= {_MAX_MLP_ROWS} for TTT-MLP" if kind == "mlp" else ""
        raise ValueError(f"{name}: head_dim={d} must be a multiple of 16 (<= {_MAX_D}) and "
                         f"mini_batch_size={m} <= {_MAX_M}{mlp}")


def _unit(t: Tensor) -> Tensor:
    """t itself when its last axis is contiguous (the kernel reads rows), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _scan(q_src: Tensor, q_strides, k_src: Tensor, k_strides, cache: Tensor | None, kern: Tensor, cbias: Tensor,
          pos: Tensor | None, cosx: Tensor | None, sinx: Tensor | None, XV: Tensor, gate: Tensor,
          token_eta: Tensor, ln_weight: Tensor, ln_bias: Tensor, state: InnerState, B: int, H: int, T: int,
          d: int, out: Tensor | None = None, kind: str = "linear") -> tuple[Tensor, InnerState] | None:
    """Fill `_ScanArgs`, run the kernel of `kind` over (batch, head) ranges, build the new state (None:
    non-finite)."""
    m = token_eta.numel()
    lib = load_library(d, m, kind)
    r = state.num_buffered
    L = r + T
    n_tail = L - L // m * m
    V = _unit(torch.cat([state.v, XV], dim=2) if r else XV)
    g = torch.cat([state.gate, gate], dim=2) if r else gate
    out = _scan_output(out, V, B, T, H, d)
    tail = slice(L - n_tail, L)
    # the kernel writes a mini-batch's outputs after reading its values: out may be V itself, but the
    # values of an incomplete last mini-batch, which go to the state, are copied first
    out_is_v = out.data_ptr() == V.data_ptr()
    v_tail = V[:, :, tail].clone() if out_is_v else V[:, :, tail]
    kbuf = _unit(state.k)
    tok, lw, lb = (t.contiguous() for t in (token_eta, ln_weight, ln_bias))
    # the inner params, updated in place: weights [B*H, in, out] and biases [B*H, out], contiguous copies
    params = [torch.empty(B * H, *(p.shape[-2:] if i % 2 == 0 else p.shape[-1:])) for i, p in enumerate(state.params)]
    for buf, p in zip(params, state.params):
        buf.view(p.shape).copy_(p)
    W, b, W2, b2 = params + [None] * (4 - len(params))
    k_tail = torch.empty(B, H, n_tail, d)

    def ptr(t):
        return None if t is None else t.data_ptr()

    args = _ScanArgs(H, kern.shape[-1], T, r, kern.shape[0], ptr(q_src), *q_strides, ptr(k_src), *k_strides,
                     ptr(cache), *(cache.stride()[:2] if cache is not None else (0, 0)), ptr(kern), ptr(cbias),
                     ptr(pos), *(pos.stride() if pos is not None else (0, 0)), ptr(cosx), ptr(sinx),
                     ptr(kbuf), *kbuf.stride()[:3], ptr(V), *V.stride()[:3], ptr(g), *g.stride(),
                     ptr(tok), ptr(lw), ptr(lb), LN_EPS, ptr(W), ptr(b), ptr(W2), ptr(b2), ptr(out), ptr(k_tail),
                     n_tail)
    if not _run(lib, f"ttt_{kind}_scan", args, B * H):
        return None
    new_params = tuple(buf.view(p.shape) for buf, p in zip(params, state.params))
    return out.transpose(1, 2), InnerState(new_params, k_tail, v_tail, g[:, :, tail])


def _scan_output(out: Tensor | None, V: Tensor, B: int, T: int, H: int, d: int) -> Tensor:
    """The scan's `[B, T, H, d]` output buffer: a fresh one, or the caller's `out` after its checks."""
    if out is None:
        return torch.empty(B, T, H, d)
    if out.shape != (B, T, H, d) or not out.is_contiguous() or out.dtype != torch.float32 or out.device.type != "cpu":
        raise ValueError(f"out must be a contiguous float32 CPU tensor [B, T, H, d] = {(B, T, H, d)}, got "
                         f"{out.dtype} {tuple(out.shape)} with strides {out.stride()}")
    if out.untyped_storage().data_ptr() == V.untyped_storage().data_ptr() and (
            out.data_ptr() != V.data_ptr() or out.transpose(1, 2).stride() != V.stride()):
        raise ValueError("out shares memory with XV but is not XV's own [B, T, H, d] elements (XV must be "
                         "out.transpose(1, 2))")
    return out


def c_ttt_linear(XQ: Tensor, XK: Tensor, XV: Tensor, gate: Tensor, token_eta: Tensor, ln_weight: Tensor,
                 ln_bias: Tensor, state: InnerState) -> tuple[Tensor, InnerState] | None:
    """TTT-Linear scan in C; the contract of `dual_ttt_linear` without its options, or None when a
    gate or an inner gradient is non-finite (rerun the torch twin then).

    Args:
        XQ, XK, XV: `[B, H, T, d]` float32 on CPU (queries and keys after RoPE), any strides with a
            contiguous last axis; gate: `[B, H, T]`; token_eta: `[m]`; ln_weight, ln_bias: `[H, d]`;
            state: `InnerState`.

    Returns:
        out `[B, H, T, d]` (a view of a `[B, T, H, d]` tensor, as the twin's) and the `InnerState`
        after the T tokens; or None.

    Raises:
        ValueError for autograd inputs, another dtype or device, unsupported sizes;
        CKernelUnavailable when the kernel cannot be built here.
    """
    return _c_ttt("linear", "c_ttt_linear", XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state)


def c_ttt_mlp(XQ: Tensor, XK: Tensor, XV: Tensor, gate: Tensor, token_eta: Tensor, ln_weight: Tensor,
              ln_bias: Tensor, state: InnerState) -> tuple[Tensor, InnerState] | None:
    """TTT-MLP scan in C (`csrc/ttt_mlp_scan.c`): as `c_ttt_linear`, with the contract of `dual_ttt_mlp`
    (state params `(W1, b1, W2, b2)`; its GELU is `c_gelu_tanh`'s) and 4 d m <= 16384."""
    return _c_ttt("mlp", "c_ttt_mlp", XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state)


def _c_ttt(kind: str, name: str, XQ: Tensor, XK: Tensor, XV: Tensor, gate: Tensor, token_eta: Tensor,
           ln_weight: Tensor, ln_bias: Tensor, state: InnerState) -> tuple[Tensor, InnerState] | None:
    check_op_inputs(name, kind, XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, state, 1)
    B, H, T, d = XQ.shape
    _check(name, (XQ, XK, XV, gate, token_eta, ln_weight, ln_bias, *state.params, state.k, state.v, state.gate),
           d, token_eta.numel(), kind)
    XQ, XK = _unit(XQ), _unit(XK)
    kern = XQ.new_ones(1, 2, H * d)  # width-1 unit conv and no rotation: the rows pass through
    return _scan(XQ, XQ.stride()[:3], XK, XK.stride()[:3], None, kern, XQ.new_zeros(2, H * d), None, None, None,
                 XV, gate, token_eta, ln_weight, ln_bias, state, B, H, T, d, kind=kind)


def c_ttt_linear_from_projections(q_src: Tensor, k_src: Tensor, conv_cache: Tensor | None, conv_kernel: Tensor,
                                  conv_bias: Tensor, rope_cos: Tensor, rope_sin: Tensor, positions: Tensor,
                                  XV: Tensor, gate: Tensor, token_eta: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                                  state: InnerState, out: Tensor | None = None) -> tuple[Tensor, InnerState] | None:
    """The TTT layer's queries and keys (causal depthwise conv, then RoPE) and the TTT-Linear scan in one
    C pass over the projections (the conv and rotated tensors are never built); as `causal_conv_pair`,
    `rope_interleaved` and `c_ttt_linear` in a row.

    Args:
        q_src, k_src: `[B, T, D]` projections the queries / keys are made from (the same `wq` output
            for TTTLinear; `wq`, `wk` outputs for TTTLinearBase).
        conv_cache: `[B, w-1, D]` inputs before these (None when w = 1).
        conv_kernel: `[w, 2, D]` (queries, keys), conv_bias: `[2, D]` (a width-1 unit kernel and zero
            bias for no conv).
        rope_cos, rope_sin: `[m, d/2]` angle tables (`rope_cos_sin` of positions 0..m-1).
        positions: `[B, T]` integers in `[0, m)` (position modulo the mini-batch size).
        XV: `[B, H, T, d]`, gate: `[B, H, T]`, token_eta, ln_weight, ln_bias, state: as `c_ttt_linear`.
        out: a contiguous `[B, T, H, d]` buffer for the output (default: a fresh one). It may be the
            values' own memory (`XV` is `out.transpose(1, 2)`), since the values of
            a mini-batch are read before its outputs are written; after a None return it holds garbage
            (and so may XV then).

    Returns:
        as `c_ttt_linear` (the new state's keys are rotated, as the twin's); or None.
    """
    return _from_projections("linear", "c_ttt_linear_from_projections", q_src, k_src, conv_cache, conv_kernel,
                             conv_bias, rope_cos, rope_sin, positions, XV, gate, token_eta, ln_weight, ln_bias,
                             state, out)


def c_ttt_mlp_from_projections(q_src: Tensor, k_src: Tensor, conv_cache: Tensor | None, conv_kernel: Tensor,
                               conv_bias: Tensor, rope_cos: Tensor, rope_sin: Tensor, positions: Tensor,
                               XV: Tensor, gate: Tensor, token_eta: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                               state: InnerState, out: Tensor | None = None) -> tuple[Tensor, InnerState] | None:
    """`c_ttt_linear_from_projections` for TTT-MLP (`c_ttt_mlp`'s scan)."""
    return _from_projections("mlp", "c_ttt_mlp_from_projections", q_src, k_src, conv_cache, conv_kernel, conv_bias,
                             rope_cos, rope_sin, positions, XV, gate, token_eta, ln_weight, ln_bias, state, out)


def _from_projections(kind: str, name: str, q_src: Tensor, k_src: Tensor, conv_cache: Tensor | None,
                      conv_kernel: Tensor, conv_bias: Tensor, rope_cos: Tensor, rope_sin: Tensor, positions: Tensor,
                      XV: Tensor, gate: Tensor, token_eta: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                      state: InnerState, out: Tensor | None) -> tuple[Tensor, InnerState] | None:
    """What the two `c_ttt_*_from_projections` do, for the scan of `kind`."""
    B, T, D = q_src.shape
    H, d = ln_weight.shape
    w = conv_kernel.shape[0]
    if k_src.shape != (B, T, D) or D != H * d or conv_kernel.shape != (w, 2, D) or conv_bias.shape != (2, D):
        raise ValueError(f"{name}: q_src/k_src [B, T, D] = {tuple(q_src.shape)}/{tuple(k_src.shape)}, "
                         f"conv_kernel [w, 2, D] = {tuple(conv_kernel.shape)}, conv_bias [2, D] = "
                         f"{tuple(conv_bias.shape)} do not fit D = H * d = {H} * {d}")
    if (conv_cache is None) != (w == 1) or (conv_cache is not None and conv_cache.shape != (B, w - 1, D)):
        raise ValueError(f"{name}: conv_cache must be [B, w-1, D] = {(B, w - 1, D)} (None for w = 1)")
    m = token_eta.numel()
    if positions.shape != (B, T) or rope_cos.shape != (m, d // 2) or rope_sin.shape != (m, d // 2):
        raise ValueError(f"{name}: positions must be [B, T] = {(B, T)} and the RoPE tables [m, d/2] = {(m, d // 2)}")
    if positions.numel() and not (0 <= int(positions.min()) and int(positions.max()) < m):
        raise ValueError(f"{name}: positions must be in [0, m = {m}) (positions modulo the mini-batch size): "
                         f"got {int(positions.min())}..{int(positions.max())}")
    check_op_inputs(name, kind, XV, XV, XV, gate, token_eta, ln_weight, ln_bias, state, 1)
    tensors = (q_src, k_src, conv_kernel, conv_bias, rope_cos, rope_sin, XV, gate, token_eta, ln_weight, ln_bias,
               *state.params, state.k, state.v, state.gate) + ((conv_cache,) if conv_cache is not None else ())
    _check(name, tensors, d, m, kind)
    if out is not None and any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                               for t in tensors if t is not XV):
        raise ValueError(f"{name}: out may share memory with XV only")
    q_src, k_src = _unit(q_src), _unit(k_src)
    cache = _unit(conv_cache) if conv_cache is not None else None
    # [m, d] tables: cos per pair repeated, sin signed (-sin, +sin): x' = x * cos + swap_pairs(x) * sin
    cosx = rope_cos.repeat_interleave(2, dim=-1).contiguous()
    sinx = torch.stack([-rope_sin, rope_sin], dim=-1).flatten(-2).contiguous()
    pos = positions.to(torch.int64).contiguous()
    return _scan(q_src, (q_src.stride(0), d, q_src.stride(1)), k_src, (k_src.stride(0), d, k_src.stride(1)), cache,
                 conv_kernel.contiguous(), conv_bias.contiguous(), pos, cosx, sinx, XV, gate, token_eta, ln_weight,
                 ln_bias, state, B, H, T, d, out, kind)


def post_norm_gate_supported(width: int) -> bool:
    """Widths the C output epilogue handles."""
    return width % 16 == 0


def c_post_norm_gate(Z: Tensor, g: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """The TTT layer's gated output, `gelu_tanh(g) * layer_norm(Z, weight, bias, eps)`, in one C pass
    written into g (which it returns): torch's `post_norm`, `gelu_` and `mul_` take three passes
    and a fresh buffer.

    Args:
        Z, g: `[..., D]` float32 on CPU, same shape, D a multiple of 16 (non-contiguous Z is copied; g
            must be contiguous, it is overwritten); weight, bias: `[D]`.

    Raises:
        ValueError for autograd inputs, another dtype or device, mismatched shapes, a non-contiguous g;
        CKernelUnavailable when the kernel cannot be built here.
    """
    name = "c_post_norm_gate"
    D = Z.shape[-1]
    if g.shape != Z.shape or weight.shape != (D,) or bias.shape != (D,):
        raise ValueError(f"{name}: Z {tuple(Z.shape)} and g {tuple(g.shape)} must match, weight and bias "
                         f"[D = {D}], got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if not post_norm_gate_supported(D):
        raise ValueError(f"{name}: the width D = {D} must be a multiple of 16")
    if not g.is_contiguous():
        raise ValueError(f"{name}: g is overwritten in place and must be contiguous")
    _check(name, (Z, g, weight, bias), 16, 1)  # autograd, dtype, device (16, 1: sizes checked above)
    Z, w, b = Z.contiguous(), weight.contiguous(), bias.contiguous()
    args = _EpilogueArgs(Z.data_ptr(), g.data_ptr(), w.data_ptr(), b.data_ptr(), eps, D)
    _run(load_post_norm_gate(), "post_norm_gelu_gate", args, Z.numel() // D)
    return g


def gelu_supported(width: int) -> bool:
    """Row widths `c_gelu_tanh` and `c_gelu_tanh_grad` handle."""
    return width % 16 == 0


def c_gelu_tanh(x: Tensor, with_ones: bool = False) -> Tensor:
    """`gelu_tanh(x)` (TTT-MLP's inner activation) in C, no autograd; with_ones appends a column of ones
    (the `[gelu(Z1), 1]` the dual form multiplies by `[W2; b2]`) in the same pass.

    Args:
        x: `[..., n]` float32 on CPU, n a multiple of 16 (copied when its last axis is not contiguous).

    Returns:
        `[..., n]`, or `[..., n + 1]` with ones. The GELU is the output epilogue's (`x sigmoid(2y)`).
    """
    n = _gelu_check("c_gelu_tanh", x)
    x = x.contiguous()
    out = x.new_empty(*x.shape[:-1], n + int(with_ones))
    args = _GeluArgs(x.data_ptr(), None, out.data_ptr(), n, int(with_ones))
    _run(load_post_norm_gate(), "gelu_tanh_rows", args, x.numel() // max(n, 1))
    return out


def c_gelu_tanh_grad(grad_out: Tensor, x: Tensor) -> Tensor:
    """`grad_out * gelu_tanh'(x)` in C, no autograd (`aten.gelu_backward(grad_out, x, approximate="tanh")`).

    Args:
        grad_out, x: `[..., n]` float32 on CPU, same shape, n a multiple of 16.
    """
    if grad_out.shape != x.shape:
        raise ValueError(f"c_gelu_tanh_grad: grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} must match")
    n = _gelu_check("c_gelu_tanh_grad", x, grad_out)
    x, grad_out = x.contiguous(), grad_out.contiguous()
    out = torch.empty_like(x)
    args = _GeluArgs(x.data_ptr(), grad_out.data_ptr(), out.data_ptr(), n, 0)
    _run(load_post_norm_gate(), "gelu_tanh_rows", args, x.numel() // max(n, 1))
    return out


def _gelu_check(name: str, x: Tensor, *more: Tensor) -> int:
    """The row width n of x (and of `more`, same shape), after the width, autograd, dtype and device checks."""
    n = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or not gelu_supported(n):
        raise ValueError(f"{name}: the last axis ({n if x.dim() else 'none'}) must be a multiple of 16")
    _check(name, (x, *more), 16, 1)  # autograd, dtype, device
    return n
