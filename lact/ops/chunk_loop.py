"""The LaCT chunk loop, written once, and the choice of the chunk step's implementation.

`run_chunks` walks chunks ``[(start, end, update), ...]`` from a fast-weight state: it slices each
chunk's inputs, runs the chunk step (the torch `lact.ops.step.chunk_step`, or the Triton kernels of
`lact.ops.triton_update` when ``opts.kernel == "triton"``), collects the outputs and carries the
state. Every path runs it: plain autograd and the carried-state path (`lact.ops.chunk`), the
graph-free forward sweep and the rebuilt chunks of manual backprop (`lact.ops.manual_backprop`).
"""

from __future__ import annotations

import os

import torch

from lact.ops.step import LaCTOptions, LevelState, chunk_inputs, chunk_step

KERNELS = ("torch", "triton", "auto")


def triton_available() -> bool:
    """Whether the optional `triton` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """Map ``kernel="torch"|"triton"|"auto"`` to the implementation of the chunk step.

    "auto" is "triton" on CUDA when triton imports, else "torch". "triton" needs triton and a CUDA
    device, or CPU tensors with ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests).

    Raises:
        ValueError for an unknown name; RuntimeError when "triton" cannot run here.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "torch":
        return "torch"
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    usable = triton_available() and (device.type == "cuda" or interpret)
    if kernel == "auto":
        return "triton" if usable and device.type == "cuda" else "torch"
    if not usable:
        raise RuntimeError(
            f"kernel='triton' cannot run on device {device.type!r}: it needs the triton package "
            "(pip install triton) and CUDA tensors, or TRITON_INTERPRET=1 on CPU; use kernel='torch' or 'auto'"
        )
    return "triton"


def _step_impl(opts: LaCTOptions, device: torch.device):
    """The chunk step to run: the Triton kernels outside autocast (they do not follow autocast's
    dtype rules), else the torch step."""
    if opts.kernel == "triton" and not torch.is_autocast_enabled(device.type):
        from lact.ops.triton_update import triton_chunk_step  # optional dependency

        return triton_chunk_step
    return chunk_step


def run_chunks(state: list[LevelState], norms, seqs, bounds, opts: LaCTOptions, *, offset: int = 0,
               q_skip: int = 0, part: str = "all", entry_states: list | None = None):
    """Run the chunks `bounds` from `state`.

    Args:
        state: per MLP the `LevelState` entering the first chunk; norms: the renormalisation targets.
        seqs: ``(q, k, v, lr0, lr1, lr2, momentum)`` as in `lact.ops.chunk.lact_swiglu`, position 0
            of these tensors being sequence position `offset`.
        bounds: ``(start, end, update)`` per chunk in sequence positions (`chunk_bounds`).
        q_skip: queries before this (local) position are dropped (the carried-state path: pending
            tokens already had their outputs).
        part: "all", or "apply" / "update" (see `lact.ops.step.chunk_step`).
        entry_states: if a list, the state entering each chunk is appended to it.

    Returns:
        (per-chunk outputs ``[n, d_out, l_i]`` (none for part "update"), the state after the last
        update chunk).
    """
    step = _step_impl(opts, seqs[0].device)
    outs = []
    for s, e, update in bounds:
        if entry_states is not None:
            entry_states.append(state)
        qi, ki, vi, lr0i, lr1i, lr2i, mi = chunk_inputs(*seqs, s - offset, e - offset)
        if q_skip > s - offset:
            qi = qi[:, :, q_skip - (s - offset):]
        oi, new_state = step(state, norms, qi, ki, vi, lr0i, lr1i, lr2i, mi, opts, update, part)
        if oi is not None:
            outs.append(oi)
        if new_state is not None:
            state = new_state
    return outs, state
