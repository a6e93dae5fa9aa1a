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

Factors are split from the ridge (``FalkonFactor``, ``SpectralFactor``: ``for_ridges``): every
ridge of an iteration reuses one factorisation, and all ridges are solved in one CG run over
R c columns (column block r is ridge r's), so each step reads the rows of K_nm once for every
ridge.

Everything here is float64 and m x m (m x q) or m x c: no n-sized object.
"""

from __future__ import annotations

import dataclasses
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


def _blocks(v: torch.Tensor, count: int) -> torch.Tensor:
    """(m, R c) columns as (m, R, c): column block r belongs to ridge r."""
    if v.shape[1] % count:
        raise ValueError(f"{v.shape[1]} columns do not split into {count} ridges")
    return v.reshape(v.shape[0], count, v.shape[1] // count)


@dataclass(frozen=True)
class FalkonFactor:
    """The ridge-independent part of Falkon's preconditioner: T upper with T^T T = K_mm, and
    T T^T / m = Q diag(lam) Q^T. Every ridge's A (A^T A = T T^T / m + (r/n) I) is then
    diag(lam + r/n)^(1/2) Q^T, so all ridges share two m x m matrices and one factorisation."""

    T: torch.Tensor  # (m, m) upper triangular
    Q: torch.Tensor  # (m, m) orthonormal eigenvectors of T T^T / m
    lam: torch.Tensor  # (m,) its eigenvalues

    @classmethod
    def build(cls, K_mm: torch.Tensor) -> FalkonFactor:
        K = K_mm.to(torch.float64, copy=True)  # the caller's K_mm is left as it was
        return cls.from_cholesky(_cholesky_with_jitter(K, "the centers' kernel K_mm").T)

    @classmethod
    def from_cholesky(cls, T: torch.Tensor) -> FalkonFactor:
        m = T.shape[0]
        inner = T @ T.T
        inner.div_(max(m, 1))
        lam = torch.empty(m, dtype=T.dtype, device=T.device)
        # in place: T and Q are the only m x m matrices kept
        lam, Q = torch.linalg.eigh(inner, out=(lam, inner))
        return cls(T=T, Q=Q, lam=lam.clamp_min(0))

    def for_ridges(self, ridges: list[float], n: int) -> FalkonPreconditioner:
        """B for column block r of ridge ``ridges[r]``."""
        D = torch.stack([(self.lam + r / n).rsqrt() for r in ridges])  # (R, m)
        if not torch.isfinite(D).all():
            raise SingularKernelError(f"the preconditioner for ridges {list(ridges)} is "
                                      "singular; use larger ridges")
        return FalkonPreconditioner(T=self.T, Q=self.Q, D=D, n=n)

    def for_ridge(self, ridge: float, n: int) -> FalkonPreconditioner:
        return self.for_ridges([ridge], n)


@dataclass(frozen=True)
class FalkonPreconditioner:
    """B = T^-1 A^-1 / sqrt(n) with A^-1 = Q diag(lam + r/n)^(-1/2), per block of columns."""

    T: torch.Tensor  # (m, m) upper triangular
    Q: torch.Tensor  # (m, m)
    D: torch.Tensor  # (R, m): (lam + r/n)^(-1/2) per ridge
    n: int

    @classmethod
    def build(cls, K_mm: torch.Tensor, ridge: float, n: int) -> FalkonPreconditioner:
        """From the centers' kernel, the ridge r and the number of training rows n."""
        return FalkonFactor.build(K_mm).for_ridge(ridge, n)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """B v = T^-1 Q (D v) / sqrt(n)."""
        w = (_blocks(v, len(self.D)) * self.D.T[:, :, None]).reshape(v.shape)
        return torch.linalg.solve_triangular(self.T, self.Q @ w, upper=True) / self.n**0.5

    def apply_t(self, v: torch.Tensor) -> torch.Tensor:
        """B^T v = D Q^T T^-T v / sqrt(n)."""
        u = self.Q.T @ torch.linalg.solve_triangular(self.T.T, v, upper=False)
        return (_blocks(u, len(self.D)) * self.D.T[:, :, None]).reshape(v.shape) / self.n**0.5


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

    def for_ridges(self, ridges: list[float], n: int) -> SpectralPreconditioner:
        """H ~ (n/m) K_mm^2 + r K_mm has eigenvalues h = (n/m) lam^2 + r lam on U; the rest of
        the space, where K_mm's eigenvalues are at most lam_q, gets the floor h(lam_q)."""
        m = self.U.shape[0]
        d, f = [], []
        for ridge in ridges:
            h = (n / m) * self.lam**2 + ridge * self.lam
            floor = float(h[-1]) if len(h) else 1.0
            if not floor > 0:  # a rank-deficient sample of centers: floor at the tail
                floor = max(float(h.max()) * 1e-12 if len(h) else 1.0,
                            torch.finfo(h.dtype).tiny)
            d.append(h.clamp_min(floor).rsqrt())
            f.append(floor ** -0.5)
        return SpectralPreconditioner(U=self.U, d=torch.stack(d),
                                      f=torch.tensor(f, dtype=self.U.dtype,
                                                     device=self.U.device))

    def for_ridge(self, ridge: float, n: int) -> SpectralPreconditioner:
        return self.for_ridges([ridge], n)


@dataclass(frozen=True)
class SpectralPreconditioner:
    """B = U diag(d) U^T + f (I - U U^T) per block of columns: symmetric, so B^T = B."""

    U: torch.Tensor
    d: torch.Tensor  # (R, q)
    f: torch.Tensor  # (R,)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        R = len(self.f)
        w = _blocks(self.U.T @ v, R) * (self.d - self.f[:, None]).T[:, :, None]
        return self.U @ w.reshape(-1, v.shape[1]) + (
            _blocks(v, R) * self.f[None, :, None]).reshape(v.shape)

    apply_t = apply


def factor_centers(C: torch.Tensor, cols: np.ndarray | None,
                   overwrite: bool = False) -> FalkonFactor | SpectralFactor:
    """The preconditioner's factor from rows of the centers' kernel: C = K_mm whole
    (``cols`` None: Falkon's) or its columns ``cols`` (rank q = len(cols): spectral).
    ``overwrite`` lets a float64 C be factored in place (no m x m copy)."""
    if cols is None:
        if overwrite and C.dtype == torch.float64:
            return FalkonFactor.from_cholesky(
                _cholesky_with_jitter(C, "the centers' kernel K_mm").T)
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
    """The solution and how CG got there (recorded per ridge in ``history_``): overall, and
    per column (a column stops moving once it has converged)."""

    x: torch.Tensor
    iterations: int
    relative_residual: float
    converged: bool
    column_iterations: torch.Tensor | None = None  # (columns,) steps until each converged
    column_residuals: torch.Tensor | None = None  # (columns,) final relative residuals


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       tol: float = 1e-8, max_iter: int = 500) -> CGResult:
    """CG on an SPD operator for every column of b at once (one matvec per step for all).

    Each column has its own step sizes and stops (its x and residual frozen) once its
    residual is below ``tol`` x its right-hand side's norm; CG ends when every column has
    (columns with b = 0 give x = 0).
    """
    tiny = torch.finfo(b.dtype).tiny
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    b_norm = b.norm(dim=0).clamp_min(tiny)
    rs = (r * r).sum(0)
    rel = rs.sqrt() / b_norm
    steps = torch.zeros(b.shape[1], dtype=torch.long)
    it = 0
    while bool((rel > tol).any()) and it < max_iter:
        active = rel > tol
        Ap = matvec(p)
        pAp = (p * Ap).sum(0)
        step = torch.where(active & (pAp > 0), rs / pAp.clamp_min(tiny), torch.zeros_like(rs))
        x = x + p * step
        r = r - Ap * step
        rs_new = (r * r).sum(0)
        p = torch.where(active, r + p * (rs_new / rs.clamp_min(tiny)), p)
        rs = torch.where(active, rs_new, rs)
        it += 1
        steps += active.cpu().long()
        rel = rs.sqrt() / b_norm
    worst = float(rel.max()) if len(rel) else 0.0
    return CGResult(x=x, iterations=it, relative_residual=worst, converged=worst <= tol,
                    column_iterations=steps, column_residuals=rel.cpu())


def preconditioned_cg(hessian: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor,
                      pre: Preconditioner, tol: float = 1e-8, max_iter: int = 500,
                      step: Callable[[torch.Tensor], torch.Tensor] | None = None) -> CGResult:
    """x of H x = rhs by CG on B^T H B (the one loop every backend runs): ``hessian(V)`` is
    H V for float64 columns V, wherever H's rows live; ``step``, when given, is B^T H B v in
    one call (a backend that chains the three where they live). Several ridges are solved at
    once by giving each its block of columns (``for_ridges``). ``x`` is returned in the
    original coordinates (non-finite where a ridge is too small), residuals are those of the
    preconditioned system."""
    def h(v: torch.Tensor) -> torch.Tensor:  # B^T H B v
        return pre.apply_t(hessian(pre.apply(v)))

    result = conjugate_gradient(step or h, pre.apply_t(rhs.to(torch.float64)), tol=tol,
                                max_iter=max_iter)
    return dataclasses.replace(result, x=pre.apply(result.x))
