"""Image data sets stored as parquet shards: the layout, its writer and its reader.

Large image sets fit neither in one ``.npz`` file nor in one worker's memory, so they are stored
as public mirrors store them: parquet rows of an encoded image and a label. The driver plans
shards from the file footers (:func:`open_parquet_dataset`), a Ray worker reads only the row
groups of its rows (:func:`read_rows`). A set is a directory or a URL (``s3://``, ``gs://``, ...
as ``pyarrow.fs.FileSystem.from_uri`` takes them, or any fsspec URL)::

    ROOT/dataset.json       {"format": "ray_convrfm-parquet", "version": 1, "name": "digits",
                             "channels": 1, "height": 8, "width": 8, "encoding": "png",
                             "classes": ["0", ...], "splits": {"train": 1500, "test": 297},
                             "files": {"train": ["part-0.parquet", ...], ...}}
    ROOT/train/part-0.parquet, part-1.parquet, ...   (columns image, label)
    ROOT/test/part-0.parquet, ...                    (optional)

``height``/``width`` are ``null`` for images of varying size (reading then needs ``size``). A
split is the files ``"files"`` names for it or, in a ``dataset.json`` without ``"files"`` (a
mirror's, written by hand), every ``*.parquet`` file of its folder in natural order (``part-2``
before ``part-10``) but names starting with ``.``/``_``. Their footers must hold the recorded
rows, so a missing or stale shard is caught on opening; ``dataset.json`` is written last, so an
interrupted write is too. ``image`` is PNG or JPEG bytes (``binary``, or HuggingFace's
``struct<bytes, path>``), ``label`` an integer class in ``0 .. len(classes) - 1`` (others are
refused on reading). Pixels are stored as ``round(255 * x)``: exact in PNG, lossy in JPEG.
Overwriting a set deletes only the files its ``dataset.json`` names (and those an interrupted
write had announced in ``ROOT/_writing.json``), never other files of its folders.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ray_convrfm.data import images as img
from ray_convrfm.data.images import ImageDataset, decode_image, default_classes, encode_image
from ray_convrfm.data.parquet_fs import is_file as _is_file
from ray_convrfm.data.parquet_fs import join as _join
from ray_convrfm.data.parquet_fs import list_parquet as _list_parquet
from ray_convrfm.data.parquet_fs import natural_key as _natural_key
from ray_convrfm.data.parquet_fs import overlaps, reading, resolve
from ray_convrfm.data.parquet_fs import read_json as _read_json
from ray_convrfm.data.parquet_fs import write_json as _write_json

__all__ = ["FORMAT", "VERSION", "GroupSlice", "ParquetManifest", "RowGroup", "check_labels",
           "decode_image", "encode_image", "load_parquet", "open_parquet_dataset", "read_rows",
           "write_parquet_dataset"]

logger = logging.getLogger(__name__)

#: Value of ``"format"`` in ``dataset.json``.
FORMAT = "ray_convrfm-parquet"
#: Highest layout version this module reads (and the one it writes).
VERSION = 1
META_FILE = "dataset.json"
#: Written before a set's files, removed after its ``dataset.json``: the files an interrupted
#: write may have left, which ``overwrite`` may delete.
PENDING_FILE = "_writing.json"
SPLITS = ("train", "test")
_SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64())])
_PARQUET = pads.ParquetFileFormat()
# Encoded images are incompressible and unique: no dictionary, no statistics for them.
_WRITE_OPTIONS = {"use_dictionary": ["label"], "write_statistics": ["label"]}


def _batches(rows: Iterable[tuple[bytes, int]], size: int, bar=None
             ) -> Iterator[pa.RecordBatch]:
    it = iter(rows)
    while chunk := list(itertools.islice(it, size)):
        if bar is not None:
            bar.update(len(chunk))
        images, labels = zip(*chunk, strict=True)
        yield pa.record_batch([pa.array(images, pa.binary()), pa.array(labels, pa.int64())],
                              schema=_SCHEMA)


def _planned_files(n: int, rows_per_file: int) -> list[str]:
    """The names ``write_dataset`` gives the files of a split of ``n`` rows, written in order."""
    return [f"part-{i}.parquet" for i in range(-(-int(n) // int(rows_per_file)))]


def _written_files(fs: pafs.FileSystem, root: str) -> dict[str, set[str]]:
    """Per split folder, the file names ``dataset.json`` and ``_writing.json`` list at ``root``
    (plain names only: a manifest cannot point a deletion outside its split folders)."""
    out: dict[str, set[str]] = {}
    for name in (META_FILE, PENDING_FILE):
        try:
            doc = _read_json(fs, _join(root, name))
        except ValueError:
            continue
        files = doc.get("files") if isinstance(doc, dict) else None
        for split, names in (files.items() if isinstance(files, dict) else ()):
            if _plain_split(split) and isinstance(names, list):
                out.setdefault(split, set()).update(n for n in names if _plain_file(n))
    return out


def _plain_split(name: object) -> bool:
    return isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None


def _plain_file(name: object) -> bool:  # a *.parquet name inside a split folder, no ".."
    return (isinstance(name, str) and name.endswith(".parquet") and "/" not in name
            and "\\" not in name and not name.startswith("."))


def write_encoded(out: str | os.PathLike[str], meta: dict,
                  splits: dict[str, tuple[int, Iterable[tuple[bytes, int]]]],
                  rows_per_file: int = 16384, rows_per_group: int = 1024,
                  overwrite: bool = False, progress: bool = False) -> Path | str:
    """Write the ``(row count, encoded (image, label) rows)`` of each split, streamed one row
    group at a time, then ``dataset.json`` (``meta`` plus format, version, row counts and the
    files of each split). See :func:`write_parquet_dataset` for the arguments."""
    from tqdm.auto import tqdm

    counts = {split: n for split, (n, _) in splits.items()}
    fs, root, local, group = begin_write(out, counts, rows_per_file, rows_per_group, overwrite)
    options = _PARQUET.make_write_options(**_WRITE_OPTIONS)
    written: dict[str, list[str]] = {split: [] for split in splits}
    with tqdm(total=sum(counts.values()), desc=f"write {meta['name']}", disable=not progress,
              leave=False, unit="img") as bar:
        for split, (_, rows) in splits.items():
            pads.write_dataset(
                pa.RecordBatchReader.from_batches(_SCHEMA, _batches(rows, group, bar)),
                _join(root, split), filesystem=fs, format=_PARQUET, file_options=options,
                basename_template="part-{i}.parquet", max_rows_per_file=int(rows_per_file),
                max_rows_per_group=group, min_rows_per_group=group, preserve_order=True,
                existing_data_behavior="overwrite_or_ignore",
                file_visitor=lambda f, s=split: written[s].append(f.path.rsplit("/", 1)[-1]))
    finish_write(out, fs, root, meta, counts, written)
    return Path(root) if local else os.fspath(out)


def begin_write(out: str | os.PathLike[str], counts: dict[str, int], rows_per_file: int,
                rows_per_group: int, overwrite: bool) -> tuple[pafs.FileSystem, str, bool, int]:
    """Make room at ``out`` for a set of ``counts`` rows per split, in files named as
    :func:`write_encoded` names them (refused as documented there); the planned files are
    announced in ``_writing.json`` before the old set's files are deleted. Returns ``(file
    system, root, is local, rows per row group)``: whoever writes the files calls
    :func:`finish_write` after them."""
    for arg, value in (("rows_per_file", rows_per_file), ("rows_per_group", rows_per_group)):
        if int(value) != value or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    group = int(min(rows_per_group, rows_per_file))
    fs, root, local = resolve(out)
    meta_path, pending_path = _join(root, META_FILE), _join(root, PENDING_FILE)
    old = {split: _list_parquet(fs, _join(root, split)) for split in {*SPLITS, *counts}}
    has_meta = _is_file(fs, meta_path)
    n_old = sum(len(files) for files in old.values())
    if (n_old or has_meta) and not overwrite:
        raise FileExistsError(f"{out} already holds a parquet data set ({n_old} parquet file(s)"
                              f"{', dataset.json' if has_meta else ''}); pass overwrite=True")
    ours = _written_files(fs, root) if overwrite else {}
    planned = {split: _planned_files(n, rows_per_file) for split, n in counts.items()}
    for split, names in planned.items():  # never write over a file this module did not write
        clash = [_join(root, split, n) for n in names if n not in ours.get(split, ())
                 and fs.get_file_info(_join(root, split, n)).type != pafs.FileType.NotFound]
        if clash:
            why = (f"its {META_FILE} lists no files (an older writer's): delete that set's "
                   "files yourself" if has_meta and not ours else
                   f"no {META_FILE} of this writer names them: move or delete them")
            raise FileExistsError(f"{out}: {len(clash)} file(s) in the way of the new set, e.g. "
                                  f"{clash[0]}, that overwrite does not delete; {why}")
    fs.create_dir(root, recursive=True)
    _write_json(fs, pending_path, {"files": {  # before any file is deleted or written
        s: sorted(set(planned.get(s, ())) | ours.get(s, set()), key=_natural_key)
        for s in sorted({*planned, *ours})}})
    if has_meta:
        fs.delete_file(meta_path)  # before its files, so a half-replaced set is never readable
    for split, names in ours.items():
        for name in sorted(names, key=_natural_key):
            if _is_file(fs, path := _join(root, split, name)):
                fs.delete_file(path)
    return fs, root, local, group


def write_part(fs: pafs.FileSystem, path: str, rows: Iterable[tuple[bytes, int]],
               group: int) -> int:
    """Write one file of the layout, as :func:`write_encoded` writes them (encoded rows in row
    groups of ``group``), streamed one row group at a time; returns its row count."""
    import pyarrow.parquet as pq

    n = 0
    with fs.open_output_stream(path) as sink, \
            pq.ParquetWriter(sink, _SCHEMA, **_WRITE_OPTIONS) as writer:
        for batch in _batches(rows, group):
            writer.write_batch(batch, row_group_size=group)
            n += batch.num_rows
    return n


def finish_write(out: str | os.PathLike[str], fs: pafs.FileSystem, root: str, meta: dict,
                 counts: dict[str, int], files: dict[str, list[str]]) -> None:
    """``dataset.json`` (``meta``, format, version, ``counts`` and the ``files`` of each split),
    written last: from then on the set is readable; ``_writing.json`` goes."""
    _write_json(fs, _join(root, META_FILE), {
        "format": FORMAT, "version": VERSION, **meta, "splits": counts,
        "files": {s: sorted(names, key=_natural_key) for s, names in files.items()}})
    fs.delete_file(_join(root, PENDING_FILE))
    logger.info("wrote parquet data set %r to %s: %s", meta["name"], out, counts)


def write_parquet_dataset(ds: ImageDataset, out: str | os.PathLike[str], encoding: str = "png",
                          rows_per_file: int = 16384, rows_per_group: int = 1024,
                          progress: bool = False, *, quality: int = 95,
                          overwrite: bool = False) -> Path | str:
    """Write ``ds`` (1 or 3 channels, pixels in ``[0, 1]``) at the path or URL ``out``; returns
    the root (an absolute ``Path`` when local, else the URL). An empty test split is skipped.

    ``encoding``: ``"png"`` (lossless) or ``"jpeg"`` (``quality``). Files hold at most
    ``rows_per_file`` rows in row groups of ``rows_per_group``, the unit a worker reads.
    ``overwrite`` replaces a set at ``out`` (else ``FileExistsError``), deleting only the files
    its ``dataset.json`` names (a foreign file in the way is a ``FileExistsError``, and stays);
    ``progress`` shows a bar. Pixels 8 bits cannot store (NaN, outside ``[0, 1]``) raise a
    ``ValueError`` naming the image before anything is written.
    """
    fmt = img.format_of(encoding)
    c, h, w = ds.image_shape
    if c not in (1, 3):
        raise ValueError(f"{ds.name}: images must have 1 or 3 channels to encode, got {c}")
    splits = {"train": (ds.X_train, ds.y_train)}
    if len(ds.X_test):
        splits["test"] = (ds.X_test, ds.y_test)
    for split, (X, _) in splits.items():
        for i in range(0, len(X), 1024):  # in chunks: no full-size mask in memory
            ok = ((X[i : i + 1024] >= 0) & (X[i : i + 1024] <= 1)).reshape(-1, c * h * w)
            if not ok.all():
                j = i + int(np.argmin(ok.all(axis=1)))
                img.quantise(X[j], f"{ds.name}: X_{split}[{j}]")

    def rows(X: np.ndarray, y: np.ndarray, split: str) -> Iterator[tuple[bytes, int]]:
        for i in range(len(X)):
            q = img.quantise(X[i], f"X_{split}[{i}]")
            yield img.encode_uint8(img.hwc(q), fmt, quality), int(y[i])

    meta = {"name": ds.name, "channels": c, "height": h, "width": w, "encoding": fmt.lower(),
            "classes": list(ds.classes)}
    return write_encoded(out, meta, {s: (len(X), rows(X, y, s)) for s, (X, y) in splits.items()},
                         rows_per_file, rows_per_group, overwrite, progress)


class RowGroup(NamedTuple):
    """One row group: its file (path inside the file system), index in the file and size."""
    file: str
    index: int
    num_rows: int


class GroupSlice(NamedTuple):
    """Rows ``start:stop`` (offsets inside the group) of row group ``index`` of ``file``."""
    file: str
    index: int
    start: int
    stop: int


@dataclasses.dataclass(frozen=True, eq=False)
class ParquetManifest:
    """An opened data set: ``dataset.json`` and, per split, its row groups in row order. Small
    and picklable (as pyarrow file systems are): the driver ships it to the Ray workers, which
    call :func:`read_rows` on their rows. ``height``/``width`` are ``None`` for varying sizes.
    A Hugging Face set (``data.hf_parquet``) names its columns, and where its classes and size
    come from (for messages)."""

    root: str  # the path or URL it was opened from
    filesystem: pafs.FileSystem
    name: str
    channels: int
    height: int | None
    width: int | None
    encoding: str
    classes: tuple[str, ...]
    groups: dict[str, list[RowGroup]]
    image_column: str = "image"
    label_column: str = "label"
    meta_source: str = META_FILE  # under root: what states the classes
    size_source: str = f"{META_FILE} says"  # "image is 7x5, but <this> 6x5"

    def rows(self, split: str) -> int:
        """Number of rows of ``split`` (0 for an absent ``"test"`` split)."""
        if split not in self.groups and split not in SPLITS:
            raise ValueError(f"{self.root}: unknown split {split!r}; available: "
                             f"{sorted(self.groups)}")
        return sum(g.num_rows for g in self.groups.get(split, []))

    def groups_for(self, split: str, start: int, stop: int) -> list[GroupSlice]:
        """The row groups covering rows ``start:stop`` of ``split``, in order, with the offsets
        to keep inside each; ``0 <= start <= stop <= rows(split)`` or ``ValueError``."""
        n, start, stop = self.rows(split), int(start), int(stop)
        if not 0 <= start <= stop <= n:
            raise ValueError(f"rows {start}:{stop} out of range for split {split!r} with {n} "
                             "rows (need 0 <= start <= stop <= rows)")
        gs = self.groups.get(split, [])
        return [GroupSlice(gs[i].file, gs[i].index, lo, hi)
                for i, lo, hi in overlaps((g.num_rows for g in gs), start, stop)]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.rows(s)}" for s in self.groups)
        return (f"ParquetManifest(root={self.root!r}, name={self.name!r}, "
                f"shape=({self.channels}, {self.height}, {self.width}), {sizes})")


def check_schema(schema: pa.Schema, path: str, image: str = "image",
                 label: str = "label") -> None:
    """Refuse a file without an encoded-image column ``image`` and an integer ``label``."""
    if image not in schema.names or label not in schema.names:
        raise ValueError(f"{path}: parquet file needs columns {image!r} and {label!r}; "
                         f"has {schema.names}")
    image_type, label_type = schema.field(image).type, schema.field(label).type
    if pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0:
        image_type = image_type.field("bytes").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise ValueError(f"{path}: column {image!r} must be binary or struct<bytes: binary, "
                         f"path: string>, got {schema.field(image).type}")
    if not pa.types.is_integer(label_type):
        raise ValueError(f"{path}: column {label!r} must be an integer type, got {label_type}")


def _read_meta(fs: pafs.FileSystem, root: str, display: str) -> dict:
    where = f"{display}/{META_FILE}"
    if not _is_file(fs, _join(root, META_FILE)):
        raise FileNotFoundError(f"{display}: no {META_FILE}, so not a {FORMAT} data set (or its "
                                "writing did not finish); write one with ray_convrfm.data."
                                "parquet.convert, or see ray_convrfm.data.parquet_io")
    try:
        meta = _read_json(fs, _join(root, META_FILE))
    except ValueError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{where}: format must be {FORMAT!r}, got {found!r}")
    version, splits = meta.get("version"), meta.get("splits")
    h, w, c, classes = (meta.get(k) for k in ("height", "width", "channels", "classes"))
    checks = [
        (isinstance(version, int) and 1 <= version <= VERSION,
         f"unsupported version {version!r} (this reader handles 1..{VERSION}; upgrade it)"),
        (c in (1, 3), f"channels must be 1 or 3, got {c!r}"),
        (isinstance(classes, list), f"classes must be a list of names, got {classes!r}"),
        (all(v is None or (isinstance(v, int) and v >= 1) for v in (h, w)),
         f"height and width must be positive integers or null, got {h!r} and {w!r}"),
        (isinstance(splits, dict) and all(isinstance(v, int) and v >= 0 for v in splits.values())
         and all(_plain_split(k) for k in splits),
         f"splits must map split names to row counts, got {splits!r}"),
    ]
    files = meta.get("files")
    if files is not None:
        checks.append((
            isinstance(files, dict) and isinstance(splits, dict) and set(files) == set(splits)
            and all(isinstance(v, list) and all(_plain_file(n) for n in v)
                    and len(set(v)) == len(v) for v in files.values()),
            "files must map each split to a list of distinct *.parquet file names in its "
            f"folder, got {files!r}"))
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{where}: {message}")
    return meta


def open_parquet_dataset(path: str | os.PathLike[str]) -> ParquetManifest:
    """Open a data set from ``dataset.json`` and its files' footers, reading no image bytes.
    ``FileNotFoundError`` without ``dataset.json``; ``ValueError`` for a wrong format or version,
    a file without usable ``image`` and ``label`` columns, or a split of another row count."""
    display = os.fspath(path)
    fs, root, _ = resolve(path)
    meta = _read_meta(fs, root, display)
    groups: dict[str, list[RowGroup]] = {}
    for split, expected in meta["splits"].items():
        if "files" in meta:
            files = [_join(root, split, name) for name in meta["files"][split]]
            missing = [f for f, info in zip(files, fs.get_file_info(files), strict=True)
                       if info.type != pafs.FileType.File]
            if missing:
                raise FileNotFoundError(f"{display}: {META_FILE} names {len(missing)} file(s) "
                                        f"of split {split!r} that are missing, e.g. "
                                        f"{missing[0]}")
        else:
            files = _list_parquet(fs, _join(root, split))
        groups[split] = []
        for fragment in pads.dataset(files, format=_PARQUET, filesystem=fs).get_fragments():
            check_schema(fragment.physical_schema, fragment.path)
            groups[split] += [RowGroup(fragment.path, g.id, g.num_rows)
                              for g in fragment.row_groups]
        found = sum(g.num_rows for g in groups[split])
        if found != expected:
            raise ValueError(f"{display}: split {split!r} should have {expected} rows per "
                             f"{META_FILE} but its {len(files)} parquet file(s) hold {found} "
                             "(missing or stale shards?)")
    return ParquetManifest(display, fs, str(meta.get("name") or Path(root).name or "parquet"),
                           meta["channels"], meta.get("height"), meta.get("width"),
                           str(meta.get("encoding", "png")), tuple(map(str, meta["classes"])),
                           groups)


def check_labels(m: ParquetManifest, labels: np.ndarray, where: str) -> np.ndarray:
    """``labels`` when every one is a class of ``m`` (``0 .. len(classes) - 1``; any
    non-negative one when ``classes`` is empty), else a ``ValueError`` naming ``where``."""
    n = len(m.classes)
    bad = (labels < 0) | (labels >= n) if n else labels < 0
    if bad.any():
        values = np.unique(labels[bad]).tolist()
        known = f"the {n} classes (0..{n - 1})" if n else "classes (labels are >= 0)"
        raise ValueError(
            f"{where}: {int(bad.sum())} label(s) outside {known} of {m.root}/{m.meta_source}: "
            f"{values[:10]}{' ...' if len(values) > 10 else ''}; fix the labels, or the "
            "classes in the manifest")
    return labels


def read_slices(m: ParquetManifest, split: str, slices: list[GroupSlice], columns: list[str]
                ) -> Iterator[tuple[GroupSlice, pa.Table, np.ndarray]]:
    """Each slice with a table of its rows and its checked labels, reading only its row groups
    (one fragment per file, split by row group)."""
    for file, in_file in itertools.groupby(slices, key=lambda s: s.file):
        in_file = list(in_file)
        with reading(m.filesystem, file, "its footer"):
            fragment = _PARQUET.make_fragment(file, filesystem=m.filesystem,
                                              row_groups=[s.index for s in in_file])
            # by id: pyarrow (26) may give the row groups out of order (7, 8 as 8, 7)
            groups = {g.row_groups[0].id: g for g in fragment.split_by_row_group()}
        for s in in_file:
            with reading(m.filesystem, s.file, f"row group {s.index}"):  # a damaged page
                table = groups[s.index].to_table(columns=columns)
            table = table.slice(s.start, s.stop - s.start)
            labels = table.column(m.label_column)
            if labels.null_count:
                raise ValueError(f"{s.file}: row group {s.index} has null labels")
            yield s, table, check_labels(m, labels.to_numpy().astype(np.int64, copy=False),
                                         f"{s.file} (split {split!r}), row group {s.index}")


def read_rows(manifest_or_path: ParquetManifest | str | os.PathLike[str], split: str, start: int,
              stop: int, size: tuple[int, int] | None = None, dtype: str = "float32",
              resize: str = "stretch") -> tuple[np.ndarray, np.ndarray]:
    """``float32`` images ``(stop - start, C, H, W)`` in ``[0, 1]`` (or the stored pixels with
    ``dtype="uint8"``, a quarter of the bytes) and ``int64`` labels of rows
    ``start:stop`` of ``split`` (of an opened set, or its root), reading only the row groups that
    cover them. ``size`` ``(H, W)`` resizes (bilinear; ``resize="crop"``: scaled to cover it,
    then centre-cropped); without it images must have the recorded size. A bad range, a null or
    undecodable image or label, or another size raise a ``ValueError`` naming the row; a damaged
    page a ``ValueError``, an I/O failure an ``OSError``, naming the file and row group."""
    m = (manifest_or_path if isinstance(manifest_or_path, ParquetManifest)
         else open_parquet_dataset(manifest_or_path))
    size = img.check_size(size)
    slices = m.groups_for(split, start, stop)
    target = size or (m.height, m.width)
    if None in target:
        raise ValueError(f"{m.root}: images vary in size (no height/width in {m.meta_source}); "
                         "pass size=(H, W)")
    if dtype not in ("float32", "uint8"):
        raise ValueError(f"dtype must be 'float32' or 'uint8'; found {dtype!r}")
    X = np.empty((int(stop) - int(start), m.channels, *target), dtype=dtype)
    y = np.empty(len(X), dtype=np.int64)
    row = 0
    for s, table, labels in read_slices(m, split, slices, [m.image_column, m.label_column]):
        y[row : row + table.num_rows] = labels
        for j, data in enumerate(image_bytes(table.column(m.image_column))):
            try:
                img.decode_to(X[row + j], data, size, resize == "crop", m.size_source)
            except ValueError as exc:
                raise ValueError(f"{s.file}: row group {s.index}, row {s.start + j}: "
                                 f"{exc}") from exc
        row += table.num_rows
    return X, y


def image_bytes(column: pa.ChunkedArray) -> list[bytes | None]:
    """The encoded images of a ``binary`` or Hugging Face ``struct<bytes, path>`` column."""
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")
    return column.to_pylist()


def load_parquet(path: str | os.PathLike[str] | ParquetManifest,
                 size: tuple[int, int] | None = None) -> ImageDataset:
    """A whole parquet data set in memory, for sets that fit; else see :func:`read_rows`."""
    m = path if isinstance(path, ParquetManifest) else open_parquet_dataset(path)
    X_tr, y_tr = read_rows(m, "train", 0, m.rows("train"), size=size)
    X_te, y_te = read_rows(m, "test", 0, m.rows("test"), size=size)
    logger.info("loaded parquet data set %s: %d train, %d test", m.root, len(y_tr), len(y_te))
    return ImageDataset(X_tr, y_tr, X_te, y_te, name=m.name,
                        classes=m.classes or default_classes(y_tr, y_te))
