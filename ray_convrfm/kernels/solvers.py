"""Kernel ridge regression on the normalised kernel (docs/math.md section 3)."""

from __future__ import annotations

import torch


class SingularKernelError(ValueError):
    """K + ridge I is not positive definite in the working precision: raise the ridge."""


def kernel_scale(K: torch.Tensor) -> float:
    """The normaliser of docs/math.md section 3: the largest entry of the training kernel."""
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


def normal_equations(K_block: torch.Tensor,
                     Y_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's share of the Nystrom system: (K^T K, K^T Y) for its rows K_block (n_s, m).

    Sums over shards give K_nm^T K_nm and K_nm^T Y (docs/math.md 9); float64 so that sums over
    many shards keep their precision.
    """
    K = K_block.to(torch.float64)
    return K.T @ K, K.T @ Y_block.to(torch.float64)


def class_sums(K_block: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """K^T Y (m, c) for one-hot targets Y of ``labels`` (class indices), without forming Y:
    column k sums the rows of K_block whose label is k (float64). The n x c targets never
    exist anywhere; each shard adds its rows' share."""
    out = torch.zeros(classes, K_block.shape[1], dtype=torch.float64, device=K_block.device)
    out.index_add_(0, labels.to(device=K_block.device, dtype=torch.int64),
                   K_block.to(torch.float64))
    return out.T


def solve_nystrom(KtK: torch.Tensor, KtY: torch.Tensor, K_mm: torch.Tensor,
                  ridge: float) -> torch.Tensor:
    """alpha (m, c) of (K_nm^T K_nm + ridge K_mm) alpha = K_nm^T Y (docs/math.md 9), by Cholesky.

    Only m x m matrices: the n x n kernel is never needed. With the centers equal to the
    training set (m = n) and K invertible this equals ``solve_ridge``.

    Raises
    ------
    SingularKernelError
        When the system has no Cholesky factor for this ridge.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0; found {ridge}")
    m = K_mm.shape[0]
    if KtK.shape != (m, m) or K_mm.shape != (m, m) or KtY.shape[0] != m:
        raise ValueError(f"K_nm^T K_nm and K_mm must be (m, m) and K_nm^T Y (m, c); found "
                         f"{tuple(KtK.shape)}, {tuple(K_mm.shape)} and {tuple(KtY.shape)}")
    A = KtK.to(torch.float64) + ridge * K_mm.to(torch.float64)
    A = 0.5 * (A + A.T)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise SingularKernelError(
            f"K_nm^T K_nm + ridge*K_mm is not positive definite for ridge={ridge:g} (Cholesky "
            f"failed at column {int(info)} of {m}); use a larger ridge or fewer centers"
        )
    return torch.cholesky_solve(KtY.to(torch.float64), L)
