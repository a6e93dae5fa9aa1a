"""The fused CPU engine's window sums (flat, stride-w loops) at every patch size, against the
torch engine's (tests/reference.py checks q = 3; these add q = 1, 2, 4, 5)."""

import numpy as np
import pytest
import torch
from conftest import random_psd, rel_err

from ray_convrfm.kernels import numba_engine
from ray_convrfm.kernels.agop import agop_from_sides
from ray_convrfm.kernels.kernel import (
    KernelParams,
    kernel_block,
    kernel_block_adjoint,
    prepare_side,
    window_sum,
)


@pytest.mark.parametrize("q", [1, 2, 3, 5])
def test_window_and_its_adjoint_match_torch(q):
    rng = np.random.default_rng(q)
    h, w = 9, 7
    a = rng.standard_normal(h * w)
    expected = window_sum(torch.from_numpy(a.reshape(h, w)), q).numpy().ravel()
    got = a.copy()
    numba_engine._window.py_func(got, h, w, q, np.empty(2 * h * w))
    np.testing.assert_allclose(got[: expected.size], expected, rtol=1e-12)
    # the adjoint: <W a, g> = <a, W^T g> for every a, g
    g = rng.standard_normal(expected.size)
    back = np.concatenate([g, np.zeros(h * w - g.size)])
    numba_engine._window_adjoint.py_func(back, h - q + 1, w - q + 1, q, np.empty(2 * h * w))
    np.testing.assert_allclose(a @ back, expected @ g, rtol=1e-10)


@pytest.mark.parametrize("q,depth,padding", [(2, 3, False), (4, 2, True), (5, 2, False),
                                             (1, 3, False)])
def test_kernel_and_adjoint_match_the_torch_engine(q, depth, padding):
    rng = np.random.default_rng(10 * q + depth)
    params = KernelParams(depth, q, padding)
    X = torch.from_numpy(rng.standard_normal((5, 2, 13, 11)))
    X[0] = 0
    Z = torch.from_numpy(rng.standard_normal((3, 2, 13, 11)))
    M = torch.from_numpy(random_psd(rng, 2 * q * q))
    xs, zs = prepare_side(X, M, params), prepare_side(Z, M, params)
    assert rel_err(kernel_block(xs, zs, "numba"), kernel_block(xs, zs, "torch")) < 1e-12
    assert rel_err(kernel_block(xs, xs, "numba", symmetric=True),
                   kernel_block(xs, xs, "torch")) < 1e-12
    coef = torch.from_numpy(rng.standard_normal((5, 4)))
    fast = kernel_block_adjoint(xs, zs, coef, "numba")
    slow = kernel_block_adjoint(xs, zs, coef, "torch")
    # 1 x 1 patches: the engines' derivatives differ by 2.6e-8 relative, as they did before
    # the flat window sums (measured on the code before them); 1e-10 at every other q
    tol = 1e-7 if q == 1 else 1e-10
    for a, b in zip(fast, slow, strict=True):
        assert rel_err(a, b) < tol
    G = agop_from_sides(xs, coef, zs, M, engine="numba")
    assert rel_err(G, agop_from_sides(xs, coef, zs, M, engine="torch")) < tol


_ADJOINT_BITS = """
import hashlib, numpy as np, torch
from ray_convrfm.kernels.kernel import (KernelParams, kernel_block_adjoint, kernel_matrix,
                                       prepare_side)
rng = np.random.default_rng(0)
X = torch.from_numpy(rng.random((40, 1, 8, 8), dtype=np.float32))
A = torch.from_numpy(rng.standard_normal((9, 9)).astype(np.float32))
xs = prepare_side(X, A @ A.T / 9, KernelParams(2, 3, False))
coef = torch.from_numpy(rng.standard_normal((40, 3)).astype(np.float32))
out = [kernel_matrix(xs, xs, "numba", 512, symmetric=True),
       *kernel_block_adjoint(xs, xs.rows(0, 10), coef, "numba")]
print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in out)).hexdigest())
"""


def test_cached_machine_code_gives_the_bits_of_a_fresh_compile(tmp_path):
    """A rerun that resumes from a kernel store loads the engine from numba's cache; it must
    compute what the interrupted run compiled afresh, bit for bit, or it learns another M."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    runs = [subprocess.run([sys.executable, "-c", _ADJOINT_BITS], env=env, capture_output=True,
                           text=True, timeout=600) for _ in range(2)]  # fresh, then cached
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert any((tmp_path / "numba-cache").rglob("*.nbi"))  # the second run had a cache
    assert runs[0].stdout.split()[-1] == runs[1].stdout.split()[-1]


def test_row_tiles_do_not_change_the_bits():
    """The forward's row tiles only reorder whole pairs: every tile gives the same bits."""
    rng = np.random.default_rng(3)
    X = torch.from_numpy(rng.random((23, 2, 9, 9), dtype=np.float32))
    M = torch.from_numpy(random_psd(rng, 18).astype(np.float32))
    xs = prepare_side(X, M, KernelParams(3, 3, True))
    for symmetric in (False, True):
        outs = [kernel_block(xs, xs, "numba", symmetric, tile).numpy()
                for tile in (None, 1, 2, 5, 16, 40)]
        for out in outs[1:]:
            np.testing.assert_array_equal(out, outs[0])
    np.testing.assert_allclose(outs[0], kernel_block(xs, xs, "torch").numpy(), rtol=1e-5)
    # the adjoint's column tiles, likewise
    from ray_convrfm.kernels.kernel import _numba_call

    coef = torch.from_numpy(rng.standard_normal((23, 3)).astype(np.float32))
    zs = xs.rows(0, 11)
    adjoints = [_numba_call(xs, zs, adjoint=True, coef=coef, tile=tile)
                for tile in (None, 1, 3, 11, 30)]
    for got in adjoints[1:]:
        for a, b in zip(got, adjoints[0], strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("basis", [False, True])
def test_sides_store_positions_last_so_blocks_need_no_copy(basis):
    """Prepared patches are (n, r, P1) in memory, through rows() and take() too: the fused
    engines read them as they are, with no transposed copy of a block's columns."""
    rng = np.random.default_rng(4)
    X = torch.from_numpy(rng.random((6, 2, 7, 7)))
    Q = torch.linalg.qr(torch.from_numpy(rng.standard_normal((18, 5))))[0] if basis else None
    r = 5 if basis else 18
    side = prepare_side(X, torch.eye(r, dtype=X.dtype), KernelParams(2, 3, False), Q)
    for s in (side, side.rows(1, 4), side.take([4, 0, 2])):
        for t in (s.left, s.right):
            assert t.shape[2] == r and t.transpose(1, 2).is_contiguous()
    np.testing.assert_array_equal(side.take([4, 0]).right.numpy(), side.right.numpy()[[4, 0]])
