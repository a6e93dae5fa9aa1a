"""``ImageRows``: the one shape of images every backend takes, checked once at the boundary."""

import numpy as np
import pytest
import torch

from ray_convrfm.data.rows import ArrayRows, ImageRows, image_rows


def test_array_rows_slice_and_load_as_stored():
    U = np.arange(5 * 2 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3)
    rows = image_rows(U)
    assert isinstance(rows, ArrayRows) and isinstance(rows, ImageRows)
    assert len(rows) == 5 and rows.row_shape == (2, 3, 3)
    part = rows.slice(1, 4)
    assert len(part) == 3 and part.load().dtype == np.uint8
    np.testing.assert_array_equal(part.load(), U[1:4])
    assert "uint8" in repr(rows) and str(U[0, 0, 0, 1]) not in repr(rows).split("uint8")[1]


def test_tensors_become_arrays_and_rows_stay_as_they_are(tmp_path):
    from ray_convrfm.data.datasets import load_digits
    from ray_convrfm.data.parquet import ParquetImages, ParquetRows, write_parquet_dataset

    T = torch.rand(4, 1, 6, 6)
    np.testing.assert_array_equal(image_rows(T).load(), T.numpy())
    path = write_parquet_dataset(load_digits().subset(40, 10), tmp_path / "d", rows_per_group=10)
    parquet = ParquetRows(ParquetImages.open(path, "train"), ((0, 10), (20, 40)))
    assert image_rows(parquet) is parquet and isinstance(parquet, ImageRows)
    assert len(parquet.slice(5, 15)) == 10 and parquet.slice(5, 15).load().shape == (10, 1, 8, 8)


def test_anything_else_is_refused_naming_its_type():
    with pytest.raises(TypeError, match="found list"):
        image_rows([[0.0]])
