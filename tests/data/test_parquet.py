"""ray_convrfm.data.parquet: image codecs, the shard layout, row-group reads, conversion."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_convrfm.data import parquet
from ray_convrfm.data.datasets import ImageDataset, load_digits
from ray_convrfm.data.parquet import (
    GroupSlice,
    ParquetManifest,
    convert,
    decode_image,
    encode_image,
    load_parquet,
    open_parquet_dataset,
    read_rows,
    write_parquet_dataset,
)

QUANT_ATOL = 1 / 510 + 1e-6


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _smooth_image(c: int, h: int = 24, w: int = 32) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    planes = [0.5 + 0.4 * np.sin(2 * yy + k) * np.cos(3 * xx - k) for k in range(c)]
    return np.stack(planes).astype(np.float32)


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_digits()


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory, digits) -> Path:
    out = tmp_path_factory.mktemp("pq") / "digits"
    write_parquet_dataset(digits, out, rows_per_group=100, rows_per_file=500)
    return out


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [1, 3])
def test_png_round_trip_is_exact_for_8bit_images(rng, c):
    x = rng.integers(0, 256, size=(c, 9, 13)).astype(np.float32) / np.float32(255)
    data = encode_image(x, "png")
    assert data.startswith(b"\x89PNG")
    back = decode_image(data, channels=c)
    assert back.dtype == np.float32 and back.shape == (c, 9, 13)
    np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize("c", [1, 3])
def test_jpeg_round_trip_is_close_on_smooth_images(c):
    x = _smooth_image(c)
    data = encode_image(x, "jpeg", quality=95)
    assert data.startswith(b"\xff\xd8\xff")
    back = decode_image(data, channels=c)
    assert back.shape == x.shape
    assert np.abs(back - x).max() < 0.1


def test_decode_converts_mode_and_resizes():
    rgb = _smooth_image(3, 10, 14)
    data = encode_image(rgb)
    grey = decode_image(data, channels=1)
    assert grey.shape == (1, 10, 14)
    small = decode_image(data, channels=3, size=(5, 7))
    assert small.shape == (3, 5, 7) and small.min() >= 0 and small.max() <= 1
    with pytest.raises(ValueError, match="channels must be 1"):
        decode_image(data, channels=2)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(b"not an image", channels=1)


@pytest.mark.parametrize("bad", [np.nan, 1.2, -0.1])
def test_encode_refuses_unrepresentable_pixels(bad):
    x = np.full((1, 4, 4), 0.5, dtype=np.float32)
    x[0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode_image(x)


# --------------------------------------------------------------------------------------------
# Write / open / read
# --------------------------------------------------------------------------------------------
def test_write_layout_and_manifest(digits, digits_dir):
    meta = json.loads((digits_dir / "dataset.json").read_text())
    assert meta["format"] == "ray_convrfm-parquet" and meta["version"] == 1
    assert (meta["channels"], meta["height"], meta["width"]) == (1, 8, 8)
    assert meta["splits"] == {"train": 1500, "test": 297}
    assert meta["classes"] == list(digits.classes) and meta["encoding"] == "png"
    assert sorted(p.name for p in (digits_dir / "train").iterdir()) == [
        f"part-{k}.parquet" for k in range(3)
    ]
    assert [p.name for p in (digits_dir / "test").iterdir()] == ["part-0.parquet"]
    schema = pq.read_schema(digits_dir / "train" / "part-0.parquet")
    assert schema.field("image").type == pa.binary() and schema.field("label").type == pa.int64()

    m = open_parquet_dataset(digits_dir)
    assert m.rows("train") == 1500 and m.rows("test") == 297
    assert [g.num_rows for g in m.groups["train"]] == [100] * 15
    assert [g.num_rows for g in m.groups["test"]] == [100, 100, 97]
    assert [Path(g.file).name for g in m.groups["train"][4:6]] == ["part-0.parquet",
                                                                  "part-1.parquet"]
    assert [(g.index) for g in m.groups["train"][4:6]] == [4, 0]
    assert m.groups_for("train", 130, 260) == [
        GroupSlice(m.groups["train"][1].file, 1, 30, 100),
        GroupSlice(m.groups["train"][2].file, 2, 0, 60),
    ]
    last = m.groups_for("train", 450, 1500)
    assert (last[0].index, last[0].start) == (4, 50) and len(last) == 11
    assert m.groups_for("test", 5, 5) == []
    with pytest.raises(ValueError, match="out of range"):
        m.groups_for("train", 10, 1501)
    with pytest.raises(ValueError, match="unknown split"):
        m.rows("validation")
    assert pickle.loads(pickle.dumps(m)).rows("train") == 1500  # ships to Ray workers


def test_load_parquet_round_trip(digits, digits_dir):
    back = load_parquet(digits_dir)
    assert back.name == "digits" and back.classes == digits.classes
    np.testing.assert_allclose(back.X_train, digits.X_train, rtol=0, atol=QUANT_ATOL)
    np.testing.assert_allclose(back.X_test, digits.X_test, rtol=0, atol=QUANT_ATOL)
    np.testing.assert_array_equal(back.y_train, digits.y_train)
    np.testing.assert_array_equal(back.y_test, digits.y_test)
    assert back.y_train.dtype == np.int64


class _ReadLog(pafs.FSSpecHandler):
    """The local file system, logging ``(file, offset, size)`` of every read."""

    def __init__(self):
        super().__init__(fsspec.filesystem("file"))
        self.reads: list[tuple[str, int, int]] = []

    def open_input_file(self, path):
        log, f = self.reads, self.fs.open(path, "rb")

        class Logged:
            def read(self, n=-1):
                pos, data = f.tell(), f.read(n)
                log.append((path, pos, len(data)))
                return data

            def __getattr__(self, name):
                return getattr(f, name)

        return pa.PythonFile(Logged(), mode="r")

    def groups_read(self) -> list[tuple[str, int]]:
        """(file name, row group) of the row groups whose bytes were read; reads that end at
        the end of a file are footer reads and ignored."""
        hit = set()
        for path, offset, n in self.reads:
            md = pq.ParquetFile(path).metadata
            if offset + n == os.path.getsize(path):
                continue
            for i in range(md.num_row_groups):
                cols = [md.row_group(i).column(j) for j in range(md.row_group(i).num_columns)]
                starts = [c.dictionary_page_offset if c.has_dictionary_page
                          else c.data_page_offset for c in cols]
                lo = min(starts)
                hi = max(a + c.total_compressed_size for a, c in zip(starts, cols, strict=True))
                if offset < hi and lo < offset + n:
                    hit.add((Path(path).name, i))
        return sorted(hit)


def test_read_rows_reads_only_covering_row_groups(digits_dir):
    full = load_parquet(digits_dir)
    log = _ReadLog()
    m = dataclasses.replace(open_parquet_dataset(digits_dir), filesystem=pafs.PyFileSystem(log))

    X, y = read_rows(m, "train", 130, 260)
    assert log.groups_read() == [("part-0.parquet", 1), ("part-0.parquet", 2)]  # nothing else
    assert X.shape == (130, 1, 8, 8) and X.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(X, full.X_train[130:260])
    np.testing.assert_array_equal(y, full.y_train[130:260])

    log.reads.clear()
    X, y = read_rows(m, "train", 495, 505)  # straddles two files
    assert log.groups_read() == [("part-0.parquet", 4), ("part-1.parquet", 0)]
    np.testing.assert_array_equal(y, full.y_train[495:505])
    np.testing.assert_array_equal(read_rows(str(digits_dir), "train", 495, 505)[1], y)

    log.reads.clear()
    X, y = read_rows(m, "test", 7, 7)
    assert log.reads == [] and X.shape == (0, 1, 8, 8)

    X, _ = read_rows(m, "test", 0, 3, size=(12, 10))
    assert X.shape == (3, 1, 12, 10)


def test_write_refuses_bad_pixels_and_existing_output(tmp_path, digits):
    small = digits.subset(20, 0)
    for bad in (np.nan, 1.2):
        X = small.X_train.copy()
        X[7, 0, 3, 3] = bad
        ds = ImageDataset(X, small.y_train, small.X_test, small.y_test, "bad", small.classes)
        with pytest.raises(ValueError, match=r"X_train\[7\].*\[0, 1\]"):
            write_parquet_dataset(ds, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()  # checked before anything is written

    out = write_parquet_dataset(small, tmp_path / "ok", encoding="jpeg", rows_per_group=8)
    assert out == (tmp_path / "ok").resolve()
    assert not (tmp_path / "ok" / "test").exists()  # empty test split skipped
    m = open_parquet_dataset(out)
    assert m.rows("test") == 0 and m.encoding == "jpeg"
    assert [g.num_rows for g in m.groups["train"]] == [8, 8, 4]
    assert load_parquet(out).X_test.shape == (0, 1, 8, 8)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_parquet_dataset(small, out)
    write_parquet_dataset(small.subset(5, 0), out, overwrite=True)
    assert open_parquet_dataset(out).rows("train") == 5


def test_open_refuses_missing_or_wrong_metadata(tmp_path, digits_dir):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        open_parquet_dataset(empty)
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        read_rows(empty, "train", 0, 1)

    meta = json.loads((digits_dir / "dataset.json").read_text())
    for change, match in (
        ({"format": "other"}, "format must be"),
        ({"version": 2}, "unsupported version"),
        ({"splits": {"train": 1499, "test": 297}}, "should have 1499 rows"),
    ):
        (empty / "dataset.json").write_text(json.dumps({**meta, **change}))
        for p in (digits_dir / "train").iterdir():
            target = empty / "train" / p.name
            if not target.exists():
                target.write_bytes(p.read_bytes())
        with pytest.raises(ValueError, match=match):
            open_parquet_dataset(empty)


def test_huggingface_struct_column(tmp_path, rng):
    root = tmp_path / "hf"
    (root / "train").mkdir(parents=True)
    pixels = [rng.integers(0, 256, size=(6 + k, 5, 3), dtype=np.uint8) for k in range(4)]
    images = pa.array(
        [{"bytes": _png_bytes(p), "path": f"img{k}.png"} for k, p in enumerate(pixels)],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"image": images, "label": pa.array([3, 0, 2, 1], pa.int64())})
    pq.write_table(table, root / "train" / "train-00000-of-00001.parquet", row_group_size=3)
    (root / "dataset.json").write_text(json.dumps({
        "format": "ray_convrfm-parquet", "version": 1, "name": "hf", "channels": 3,
        "height": None, "width": None, "encoding": "png", "classes": list("abcd"),
        "splits": {"train": 4},
    }))
    m = open_parquet_dataset(root)
    assert m.rows("train") == 4 and [g.num_rows for g in m.groups["train"]] == [3, 1]
    with pytest.raises(ValueError, match="pass size"):
        read_rows(m, "train", 0, 4)
    X, y = read_rows(m, "train", 0, 1, size=(6, 5))
    np.testing.assert_array_equal(X[0], np.transpose(pixels[0], (2, 0, 1)) / np.float32(255))
    np.testing.assert_array_equal(y, [3])
    ds = load_parquet(root, size=(4, 4))
    assert ds.X_train.shape == (4, 3, 4, 4) and ds.classes == tuple("abcd")
    np.testing.assert_array_equal(ds.y_train, [3, 0, 2, 1])


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------
def _make_tree(root: Path, rng, h: int = 6, w: int = 5) -> dict[str, dict[bytes, int]]:
    """Two classes x 3 train images and 1 test image each; returns split -> {bytes: label}."""
    expected: dict[str, dict[bytes, int]] = {"train": {}, "test": {}}
    for split, n in (("train", 3), ("test", 1)):
        for label, cls in enumerate(("cat", "ant")[::-1]):  # "ant" sorts first -> label 0
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(n):
                data = _png_bytes(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
                (d / f"{k}.png").write_bytes(data)
                expected[split][data] = label
    return expected


def test_convert_folder_keeps_bytes_and_sorts_classes(tmp_path, rng):
    expected = _make_tree(tmp_path / "tree", rng)
    (tmp_path / "tree" / "train" / "ant" / "notes.txt").write_text("ignored")
    out = convert(f"folder:{tmp_path / 'tree'}", tmp_path / "out", rows_per_group=2)
    m = open_parquet_dataset(out)
    assert m.classes == ("ant", "cat") and m.name == "tree"
    assert (m.channels, m.height, m.width) == (3, 6, 5)
    assert m.rows("train") == 6 and m.rows("test") == 2
    for split in ("train", "test"):
        table = pq.read_table(tmp_path / "out" / split)
        stored = dict(zip(table.column("image").to_pylist(), table.column("label").to_pylist(),
                          strict=True))
        assert stored == expected[split]  # original PNG bytes, right labels
    ds = load_parquet(out)
    assert ds.X_train.shape == (6, 3, 6, 5) and sorted(ds.y_train) == [0, 0, 0, 1, 1, 1]

    # DIR without train/test: DIR itself is the train split.
    flat = convert(f"folder:{tmp_path / 'tree' / 'train'}", tmp_path / "flat",
                   shuffle_seed=None)
    flat_ds = load_parquet(flat)
    np.testing.assert_array_equal(flat_ds.y_train, [0, 0, 0, 1, 1, 1])
    assert flat_ds.X_test.shape[0] == 0


def test_convert_folder_size_mismatch(tmp_path, rng):
    _make_tree(tmp_path / "tree", rng)
    odd = tmp_path / "tree" / "test" / "cat" / "odd.png"
    odd.write_bytes(_png_bytes(rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"odd\.png.*7x5") as info:
        convert(f"folder:{tmp_path / 'tree'}", tmp_path / "out")
    assert "size=(H, W)" in str(info.value)
    assert not (tmp_path / "out" / "dataset.json").exists()

    out = convert(f"folder:{tmp_path / 'tree'}", tmp_path / "out", size=(4, 4), channels=1,
                  encoding="jpeg")
    ds = load_parquet(out)
    assert ds.X_train.shape == (6, 1, 4, 4) and ds.X_test.shape == (3, 1, 4, 4)


def test_convert_dataset_spec(tmp_path, digits):
    np.savez(tmp_path / "d.npz", X_train=digits.X_train[:30], y_train=digits.y_train[:30])
    out = convert(f"npz:{tmp_path / 'd.npz'}", tmp_path / "out", rows_per_group=16)
    back = load_parquet(out)
    np.testing.assert_allclose(back.X_train, digits.X_train[:30], rtol=0, atol=QUANT_ATOL)
    np.testing.assert_array_equal(back.y_train, digits.y_train[:30])
    resized = load_parquet(convert("digits", tmp_path / "big", size=(12, 12), name="d12"))
    assert resized.name == "d12" and resized.X_train.shape == (1500, 1, 12, 12)
    with pytest.raises(ValueError, match="folder:DIR"):
        convert("nonsense", tmp_path / "x")


def test_fsspec_url_round_trip(digits):
    pytest.importorskip("fsspec")
    small = digits.subset(40, 10)
    url = "memory://ray-convrfm-test/digits"
    assert write_parquet_dataset(small, url, rows_per_group=16, overwrite=True) == url
    m = open_parquet_dataset(url)
    assert isinstance(m, ParquetManifest) and m.rows("train") == 40
    X, y = read_rows(m, "train", 10, 20)
    np.testing.assert_allclose(X, small.X_train[10:20], rtol=0, atol=QUANT_ATOL)
    np.testing.assert_array_equal(y, small.y_train[10:20])


def test_module_exports():
    assert set(parquet.__all__) <= set(dir(parquet))


def test_validation_split_holds_out_whole_row_groups(tmp_path):
    from ray_convrfm.data.datasets import load_digits
    from ray_convrfm.data.parquet import ParquetImages, ParquetRows, write_parquet_dataset
    from ray_convrfm.data.split import ranges_of, split_validation

    ds = load_digits()
    path = write_parquet_dataset(ds, tmp_path / "d", rows_per_group=50, rows_per_file=400)
    images = ParquetImages.open(path, "train", limit=1000)
    assert len(images) == 1000 and images.shape == (1000, 1, 8, 8)
    np.testing.assert_array_equal(images.labels(), ds.y_train[:1000])
    labels = images.labels()
    assert images.holdout_units() == [50] * 20  # the row groups
    fit_idx, val_idx = split_validation(labels, np.unique(labels), 0.1, 0,
                                        images.holdout_units())
    fit, val = ranges_of(fit_idx), ranges_of(val_idx)
    assert sorted([*fit_idx, *val_idx]) == list(range(1000))  # a partition of the rows
    assert all(a % 50 == 0 and (b % 50 == 0 or b == 1000) for a, b in val)  # whole groups
    assert sum(b - a for a, b in val) == 100
    again = split_validation(labels, np.unique(labels), 0.1, 0, images.holdout_units())
    np.testing.assert_array_equal(again[1], val_idx)  # seeded

    part = ParquetRows(images, tuple(fit)).slice(10, 130)  # what one worker is given
    expected = np.concatenate([np.arange(a, b) for a, b in fit])[10:130]
    pixels = part.load()  # the stored 8-bit pixels: a quarter of float32's bytes
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, images.read(dtype="uint8")[0][expected])
    as_float = images.read()[0][expected]
    np.testing.assert_array_equal(pixels.astype(np.float32) / np.float32(255), as_float)
    np.testing.assert_array_equal(ParquetRows(images, tuple(fit), "float32").slice(10, 130)
                                  .load(), as_float)


# --------------------------------------------------------------------------------------------
# Trust: what overwrite deletes, labels outside the classes, links out of a folder
# --------------------------------------------------------------------------------------------
def test_overwrite_deletes_only_the_files_the_manifest_names(tmp_path, digits):
    """A set's dataset.json records its files; overwriting deletes those and nothing else in
    the split folders (another *.parquet file there, a note, a file a manifest names by a path
    leading outside), and the files it does not name are not read either."""
    out = tmp_path / "set"
    write_parquet_dataset(digits.subset(30, 10), out, rows_per_file=10, rows_per_group=5)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["files"] == {"train": ["part-0.parquet", "part-1.parquet", "part-2.parquet"],
                             "test": ["part-0.parquet"]}
    foreign = {out / "train" / "mine.parquet": pq.read_table(out / "train" / "part-0.parquet"),
               out / "test" / "extra.parquet": pq.read_table(out / "test" / "part-0.parquet")}
    for path, table in foreign.items():
        pq.write_table(table, path)  # someone else's files, in the layout's own format
    (out / "train" / "NOTES.txt").write_text("keep me")
    victim = tmp_path / "victim.parquet"
    victim.write_bytes(b"not the writer's")
    meta["files"]["train"].append("../../victim.parquet")  # a manifest cannot point outside
    (out / "dataset.json").write_text(json.dumps(meta))

    write_parquet_dataset(digits.subset(15, 0), out, rows_per_file=10, rows_per_group=5,
                          overwrite=True)
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "NOTES.txt", "mine.parquet", "part-0.parquet", "part-1.parquet"]  # part-2 was ours
    assert [p.name for p in (out / "test").iterdir()] == ["extra.parquet"]  # part-0 was ours
    assert (out / "train" / "NOTES.txt").read_text() == "keep me"
    assert victim.read_bytes() == b"not the writer's"
    for path, table in foreign.items():
        assert pq.read_table(path).equals(table)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["files"] == {"train": ["part-0.parquet", "part-1.parquet"]}
    assert not (out / "_writing.json").exists()
    back = load_parquet(out)  # the foreign files in the folders are not part of the set
    assert back.X_train.shape[0] == 15 and back.X_test.shape[0] == 0
    np.testing.assert_array_equal(back.y_train, digits.y_train[:15])


def test_overwrite_refuses_to_replace_a_file_it_did_not_write(tmp_path, digits):
    """A file in the way of the new set that no manifest names is never replaced."""
    out = tmp_path / "set"
    (out / "train").mkdir(parents=True)
    theirs = pq.read_table(write_parquet_dataset(digits.subset(5, 0), tmp_path / "other")
                           / "train" / "part-0.parquet")
    pq.write_table(theirs, out / "train" / "part-0.parquet")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_parquet_dataset(digits.subset(20, 0), out)
    with pytest.raises(FileExistsError, match=r"train/part-0\.parquet, that overwrite does "
                                              r"not delete; no dataset\.json .* names them"):
        write_parquet_dataset(digits.subset(20, 0), out, overwrite=True)
    assert pq.read_table(out / "train" / "part-0.parquet").equals(theirs)
    assert not (out / "dataset.json").exists()


def test_overwrite_after_an_interrupted_write_removes_its_files(tmp_path, digits):
    """An interrupted write leaves files but no dataset.json; _writing.json, written first,
    names them, so overwrite replaces them (and still keeps files it never wrote)."""
    from ray_convrfm.data.parquet_io import encode_image, write_encoded

    out = tmp_path / "set"
    meta = {"name": "d", "channels": 1, "height": 8, "width": 8, "encoding": "png",
            "classes": [str(k) for k in range(10)]}
    image = encode_image(digits.X_train[0])

    def rows(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise KeyboardInterrupt  # Ctrl-C halfway
            yield image, i % 10

    with pytest.raises(KeyboardInterrupt):  # after pyarrow has written some of the files
        write_encoded(out, meta, {"train": (400, rows(400, fail_at=390))}, rows_per_file=10,
                      rows_per_group=5)
    assert not (out / "dataset.json").exists() and (out / "_writing.json").exists()
    left = {p.name for p in (out / "train").iterdir()}  # how many pyarrow flushed may vary
    assert left <= {f"part-{k}.parquet" for k in range(40)}
    (out / "train" / "keep.parquet").write_bytes(b"someone else's")
    write_encoded(out, meta, {"train": (12, rows(12))}, rows_per_file=10, rows_per_group=5,
                  overwrite=True)
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "keep.parquet", "part-0.parquet", "part-1.parquet"]
    assert (out / "train" / "keep.parquet").read_bytes() == b"someone else's"
    assert open_parquet_dataset(out).rows("train") == 12


@pytest.mark.parametrize("bad", [10, -1])
def test_labels_outside_the_manifest_classes_are_refused(tmp_path, bad):
    """dataset.json says 10 classes: a label 10 (or -1) in a file is an error naming the file,
    the split and the labels, wherever labels are read; not an 11th class."""
    from ray_convrfm.data.parquet import ParquetImages

    root = tmp_path / "set"
    (root / "train").mkdir(parents=True)
    image = _png_bytes(np.zeros((4, 4), np.uint8))
    labels = [0, 9, 3, bad, 2, bad]
    pq.write_table(pa.table({"image": pa.array([image] * 6, pa.binary()),
                             "label": pa.array(labels, pa.int64())}),
                   root / "train" / "part-0.parquet", row_group_size=3)
    (root / "dataset.json").write_text(json.dumps({
        "format": "ray_convrfm-parquet", "version": 1, "name": "t", "channels": 1,
        "height": 4, "width": 4, "encoding": "png", "classes": [str(k) for k in range(10)],
        "splits": {"train": 6}}))
    match = rf"part-0\.parquet \(split 'train'\), row group 1: 2 label\(s\) outside the 10 " \
            rf"classes \(0\.\.9\) of .*dataset\.json: \[{bad}\]"
    with pytest.raises(ValueError, match=match):
        read_rows(root, "train", 0, 6)
    with pytest.raises(ValueError, match=match):
        ParquetImages.open(root).labels()
    with pytest.raises(ValueError, match=match):
        load_parquet(root)
    X, y = read_rows(root, "train", 0, 3)  # the rows before are fine
    np.testing.assert_array_equal(y, [0, 9, 3])


def _outside_image(tmp_path: Path, rng) -> Path:
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(_png_bytes(rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)))
    return secret


def test_convert_folder_refuses_links_out_of_the_folder(tmp_path, rng):
    """folder:DIR reads no file outside DIR through a symbolic link (file or folder) unless
    follow_symlinks=True; links that stay inside DIR are read."""
    tree = tmp_path / "tree"
    _make_tree(tree, rng)
    secret = _outside_image(tmp_path, rng)
    (tree / "train" / "ant" / "copy.png").symlink_to(tree / "train" / "cat" / "0.png")
    out = convert(f"folder:{tree}", tmp_path / "inside", rows_per_group=2)
    assert open_parquet_dataset(out).rows("train") == 7  # a link inside the tree is fine

    link = tree / "train" / "ant" / "evil.png"
    link.symlink_to(secret)
    with pytest.raises(ValueError, match=r"evil\.png is a symbolic link to .*secret\.png, "
                                         r"outside the folder .*follow_symlinks=True"):
        convert(f"folder:{tree}", tmp_path / "out")
    assert not (tmp_path / "out" / "dataset.json").exists()
    out = convert(f"folder:{tree}", tmp_path / "out", follow_symlinks=True)
    table = pq.read_table(tmp_path / "out" / "train")
    assert secret.read_bytes() in table.column("image").to_pylist()

    link.unlink()
    (tree / "test" / "dog").symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(ValueError, match=r"test/dog is a symbolic link to .*elsewhere"):
        convert(f"folder:{tree}", tmp_path / "out2")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "ant").symlink_to(tree / "train" / "ant", target_is_directory=True)
    with pytest.raises(ValueError, match=r"flat/ant is a symbolic link"):
        convert(f"folder:{flat}", tmp_path / "out3")


def test_rows_from_a_middle_row_group_on_come_in_file_order(tmp_path):
    """pyarrow 26 splits a fragment of row groups 7 and 8 as 8, 7: read_rows reads each group
    by its id, so rows starting inside a later group are the file's rows in order."""
    ds = load_digits().subset(40, 297)
    m = parquet.open_parquet_dataset(write_parquet_dataset(ds, tmp_path / "d",
                                                           rows_per_group=20))
    whole = pq.read_table(tmp_path / "d" / "test" / "part-0.parquet").column("label")
    for start, stop in [(148, 212), (140, 161), (0, 297)]:
        X, y = read_rows(m, "test", start, stop, dtype="uint8")
        np.testing.assert_array_equal(y, whole.to_numpy()[start:stop])
        np.testing.assert_array_equal(X, np.round(ds.X_test[start:stop] * 255).astype(np.uint8))


def test_a_corrupted_page_is_refused_naming_the_file_and_row_group(tmp_path, digits):
    """Bytes flipped inside a data page: pyarrow's "Corrupt snappy compressed data." names no
    file; read_rows says which file and row group, as label and image errors do. The footer is
    intact, so the set opens and the other row groups still read."""
    from damaged_files import corrupt_page

    root = write_parquet_dataset(digits, tmp_path / "d", rows_per_group=100, rows_per_file=500)
    shard = root / "train" / "part-1.parquet"
    corrupt_page(shard, row_group=3)
    m = open_parquet_dataset(root)
    with pytest.raises(ValueError) as info:
        read_rows(m, "train", 0, m.rows("train"))
    assert str(info.value) == (f"{shard}: row group 3 cannot be read, the file is damaged: "
                               "Corrupt snappy compressed data.")
    with pytest.raises(ValueError, match=rf"{shard}: row group 3 cannot be read"):
        parquet.ParquetImages(m, "train").read([(820, 830)])
    np.testing.assert_array_equal(read_rows(m, "train", 700, 800)[1], digits.y_train[700:800])


class _FailingReads(pafs.FSSpecHandler):
    """The local file system, but a read starting at ``offset`` of file ``name`` fails with
    ``error`` (a disk's EIO, or a remote store's error without an errno)."""

    def __init__(self, name: str, offset: int, error: OSError):
        super().__init__(fsspec.filesystem("file"))
        self.name, self.offset, self.error = name, offset, error

    def open_input_file(self, path):
        f, handler = self.fs.open(path, "rb"), self

        class Failing:
            def read(self, n=-1):
                if path.endswith(handler.name) and f.tell() == handler.offset:
                    raise handler.error
                return f.read(n)

            def __getattr__(self, name):
                return getattr(f, name)

        return pa.PythonFile(Failing(), mode="r")


@pytest.mark.parametrize("error, said", [
    (OSError(5, "Input/output error"), "[Errno 5] Input/output error (reading row group 2): "
                                       "'{file}'"),
    (OSError("connection reset by peer"), "{file}: row group 2: connection reset by peer")])
def test_an_io_error_reading_a_row_group_stays_an_oserror_naming_it(digits_dir, error, said):
    """A read of a row group's bytes fails: an OSError still (with its errno), naming the file
    and the row group."""
    file = f"{open_parquet_dataset(digits_dir).root}/train/part-1.parquet"
    offset = pq.ParquetFile(file).metadata.row_group(2).column(0).data_page_offset
    m = dataclasses.replace(open_parquet_dataset(digits_dir), filesystem=pafs.PyFileSystem(
        _FailingReads("train/part-1.parquet", offset, error)))
    with pytest.raises(OSError) as info:
        read_rows(m, "train", 0, 1000)
    assert str(info.value) == said.format(file=file) and info.value.errno == error.errno
