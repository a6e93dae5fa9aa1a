"""ImageNet-style folder trees read as they are held (data.folder_tree): a manifest from file
listings only, labels from class folders or a labels file, rows decoded where they are read."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from image_files import count_decodes, digit_pixels, encoded, reference, write_tree
from PIL import Image

from ray_convrfm.data.folder_tree import FolderImages, read_labels_file

WNIDS = ("n01440764", "n01443537", "n01484850")


@pytest.fixture
def counted(monkeypatch):
    """Counts images decoded and files PIL opens in this process."""
    return count_decodes(monkeypatch)


def _imagenet(root, rng, per_class: int = 4, val: int = 5):
    """train/<wnid>/*.JPEG of varying sizes (one grey class) and a flat val/ of val images;
    returns {relative path: bytes} and the val labels (indices)."""
    files = {}
    for c, wnid in enumerate(WNIDS):
        items = []
        for _ in range(per_class):
            h, w = int(rng.integers(12, 30)), int(rng.integers(12, 30))
            shape = (h, w) if c == 2 else (h, w, 3)
            items.append(encoded(rng.integers(0, 256, shape, dtype=np.uint8), "JPEG"))
        files.update(write_tree(root, "train", {wnid: items}, ".JPEG"))
    (root / "val").mkdir()
    labels = rng.integers(0, len(WNIDS), val)
    for k in range(val):
        name = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
        data = encoded(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8), "JPEG")
        (root / "val" / name).write_bytes(data)
        files[f"val/{name}"] = data
    return files, labels


def _kaggle_csv(path, labels):
    lines = ["ImageId,PredictionString"] + [
        f"ILSVRC2012_val_{k + 1:08d},{WNIDS[y]} 1 2 30 40 {WNIDS[y]} 5 6 7 8"
        for k, y in enumerate(labels)]
    path.write_text("\n".join(lines) + "\n")


def test_manifest_from_listings_only(tmp_path, rng, counted):
    files, labels = _imagenet(tmp_path, rng)
    _kaggle_csv(tmp_path / "LOC_val_solution.csv", labels)
    train = FolderImages.open(tmp_path, size=(8, 8), shuffle_seed=None)
    val = FolderImages.open(tmp_path, "val", size=(8, 8))
    assert counted == {"decode": 0, "open": 0}  # listings and the labels file: no image opened
    assert train.classes == WNIDS and train.shape == (12, 3, 8, 8) and len(val) == 5
    np.testing.assert_array_equal(train.labels(), np.repeat([0, 1, 2], 4))  # folder order
    assert [train.files[i].as_py() for i in range(2)] == ["train/n01440764/0000.JPEG",
                                                          "train/n01440764/0001.JPEG"]
    np.testing.assert_array_equal(val.labels()[np.argsort(val.files.to_pylist())], labels)
    shuffled = FolderImages.open(tmp_path, size=(8, 8), limit=6)  # seeded: a sample of classes
    assert len(shuffled) == 6 and len(set(shuffled.labels())) > 1
    assert shuffled.labels().tolist() == FolderImages.open(tmp_path, size=(8, 8)).labels()[
        :6].tolist()
    assert counted == {"decode": 0, "open": 0}
    FolderImages.open(tmp_path)  # without size, the first image's header gives it
    assert counted == {"decode": 0, "open": 1}


def test_rows_equal_a_plain_decode_and_resize(tmp_path, rng):
    files, labels = _imagenet(tmp_path, rng)
    for resize in ("crop", "stretch"):
        for channels in (3, 1):
            images = FolderImages.open(tmp_path, size=(10, 9), resize=resize, channels=channels)
            X, y = images.read(dtype="uint8")
            ref = np.stack([reference(files[f], channels, (10, 9), resize == "crop")
                            for f in images.files.to_pylist()])
            np.testing.assert_array_equal(X, ref)  # grey class read as 3 channels too
            Xf, yf = images.read([(3, 7)])
            np.testing.assert_array_equal(Xf, ref[3:7].astype(np.float32) / np.float32(255))
            np.testing.assert_array_equal(yf, y[3:7])
    rows = images.rows([(1, 4), (8, 12)])  # what a worker is sent: its own files only
    assert len(rows.images) == 7 and rows.ranges == ((0, 7),)
    part = pickle.loads(pickle.dumps(rows.slice(2, 5)))
    np.testing.assert_array_equal(part.load(), ref[[3, 8, 9]])
    np.testing.assert_array_equal(part.load_labelled()[1], y[[3, 8, 9]])


def test_labels_files_in_both_forms(tmp_path, rng):
    _, labels = _imagenet(tmp_path, rng, val=4)
    text = tmp_path / "val.txt"  # Caffe's: file names and indices into the sorted classes
    text.write_text("".join(f"ILSVRC2012_val_{k + 1:08d}.JPEG {y}\n" for k, y in
                            enumerate(labels)))
    a = FolderImages.open(tmp_path, "val", size=(8, 8), shuffle_seed=None)
    np.testing.assert_array_equal(a.labels(), labels)
    names = tmp_path / "names.csv"  # a header, names without extensions, class names
    names.write_text("filename,label\n" + "".join(
        f"ILSVRC2012_val_{k + 1:08d},{WNIDS[y]}\n" for k, y in enumerate(labels)))
    b = FolderImages.open(tmp_path, "val", size=(8, 8), shuffle_seed=None, labels_file=names)
    np.testing.assert_array_equal(b.labels(), labels)
    assert read_labels_file(names, WNIDS) == {
        f"ILSVRC2012_val_{k + 1:08d}": int(y) for k, y in enumerate(labels)}


@pytest.mark.parametrize("content, match", [
    ("ILSVRC2012_val_00000001.JPEG n99999999\n", r"line 1: class 'n99999999' is neither one of "
                                                 r"the 3 class folders"),
    ("ILSVRC2012_val_00000001.JPEG\n", r"line 1: expected 'filename class'"),
    ("ILSVRC2012_val_00000001.JPEG 0\nILSVRC2012_val_00000001.JPEG 2\n",
     r"line 2: ILSVRC2012_val_00000001\.JPEG is labelled twice"),
    ("ILSVRC2012_val_00000001.JPEG 0\n", r"val\.txt: no label for .*ILSVRC2012_val_00000002"),
    ("ImageId,PredictionString\nILSVRC2012_val_00000001,\n",
     r"line 2: expected 'filename class' \(ImageId,PredictionString\)"),
])
def test_a_bad_labels_file_is_refused_naming_file_and_line(tmp_path, rng, content, match):
    _imagenet(tmp_path, rng, val=2)
    (tmp_path / "val.txt").write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        FolderImages.open(tmp_path, "val", size=(8, 8))
    assert "val.txt" in str(info.value)


def test_other_errors_name_the_file(tmp_path, rng):
    _imagenet(tmp_path, rng)
    with pytest.raises(ValueError, match=r"val: images without class folders and no labels "
                                         r"file .*labels_file="):
        FolderImages.open(tmp_path, "val")
    with pytest.raises(ValueError, match=r"no split 'test'; found \['train', 'val'\]"):
        FolderImages.open(tmp_path, "test")
    images = FolderImages.open(tmp_path, shuffle_seed=None)  # sizes vary: the first one's
    h, w = images.shape[2:]
    with pytest.raises(ValueError, match=r"n01440764/0001\.JPEG: image is \d+x\d+, but the "
                                         rf"first image \(.*0000\.JPEG\) is {h}x{w}; pass "
                                         r"size=\(H, W\)"):
        images.read()
    (tmp_path / "train" / "n01443537" / "0002.JPEG").write_bytes(b"\xff\xd8\xff truncated")
    sized = FolderImages.open(tmp_path, size=(8, 8), shuffle_seed=None)
    with pytest.raises(ValueError, match=r"n01443537/0002\.JPEG: cannot decode image"):
        sized.read()
    assert len(sized.read([(0, 6)])[0]) == 6  # the rows before it read
    (tmp_path / "train" / "n01443537" / "0002.JPEG").unlink()  # gone since the listing
    with pytest.raises(ValueError, match=r"n01443537/0002\.JPEG: cannot read the image"):
        sized.read([(6, 7)])


def test_fit_on_the_tree_equals_the_fit_in_memory(tmp_path):
    """The whole split stays on disk: fit reads labels only, and equals the fit on the same
    images in memory (single-row validation, stratified, as for an array)."""
    from ray_convrfm import ConvRFM

    pixels, labels = digit_pixels(90, seed=3)
    for i, (p, y) in enumerate(zip(pixels, labels, strict=True)):
        (tmp_path / "train" / f"d{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(p).save(tmp_path / "train" / f"d{y}" / f"{i}.png")
    images = FolderImages.open(tmp_path, channels=1)
    X, y = images.read()
    assert images.holdout_units() is None
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=5)
    on_disk = ConvRFM(**kw).fit(images)
    in_memory = ConvRFM(**kw).fit(X, y)
    assert on_disk.best_iter_ == in_memory.best_iter_ and on_disk.ridge_ == in_memory.ridge_
    np.testing.assert_array_equal(on_disk.decision_function(X), in_memory.decision_function(X))
