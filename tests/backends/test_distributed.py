"""The Ray layer on a small local cluster gives what the single-machine core gives."""

import numpy as np
import pytest
import torch
from conftest import random_psd, rel_err

from ray_convrfm import Options
from ray_convrfm.backends import KernelSpec
from ray_convrfm.kernels.agop import agop_from_sides
from ray_convrfm.kernels.kernel import KernelParams, kernel_matrix, prepare_side

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray_convrfm.backends.driver import start_ray

    start_ray(workers=2)
    yield
    ray.shutdown()


def test_sharded_kernel_and_agop_equal_local(cluster):
    from ray_convrfm.backends.driver import ShardedImages

    rng = np.random.default_rng(0)
    X = rng.random((23, 1, 12, 12), dtype=np.float32)
    Z = rng.random((7, 1, 12, 12), dtype=np.float32)
    M = random_psd(rng, 9).astype(np.float32)
    params = {"depth": 2, "patch_size": 3, "padding": False}
    spec = KernelSpec(KernelParams(**params))
    with ShardedImages(X, workers=2, threads=1, block=4) as shards:
        assert shards.bounds == [(0, 11), (11, 23)]
        # one thread per worker in every pool, numba's launched at that size (kernels.threads)
        for sizes in ray.get([a.threads.remote() for a in shards.actors]):
            assert sizes == {"torch": 1, "numba": 1, "numba_launched": 1, "blas": 1}
        K = shards.kernel(Z, M, None, spec)
        coef = rng.standard_normal((23, 4)).astype(np.float32)
        sample = np.array([1, 5, 12, 20])  # rows in both shards
        # the predictor's 23 centers as 6 blocks of at most 4, fetched one at a time
        blocks = shards.center_blocks()
        assert blocks.sizes == (4, 4, 3, 4, 4, 4) and blocks.m == 23
        G = shards.agop(blocks, coef, sample, M, None, spec)
        some = np.array([0, 3, 11, 12, 22])
        G_some = shards.agop(shards.center_blocks(some), coef[some], sample, M, None, spec)

    Mt = torch.from_numpy(M)
    xs = prepare_side(torch.from_numpy(X), Mt, KernelParams(**params))
    zs = prepare_side(torch.from_numpy(Z), Mt, KernelParams(**params))
    assert rel_err(K, kernel_matrix(xs, zs, "numba", 512).numpy()) < 1e-6

    local = agop_from_sides(xs, torch.from_numpy(coef), xs.take(sample), Mt, engine="numba")
    assert rel_err(G, local.numpy()) < 1e-5
    some_local = agop_from_sides(xs.take(some), torch.from_numpy(coef[some]), xs.take(sample),
                                 Mt, engine="numba")
    assert rel_err(G_some, some_local.numpy()) < 1e-5


def test_workers_featurise_their_shards_and_reduce_by_a_tree(cluster):
    """Deep ConvRFM's feature map runs on the workers, a chunk at a time (nothing featurised
    is kept); their images, fingerprints and sums match the local ones."""
    from ray_convrfm.backends.driver import ShardedImages
    from ray_convrfm.backends.store import rows_fingerprint
    from ray_convrfm.kernels.patches import featurise, patch_gram

    rng = np.random.default_rng(1)
    X = rng.random((37, 1, 10, 10), dtype=np.float32)
    filters = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    local = featurise(torch.from_numpy(X), torch.from_numpy(filters), False)
    with ShardedImages(X, workers=2, threads=1, block=8, align=True) as shards:
        assert shards.bounds == [(0, 16), (16, 37)]  # block-aligned for the store
        assert shards.fingerprint("float32") == rows_fingerprint(X, 8)
        shards.featurise(filters, padding=False)
        assert shards.row_shape == (4, 8, 8)
        np.testing.assert_allclose(shards.gather(None, "float32"), local.numpy(), rtol=1e-6)
        np.testing.assert_allclose(shards.gather(np.array([3, 20, 36]), "float32"),
                                   local.numpy()[[3, 20, 36]], rtol=1e-6)
        assert shards.fingerprint("float32") == rows_fingerprint(shards.gather(None, "float32"),
                                                                 8)
        np.testing.assert_allclose(shards.patch_gram(3, False, "float32", 1),
                                   patch_gram(local, 3, False).numpy(), rtol=1e-9)
        parts = [ray.put(np.full(3, float(k))) for k in range(11)]
        np.testing.assert_array_equal(shards.reduce(parts, fan_in=2), np.full(3, 55.0))


def test_workers_the_cluster_cannot_place_time_out_clearly(cluster):
    from ray_convrfm import ConvRFM
    from ray_convrfm.backends.driver import PlacementTimeoutError

    X = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    y = np.arange(20) % 2
    model = ConvRFM(depth=2, iters=1,
                    options=Options.of(workers=2, gpus_per_worker=1, placement_timeout_s=1))
    with pytest.raises(PlacementTimeoutError, match="2 workers of .*'GPU': 1.0.*in all"):
        model.fit(X, y)  # the embedded Ray cannot grow: refused at once
    from ray_convrfm.backends.driver import reserve_workers

    with pytest.raises(PlacementTimeoutError, match="gave up after 1 s waiting for 3 workers"):
        reserve_workers(3, {"CPU": 1.0}, timeout_s=1, poll_s=0.5, elastic=True)  # autoscaler
    # the reservation was released: the same cluster still runs a CPU fit
    two = Options.of(workers=2, placement_timeout_s=30)
    assert ConvRFM(depth=2, iters=1, options=two).fit(X, y).score(X, y) > 0


def test_convrfm_with_two_workers_equals_in_process(cluster):
    from ray_convrfm import ConvRFM
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    X, y, Xt = ds.X_train[:120], ds.y_train[:120], ds.X_test[:30]
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=3)
    local = ConvRFM(**kw).fit(X, y)
    remote = ConvRFM(options=Options.of(workers=2), **kw).fit(X, y)
    assert remote.best_iter_ == local.best_iter_ and remote.ridge_ == local.ridge_
    torch.testing.assert_close(remote.M_path_[1], local.M_path_[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(remote.decision_function(Xt), local.decision_function(Xt),
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(remote.predict(Xt), local.predict(Xt))


def test_two_layer_deep_convrfm_with_two_workers_equals_in_process(cluster):
    from ray_convrfm import ConvRFM, DeepConvRFM
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    pad = ((0, 0), (0, 0), (2, 2), (2, 2))
    X, y = np.pad(ds.X_train[:100], pad), ds.y_train[:100]
    Xt = np.pad(ds.X_test[:20], pad)
    kw = dict(iters=2, agop_samples=15, random_state=2)
    local = DeepConvRFM(ConvRFM(**kw), layers=2, width=4).fit(X, y)
    remote = DeepConvRFM(ConvRFM(options=Options.of(workers=2), **kw), layers=2, width=4).fit(X, y)
    np.testing.assert_allclose(remote.decision_function(Xt), local.decision_function(Xt),
                               rtol=1e-3, atol=1e-4)


def test_uint8_shards_give_the_float32_kernel_and_fit(cluster):
    """8-bit pixels rest on the workers as uint8 and are converted a prepared chunk at a time
    (a 1 MB budget prepares two 3 x 16 x 16 images at once): the kernel rows equal those of
    float32 shards of the same pixels bit for bit, and the fit (sketched AGOP on the workers
    included) equals an in-process fit on the float32 images."""
    from ray_convrfm import ConvRFM
    from ray_convrfm.backends.chunks import prepared_chunk
    from ray_convrfm.backends.driver import ShardedImages
    from ray_convrfm.backends.protocol import Targets

    rng = np.random.default_rng(0)
    U = rng.integers(0, 256, (48, 3, 16, 16), dtype=np.uint8)
    U[:24, :, 4:12, 4:12] //= 4  # a class signal: darker centres
    y = (np.arange(48) < 24).astype(int) + 2 * (np.arange(48) % 2)
    F = U.astype(np.float32) / np.float32(255)
    spec = KernelSpec(KernelParams(2, 3, False), memory_budget_mb=1)
    assert prepared_chunk((3, 16, 16), spec, None) == 2
    M = np.eye(27, dtype=np.float32)
    centers = np.arange(0, 48, 5)
    targets = Targets(y, 4)
    out = []
    for X in (U, F):
        with ShardedImages(X, workers=2, threads=1, block=8) as shards:
            assert ray.get(shards.actors[0].pixels.remote()).dtype == X.dtype
            KtK, KtY, parts, kmax, _ = shards.nystrom(centers, targets, M, None, spec)
            out.append((KtK, KtY, shards.collect(parts), kmax))
    for a, b in zip(*out, strict=True):
        np.testing.assert_array_equal(a, b)

    kw = dict(depth=2, iters=2, agop_samples=12, random_state=1, solver="nystrom",
              centers=20, agop_classes=2)
    local = ConvRFM(**kw).fit(F, y)
    remote = ConvRFM(options=Options.of(workers=2, memory_budget_mb=1), **kw).fit(U, y)
    assert remote.X_fit_.dtype == torch.uint8  # the model's centers rest as stored
    np.testing.assert_array_equal(remote.X_fit_.numpy().astype(np.float32) / np.float32(255),
                                  local.X_fit_.numpy())
    torch.testing.assert_close(remote.M_path_[1], local.M_path_[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(remote.decision_function(U), local.decision_function(F),
                               rtol=1e-3, atol=1e-4)


def test_deep_convrfm_featurised_per_chunk_predicts_as_materialised(cluster):
    """Workers featurise a chunk of stored pixels when it is needed (a 1 MB budget: a few
    8-channel images at a time; no featurised shard exists): the predictions of the
    in-process fit, which materialises every layer's features."""
    from ray_convrfm import ConvRFM, DeepConvRFM

    rng = np.random.default_rng(3)
    U = rng.integers(0, 256, (60, 3, 14, 14), dtype=np.uint8)
    U[:30, 0] //= 3
    y = (np.arange(60) < 30).astype(int)
    F = U.astype(np.float32) / np.float32(255)
    kw = dict(iters=2, agop_samples=12, random_state=2, solver="nystrom", centers=30,
              depth=1)
    local = DeepConvRFM(ConvRFM(**kw), layers=2, width=8).fit(F, y)
    remote = DeepConvRFM(ConvRFM(options=Options.of(workers=2, memory_budget_mb=1), **kw),
                         layers=2, width=8).fit(U, y)
    assert remote.final_.X_fit_.shape[1:] == (8, 12, 12)
    torch.testing.assert_close(remote.layers_[0]["M"], local.layers_[0]["M"], rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(remote.decision_function(U), local.decision_function(F),
                               rtol=1e-3, atol=1e-4)


def test_store_resumes_and_refuses_another_run(cluster, tmp_path):
    from ray_convrfm import ConvRFM
    from ray_convrfm.backends.store import StoreMismatchError
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    X, y, Xt = ds.X_train[:150], ds.y_train[:150], ds.X_test[:30]
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=4,
              options=Options.of(workers=2, store=str(tmp_path / "kernels.zarr")))
    first = ConvRFM(**kw).fit(X, y)
    computed = [h["stored_blocks_computed"] for h in first.history_]
    assert all(c > 0 for c in computed)
    again = ConvRFM(**kw).fit(X, y)  # same inputs: every block is already stored
    assert [h["stored_blocks_computed"] for h in again.history_] == [0, 0]
    np.testing.assert_array_equal(again.decision_function(Xt), first.decision_function(Xt))
    in_process = ConvRFM(depth=2, iters=2, agop_samples=20, random_state=4).fit(X, y)
    np.testing.assert_allclose(first.decision_function(Xt), in_process.decision_function(Xt),
                               rtol=1e-3, atol=1e-4)
    with pytest.raises(StoreMismatchError, match="another run"):
        ConvRFM(**kw).fit(X[:140], y[:140])
    # the same store serves an in-process fit: nothing is recomputed
    here = ConvRFM(depth=2, iters=2, agop_samples=20, random_state=4,
                   options=Options.of(store=str(tmp_path / "kernels.zarr"))).fit(X, y)
    assert [h["stored_blocks_computed"] for h in here.history_] == [0, 0]
    torch.testing.assert_close(here.alpha_, first.alpha_, rtol=0, atol=0)  # the same kernels
    np.testing.assert_allclose(here.decision_function(Xt), first.decision_function(Xt),
                               rtol=1e-9)
    # 8-bit pixels: the store holds kernels of the working values, so uint8 shards find the
    # blocks that float32 shards of the same pixels wrote
    U = np.rint(X * 255).astype(np.uint8)
    F = U.astype(np.float32) / np.float32(255)
    pixels = dict(kw, options=Options.of(workers=2, store=str(tmp_path / "pixels.zarr")))
    floats = ConvRFM(**pixels).fit(F, y)
    from_pixels = ConvRFM(**pixels).fit(U, y)
    assert [h["stored_blocks_computed"] for h in from_pixels.history_] == [0, 0]
    torch.testing.assert_close(from_pixels.alpha_, floats.alpha_, rtol=0, atol=0)


def test_nystrom_on_workers_equals_in_process(cluster):
    from ray_convrfm import ConvRFM
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    X, y, Xt = ds.X_train[:150], ds.y_train[:150], ds.X_test[:30]
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=6, solver="nystrom", centers=60)
    local = ConvRFM(**kw).fit(X, y)
    remote = ConvRFM(options=Options.of(workers=2), **kw).fit(X, y)
    np.testing.assert_array_equal(remote.center_indices_, local.center_indices_)
    np.testing.assert_allclose(remote.decision_function(Xt), local.decision_function(Xt),
                               rtol=1e-3, atol=1e-4)


def test_scale_out_nystrom_on_workers_equals_in_process(cluster):
    """Centers in blocks of 16 on both workers, every row slab spilled to the workers' zarr
    (``resident_mb=0``), the preconditioner's factor on the first worker, validation scored
    where its parts live: the model of the in-process fit (float64), and with a rank-q
    preconditioner too."""
    from ray_convrfm import ConvRFM
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    X, y, Xt = ds.X_train[:150], ds.y_train[:150], ds.X_test[:30]
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=6, solver="nystrom", centers=60,
              ridges=(1e-5, 1e-3))
    local = ConvRFM(options=Options.of(dtype="float64", block=16), **kw).fit(X, y)
    for extra in (dict(resident_mb=0), dict(preconditioner_rank=20)):
        remote = ConvRFM(options=Options.of(workers=2, dtype="float64", block=16, **extra),
                         **kw).fit(X, y)
        np.testing.assert_array_equal(remote.center_indices_, local.center_indices_)
        assert [h["val_acc_by_ridge"] for h in remote.history_] == \
            [h["val_acc_by_ridge"] for h in local.history_]
        assert remote.ridge_ == local.ridge_ and remote.best_iter_ == local.best_iter_
        assert float((remote.alpha_ - local.alpha_).norm() / local.alpha_.norm()) <= 1e-4
        remote.set_params(options=None)
        np.testing.assert_array_equal(remote.predict(Xt), local.predict(Xt))
        if "resident_mb" in extra:
            assert all(h["seconds_reading_rows"] > 0 for h in remote.history_)


def test_nystrom_kernel_goes_through_the_store(cluster, tmp_path):
    from ray_convrfm import ConvRFM
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    X, y, Xt = ds.X_train[:300], ds.y_train[:300], ds.X_test[:30]
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=6, solver="nystrom", centers=40)
    plain = ConvRFM(options=Options.of(workers=2), **kw).fit(X, y)
    stored_opts = Options.of(workers=2, store=str(tmp_path / "k.zarr"))
    stored = ConvRFM(options=stored_opts, **kw).fit(X, y)
    # 270 fitting rows in blocks of 256: 2 row blocks x 1 center block, per iteration
    assert [h["stored_blocks_computed"] for h in stored.history_] == [2, 2]
    again = ConvRFM(options=stored_opts, **kw).fit(X, y)
    assert [h["stored_blocks_computed"] for h in again.history_] == [0, 0]
    np.testing.assert_array_equal(again.decision_function(Xt), stored.decision_function(Xt))
    np.testing.assert_allclose(stored.decision_function(Xt), plain.decision_function(Xt),
                               rtol=1e-4, atol=1e-5)


def test_killing_a_worker_mid_kernel_gives_the_same_result(cluster, tmp_path):
    """A worker process is SIGKILLed while it computes; Ray restarts it and retries the task."""
    import os
    import signal
    import threading
    import time

    from ray_convrfm.backends.driver import ShardedImages

    rng = np.random.default_rng(7)
    M = np.eye(9, dtype=np.float32)
    spec = KernelSpec(KernelParams(depth=3, patch_size=3, padding=False))
    landed = False
    for n in (500, 800, 1200):  # larger problems if the kill came too late on a busy machine
        X = rng.random((n, 1, 28, 28), dtype=np.float32)
        with ShardedImages(X, workers=2, threads=1) as shards:
            shards.kernel(X[:4], M, None, spec)  # warm-up: workers load the compiled kernel
            t0 = time.perf_counter()
            expected = shards.kernel(X, M, None, spec)
            seconds = time.perf_counter() - t0
            victim = ray.get(shards.actors[1].pid.remote())
            killed_at = []

            def kill_midway(victim=victim, seconds=seconds, killed_at=killed_at):
                time.sleep(seconds / 4)
                os.kill(victim, signal.SIGKILL)
                killed_at.append(time.perf_counter())

            killer = threading.Thread(target=kill_midway)
            killer.start()
            again = shards.kernel(X, M, None, spec)
            finished_at = time.perf_counter()
            killer.join()
            assert ray.get(shards.actors[1].pid.remote()) != victim  # a new process took over
            np.testing.assert_array_equal(again, expected)
        if killed_at[0] < finished_at:
            landed = True
            break
    assert landed, "the kill never landed during a computation"


def _done_blocks(store_path) -> int:
    import zarr

    total = 0
    for path in store_path.glob("K-*"):
        try:  # a kernel's folder exists before its metadata and arrays are complete
            digests = zarr.open_group(str(path), mode="r")["K.digest"][...]
            total += int(digests.any(axis=-1).sum())  # a finished block has its digest
        except (FileNotFoundError, KeyError, ValueError):
            continue
    return total


def test_killed_driver_resumes_from_the_store(cluster, tmp_path):
    """SIGKILL the whole fit (driver and its Ray) mid-kernel; the rerun computes only the rest."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from ray_convrfm import ConvRFM

    rng = np.random.default_rng(8)
    X = rng.random((700, 1, 20, 20), dtype=np.float32)
    y = rng.integers(0, 3, 700)
    np.savez(tmp_path / "data.npz", X_train=X, y_train=y)
    store = tmp_path / "kernels.zarr"
    cmd = [sys.executable, "-m", "ray_convrfm.tools.cli", "fit", "--dataset",
           f"npz:{tmp_path / 'data.npz'}", "--depth", "3", "--iters", "1", "--workers", "2",
           "--store", str(store), "--out", str(tmp_path / "run"), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300  # generous: a busy machine starts Ray slowly
    while time.time() < deadline and proc.poll() is None and _done_blocks(store) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the fit finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # orphaned Ray workers of the killed driver may finish a block or two before they notice
    done_before, stable_since = _done_blocks(store), time.time()
    while time.time() - stable_since < 3 and time.time() < deadline:
        time.sleep(0.2)
        now = _done_blocks(store)
        if now != done_before:
            done_before, stable_since = now, time.time()
    assert done_before >= 2

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    computed = config["history"][0]["stored_blocks_computed"]
    total = _done_blocks(store)
    assert computed == total - done_before  # exactly the missing blocks, nothing twice
    assert 0 < computed < total
    resumed = ConvRFM.load(tmp_path / "run" / "model")
    fresh = ConvRFM(depth=3, iters=1).fit(X, y)
    np.testing.assert_allclose(resumed.decision_function(X[:20]), fresh.decision_function(X[:20]),
                               rtol=1e-3, atol=1e-4)


def test_fit_from_parquet_reads_training_rows_on_the_workers(cluster, tmp_path, monkeypatch):
    """Workers read and decode their own row groups, validation row groups included (the
    driver reads no image), and the fit equals one on the same images held in memory."""
    from ray_convrfm import ConvRFM
    from ray_convrfm.data import parquet as pqmod
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits().subset(240, 30)
    path = pqmod.write_parquet_dataset(ds, tmp_path / "digits", rows_per_group=20)
    images = pqmod.ParquetImages.open(path, "train")
    X, y = images.read()
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=9)

    driver_reads = []
    real_read_rows = pqmod.read_rows

    def spy(m, split, start, stop, size=None, dtype="float32"):
        driver_reads.append((start, stop))
        return real_read_rows(m, split, start, stop, size, dtype)

    monkeypatch.setattr(pqmod, "read_rows", spy)
    remote = ConvRFM(options=Options.of(workers=2), **kw).fit(images)
    fit, val = images.split_validation(0.1, np.random.default_rng(9))
    assert len(val) >= 1 and sum(b - a for a, b in val) >= 20  # whole row groups held out
    assert driver_reads == []  # labels only: validation is read and scored on the workers
    assert len(remote.X_fit_) == sum(b - a for a, b in fit)

    fit_rows = np.concatenate([np.arange(a, b) for a, b in fit])
    val_rows = np.concatenate([np.arange(a, b) for a, b in val])
    local = ConvRFM(**kw).fit(X[fit_rows], y[fit_rows], X_val=X[val_rows], y_val=y[val_rows])
    np.testing.assert_allclose(remote.decision_function(ds.X_test),
                               local.decision_function(ds.X_test), rtol=1e-3, atol=1e-4)
