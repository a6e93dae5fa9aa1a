"""Parquet image data sets: lazy splits for fits on Ray, and conversion to the layout.

The layout, its writer and reader are :mod:`ray_convrfm.data.parquet_io`'s (re-exported here).
:class:`ParquetImages` (a ``data.ondisk.DiskImages``) stands in for an image array in
``ConvRFM.fit``: the driver reads labels and validation rows through :func:`read_rows`, each Ray
worker its own :class:`ParquetRows`. ``ParquetImages.open_hf`` opens Hugging Face style shards
as they are (``data.hf_parquet``). :func:`convert` writes whatever ``load_dataset`` loads, or,
in parallel on Ray (``data.conversion``), a folder tree or a Hugging Face set.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ray_convrfm.data import images as img
from ray_convrfm.data import parquet_io as pio
from ray_convrfm.data.conversion import Target, convert_images, first_image
from ray_convrfm.data.datasets import ImageDataset, load_dataset
from ray_convrfm.data.folder_tree import FolderImages, scan_tree
from ray_convrfm.data.hf_parquet import open_hf_parquet
from ray_convrfm.data.ondisk import DiskImages, DiskRows, check_resize
from ray_convrfm.data.parquet_io import (  # the public names of the layout, re-exported
    FORMAT,
    VERSION,
    GroupSlice,
    ParquetManifest,
    RowGroup,
    decode_image,
    encode_image,
    load_parquet,
    open_parquet_dataset,
    read_rows,
    write_parquet_dataset,
)

__all__ = ["FORMAT", "VERSION", "GroupSlice", "ParquetImages", "ParquetManifest", "ParquetRows",
           "RowGroup", "convert", "decode_image", "encode_image", "load_parquet",
           "open_parquet_dataset", "read_rows", "write_parquet_dataset"]

#: Rows of any on-disk set a worker loads (the name from when parquet was the only kind).
ParquetRows = DiskRows


def _convert_tree(directory: Path, out: str | os.PathLike[str], fmt: str,
                  size: tuple[int, int] | None, channels: int | None, quality: int,
                  shuffle_seed: int | None, name: str | None, follow_symlinks: bool,
                  labels_file: str | os.PathLike[str] | None, resize: str,
                  splits: Sequence[str] | None, **write) -> Path | str:
    """A folder tree: its splits listed here, converted by ``data.conversion``'s tasks."""
    tree = scan_tree(directory, follow_symlinks)
    sources = {}
    for split in splits or tree.splits:
        try:
            sources[split] = FolderImages.open(directory, split, size, shuffle_seed=None,
                                               labels_file=labels_file,
                                               follow_symlinks=follow_symlinks)
        except ValueError as exc:  # an empty test/val folder is skipped, as it always was
            if split == "train" or not str(exc).endswith(f"images in the {split} split"):
                raise
    h, w, c, first = first_image(sources["train"])  # before shuffling: the first on disk
    if shuffle_seed is not None:
        # Folder order is class by class; contiguous worker shards need mixed classes.
        rng = np.random.default_rng(shuffle_seed)
        sources = {s: im.take(rng.permutation(len(im))) for s, im in sources.items()}
    c = c if channels is None else img.check_channels(channels)
    h, w = size or (h, w)
    meta = {"name": name or directory.resolve().name or "folder", "channels": c, "height": h,
            "width": w, "encoding": fmt.lower(), "classes": list(tree.classes)}
    target = Target(fmt, quality, c, h, w, size is not None, channels is not None,
                    resize == "crop", first)
    return convert_images(sources, out, meta, target, **write)


def _convert_hf(directory: str, out: str | os.PathLike[str], fmt: str,
                size: tuple[int, int] | None, channels: int | None, quality: int,
                name: str | None, resize: str, splits: Sequence[str] | None,
                **write) -> Path | str:
    """A Hugging Face style set: rows in the shards' order, converted by tasks."""
    m = open_hf_parquet(directory, channels or 3)
    sources = {s: ParquetImages(m, s) for s in (splits or m.groups)}
    h, w, c, first = first_image(sources.get("train") or next(iter(sources.values())))
    c = c if channels is None else img.check_channels(channels)
    h, w = size or (h, w)
    meta = {"name": name or m.name, "channels": c, "height": h, "width": w,
            "encoding": fmt.lower(), "classes": list(m.classes)}
    target = Target(fmt, quality, c, h, w, size is not None, channels is not None,
                    resize == "crop", first)
    return convert_images(sources, out, meta, target, **write)


def _resize(ds: ImageDataset, size: tuple[int, int]) -> ImageDataset:
    """Every image resized (8-bit, bilinear), as folder images are, before writing."""
    from PIL import Image

    def resize(X: np.ndarray, split: str) -> np.ndarray:
        out = np.empty((len(X), X.shape[1], *size), dtype=np.float32)
        for i in range(len(X)):
            im = Image.fromarray(img.hwc(img.quantise(X[i], f"{ds.name}: X_{split}[{i}]")))
            out[i] = img.chw(np.asarray(im.resize(size[::-1], Image.Resampling.BILINEAR)))
        return out / np.float32(255.0)

    if ds.image_shape[1:] == size or ds.image_shape[0] not in (1, 3):
        return ds  # write_parquet_dataset refuses other channel counts
    return dataclasses.replace(ds, X_train=resize(ds.X_train, "train"),
                               X_test=resize(ds.X_test, "test"))


def convert(source_spec: str, out: str | os.PathLike[str], encoding: str = "png", *,
            size: tuple[int, int] | None = None, channels: int | None = None, quality: int = 95,
            rows_per_file: int = 16384, rows_per_group: int = 1024,
            shuffle_seed: int | None = 0, name: str | None = None, overwrite: bool = False,
            progress: bool = False, root: str | os.PathLike[str] | None = None,
            download: bool = False, follow_symlinks: bool = False, resize: str = "stretch",
            splits: Sequence[str] | None = None,
            labels_file: str | os.PathLike[str] | None = None, workers: int | None = None,
            address: str | None = None) -> Path | str:
    """Write a data set in the parquet layout; returns what :func:`write_parquet_dataset` does.

    ``source_spec``: anything ``load_dataset`` accepts (``root``, ``download`` go to it); or
    ``"folder:DIR"`` (also ``"imagenet:DIR"``): a folder tree as ``data.folder_tree`` reads it
    (``DIR/[train|test|val]/<class>/*.png|jpg|jpeg``, a flat ``val/`` with ``labels_file``;
    without ``train/``, ``DIR`` is the train split), classes the sorted class-folder names; or
    ``"hf:DIR"``: Hugging Face style shards (``data.hf_parquet``). Those two are converted one
    output file per task, on ``workers`` Ray workers (``address``: a cluster to join; refused
    without ``workers``) or in this process without ``workers``; ``splits`` picks theirs
    (default all). Their images already in ``encoding``, mode (``L``/``RGB``) and size are
    stored byte for byte, others re-encoded. ``size`` ``(H, W)`` resizes (bilinear;
    ``resize="crop"``: scaled to cover it, then centre-cropped); without it all must have the
    first image's size, and without ``channels`` (1 or 3) its channels. ``shuffle_seed``
    (``None``: keep) shuffles folder rows, which come class by class. ``name`` renames the set.
    Symbolic links leading out of ``DIR`` are refused unless ``follow_symlinks``. The rest is as
    in :func:`write_parquet_dataset`.
    """
    if address is not None and not workers:
        raise ValueError(f"address={address!r} has no effect with workers=None (the conversion "
                         f"runs in this process); pass workers=N to convert on N Ray workers "
                         f"of that cluster, or address=None")
    fmt, size = img.format_of(encoding), img.check_size(size)
    write = {"rows_per_file": rows_per_file, "rows_per_group": rows_per_group,
             "overwrite": overwrite, "progress": progress}
    s = source_spec.strip()
    kind, _, where = s.partition(":")
    if kind.lower() in ("folder", "imagenet", "hf") and where:
        tasks = {"resize": check_resize(resize), "splits": splits, "workers": workers,
                 "address": address}
        if kind.lower() == "hf":
            return _convert_hf(where, out, fmt, size, channels, quality, name, **tasks, **write)
        return _convert_tree(Path(where).expanduser(), out, fmt, size, channels, quality,
                             shuffle_seed, name, follow_symlinks, labels_file, **tasks, **write)
    try:
        ds = load_dataset(s, root=root, download=download)
    except ValueError as exc:
        if str(exc).startswith("unknown data set spec"):
            raise ValueError(f'{exc}, or "folder:DIR", "imagenet:DIR", "hf:DIR"') from exc
        raise
    if channels is not None and img.check_channels(channels) != ds.image_shape[0]:
        raise ValueError(f"{ds.name}: channels={channels} requested but the images have "
                         f"{ds.image_shape[0]}; channel conversion is for folder sources only")
    ds = ds if size is None else _resize(ds, size)
    ds = dataclasses.replace(ds, name=name) if name else ds
    return write_parquet_dataset(ds, out, encoding=fmt.lower(), quality=quality, **write)


#: Below this many row groups the validation split is drawn in chunks of rows, not groups.
MIN_GROUPS_FOR_GROUP_SPLIT = 10


@dataclasses.dataclass(frozen=True)
class ParquetImages(DiskImages):
    """One split of a parquet data set, read only where it is needed: pass it to ``fit`` in
    place of an image array; the driver reads the labels and validation rows, each Ray worker
    its own :class:`ParquetRows`. ``size`` ``(H, W)`` resizes (``resize``: ``"stretch"`` to it,
    or ``"crop"``: scaled to cover it, then centre-cropped); ``limit`` keeps the first rows.
    """

    manifest: ParquetManifest
    split: str = "train"
    size: tuple[int, int] | None = None
    limit: int | None = None
    resize: str = "stretch"

    @classmethod
    def open(cls, path: str | os.PathLike[str], split: str = "train",
             size: tuple[int, int] | None = None, limit: int | None = None,
             resize: str = "stretch") -> ParquetImages:
        """A split of the project's layout (``dataset.json``)."""
        return cls(open_parquet_dataset(path), split, img.check_size(size), limit,
                   check_resize(resize))

    @classmethod
    def open_hf(cls, path: str | os.PathLike[str], split: str = "train",
                size: tuple[int, int] | None = None, limit: int | None = None,
                resize: str = "crop", channels: int = 3, image_column: str = "image",
                label_column: str = "label") -> ParquetImages:
        """A split of Hugging Face style shards as they are (``data.hf_parquet``): images read
        with ``channels`` (3: grey converted), resized by centre crop unless told otherwise;
        without ``size`` every image must have the first one's."""
        size = img.check_size(size)
        m = open_hf_parquet(path, channels, image_column, label_column,
                            size_of=None if size else split)
        return cls(m, split, size, limit, check_resize(resize))

    def __len__(self) -> int:
        n = self.manifest.rows(self.split)
        return n if self.limit is None else min(n, int(self.limit))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(n, C, H, W)``, as an image array would have."""
        h, w = self.size or (self.manifest.height, self.manifest.width)
        if h is None or w is None:
            raise ValueError(f"{self.manifest.root}: images vary in size; pass size=(H, W)")
        return (len(self), self.manifest.channels, int(h), int(w))

    def labels(self) -> np.ndarray:
        """All labels, reading only the ``label`` column."""
        slices = self.manifest.groups_for(self.split, 0, len(self))
        parts = [y for *_, y in pio.read_slices(self.manifest, self.split, slices,
                                                [self.manifest.label_column])]
        return np.concatenate([np.zeros(0, np.int64), *parts]).astype(np.int64)

    def read(self, ranges: Sequence[tuple[int, int]] | None = None, dtype: str = "float32"
             ) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of the row ``ranges`` (default: all rows), concatenated; images
        in ``[0, 1]`` (float32) or as stored 8-bit pixels (``dtype="uint8"``)."""
        ranges = [(0, len(self))] if ranges is None else list(ranges)
        # read_rows is looked up here, so that a test can count the driver's reads
        parts = [read_rows(self.manifest, self.split, a, b, size=self.size, dtype=dtype,
                           resize=self.resize) for a, b in ranges]
        if not parts:
            n, c, h, w = self.shape
            return np.zeros((0, c, h, w), dtype), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def holdout_units(self) -> list[int]:
        """Sizes of the blocks of rows the validation split holds out whole
        (``data.split``): the row groups, so the driver reads only the held-out ones and each
        worker only its own; with fewer than ``MIN_GROUPS_FOR_GROUP_SPLIT`` groups, chunks of
        about 1% of the rows."""
        n = len(self)
        sizes = [s.stop - s.start for s in self.manifest.groups_for(self.split, 0, n)]
        if len(sizes) >= MIN_GROUPS_FOR_GROUP_SPLIT:
            return sizes
        chunk = max(1, n // 100)
        return [min(chunk, n - a) for a in range(0, n, chunk)]

    def encoded(self, ranges: Sequence[tuple[int, int]]
                ) -> Iterator[tuple[bytes | None, int, str]]:
        m = self.manifest
        for a, b in ranges:
            slices = m.groups_for(self.split, a, b)
            for s, table, labels in pio.read_slices(m, self.split, slices,
                                                    [m.image_column, m.label_column]):
                images = pio.image_bytes(table.column(m.image_column))
                for j, (data, label) in enumerate(zip(images, labels, strict=True)):
                    yield data, int(label), f"{s.file}: row group {s.index}, row {s.start + j}"
