"""Batch predictions written where the data lives: the parts equal ``predict`` and
``decision_function`` (exactly in process, to rounding on Ray workers), parquet rows are read by
the workers, and a killed or failing run never leaves a marker."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_convrfm import ConvRFM, DeepConvRFM, Options
from ray_convrfm.backends.workers.batch import BatchPrediction
from ray_convrfm.data import parquet as pqmod
from ray_convrfm.data.datasets import load_digits
from ray_convrfm.data.predictions import MARKER, read_predictions


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def model(digits):
    """A small in-process ConvRFM on 8 x 8 digits (blocks of 16 rows: spans of 64)."""
    return ConvRFM(depth=2, iters=1, random_state=0,
                   options=Options.of(block=16)).fit(digits.X_train[:200], digits.y_train[:200])


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from ray_convrfm.backends.ray_executor import start_ray

    start_ray(workers=2)
    yield
    ray.shutdown()


def scores_of(table) -> np.ndarray:
    return np.stack(table.column("scores").to_numpy(zero_copy_only=False))


def files(path) -> list[str]:
    return sorted(os.listdir(path))


def test_in_process_parts_equal_predict_and_decision_function_exactly(model, digits, tmp_path):
    X, y = digits.X_test, digits.y_test  # 297 images: 5 tasks of at most 64 rows
    done = model.predict_to_parquet(X, tmp_path / "p", y=y)
    table = read_predictions(tmp_path / "p")
    assert files(tmp_path / "p") == [MARKER, "part-00000.parquet"]
    assert table.column_names == ["row", "predicted_label", "scores", "true_label"]
    assert pq.ParquetFile(tmp_path / "p" / "part-00000.parquet").num_row_groups == 5
    np.testing.assert_array_equal(table.column("row").to_numpy(), np.arange(len(X)))
    np.testing.assert_array_equal(scores_of(table),
                                  model.decision_function(X).astype(np.float32))
    np.testing.assert_array_equal(table.column("predicted_label").to_numpy(), model.predict(X))
    np.testing.assert_array_equal(table.column("true_label").to_numpy(), y)
    assert done.rows == len(X) and done.parts == 1
    assert done.accuracy == model.score(X, y) and 0.8 < done.accuracy < 1


def test_labels_keep_the_classes_dtype_and_unlabelled_data_has_no_true_label(digits, tmp_path):
    names = np.array([f"digit-{k}" for k in range(10)])
    model = ConvRFM(depth=2, iters=1).fit(digits.X_train[:150], names[digits.y_train[:150]])
    X = digits.X_test[:50]
    model.predict_to_parquet(X, tmp_path / "p")
    table = read_predictions(tmp_path / "p")
    assert table.column_names == ["row", "predicted_label", "scores"]
    assert table.schema.field("predicted_label").type == "string"
    assert table.column("predicted_label").to_pylist() == model.predict(X).tolist()
    with pytest.raises(ValueError, match="cannot be compared with the model's classes"):
        model.predict_to_parquet(X, tmp_path / "q", y=digits.y_test[:50])


def test_parquet_data_in_process_equal_the_decoded_images(model, digits, tmp_path):
    path = pqmod.write_parquet_dataset(digits, tmp_path / "digits", rows_per_group=40)
    images = pqmod.ParquetImages.open(path, "test")
    done = model.predict_to_parquet(images, tmp_path / "p")
    X, y = images.read()
    table = read_predictions(tmp_path / "p")
    np.testing.assert_array_equal(scores_of(table),
                                  model.decision_function(X).astype(np.float32))
    np.testing.assert_array_equal(table.column("true_label").to_numpy(), y)
    assert done.accuracy == model.score(X, y)


def test_images_of_another_shape_are_refused_clearly(model, digits, tmp_path):
    X = digits.X_test[:20]
    with pytest.raises(ValueError, match=r"shape \(1, 10, 10\).*fitted on \(1, 8, 8\)"):
        model.predict_to_parquet(np.pad(X, ((0, 0), (0, 0), (1, 1), (1, 1))), tmp_path / "a")
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\).*fitted on \(1, 8, 8\)"):
        model.predict_to_parquet(np.repeat(X, 3, axis=1), tmp_path / "b")
    with pytest.raises(ValueError, match=r"shape \(n, C, H, W\)"):
        model.predict_to_parquet(X[:, 0], tmp_path / "c")
    path = pqmod.write_parquet_dataset(digits.subset(40, 20), tmp_path / "d")
    with pytest.raises(ValueError, match=r"\(1, 12, 12\).*fitted on.*size=\(H, W\)"):
        model.predict_to_parquet(pqmod.ParquetImages.open(path, "test", size=(12, 12)),
                                 tmp_path / "e")
    bad = X.copy()
    bad[7, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.predict_to_parquet(bad, tmp_path / "f")
    assert not any((tmp_path / n).exists() for n in "abcef")  # refused before any file


def test_an_existing_out_is_refused_unless_overwrite(model, digits, tmp_path):
    X, y = digits.X_test[:100], digits.y_test[:100]
    out = tmp_path / "p"
    model.predict_to_parquet(X, out, y=y)
    with pytest.raises(FileExistsError, match="predictions of an earlier run.*overwrite"):
        model.predict_to_parquet(X, out)
    model.predict_to_parquet(X[:30], out, overwrite=True)  # now without labels
    table = read_predictions(out)
    assert table.num_rows == 30 and "true_label" not in table.column_names
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"did not write \(notes.txt\)"):
        model.predict_to_parquet(X, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / MARKER).exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file"):
        model.predict_to_parquet(X, tmp_path / "file", overwrite=True)


def test_out_may_be_a_url(model, digits):
    """A cluster's workers write to object storage (fsspec's memory:// here, in process)."""
    import fsspec

    X = digits.X_test[:70]
    done = model.predict_to_parquet(X, "memory://bucket/preds", y=digits.y_test[:70])
    assert done.path == "memory://bucket/preds"
    assert sorted(p.rsplit("/", 1)[1] for p in fsspec.filesystem("memory").ls(
        "/bucket/preds", detail=False)) == [MARKER, "part-00000.parquet"]
    table = read_predictions("memory://bucket/preds")
    np.testing.assert_array_equal(table.column("predicted_label").to_numpy(), model.predict(X))
    with pytest.raises(FileExistsError, match="earlier run"):
        model.predict_to_parquet(X, "memory://bucket/preds")


def test_a_run_failing_mid_way_leaves_no_marker_and_no_part(model, digits, tmp_path,
                                                           monkeypatch):
    real, calls = BatchPrediction.batch_block, []

    def failing(self, *args):
        calls.append(args[1])
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(self, *args)

    monkeypatch.setattr(BatchPrediction, "batch_block", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        model.predict_to_parquet(digits.X_test, tmp_path / "p", y=digits.y_test)
    assert calls == [0, 64, 128] and files(tmp_path / "p") == []  # the part was dropped
    with pytest.raises(FileNotFoundError, match="no complete batch prediction"):
        read_predictions(tmp_path / "p")


def test_a_killed_run_leaves_no_marker_and_a_rerun_needs_overwrite(model, digits, tmp_path):
    """SIGKILL in the middle of writing: the temporary part stays, the marker never comes;
    the folder is refused as an incomplete run, and overwrite replaces it."""
    model.save(tmp_path / "model")
    script = textwrap.dedent(f"""
        import os, signal
        from ray_convrfm import ConvRFM
        from ray_convrfm.backends.workers.batch import BatchPrediction
        from ray_convrfm.data.datasets import load_digits
        from ray_convrfm.options import Options

        real, calls = BatchPrediction.batch_block, []
        def dying(self, *args):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *args)
        BatchPrediction.batch_block = dying
        model = ConvRFM.load({str(tmp_path / "model")!r}, options=Options.of(block=16))
        model.predict_to_parquet(load_digits().X_test, {str(tmp_path / "p")!r})
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    left = files(tmp_path / "p")
    assert MARKER not in left and len(left) == 1 and left[0].startswith(".part-00000.parquet.")
    with pytest.raises(FileExistsError, match="incomplete run"):
        model.predict_to_parquet(digits.X_test, tmp_path / "p")
    model.predict_to_parquet(digits.X_test, tmp_path / "p", overwrite=True)
    assert files(tmp_path / "p") == [MARKER, "part-00000.parquet"]
    np.testing.assert_array_equal(read_predictions(tmp_path / "p").column("predicted_label")
                                  .to_numpy(), model.predict(digits.X_test))


def test_deep_convrfm_in_process_and_on_two_workers(digits, ray_cluster, tmp_path):
    """One code path: the filter banks are applied where the rows are scored, in process
    (exact) and on two Ray workers of the loaded model (to rounding, one part each)."""
    pad = ((0, 0), (0, 0), (2, 2), (2, 2))
    X, y = np.pad(digits.X_train[:120], pad), digits.y_train[:120]
    Xt, yt = np.pad(digits.X_test[:90], pad), digits.y_test[:90]
    deep = DeepConvRFM(ConvRFM(iters=1, agop_samples=10, random_state=2,
                               options=Options.of(block=16)), layers=2, width=4,
                       layer_patience=None).fit(X, y)
    expected = deep.decision_function(Xt)
    deep.predict_to_parquet(Xt, tmp_path / "local", y=yt)
    np.testing.assert_array_equal(scores_of(read_predictions(tmp_path / "local")),
                                  expected.astype(np.float32))
    loaded = DeepConvRFM.load(deep.save(tmp_path / "model"),
                              options=Options.of(workers=2, block=16))
    with loaded:
        done = loaded.predict_to_parquet(Xt, tmp_path / "ray", y=yt)
        assert loaded.final_._backend.ex.starts == 1 and len(loaded.final_._backend.ex.bounds) == 2
    table = read_predictions(tmp_path / "ray")
    assert done.parts == 2 and files(tmp_path / "ray") == [
        MARKER, "part-00000.parquet", "part-00001.parquet"]
    np.testing.assert_array_equal(table.column("row").to_numpy(), np.arange(len(Xt)))
    np.testing.assert_allclose(scores_of(table), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table.column("predicted_label").to_numpy(), deep.predict(Xt))
    assert done.accuracy == deep.score(Xt, yt)


def test_parquet_rows_are_read_by_the_ray_workers(digits, ray_cluster, tmp_path, monkeypatch):
    """A model fitted on two workers keeps them; each reads and decodes its own test rows
    (the driver reads none), and a row group that cannot be read fails the run without a
    marker."""
    path = pqmod.write_parquet_dataset(digits.subset(200, 297), tmp_path / "digits",
                                       rows_per_group=20)
    X, y = digits.X_train[:200], digits.y_train[:200]
    kw = dict(depth=2, iters=1, random_state=0)
    remote = ConvRFM(options=Options.of(workers=2, block=16), **kw).fit(X, y)
    local = ConvRFM(**kw).fit(X, y)
    images = pqmod.ParquetImages.open(path, "test")
    Xt, yt = images.read()

    driver_reads, real_read_rows = [], pqmod.read_rows

    def spy(m, split, start, stop, size=None, dtype="float32"):
        driver_reads.append((start, stop))
        return real_read_rows(m, split, start, stop, size, dtype)

    monkeypatch.setattr(pqmod, "read_rows", spy)
    ex = remote._backend.ex
    done = remote.predict_to_parquet(images, tmp_path / "p")
    assert driver_reads == [] and remote._backend.ex is ex and ex.starts == 1
    table = read_predictions(tmp_path / "p")
    assert done.parts == 2 and done.rows == len(Xt)
    np.testing.assert_allclose(scores_of(table), remote.decision_function(Xt), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(scores_of(table), local.decision_function(Xt), rtol=1e-3,
                               atol=1e-4)
    np.testing.assert_array_equal(table.column("true_label").to_numpy(), yt)
    assert done.accuracy == remote.score(Xt, yt)

    last = sorted((tmp_path / "digits" / "test").glob("*.parquet"))[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a damaged shard
    with pytest.raises(Exception, match="Parquet magic bytes not found"):
        remote.predict_to_parquet(images, tmp_path / "q")
    assert driver_reads == [] and files(tmp_path / "q") == []
