"""Conversion of folder trees and Hugging Face shards to the project's layout, one output file
per task (data.conversion; here in process, on Ray in test_ondisk.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from image_files import encoded, reference, write_hf, write_tree
from PIL import Image

from ray_convrfm.data import parquet_io as pio
from ray_convrfm.data.folder_tree import FolderImages
from ray_convrfm.data.parquet import ParquetImages, convert, load_parquet, open_parquet_dataset

WNIDS = ("n01", "n02", "n03")


def _tree(root, rng, per_class: int = 4, val: int = 5):
    """train/<class>/*.JPEG of varying sizes and a flat val/ labelled by val.txt."""
    files = {}
    for wnid in WNIDS:
        items = [encoded(rng.integers(0, 256, (int(rng.integers(9, 20)), int(rng.integers(9, 20)),
                                               3), dtype=np.uint8), "JPEG")
                 for _ in range(per_class)]
        files.update(write_tree(root, "train", {wnid: items}, ".JPEG"))
    (root / "val").mkdir()
    lines = []
    for k in range(val):
        data = encoded(rng.integers(0, 256, (11, 13), dtype=np.uint8), "PNG")  # grey
        (root / "val" / f"v{k}.png").write_bytes(data)
        files[f"val/v{k}.png"] = data
        lines.append(f"v{k}.png {WNIDS[k % 3]}")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    return files


def test_tree_to_the_layout_in_process(tmp_path, rng, monkeypatch):
    files = _tree(tmp_path / "tree", rng)
    opened = []
    real_open, real_write = Image.open, pio.write_part

    def count_open(*args, **kwargs):
        opened.append(1)
        return real_open(*args, **kwargs)

    before_first_file = []

    def write_part(*args, **kwargs):
        before_first_file.append(len(opened))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(Image, "open", count_open)
    monkeypatch.setattr(pio, "write_part", write_part)
    out = convert(f"imagenet:{tmp_path / 'tree'}", tmp_path / "out", size=(8, 8), channels=3,
                  resize="crop", rows_per_file=5, rows_per_group=2, shuffle_seed=None)
    assert before_first_file[0] == 1  # the first image's header only: no pass over them all
    m = open_parquet_dataset(out)
    assert m.classes == WNIDS and (m.channels, m.height, m.width) == (3, 8, 8)
    assert m.rows("train") == 12 and m.rows("val") == 5
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["files"] == {"train": ["part-0.parquet", "part-1.parquet", "part-2.parquet"],
                             "val": ["part-0.parquet"]}
    assert [g.num_rows for g in m.groups["train"]] == [2, 2, 1, 2, 2, 1, 2]
    assert not (tmp_path / "out" / pio.PENDING_FILE).exists()
    for split in ("train", "val"):
        source = FolderImages.open(tmp_path / "tree", split, size=(8, 8), shuffle_seed=None)
        X, y = ParquetImages.open(out, split).read(dtype="uint8")
        want = np.stack([reference(files[f], 3, (8, 8)) for f in source.files.to_pylist()])
        np.testing.assert_array_equal(X, want)  # PNG: what the tree reads, exactly
        np.testing.assert_array_equal(y, source.labels())


def test_hf_to_the_layout_keeps_images_in_the_wanted_form(tmp_path, rng, capsys):
    same = [(encoded(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)), k % 2) for k in range(9)]
    write_hf(tmp_path / "hf", "train", same, shards=2, row_group_size=3, names=["a", "b"])
    write_hf(tmp_path / "hf", "test", [(b, -1) for b, _ in same[:2]], shards=1)
    with pytest.raises(ValueError, match=r"test-00000-of-00001\.parquet \(split 'test'\), row "
                                         r"group 0: 2 label\(s\) outside the 2 classes"):
        convert(f"hf:{tmp_path / 'hf'}", tmp_path / "out")
    assert not (tmp_path / "out" / "train").exists() or not any(
        (tmp_path / "out" / "train").iterdir())  # a failed conversion leaves no files
    out = convert(f"hf:{tmp_path / 'hf'}", tmp_path / "out", splits=["train"], rows_per_file=4,
                  progress=True)
    assert "convert hf" in capsys.readouterr().err  # the bar
    table = pq.read_table(tmp_path / "out" / "train")
    assert table.column("image").to_pylist() == [b for b, _ in same]  # byte for byte
    assert load_parquet(out).classes == ("a", "b")


def test_a_failed_conversion_leaves_nothing_in_the_way(tmp_path, rng):
    _tree(tmp_path / "tree", rng)
    bad = tmp_path / "tree" / "train" / "n03" / "0002.JPEG"
    good = bad.read_bytes()
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(ValueError, match=r"n03/0002\.JPEG: not a readable image"):
        convert(f"folder:{tmp_path / 'tree'}", tmp_path / "out", size=(8, 8), channels=3,
                rows_per_file=3)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == []
    bad.write_bytes(good)
    out = convert(f"folder:{tmp_path / 'tree'}", tmp_path / "out", size=(8, 8), channels=3,
                  rows_per_file=3)
    assert open_parquet_dataset(out).rows("train") == 12  # no overwrite needed


def test_mixed_sizes_need_size_and_channels_follow_the_first_image(tmp_path, rng):
    _tree(tmp_path / "tree", rng)
    with pytest.raises(ValueError, match=r"image is \d+x\d+ with 3 channel\(s\), but the first "
                                         r"image .*n01/0000\.JPEG is \d+x\d+ with 3; pass "
                                         r"size=\(H, W\)"):
        convert(f"folder:{tmp_path / 'tree'}", tmp_path / "out")
    with pytest.raises(ValueError, match=r"val/v\d\.png: image is 11x13 with 1 channel\(s\)"):
        convert(f"folder:{tmp_path / 'tree'}", tmp_path / "out", size=(8, 8))  # grey val
    out = convert(f"folder:{tmp_path / 'tree'}", tmp_path / "out", size=(8, 8), channels=1)
    assert load_parquet(out).X_train.shape == (12, 1, 8, 8)
