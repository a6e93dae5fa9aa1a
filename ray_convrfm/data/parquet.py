"""Image data sets stored as parquet shards, read a few row groups at a time.

Large image sets (ImageNet and the like) do not fit in one ``.npz`` file or in one worker's
memory, so they are stored the way public mirrors store them: parquet files whose rows each hold
one encoded image and an integer label. A Ray worker then reads only the row groups covering its
own rows (:func:`read_rows`), and the driver needs no more than the parquet footers to plan the
shards (:func:`open_parquet_dataset`).

Layout
------
A data set is a directory, or a URL prefix that ``pyarrow.fs.FileSystem.from_uri`` understands
(``s3://``, ``gs://``, ``hdfs://``, ``file://``) or, when ``fsspec`` is installed, any fsspec URL
(``memory://``, ...)::

    ROOT/dataset.json
    ROOT/train/part-00000.parquet
    ROOT/train/part-00001.parquet
    ...
    ROOT/test/part-00000.parquet      (optional)

``dataset.json`` describes the set::

    {"format": "ray_convrfm-parquet", "version": 1, "name": "digits",
     "channels": 1, "height": 8, "width": 8, "encoding": "png",
     "classes": ["0", "1", ...], "splits": {"train": 1500, "test": 297}}

``height`` and ``width`` may be ``null`` for a set of variable-size images (a hand-written
description of a HuggingFace mirror, say); reading it then needs an explicit ``size``.
A split listed in ``splits`` reads every ``*.parquet`` file of its folder, in natural name order
(``part-2`` before ``part-10``), skipping names that start with ``.`` or ``_``; the row counts
in the file footers must add up to the count in ``dataset.json``, so a missing or stale shard is
caught when the set is opened. A split absent from ``splits`` has no rows.

Each parquet file has the columns

* ``image``: ``binary`` holding PNG or JPEG bytes; when reading, a ``struct<bytes: binary,
  path: string>`` column (the layout of the HuggingFace ImageNet mirrors) is accepted as well;
* ``label``: ``int64`` class index (any integer type is accepted when reading).

:func:`write_parquet_dataset` writes row groups of ``rows_per_group`` rows (default 1024) and at
most ``rows_per_file`` rows per file (default 16384); a row group is the unit a worker reads, so
it bounds the memory and the over-read of one :func:`read_rows` call. ``dataset.json`` is
written last, so an interrupted write leaves a directory that :func:`open_parquet_dataset`
refuses rather than one that silently misses rows.

Pixels are stored as 8-bit values ``round(255 * x)``; PNG round trips are exact for such
values, JPEG ones are lossy.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_convrfm.data.datasets import ImageDataset, load_dataset

__all__ = [
    "FORMAT",
    "VERSION",
    "GroupSlice",
    "ParquetImages",
    "ParquetManifest",
    "ParquetRows",
    "RowGroup",
    "convert",
    "decode_image",
    "encode_image",
    "load_parquet",
    "open_parquet_dataset",
    "read_rows",
    "write_parquet_dataset",
]

logger = logging.getLogger(__name__)

#: Value of ``"format"`` in ``dataset.json``.
FORMAT = "ray_convrfm-parquet"
#: Highest layout version this module reads (and the one it writes).
VERSION = 1
_META_FILE = "dataset.json"
_ENCODINGS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG"}
_MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
_FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg")
_SPLITS = ("train", "test")
# PIL modes that hold one (grey) channel; every other mode is treated as colour.
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64())])


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------
def _format_of(encoding: str) -> str:
    """PIL format name for an ``encoding`` argument (``"png"``, ``"jpeg"`` or ``"jpg"``)."""
    fmt = _ENCODINGS.get(str(encoding).lower())
    if fmt is None:
        raise ValueError(f"unknown encoding {encoding!r}; accepted: 'png', 'jpeg'")
    return fmt


def _check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    return int(channels)


def _encode_uint8(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    """Encode ``(H, W)`` or ``(H, W, 3)`` ``uint8`` pixels as PNG or JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="L" if pixels.ndim == 2 else "RGB")
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=int(quality))
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def _to_mode(image, channels: int):
    """Convert a PIL image to ``L`` or ``RGB``, scaling 16-bit grey instead of clipping it."""
    from PIL import Image

    if image.mode.startswith("I;16"):
        # PIL's own I;16 -> L conversion clips at 255; scale 0..65535 down to 0..255 instead.
        wide = np.asarray(image, dtype=np.uint16).astype(np.float32)
        image = Image.fromarray(np.rint(wide / np.float32(257.0)).astype(np.uint8), mode="L")
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def _decode_uint8(
    data: bytes, channels: int, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode to ``uint8`` pixels ``(H, W)`` (grey) or ``(H, W, 3)``; resize when ``size``
    ``(H, W)`` is given and differs."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = _to_mode(image, channels)
            if size is not None and (image.height, image.width) != tuple(size):
                h, w = (int(s) for s in size)
                image = image.resize((w, h), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image ({len(data)} bytes): {exc}") from exc


def _check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"size must be a pair (H, W) of positive integers, got {size!r}") from exc
    if h < 1 or w < 1:
        raise ValueError(f"size must be a pair (H, W) of positive integers, got {size!r}")
    return h, w


def _quantise(x: np.ndarray, where: str) -> np.ndarray:
    """``round(255 * x)`` as ``uint8``; refuse NaN and values outside ``[0, 1]``."""
    x = np.asarray(x)
    ok = (x >= 0) & (x <= 1)  # NaN compares false, so it is refused too
    if not ok.all():
        bad = x[~ok]
        raise ValueError(
            f"{where}: pixels must be in [0, 1] to be stored as 8-bit images; found "
            f"{bad.size} value(s) outside, e.g. {bad.flat[0]!r} (NaN or out of range: rescale "
            "or clip first)"
        )
    return np.rint(x.astype(np.float32) * np.float32(255.0)).astype(np.uint8)


def _chw_to_pixels(q: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` uint8 -> PIL layout ``(H, W)`` or ``(H, W, 3)``."""
    return q[0] if q.shape[0] == 1 else np.transpose(q, (1, 2, 0))


def encode_image(x: np.ndarray, encoding: str = "png", quality: int = 95) -> bytes:
    """Encode one ``(C, H, W)`` float image with pixels in ``[0, 1]`` (``C`` = 1 or 3).

    Pixels are quantised to ``round(255 * x)`` first, the precision both formats store, so a
    PNG round trip through :func:`decode_image` returns exactly the quantised image.

    Parameters
    ----------
    x : np.ndarray
        Shape ``(C, H, W)``.
    encoding : str
        ``"png"`` (lossless) or ``"jpeg"`` (lossy, far smaller for photographs).
    quality : int
        JPEG quality (1..95 is useful); ignored for PNG.

    Raises
    ------
    ValueError
        On a bad shape or encoding, or on NaN pixels or pixels outside ``[0, 1]``.
    """
    fmt = _format_of(encoding)
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (C, H, W) with C = 1 or 3, got {x.shape}")
    return _encode_uint8(_chw_to_pixels(_quantise(x, "image")), fmt, quality)


def decode_image(
    data: bytes, channels: int, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode PNG or JPEG bytes to a ``float32`` ``(C, H, W)`` image with pixels in ``[0, 1]``.

    Whatever the stored mode (palette, RGBA, CMYK, 16-bit grey, ...), the image is converted to
    ``channels`` (1: ``L``, 3: ``RGB``) so every image of a set has the same layout.

    Parameters
    ----------
    data : bytes
        Encoded image.
    channels : int
        1 or 3.
    size : (H, W), optional
        Resize (bilinear) to this size when the image has another one; no cropping, so the
        aspect ratio is not kept.

    Raises
    ------
    ValueError
        If ``channels`` is not 1 or 3, or the bytes are not a readable image.
    """
    channels = _check_channels(channels)
    pixels = _decode_uint8(data, channels, _check_size(size))
    chw = pixels[None] if pixels.ndim == 2 else np.transpose(pixels, (2, 0, 1))
    return chw.astype(np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------------------------
# File systems
# --------------------------------------------------------------------------------------------
def _filesystem(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str, bool]:
    """``(filesystem, path inside it, is_local)`` for a local path or a URL.

    pyarrow's own file systems are tried first; other URLs go through fsspec (optional
    dependency), wrapped so that the rest of the module sees one pyarrow interface.
    """
    s = os.fspath(path)
    if "://" not in s:
        return pafs.LocalFileSystem(), str(Path(s).expanduser().resolve()), True
    try:
        fs, inner = pafs.FileSystem.from_uri(s)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as arrow_exc:
        try:
            import fsspec
        except ImportError as exc:
            raise ValueError(
                f"{s}: pyarrow does not handle this URL ({arrow_exc}) and fsspec is not "
                "installed (pip install fsspec)"
            ) from exc
        ffs, inner = fsspec.core.url_to_fs(s)
        return pafs.PyFileSystem(pafs.FSSpecHandler(ffs)), inner.rstrip("/"), False
    return fs, inner.rstrip("/") or inner, isinstance(fs, pafs.LocalFileSystem)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _natural_key(name: str) -> list:
    """Sort ``part-2`` before ``part-10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _list_parquet(fs: pafs.FileSystem, directory: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    names = [
        info.base_name
        for info in infos
        if info.type == pafs.FileType.File
        and info.base_name.endswith(".parquet")
        and not info.base_name.startswith((".", "_"))
    ]
    return [_join(directory, n) for n in sorted(names, key=_natural_key)]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _prepare_output(
    out: str | os.PathLike[str], splits: Iterable[str], overwrite: bool
) -> tuple[pafs.FileSystem, str, bool]:
    """Resolve ``out``, refuse (or, with ``overwrite``, clear) an existing data set there."""
    fs, root, local = _filesystem(out)
    meta = _join(root, _META_FILE)
    old = [p for split in _SPLITS for p in _list_parquet(fs, _join(root, split))]
    has_meta = fs.get_file_info(meta).type == pafs.FileType.File
    if (old or has_meta) and not overwrite:
        raise FileExistsError(
            f"{out} already holds a parquet data set ({len(old)} parquet file(s)"
            f"{', dataset.json' if has_meta else ''}); pass overwrite=True to replace it"
        )
    if has_meta:
        fs.delete_file(meta)  # first, so a half-replaced set is never readable
    for p in old:
        fs.delete_file(p)
    fs.create_dir(root, recursive=True)
    for split in splits:
        fs.create_dir(_join(root, split), recursive=True)
    return fs, root, local


def _write_split(
    fs: pafs.FileSystem,
    directory: str,
    rows: Iterable[tuple[bytes, int]],
    rows_per_file: int,
    rows_per_group: int,
    bar=None,
) -> int:
    """Stream ``(encoded image, label)`` rows into ``part-NNNNN.parquet`` files.

    Each chunk of ``rows_per_group`` rows is written with its own ``write_table`` call, which
    makes it exactly one row group; only one row group is held in memory at a time.
    """
    rows_per_group = min(rows_per_group, rows_per_file)
    n_total = 0
    n_file = 0
    writer = None
    sink = None
    images: list[bytes] = []
    labels: list[int] = []

    def flush() -> None:
        nonlocal writer, sink, n_file
        if not images:
            return
        if writer is None:
            path = _join(directory, f"part-{n_file:05d}.parquet")
            sink = fs.open_output_stream(path)
            writer = pq.ParquetWriter(
                sink,
                _SCHEMA,
                # Encoded images are incompressible and unique: no dictionary, no min/max.
                use_dictionary=["label"],
                write_statistics=["label"],
            )
        table = pa.table(
            {"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())},
            schema=_SCHEMA,
        )
        writer.write_table(table, row_group_size=len(images))
        images.clear()
        labels.clear()

    def close_file() -> None:
        nonlocal writer, sink, n_file
        flush()
        if writer is not None:
            writer.close()
            sink.close()
            writer, sink = None, None
            n_file += 1

    try:
        in_file = 0
        for data, label in rows:
            images.append(data)
            labels.append(int(label))
            n_total += 1
            in_file += 1
            if bar is not None:
                bar.update(1)
            if in_file == rows_per_file:
                close_file()
                in_file = 0
            elif len(images) == rows_per_group:
                flush()
        close_file()
    finally:
        if writer is not None:  # an exception left a file open
            writer.close()
            sink.close()
    return n_total


def _write_meta(fs: pafs.FileSystem, root: str, meta: dict) -> None:
    with fs.open_output_stream(_join(root, _META_FILE)) as fh:
        fh.write((json.dumps(meta, indent=2) + "\n").encode("utf-8"))


def _check_layout(rows_per_file: int, rows_per_group: int) -> tuple[int, int]:
    for arg, value in (("rows_per_file", rows_per_file), ("rows_per_group", rows_per_group)):
        if int(value) != value or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    return int(rows_per_file), int(rows_per_group)


def _result_path(out: str | os.PathLike[str], root: str, local: bool) -> Path | str:
    return Path(root) if local else os.fspath(out)


def _progress_bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="img")


def write_parquet_dataset(
    ds: ImageDataset,
    out: str | os.PathLike[str],
    encoding: str = "png",
    rows_per_file: int = 16384,
    rows_per_group: int = 1024,
    progress: bool = False,
    *,
    quality: int = 95,
    overwrite: bool = False,
) -> Path | str:
    """Write ``ds`` in the parquet layout of this module (see the module docstring).

    All pixels are checked before anything is written, so a set that cannot be stored as
    8-bit images leaves no partial output.

    Parameters
    ----------
    ds : ImageDataset
        Images with 1 or 3 channels and pixels in ``[0, 1]``; an empty test split is skipped.
    out : path-like or URL
        Data set root; created if needed.
    encoding : str
        ``"png"`` (lossless) or ``"jpeg"``.
    rows_per_file, rows_per_group : int
        Most rows in one parquet file, and rows in one row group (the unit of reading).
    progress : bool
        Show a tqdm bar.
    quality : int
        JPEG quality; ignored for PNG.
    overwrite : bool
        Replace an existing data set at ``out`` (its parquet files and ``dataset.json``).

    Returns
    -------
    Path or str
        The root: an absolute :class:`~pathlib.Path` for local output, else the URL.

    Raises
    ------
    ValueError
        On NaN pixels or pixels outside ``[0, 1]`` (naming the split and image), a channel count
        other than 1 or 3, or bad layout arguments.
    FileExistsError
        If ``out`` already holds a data set and ``overwrite`` is false.
    """
    fmt = _format_of(encoding)
    rows_per_file, rows_per_group = _check_layout(rows_per_file, rows_per_group)
    c, h, w = ds.image_shape
    if c not in (1, 3):
        raise ValueError(f"{ds.name}: images must have 1 or 3 channels to encode, got {c}")
    splits = {"train": (ds.X_train, ds.y_train)}
    if ds.X_test.shape[0]:
        splits["test"] = (ds.X_test, ds.y_test)
    for split, (X, _) in splits.items():
        for i in range(0, X.shape[0], rows_per_group):  # chunked: no full-size mask in memory
            block = X[i : i + rows_per_group]
            ok = ((block >= 0) & (block <= 1)).reshape(block.shape[0], -1).all(axis=1)
            if not ok.all():
                j = i + int(np.argmin(ok))
                bad = X[j][~((X[j] >= 0) & (X[j] <= 1))]
                raise ValueError(
                    f"{ds.name}: X_{split}[{j}] has pixels that cannot be stored as 8-bit "
                    f"images (must be in [0, 1]; found e.g. {bad.flat[0]!r}; NaN or out of "
                    "range): rescale or clip first"
                )

    fs, root, local = _prepare_output(out, splits, overwrite)
    counts = {}
    total = sum(X.shape[0] for X, _ in splits.values())
    with _progress_bar(total, f"write {ds.name}", progress) as bar:
        for split, (X, y) in splits.items():

            def rows(X=X, y=y, split=split) -> Iterator[tuple[bytes, int]]:
                for i in range(X.shape[0]):
                    q = _quantise(X[i], f"X_{split}[{i}]")
                    yield _encode_uint8(_chw_to_pixels(q), fmt, quality), int(y[i])

            counts[split] = _write_split(
                fs, _join(root, split), rows(), rows_per_file, rows_per_group, bar
            )
    _write_meta(
        fs,
        root,
        {
            "format": FORMAT,
            "version": VERSION,
            "name": ds.name,
            "channels": c,
            "height": h,
            "width": w,
            "encoding": fmt.lower(),
            "classes": list(ds.classes),
            "splits": counts,
        },
    )
    logger.info("wrote parquet data set %r to %s: %s", ds.name, out, counts)
    return _result_path(out, root, local)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------
class RowGroup(NamedTuple):
    """One row group: ``(file path inside the file system, row group index, number of rows)``."""

    file: str
    index: int
    num_rows: int


class GroupSlice(NamedTuple):
    """Rows ``start:stop`` (offsets inside the row group) of row group ``index`` of ``file``."""

    file: str
    index: int
    start: int
    stop: int


@dataclasses.dataclass(frozen=True, eq=False)
class ParquetManifest:
    """What a parquet data set holds and where, built from ``dataset.json`` and file footers.

    Small and picklable (pyarrow file systems pickle), so a driver can open the set once and
    ship the manifest to Ray workers, each of which then calls :func:`read_rows` on its rows.

    Attributes
    ----------
    root : str
        The path or URL the set was opened from.
    filesystem : pyarrow.fs.FileSystem
        File system the paths in ``groups`` belong to.
    name, encoding : str
        From ``dataset.json``.
    channels : int
        1 or 3.
    height, width : int or None
        Image size; ``None`` when the images vary in size (reading needs ``size`` then).
    classes : tuple of str
        Class names.
    groups : dict
        Split -> list of :class:`RowGroup` in global row order.
    """

    root: str
    filesystem: pafs.FileSystem
    name: str
    channels: int
    height: int | None
    width: int | None
    encoding: str
    classes: tuple[str, ...]
    groups: dict[str, list[RowGroup]]
    _starts: dict[str, list[int]] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        starts = {}
        for split, groups in self.groups.items():
            offsets = [0]
            for g in groups:
                offsets.append(offsets[-1] + g.num_rows)
            starts[split] = offsets
        object.__setattr__(self, "_starts", starts)

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names listed in ``dataset.json``."""
        return tuple(self.groups)

    def _split(self, split: str) -> str:
        if split not in self.groups and split not in _SPLITS:
            raise ValueError(
                f"{self.root}: unknown split {split!r}; available: {sorted(self.groups)}"
            )
        return split

    def rows(self, split: str) -> int:
        """Number of rows of ``split`` (0 for an absent ``"test"`` split)."""
        split = self._split(split)
        return self._starts[split][-1] if split in self._starts else 0

    def groups_for(self, split: str, start: int, stop: int) -> list[GroupSlice]:
        """The row groups covering global rows ``start:stop`` of ``split``, in order, with the
        offsets to keep inside each, so a reader touches nothing else.

        Raises
        ------
        ValueError
            Unless ``0 <= start <= stop <= rows(split)``.
        """
        n = self.rows(split)
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= n:
            raise ValueError(
                f"rows {start}:{stop} out of range for split {split!r} with {n} rows "
                "(need 0 <= start <= stop <= rows)"
            )
        if start == stop:
            return []
        offsets = self._starts[split]
        out = []
        k = bisect.bisect_right(offsets, start) - 1
        while k < len(offsets) - 1 and offsets[k] < stop:
            g = self.groups[split][k]
            lo, hi = max(start, offsets[k]), min(stop, offsets[k + 1])
            if hi > lo:
                out.append(GroupSlice(g.file, g.index, lo - offsets[k], hi - offsets[k]))
            k += 1
        return out

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.rows(s)}" for s in self.groups)
        return (
            f"ParquetManifest(root={self.root!r}, name={self.name!r}, "
            f"shape=({self.channels}, {self.height}, {self.width}), {sizes})"
        )


def _image_column_ok(field: pa.Field) -> bool:
    t = field.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        if idx >= 0:
            inner = t.field(idx).type
            return pa.types.is_binary(inner) or pa.types.is_large_binary(inner)
    return False


def _check_schema(schema: pa.Schema, path: str) -> None:
    names = schema.names
    if "image" not in names or "label" not in names:
        raise ValueError(f"{path}: parquet file needs columns 'image' and 'label'; has {names}")
    if not _image_column_ok(schema.field("image")):
        raise ValueError(
            f"{path}: column 'image' must be binary or struct<bytes: binary, path: string>, "
            f"got {schema.field('image').type}"
        )
    if not pa.types.is_integer(schema.field("label").type):
        raise ValueError(
            f"{path}: column 'label' must be an integer type, got {schema.field('label').type}"
        )


def _read_meta(fs: pafs.FileSystem, root: str, display: str) -> dict:
    path = _join(root, _META_FILE)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(
            f"{display}: no {_META_FILE}, so this is not a {FORMAT} data set (or its writing "
            "did not finish); write one with ray_convrfm.data.parquet.write_parquet_dataset or "
            "convert, or add a dataset.json as described in the ray_convrfm.data.parquet docstring"
        )
    with fs.open_input_stream(path) as fh:
        raw = fh.read()
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{display}/{_META_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{display}/{_META_FILE}: format must be {FORMAT!r}, got {found!r}")
    version = meta.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise ValueError(
            f"{display}/{_META_FILE}: unsupported version {version!r} (this reader handles "
            f"1..{VERSION}; upgrade ray_convrfm)"
        )
    missing = [k for k in ("channels", "classes", "splits") if k not in meta]
    if missing:
        raise ValueError(f"{display}/{_META_FILE}: missing keys {missing}")
    if meta["channels"] not in (1, 3):
        raise ValueError(
            f"{display}/{_META_FILE}: channels must be 1 or 3, got {meta['channels']!r}"
        )
    for key in ("height", "width"):
        v = meta.get(key)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(
                f"{display}/{_META_FILE}: {key} must be a positive integer or null, got {v!r}"
            )
    if not isinstance(meta["splits"], dict) or not all(
        isinstance(v, int) and v >= 0 for v in meta["splits"].values()
    ):
        raise ValueError(
            f"{display}/{_META_FILE}: splits must map split names to row counts, "
            f"got {meta['splits']!r}"
        )
    return meta


def open_parquet_dataset(path: str | os.PathLike[str]) -> ParquetManifest:
    """Open a parquet data set: read ``dataset.json`` and the footers of its files.

    No image bytes are read, so this is cheap even for ImageNet-sized sets on object storage.

    Raises
    ------
    FileNotFoundError
        If ``dataset.json`` is missing.
    ValueError
        If ``dataset.json`` has the wrong format or version, a file lacks the ``image`` or
        ``label`` column, or a split's files hold another number of rows than recorded.
    """
    display = os.fspath(path)
    fs, root, _ = _filesystem(path)
    meta = _read_meta(fs, root, display)
    groups: dict[str, list[RowGroup]] = {}
    for split, expected in meta["splits"].items():
        files = _list_parquet(fs, _join(root, split))
        split_groups = []
        for file in files:
            with fs.open_input_file(file) as fh:
                pf = pq.ParquetFile(fh)
                _check_schema(pf.schema_arrow, file)
                md = pf.metadata
                split_groups.extend(
                    RowGroup(file, i, md.row_group(i).num_rows) for i in range(md.num_row_groups)
                )
        found = sum(g.num_rows for g in split_groups)
        if found != expected:
            raise ValueError(
                f"{display}: split {split!r} should have {expected} rows per {_META_FILE} but "
                f"its {len(files)} parquet file(s) hold {found} (missing or stale shards?)"
            )
        groups[split] = split_groups
    h, w = meta.get("height"), meta.get("width")
    return ParquetManifest(
        root=display,
        filesystem=fs,
        name=str(meta.get("name") or Path(root).name or "parquet"),
        channels=int(meta["channels"]),
        height=None if h is None else int(h),
        width=None if w is None else int(w),
        encoding=str(meta.get("encoding", "png")),
        classes=tuple(str(c) for c in meta["classes"]),
        groups=groups,
    )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _image_bytes(column: pa.ChunkedArray) -> list[bytes]:
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")
    return column.to_pylist()


def read_rows(
    manifest_or_path: ParquetManifest | str | os.PathLike[str],
    split: str,
    start: int,
    stop: int,
    size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read rows ``start:stop`` of ``split``, touching only the row groups that cover them.

    This is the call a Ray worker makes for its own shard: other row groups are never read.

    Parameters
    ----------
    manifest_or_path : ParquetManifest or path-like or URL
        An opened set (preferred when called repeatedly) or its root.
    split : str
        ``"train"``, ``"test"`` or another split of ``dataset.json``.
    start, stop : int
        Global row range, ``0 <= start <= stop <= rows(split)``.
    size : (H, W), optional
        Resize every image to this size (bilinear). Without it, every image must have the size
        recorded in ``dataset.json``.

    Returns
    -------
    X : np.ndarray
        ``float32`` of shape ``(stop - start, C, H, W)``, pixels in ``[0, 1]``.
    y : np.ndarray
        ``int64`` labels of shape ``(stop - start,)``.

    Raises
    ------
    ValueError
        On a bad range, an undecodable image, a null label, or an image of another size than
        recorded (when ``size`` is not given); the message names the file and row.
    """
    m = (
        manifest_or_path
        if isinstance(manifest_or_path, ParquetManifest)
        else open_parquet_dataset(manifest_or_path)
    )
    size = _check_size(size)
    slices = m.groups_for(split, start, stop)
    if size is None:
        if m.height is None or m.width is None:
            raise ValueError(
                f"{m.root}: images vary in size (no height/width in {_META_FILE}); "
                "pass size=(H, W)"
            )
        target = (m.height, m.width)
    else:
        target = size
    n = int(stop) - int(start)
    X = np.empty((n, m.channels, *target), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    row = 0
    k = 0
    while k < len(slices):
        file = slices[k].file
        with m.filesystem.open_input_file(file) as fh:
            pf = pq.ParquetFile(fh)
            while k < len(slices) and slices[k].file == file:  # one open per file
                s = slices[k]
                table = pf.read_row_group(s.index, columns=["image", "label"])
                table = table.slice(s.start, s.stop - s.start)
                labels = table.column("label")
                if labels.null_count:
                    raise ValueError(f"{file}: row group {s.index} has null labels")
                y[row : row + table.num_rows] = labels.to_numpy().astype(np.int64, copy=False)
                for j, data in enumerate(_image_bytes(table.column("image"))):
                    where = f"{file}: row group {s.index}, row {s.start + j}"
                    if data is None:
                        raise ValueError(f"{where}: image is null")
                    try:
                        pixels = _decode_uint8(data, m.channels, size)
                    except ValueError as exc:
                        raise ValueError(f"{where}: {exc}") from exc
                    if pixels.shape[:2] != target:
                        raise ValueError(
                            f"{where}: image is {pixels.shape[0]}x{pixels.shape[1]}, but "
                            f"{_META_FILE} says {target[0]}x{target[1]}; pass size=(H, W) to "
                            "resize"
                        )
                    chw = pixels[None] if pixels.ndim == 2 else np.transpose(pixels, (2, 0, 1))
                    np.divide(chw, np.float32(255.0), out=X[row + j])
                row += table.num_rows
                k += 1
    return X, y


def load_parquet(
    path: str | os.PathLike[str] | ParquetManifest, size: tuple[int, int] | None = None
) -> ImageDataset:
    """Read a whole parquet data set into memory as an :class:`ImageDataset`.

    Meant for sets that fit in memory (and for tests); large sets are read in shards with
    :func:`read_rows`.
    """
    m = path if isinstance(path, ParquetManifest) else open_parquet_dataset(path)
    X_tr, y_tr = read_rows(m, "train", 0, m.rows("train"), size=size)
    X_te, y_te = read_rows(m, "test", 0, m.rows("test"), size=size)
    classes = m.classes
    if not classes:
        top = max((int(v.max()) for v in (y_tr, y_te) if v.size), default=-1)
        classes = tuple(str(k) for k in range(top + 1))
    logger.info("loaded parquet data set %s: %d train, %d test", m.root, len(y_tr), len(y_te))
    return ImageDataset(X_tr, y_tr, X_te, y_te, name=m.name, classes=classes)


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _FolderImage:
    path: Path
    label: int
    fmt: str | None  # PIL format of the file
    mode: str
    height: int
    width: int


def _folder_splits(directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"folder data set {directory} is not a directory")
    if (directory / "train").is_dir() or (directory / "test").is_dir():
        if not (directory / "train").is_dir():
            raise ValueError(f"{directory}: has a test/ folder but no train/ folder")
        return {s: directory / s for s in _SPLITS if (directory / s).is_dir()}
    return {"train": directory}


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(
        p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )


def _scan_folder(directory: Path) -> tuple[dict[str, list[_FolderImage]], tuple[str, ...]]:
    """List every image of a folder-per-class tree with its header (size, mode, format)."""
    from PIL import Image

    splits = _folder_splits(directory)
    classes = tuple(sorted({c for d in splits.values() for c in _class_dirs(d)}))
    if not classes:
        raise ValueError(
            f"{directory}: no class folders found; expected {directory}/[train|test]/<class>/"
            "*.png|jpg|jpeg"
        )
    index = {c: k for k, c in enumerate(classes)}
    out: dict[str, list[_FolderImage]] = {}
    for split, split_dir in splits.items():
        items = []
        for cls in _class_dirs(split_dir):
            files = sorted(
                p
                for p in (split_dir / cls).rglob("*")
                if p.is_file()
                and p.suffix.lower() in _FOLDER_SUFFIXES
                and not p.name.startswith(".")
            )
            for p in files:
                try:
                    with Image.open(p) as im:  # lazy: reads the header only
                        items.append(
                            _FolderImage(p, index[cls], im.format, im.mode, im.height, im.width)
                        )
                except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
                    raise ValueError(f"{p}: not a readable image ({exc})") from exc
        out[split] = items
    if not out.get("train"):
        raise ValueError(f"{directory}: no *.png/*.jpg/*.jpeg images in the train split")
    return out, classes


def _convert_folder(
    directory: Path,
    out: str | os.PathLike[str],
    fmt: str,
    size: tuple[int, int] | None,
    channels: int | None,
    quality: int,
    rows_per_file: int,
    rows_per_group: int,
    shuffle_seed: int | None,
    name: str | None,
    overwrite: bool,
    progress: bool,
) -> Path | str:
    images, classes = _scan_folder(directory)
    first = images["train"][0]
    ref_c = 1 if first.mode in _GREY_MODES else 3
    c = ref_c if channels is None else _check_channels(channels)
    h, w = size if size is not None else (first.height, first.width)
    if size is None or channels is None:
        for split_items in images.values():
            for im in split_items:
                im_c = 1 if im.mode in _GREY_MODES else 3
                bad_size = size is None and (im.height, im.width) != (h, w)
                bad_c = channels is None and im_c != c
                if bad_size or bad_c:
                    raise ValueError(
                        f"{im.path}: image is {im.height}x{im.width} with {im_c} channel(s), "
                        f"but the first image {first.path} is {first.height}x{first.width} "
                        f"with {ref_c}; pass size=(H, W) (and channels=1 or 3) to resize and "
                        "convert every image"
                    )
    keep_mode = "L" if c == 1 else "RGB"

    def rows(items: Sequence[_FolderImage]) -> Iterator[tuple[bytes, int]]:
        for im in items:
            data = im.path.read_bytes()
            unchanged = (
                im.fmt == fmt
                and data.startswith(_MAGIC[fmt])
                and im.mode == keep_mode
                and (im.height, im.width) == (h, w)
            )
            if not unchanged:
                try:
                    pixels = _decode_uint8(data, c, (h, w))
                except ValueError as exc:
                    raise ValueError(f"{im.path}: {exc}") from exc
                data = _encode_uint8(pixels, fmt, quality)
            yield data, im.label

    if shuffle_seed is not None:
        # Folder order is class by class; contiguous worker shards need mixed classes.
        rng = np.random.default_rng(shuffle_seed)
        images = {s: [items[i] for i in rng.permutation(len(items))] for s, items in images.items()}
    splits = [s for s in _SPLITS if images.get(s)]
    rows_per_file, rows_per_group = _check_layout(rows_per_file, rows_per_group)
    fs, root, local = _prepare_output(out, splits, overwrite)
    ds_name = name or directory.resolve().name or "folder"
    counts = {}
    with _progress_bar(sum(len(images[s]) for s in splits), f"convert {ds_name}", progress) as bar:
        for split in splits:
            counts[split] = _write_split(
                fs, _join(root, split), rows(images[split]), rows_per_file, rows_per_group, bar
            )
    _write_meta(
        fs,
        root,
        {
            "format": FORMAT,
            "version": VERSION,
            "name": ds_name,
            "channels": c,
            "height": int(h),
            "width": int(w),
            "encoding": fmt.lower(),
            "classes": list(classes),
            "splits": counts,
        },
    )
    logger.info("converted folder %s to parquet at %s: %s", directory, out, counts)
    return _result_path(out, root, local)


def _resize_dataset(ds: ImageDataset, size: tuple[int, int]) -> ImageDataset:
    """Resize every image (8-bit, bilinear), as the folder path does, before writing."""
    if ds.image_shape[1:] == size:
        return ds
    c = ds.image_shape[0]
    if c not in (1, 3):
        raise ValueError(f"{ds.name}: images must have 1 or 3 channels to encode, got {c}")
    from PIL import Image

    def resize(X: np.ndarray, split: str) -> np.ndarray:
        out = np.empty((X.shape[0], c, *size), dtype=np.float32)
        for i in range(X.shape[0]):
            pixels = _chw_to_pixels(_quantise(X[i], f"{ds.name}: X_{split}[{i}]"))
            im = Image.fromarray(pixels, mode="L" if c == 1 else "RGB")
            r = np.asarray(im.resize(size[::-1], Image.Resampling.BILINEAR), dtype=np.uint8)
            out[i] = (r[None] if r.ndim == 2 else np.transpose(r, (2, 0, 1))) / np.float32(255)
        return out

    return dataclasses.replace(
        ds, X_train=resize(ds.X_train, "train"), X_test=resize(ds.X_test, "test")
    )


def convert(
    source_spec: str,
    out: str | os.PathLike[str],
    encoding: str = "png",
    *,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
    quality: int = 95,
    rows_per_file: int = 16384,
    rows_per_group: int = 1024,
    shuffle_seed: int | None = 0,
    name: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> Path | str:
    """Convert a data set to the parquet layout of this module.

    Parameters
    ----------
    source_spec : str
        Anything :func:`ray_convrfm.data.datasets.load_dataset` accepts (``"digits"``,
        ``"fashion-mnist"``, ``"idx:DIR"``, ``"npz:PATH"``, ``PATH.npz``), or ``"folder:DIR"``:
        a folder-per-class tree ``DIR/train/<class>/*.png|jpg|jpeg`` (plus optionally
        ``DIR/test/<class>/...``); without ``train``/``test`` subfolders ``DIR`` itself is the
        train split. Folder classes are the sorted class-folder names of both splits.
    out : path-like or URL
        Data set root.
    encoding : str
        ``"png"`` or ``"jpeg"``. Folder images already in that format, mode (``L``/``RGB``) and
        size are stored byte for byte; others are decoded and re-encoded.
    size : (H, W), optional
        Resize every image to this size (bilinear). Without it, all folder images must have the
        size of the first one.
    channels : int, optional
        Folder sources: convert every image to 1 or 3 channels. Without it, all images must
        have the channel count of the first one.
    quality : int
        JPEG quality for encoded or re-encoded images.
    rows_per_file, rows_per_group, progress, overwrite
        As in :func:`write_parquet_dataset`.
    shuffle_seed : int or None
        Folder sources: shuffle the rows of each split with ``np.random.default_rng(seed)``,
        because folder order is class by class and contiguous row ranges (one per worker) would
        each see few classes; ``None`` keeps class-then-file-name order. Other sources keep
        their loader's order.
    name : str, optional
        Data set name (default: the loader's name, or the folder's name).
    root, download
        Passed to :func:`~ray_convrfm.data.datasets.load_dataset` (Fashion-MNIST only).

    Returns
    -------
    Path or str
        As :func:`write_parquet_dataset`.

    Raises
    ------
    ValueError
        For an unknown spec, folder images of differing size or channel count (naming the first
        mismatched file), unreadable images, or pixels outside ``[0, 1]``.
    """
    fmt = _format_of(encoding)
    size = _check_size(size)
    s = source_spec.strip()
    if s.lower().startswith("folder:") and len(s) > len("folder:"):
        return _convert_folder(
            Path(s[len("folder:"):]).expanduser(),
            out,
            fmt,
            size,
            channels,
            quality,
            rows_per_file,
            rows_per_group,
            shuffle_seed,
            name,
            overwrite,
            progress,
        )
    try:
        ds = load_dataset(s, root=root, download=download)
    except ValueError as exc:
        if str(exc).startswith("unknown data set spec"):
            raise ValueError(f"{exc}, or \"folder:DIR\"") from exc
        raise
    if channels is not None and _check_channels(channels) != ds.image_shape[0]:
        raise ValueError(
            f"{ds.name}: channels={channels} requested but the images have "
            f"{ds.image_shape[0]}; channel conversion is supported for folder sources only"
        )
    if size is not None:
        ds = _resize_dataset(ds, size)
    if name:
        ds = dataclasses.replace(ds, name=name)
    return write_parquet_dataset(
        ds,
        out,
        encoding=fmt.lower(),
        rows_per_file=rows_per_file,
        rows_per_group=rows_per_group,
        progress=progress,
        quality=quality,
        overwrite=overwrite,
    )


# --------------------------------------------------------------------------------------------
# Lazy images for fits on Ray workers
# --------------------------------------------------------------------------------------------
#: Below this many row groups the validation split is drawn in chunks of rows, not groups.
MIN_GROUPS_FOR_GROUP_SPLIT = 10


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, adjacent ranges joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@dataclasses.dataclass(frozen=True)
class ParquetImages:
    """The images of one split of a parquet data set, read only where they are needed.

    Pass it to ``ConvRFM.fit`` / ``DeepConvRFM.fit`` in place of an array: the driver reads
    the labels column and the validation rows; each Ray worker reads the row groups of its own
    shard (``ParquetRows``) and decodes them itself.

    Parameters
    ----------
    manifest : an opened data set (``open_parquet_dataset``)
    split : "train", "test", ...
    size : (H, W) to resize every image to, or None for the recorded size
    limit : use only the first ``limit`` rows
    """

    manifest: ParquetManifest
    split: str = "train"
    size: tuple[int, int] | None = None
    limit: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], split: str = "train",
             size: tuple[int, int] | None = None, limit: int | None = None) -> ParquetImages:
        return cls(open_parquet_dataset(path), split, _check_size(size), limit)

    def __len__(self) -> int:
        n = self.manifest.rows(self.split)
        return n if self.limit is None else min(n, int(self.limit))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(n, C, H, W), as an image array would have."""
        h, w = self.size or (self.manifest.height, self.manifest.width)
        if h is None or w is None:
            raise ValueError(f"{self.manifest.root}: images vary in size; pass size=(H, W)")
        return (len(self), self.manifest.channels, int(h), int(w))

    def labels(self) -> np.ndarray:
        """All labels, reading only the ``label`` column."""
        m, n = self.manifest, len(self)
        y = np.empty(n, dtype=np.int64)
        row = 0
        for s in m.groups_for(self.split, 0, n):
            with m.filesystem.open_input_file(s.file) as fh:
                table = pq.ParquetFile(fh).read_row_group(s.index, columns=["label"])
            part = table.column("label").to_numpy()[s.start : s.stop]
            y[row : row + len(part)] = part
            row += len(part)
        return y

    def read(self, ranges: Sequence[tuple[int, int]] | None = None) -> tuple[np.ndarray,
                                                                             np.ndarray]:
        """Images and labels of the row ``ranges`` (default: all rows), concatenated."""
        ranges = [(0, len(self))] if ranges is None else list(ranges)
        parts = [read_rows(self.manifest, self.split, a, b, size=self.size) for a, b in ranges]
        if not parts:
            n, c, h, w = self.shape
            return np.zeros((0, c, h, w), np.float32), np.zeros(0, np.int64)
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def split_validation(self, fraction: float,
                         rng: np.random.Generator) -> tuple[list[tuple[int, int]],
                                                            list[tuple[int, int]]]:
        """(fit ranges, validation ranges): a seeded random ``fraction`` of the rows held out
        in whole row groups, so the driver reads only the validation groups and each worker
        only its own. Sets of fewer than ``MIN_GROUPS_FOR_GROUP_SPLIT`` groups are split in
        chunks of about 1% of the rows instead (they are small enough to read anywhere)."""
        n = len(self)
        units = [(g.start, g.stop) for g in _group_ranges(self.manifest, self.split, n)]
        if len(units) < MIN_GROUPS_FOR_GROUP_SPLIT:
            chunk = max(1, n // 100)
            units = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
        if len(units) < 2:
            raise ValueError(f"{n} rows cannot be split into fit and validation parts")
        want = max(1, int(round(fraction * n)))
        val, held = [], 0
        for k in rng.permutation(len(units)):
            if held >= want or len(val) == len(units) - 1:
                break
            val.append(units[k])
            held += units[k][1] - units[k][0]
        held_out = set(val)
        return _merge(u for u in units if u not in held_out), _merge(val)


class _Range(NamedTuple):
    start: int
    stop: int


def _group_ranges(m: ParquetManifest, split: str, n: int) -> list[_Range]:
    """Global row ranges of the row groups, clipped to the first n rows."""
    out, row = [], 0
    for g in m.groups[split] if split in m.groups else []:
        if row >= n:
            break
        out.append(_Range(row, min(row + g.num_rows, n)))
        row += g.num_rows
    return out


@dataclasses.dataclass(frozen=True)
class ParquetRows:
    """Some rows of ``ParquetImages`` (sorted ranges): a shard description a worker loads.

    Small and picklable: a Ray actor receives it instead of pixels and calls ``load``; a
    restarted actor loads it again.
    """

    images: ParquetImages
    ranges: tuple[tuple[int, int], ...]
    dtype: str = "float32"

    def __len__(self) -> int:
        return sum(b - a for a, b in self.ranges)

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return self.images.shape[1:]

    def slice(self, start: int, stop: int) -> ParquetRows:
        """Rows start..stop of this selection (positions counted across the ranges)."""
        out, pos = [], 0
        for a, b in self.ranges:
            lo, hi = max(start, pos), min(stop, pos + b - a)
            if hi > lo:
                out.append((a + lo - pos, a + hi - pos))
            pos += b - a
        return dataclasses.replace(self, ranges=tuple(out))

    def load(self) -> np.ndarray:
        """Read and decode these rows: (len, C, H, W) in ``dtype``."""
        return self.images.read(self.ranges)[0].astype(self.dtype, copy=False)
