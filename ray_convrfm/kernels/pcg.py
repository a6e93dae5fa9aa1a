"""The Nystrom problem by preconditioned conjugate gradient (docs/math.md section 9a).

Solves H alpha = K_nm^T Y with H = K_nm^T K_nm + r K_mm without ever forming K_nm^T K_nm: the
caller supplies ``gram_matvec(V) = K_nm^T (K_nm V)`` (m x c in, m x c out), which a distributed
backend computes as a sum over workers of their rows' K_s^T (K_s V). The preconditioner is
Falkon's (Rudi, Carratino, Rosasco 2017; Meanti et al. 2020): with T^T T = K_mm and
A^T A = T T^T / m + (r / n) I, B = T^-1 A^-1 / sqrt(n) makes B^T H B close to the identity,
because K_nm^T K_nm ~ (n / m) K_mm^2 for uniformly sampled centers. CG then needs a number of
steps that hardly grows with n or m, each costing one pass over K_nm.

Everything here is float64 and m x m or m x c: no n-sized object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ray_convrfm.kernels.solvers import SingularKernelError

#: Jitter added to K_mm's diagonal, relative to its mean diagonal entry, when the Cholesky of
#: K_mm fails (duplicate centers make it singular): the preconditioner only needs to be close.
PRECONDITIONER_JITTER = 1e-10


@dataclass(frozen=True)
class FalkonPreconditioner:
    """B = T^-1 A^-1 / sqrt(n) as two triangular factors (upper: T^T T = K_mm, A^T A = ...)."""

    T: torch.Tensor  # (m, m) upper triangular
    A: torch.Tensor  # (m, m) upper triangular
    n: int

    @classmethod
    def build(cls, K_mm: torch.Tensor, ridge: float, n: int) -> FalkonPreconditioner:
        """From the centers' kernel, the ridge r and the number of training rows n."""
        K = K_mm.to(torch.float64)
        K = 0.5 * (K + K.T)
        m = K.shape[0]
        eye = torch.eye(m, dtype=K.dtype, device=K.device)
        jitter = 0.0
        scale = float(K.diagonal().mean().clamp_min(torch.finfo(K.dtype).tiny))
        for _ in range(8):  # grow the jitter until K_mm + jitter I factors
            L, info = torch.linalg.cholesky_ex(K + jitter * eye)
            if int(info) == 0:
                break
            jitter = max(jitter * 100, PRECONDITIONER_JITTER * scale)
        else:
            raise SingularKernelError("the centers' kernel K_mm has no Cholesky factor even "
                                      f"with jitter {jitter:g}; are the centers blank images?")
        T = L.T  # upper: T^T T = K_mm (+ jitter)
        inner = T @ T.T / m + (ridge / n) * eye
        LA, info = torch.linalg.cholesky_ex(0.5 * (inner + inner.T))
        if int(info) != 0:
            raise SingularKernelError(f"the preconditioner for ridge={ridge:g} has no Cholesky "
                                      "factor; use a larger ridge")
        return cls(T=T, A=LA.T, n=n)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """B v = T^-1 (A^-1 v) / sqrt(n)."""
        u = torch.linalg.solve_triangular(self.A, v, upper=True)
        return torch.linalg.solve_triangular(self.T, u, upper=True) / self.n**0.5

    def apply_t(self, v: torch.Tensor) -> torch.Tensor:
        """B^T v = A^-T (T^-T v) / sqrt(n)."""
        u = torch.linalg.solve_triangular(self.T.T, v, upper=False)
        return torch.linalg.solve_triangular(self.A.T, u, upper=False) / self.n**0.5


@dataclass(frozen=True)
class CGResult:
    """The solution and how CG got there (recorded per ridge in ``history_``)."""

    x: torch.Tensor
    iterations: int
    relative_residual: float
    converged: bool


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       tol: float = 1e-8, max_iter: int = 500) -> CGResult:
    """CG on an SPD operator for every column of b at once (one matvec per step for all).

    Each column has its own step sizes; stops when every column's residual is below
    ``tol`` x its right-hand side's norm (columns with b = 0 give x = 0).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    b_norm = b.norm(dim=0).clamp_min(torch.finfo(b.dtype).tiny)
    rs = (r * r).sum(0)
    rel = float((rs.sqrt() / b_norm).max())
    it = 0
    while rel > tol and it < max_iter:
        Ap = matvec(p)
        pAp = (p * Ap).sum(0)
        step = torch.where(pAp > 0, rs / pAp.clamp_min(torch.finfo(b.dtype).tiny),
                           torch.zeros_like(rs))
        x = x + p * step
        r = r - Ap * step
        rs_new = (r * r).sum(0)
        p = r + p * (rs_new / rs.clamp_min(torch.finfo(b.dtype).tiny))
        rs = rs_new
        it += 1
        rel = float((rs.sqrt() / b_norm).max())
    return CGResult(x=x, iterations=it, relative_residual=rel, converged=rel <= tol)


def solve_nystrom_pcg(gram_matvec: Callable[[torch.Tensor], torch.Tensor], K_mm: torch.Tensor,
                      KtY: torch.Tensor, ridge: float, n: int, tol: float = 1e-8,
                      max_iter: int = 500) -> CGResult:
    """alpha (m, c) of (K_nm^T K_nm + ridge K_mm) alpha = K_nm^T Y by Falkon-preconditioned CG.

    ``gram_matvec(V)`` returns K_nm^T (K_nm V) for an (m, c) float64 V; it is the only access
    to the training rows. The returned ``x`` is alpha, and ``relative_residual`` is that of the
    preconditioned system (the quantity CG minimises).
    """
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0; found {ridge}")
    K_mm = K_mm.to(torch.float64)
    KtY = KtY.to(torch.float64)
    pre = FalkonPreconditioner.build(K_mm, ridge, n)

    def h(v: torch.Tensor) -> torch.Tensor:  # B^T H B v
        u = pre.apply(v)
        return pre.apply_t(gram_matvec(u) + ridge * (K_mm @ u))

    result = conjugate_gradient(h, pre.apply_t(KtY), tol=tol, max_iter=max_iter)
    alpha = pre.apply(result.x)
    if not torch.isfinite(alpha).all():
        raise SingularKernelError(f"ridge={ridge:g} gives non-finite coefficients; use a "
                                  "larger ridge")
    return CGResult(x=alpha, iterations=result.iterations,
                    relative_residual=result.relative_residual, converged=result.converged)
