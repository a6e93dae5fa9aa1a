"""Patch extraction and the patch-span basis that makes deep layers exact and cheap."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ray_convrfm import ConvRFM, Options
from ray_convrfm.data.datasets import load_digits
from ray_convrfm.kernels.patches import (
    extract_patches,
    grid_shape,
    patch_span,
    projected_patches,
    span_from_gram,
)


def test_patches_follow_unfold_order_and_match_a_convolution():
    X = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    W = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    P = extract_patches(X, 3, padding=True)
    assert P.shape == (2, 7 * 6, 27) and grid_shape(7, 6, 3, True) == (7, 6)
    conv = F.conv2d(X, W, padding=1).permute(0, 2, 3, 1).reshape(2, -1, 4)
    torch.testing.assert_close(P @ W.reshape(4, -1).T, conv)


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("q", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patches_equal_unfold_exactly(q, padding, dtype):
    """The strided-view extraction is F.unfold's (channel, row, column) order, bit for bit,
    also for a non-contiguous input and odd sizes."""
    X = torch.randn(3, 2, 9, 7, dtype=dtype).transpose(2, 3)  # (3, 2, 7, 9), not contiguous
    expected = F.unfold(X, q, padding=q // 2 if padding else 0).transpose(1, 2)
    got = extract_patches(X, q, padding)
    assert got.shape == expected.shape and got.is_contiguous()
    assert torch.equal(got, expected)
    assert extract_patches(X[:0], q, padding).shape == (0, *expected.shape[1:])


def _features(X, width=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(width, X.shape[1], 3, 3, generator=g, dtype=X.dtype)
    return F.conv2d(X, W)


def test_span_of_linear_features_is_small_and_orthonormal():
    X = torch.rand(50, 1, 12, 12, dtype=torch.float64)
    Q = patch_span(_features(X), 3, padding=False)
    assert Q.shape == (144, 25)  # 16 maps x 3 x 3 patches, but only a 5 x 5 receptive field
    torch.testing.assert_close(Q.T @ Q, torch.eye(25, dtype=torch.float64))
    assert patch_span(X, 3, padding=False) is None  # raw images: full rank, no basis


def test_reduced_basis_gives_the_same_model():
    ds = load_digits()
    X = _features(torch.from_numpy(ds.X_train[:150]).double(), width=8).float().numpy()
    Xt = _features(torch.from_numpy(ds.X_test[:30]).double(), width=8).float().numpy()
    kw = dict(depth=1, iters=2, agop_samples=20, options=Options.of(dtype="float64"))
    auto = ConvRFM(patch_basis="auto", **kw).fit(X, ds.y_train[:150])
    full = ConvRFM(patch_basis="full", **kw).fit(X, ds.y_train[:150])
    assert auto.patch_basis_.shape == (72, 25) and full.patch_basis_ is None
    np.testing.assert_allclose(auto.M_path_[1].numpy(), full.M_path_[1].numpy(), atol=1e-8)
    np.testing.assert_allclose(auto.decision_function(Xt), full.decision_function(Xt),
                               rtol=1e-6, atol=1e-8)


def test_an_energy_share_keeps_the_fewest_leading_directions_that_hold_it():
    rng = np.random.default_rng(3)
    U, _ = torch.linalg.qr(torch.from_numpy(rng.standard_normal((6, 6))))
    vals = torch.tensor([50.0, 30.0, 10.0, 6.0, 3.0, 1.0], dtype=torch.float64)  # sum 100
    gram = U @ torch.diag(vals) @ U.T
    for energy, r in ((0.45, 1), (0.75, 2), (0.85, 3), (0.89, 3), (0.93, 4), (0.98, 5)):
        Q = span_from_gram(gram, dtype=torch.float64, energy=energy)
        assert Q.shape == (6, r), energy
        # the leading eigenvectors, largest first (up to sign)
        torch.testing.assert_close((Q.T @ U[:, :r]).abs(), torch.eye(r, dtype=torch.float64))
    assert span_from_gram(gram, dtype=torch.float64, energy=0.9999) is None  # all d kept
    assert span_from_gram(gram, dtype=torch.float64) is None  # exact: full rank


def test_a_truncated_basis_is_learned_kept_and_predicted_with(tmp_path):
    ds = load_digits()
    X = _features(torch.from_numpy(ds.X_train[:150]).double(), width=8).float().numpy()
    Xt = _features(torch.from_numpy(ds.X_test[:30]).double(), width=8).float().numpy()
    kw = dict(depth=1, iters=2, agop_samples=20, options=Options.of(dtype="float64"))
    cut = ConvRFM(patch_basis=0.9, **kw).fit(X, ds.y_train[:150])
    r = cut.patch_basis_.shape[1]
    assert 1 <= r < 25  # fewer than the exact span's 25 directions
    # the model is a ConvRFM on the patches projected onto that basis: same predictions
    # from a model loaded from disk
    cut.save(tmp_path / "cut")
    again = ConvRFM.load(tmp_path / "cut")
    np.testing.assert_allclose(again.decision_function(Xt), cut.decision_function(Xt),
                               rtol=1e-10)
    for bad in (0.0, 1.0, 1.5, True, "half"):
        with pytest.raises(ValueError, match="patch_basis must be"):
            ConvRFM(patch_basis=bad, **kw).fit(X, ds.y_train[:150])


@pytest.mark.parametrize("padding", [False, True])
def test_projected_patches_are_the_patches_times_the_basis(padding):
    rng = np.random.default_rng(7)
    X = torch.from_numpy(rng.standard_normal((5, 3, 9, 8)))
    basis, _ = torch.linalg.qr(torch.from_numpy(rng.standard_normal((27, 11))))
    expected = extract_patches(X, 3, padding) @ basis
    got = projected_patches(X, basis, 3, padding)
    # positions last in memory, as kernel sides store patches (kernel.side_from_patches)
    assert got.shape == expected.shape and got.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("pool", [1, 2, 3])
def test_pool_images_is_the_plain_windowed_mean_or_max(pool, mode):
    from ray_convrfm.kernels.patches import pool_images

    X = np.random.default_rng(pool).standard_normal((3, 2, 7, 8))
    n, C, H, W = X.shape
    ref = np.zeros((n, C, H // pool, W // pool))
    for i in range(H // pool):  # windows of pool x pool, the leftover rows/columns dropped
        for j in range(W // pool):
            win = X[:, :, i * pool : (i + 1) * pool, j * pool : (j + 1) * pool]
            ref[:, :, i, j] = win.mean((2, 3)) if mode == "avg" else win.max((2, 3))
    out = pool_images(torch.from_numpy(X), pool, mode)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="pool mode"):
        pool_images(torch.from_numpy(X), 2, "median")
