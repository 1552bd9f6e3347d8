"""Causal sliding-window softmax attention whose memory grows linearly with the sequence length.

Query t attends to keys max(0, t - W + 1)..t (flash-attn's window (W - 1, 0)), scale 1/sqrt(D).

Three kernels, chosen by `window_attention(..., impl="auto")`:
    flash    flash-attn on CUDA with half inputs and no padding mask (only when importable);
    sdpa     `scaled_dot_product_attention(is_causal=True)` when the window covers the sequence and
             there is no padding mask (fused causal kernels on CPU and CUDA: no T x T tensor);
    blocked  otherwise: query block [s, s + b) attends only to keys [s - W + 1, s + b), so scores,
             probabilities (kept for backward) and masks take O(T * (b + W)) memory, not O(T^2).
`dense_window_attention` is the readable twin: the full T x T masked softmax, the values every kernel
must reproduce (tests/lact/test_window_attention.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # optional: only used on CUDA with half precision; never required
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - flash-attn cannot be installed on CPU machines
    flash_attn_func = None

IMPLS = ("auto", "flash", "sdpa", "blocked", "dense")
DEFAULT_BLOCK = 256  # query rows per block: keys per block = block + W - 1, so ~W/(W + 256) useful


def _check(q, k, v, window_size, attention_mask, impl, block_size):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, T, H, D] shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if window_size is not None and (isinstance(window_size, bool) or int(window_size) != window_size
                                    or window_size < 1):
        raise ValueError(f"window_size={window_size!r} must be a positive int or None (full causal)")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(q.shape[:2]):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected a [B, T] = "
                         f"{tuple(q.shape[:2])} 0/1 padding mask")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int")


def _nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H] bool: rows of x [B, T, H, D] holding a NaN or inf.

    One reduction instead of an elementwise test: a row sum is non-finite iff the row holds a NaN or an
    inf (inf - inf = NaN), summed in at least float32 so that no finite half-precision row overflows.
    """
    return ~torch.isfinite(x.sum(dim=-1, dtype=torch.promote_types(x.dtype, torch.float32)))


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int | None,
    attention_mask: torch.Tensor | None = None,
    *,
    impl: str = "auto",
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Causal sliding-window softmax attention, scale 1/sqrt(D).

    Causality holds for non-finite inputs too: a NaN/inf in k or v at token s reaches no query before s
    (nor a query outside s's window, nor anything from a padded key). A kernel would spread it, as the
    zero weight of a masked key still multiplies the key's value (0 x NaN = NaN) inside P @ V, so
    non-finite key/value rows are replaced by zeros (selection) before the kernel and the queries that
    do attend to them are set to NaN after it. For finite inputs the result is the kernel's, unchanged.

    Args:
        q, k, v: [B, T, H, D].
        window_size: window W in tokens, None for full causal attention.
        attention_mask: optional [B, T] 0/1 padding mask; padded keys are never attended and padded
            query rows return zeros (as flash-attn's unpad/pad does).
        impl: "auto" (flash > sdpa > blocked, see the module docstring), or force one kernel;
            "dense" is the O(T^2) reference.
        block_size: query rows per block of the blocked kernel.

    Returns:
        [B, T, H, D].
    """
    _check(q, k, v, window_size, attention_mask, impl, block_size)
    T = q.shape[1]
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    key_ok = attention_mask.bool() if attention_mask is not None else None
    bad = _nonfinite_rows(k) | _nonfinite_rows(v)  # [B, T, H]
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    k = torch.where(bad[..., None], zero, k)  # the whole row: its finite part is never used either
    v = torch.where(bad[..., None], zero, v)
    if key_ok is not None:
        bad = bad & key_ok[:, :, None]  # a padded key is never attended: it poisons nothing
    # queries whose window holds a non-finite key/value: count of bad rows in (t - W, t] > 0
    seen = bad.to(torch.int32).cumsum(dim=1)  # [B, T, H]
    if window_size is not None and window_size < T:
        seen = seen - F.pad(seen, (0, 0, window_size, 0))[:, :T]
    poisoned = (seen > 0)[..., None]  # [B, T, H, 1]
    o = _kernel(q, k, v, window_size, key_ok, impl, block_size)
    o = torch.where(poisoned, torch.full((), float("nan"), dtype=o.dtype, device=o.device), o)
    if key_ok is not None:
        o = torch.where(key_ok[:, :, None, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
    return o


def choose_impl(q: torch.Tensor, window_size: int | None, key_ok: torch.Tensor | None) -> str:
    """The kernel `impl="auto"` runs for q [B, T, H, D] (see the module docstring)."""
    T = q.shape[1]
    if (flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and key_ok is None):
        return "flash"
    if key_ok is None and (window_size is None or window_size >= T):
        return "sdpa"
    return "blocked"


def _kernel(q, k, v, window_size, key_ok, impl, block_size):
    """Dispatch on finite k, v; padded query rows unspecified (the caller zeroes them)."""
    if impl == "auto":
        impl = choose_impl(q, window_size, key_ok)
    if impl == "flash":
        if flash_attn_func is None or key_ok is not None:
            raise ValueError("impl='flash' needs flash-attn installed and no padding mask")
        window = (-1, -1) if window_size is None else (window_size - 1, 0)
        return flash_attn_func(q, k, v, causal=True, window_size=window)
    if impl == "sdpa":
        if key_ok is not None or (window_size is not None and window_size < q.shape[1]):
            raise ValueError("impl='sdpa' needs no padding mask and a window covering the sequence")
        o = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
        return o.transpose(1, 2)
    if impl == "dense":
        return dense_window_attention(q, k, v, window_size, key_ok)
    return blocked_window_attention(q, k, v, window_size, key_ok, block_size)


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window_size: int | None,
                 key_ok: torch.Tensor | None) -> torch.Tensor:
    """[1 or B, 1, Tq, Tk] bool: may query q_pos[i] attend to key k_pos[j]?

    A query that may attend to nothing (a padded query before any real key) is let to see itself,
    so that its softmax stays finite; its row is zeroed by `window_attention`.
    """
    delta = q_pos[:, None] - k_pos[None, :]  # query index - key index
    allowed = delta >= 0
    if window_size is not None:
        allowed = allowed & (delta < window_size)
    mask = allowed[None, None]
    if key_ok is not None:
        mask = mask & key_ok[:, None, None, :]  # key_ok already sliced to k_pos: [B, Tk]
        mask = mask | (~mask.any(-1, keepdim=True) & (delta == 0))
    return mask


def dense_window_attention(q, k, v, window_size, key_ok=None):
    """Reference: the full T x T masked softmax. q, k, v [B, T, H, D], key_ok [B, T] bool or None."""
    T, D = q.shape[1], q.shape[-1]
    pos = torch.arange(T, device=q.device)
    mask = _window_mask(pos, pos, window_size, key_ok)  # [., 1, T, T]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def blocked_window_attention(q, k, v, window_size, key_ok=None, block_size: int = DEFAULT_BLOCK):
    """Query blocks of `block_size` rows, each against its own key window only.

    Block [s, e) needs keys [max(0, s - W + 1), e): the masked softmax over that slice is the dense
    row exactly (every key outside it is masked there). Memory: O(B H T (block + W)) for the scores and
    the probabilities autograd keeps, instead of O(B H T^2).
    """
    T = q.shape[1]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    pos = torch.arange(T, device=q.device)
    out = []
    for s in range(0, T, block_size):
        e = min(T, s + block_size)
        k0 = 0 if window_size is None else max(0, s - window_size + 1)
        mask = _window_mask(pos[s:e], pos[k0:e], window_size, None if key_ok is None else key_ok[:, k0:e])
        out.append(F.scaled_dot_product_attention(qt[:, :, s:e], kt[:, :, k0:e], vt[:, :, k0:e], attn_mask=mask))
    return torch.cat(out, dim=2).transpose(1, 2)
