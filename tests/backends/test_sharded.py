"""``ShardedBackend`` gives what the single-machine core gives, over either executor."""

import numpy as np
import pytest
import torch
from conftest import random_psd, rel_err, sharded

from ray_convrfm.backends import KernelSpec
from ray_convrfm.backends.protocol import Targets
from ray_convrfm.kernels.agop import agop_from_sides
from ray_convrfm.kernels.kernel import KernelParams, kernel_matrix, prepare_side

PARAMS = KernelParams(depth=2, patch_size=3, padding=False)


def _configured(ex, X, M, block=4, spec=None):
    backend = sharded(ex, X, block=block)
    backend.configure(spec or KernelSpec(PARAMS), None)
    backend.set_metric(torch.from_numpy(M), None)
    return backend


def test_kernel_scores_and_agop_equal_the_core(executor):
    rng = np.random.default_rng(0)
    X = rng.random((23, 1, 12, 12), dtype=np.float32)
    Z = rng.random((7, 1, 12, 12), dtype=np.float32)
    M = random_psd(rng, 9).astype(np.float32)
    ex = executor(X, workers=2, block=4, align=False)
    backend = _configured(ex, X, M)
    if executor.kind == "ray":
        assert ex.bounds == [(0, 11), (11, 23)]
        # one thread per worker in every pool, numba's launched at that size (kernels.threads)
        for sizes in ex.get([ex.submit(k, "threads") for k in range(2)]):
            assert sizes == {"torch": 1, "numba": 1, "numba_launched": 1, "blas": 1}
    K = backend.train_kernel().numpy()
    cross = backend.scores(Z, torch.eye(23, dtype=torch.float64), None, [])  # K(Z, X)
    coef = rng.standard_normal((23, 4)).astype(np.float32)
    sample = np.array([1, 5, 12, 20])  # rows in both shards
    # the predictor's 23 centers as blocks of at most 4 (per shard), fetched one at a time
    blocks = backend.center_blocks()
    assert blocks.m == 23 and max(blocks.sizes) == 4
    G = backend.agop(torch.from_numpy(coef), sample, None).numpy()
    some = np.array([0, 3, 11, 12, 22])
    G_some = backend.agop(torch.from_numpy(coef[some]), sample, some).numpy()

    Mt = torch.from_numpy(M)
    xs, zs = prepare_side(torch.from_numpy(X), Mt, PARAMS), prepare_side(torch.from_numpy(Z), Mt,
                                                                         PARAMS)
    # each entry is one pair's fused computation: the upper triangle (mirrored) of the
    # symmetric kernel bit for bit, and the full product up to rounding (x M z vs z M x)
    np.testing.assert_array_equal(K, kernel_matrix(xs, xs, "numba", 512, symmetric=True).numpy())
    np.testing.assert_array_equal(K, K.T)
    assert rel_err(K, kernel_matrix(xs, xs, "numba", 512).numpy()) < 1e-6
    assert rel_err(cross, kernel_matrix(zs, xs, "numba", 512).numpy()) < 1e-6
    local = agop_from_sides(xs, torch.from_numpy(coef), xs.take(sample), Mt, engine="numba")
    assert rel_err(G, local.numpy()) < 1e-5
    some_local = agop_from_sides(xs.take(some), torch.from_numpy(coef[some]), xs.take(sample),
                                 Mt, engine="numba")
    assert rel_err(G_some, some_local.numpy()) < 1e-5


def test_workers_featurise_their_shards_and_reduce_by_a_tree(executor):
    """Deep ConvRFM's feature map runs on the workers, a chunk at a time (nothing featurised
    is kept); their images, fingerprints and sums match the local ones."""
    from ray_convrfm.backends.chunks import FilterBank
    from ray_convrfm.backends.store import rows_fingerprint
    from ray_convrfm.kernels.patches import featurise, patch_gram

    rng = np.random.default_rng(1)
    X = rng.random((37, 1, 10, 10), dtype=np.float32)
    filters = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    local = featurise(torch.from_numpy(X), torch.from_numpy(filters), False)
    ex = executor(X, workers=2, block=8, align=True)
    backend = sharded(ex, X, block=8)
    if executor.kind == "ray":
        assert ex.bounds == [(0, 16), (16, 37)]  # block-aligned for the store
    backend.configure(KernelSpec(PARAMS), None)
    assert backend.fingerprint("float32") == rows_fingerprint(X, 8)
    backend.featurise(FilterBank(filters, False))
    assert backend.row_shape == (4, 8, 8)
    np.testing.assert_allclose(backend.centers(None).numpy(), local.numpy(), rtol=1e-6)
    np.testing.assert_allclose(backend.centers(np.array([3, 20, 36])).numpy(),
                               local.numpy()[[3, 20, 36]], rtol=1e-6)
    assert backend.fingerprint("float32") == rows_fingerprint(backend.centers(None), 8)
    gram = sum(ex.get(backend._each("patch_gram", backend.chain, 3, False, "float32", 1)))
    np.testing.assert_allclose(gram, patch_gram(local, 3, False).numpy(), rtol=1e-9)
    # a second bank, pooled 2 x 2 (max), applied after the first on the workers
    from ray_convrfm.kernels.patches import pool_images

    second = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    backend.featurise(FilterBank(second, True, 2, "max", "relu"))
    assert backend.row_shape == (3, 4, 4)
    pooled = pool_images(featurise(local, torch.from_numpy(second), True).clamp_min(0), 2,
                         "max")
    np.testing.assert_allclose(backend.centers(None).numpy(), pooled.numpy(), rtol=1e-5,
                               atol=1e-6)
    # the channels' mean squares through one more bank, as Deep ConvRFM normalises them
    third = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    after = pool_images(featurise(pooled.double(), torch.from_numpy(third).double(), False),
                        2, "avg")
    got = backend.channel_mean_squares(FilterBank(third, False, 2, "avg"))
    np.testing.assert_allclose(got, after.square().mean((0, 2, 3)).numpy(), rtol=1e-5)
    assert backend.row_shape == (3, 4, 4)  # nothing featurised by asking
    parts = [ex.put(np.full(3, float(k))) for k in range(11)]
    if executor.kind == "ray":
        assert len(ex.tree(parts, keep=1, fan_in=2)) == 1
    np.testing.assert_array_equal(backend.reduce(parts), np.full(3, 55.0))


def test_uint8_shards_give_the_float32_nystrom_sums(executor):
    """8-bit pixels rest on the workers as uint8 and are converted a prepared chunk at a time
    (a 1 MB budget prepares two 3 x 14 x 14 images at once): the Nystrom sums equal those of
    float32 shards of the same pixels bit for bit."""
    from ray_convrfm.backends.chunks import prepared_chunk

    rng = np.random.default_rng(0)
    U = rng.integers(0, 256, (48, 3, 14, 14), dtype=np.uint8)
    y = (np.arange(48) < 24).astype(int) + 2 * (np.arange(48) % 2)
    F = U.astype(np.float32) / np.float32(255)
    spec = KernelSpec(KernelParams(2, 3, False), memory_budget_mb=1)
    assert prepared_chunk((3, 14, 14), spec, None) == 2
    out = []
    for X in (U, F):
        ex = executor(X, workers=2, block=8)
        assert ex.get([ex.submit(0, "pixels")])[0].dtype == X.dtype
        backend = _configured(ex, X, np.eye(27, dtype=np.float32), block=8, spec=spec)
        out.append(backend.nystrom_system(np.arange(0, 48, 5), Targets(y, 4)))
        ex.close()  # the next executor's workers need its CPUs
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_kept_workers_take_new_images(executor):
    """``reload`` (a fitted model's centers on the fit's workers): the same workers, new rows."""
    rng = np.random.default_rng(2)
    X, C = (rng.random((n, 1, 8, 8), dtype=np.float32) for n in (20, 9))
    ex = executor(X, workers=2, block=4)
    backend = _configured(ex, X, np.eye(9, dtype=np.float32))
    backend.train_kernel()
    backend.keep_for_predictions(torch.from_numpy(C))
    assert backend.n == 9 and sum(b - a for a, b in ex.bounds) == 9 and ex.starts == 1
    backend.configure(KernelSpec(PARAMS), None)
    backend.set_metric(torch.eye(9), None)
    cs = prepare_side(torch.from_numpy(C), torch.eye(9), PARAMS)
    np.testing.assert_array_equal(backend.train_kernel().numpy(),
                                  kernel_matrix(cs, cs, "numba", 512, symmetric=True).numpy())


def test_unsorted_rows_are_refused(executor):
    X = np.zeros((6, 1, 6, 6), np.float32)
    backend = _configured(executor(X, workers=1), X, np.eye(9, dtype=np.float32))
    with pytest.raises(ValueError, match="sorted"):
        backend.centers(np.array([3, 1]))


def test_every_training_center_is_a_slice_of_the_prepared_columns():
    """After the exact solver's training kernel, a worker scores held-out images and takes the
    AGOP against every training image with the columns it prepared for that kernel (no center
    featurised and prepared again), and gets what freshly prepared centers give."""
    from ray_convrfm.backends.chunks import FilterBank
    from ray_convrfm.backends.executor import InProcessExecutor

    rng = np.random.default_rng(5)
    X = rng.random((18, 1, 10, 10), dtype=np.float32)
    ex = InProcessExecutor(X)
    backend = sharded(ex, X, block=4)
    backend.configure(KernelSpec(PARAMS), None)
    bank = FilterBank(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), True, 2, "max")
    backend.featurise(bank)  # a Deep layer: centers pass through a filter bank
    backend.set_metric(torch.from_numpy(random_psd(rng, 36).astype(np.float32)), None)
    coef = torch.from_numpy(rng.standard_normal((18, 3)).astype(np.float32))
    sample = np.array([2, 9, 15])

    def scored():
        worker = ex.worker
        centers = backend.center_blocks()
        sides = list(worker._center_sides(backend.layer, centers))
        return ([s for *_, s in sides], backend.agop(coef, sample, None).numpy(),
                worker._against_centers(worker._rows_side(backend.layer, slice(0, 5)),
                                        backend.layer, centers).numpy())

    fresh_sides, fresh_G, fresh_K = scored()  # no columns held yet: centers prepared
    backend.train_kernel()
    held = next(iter(ex.worker._sides.values()))
    sides, G, K = scored()
    base = held.left.untyped_storage().data_ptr()
    assert all(s.left.untyped_storage().data_ptr() == base for s in sides)
    assert all(s.left.untyped_storage().data_ptr() != base for s in fresh_sides)
    assert [len(s) for s in sides] == [len(s) for s in fresh_sides] == [4, 4, 4, 4, 2]
    assert rel_err(G, fresh_G) < 1e-5 and rel_err(K, fresh_K) < 1e-6
