"""Hugging Face style parquet shards read as they are held (data.hf_parquet, ParquetImages.open_hf):
a manifest from footers only, rows decoded and resized where they are read."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from image_files import digit_pixels, encoded, reference, write_hf

from ray_convrfm.data import images as img
from ray_convrfm.data.hf_parquet import open_hf_parquet
from ray_convrfm.data.parquet import ParquetImages


@pytest.fixture
def no_decoding(monkeypatch):
    """Counts images decoded in this process; any decode fails the manifest tests."""
    calls = []
    real = img.decode_uint8

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(img, "decode_uint8", counting)
    return calls


def _varied(rng, n: int) -> list[tuple[bytes, int]]:
    """Colour and grey PNGs and JPEGs of varying sizes, labels 0..2."""
    rows = []
    for k in range(n):
        h, w = int(rng.integers(9, 20)), int(rng.integers(9, 20))
        shape = (h, w) if k % 4 == 3 else (h, w, 3)
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        rows.append((encoded(pixels, "JPEG" if k % 3 == 0 else "PNG"), k % 3))
    return rows


def test_manifest_comes_from_footers_and_names_splits_by_file(tmp_path, rng, no_decoding):
    train, val = _varied(rng, 23), _varied(rng, 9)
    write_hf(tmp_path, "train", train, shards=3, row_group_size=4, names=["ant", "bee", "cat"])
    write_hf(tmp_path, "validation", val, shards=1, row_group_size=5,
             names=["ant", "bee", "cat"])
    write_hf(tmp_path, "test", [(b, -1) for b, _ in val[:4]], shards=1, subdir="")  # top level
    m = open_hf_parquet(tmp_path)
    assert sorted(m.groups) == ["test", "train", "validation"]
    assert m.classes == ("ant", "bee", "cat") and m.channels == 3
    assert m.rows("train") == 23 and m.rows("validation") == 9 and m.rows("test") == 4
    expected = []  # rows per row group, file by file, as pyarrow reports them
    for f in sorted((tmp_path / "data").glob("train-*.parquet")):
        meta = pq.ParquetFile(f).metadata
        expected += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert [g.num_rows for g in m.groups["train"]] == expected
    assert [g.file.rsplit("/", 1)[-1] for g in m.groups["validation"]] == [
        "validation-00000-of-00001.parquet"] * 2
    images = ParquetImages.open_hf(tmp_path, "validation", size=(8, 8))
    np.testing.assert_array_equal(images.labels(), [y for _, y in val])
    assert images.shape == (9, 3, 8, 8) and images.holdout_units() == [1] * 9  # 1% chunks
    assert no_decoding == []  # footers, labels: no image decoded (nor read)


def test_rows_equal_a_plain_decode_and_resize(tmp_path, rng, no_decoding):
    rows = _varied(rng, 17)
    write_hf(tmp_path, "train", rows, shards=2, row_group_size=3)
    for resize in ("crop", "stretch"):
        for channels in (3, 1):
            images = ParquetImages.open_hf(tmp_path, size=(10, 12), resize=resize,
                                           channels=channels)
            X, y = images.read(dtype="uint8")
            ref = np.stack([reference(b, channels, (10, 12), resize == "crop") for b, _ in rows])
            np.testing.assert_array_equal(X, ref)  # exact: the same decode, the same resize
            np.testing.assert_array_equal(y, [lab for _, lab in rows])
            Xf, _ = images.read([(2, 5), (11, 17)])
            want = ref[[*range(2, 5), *range(11, 17)]].astype(np.float32) / np.float32(255)
            np.testing.assert_array_equal(Xf, want)
    assert len(no_decoding) == 4 * 17 + 4 * 9  # decoded where read, once per row read
    # what a worker is sent: small, picklable, and loads its rows
    part = pickle.loads(pickle.dumps(images.rows([(0, 6), (9, 17)]).slice(4, 10)))
    np.testing.assert_array_equal(part.load(), ref[[4, 5, 9, 10, 11, 12]])


def test_plain_binary_columns_and_other_names(tmp_path, rng):
    pixels, labels = digit_pixels(12)
    rows = [(encoded(p), int(y)) for p, y in zip(pixels, labels, strict=True)]
    write_hf(tmp_path, "train", rows, shards=1, struct=False, subdir="", image_column="img",
             label_column="fine_label")
    with pytest.raises(ValueError, match=r"train-00000-of-00001\.parquet: parquet file needs "
                                         r"columns 'image' and 'label'"):
        ParquetImages.open_hf(tmp_path)
    images = ParquetImages.open_hf(tmp_path, channels=1, image_column="img",
                                   label_column="fine_label")
    assert images.shape == (12, 1, 8, 8) and images.manifest.classes == ()  # no names: any >= 0
    X, y = images.read(dtype="uint8")
    np.testing.assert_array_equal(X[:, 0], pixels)
    np.testing.assert_array_equal(y, labels)


def test_clear_errors_name_the_file(tmp_path, rng):
    good = _varied(rng, 6)
    with pytest.raises(ValueError, match="no Hugging Face style parquet shards"):
        open_hf_parquet(tmp_path)
    files = write_hf(tmp_path / "a", "train", good, shards=3)
    files[1].unlink()
    with pytest.raises(ValueError, match=r"split 'train' has 2 of its 3 shards; missing e\.g\. "
                                         r"train-00001-of-00003\.parquet"):
        open_hf_parquet(tmp_path / "a")

    # a missing label column, named with its file
    table = pq.read_table(write_hf(tmp_path / "b", "train", good, shards=1)[0])
    pq.write_table(table.drop_columns(["label"]), tmp_path / "b" / "data" /
                   "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"b/data/train-00000-of-00001\.parquet: parquet file "
                                         r"needs columns 'image' and 'label'; has \['image'\]"):
        ParquetImages.open_hf(tmp_path / "b", size=(8, 8))

    # mixed sizes without size=: refused where read, naming the row
    write_hf(tmp_path / "c", "train", good, shards=1, row_group_size=2)
    images = ParquetImages.open_hf(tmp_path / "c")
    h, w = reference(good[0][0], 3).shape[1:]
    assert images.shape == (6, 3, h, w)  # the first image's header gives the size
    with pytest.raises(ValueError, match=r"train-00000-of-00001\.parquet: row group 0, row 1: "
                                         rf"image is \d+x\d+, but the first image .* is {h}x{w}; "
                                         r"pass size=\(H, W\)"):
        images.read()

    # an unreadable image
    bad = [good[0], (b"\xff\xd8\xffnot a jpeg", 1), good[2]]
    write_hf(tmp_path / "d", "train", bad, shards=1)
    with pytest.raises(ValueError, match=r"train-00000-of-00001\.parquet: row group 0, row 1: "
                                         r"cannot decode image"):
        ParquetImages.open_hf(tmp_path / "d", size=(8, 8)).read()

    # labels outside the ClassLabel names (Hugging Face ImageNet's unlabelled test: -1)
    write_hf(tmp_path / "e", "test", [(b, -1) for b, _ in good], shards=1, names=["a", "b"])
    with pytest.raises(ValueError, match=r"6 label\(s\) outside the 2 classes \(0\.\.1\) of .*"
                                         r"test-00000-of-00001\.parquet \(Hugging Face "
                                         r"ClassLabel names\): \[-1\]"):
        ParquetImages.open_hf(tmp_path / "e", "test", size=(8, 8)).labels()


def test_a_folder_names_the_split_unless_the_file_is_a_numbered_shard(tmp_path, rng):
    rows = _varied(rng, 5)
    (tmp_path / "train").mkdir()
    for i in range(2):  # the refs/convert/parquet layout: train/0000.parquet
        table = pa.table({"image": pa.array([b for b, _ in rows[i::2]], pa.binary()),
                          "label": pa.array([y for _, y in rows[i::2]], pa.int64())})
        pq.write_table(table, tmp_path / "train" / f"{i:04d}.parquet")
    write_hf(tmp_path / "plain", "test", rows[:2], shards=1, subdir="")  # plain/test-00000-...
    m = open_hf_parquet(tmp_path)
    assert sorted(m.groups) == ["test", "train"] and m.rows("train") == 5
    assert m.rows("test") == 2


def test_a_corrupted_page_of_a_shard_names_the_file_and_row_group(tmp_path):
    """Bytes flipped inside a data page of a Hugging Face shard: refused naming the shard and
    the row group (pyarrow's own "Corrupt snappy compressed data." names neither)."""
    from damaged_files import corrupt_page

    pixels, labels = digit_pixels(120)
    rows = [(encoded(p), int(y)) for p, y in zip(pixels, labels, strict=True)]
    files = write_hf(tmp_path, "train", rows, shards=2, row_group_size=20)
    corrupt_page(files[1], row_group=1)
    images = ParquetImages.open_hf(tmp_path, size=(8, 8))
    with pytest.raises(ValueError) as info:
        images.read()
    assert str(info.value) == (f"{files[1].resolve()}: row group 1 cannot be read, the file is "
                               "damaged: Corrupt snappy compressed data.")
    np.testing.assert_array_equal(images.read([(0, 60)])[1], labels[:60])
