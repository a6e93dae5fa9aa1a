"""The Nystrom problem by preconditioned conjugate gradient (docs/math.md section 9a).

Solves H alpha = K_nm^T Y with H = K_nm^T K_nm + r K_mm without ever forming K_nm^T K_nm: the
caller supplies ``gram_matvec(V) = K_nm^T (K_nm V)`` (m x c in, m x c out), which a distributed
backend computes as a sum over workers of their rows' K_s^T (K_s V). The preconditioner is
Falkon's (Rudi, Carratino, Rosasco 2017; Meanti et al. 2020): with T^T T = K_mm and
A^T A = T T^T / m + (r / n) I, B = T^-1 A^-1 / sqrt(n) makes B^T H B close to the identity,
because K_nm^T K_nm ~ (n / m) K_mm^2 for uniformly sampled centers. CG then needs a number of
steps that hardly grows with n or m, each costing one pass over K_nm.

For an m whose m x m factor fits nowhere, a rank-q spectral preconditioner (EigenPro's idea in
Falkon's setting) takes K_mm ~ U diag(lam) U^T from q of the centers and rescales those q
directions to H ~ (n/m) K_mm^2 + r K_mm, the rest by the floor h(lam_q): m x q numbers.

Factors are split from the ridge (``FalkonFactor``, ``SpectralFactor``: ``for_ridge``), so every
ridge of an iteration reuses one factorisation.

Everything here is float64 and m x m (m x q) or m x c: no n-sized object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ray_convrfm.kernels.solvers import SingularKernelError

#: Jitter added to K_mm's diagonal, relative to its mean diagonal entry, when the Cholesky of
#: K_mm fails (duplicate centers make it singular): the preconditioner only needs to be close.
PRECONDITIONER_JITTER = 1e-10


class Preconditioner(Protocol):
    """B with B^T H B close to the identity: ``apply`` is B v, ``apply_t`` is B^T v."""

    def apply(self, v: torch.Tensor) -> torch.Tensor: ...

    def apply_t(self, v: torch.Tensor) -> torch.Tensor: ...


def _cholesky_with_jitter(K: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric K (its lower triangle is read; the diagonal is
    jittered in place, so K is consumed), with a growing jitter when it is singular. Peak
    memory: K and the factor (two m x m), so the first worker's factorisation needs little
    more than the factor."""
    scale = float(K.diagonal().mean().clamp_min(torch.finfo(K.dtype).tiny)) if len(K) else 1.0
    jitter = 0.0
    for _ in range(8):  # grow the jitter until K + jitter I factors
        L, info = torch.linalg.cholesky_ex(K)
        if int(info) == 0:
            return L
        del L
        step = max(jitter * 99, PRECONDITIONER_JITTER * scale)  # jitter becomes 100x
        K.diagonal().add_(step)
        jitter += step
    raise SingularKernelError(f"{what} has no Cholesky factor even with jitter {jitter:g}; "
                              "are the centers blank images?")


@dataclass(frozen=True)
class FalkonFactor:
    """The ridge-independent half of Falkon's preconditioner: T upper with T^T T = K_mm."""

    T: torch.Tensor  # (m, m) upper triangular

    @classmethod
    def build(cls, K_mm: torch.Tensor) -> FalkonFactor:
        K = K_mm.to(torch.float64, copy=True)  # the caller's K_mm is left as it was
        return cls(T=_cholesky_with_jitter(K, "the centers' kernel K_mm").T)

    def for_ridge(self, ridge: float, n: int) -> FalkonPreconditioner:
        T = self.T
        m = T.shape[0]
        inner = T @ T.T  # symmetric; its lower triangle is what the Cholesky reads
        inner.div_(m).diagonal().add_(ridge / n)
        info = torch.empty((), dtype=torch.int32, device=inner.device)
        # factored in place: T and A are the only m x m matrices, even while building
        LA, info = torch.linalg.cholesky_ex(inner, out=(inner, info))
        LA.tril_()
        if int(info) != 0:
            raise SingularKernelError(f"the preconditioner for ridge={ridge:g} has no Cholesky "
                                      "factor; use a larger ridge")
        return FalkonPreconditioner(T=T, A=LA.T, n=n)


@dataclass(frozen=True)
class FalkonPreconditioner:
    """B = T^-1 A^-1 / sqrt(n) as two triangular factors (upper: T^T T = K_mm, A^T A = ...)."""

    T: torch.Tensor  # (m, m) upper triangular
    A: torch.Tensor  # (m, m) upper triangular
    n: int

    @classmethod
    def build(cls, K_mm: torch.Tensor, ridge: float, n: int) -> FalkonPreconditioner:
        """From the centers' kernel, the ridge r and the number of training rows n."""
        return FalkonFactor.build(K_mm).for_ridge(ridge, n)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """B v = T^-1 (A^-1 v) / sqrt(n)."""
        u = torch.linalg.solve_triangular(self.A, v, upper=True)
        return torch.linalg.solve_triangular(self.T, u, upper=True) / self.n**0.5

    def apply_t(self, v: torch.Tensor) -> torch.Tensor:
        """B^T v = A^-T (T^-T v) / sqrt(n)."""
        u = torch.linalg.solve_triangular(self.T.T, v, upper=False)
        return torch.linalg.solve_triangular(self.A.T, u, upper=False) / self.n**0.5


@dataclass(frozen=True)
class SpectralFactor:
    """K_mm ~ U diag(lam) U^T from q of the centers (a Nystrom approximation of K_mm itself):
    the ridge-independent half of the rank-q preconditioner, m x q numbers."""

    U: torch.Tensor  # (m, q) orthonormal columns
    lam: torch.Tensor  # (q,) eigenvalues, descending

    @classmethod
    def build(cls, C: torch.Tensor, cols: np.ndarray) -> SpectralFactor:
        """From C = K(centers, centers[cols]) (m x q): K_mm ~ C K_qq^-1 C^T with K_qq = C[cols].
        With L L^T = K_qq and F = C L^-T, K_mm ~ F F^T, whose eigenpairs come from a QR of F."""
        C = C.to(torch.float64)
        L = _cholesky_with_jitter(C[torch.as_tensor(np.asarray(cols), device=C.device)].clone(),
                                  "the kernel of the preconditioner's centers")
        F = torch.linalg.solve_triangular(L, C.T, upper=False).T  # (m, q)
        del C  # (the caller's copy, if it keeps one, stays)
        Qf, R = torch.linalg.qr(F)
        del F
        lam, V = torch.linalg.eigh(R @ R.T)
        order = torch.argsort(lam, descending=True)
        return cls(U=Qf @ V[:, order], lam=lam[order].clamp_min(0))

    def for_ridge(self, ridge: float, n: int) -> SpectralPreconditioner:
        """H ~ (n/m) K_mm^2 + r K_mm has eigenvalues h = (n/m) lam^2 + r lam on U; the rest of
        the space, where K_mm's eigenvalues are at most lam_q, gets the floor h(lam_q)."""
        m = self.U.shape[0]
        h = (n / m) * self.lam**2 + ridge * self.lam
        floor = float(h[-1]) if len(h) else 1.0
        if not floor > 0:  # a rank-deficient sample of centers: floor at the spectrum's tail
            floor = max(float(h.max()) * 1e-12 if len(h) else 1.0, torch.finfo(h.dtype).tiny)
        return SpectralPreconditioner(U=self.U, d=h.clamp_min(floor).rsqrt(),
                                      f=floor ** -0.5)


@dataclass(frozen=True)
class SpectralPreconditioner:
    """B = U diag(d) U^T + f (I - U U^T): symmetric, so B^T = B."""

    U: torch.Tensor
    d: torch.Tensor
    f: float

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        w = self.U.T @ v
        return self.U @ ((self.d[:, None] - self.f) * w) + self.f * v

    apply_t = apply


def factor_centers(C: torch.Tensor, cols: np.ndarray | None,
                   overwrite: bool = False) -> FalkonFactor | SpectralFactor:
    """The preconditioner's factor from rows of the centers' kernel: C = K_mm whole
    (``cols`` None: Falkon's) or its columns ``cols`` (rank q = len(cols): spectral).
    ``overwrite`` lets a float64 C be factored in place (no m x m copy)."""
    if cols is None:
        if overwrite and C.dtype == torch.float64:
            return FalkonFactor(T=_cholesky_with_jitter(C, "the centers' kernel K_mm").T)
        return FalkonFactor.build(C)
    return SpectralFactor.build(C, cols)


def preconditioner_columns(m: int, rank: int | None, seed: int = 0) -> np.ndarray | None:
    """Which q of the m centers build a rank-q preconditioner (sorted, seeded); None for the
    full factor (no rank, or a rank that is not below m)."""
    if rank is None or rank >= m:
        return None
    return np.sort(np.random.default_rng(seed).choice(m, size=rank, replace=False))


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


def preconditioned_cg(hessian: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor,
                      pre: Preconditioner, tol: float = 1e-8, max_iter: int = 500,
                      what: str = "the system",
                      step: Callable[[torch.Tensor], torch.Tensor] | None = None) -> CGResult:
    """x of H x = rhs by CG on B^T H B (the one loop every backend runs): ``hessian(V)`` is
    H V for an (m, c) float64 V, wherever H's rows live; ``step``, when given, is B^T H B v in
    one call (a backend that chains the three where they live). ``x`` is returned in the
    original coordinates, ``relative_residual`` is that of the preconditioned system."""
    def h(v: torch.Tensor) -> torch.Tensor:  # B^T H B v
        return pre.apply_t(hessian(pre.apply(v)))

    result = conjugate_gradient(step or h, pre.apply_t(rhs.to(torch.float64)), tol=tol,
                                max_iter=max_iter)
    x = pre.apply(result.x)
    if not torch.isfinite(x).all():
        raise SingularKernelError(f"{what} gives non-finite coefficients; use a larger ridge")
    return CGResult(x=x, iterations=result.iterations,
                    relative_residual=result.relative_residual, converged=result.converged)


def solve_nystrom_pcg(gram_matvec: Callable[[torch.Tensor], torch.Tensor], K_mm: torch.Tensor,
                      KtY: torch.Tensor, ridge: float, n: int, tol: float = 1e-8,
                      max_iter: int = 500, rank: int | None = None) -> CGResult:
    """alpha (m, c) of (K_nm^T K_nm + ridge K_mm) alpha = K_nm^T Y by preconditioned CG, with
    every matrix in this process (the backends run ``preconditioned_cg`` with their own
    products and factors).

    ``gram_matvec(V)`` returns K_nm^T (K_nm V) for an (m, c) float64 V; ``rank`` q < m uses
    the rank-q spectral preconditioner instead of Falkon's.
    """
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0; found {ridge}")
    K_mm = K_mm.to(torch.float64)
    cols = preconditioner_columns(len(K_mm), rank)
    factor = factor_centers(K_mm if cols is None else K_mm[:, torch.as_tensor(cols)], cols)
    return preconditioned_cg(lambda u: gram_matvec(u) + ridge * (K_mm @ u), KtY,
                             factor.for_ridge(ridge, n), tol, max_iter, f"ridge={ridge:g}")
