"""Random layer-like inputs for the LaCT op tests (shared by test_ops and test_manual_backprop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lact.ops import l2_norm

NAMES = ("q", "k", "v", "lr0", "lr1", "lr2", "momentum")


def make_inputs(r=2, n=2, d=6, d_h=8, T=11, dtype=torch.float64, momentum=True, seed=0, d_out=None):
    """Layer-like inputs: L2-normalised SiLU q/k, SiLU v, softplus-like rates, sigmoid momentum."""
    g = torch.Generator().manual_seed(seed)
    d_out = d if d_out is None else d_out

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    levels = []
    for i in range(r):
        out = d_out if i == r - 1 else d
        levels.append((rnd(n, d_h, d, scale=d**-0.5), rnd(n, out, d_h, scale=d_h**-0.5), rnd(n, d_h, d, scale=d**-0.5)))
    x = {
        "q": l2_norm(F.silu(rnd(n, T, d))),
        "k": l2_norm(F.silu(rnd(n, T, d))),
        "v": F.silu(rnd(n, T, d_out)),
        "lr0": F.softplus(rnd(n, T, 1) - 2.0),
        "lr1": F.softplus(rnd(n, T, 1) - 2.0),
        "lr2": F.softplus(rnd(n, T, 1) - 2.0),
        "momentum": torch.sigmoid(rnd(n, T, 1)) if momentum else None,
    }
    return levels, x
