import numpy as np
import pytest
import torch

from ray_convrfm.kernels.solvers import SingularKernelError, kernel_scale, solve_ridge


def test_solve_matches_numpy():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((30, 30))
    K = torch.from_numpy(A @ A.T).float()
    Y = torch.from_numpy(rng.standard_normal((30, 4)))
    alpha = solve_ridge(K, Y, 1e-3)
    expected = np.linalg.solve(K.double().numpy() + 1e-3 * np.eye(30), Y.numpy())
    np.testing.assert_allclose(alpha.numpy(), expected, rtol=1e-8)
    assert alpha.dtype == torch.float64


def test_singular_system_raises_clear_error():
    K = torch.ones(5, 5, dtype=torch.float64)  # rank one
    with pytest.raises(SingularKernelError, match="ridge=0.*larger ridge"):
        solve_ridge(K, torch.eye(5, 2, dtype=torch.float64), 0.0)
    # a ridge makes it solvable
    assert torch.isfinite(solve_ridge(K, torch.eye(5, 2, dtype=torch.float64), 1e-6)).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        solve_ridge(torch.eye(3), torch.eye(3), -1.0)
    with pytest.raises(ValueError, match=r"K must be \(n, n\)"):
        solve_ridge(torch.eye(3), torch.eye(4), 1.0)
    with pytest.raises(SingularKernelError, match="blank"):
        kernel_scale(torch.zeros(3, 3))


def test_nystrom_with_all_points_as_centers_equals_exact():
    from ray_convrfm.kernels.solvers import normal_equations, solve_nystrom

    rng = np.random.default_rng(1)
    A = rng.standard_normal((40, 40))
    K = torch.from_numpy(A @ A.T / 40 + 0.1 * np.eye(40))
    Y = torch.from_numpy(rng.standard_normal((40, 3)))
    # sums over two "shards" of rows
    parts = [normal_equations(K[:25], Y[:25]), normal_equations(K[25:], Y[25:])]
    KtK = parts[0][0] + parts[1][0]
    KtY = parts[0][1] + parts[1][1]
    alpha = solve_nystrom(KtK, KtY, K, 1e-2)
    np.testing.assert_allclose(alpha.numpy(), solve_ridge(K, Y, 1e-2).numpy(), rtol=1e-7)


def test_nystrom_errors():
    from ray_convrfm.kernels.solvers import solve_nystrom

    with pytest.raises(SingularKernelError, match="fewer centers"):
        solve_nystrom(torch.zeros(3, 3), torch.zeros(3, 1), torch.zeros(3, 3), 1e-3)
    with pytest.raises(ValueError, match=r"\(m, m\)"):
        solve_nystrom(torch.eye(3), torch.zeros(2, 1), torch.eye(3), 1e-3)


def test_class_sums_equal_the_product_with_one_hot_targets():
    """K^T Y from class indices, without the n x c matrix, is K^T one_hot(y) (float64)."""
    from ray_convrfm.kernels.solvers import class_sums, normal_equations

    rng = np.random.default_rng(4)
    K = torch.from_numpy(rng.random((37, 11)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 5, 37))
    Y = torch.nn.functional.one_hot(y, 7).to(torch.float64)  # two classes absent here
    got = class_sums(K, y, 7)
    assert got.dtype == torch.float64 and got.shape == (11, 7)
    torch.testing.assert_close(got, normal_equations(K, Y)[1], rtol=1e-12, atol=1e-12)
    assert torch.all(got[:, 5:] == 0)
