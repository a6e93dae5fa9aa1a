"""The ray-convrfm command end to end, on a small .npz data set made here."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_convrfm.data.datasets import load_digits
from ray_convrfm.tools.cli import main


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    ds = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits_small.npz"
    np.savez(path, X_train=ds.X_train[:150], y_train=ds.y_train[:150], X_test=ds.X_test[:40],
             y_test=ds.y_test[:40])
    return path


def test_fit_writes_model_metrics_and_pictures(tmp_path, small_npz, capsys):
    out = tmp_path / "run"
    rc = main(["fit", "--dataset", f"npz:{small_npz}", "--iters", "2", "--agop-samples", "20",
               "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "val acc" in text and "test accuracy" in text
    table = pq.read_table(out / "metrics.parquet").to_pydict()
    assert table["iter"] == [0, 1]
    assert sum(table["chosen"]) == 1
    assert all(0 <= a <= 1 for a in table["test_acc"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 150 and summary["n_test"] == 40
    for name in ("filters.png", "accuracy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert (out / "model" / "config.json").exists()


def test_fit_noise_frame_variant(tmp_path, small_npz, capsys):
    out = tmp_path / "noise"
    rc = main(["fit", "--dataset", f"npz:{small_npz}", "--n-train", "60", "--n-test", "20",
               "--noise-frame", "12", "--depth", "2", "--iters", "1", "--out", str(out),
               "--quiet"])
    assert rc == 0
    assert "(1, 12, 12)" in capsys.readouterr().out


def test_cnfa_trains_a_cnn_and_reports_every_layer(tmp_path, small_npz, capsys):
    out = tmp_path / "cnfa"
    rc = main(["cnfa", "--dataset", f"npz:{small_npz}", "--width", "8", "--conv-layers", "2",
               "--epochs", "1", "--cnfa-images", "16", "--out", str(out), "--quiet"])
    assert rc == 0
    assert "CNN test accuracy" in capsys.readouterr().out
    table = pq.read_table(out / "cnfa.parquet").to_pydict()
    assert table["layer"] == ["features.0", "features.2"]
    assert all(-1 <= v <= 1 for v in table["corr_power_half"] + table["init_corr_power_half"])
    assert (out / "cnfa.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_deep_writes_one_row_per_layer_and_iteration(tmp_path, small_npz, capsys):
    out = tmp_path / "deep"
    rc = main(["fit", "--dataset", f"npz:{small_npz}", "--n-train", "80", "--n-test", "20",
               "--noise-frame", "12", "--layers", "2", "--layer-patience", "0", "--width", "4",
               "--depth", "3", "--iters", "2", "--agop-samples", "10", "--out", str(out),
               "--quiet"])
    assert rc == 0
    assert "layer 1 (kernel depth 2)" in capsys.readouterr().out
    table = pq.read_table(out / "metrics.parquet").to_pydict()
    assert table["layer"] == [0, 0, 1, 1] and table["iter"] == [0, 1, 0, 1]
    assert sum(table["chosen"]) == 2
    assert (out / "model" / "final" / "config.json").exists()
    # pooled: both layers keep --depth, the second sees 12 -> 10 -> 5 pixels
    rc = main(["fit", "--dataset", f"npz:{small_npz}", "--n-train", "80", "--n-test", "20",
               "--noise-frame", "12", "--layers", "2", "--layer-patience", "0", "--width", "4",
               "--depth", "2", "--pool", "2", "--pool-mode", "max", "--activation", "relu",
               "--feature-basis", "0.9", "--iters", "1", "--agop-samples", "10",
               "--out", str(tmp_path / "pooled"), "--quiet"])
    assert rc == 0
    said = capsys.readouterr().out
    assert "kernel depths 2, 2, max pooling 2 x 2, relu between layers" in said
    assert "layer 1 (kernel depth 2)" in said
    config = json.loads((tmp_path / "pooled" / "model" / "config.json").read_text())
    assert config["params"]["activation"] == "relu"
    assert config["params"]["feature_basis"] == 0.9
    final = json.loads((tmp_path / "pooled" / "model" / "final" / "config.json").read_text())
    assert final["image_shape"] == [4, 5, 5] and final["params"]["patch_basis"] == 0.9


def test_bench_reports_throughput(capsys):
    rc = main(["bench", "--size", "12", "--n-train", "8", "--n-sample", "4", "--repeats", "1",
               "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kernel_entries_per_s"] > 0 and r["agop_over_kernel"] > 0
    assert r["pairs"] == 32


def test_bench_distributed_reports_scaling(small_npz, capsys):
    rc = main(["bench", "distributed", "--dataset", f"npz:{small_npz}", "--n", "40",
               "--workers", "1,2", "--depth", "2", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["workers"] for r in rows] == [1, 2]
    assert rows[0]["speedup"] == 1.0 and all(r["entries_per_s"] > 0 for r in rows)


def test_bad_arguments_exit_with_message(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--ridges", "a,b"])
    assert "comma-separated" in capsys.readouterr().err


def test_convert_then_fit_from_parquet(tmp_path, small_npz, capsys):
    """`convert` writes parquet shards; `fit --dataset parquet:` reads them (here in-process,
    resized on reading) and reports the same kind of run."""
    from ray_convrfm.data.parquet import load_parquet

    data = tmp_path / "pq"
    assert main(["convert", f"npz:{small_npz}", str(data), "--rows-per-group", "16",
                 "--quiet"]) == 0
    back = load_parquet(data)
    ds = np.load(small_npz)
    np.testing.assert_array_equal(back.y_train, ds["y_train"])
    np.testing.assert_allclose(back.X_train, ds["X_train"], atol=1 / 510 + 1e-6)
    out = tmp_path / "run"
    assert main(["fit", "--dataset", f"parquet:{data}", "--resize", "10x10", "--iters", "1",
                 "--depth", "2", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 150 and summary["n_test"] == 40
    assert json.loads((out / "model" / "config.json").read_text())["image_shape"] == [1, 10, 10]
    capsys.readouterr()
    assert main(["fit", "--dataset", f"npz:{small_npz}", "--resize", "10x10"]) == 2
    assert "--resize works with parquet" in capsys.readouterr().err


def test_fit_writes_results_to_a_url(small_npz, capsys):
    """--out s3://... on a cluster: staged locally, uploaded through fsspec (memory:// here)."""
    import fsspec

    assert main(["fit", "--dataset", f"npz:{small_npz}", "--iters", "1", "--agop-samples", "10",
                 "--out", "memory://results/run1", "--quiet"]) == 0
    fs = fsspec.filesystem("memory")
    names = {p.rsplit("/", 1)[-1] for p in fs.find("/results/run1")}
    assert {"summary.json", "metrics.parquet", "config.json", "model.safetensors"} <= names
    assert json.loads(fs.cat("/results/run1/summary.json"))["n_train"] == 150
    assert "wrote memory://results/run1/model" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Errors, earlier runs, convert's overwrite and links
# --------------------------------------------------------------------------------------------
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys):
    """A bad input is `ray-convrfm: error: ...` on stderr and status 2; --debug (before or
    after the command) raises it with its traceback instead."""
    missing = tmp_path / "missing.npz"
    assert main(["fit", "--dataset", f"npz:{missing}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ray-convrfm: error: ") and str(missing) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["convert", "nonsense", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("ray-convrfm: error: unknown data set spec")
    assert main(["fit", "--dataset", f"npz:{missing}", "--noise-frame", "12",
                 "--resize", "4x4"]) == 2
    assert "--resize works with parquet" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        main(["--debug", "fit", "--dataset", f"npz:{missing}"])
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        main(["fit", "--dataset", f"npz:{missing}", "--debug"])


def test_cli_process_reports_errors_without_traceback(tmp_path):
    """The real command: exit status 2 and one line; with --debug Python's traceback."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ray_convrfm.tools.cli", "convert", "npz:" + str(
        tmp_path / "missing.npz"), str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"ray-convrfm: error: [Errno 2] No such file or directory: '{tmp_path / 'missing.npz'}'"]
    debug = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True,
                           timeout=300)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "FileNotFoundError" in debug.stderr


def test_fit_refuses_an_out_holding_an_earlier_run(tmp_path, small_npz, capsys):
    """--out with an earlier run's results (model/, summary.json or metrics.parquet) is
    refused before any work unless --overwrite; a folder holding only a killed run's kernel
    store is not an earlier run: the same command resumes it."""
    import fsspec

    def fit(out, *extra):
        return main(["fit", "--dataset", f"npz:{small_npz}", "--n-train", "60", "--n-test",
                     "20", "--depth", "2", "--iters", "1", "--agop-samples", "10", "--out",
                     str(out), "--quiet", *extra])

    out = tmp_path / "run"
    assert fit(out) == 0
    (out / "summary.json").write_text('{"earlier": true}')
    capsys.readouterr()
    assert fit(out) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds the results of an earlier run" in err
    assert "--overwrite" in err and "Traceback" not in err
    assert json.loads((out / "summary.json").read_text()) == {"earlier": True}
    assert fit(out, "--overwrite") == 0
    assert json.loads((out / "summary.json").read_text())["n_train"] == 60

    for name in ("model", "summary.json", "metrics.parquet"):
        earlier = tmp_path / f"only-{name}"
        earlier.mkdir()
        if name == "model":
            (earlier / name).mkdir()
        else:
            (earlier / name).write_text("x")
        assert fit(earlier) == 2
        assert f"({name})" in capsys.readouterr().err

    killed = tmp_path / "killed"
    (killed / "kernels.zarr").mkdir(parents=True)  # what a fit killed mid-kernel leaves
    assert fit(killed) == 0
    assert (killed / "summary.json").exists()

    url = "memory://results/refuse-earlier"
    assert fit(url) == 0
    capsys.readouterr()
    assert fit(url) == 2
    assert f"--out {url} already holds" in capsys.readouterr().err
    assert fit(url, "--overwrite") == 0
    assert fsspec.filesystem("memory").exists("/results/refuse-earlier/model/config.json")

    cnfa = tmp_path / "cnfa"
    cnfa.mkdir()
    (cnfa / "cnfa.parquet").write_text("earlier")
    assert main(["cnfa", "--dataset", f"npz:{small_npz}", "--out", str(cnfa), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_convert_overwrite_keeps_files_it_did_not_write_and_refuses_links(tmp_path, small_npz,
                                                                         capsys):
    from ray_convrfm.data.parquet import load_parquet

    data = tmp_path / "pq"
    args = ["convert", f"npz:{small_npz}", str(data), "--rows-per-file", "50", "--quiet"]
    assert main(args) == 0
    foreign = data / "train" / "theirs.parquet"
    pq.write_table(pq.read_table(data / "train" / "part-0.parquet"), foreign)
    (data / "test" / "README").write_text("mine")
    assert main(args) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main([*args[:-1], "--rows-per-file", "100", "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in (data / "train").iterdir()) == [
        "part-0.parquet", "part-1.parquet", "theirs.parquet"]
    assert (data / "test" / "README").read_text() == "mine" and foreign.exists()
    assert len(load_parquet(data).y_train) == 150

    from PIL import Image

    tree = tmp_path / "tree" / "train"
    for cls in ("a", "b"):
        (tree / cls).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((5, 5), 40 * k, np.uint8)).save(tree / cls / f"{k}.png")
    outside = tmp_path / "outside.png"
    Image.fromarray(np.full((5, 5), 200, np.uint8)).save(outside)
    (tree / "a" / "link.png").symlink_to(outside)
    convert = ["convert", f"folder:{tmp_path / 'tree'}", str(tmp_path / "folder"), "--quiet"]
    assert main(convert) == 2
    err = capsys.readouterr().err
    assert "link.png is a symbolic link to" in err and "--follow-symlinks" in err
    assert main([*convert, "--follow-symlinks"]) == 0
    assert len(load_parquet(tmp_path / "folder").y_train) == 5


def test_the_flags_defaults_are_the_python_apis():
    """Declared once: ``fit``'s defaults are the estimator's parameters and the options'."""
    from ray_convrfm import ConvRFM
    from ray_convrfm.options import ClusterOptions, ComputeOptions
    from ray_convrfm.tools.cli import _parser

    args = _parser().parse_args(["fit"])
    est, compute, cluster = ConvRFM().get_params(), ComputeOptions(), ClusterOptions()
    for flag, param in [("patch_size", "patch_size"), ("iters", "iters"), ("ridges", "ridges"),
                        ("agop_samples", "agop_samples"), ("agop_power", "agop_power"),
                        ("metric_floor", "metric_floor"), ("agop_classes", "agop_classes"),
                        ("val_fraction", "val_fraction"), ("solver", "solver"),
                        ("patience", "patience"), ("seed", "random_state"),
                        ("patch_basis", "patch_basis")]:
        assert getattr(args, flag) == est[param], flag
    for text, value in (("full", "full"), ("0.99", 0.99)):
        assert _parser().parse_args(["fit", "--patch-basis", text]).patch_basis == value
    assert (args.device, args.engine, args.memory_budget_mb) == \
        (compute.device, compute.engine, compute.memory_budget_mb)
    assert (args.workers, args.placement_timeout) == (cluster.workers, cluster.placement_timeout_s)


# --------------------------------------------------------------------------------------------
# predict: a saved model over a data set, parts written where the workers are
# --------------------------------------------------------------------------------------------


def test_predict_writes_parts_and_accuracy_for_npz_and_parquet_data(tmp_path, small_npz,
                                                                   capsys):
    from ray_convrfm import ConvRFM
    from ray_convrfm.data.predictions import read_predictions

    run = tmp_path / "run"
    assert main(["fit", "--dataset", f"npz:{small_npz}", "--iters", "1", "--depth", "2",
                 "--out", str(run), "--quiet"]) == 0
    model = ConvRFM.load(run / "model")
    ds = np.load(small_npz)
    capsys.readouterr()
    preds = tmp_path / "preds.parquet"
    assert main(["predict", str(run / "model"), f"npz:{small_npz}", "--out", str(preds),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    accuracy = model.score(ds["X_test"], ds["y_test"])
    assert f"accuracy {100 * accuracy:.2f}% ({round(accuracy * 40)} of 40 images)" in out
    assert f"wrote {preds}: 40 predictions in 1 part file(s)" in out
    table = read_predictions(preds)
    np.testing.assert_array_equal(table.column("predicted_label").to_numpy(),
                                  model.predict(ds["X_test"]))
    np.testing.assert_array_equal(table.column("true_label").to_numpy(), ds["y_test"])

    # the same images from parquet shards, the train split, the first 100 rows
    data = tmp_path / "pq"
    assert main(["convert", f"npz:{small_npz}", str(data), "--rows-per-group", "16",
                 "--quiet"]) == 0
    assert main(["predict", str(run / "model"), f"parquet:{data}", "--split", "train",
                 "--limit", "100", "--out", str(preds), "--quiet"]) == 2
    assert "already holds the predictions of an earlier run" in capsys.readouterr().err
    assert main(["predict", str(run / "model"), f"parquet:{data}", "--split", "train",
                 "--limit", "100", "--out", str(preds), "--overwrite", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    table = read_predictions(preds)
    X = np.round(ds["X_train"][:100] * 255) / np.float32(255)  # as stored: 8-bit PNG pixels
    np.testing.assert_allclose(np.stack(table.column("scores").to_numpy(zero_copy_only=False)),
                               model.decision_function(X), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table.column("true_label").to_numpy(), ds["y_train"][:100])


def test_predict_refuses_data_of_another_shape_and_a_folder_without_a_model(tmp_path,
                                                                           small_npz, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--dataset", f"npz:{small_npz}", "--iters", "1", "--depth", "2",
                 "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["predict", str(run / "model"), f"npz:{small_npz}", "--noise-frame", "12",
                 "--out", str(tmp_path / "p"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the images have shape (1, 12, 12) (C, H, W); the model was fitted on (1, 8, 8)" in err
    assert main(["predict", str(run), f"npz:{small_npz}", "--out", str(tmp_path / "p"),
                 "--quiet"]) == 2
    assert "holds no saved model (no config.json)" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_predict_a_deep_model_on_the_fits_noise_frame_gives_its_test_accuracy(tmp_path,
                                                                              small_npz,
                                                                              capsys):
    run = tmp_path / "deep"
    assert main(["fit", "--dataset", f"npz:{small_npz}", "--n-train", "80", "--noise-frame",
                 "12", "--layers", "2", "--layer-patience", "0", "--width", "4", "--depth", "3",
                 "--iters", "1",
                 "--agop-samples", "10", "--seed", "3", "--out", str(run), "--quiet"]) == 0
    test_acc = json.loads((run / "summary.json").read_text())["test_acc"]
    capsys.readouterr()
    assert main(["predict", str(run / "model"), f"npz:{small_npz}", "--noise-frame", "12",
                 "--seed", "3", "--out", str(tmp_path / "p"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "DeepConvRFM" in out and f"accuracy {100 * test_acc:.2f}%" in out


# --------------------------------------------------------------------------------------------
# Trust: files it cannot read, writes that fail, flags without effect, messages in flags
# --------------------------------------------------------------------------------------------
def _files(root) -> dict:
    """Every file under ``root`` (temporary ones included) by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()} if root.exists() else {}


def test_fit_refuses_an_npz_without_its_keys_or_a_text_file_in_one_line(tmp_path, capsys):
    wrong, text = tmp_path / "wrong.npz", tmp_path / "text.npz"
    np.savez(wrong, pixels=np.zeros((4, 8, 8)), targets=np.arange(4))
    text.write_text("label,pixel0\n3,0.5\n")
    for path, said in (
            (wrong, f"{wrong}: expected keys X_train and y_train (or x_train, or images and "
                    "labels), optionally X_test and y_test; found ['pixels', 'targets']"),
            (text, f"{text} is not an .npz archive (a zip of .npy arrays): it starts with "
                   "b'label,'")):
        out = tmp_path / f"run-{path.stem}"
        assert main(["fit", "--dataset", f"npz:{path}", "--out", str(out), "--quiet"]) == 2
        assert capsys.readouterr().err == f"ray-convrfm: error: {said}\n"
        assert not out.exists()


def test_a_failed_write_of_the_results_leaves_the_earlier_run_or_nothing(tmp_path, small_npz,
                                                                        capsys, monkeypatch):
    """The disk fills while model.safetensors is written (safetensors' own error, no OSError)
    or while metrics.parquet is: status 2, one line naming the file, and --out holds what it
    held before, byte for byte: nothing in a new one, the earlier run after --overwrite."""
    import errno

    import pyarrow.parquet as pq
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk_tensors(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    real_write_table = pq.write_table

    def full_disk_table(table, where, **kwargs):
        with open(where, "wb") as fh:
            fh.write(b"PAR1")
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    fit = ["fit", "--dataset", f"npz:{small_npz}", "--n-train", "60", "--n-test", "20",
           "--depth", "2", "--iters", "1", "--agop-samples", "10", "--out", str(out), "--quiet"]
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full_disk_tensors)
        assert main(fit) == 2
    capsys.readouterr()
    assert main(fit) == 0  # nothing of the failed run was in the way
    earlier = _files(out)
    assert {"model/config.json", "model/model.safetensors", "summary.json",
            "metrics.parquet"} <= set(earlier)
    for patched, attribute, writer, name in (
            (safetensors.torch, "save_file", full_disk_tensors, "model/model.safetensors"),
            (pq, "write_table", full_disk_table, "metrics.parquet")):
        with monkeypatch.context() as m:
            m.setattr(patched, attribute, writer)
            assert main([*fit, "--overwrite"]) == 2
        assert capsys.readouterr().err == (
            f"ray-convrfm: error: [Errno 28] No space left on device: '{out / name}'\n")
        assert _files(out) == earlier
    assert pq.write_table is real_write_table
    fresh = tmp_path / "fresh"
    with monkeypatch.context() as m:
        m.setattr(pq, "write_table", full_disk_table)
        assert main([*fit[:-3], "--out", str(fresh), "--quiet"]) == 2
    assert "metrics.parquet'" in capsys.readouterr().err
    assert _files(fresh) == {}  # the model written before it is not left either


_FIT_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from ray_convrfm.tools import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.exit(cli.main(sys.argv[2:]))
"""


def test_fit_under_a_file_size_limit_reports_the_file_and_leaves_nothing(tmp_path, small_npz):
    """The real command with RLIMIT_FSIZE below the model's size: status 2, one line naming
    model.safetensors, nothing in --out."""
    import subprocess
    import sys

    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-c", _FIT_UNDER_A_FILE_SIZE_LIMIT, "20000", "fit",
                          "--dataset", f"npz:{small_npz}", "--depth", "2", "--iters", "1",
                          "--agop-samples", "10", "--engine", "torch", "--out", str(out),
                          "--quiet"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        f"ray-convrfm: error: [Errno 27] File too large: '{out / 'model' / 'model.safetensors'}'"]
    assert _files(out) == {}


def test_flags_without_effect_together_are_refused_naming_both(tmp_path, small_npz, capsys):
    """--address without --workers and --centers with --solver exact, before any work."""
    out = tmp_path / "run"
    fit = ["fit", "--dataset", f"npz:{small_npz}", "--out", str(out), "--quiet"]
    assert main([*fit, "--address", "auto"]) == 2
    assert capsys.readouterr().err == (
        "ray-convrfm: error: --address auto has no effect with --workers 0 (the work runs in "
        "this process); pass --workers N to run on N Ray workers of that cluster, or no "
        "--address\n")
    assert main([*fit, "--centers", "50", "--solver", "exact"]) == 2
    assert capsys.readouterr().err == (
        "ray-convrfm: error: --centers 50 has no effect with --solver exact (it solves over "
        "every training image); pass --solver nystrom or --solver nystrom-direct with "
        "centers, or no --centers\n")
    assert not out.exists()
    assert main(["predict", str(out / "model"), f"npz:{small_npz}", "--address", "auto",
                 "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.startswith(
        "ray-convrfm: error: --address auto has no effect with --workers 0")
    assert main(["convert", f"npz:{small_npz}", str(tmp_path / "pq"), "--address", "auto"]) == 2
    assert capsys.readouterr().err.startswith(
        "ray-convrfm: error: --address auto has no effect with no --workers (the conversion "
        "runs in this process)")
    assert not (tmp_path / "p").exists() and not (tmp_path / "pq").exists()


def test_the_apis_keywords_are_said_in_flags(tmp_path, small_npz, capsys):
    """The Python API names keywords (overwrite=True); the command line says its flags."""
    from ray_convrfm.tools.outputs import in_flags

    assert in_flags("pass overwrite=True, follow_symlinks=True or download=True") == \
        "pass --overwrite, --follow-symlinks or --download"
    assert in_flags("lower workers=2 or gpus_per_worker=1, or raise placement_timeout_s=600"
                    ", or join a larger cluster with address=...") == \
        "lower --workers 2 or --gpus-per-worker 1, or raise --placement-timeout 600, or join " \
        "a larger cluster with --address ..."
    assert in_flags("resize them (size=(H, W)); store=PATH; solver='nystrom'") == \
        "resize them (--resize HxW); --store PATH; --solver nystrom"
    for kept in ("e.g. Options.of(workers=2)", "/data/workers=2/a.npz", "2 workers lost",
                 "``workers=0``"):
        assert in_flags(kept) == kept
    data = tmp_path / "pq"
    convert = ["convert", f"npz:{small_npz}", str(data), "--quiet"]
    assert main(convert) == 0
    assert main(convert) == 2
    err = capsys.readouterr().err
    assert err.endswith("; pass --overwrite\n") and "overwrite=True" not in err


def test_fit_on_a_store_whose_disk_fills_mid_run_reports_it_in_one_line(tmp_path, small_npz,
                                                                       capsys, monkeypatch):
    """The disk under --store fills after the first kernel (zarr's write fails with a bare
    ENOSPC): status 2, one line naming the kernel's array in the store and the block, and no
    results in --out."""
    import errno

    from damaged_files import failing_after_first_kernel

    from ray_convrfm.tools.outputs import RESULTS

    out, store = tmp_path / "run", tmp_path / "kernels.zarr"
    roots = failing_after_first_kernel(monkeypatch, "K/c/", errno.ENOSPC)
    assert main(["fit", "--dataset", f"npz:{small_npz}", "--n-train", "60", "--n-test", "20",
                 "--depth", "2", "--iters", "2", "--agop-samples", "10", "--store", str(store),
                 "--out", str(out), "--quiet"]) == 2
    assert len(roots) == 2 and roots[1].startswith(f"{store}/K-")
    assert capsys.readouterr().err == (
        "ray-convrfm: error: [Errno 28] No space left on device (writing block (0, 0) of the "
        f"kernel store): '{roots[1]}/K'\n")
    assert not any((out / name).exists() for name in RESULTS)


def test_fit_on_a_parquet_set_with_a_corrupted_page_names_the_file_and_row_group(tmp_path,
                                                                                 small_npz,
                                                                                 capsys):
    """Bytes flipped inside a data page of one shard (pyarrow: "Corrupt snappy compressed
    data.", naming nothing): status 2, one line naming the file and the row group."""
    from damaged_files import corrupt_page

    data = tmp_path / "pq"
    assert main(["convert", f"npz:{small_npz}", str(data), "--rows-per-group", "16",
                 "--rows-per-file", "64", "--quiet"]) == 0
    shard = (data / "train" / "part-1.parquet").resolve()
    corrupt_page(shard, row_group=2)
    capsys.readouterr()
    assert main(["fit", "--dataset", f"parquet:{data}", "--iters", "1", "--depth", "2",
                 "--agop-samples", "10", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"ray-convrfm: error: {shard}: row group 2 cannot be read, the file is damaged: "
        "Corrupt snappy compressed data.\n")
