"""Triton kernels jitted lazily, once per TRITON_INTERPRET value (the kernels of `official_port.ops` and
`lact.ops`).

Triton decides between compiled and interpreted when a function is decorated, and the CPU tests set
TRITON_INTERPRET only while they run (so it never leaks into the rest of the suite): the kernels are
therefore kept as plain functions and decorated here on first use in each mode.
"""

from __future__ import annotations

import os

_JITTED: dict = {}


def jit_for_mode(fn, device_functions: dict | None = None):
    """`fn` under `triton.jit` for the current TRITON_INTERPRET value (cached).

    Args:
        fn: the kernel, a plain function.
        device_functions: {name: plain function} that the kernel calls by its module-level name; they are
            jitted for the same mode and bound under that name in the kernel's module.
    """
    mode = os.environ.get("TRITON_INTERPRET", "0")
    for name, device_fn in (device_functions or {}).items():
        fn.__globals__[name] = _jitted(device_fn, name, mode)
    return _jitted(fn, fn.__name__, mode)


def _jitted(fn, name: str, mode: str):
    import triton

    key = (fn.__module__, name, mode)
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]
