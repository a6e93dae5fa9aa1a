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
               "--noise-frame", "12", "--layers", "2", "--width", "4", "--depth", "3",
               "--iters", "2", "--agop-samples", "10", "--out", str(out), "--quiet"])
    assert rc == 0
    assert "layer 1 (kernel depth 2)" in capsys.readouterr().out
    table = pq.read_table(out / "metrics.parquet").to_pydict()
    assert table["layer"] == [0, 0, 1, 1] and table["iter"] == [0, 1, 0, 1]
    assert sum(table["chosen"]) == 2
    assert (out / "model" / "final" / "config.json").exists()


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
    with pytest.raises(SystemExit, match="--resize works with parquet"):
        main(["fit", "--dataset", f"npz:{small_npz}", "--resize", "10x10"])


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
