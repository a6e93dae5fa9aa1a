"""The fused Triton engine against the numba engine, the float64 oracle and finite differences.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, which must be
set before triton is imported); with CUDA the same tests run the compiled kernels on the GPU.
Inputs are tiny because the interpreter executes every program in Python.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import reference  # noqa: E402
from conftest import random_psd, rel_err  # noqa: E402

triton = pytest.importorskip("triton", reason="the triton engine needs triton (extra [gpu])")

from ray_convrfm.kernels.kernel import (  # noqa: E402
    KernelParams,
    kernel_block,
    kernel_block_adjoint,
    prepare_side,
    side_from_patches,
)
from ray_convrfm.kernels.triton_engine import (  # noqa: E402
    kernel_block_adjoint_triton,
    kernel_block_triton,
)
from ray_convrfm.kernels.triton_plan import (  # noqa: E402
    plan_launch,
    position_tile,
    tuned_config,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]

# (depth, padding, channels, metric, patch size, H, W): odd sizes, every depth, both paddings
CASES = [
    (1, False, 1, "identity", 3, 7, 6),
    (2, True, 3, "psd", 3, 7, 7),
    (3, False, 1, "psd", 3, 9, 8),
    (4, True, 1, "identity", 3, 7, 9),
    (4, False, 3, "psd", 3, 9, 9),
    (2, False, 1, "psd", 2, 6, 7),
]


def _sides(case, dtype, n=3, m=2, seed=0):
    """Prepared sides on CPU with an all-zero image and half-blank images among them."""
    depth, padding, C, metric, q, H, W = case
    rng = np.random.default_rng(seed + depth)
    X = rng.standard_normal((n, C, H, W))
    Z = rng.standard_normal((m, C, H, W))
    X[0] = 0.0
    Z[-1, :, : H // 2] = 0.0
    d = C * q * q
    M = np.eye(d) if metric == "identity" else random_psd(rng, d)
    params = KernelParams(depth, q, padding)
    t = lambda a: torch.from_numpy(a).to(dtype)  # noqa: E731
    return X, Z, M, prepare_side(t(X), t(M), params), prepare_side(t(Z), t(M), params)


def _to(side, device):
    """The same side on another device (the kernel sides are plain tensors)."""
    return type(side)(side.left.to(device), side.right.to(device), side.sq.to(device),
                      side.rsq.to(device), side.grids, side.channels, side.patch_size)


def _cpu(*ts):
    return [t.cpu() for t in ts]


@pytest.fixture(scope="module")
def oracle():
    cache = {}

    def get(case):
        if case not in cache:
            X, Z, M, _, _ = _sides(case, torch.float64)
            depth, padding, _, _, q, _, _ = case
            cache[case] = reference.kernel_matrix(X, Z, M, depth, q, padding)
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_numba_and_oracle(case, dtype, oracle):
    _, _, _, xs, zs = _sides(case, dtype)
    (K,) = _cpu(kernel_block_triton(_to(xs, DEVICE), _to(zs, DEVICE)))
    assert K.dtype == dtype and K.shape == (3, 2)
    assert rel_err(K, kernel_block(xs, zs, "numba")) <= TOL[dtype]
    assert rel_err(K, oracle(case)) <= TOL[dtype]
    assert torch.all(K[0] == 0)  # the all-zero image


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adjoint_matches_numba(case, dtype):
    _, _, _, xs, zs = _sides(case, dtype)
    coef = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 4))).to(dtype)
    K, dcross, vself = _cpu(*kernel_block_adjoint_triton(_to(xs, DEVICE), _to(zs, DEVICE),
                                                         coef.to(DEVICE)))
    K_n, dcross_n, vself_n = kernel_block_adjoint(xs, zs, coef, "numba")
    assert dcross.shape == dcross_n.shape and vself.shape == vself_n.shape
    assert rel_err(K, K_n) <= TOL[dtype]
    assert rel_err(dcross, dcross_n) <= TOL[dtype]
    assert rel_err(vself, vself_n) <= TOL[dtype]


def test_launch_tiles_and_symmetry_do_not_change_the_result():
    """A tiny budget splits the block into single-row, one-BLOCK_J-column launches."""
    case = (2, False, 1, "psd", 3, 7, 6)
    _, _, _, xs, zs = _sides(case, torch.float64, n=17, m=17)
    plan = plan_launch(17, 17, xs.grids, 3, 8, torch.device(DEVICE), budget_mb=1e-3)
    assert (plan.rows, plan.cols, plan.n_tiles) == (1, 16, 1)
    xd = _to(xs, DEVICE)
    (split,) = _cpu(kernel_block_triton(xd, xd, budget_mb=1e-3))
    (sym,) = _cpu(kernel_block_triton(xd, xd, symmetric=True, budget_mb=1e-3))
    assert rel_err(split, kernel_block(xs, xs, "numba")) <= 1e-10
    assert rel_err(sym, split) <= 1e-14 and torch.equal(sym, sym.T)
    x3, coef = xs.rows(0, 3), torch.ones(3, 2, dtype=torch.float64)
    got = _cpu(*kernel_block_adjoint_triton(_to(x3, DEVICE), _to(zs, DEVICE), coef.to(DEVICE),
                                            budget_mb=1e-3))
    for a, b in zip(got, kernel_block_adjoint(x3, zs, coef, "numba"), strict=True):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("region", [1, 20])
def test_position_tiles_with_halos_give_the_whole_image_result(case, region):
    """Tiles of the last layer's positions, each recomputing its halo, sum to the same kernel;
    the adjoint's overlapping halos accumulate into the same patch derivatives."""
    dtype = torch.float64
    _, _, _, xs, zs = _sides(case, dtype)
    depth, _, _, _, q, _, _ = case
    plan = plan_launch(3, 2, xs.grids, q, 8, torch.device(DEVICE), adjoint=True, region=region)
    h0, w0 = xs.grids[0]
    assert plan.n_tiles > 1 or h0 * w0 <= region or xs.grids[-1] == (1, 1)
    coef = torch.from_numpy(np.random.default_rng(6).standard_normal((3, 4))).to(dtype)
    xd, zd = _to(xs, DEVICE), _to(zs, DEVICE)
    (K,) = _cpu(kernel_block_triton(xd, zd, region=region))
    assert rel_err(K, kernel_block(xs, zs, "numba")) <= TOL[dtype]
    got = _cpu(*kernel_block_adjoint_triton(xd, zd, coef.to(DEVICE), region=region))
    for a, b in zip(got, kernel_block_adjoint(xs, zs, coef, "numba"), strict=True):
        assert rel_err(a, b) <= TOL[dtype]


def test_tile_plan_bounds_a_programs_memory_whatever_the_image_size():
    device = torch.device("cpu")
    grids = KernelParams(3, 3, False).grids(28, 28)
    assert position_tile(grids, 3, 4096) == (22, 22)  # 26 x 26 first-layer positions fit
    grids = KernelParams(3, 3, False).grids(224, 224)
    th, tw = position_tile(grids, 3, 4096)
    assert (th, tw) == (60, 60) and (th + 4) * (tw + 4) <= 4096
    for adjoint in (False, True):
        plan = plan_launch(1000, 1000, grids, 3, 4, device, budget_mb=64, adjoint=adjoint)
        assert plan.tiles == (4, 4) and plan.region == 64 * 64
        scratch = (plan.rows * -(-plan.cols // 16) * plan.n_tiles * 4
                   * ((6 if adjoint else 4) * 16 * plan.region + 2 * 16 * plan.saved * adjoint))
        assert scratch <= 64 * 2**20 and plan.cols % 16 == 0
    wide = KernelParams(2, 3, False).grids(10, 500)  # a strip: tiles stay within the region
    th, tw = position_tile(wide, 3, 1000)
    assert (th, tw) == (6, 123)  # the 8 x 498 first layer: 8 x 125 positions per region


def test_launch_configuration_is_the_fastest_and_tuned_once_per_shape_class():
    configs = ({"num_warps": 2}, {"num_warps": 4}, {"num_warps": 8})
    cost = {2: 3.0, 4: 1.0, 8: 2.0}
    calls = []

    def trial(cfg):
        calls.append(cfg["num_warps"])

    def timer(fn):
        fn()
        return cost[calls[-1]]

    key = ("test-device", "shape class")
    assert tuned_config(key, trial, configs, timer) == {"num_warps": 4}
    assert len(calls) == 6  # each once to compile, once timed
    assert tuned_config(key, trial, configs, timer) == {"num_warps": 4} and len(calls) == 6
    assert tuned_config(("other",), trial, configs, None) == {"num_warps": 2}  # no CUDA


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicates_snap_and_blank_images_stay_finite(dtype):
    """Identical pairs have cosine 1 at every position: the kink, where dkappa0/dc is 0."""
    case = (3, False, 1, "identity", 3, 8, 8)
    _, _, _, xs, _ = _sides(case, dtype, n=3)
    xd = _to(xs, DEVICE)
    coef = torch.ones(3, 2, dtype=dtype)
    K, dcross, vself = _cpu(*kernel_block_adjoint_triton(xd, xd, coef.to(DEVICE)))
    K_n, dcross_n, vself_n = kernel_block_adjoint(xs, xs, coef, "numba")
    for a, b in ((K, K_n), (dcross, dcross_n), (vself, vself_n)):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) <= TOL[dtype]
    assert torch.all(K[0] == 0) and torch.all(K[:, 0] == 0)


def test_adjoint_matches_finite_differences():
    """grad_{z_p} f_k = M (sum_i coef_ik dcross x_ip + 2 vself z_p) against central differences
    of f = coef^T K(X, z) in every coordinate of every patch (each patch its own variable)."""
    depth, q, padding = 2, 3, False
    rng = np.random.default_rng(3)
    params = KernelParams(depth, q, padding)
    X = torch.from_numpy(rng.standard_normal((3, 1, 6, 6)))
    Z = torch.from_numpy(rng.standard_normal((1, 1, 6, 6)))
    M = torch.from_numpy(random_psd(rng, 9))
    coef = torch.from_numpy(rng.standard_normal((3, 2)))
    xs, zs = prepare_side(X, M, params), prepare_side(Z, M, params)
    _, dcross, vself = _cpu(*kernel_block_adjoint_triton(_to(xs, DEVICE), _to(zs, DEVICE),
                                                         coef.to(DEVICE)))
    # analytic: (P, c, d) for the single z
    cross = torch.einsum("pi,ik,ipd->pkd", dcross[0], coef, xs.right)
    grad = (cross + 2 * vself[0][:, :, None] * zs.right[0][:, None, :]) @ M
    grids = params.grids(6, 6)
    zp = zs.right.clone()
    h = 1e-6
    fd = torch.zeros_like(grad)
    for p in range(zp.shape[1]):
        for e in range(zp.shape[2]):
            up, down = zp.clone(), zp.clone()
            up[0, p, e] += h
            down[0, p, e] -= h
            f = [coef.T @ kernel_block(xs, side_from_patches(v, M, params, grids, 1), "torch")
                 for v in (up, down)]
            fd[p, :, e] = ((f[0] - f[1]) / (2 * h))[:, 0]
    assert rel_err(grad, fd) <= 1e-6
