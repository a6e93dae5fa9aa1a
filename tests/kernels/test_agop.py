"""Patch AGOP (docs/math.md section 4) against central finite differences."""

import numpy as np
import pytest
import torch
from conftest import random_psd, rel_err

from ray_convrfm.kernels.agop import agop_from_blocks, agop_from_sides, metric_from_agop
from ray_convrfm.kernels.kernel import KernelParams, kernel_block, prepare_side, side_from_patches


def _fd_agop(xs, coef, zs, M, params, grids, h=1e-6):
    """AGOP from central differences of f(z) = coef^T K(X, z) in every patch coordinate."""
    zp = zs.right.clone()
    s, P, d = zp.shape
    c = coef.shape[1]

    def f(patches):
        side = side_from_patches(patches, M, params, grids, xs.channels)
        return coef.T @ kernel_block(xs, side, "torch")  # (c, s)

    g = torch.zeros(s, P, c, d, dtype=torch.float64)
    for p in range(P):
        for e in range(d):
            up, down = zp.clone(), zp.clone()
            up[:, p, e] += h
            down[:, p, e] -= h
            g[:, p, :, e] = ((f(up) - f(down)) / (2 * h)).T
    g = g.reshape(-1, d)
    return g.T @ g / s


@pytest.mark.parametrize("engine", ["numba", "torch"])
@pytest.mark.parametrize("depth,padding", [(1, False), (2, True), (3, False)])
def test_agop_matches_finite_differences(engine, depth, padding):
    rng = np.random.default_rng(depth)
    C, H, W = 1, 6 + depth, 7
    params = KernelParams(depth, 3, padding)
    X = torch.from_numpy(rng.standard_normal((5, C, H, W)))
    Z = torch.from_numpy(rng.standard_normal((3, C, H, W)))
    M = torch.from_numpy(random_psd(rng, C * 9))
    coef = torch.from_numpy(rng.standard_normal((5, 4)))
    xs, zs = prepare_side(X, M, params), prepare_side(Z, M, params)
    G = agop_from_sides(xs, coef, zs, M, engine=engine)
    G_fd = _fd_agop(xs, coef, zs, M, params, params.grids(H, W))
    assert rel_err(G, G_fd) <= 1e-6


def test_agop_is_finite_with_blank_patches_and_duplicates():
    rng = np.random.default_rng(0)
    params = KernelParams(3, 3, False)
    X = torch.from_numpy(rng.random((6, 1, 12, 12), dtype=np.float32))
    X[0] = 0
    X[1, :, :6] = 0
    M = torch.eye(9)
    xs = prepare_side(X, M, params)
    coef = torch.randn(6, 3)
    for engine in ("numba", "torch"):
        # the sample is drawn from the training images: identical pairs at every position
        G = agop_from_sides(xs, coef, xs.take([0, 1, 2]), M, engine=engine)
        assert torch.isfinite(G).all()


def test_engines_and_chunking_agree():
    rng = np.random.default_rng(1)
    params = KernelParams(2, 3, True)
    X = torch.from_numpy(rng.random((23, 3, 10, 10), dtype=np.float32))
    M = torch.from_numpy(random_psd(rng, 27).astype(np.float32))
    xs = prepare_side(X, M, params)
    coef = torch.randn(23, 5)
    sample = xs.take(np.arange(0, 23, 3))
    ref = agop_from_sides(xs, coef, sample, M, engine="torch")
    fast = agop_from_sides(xs, coef, sample, M, engine="numba")
    tiny = agop_from_sides(xs, coef, sample, M, engine="numba", budget_mb=0.05)
    assert rel_err(fast, ref) < 1e-4
    assert rel_err(tiny, fast) < 1e-5
    # the AGOP is a sum over sample shards: unaveraged halves add up to the whole
    half = agop_from_sides(xs, coef, sample.rows(0, 4), M, engine="numba", average=False) + \
        agop_from_sides(xs, coef, sample.rows(4, 8), M, engine="numba", average=False)
    assert rel_err(half / len(sample), fast) < 1e-5


def test_agop_over_blocks_of_centers_equals_the_whole():
    """Centers in blocks (as a worker sees them one at a time) give the same AGOP, in float64
    to rounding, with sample chunks that split the sample."""
    rng = np.random.default_rng(4)
    params = KernelParams(3, 3, False)
    X = torch.from_numpy(rng.standard_normal((17, 2, 9, 8)))
    M = torch.from_numpy(random_psd(rng, 18))
    xs = prepare_side(X, M, params)
    coef = torch.from_numpy(rng.standard_normal((17, 3)))
    sample = xs.take([1, 4, 5, 9, 16])
    whole = agop_from_sides(xs, coef, sample, M, engine="numba")

    def blocks():
        for a in range(0, 17, 5):
            yield xs.rows(a, a + 5), coef[a : a + 5]

    for budget in (64, 0.002):
        G = agop_from_blocks(blocks, sample, M, 3, engine="numba", budget_mb=budget)
        assert rel_err(G, whole) < 1e-12


def test_metric_from_agop():
    rng = np.random.default_rng(2)
    A = torch.from_numpy(rng.standard_normal((6, 6)))
    G = A @ A.T
    M1 = metric_from_agop(G, 1.0)
    assert torch.allclose(M1, G / torch.linalg.matrix_norm(G))
    M_half = metric_from_agop(G, 0.5)
    assert torch.allclose(torch.linalg.matrix_norm(M_half), torch.tensor(1.0, dtype=G.dtype))
    root = M_half / M_half.norm() * 1.0
    assert torch.allclose((root @ root) / (root @ root).norm(), M1, atol=1e-10)
    # negative eigenvalues (rounding) are clipped, not propagated
    N = torch.diag(torch.tensor([2.0, 1.0, -1e-9], dtype=torch.float64))
    assert torch.linalg.eigvalsh(metric_from_agop(N, 0.5)).min() >= 0
    with pytest.raises(ValueError, match="zero"):
        metric_from_agop(torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="positive"):
        metric_from_agop(G, 0.0)


def test_metric_floor_bounds_the_condition_number():
    """A nearly rank-one AGOP (the collapse of repeated M = AGOP(M)) keeps its eigenvectors and
    its top direction; every other eigenvalue is raised to floor x the largest."""
    rng = np.random.default_rng(4)
    Q, _ = torch.linalg.qr(torch.from_numpy(rng.standard_normal((5, 5))))
    vals = torch.tensor([1e-9, 1e-6, 0.01, 0.3, 10.0], dtype=torch.float64)
    G = (Q * vals) @ Q.T
    assert torch.allclose(metric_from_agop(G, 1.0, 0.0), metric_from_agop(G, 1.0))
    M = metric_from_agop(G, 1.0, 0.05)
    expected = torch.tensor([0.5, 0.5, 0.5, 0.5, 10.0], dtype=torch.float64)
    expected = (Q * expected) @ Q.T
    torch.testing.assert_close(M, expected / torch.linalg.matrix_norm(expected))
    # the floor applies to G^power: sqrt eigenvalues 0.1 ... 3.16, floor 0.316
    root = torch.linalg.eigvalsh(metric_from_agop(G, 0.5, 0.1))
    assert root.max() / root.min() == pytest.approx(10.0)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="metric_floor"):
            metric_from_agop(G, 1.0, bad)


@pytest.mark.gpu
def test_cuda_agop_matches_cpu():
    rng = np.random.default_rng(3)
    params = KernelParams(3, 3, False)
    X = torch.from_numpy(rng.random((20, 1, 14, 14), dtype=np.float32))
    M = torch.from_numpy(random_psd(rng, 9).astype(np.float32))
    coef = torch.from_numpy(rng.standard_normal((20, 10)).astype(np.float32))
    xs = prepare_side(X, M, params)
    cpu = agop_from_sides(xs, coef, xs.take(range(5)), M, engine="numba")
    dev = torch.device("cuda")
    xg = prepare_side(X.to(dev), M.to(dev), params)
    gpu = agop_from_sides(xg, coef.to(dev), xg.take(range(5)), M.to(dev), engine="torch")
    assert rel_err(gpu.cpu().numpy(), cpu.numpy()) < 1e-4


def test_class_sketch_is_unbiased_and_exact_when_wide_enough():
    """The sketched AGOP (coef @ Omega): its mean over many seeds is the exact AGOP; with
    k >= c (orthonormal rows) it is exact for every seed (docs/math.md 4a)."""
    from ray_convrfm.kernels.agop import class_sketch, sketch_columns

    rng = np.random.default_rng(5)
    params = KernelParams(2, 3, False)
    X = torch.from_numpy(rng.standard_normal((12, 1, 8, 8)))
    M = torch.from_numpy(random_psd(rng, 9))
    xs = prepare_side(X, M, params)
    c = 12
    coef = torch.from_numpy(rng.standard_normal((12, c)))
    sample = xs.take([0, 3, 7])
    exact = agop_from_sides(xs, coef, sample, M, engine="numba")
    g = torch.Generator().manual_seed(0)
    for k in (c, 20):  # orthonormal rows: Omega Omega^T = I, the AGOP itself
        omega = class_sketch(c, k, g)
        torch.testing.assert_close(omega @ omega.T, torch.eye(c, dtype=torch.float64))
        assert rel_err(agop_from_sides(xs, coef @ omega, sample, M, engine="numba"),
                       exact) < 1e-10
    draws = [agop_from_sides(xs, coef @ class_sketch(c, 4, g), sample, M, engine="numba")
             for _ in range(400)]
    mean = torch.stack(draws).mean(0)
    one = rel_err(draws[0], exact)
    assert one > 0.1  # a single 4-column sketch is rough...
    assert rel_err(mean, exact) < 0.1 < one  # ...the mean of 400 is close (about 1/20 of it)
    assert sketch_columns(10, "auto") is None and sketch_columns(100, "auto") == 64
    assert sketch_columns(1000, "all") is None and sketch_columns(1000, 32) == 32
