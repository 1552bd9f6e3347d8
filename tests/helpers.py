"""Comparison helpers shared by the test suite.

`assert_close(name, ref, got, tol)` is the one scale-relative check of the suite (as fla's
`tests/utils.assert_close`): max|got - ref| / max|ref| <= tol, with a failure message naming the
tensor, the error, and the worst element's index and both values, so a failing parametrized case says
which tensor broke and where. The metric is the one `parity.fixtures.compare` applies to fixtures.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def max_rel(ref, got) -> float:
    """max|got - ref| / max|ref| (tensors or arrays of one shape; an all-zero `ref` divides by 1e-30)."""
    r, g = _as_float64(ref), _as_float64(got)
    if r.shape != g.shape:
        raise AssertionError(f"shape {g.shape} != reference shape {r.shape}")
    if r.size == 0:
        return 0.0
    return float(np.abs(g - r).max() / max(float(np.abs(r).max()), 1e-30))


def assert_close(name: str, ref, got, tol: float) -> None:
    """Assert max|got - ref| / max|ref| <= tol; a NaN anywhere fails.

    Args:
        name: what is compared (e.g. "grad w0"), printed on failure.
        ref: the reference (torch tensor or numpy array).
        got: the value under test, the same shape.
        tol: the largest allowed scale-relative error.
    """
    r, g = _as_float64(ref), _as_float64(got)
    if r.shape != g.shape:
        raise AssertionError(f"{name}: shape {g.shape} != reference shape {r.shape}")
    if r.size == 0:
        return
    err = np.abs(g - r)
    err = np.where(np.isnan(err), np.inf, err)
    scale = max(float(np.abs(r).max()), 1e-30)
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    rel = float(err[worst]) / scale
    if not rel <= tol:
        raise AssertionError(f"{name}: max rel error {rel:.3e} > tol {tol:.1e} (max|ref| = {scale:.3e}); worst at "
                             f"index {tuple(int(i) for i in worst)}: got {float(g[worst])!r}, ref {float(r[worst])!r}")
