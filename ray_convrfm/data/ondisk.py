"""Image sets read where they are used: the one base every on-disk set implements.

``ConvRFM.fit`` takes a :class:`DiskImages` in place of an image array. The driver reads its
labels (and nothing that grows with the pixels), holds validation out in the units
:meth:`DiskImages.holdout_units` gives, and hands each worker a :class:`DiskRows`, a small
picklable description of its rows that the worker ``load()``s, decoding and resizing there.
``models.inputs`` asks ``isinstance(X, DiskImages)``, never which kind of set it is.

Kinds: ``data.parquet.ParquetImages`` (the project's own parquet layout, and Hugging Face style
parquet shards through ``ParquetImages.open_hf``) and ``data.folder_tree.FolderImages``
(``train/<class>/*.JPEG`` trees, a flat ``val/`` labelled by a labels file).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import numpy as np

from ray_convrfm.data.parquet_io import overlaps

__all__ = ["RESIZES", "DiskImages", "DiskRows", "check_resize"]

#: How ``size`` is reached: ``"crop"`` scales an image to cover ``(H, W)`` and centre-crops it
#: (ImageNet's resize of the shorter side, then centre crop: no distortion), ``"stretch"``
#: resizes it to exactly ``(H, W)`` (the aspect ratio changes; the project layout's policy).
RESIZES = ("crop", "stretch")


def check_resize(resize: str) -> str:
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
    return resize


class DiskImages(ABC):
    """One split of an image set on disk, standing in for an ``(n, C, H, W)`` array."""

    split: str

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int, int, int]:
        """``(n, C, H, W)``, as an image array would have."""

    @abstractmethod
    def labels(self) -> np.ndarray:
        """All ``int64`` labels, read without touching an image."""

    @abstractmethod
    def read(self, ranges: Sequence[tuple[int, int]] | None = None, dtype: str = "float32"
             ) -> tuple[np.ndarray, np.ndarray]:
        """Images (``[0, 1]`` float32, or the 8-bit pixels with ``dtype="uint8"``) and labels
        of the row ``ranges`` (default: all rows), decoded and resized."""

    @abstractmethod
    def encoded(self, ranges: Sequence[tuple[int, int]]
                ) -> Iterator[tuple[bytes | None, int, str]]:
        """Per row of ``ranges``: its stored bytes (PNG/JPEG, not decoded), label, and where it
        is (for messages): what a conversion copies or re-encodes."""

    def holdout_units(self) -> list[int] | None:
        """Sizes of the blocks of rows validation holds out whole (``data.split``); None:
        single rows, stratified (every row is read on its own anyway)."""
        return None

    def rows(self, ranges: Sequence[tuple[int, int]], dtype: str = "uint8") -> DiskRows:
        """The rows ``ranges`` (in that order) as the description a worker loads."""
        return DiskRows(self, tuple((int(a), int(b)) for a, b in ranges), dtype)


@dataclasses.dataclass(frozen=True)
class DiskRows:
    """Some rows of a :class:`DiskImages` (ranges, in order): the shard a worker loads. Small and
    picklable: a Ray actor receives it instead of pixels, and calls :meth:`load` (again after a
    restart). ``data.rows.ImageRows``."""

    images: DiskImages
    ranges: tuple[tuple[int, int], ...]
    dtype: str = "uint8"  # the 8-bit pixels; "float32" decodes to [0, 1] here

    def __len__(self) -> int:
        return sum(b - a for a, b in self.ranges)

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return self.images.shape[1:]

    def slice(self, start: int, stop: int) -> DiskRows:
        """Rows ``start:stop`` of this selection (positions counted across the ranges)."""
        r = self.ranges
        return self.images.rows(tuple((r[i][0] + lo, r[i][0] + hi) for i, lo, hi in overlaps(
            (b - a for a, b in r), start, stop)), self.dtype)

    def load(self) -> np.ndarray:
        """Read and decode these rows: ``(len, C, H, W)``, uint8 pixels (the default) or float
        in ``[0, 1]``."""
        return self.load_labelled()[0]

    def load_labelled(self) -> tuple[np.ndarray, np.ndarray]:
        """These rows as ``load`` gives them and their stored labels, read in one pass (batch
        predictions write the true labels beside the predicted ones)."""
        if self.dtype == "uint8":
            return self.images.read(self.ranges, dtype="uint8")
        X, y = self.images.read(self.ranges)
        return X.astype(self.dtype, copy=False), y
