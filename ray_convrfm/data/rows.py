"""``ImageRows``: rows of images wherever they rest, the one shape every backend takes.

Training images, held-out sets and shards travel as an ``ImageRows``: its length, the shape of
a row, a ``slice`` (another ``ImageRows``, small when the rows are on disk) and ``load``, which
returns the rows as stored (8-bit pixels stay uint8). ``ArrayRows`` holds an array in memory;
``data.ondisk.DiskRows`` (``data.parquet.ParquetRows``) names rows of an on-disk set (parquet
row groups, Hugging Face shards, files of a folder tree) that whoever loads them reads (with
their labels: ``load_labelled``). ``image_rows`` is the one check at the boundary, as
scikit-learn's ``check_array`` is: past it no code asks what an input is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ImageRows(Protocol):
    """(n, C, H, W) images, loadable as stored."""

    def __len__(self) -> int: ...

    @property
    def row_shape(self) -> tuple[int, ...]: ...

    def slice(self, start: int, stop: int) -> ImageRows: ...

    def load(self) -> np.ndarray: ...


@dataclass(frozen=True)
class ArrayRows:
    """Images held in memory (a numpy array as stored)."""

    array: np.ndarray

    def __len__(self) -> int:
        return len(self.array)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape[1:])

    def slice(self, start: int, stop: int) -> ArrayRows:
        return ArrayRows(self.array[start:stop])

    def load(self) -> np.ndarray:
        return self.array

    def __repr__(self) -> str:  # never the pixels
        return f"ArrayRows({self.array.shape}, {self.array.dtype})"


def load_labelled(rows: ImageRows) -> tuple[np.ndarray, np.ndarray | None]:
    """``rows.load()`` and the labels the rows carry (a parquet set's ``label`` column: rows
    with a ``load_labelled`` method), else None; read in one pass."""
    labelled = getattr(rows, "load_labelled", None)
    return labelled() if labelled is not None else (rows.load(), None)


def image_rows(X) -> ImageRows:
    """``X`` as ``ImageRows``: as it is when it is one, an array or tensor (moved to the CPU)
    as ``ArrayRows``; anything else is refused naming its type."""
    if isinstance(X, ImageRows):
        return X
    import torch

    if isinstance(X, torch.Tensor):
        return ArrayRows(X.detach().cpu().numpy())
    if isinstance(X, np.ndarray):
        return ArrayRows(X)
    raise TypeError(f"images must be an array, a tensor or ImageRows (such as parquet rows); "
                    f"found {type(X).__name__}")
