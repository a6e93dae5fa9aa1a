"""Every on-disk set (data.ondisk.DiskImages) on the embedded local Ray: fits whose workers read
their own rows of Hugging Face shards and folder trees, and conversion one task per file."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from image_files import count_decodes, digit_pixels, encoded, write_hf, write_tree

from ray_convrfm import Options
from ray_convrfm.data.folder_tree import FolderImages
from ray_convrfm.data.ondisk import DiskImages, DiskRows
from ray_convrfm.data.parquet import ParquetImages, ParquetRows, convert

ray = pytest.importorskip("ray")

KW = dict(depth=2, iters=2, agop_samples=20, random_state=9)


@pytest.fixture(scope="module")
def cluster():
    from ray_convrfm.backends.ray_executor import start_ray

    start_ray(workers=2)
    yield
    ray.shutdown()


@pytest.fixture
def driver_decodes(monkeypatch):
    """Images decoded and files opened by PIL in this (the driver's) process."""
    return count_decodes(monkeypatch)


def _digit_tree(root, n: int = 160):
    pixels, labels = digit_pixels(n, seed=1)
    write_tree(root, "train", {f"d{c}": [encoded(p) for p, y in zip(pixels, labels, strict=True)
                                         if y == c] for c in range(10)})
    return root


def test_the_base_is_the_one_check():
    assert issubclass(ParquetImages, DiskImages) and issubclass(FolderImages, DiskImages)
    assert ParquetRows is DiskRows


def test_fit_from_hf_shards_reads_rows_on_the_workers(cluster, tmp_path, driver_decodes,
                                                      monkeypatch):
    """Workers read and decode their own row groups of the shards, validation included; the fit
    equals one on the same images held in memory."""
    from ray_convrfm import ConvRFM
    from ray_convrfm.data import parquet as pqmod
    from ray_convrfm.data.split import split_validation

    pixels, labels = digit_pixels(200, seed=2)
    rows = [(encoded(np.stack([p] * 3, -1)), int(y)) for p, y in zip(pixels, labels,
                                                                       strict=True)]
    write_hf(tmp_path, "train", rows, shards=4, row_group_size=10)
    images = ParquetImages.open_hf(tmp_path, channels=1)
    X, y = images.read()
    assert images.holdout_units() == [10] * 20 and driver_decodes["decode"] == 200
    reads = []
    monkeypatch.setattr(pqmod, "read_rows", lambda *a, **k: reads.append(a))
    driver_decodes["decode"] = 0
    remote = ConvRFM(options=Options.of(workers=2), **KW).fit(images)
    try:
        assert reads == [] and driver_decodes["decode"] == 0  # labels only, in the driver
        seed = int(np.random.default_rng(9).integers(2**31 - 1))  # as the fit draws it
        fit_rows, val_rows = split_validation(y, np.unique(y), 0.1, seed,
                                              images.holdout_units())
        local = ConvRFM(**KW).fit(X[fit_rows], y[fit_rows], X_val=X[val_rows],
                                  y_val=y[val_rows])
        np.testing.assert_allclose(remote.decision_function(X[:40]),
                                   local.decision_function(X[:40]), rtol=1e-3, atol=1e-4)
    finally:
        remote.close()


def test_fit_from_a_folder_tree_on_two_workers_equals_the_fit_in_memory(cluster, tmp_path,
                                                                        driver_decodes):
    from ray_convrfm import ConvRFM

    images = FolderImages.open(_digit_tree(tmp_path), channels=1)
    assert driver_decodes == {"decode": 0, "open": 1}  # the listing, the first header
    remote = ConvRFM(options=Options.of(workers=2), **KW).fit(images)
    try:
        assert driver_decodes == {"decode": 0, "open": 1}  # every image read on a worker
        X, y = images.read()
        local = ConvRFM(**KW).fit(X, y)
        assert remote.best_iter_ == local.best_iter_ and remote.ridge_ == local.ridge_
        np.testing.assert_allclose(remote.decision_function(X[:40]),
                                   local.decision_function(X[:40]), rtol=1e-3, atol=1e-4)
        np.testing.assert_array_equal(remote.predict(X), local.predict(X))
    finally:
        remote.close()


def test_conversion_on_two_workers_writes_what_in_process_does(cluster, tmp_path, rng,
                                                                driver_decodes):
    tree = tmp_path / "tree"
    write_tree(tree, "train", {c: [encoded(rng.integers(0, 256, (int(rng.integers(6, 14)), 9, 3),
                                                        dtype=np.uint8), "JPEG")
                                   for _ in range(7)] for c in ("a", "b", "c")}, ".jpg")
    write_tree(tree, "test", {c: [encoded(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8))]
                              for c in ("a", "b")})
    kw = dict(size=(8, 8), rows_per_file=4, rows_per_group=3)
    parallel = convert(f"folder:{tree}", tmp_path / "parallel", workers=2, **kw)
    assert driver_decodes == {"decode": 0, "open": 1}  # the first image's header: no pass
    here = convert(f"folder:{tree}", tmp_path / "here", **kw)
    for split, n_files in (("train", 6), ("test", 1)):
        names = sorted(p.name for p in (parallel / split).iterdir())
        assert names == sorted(p.name for p in (here / split).iterdir())
        assert len(names) == n_files
        for name in names:
            a, b = pq.ParquetFile(parallel / split / name), pq.ParquetFile(here / split / name)
            assert a.read().equals(b.read())
            assert [a.metadata.row_group(i).num_rows for i in range(a.num_row_groups)] == \
                [b.metadata.row_group(i).num_rows for i in range(b.num_row_groups)]
    (tree / "train" / "b" / "0003.jpg").write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(ValueError, match=r"b/0003\.jpg: not a readable image"):
        convert(f"folder:{tree}", tmp_path / "broken", workers=2, **kw)
    assert not [p for p in (tmp_path / "broken").rglob("*") if p.is_file()]
