"""``fit --dataset hf:/folder:/imagenet:`` read in place, and ``convert`` from them (in process)."""

import json

from image_files import digit_pixels, encoded, write_hf, write_tree

from ray_convrfm.data.parquet import ParquetImages, open_parquet_dataset
from ray_convrfm.tools.cli import main


def _imagenet_like(root):
    """train/<class>/*.png (digits, 8x8 grey) and a flat val/ labelled by LOC_val_solution.csv."""
    pixels, labels = digit_pixels(150, seed=4)
    train, val = slice(0, 120), slice(120, 150)
    write_tree(root, "train", {f"n0{c}": [encoded(p) for p, y in zip(
        pixels[train], labels[train], strict=True) if y == c] for c in range(10)})
    (root / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for k, (p, y) in enumerate(zip(pixels[val], labels[val], strict=True)):
        (root / "val" / f"ILSVRC2012_val_{k:08d}.png").write_bytes(encoded(p))
        lines.append(f"ILSVRC2012_val_{k:08d},n0{y} 0 0 7 7")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return pixels, labels


def test_fit_reads_a_folder_tree_and_hf_shards_in_place(tmp_path, capsys):
    pixels, labels = _imagenet_like(tmp_path / "tree")
    out = tmp_path / "run"
    assert main(["fit", "--dataset", f"imagenet:{tmp_path / 'tree'}", "--channels", "1",
                 "--iters", "1", "--depth", "2", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 120 and summary["n_test"] == 30  # val/ reported on
    assert summary["dataset"] == "tree" and summary["test_acc"] > 0.5
    capsys.readouterr()  # predict reads val/ in place and scores it as the fit reported
    assert main(["predict", str(out / "model"), f"imagenet:{tmp_path / 'tree'}", "--split",
                 "val", "--channels", "1", "--out", str(tmp_path / "preds"), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert f"accuracy {100 * summary['test_acc']:.2f}% (" in said and "of 30 images" in said

    rows = [(encoded(p), int(y)) for p, y in zip(pixels, labels, strict=True)]
    write_hf(tmp_path / "hf", "train", rows[:100], shards=2, row_group_size=10)
    write_hf(tmp_path / "hf", "validation", rows[100:130], shards=1)
    write_hf(tmp_path / "hf", "test", [(b, -1) for b, _ in rows[130:]], shards=1)  # no labels
    out = tmp_path / "run-hf"
    assert main(["fit", "--dataset", f"hf:{tmp_path / 'hf'}", "--resize", "10x10",
                 "--channels", "1", "--n-train", "80", "--iters", "1", "--depth", "2",
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 80 and summary["n_test"] == 30  # validation, not test
    assert json.loads((out / "model" / "config.json").read_text())["image_shape"] == [1, 10, 10]
    capsys.readouterr()
    assert main(["predict", str(out / "model"), f"hf:{tmp_path / 'hf'}", "--split",
                 "validation", "--resize", "10x10", "--channels", "1", "--out",
                 str(tmp_path / "preds-hf"), "--quiet"]) == 0
    assert f"accuracy {100 * summary['test_acc']:.2f}% (" in capsys.readouterr().out
    assert main(["fit", "--dataset", f"hf:{tmp_path / 'hf'}", "--test-split", "test",
                 "--iters", "1", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "label(s) outside classes (labels are >= 0)" in capsys.readouterr().err


def test_convert_a_tree_with_a_flat_val(tmp_path, capsys):
    pixels, labels = _imagenet_like(tmp_path / "tree")
    assert main(["convert", f"imagenet:{tmp_path / 'tree'}", str(tmp_path / "pq"),
                 "--size", "6x6", "--resize-mode", "crop", "--rows-per-file", "50",
                 "--quiet"]) == 0
    assert "images/s" in capsys.readouterr().out
    m = open_parquet_dataset(tmp_path / "pq")
    assert (m.channels, m.height, m.width) == (1, 6, 6)  # the first image's channels
    assert m.rows("train") == 120 and m.rows("val") == 30
    X, y = ParquetImages.open(tmp_path / "pq", "val").read()
    assert X.shape == (30, 1, 6, 6) and sorted(y.tolist()) == sorted(labels[120:].tolist())
    assert main(["convert", f"hf:{tmp_path / 'nothing'}", str(tmp_path / "pq2")]) == 2
    assert "no Hugging Face style parquet shards" in capsys.readouterr().err
