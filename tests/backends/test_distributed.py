"""The Ray layer on a small local cluster gives what the single-machine core gives."""

import numpy as np
import pytest
import torch

from ray_convrfm import Options
from ray_convrfm.backends import KernelSpec
from ray_convrfm.kernels.kernel import KernelParams

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray_convrfm.backends.ray_executor import start_ray

    start_ray(workers=2)
    yield
    ray.shutdown()


def test_workers_the_cluster_cannot_place_time_out_clearly(cluster):
    from ray_convrfm import ConvRFM
    from ray_convrfm.backends.ray_executor import PlacementTimeoutError

    X = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    y = np.arange(20) % 2
    model = ConvRFM(depth=2, iters=1,
                    options=Options.of(workers=2, gpus_per_worker=1, placement_timeout_s=1))
    with pytest.raises(PlacementTimeoutError, match="2 workers of .*'GPU': 1.0.*in all"):
        model.fit(X, y)  # the embedded Ray cannot grow: refused at once
    from ray_convrfm.backends.ray_executor import reserve_workers

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


def test_a_fitted_model_keeps_its_workers_for_every_prediction(cluster, tmp_path):
    """fit, then predict / decision_function / score three times: the fit's actors, started
    once, reloaded with the model's centers; close() releases them and a later prediction
    opens new ones, once."""
    from ray_convrfm import ConvRFM
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    X, y, Xt, yt = ds.X_train[:100], ds.y_train[:100], ds.X_test[:40], ds.y_test[:40]
    model = ConvRFM(depth=2, iters=1, random_state=1, options=Options.of(workers=2)).fit(X, y)
    ex = model._backend.ex
    actors = [a._actor_id.hex() for a in ex.actors]
    assert len(actors) == 2 and sum(b - a for a, b in ex.bounds) == len(model.X_fit_)
    first = model.decision_function(Xt)
    for _ in range(3):
        np.testing.assert_array_equal(model.decision_function(Xt), first)
    assert model.score(Xt, yt) == np.mean(model.predict(Xt) == yt)
    assert model._backend.ex is ex and ex.starts == 1
    assert [a._actor_id.hex() for a in ex.actors] == actors
    with model:
        pass  # leaving the block releases the workers
    assert model._backend is None and ex.actors == [] and ex.pg is None
    np.testing.assert_array_equal(model.decision_function(Xt), first)  # new workers, once
    again = model._backend.ex
    assert again is not ex and again.starts == 1
    # a second fit beside the kept workers: they make room when the cluster lacks the CPUs
    cpus = ray.cluster_resources().get("CPU", 0)
    other = ConvRFM(depth=2, iters=1, random_state=2, options=Options.of(workers=2)).fit(X, y)
    if cpus < 4:
        assert again.closed and not other._backend.ex.closed
    np.testing.assert_array_equal(model.decision_function(Xt), first)  # reopened if released
    other.close()
    model.close()
    loaded = ConvRFM.load(model.save(tmp_path / "model"))
    assert loaded._backend is None  # opened on the first prediction
    loaded.set_params(options=Options.of(workers=2))
    np.testing.assert_allclose(loaded.decision_function(Xt), first, rtol=1e-6)
    loaded.close()


def test_a_kept_worker_killed_restarts_with_the_models_centers(cluster):
    """A kept pool's actor killed between predictions is restarted by Ray from the pool's
    directory, which holds the model's centers (not the training shard it started with):
    the predictions do not change."""
    import os
    import signal

    from ray_convrfm import ConvRFM
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    X, y, Xt = ds.X_train[:100], ds.y_train[:100], ds.X_test[:40]
    model = ConvRFM(depth=2, iters=1, random_state=1, solver="nystrom", centers=30,
                    options=Options.of(workers=2)).fit(X, y)
    first = model.decision_function(Xt)
    ex = model._backend.ex
    victim = ray.get(ex.actors[1].pid.remote())
    os.kill(victim, signal.SIGKILL)
    np.testing.assert_array_equal(model.decision_function(Xt), first)
    assert ray.get(ex.actors[1].pid.remote()) != victim  # a new process took over
    assert sum(ray.get([a.size.remote() for a in ex.actors])) == 30  # the centers, not X
    model.close()


def test_two_layer_deep_convrfm_with_two_workers_equals_in_process(cluster):
    from ray_convrfm import ConvRFM, DeepConvRFM
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    pad = ((0, 0), (0, 0), (2, 2), (2, 2))
    X, y = np.pad(ds.X_train[:100], pad), ds.y_train[:100]
    Xt = np.pad(ds.X_test[:20], pad)
    kw = dict(iters=2, agop_samples=15, random_state=2)
    deep = dict(layers=2, width=4, layer_patience=None)
    local = DeepConvRFM(ConvRFM(**kw), **deep).fit(X, y)
    remote = DeepConvRFM(ConvRFM(options=Options.of(workers=2), **kw), **deep).fit(X, y)
    np.testing.assert_allclose(remote.decision_function(Xt), local.decision_function(Xt),
                               rtol=1e-3, atol=1e-4)


def test_uint8_shards_give_the_float32_fit(cluster):
    """8-bit pixels rest on the workers as uint8 (a 1 MB budget: two 3 x 16 x 16 images
    prepared at once): the fit (sketched AGOP on the workers included) equals an in-process
    fit on the float32 images."""
    from ray_convrfm import ConvRFM

    rng = np.random.default_rng(0)
    U = rng.integers(0, 256, (48, 3, 16, 16), dtype=np.uint8)
    U[:24, :, 4:12, 4:12] //= 4  # a class signal: darker centres
    y = (np.arange(48) < 24).astype(int) + 2 * (np.arange(48) % 2)
    F = U.astype(np.float32) / np.float32(255)
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
    local = DeepConvRFM(ConvRFM(**kw), layers=2, width=8, layer_patience=None).fit(F, y)
    remote = DeepConvRFM(ConvRFM(options=Options.of(workers=2, memory_budget_mb=1), **kw),
                         layers=2, width=8, layer_patience=None).fit(U, y)
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
    # the same store serves an in-process fit: the first kernel (same inputs, M = I) is read,
    # not recomputed. Later kernels are keyed by M's bits, and M sums AGOP parts in another
    # order in process (one shard) than over two workers, so it may differ in its last bit:
    # then that kernel is recomputed, never read under the other M's key.
    here = ConvRFM(depth=2, iters=1, agop_samples=20, random_state=4,
                   options=Options.of(store=str(tmp_path / "kernels.zarr"))).fit(X, y)
    assert [h["stored_blocks_computed"] for h in here.history_] == [0]
    assert here.history_[0]["val_acc_by_ridge"] == first.history_[0]["val_acc_by_ridge"]
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

    from conftest import sharded

    from ray_convrfm.backends.ray_executor import RayExecutor

    rng = np.random.default_rng(7)
    spec = KernelSpec(KernelParams(depth=3, patch_size=3, padding=False))
    landed = False
    for n in (500, 800, 1200):  # larger problems if the kill came too late on a busy machine
        X = rng.random((n, 1, 28, 28), dtype=np.float32)
        ex = RayExecutor(X, 2, threads=1)
        try:
            backend = sharded(ex, X, block=256, align=False)
            backend.configure(spec, None)
            backend.set_metric(torch.eye(9), None)
            backend.train_kernel()  # warm-up: workers load the compiled kernel
            t0 = time.perf_counter()
            expected = backend.train_kernel()
            seconds = time.perf_counter() - t0
            victim = ray.get(ex.actors[1].pid.remote())
            killed_at = []

            def kill_midway(victim=victim, seconds=seconds, killed_at=killed_at):
                time.sleep(seconds / 4)
                os.kill(victim, signal.SIGKILL)
                killed_at.append(time.perf_counter())

            killer = threading.Thread(target=kill_midway)
            killer.start()
            again = backend.train_kernel()
            finished_at = time.perf_counter()
            killer.join()
            assert ray.get(ex.actors[1].pid.remote()) != victim  # a new process took over
            torch.testing.assert_close(again, expected, rtol=0, atol=0)
        finally:
            ex.close()
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
    from ray_convrfm.data.split import split_validation

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
    assert driver_reads == []  # labels only: validation is read and scored on the workers
    seed = int(np.random.default_rng(9).integers(2**31 - 1))  # as the fit draws it
    fit_rows, val_rows = split_validation(y, np.unique(y), 0.1, seed, images.holdout_units())
    assert len(remote.X_fit_) == len(fit_rows)
    groups, rows_held = np.unique(val_rows // 20, return_counts=True)
    assert len(groups) >= 1 and np.all(rows_held == 20)  # whole row groups held out
    local = ConvRFM(**kw).fit(X[fit_rows], y[fit_rows], X_val=X[val_rows], y_val=y[val_rows])
    np.testing.assert_allclose(remote.decision_function(ds.X_test),
                               local.decision_function(ds.X_test), rtol=1e-3, atol=1e-4)
