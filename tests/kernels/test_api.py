"""The public ``conv_ntk`` and ``patch_agop`` (docs/math.md sections 2 and 4).

``patch_agop`` is checked against central finite differences of f computed through the public
``conv_ntk`` alone. The AGOP differentiates w.r.t. every patch as its own variable, which an image
cannot express (neighbouring patches share pixels), so the patches are *lifted*: patch z_p of a
(C, H, W) image becomes the channel vector at pixel p of a (C*q*q, Hp+q-1, Wp+q-1) image, and the
metric becomes q^2 * kron(M, E00), which sees only the window's top-left pixel. The lifted kernel
(no padding, same depth and q) is then the original one as a function of independent patches: the
first-layer products x'_p^T M' z'_p / (C q^2) equal x_p^T M z_p / C, and the later window sums are
unchanged. Patches are cut by the oracle's own ``reference.patches``, not the library's unfold.
"""

import numpy as np
import pytest
import reference
import torch
from conftest import random_psd, rel_err

from ray_convrfm.kernels import conv_ntk, patch_agop
from ray_convrfm.kernels.devices import resolve_dtype_for
from ray_convrfm.options import ComputeOptions

Q = 3

# ---------------------------------------------------------------------------------------------
# conv_ntk: the working dtype follows the input


@pytest.fixture(scope="module")
def small_case():
    """Float64 images, a PSD metric and the oracle's kernel (slow, so computed once)."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((3, 2, 9, 9))
    X[1, :, :4] = 0.0  # blank patches beside non-blank ones
    Z = rng.standard_normal((2, 2, 9, 9))
    M = random_psd(rng, 2 * Q * Q)
    return X, Z, M, reference.kernel_matrix(X, Z, M, 2, Q, True)


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_float64_input_computes_in_float64(small_case, engine):
    X, Z, M, ref = small_case
    K = conv_ntk(X, Z, M, depth=2, padding=True, engine=engine)
    assert isinstance(K, np.ndarray) and K.dtype == np.float64
    assert rel_err(K, ref) <= 1e-10
    Kt = conv_ntk(torch.from_numpy(X), torch.from_numpy(Z), M, depth=2, padding=True,
                  engine=engine)
    assert isinstance(Kt, torch.Tensor) and Kt.dtype == torch.float64
    assert rel_err(Kt.numpy(), ref) <= 1e-10


def test_float32_and_integer_inputs_compute_in_float32(small_case):
    X, Z, M, ref = small_case
    K = conv_ntk(X.astype(np.float32), Z.astype(np.float32), M, depth=2, padding=True)
    assert K.dtype == np.float32
    assert rel_err(K, ref) <= 1e-5
    Kt = conv_ntk(torch.from_numpy(X.astype(np.float32)), depth=2)
    assert Kt.dtype == torch.float32
    rng = np.random.default_rng(0)
    U = rng.integers(0, 256, size=(3, 1, 9, 9), dtype=np.uint8)
    Ku = conv_ntk(U, depth=2)
    assert Ku.dtype == np.float32
    np.testing.assert_array_equal(Ku, conv_ntk(U.astype(np.float32), depth=2))
    assert conv_ntk(torch.from_numpy(U), depth=2).dtype == torch.float32
    assert conv_ntk(U.astype(np.int64), depth=2).dtype == np.float32


def test_explicit_dtype_wins(small_case):
    X, Z, M, ref = small_case
    assert conv_ntk(X, Z, M, depth=2, dtype="float32").dtype == np.float32
    assert conv_ntk(torch.from_numpy(X), depth=2, dtype=torch.float32).dtype == torch.float32
    K = conv_ntk(X.astype(np.float32), Z.astype(np.float32), M, depth=2, padding=True,
                 dtype="float64")
    assert K.dtype == np.float64
    # the float32 input's rounding, not the arithmetic, limits the agreement
    assert rel_err(K, ref) <= 1e-6
    U = np.random.default_rng(1).integers(0, 256, size=(2, 1, 9, 9), dtype=np.uint8)
    Ku = conv_ntk(U, depth=2, dtype="float64")
    assert Ku.dtype == np.float64
    assert rel_err(Ku, reference.kernel_matrix(U, U, np.eye(Q * Q), 2, Q, False)) <= 1e-10


def test_options_dtype_none_follows_the_input(small_case):
    X = small_case[0]
    follow = ComputeOptions(dtype=None)
    assert conv_ntk(X, depth=2, options=follow).dtype == np.float64
    assert conv_ntk(X.astype(np.float32), depth=2, options=follow).dtype == np.float32
    single = ComputeOptions(dtype="float32")
    assert conv_ntk(X, depth=2, options=single).dtype == np.float32
    assert conv_ntk(X, depth=2, options=single, dtype="float64").dtype == np.float64


def test_resolve_dtype_for():
    assert resolve_dtype_for(np.zeros(2), None) == torch.float64
    assert resolve_dtype_for(np.zeros(2, np.float32), None) == torch.float32
    assert resolve_dtype_for(np.zeros(2, np.uint8), None) == torch.float32
    assert resolve_dtype_for(torch.zeros(2, dtype=torch.float64), None) == torch.float64
    assert resolve_dtype_for(torch.zeros(2, dtype=torch.float16), None) == torch.float32
    assert resolve_dtype_for(torch.zeros(2, dtype=torch.int32), None) == torch.float32
    assert resolve_dtype_for([[0.5]], None) == torch.float64
    assert resolve_dtype_for(np.zeros(2), "float32") == torch.float32
    assert resolve_dtype_for(np.zeros(2, np.uint8), torch.float64) == torch.float64
    with pytest.raises(ValueError, match="float32 or float64"):
        resolve_dtype_for(np.zeros(2), torch.float16)
    with pytest.raises(ValueError, match="'float32' or 'float64'"):
        resolve_dtype_for(np.zeros(2), "half")


# ---------------------------------------------------------------------------------------------
# patch_agop against finite differences over independent patches


def _lift(images, q, padding):
    """(n, C, H, W) -> (n, C*q*q, Hp+q-1, Wp+q-1): patch p's vector at pixel p, zeros elsewhere."""
    out = None
    for i, x in enumerate(images):
        P, (hp, wp) = reference.patches(x, q, padding)
        if out is None:
            out = np.zeros((len(images), P.shape[1], hp + q - 1, wp + q - 1))
        out[i, :, :hp, :wp] = P.T.reshape(-1, hp, wp)
    return out


def _lift_metric(M, q):
    corner = np.zeros((q * q, q * q))
    corner[0, 0] = 1.0
    return q * q * np.kron(M, corner)


def _fd_agop(X, coef, Z, M, depth, padding, h=1e-5):
    """(1/s) sum_z sum_p sum_k g g^T with g the central difference of f_k in each z_p coordinate."""
    XL, ZL, ML = _lift(X, Q, padding), _lift(Z, Q, padding), _lift_metric(M, Q)
    d, hp, wp = ZL.shape[1], ZL.shape[2] - Q + 1, ZL.shape[3] - Q + 1
    s, c = len(Z), coef.shape[1]
    # the lifting is exact: the lifted kernel is the kernel
    kw = dict(depth=depth, patch_size=Q, dtype="float64", engine="numba")
    assert rel_err(conv_ntk(XL, ZL, ML, padding=False, **kw),
                   conv_ntk(X, Z, M, padding=padding, **kw)) <= 1e-12

    def f(zl):
        return coef.T @ conv_ntk(XL, zl, ML, padding=False, **kw)  # (c, s)

    g = np.zeros((s, hp, wp, c, d))
    for r in range(hp):
        for col in range(wp):
            for e in range(d):
                up, down = ZL.copy(), ZL.copy()
                up[:, e, r, col] += h
                down[:, e, r, col] -= h
                g[:, r, col, :, e] = ((f(up) - f(down)) / (2 * h)).T
    g = g.reshape(-1, d)
    return g.T @ g / s


FD_CASES = [  # depth, padding, metric, channels, image size
    (1, False, "identity", 1, 6),
    (1, True, "psd", 2, 5),
    (2, True, "psd", 1, 6),
    (2, False, "identity", 2, 7),
    (3, False, "psd", 1, 7),
    (3, True, "identity", 1, 5),
]


@pytest.fixture(scope="module")
def fd_case():
    cache = {}

    def get(depth, padding, metric, C, size):
        key = (depth, padding, metric, C, size)
        if key not in cache:
            rng = np.random.default_rng(100 * depth + 10 * C + padding)
            X = rng.standard_normal((5, C, size, size))
            Z = rng.standard_normal((3, C, size, size))
            d = C * Q * Q
            M = np.eye(d) if metric == "identity" else random_psd(rng, d)
            coef = rng.standard_normal((5, 4))
            cache[key] = (X, Z, M, coef, _fd_agop(X, coef, Z, M, depth, padding))
        return cache[key]

    return get


@pytest.mark.parametrize("engine", ["numba", "torch"])
@pytest.mark.parametrize("case", FD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_patch_agop_matches_finite_differences(fd_case, case, engine):
    depth, padding = case[:2]
    X, Z, M, coef, G_fd = fd_case(*case)
    G = patch_agop(X, coef, Z, M, depth=depth, padding=padding, engine=engine)
    assert isinstance(G, np.ndarray) and G.dtype == np.float64
    assert G.shape == (M.shape[0], M.shape[0])
    assert rel_err(G, G_fd) <= 1e-6


def test_patch_agop_numpy_and_tensor_io():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((6, 2, 8, 8))
    Z = rng.standard_normal((3, 2, 8, 8))
    M = random_psd(rng, 18)
    coef = rng.standard_normal((6, 3))
    kw = dict(depth=2, padding=True)
    G = patch_agop(X, coef, Z, M, **kw)
    assert isinstance(G, np.ndarray) and G.shape == (18, 18) and G.dtype == np.float64
    np.testing.assert_array_equal(G, G.T)
    assert np.linalg.eigvalsh(G).min() >= -1e-12 * np.abs(G).max()
    Gt = patch_agop(torch.from_numpy(X), torch.from_numpy(coef), torch.from_numpy(Z),
                    torch.from_numpy(M), **kw)
    assert isinstance(Gt, torch.Tensor) and Gt.dtype == torch.float64
    assert rel_err(Gt.numpy(), G) <= 1e-12
    # float32 input computes in float32; an explicit dtype wins
    G32 = patch_agop(X.astype(np.float32), coef, Z.astype(np.float32), M, **kw)
    assert G32.dtype == np.float32 and rel_err(G32, G) <= 1e-4
    assert patch_agop(X, coef, Z, M, dtype="float32", **kw).dtype == np.float32
    # the AGOP sums over outputs: one column at a time adds up to all of them
    parts = sum(patch_agop(X, coef[:, k], Z, M, **kw) for k in range(3))
    assert rel_err(parts, G) <= 1e-12
    # coef (n,) is one output, the same as (n, 1)
    np.testing.assert_array_equal(patch_agop(X, coef[:, 0], Z, M, **kw),
                                  patch_agop(X, coef[:, :1], Z, M, **kw))
    # M = None is the identity; the average is over the images of Z
    np.testing.assert_array_equal(patch_agop(X, coef, Z, **kw),
                                  patch_agop(X, coef, Z, np.eye(18), **kw))
    halves = patch_agop(X, coef, Z[:1], M, **kw) + 2 * patch_agop(X, coef, Z[1:], M, **kw)
    assert rel_err(halves / 3, G) <= 1e-12


def test_patch_agop_is_finite_with_blank_images():
    rng = np.random.default_rng(4)
    X = rng.random((4, 1, 9, 9)).astype(np.float32)
    X[0] = 0
    X[1, :, :5] = 0
    G = patch_agop(X, rng.standard_normal(4), X[:2], depth=3)
    assert np.isfinite(G).all() and G.dtype == np.float32


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(coef=np.ones((4, 2))), ValueError, r"coef has 4 rows but X has 5 images"),
    (dict(coef=np.ones(3)), ValueError, r"coef has 3 rows but X has 5 images"),
    (dict(coef=np.ones((5, 2, 1))), ValueError, r"coef must have shape \(n,\) or \(n, c\)"),
    (dict(coef=np.ones((5, 0))), ValueError, "coef has no outputs"),
    (dict(coef=np.full((5, 2), np.nan)), ValueError, "coef contains NaN"),
    (dict(coef=np.array([["a"]] * 5)), TypeError, "coef must hold numbers"),
    (dict(Z=np.zeros((2, 2, 9, 9))), ValueError, "Z has 2 channels but X has 1"),
    (dict(Z=np.zeros((2, 1, 9, 10))), ValueError, "X and Z must have the same image size"),
    (dict(Z=np.zeros((2, 9, 9))), ValueError, r"Z must have shape \(n, C, H, W\)"),
    (dict(Z=np.zeros((0, 1, 9, 9))), ValueError, "Z has no images"),
    (dict(X=np.zeros((5, 9, 9))), ValueError, r"X must have shape \(n, C, H, W\)"),
    (dict(M=np.eye(4)), ValueError, r"M must have shape \(9, 9\)"),
    (dict(depth=5), ValueError, "depth 5 with patch_size 3 needs images of at least 11"),
])
def test_patch_agop_refuses_bad_shapes(kwargs, error, message):
    rng = np.random.default_rng(5)
    args = dict(X=rng.random((5, 1, 9, 9)), coef=np.ones((5, 2)), Z=rng.random((2, 1, 9, 9)))
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    kwargs.setdefault("depth", 2)
    with pytest.raises(error, match=message):
        patch_agop(args["X"], args["coef"], args["Z"], **kwargs)


def test_conv_ntk_names_mismatched_arguments():
    rng = np.random.default_rng(6)
    X = rng.random((2, 1, 9, 9))
    with pytest.raises(ValueError, match="Z has 3 channels but X has 1"):
        conv_ntk(X, rng.random((2, 3, 9, 9)))
    with pytest.raises(ValueError, match=r"M must have shape \(9, 9\)"):
        conv_ntk(X, M=np.eye(27))


# ---------------------------------------------------------------------------------------------
# M must be a metric: symmetric positive semi-definite within a small relative tolerance


def _not_psd_metrics(rng, d=9):
    U, _ = np.linalg.qr(rng.standard_normal((d, d)))
    indefinite = (U * np.r_[1.0, np.ones(d - 2), -1e-3]) @ U.T  # smallest eigenvalue -1e-3
    asymmetric = np.eye(d) + np.triu(np.full((d, d), 0.1), 1)
    return [(-np.eye(d), r"smallest eigenvalue is -1 "),
            (-random_psd(rng, d) - np.eye(d), "smallest eigenvalue is -"),
            (indefinite, r"smallest eigenvalue is -0.001 "),
            (asymmetric, "M must be symmetric"),
            (torch.from_numpy(-np.eye(d)).float(), r"smallest eigenvalue is -1 ")]


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("function", ["conv_ntk", "patch_agop"])
def test_a_metric_that_is_not_psd_is_refused_naming_M(function, case):
    rng = np.random.default_rng(11)
    M, message = _not_psd_metrics(rng)[case]
    X, Z = rng.random((4, 1, 9, 9)), rng.random((2, 1, 9, 9))
    with pytest.raises(ValueError, match=r"^M must be (positive semi-definite|symmetric)") as e:
        if function == "conv_ntk":
            conv_ntk(X, Z, M, depth=2)
        else:
            patch_agop(X, np.ones((4, 2)), Z, M, depth=2)
    assert e.match(message)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_metric_psd_up_to_rounding_is_accepted(dtype):
    rng = np.random.default_rng(12)
    d = 9
    U, _ = np.linalg.qr(rng.standard_normal((d, d)))
    low_rank = (U * np.r_[np.ones(4), np.zeros(d - 4)]) @ U.T  # eigenvalues 1 and (about) 0
    nearly = (U * np.r_[np.ones(d - 1), -5e-7]) @ U.T  # -5e-7 x the largest: rounding
    skew = nearly + 1e-9 * np.triu(np.ones((d, d)), 1)  # symmetric up to rounding
    X = rng.random((3, 1, 9, 9))
    for M in (low_rank, nearly, skew, low_rank.astype(np.float32)):
        K = conv_ntk(X, M=M, depth=2, dtype=dtype)
        assert np.isfinite(K).all()
        G = patch_agop(X, np.ones(3), X[:1], M, depth=2, dtype=dtype)
        assert np.isfinite(G).all()
