"""Kernel ridge regression on the normalised kernel (spec section 3)."""

from __future__ import annotations

import torch


class SingularKernelError(ValueError):
    """K + ridge I is not positive definite in the working precision: raise the ridge."""


def kernel_scale(K: torch.Tensor) -> float:
    """The normaliser of spec section 3: the largest entry of the training kernel."""
    scale = float(K.max())
    if not scale > 0:
        raise SingularKernelError(
            f"the training kernel's largest entry is {scale}; are all training images blank?"
        )
    return scale


def solve_ridge(K: torch.Tensor, Y: torch.Tensor, ridge: float) -> torch.Tensor:
    """alpha = (K + ridge I)^-1 Y by Cholesky, in float64 whatever the kernel's dtype.

    Raises
    ------
    SingularKernelError
        When K + ridge I has no Cholesky factor (the ridge is too small for this kernel).
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0; found {ridge}")
    n = K.shape[0]
    if K.shape != (n, n) or Y.shape[0] != n:
        raise ValueError(f"K must be (n, n) and Y (n, c); found {tuple(K.shape)} and "
                         f"{tuple(Y.shape)}")
    A = K.to(torch.float64).clone()
    A.diagonal().add_(ridge)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise SingularKernelError(
            f"K + ridge*I is not positive definite for ridge={ridge:g} (Cholesky failed at "
            f"column {int(info)} of {n}); use a larger ridge"
        )
    alpha = torch.cholesky_solve(Y.to(torch.float64), L)
    if not torch.isfinite(alpha).all():
        raise SingularKernelError(
            f"ridge={ridge:g} gives non-finite coefficients; use a larger ridge"
        )
    return alpha
