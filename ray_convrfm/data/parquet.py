"""Parquet image data sets: lazy splits for fits on Ray, and conversion to the layout.

The layout, its writer and reader are :mod:`ray_convrfm.data.parquet_io`'s (re-exported here).
:class:`ParquetImages` stands in for an image array in ``ConvRFM.fit``: the driver reads labels
and validation rows through :func:`read_rows`, each Ray worker its own :class:`ParquetRows`.
:func:`convert` writes whatever ``load_dataset`` loads, or a folder of class subfolders.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ray_convrfm.data import images as img
from ray_convrfm.data import parquet_io as pio
from ray_convrfm.data.datasets import ImageDataset, load_dataset
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

_MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
_FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg")
# PIL modes that hold one (grey) channel; every other mode is treated as colour.
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


class _FolderImage(NamedTuple):
    path: Path
    label: int
    fmt: str | None  # PIL format of the file
    mode: str
    height: int
    width: int

    @property
    def channels(self) -> int:
        return 1 if self.mode in _GREY_MODES else 3


def _check_link(path: Path, root: Path, follow_symlinks: bool) -> Path:
    """``path``, unless a symbolic link out of ``root`` and not ``follow_symlinks``."""
    if not follow_symlinks and path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(root):
            raise ValueError(
                f"{path} is a symbolic link to {target}, outside the folder {root} being "
                "converted; pass follow_symlinks=True (ray-convrfm convert --follow-symlinks) "
                "to read what links outside it point to")
    return path


def _files_under(folder: Path, root: Path, follow_symlinks: bool) -> list[Path]:
    """Every file under ``folder``, sorted, links checked; a folder is visited once."""
    out, stack, seen = [], [folder], {folder.resolve()}
    while stack:
        for p in stack.pop().iterdir():
            _check_link(p, root, follow_symlinks)
            if p.is_dir():
                if p.resolve() not in seen:
                    seen.add(p.resolve())
                    stack.append(p)
            elif p.is_file():
                out.append(p)
    return sorted(out)


def _scan_folder(directory: Path, follow_symlinks: bool = False
                 ) -> tuple[dict[str, list[_FolderImage]], tuple[str, ...]]:
    """The images of ``DIR/[train|test]/<class>/`` (or ``DIR/<class>/``: all train) with their
    headers, and the sorted class names of both splits. Symbolic links that lead out of
    ``DIR`` are refused unless ``follow_symlinks``."""
    from PIL import Image

    if not directory.is_dir():
        raise FileNotFoundError(f"folder data set {directory} is not a directory")
    root = directory.resolve()
    dirs = {s: _check_link(directory / s, root, follow_symlinks) for s in pio.SPLITS
            if (directory / s).is_dir()}
    if dirs and "train" not in dirs:
        raise ValueError(f"{directory}: has a test/ folder but no train/ folder")
    dirs = dirs or {"train": directory}
    classes = tuple(sorted({p.name for d in dirs.values() for p in d.iterdir()
                            if _check_link(p, root, follow_symlinks).is_dir()
                            and not p.name.startswith(".")}))
    if not classes:
        raise ValueError(f"{directory}: no class folders found; expected "
                         f"{directory}/[train|test]/<class>/*.png|jpg|jpeg")
    out: dict[str, list[_FolderImage]] = {}
    for split, d in dirs.items():
        out[split] = []
        for label, cls in enumerate(classes):
            if not (d / cls).is_dir():
                continue
            for p in _files_under(d / cls, root, follow_symlinks):
                if p.suffix.lower() not in _FOLDER_SUFFIXES or p.name.startswith("."):
                    continue
                try:
                    with Image.open(p) as im:  # lazy: reads the header only
                        out[split].append(
                            _FolderImage(p, label, im.format, im.mode, im.height, im.width))
                except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
                    raise ValueError(f"{p}: not a readable image ({exc})") from exc
    if not out["train"]:
        raise ValueError(f"{directory}: no *.png/*.jpg/*.jpeg images in the train split")
    return out, classes


def _convert_folder(directory: Path, out: str | os.PathLike[str], fmt: str,
                    size: tuple[int, int] | None, channels: int | None, quality: int,
                    shuffle_seed: int | None, name: str | None, follow_symlinks: bool,
                    **write) -> Path | str:
    images, classes = _scan_folder(directory, follow_symlinks)
    first = images["train"][0]
    c = first.channels if channels is None else img.check_channels(channels)
    h, w = size or (first.height, first.width)
    for im in itertools.chain(*images.values()):
        if ((size is None and (im.height, im.width) != (h, w))
                or (channels is None and im.channels != c)):
            raise ValueError(
                f"{im.path}: image is {im.height}x{im.width} with {im.channels} channel(s), but "
                f"the first image {first.path} is {first.height}x{first.width} with "
                f"{first.channels}; pass size=(H, W) (and channels=1 or 3) to convert all")
    mode = "L" if c == 1 else "RGB"

    def rows(items: Sequence[_FolderImage]) -> Iterator[tuple[bytes, int]]:
        for im in items:
            data = im.path.read_bytes()
            if (im.fmt != fmt or not data.startswith(_MAGIC[fmt]) or im.mode != mode
                    or (im.height, im.width) != (h, w)):
                try:  # re-encode; images already in the wanted form are stored byte for byte
                    data = img.encode_uint8(img.decode_uint8(data, c, (h, w)), fmt, quality)
                except ValueError as exc:
                    raise ValueError(f"{im.path}: {exc}") from exc
            yield data, im.label

    if shuffle_seed is not None:
        # Folder order is class by class; contiguous worker shards need mixed classes.
        rng = np.random.default_rng(shuffle_seed)
        images = {s: [items[i] for i in rng.permutation(len(items))] for s, items in images.items()}
    meta = {"name": name or directory.resolve().name or "folder", "channels": c, "height": h,
            "width": w, "encoding": fmt.lower(), "classes": list(classes)}
    splits = {s: (len(items), rows(items)) for s, items in images.items() if items}
    return pio.write_encoded(out, meta, splits, **write)


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
            download: bool = False, follow_symlinks: bool = False) -> Path | str:
    """Write a data set in the parquet layout; returns what :func:`write_parquet_dataset` does.

    ``source_spec``: anything ``load_dataset`` accepts (``root``, ``download`` go to it), or
    ``"folder:DIR"``: ``DIR/[train|test]/<class>/*.png|jpg|jpeg`` (without ``train/``, ``DIR`` is
    the train split), classes the sorted class-folder names. Folder images already in
    ``encoding``, mode (``L``/``RGB``) and size are stored byte for byte, others re-encoded.
    ``size`` ``(H, W)`` resizes (bilinear); without it all must have the first image's size, and
    without ``channels`` (1 or 3) its channels. ``shuffle_seed`` (``None``: keep) shuffles folder
    rows, which come class by class. ``name`` renames the set. Symbolic links leading out of
    ``DIR`` are refused unless ``follow_symlinks``. The rest is as in :func:`write_parquet_dataset`.
    """
    fmt, size = img.format_of(encoding), img.check_size(size)
    write = {"rows_per_file": rows_per_file, "rows_per_group": rows_per_group,
             "overwrite": overwrite, "progress": progress}
    s = source_spec.strip()
    if s.lower().startswith("folder:") and len(s) > len("folder:"):
        return _convert_folder(Path(s[len("folder:"):]).expanduser(), out, fmt, size, channels,
                               quality, shuffle_seed, name, follow_symlinks, **write)
    try:
        ds = load_dataset(s, root=root, download=download)
    except ValueError as exc:
        if str(exc).startswith("unknown data set spec"):
            raise ValueError(f'{exc}, or "folder:DIR"') from exc
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
class ParquetImages:
    """One split of a parquet data set, read only where it is needed: pass it to ``fit`` in
    place of an image array; the driver reads the labels and validation rows, each Ray worker
    its own :class:`ParquetRows`. ``size`` ``(H, W)`` resizes; ``limit`` keeps the first rows.
    """

    manifest: ParquetManifest
    split: str = "train"
    size: tuple[int, int] | None = None
    limit: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], split: str = "train",
             size: tuple[int, int] | None = None, limit: int | None = None) -> ParquetImages:
        return cls(open_parquet_dataset(path), split, img.check_size(size), limit)

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
        parts = [y for *_, y in pio.read_slices(self.manifest, self.split, slices, ["label"])]
        return np.concatenate([np.zeros(0, np.int64), *parts]).astype(np.int64)

    def read(self, ranges: Sequence[tuple[int, int]] | None = None, dtype: str = "float32"
             ) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of the row ``ranges`` (default: all rows), concatenated; images
        in ``[0, 1]`` (float32) or as stored 8-bit pixels (``dtype="uint8"``)."""
        ranges = [(0, len(self))] if ranges is None else list(ranges)
        # read_rows is looked up here, so that a test can count the driver's reads
        parts = [read_rows(self.manifest, self.split, a, b, size=self.size, dtype=dtype)
                 for a, b in ranges]
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


@dataclasses.dataclass(frozen=True)
class ParquetRows:
    """Some rows of :class:`ParquetImages` (sorted ranges): the shard a worker loads. Small and
    picklable: a Ray actor receives it instead of pixels, and calls :meth:`load` (again after a
    restart)."""

    images: ParquetImages
    ranges: tuple[tuple[int, int], ...]
    dtype: str = "uint8"  # the stored pixels; "float32" decodes to [0, 1] here

    def __len__(self) -> int:
        return sum(b - a for a, b in self.ranges)

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return self.images.shape[1:]

    def slice(self, start: int, stop: int) -> ParquetRows:
        """Rows ``start:stop`` of this selection (positions counted across the ranges)."""
        r = self.ranges
        return dataclasses.replace(self, ranges=tuple(
            (r[i][0] + lo, r[i][0] + hi) for i, lo, hi in pio.overlaps(
                (b - a for a, b in r), start, stop)))

    def load(self) -> np.ndarray:
        """Read and decode these rows: ``(len, C, H, W)``, uint8 pixels as stored (the
        default) or float in ``[0, 1]``."""
        if self.dtype == "uint8":
            return self.images.read(self.ranges, dtype="uint8")[0]
        return self.images.read(self.ranges)[0].astype(self.dtype, copy=False)
