"""The kernel against the independent oracle of docs/math.md section 2 (tests/reference.py)."""

import numpy as np
import pytest
import reference
import torch
from conftest import random_psd, rel_err

from ray_convrfm.kernels import KernelParams, conv_ntk
from ray_convrfm.kernels.kernel import block_shape, bytes_per_pair

ENGINES = ["numba", "torch"]
TOL = {"float32": 1e-5, "float64": 1e-10}


def _images(rng, n, C, H, W):
    X = rng.standard_normal((n, C, H, W))
    X[0] = 0.0  # an all-zero image
    if n > 1:
        X[1, :, : H // 2] = 0.0  # blank patches beside non-blank ones
    return X


CASES = [(depth, padding, metric) for depth in (1, 2, 3, 4) for padding in (False, True)
         for metric in ("identity", "psd")]


@pytest.fixture(scope="module")
def oracle():
    """Reference kernels, computed once per case (the oracle is slow on purpose)."""
    cache = {}

    def get(depth, padding, metric):
        key = (depth, padding, metric)
        if key not in cache:
            rng = np.random.default_rng(depth * 10 + padding)
            C, H, W = 2, 8 + depth, 9
            X = _images(rng, 3, C, H, W)
            Z = rng.standard_normal((2, C, H, W))
            M = np.eye(C * 9) if metric == "identity" else random_psd(rng, C * 9)
            cache[key] = (X, Z, M, reference.kernel_matrix(X, Z, M, depth, 3, padding),
                          reference.kernel_matrix(X, X, M, depth, 3, padding))
        return cache[key]

    return get


@pytest.mark.parametrize("depth,padding,metric", CASES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernel_matches_reference(oracle, depth, padding, metric, engine, dtype):
    X, Z, M, ref_xz, ref_xx = oracle(depth, padding, metric)
    kw = dict(depth=depth, padding=padding, engine=engine, dtype=dtype)
    K = conv_ntk(X.astype(dtype), Z.astype(dtype), M, **kw)
    K_sym = conv_ntk(X.astype(dtype), None, M, **kw)
    assert K.dtype == np.dtype(dtype)
    assert rel_err(K, ref_xz) <= TOL[dtype]
    assert rel_err(K_sym, ref_xx) <= TOL[dtype]


def test_zero_images_give_zero_kernel_and_no_nan(rng):
    X = np.zeros((3, 1, 9, 9), np.float32)
    Z = rng.random((2, 1, 9, 9), dtype=np.float32)
    for engine in ENGINES:
        K = conv_ntk(X, Z, engine=engine)
        assert np.isfinite(K).all()
        assert np.all(K == 0)


def test_blocks_do_not_change_the_result(rng):
    X = rng.random((37, 1, 11, 11), dtype=np.float32)
    big = conv_ntk(X, depth=2)
    # a budget of a few kB forces one row per block
    small = conv_ntk(X, depth=2, memory_budget_mb=1e-3)
    np.testing.assert_allclose(small, big, rtol=1e-6)
    np.testing.assert_allclose(big, big.T, rtol=0, atol=0)


def test_block_shape_follows_the_budget_whatever_the_image_size(rng):
    """No fixed column count: at 224 x 224 the torch engine's blocks stay within the budget
    (4,096 columns of one row took 6.5 GB); symmetric blocks are square."""
    grids = KernelParams(3, 3, False).grids(224, 224)
    for engine in ("torch", "numba", "triton"):
        rows, cols = block_shape(50_000, 50_000, grids, engine, 4, 512)
        assert rows * cols * bytes_per_pair(grids, engine, 4) <= 512 * 2**20
        assert cols == 50_000 or rows == 1
        side = block_shape(50_000, 50_000, grids, engine, 4, 512, symmetric=True)
        assert side[0] == side[1] and side[0] ** 2 * bytes_per_pair(grids, engine, 4) <= 2**29
    assert block_shape(3, 5, grids, "torch", 4, 1e-9) == (1, 1)  # at least one pair
    X = rng.random((13, 1, 9, 9))
    Z = rng.random((11, 1, 9, 9))
    # a budget of a few pairs splits both rows and columns
    np.testing.assert_allclose(conv_ntk(X, Z, engine="torch", memory_budget_mb=0.01),
                               conv_ntk(X, Z, engine="numba", dtype="float32"), rtol=1e-5)


def test_symmetric_path_equals_general_path(rng):
    X = rng.random((9, 2, 10, 10))
    for engine in ENGINES:
        np.testing.assert_allclose(conv_ntk(X, engine=engine, dtype="float64"),
                                   conv_ntk(X, X, engine=engine, dtype="float64"), rtol=1e-12)


def test_positive_homogeneity_in_M(rng):
    X = rng.random((4, 1, 9, 9))
    M = random_psd(rng, 9)
    np.testing.assert_allclose(conv_ntk(X, M=3.5 * M, dtype="float64"),
                               3.5 * conv_ntk(X, M=M, dtype="float64"), rtol=1e-12)


def test_engines_agree_on_a_larger_batch(rng):
    X = rng.random((17, 3, 13, 12), dtype=np.float32)
    Z = rng.random((11, 3, 13, 12), dtype=np.float32)
    M = random_psd(rng, 27)
    a = conv_ntk(X, Z, M, engine="numba", padding=True)
    b = conv_ntk(X, Z, M, engine="torch", padding=True)
    assert rel_err(a, b) < 1e-5


def test_tensor_in_tensor_out(rng):
    X = torch.from_numpy(rng.random((3, 1, 9, 9), dtype=np.float32))
    K = conv_ntk(X, depth=2)
    assert isinstance(K, torch.Tensor) and K.shape == (3, 3)


@pytest.mark.parametrize("bad,message", [
    (np.zeros((3, 9, 9)), r"shape \(n, C, H, W\)"),
    (np.full((2, 1, 9, 9), np.nan), "NaN or inf"),
    (np.zeros((0, 1, 9, 9)), "no images"),
])
def test_bad_images_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        conv_ntk(bad)


def test_mismatched_inputs_are_refused(rng):
    X = rng.random((2, 1, 9, 9))
    with pytest.raises(ValueError, match="channels"):
        conv_ntk(X, rng.random((2, 3, 9, 9)))
    with pytest.raises(ValueError, match="same image size"):
        conv_ntk(X, rng.random((2, 1, 10, 9)))
    with pytest.raises(ValueError, match=r"M must have shape \(9, 9\)"):
        conv_ntk(X, M=np.eye(4))
    with pytest.raises(ValueError, match="larger than the image"):
        conv_ntk(rng.random((2, 1, 2, 2)), depth=1)
    with pytest.raises(ValueError, match="depth 4 with patch_size 3 needs images of at least 9"):
        conv_ntk(rng.random((2, 1, 8, 8)), depth=4)


def test_kernel_params_grids():
    assert KernelParams(3, 3, False).grids(42, 42) == [(40, 40), (38, 38), (36, 36)]
    assert KernelParams(2, 3, True).grids(28, 28) == [(28, 28), (26, 26)]
    assert KernelParams(1, 5, True).grids(7, 9) == [(7, 9)]


@pytest.mark.gpu
def test_cuda_torch_engine_matches_cpu(rng):
    X = rng.random((13, 3, 12, 12), dtype=np.float32)
    Z = rng.random((7, 3, 12, 12), dtype=np.float32)
    M = random_psd(rng, 27)
    cpu = conv_ntk(X, Z, M, engine="numba", device="cpu")
    gpu = conv_ntk(torch.from_numpy(X).cuda(), torch.from_numpy(Z).cuda(), M, device="cuda")
    assert gpu.device.type == "cuda"
    assert rel_err(gpu.cpu().numpy(), cpu) < 1e-5


def test_uint8_pixels_become_what_the_data_loaders_give():
    """8-bit pixels are value / 255, as the idx and parquet loaders compute it (float32 then
    the working dtype), so uint8 and float32 shards of the same pixels agree bit for bit."""
    from ray_convrfm.kernels.kernel import as_working

    U = np.random.default_rng(0).integers(0, 256, (3, 2, 5, 5), dtype=np.uint8)
    loaded = U.astype(np.float32) / np.float32(255.0)
    cpu = torch.device("cpu")
    for X in (U, torch.from_numpy(U)):
        got = as_working(X, torch.float32, cpu)
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), loaded)
        np.testing.assert_array_equal(as_working(X, torch.float64, cpu).numpy(),
                                      loaded.astype(np.float64))
    # other dtypes are numbers, as conv_ntk takes them
    np.testing.assert_array_equal(as_working(U.astype(np.int64), torch.float32, cpu).numpy(),
                                  U.astype(np.float32))


def test_side_bytes_per_image_counts_what_prepare_side_makes(rng):
    from ray_convrfm.kernels.kernel import prepare_side, side_bytes_per_image

    X = torch.from_numpy(rng.random((4, 3, 12, 10)))
    params = KernelParams(depth=3, patch_size=3, padding=False)
    side = prepare_side(X, torch.eye(27, dtype=torch.float64), params)
    made = sum(t.numel() * t.element_size() for t in (side.left, side.right, side.sq, side.rsq))
    in_flight = side.right.numel() * side.right.element_size()  # one more copy while made
    assert side_bytes_per_image(side.grids, 27, 8) * 4 == made + in_flight
    # a basis of r < d coordinates: only its r coordinates exist (projected by a convolution)
    Q = torch.linalg.qr(torch.from_numpy(rng.standard_normal((27, 10))))[0]
    side = prepare_side(X, torch.eye(10, dtype=torch.float64), params, Q)
    made = sum(t.numel() * t.element_size() for t in (side.left, side.right, side.sq, side.rsq))
    in_flight = side.right.numel() * side.right.element_size()
    assert side_bytes_per_image(side.grids, 10, 8) * 4 == made + in_flight
