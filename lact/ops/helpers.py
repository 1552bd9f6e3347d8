"""Small tensor helpers of the LaCT chunk operations.

Reproduces the helpers of a1600012888/LaCT, `lact_llm/lact_model/ttt_operation.py`:
`silu_backprop`, `l2_norm` and `zeropower_via_newtonschulz5` (the Muon orthogonalisation). The
Newton-Schulz iteration performs the same operations in the same order and dtype (bfloat16) as the
reference so that, on the same CPU and torch, it reproduces the reference bit for bit: the LaCT
update with Muon is chaotic in bfloat16 (see `parity/README.md`), so any reordering would only
match loosely. The reference's `torch.compile` decorators are left out: they do not change values.
"""

from __future__ import annotations

import torch

# Quintic Newton-Schulz coefficients (a, b, c) of the reference, one triple per iteration.
NS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)


def silu_backprop(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of SiLU: ``dy * sigma(x) * (1 + x * (1 - sigma(x)))``.

    Args:
        dy: upstream gradient, any shape.
        x: the SiLU input, same shape as `dy`.

    Returns:
        The gradient with respect to `x`, same shape.
    """
    sigma = torch.sigmoid(x)
    return dy * sigma * (1 + x * (1 - sigma))


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """Divide each row (last axis) by its L2 norm plus 1e-5, keeping the input dtype.

    Args:
        x: ``[..., D]``.

    Returns:
        ``[..., D]`` in the dtype of `x`.
    """
    return (x / (x.norm(dim=-1, keepdim=True) + 1e-5)).type(x.dtype)


def zeropower_via_newtonschulz5(G: torch.Tensor) -> torch.Tensor:
    """Approximately orthogonalise each matrix of a batch with five quintic Newton-Schulz steps.

    Casts to bfloat16, works on the wide orientation (a tall matrix is transposed and transposed
    back), scales each matrix by its Frobenius norm plus 1e-7 so the spectral norm is at most one,
    then iterates ``X <- a X + (b A + c A A) X`` with ``A = X X^T``.

    Args:
        G: ``[B, M, N]`` batch of matrices (any float dtype).

    Returns:
        ``[B, M, N]`` in **bfloat16**, as the reference returns it.
    """
    if G.dim() != 3:
        raise ValueError(f"G must be a batch of matrices [B, M, N], got shape {tuple(G.shape)}")
    X = G.bfloat16()
    tall = G.size(1) > G.size(2)
    if tall:
        X = X.transpose(1, 2)
    X = X / (X.norm(dim=(1, 2), keepdim=True) + 1e-7)
    for a, b, c in NS_COEFFICIENTS:
        A = X @ X.transpose(1, 2)
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.transpose(1, 2)
    return X
