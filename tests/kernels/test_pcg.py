"""Falkon-preconditioned CG (docs/math.md 9a) against the direct Nystrom solve."""

from collections.abc import Callable

import numpy as np
import pytest
import torch

from ray_convrfm.data.datasets import load_digits
from ray_convrfm.kernels import conv_ntk
from ray_convrfm.kernels.pcg import (
    CGResult,
    FalkonPreconditioner,
    SpectralFactor,
    conjugate_gradient,
    factor_centers,
    preconditioned_cg,
    preconditioner_columns,
)
from ray_convrfm.kernels.solvers import SingularKernelError, normal_equations, solve_nystrom


@pytest.fixture(scope="module")
def problem():
    """A real normalised kernel: 400 digits, 60 centers, depth 2, float64."""
    ds = load_digits()
    X = ds.X_train[:400].astype(np.float64)
    Y = torch.nn.functional.one_hot(torch.as_tensor(ds.y_train[:400]), 10).double()
    centers = np.sort(np.random.default_rng(0).choice(400, 60, replace=False))
    K_nm = torch.from_numpy(conv_ntk(X, X[centers], depth=2))
    scale = float(K_nm[centers].max())
    K_nm = K_nm / scale
    return K_nm, K_nm[centers], Y


@pytest.mark.parametrize("ridge", [1e-5, 1e-3, 1e-1])
def test_pcg_equals_the_direct_solve(problem, ridge):
    K_nm, K_mm, Y = problem
    KtK, KtY = normal_equations(K_nm, Y)
    direct = solve_nystrom(KtK, KtY, K_mm, ridge)
    calls = []

    def gram(V):
        calls.append(V.shape)
        return K_nm.T @ (K_nm @ V)

    res = solve_nystrom_pcg(gram, K_mm, KtY, ridge, n=len(K_nm), tol=1e-12)
    assert res.converged and len(calls) == res.iterations
    assert float((res.x - direct).norm() / direct.norm()) < 1e-4
    assert torch.equal(res.x.argmax(1), direct.argmax(1))


def solve_nystrom_pcg(gram_matvec: Callable[[torch.Tensor], torch.Tensor], K_mm: torch.Tensor,
                      KtY: torch.Tensor, ridge: float, n: int, tol: float = 1e-8,
                      max_iter: int = 500, rank: int | None = None) -> CGResult:
    """alpha (m, c) of (K_nm^T K_nm + ridge K_mm) alpha = K_nm^T Y by preconditioned CG, with
    every matrix in this process: what the backends run with their own products and factors
    (``preconditioned_cg``), for these tests.

    ``gram_matvec(V)`` returns K_nm^T (K_nm V) for an (m, c) float64 V; ``rank`` q < m uses
    the rank-q spectral preconditioner instead of Falkon's.
    """
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0; found {ridge}")
    K_mm = K_mm.to(torch.float64)
    cols = preconditioner_columns(len(K_mm), rank)
    factor = factor_centers(K_mm if cols is None else K_mm[:, torch.as_tensor(cols)], cols)
    result = preconditioned_cg(lambda u: gram_matvec(u) + ridge * (K_mm @ u), KtY,
                               factor.for_ridge(ridge, n), tol, max_iter)
    if not torch.isfinite(result.x).all():
        raise SingularKernelError(f"ridge={ridge:g} gives non-finite coefficients; use a "
                                  "larger ridge")
    return result


def test_the_preconditioner_is_what_makes_it_fast(problem):
    """Plain CG on H needs many more steps than CG on B^T H B for the same tolerance."""
    K_nm, K_mm, Y = problem
    ridge, n = 1e-5, len(K_nm)
    KtY = K_nm.T @ Y
    pre = solve_nystrom_pcg(lambda V: K_nm.T @ (K_nm @ V), K_mm, KtY, ridge, n, tol=1e-8)
    plain = conjugate_gradient(lambda V: K_nm.T @ (K_nm @ V) + ridge * K_mm @ V, KtY,
                               tol=1e-8, max_iter=2000)
    assert pre.converged
    assert pre.iterations * 5 < plain.iterations, (pre.iterations, plain.iterations)


def test_preconditioner_factors_and_duplicate_centers():
    rng = np.random.default_rng(1)
    F = torch.from_numpy(rng.standard_normal((8, 5)))
    K_mm = F @ F.T  # rank 5 of 8: singular, as with duplicate centers
    pre = FalkonPreconditioner.build(K_mm, ridge=1e-3, n=100)
    v = torch.from_numpy(rng.standard_normal((8, 2)))
    B = pre.apply(torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(pre.apply_t(v), B.T @ v)
    torch.testing.assert_close(pre.T.T @ pre.T, K_mm, atol=1e-6, rtol=1e-6)


def test_cg_on_a_known_system_and_zero_columns():
    rng = np.random.default_rng(2)
    F = torch.from_numpy(rng.standard_normal((20, 20)))
    A = F @ F.T + 20 * torch.eye(20, dtype=torch.float64)
    b = torch.from_numpy(rng.standard_normal((20, 3)))
    b[:, 2] = 0
    res = conjugate_gradient(lambda V: A @ V, b, tol=1e-12)
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b))
    assert res.converged and res.iterations <= 20
    with pytest.raises(ValueError, match="ridge"):
        solve_nystrom_pcg(lambda V: V, A, b, float("nan"), n=20)


@pytest.mark.parametrize("rank", [15, 40])
def test_rank_q_preconditioner_solves_the_same_problem(problem, rank):
    """A rank-q spectral preconditioner (m x q numbers) reaches the direct solution, in far
    fewer steps than plain CG."""
    K_nm, K_mm, Y = problem
    ridge = 1e-3
    KtK, KtY = normal_equations(K_nm, Y)
    direct = solve_nystrom(KtK, KtY, K_mm, ridge)
    res = solve_nystrom_pcg(lambda V: K_nm.T @ (K_nm @ V), K_mm, KtY, ridge, n=len(K_nm),
                            tol=1e-12, rank=rank)
    assert res.converged
    assert float((res.x - direct).norm() / direct.norm()) < 1e-4
    plain = conjugate_gradient(lambda V: KtK @ V + ridge * K_mm @ V, KtY, tol=1e-12,
                               max_iter=3000)
    assert res.iterations * 1.5 < plain.iterations, (res.iterations, plain.iterations)


def test_spectral_factor_of_every_center_is_K_mm(problem):
    _, K_mm, _ = problem
    m = len(K_mm)
    factor = SpectralFactor.build(K_mm, np.arange(m))
    torch.testing.assert_close(factor.U @ torch.diag(factor.lam) @ factor.U.T, K_mm,
                               atol=1e-8, rtol=1e-6)
    assert preconditioner_columns(m, None) is None and preconditioner_columns(m, m) is None
    cols = preconditioner_columns(m, 10, seed=3)
    assert len(cols) == 10 and np.all(np.diff(cols) > 0)
    pre = factor.for_ridge(1e-3, 400)
    v = torch.from_numpy(np.random.default_rng(0).standard_normal((m, 2)))
    B = pre.apply(torch.eye(m, dtype=torch.float64))
    torch.testing.assert_close(B, B.T)
    torch.testing.assert_close(pre.apply_t(v), B @ v)


@pytest.mark.parametrize("rank", [None, 20])
def test_every_ridge_in_one_run_equals_each_alone(problem, rank):
    """R ridges as R blocks of columns in one CG run (one pass over K_nm per step for all):
    each block is that ridge's solution, with its own step count."""
    from ray_convrfm.kernels.pcg import factor_centers, preconditioned_cg

    K_nm, K_mm, Y = problem
    n, c = len(K_nm), Y.shape[1]
    ridges = [1e-5, 1e-3, 1e-1]
    KtY = K_nm.T @ Y
    cols = preconditioner_columns(len(K_mm), rank)
    factor = factor_centers(K_mm if cols is None else K_mm[:, torch.as_tensor(cols)], cols)
    ridge_of = torch.tensor([r for r in ridges for _ in range(c)], dtype=torch.float64)

    def hessian(V):
        return K_nm.T @ (K_nm @ V) + (K_mm @ V) * ridge_of

    together = preconditioned_cg(hessian, KtY.repeat(1, 3), factor.for_ridges(ridges, n),
                                 tol=1e-12)
    assert together.converged
    for k, ridge in enumerate(ridges):
        alone = solve_nystrom_pcg(lambda V: K_nm.T @ (K_nm @ V), K_mm, KtY, ridge, n, tol=1e-12,
                                  rank=rank)
        block = together.x[:, k * c : (k + 1) * c]
        assert float((block - alone.x).norm() / alone.x.norm()) < 1e-8
        # the same steps, up to rounding near the tolerance
        assert abs(int(together.column_iterations[k * c : (k + 1) * c].max())
                   - alone.iterations) <= 3
    # a larger ridge is better conditioned: it stops earlier, and stops moving
    steps = together.column_iterations.reshape(3, c).max(1).values
    assert steps[2] < steps[0] and together.iterations == int(steps.max())
