import numpy as np
import pytest
import torch

from ray_convrfm.solvers import SingularKernelError, kernel_scale, solve_ridge


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
