"""Hugging Face style parquet image sets, read as they are held: no ``dataset.json``, no copy.

A folder of shards as the Hub holds them::

    DIR/[data/]train-00000-of-00004.parquet ...   (also SPLIT.parquet, SPLIT-<anything>.parquet)
    DIR/[data/]validation-00000-of-00001.parquet
    DIR/[data/]FOLDER/*.parquet                   (e.g. train/0000.parquet: FOLDER is the split)

with an encoded-image column (``struct<bytes: binary, path: string>`` as ``datasets.Image``
writes it, or plain ``binary``) and an integer label column; both names are arguments. The
split is the file name up to its first ``-``; in a subfolder, the folder's name unless the
file is a numbered shard (``SPLIT-00001-of-00004``). Numbered shards must all be there.
The manifest is a :class:`~ray_convrfm.data.parquet_io.ParquetManifest` built from the files'
footers only (``pyarrow.dataset`` fragments: rows per file and per row group): no image is
read, and none decoded, except the first one's header when the size is not given. Class
names come from the ``huggingface`` schema metadata ``datasets`` writes (the label's
``ClassLabel`` names), when there; without them any label ``>= 0`` is a class. Rows are then
read by ``parquet_io.read_rows``, exactly as the project's own layout
(``data.parquet.ParquetImages``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ray_convrfm.data import images as img
from ray_convrfm.data.parquet_fs import join, list_parquet, natural_key, resolve
from ray_convrfm.data.parquet_io import (
    GroupSlice,
    ParquetManifest,
    RowGroup,
    check_schema,
    image_bytes,
    read_slices,
)

__all__ = ["hf_splits", "open_hf_parquet"]

_NAME = re.compile(r"(?P<split>[A-Za-z0-9_]+)(?P<rest>-[^/]*)?\.parquet")
_SHARD = re.compile(r"-(?P<index>\d+)-of-(?P<count>\d+)(?:-|$)")
_SPLIT_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]*")


def _dirs(fs: pafs.FileSystem, directory: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def _split_of(name: str, folder: str | None) -> str | None:
    """The split of file ``name`` (in a subfolder ``folder``, or at the top when None)."""
    match = _NAME.fullmatch(name)
    if match and (folder is None or _SHARD.search(match["rest"] or "")):
        return match["split"]
    return folder


def hf_splits(fs: pafs.FileSystem, root: str, display: str) -> dict[str, list[str]]:
    """The parquet files of each split under ``root`` (and ``root/data``), in natural order;
    ``ValueError`` when there are none or a numbered shard is missing."""
    found: dict[str, set[str]] = {}
    for base in (root, join(root, "data")):
        folders = [None, *(d for d in _dirs(fs, base) if _SPLIT_DIR.fullmatch(d) and d != "data")]
        for folder in folders:
            for path in list_parquet(fs, base if folder is None else join(base, folder)):
                split = _split_of(path.rsplit("/", 1)[-1], folder)
                if split is not None:
                    found.setdefault(split, set()).add(path)
    found = {s: sorted(f, key=natural_key) for s, f in sorted(found.items())}
    if not found:
        raise ValueError(f"{display}: no Hugging Face style parquet shards; expected "
                         f"{display}/[data/]SPLIT-00000-of-0000N.parquet (or SPLIT.parquet, "
                         "or SPLIT/*.parquet)")
    for split, files in found.items():
        shards: dict[int, set[int]] = {}
        for f in files:
            shard = _SHARD.search(f.rsplit("/", 1)[-1].removesuffix(".parquet"))
            if shard:
                shards.setdefault(int(shard["count"]), set()).add(int(shard["index"]))
        for count, have in shards.items():
            missing = sorted(set(range(count)) - have)
            if missing:
                raise ValueError(f"{display}: split {split!r} has {len(have)} of its {count} "
                                 f"shards; missing e.g. {split}-{missing[0]:05d}-of-"
                                 f"{count:05d}.parquet")
    return found


def _class_names(schema, label_column: str) -> tuple[str, ...]:
    """The label's ``ClassLabel`` names in ``datasets``' schema metadata (else none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(raw)["info"]["features"][label_column] if raw else {}
    except (ValueError, KeyError, TypeError):
        return ()
    names = feature.get("names") if isinstance(feature, dict) else None
    return tuple(map(str, names)) if isinstance(names, list) else ()


def open_hf_parquet(path: str | os.PathLike[str], channels: int = 3,
                    image_column: str = "image", label_column: str = "label",
                    size_of: str | None = None) -> ParquetManifest:
    """The manifest of a Hugging Face style set at ``path`` (a folder or URL), from footers.

    ``channels`` (3: colour, grey converted; or 1) is how images are decoded. ``size_of``: a
    split whose first image's header gives the set's ``(H, W)`` (others must match when read);
    None leaves it unknown (reading then needs ``size``). A file without the two columns (an
    image column of bytes, an integer label) is a ``ValueError`` naming it.
    """
    display = os.fspath(path)
    fs, root, _ = resolve(path)
    splits = hf_splits(fs, root, display)
    named_by = splits.get("train", next(iter(splits.values())))[0]  # whose metadata names
    groups: dict[str, list[RowGroup]] = {}
    classes: tuple[str, ...] = ()
    for split, files in splits.items():
        groups[split] = []
        for fragment in pads.dataset(files, format="parquet", filesystem=fs).get_fragments():
            schema = fragment.physical_schema
            check_schema(schema, fragment.path, image_column, label_column)
            if fragment.path == named_by:
                classes = _class_names(schema, label_column)
            groups[split] += [RowGroup(fragment.path, g.id, g.num_rows)
                              for g in fragment.row_groups]
    source = named_by[len(root):].lstrip("/")
    m = ParquetManifest(display, fs, root.rstrip("/").rsplit("/", 1)[-1] or "hf",
                        img.check_channels(channels), None, None, "hf", classes, groups,
                        image_column, label_column,
                        meta_source=f"{source} (Hugging Face ClassLabel names)")
    if size_of is None:
        return m
    return _sized_by_first_image(m, size_of)


def _sized_by_first_image(m: ParquetManifest, split: str) -> ParquetManifest:
    """``m`` with the size of the first image of ``split`` (its header only, not decoded)."""
    from PIL import Image

    first = next((g for g in m.groups.get(split, []) if g.num_rows), None)
    if first is None:
        raise ValueError(f"{m.root}: split {split!r} has no rows; available: {sorted(m.groups)}")
    _, table, _ = next(read_slices(m, split, [GroupSlice(first.file, first.index, 0, 1)],
                                   [m.image_column, m.label_column]))
    data = image_bytes(table.column(m.image_column))[0]
    where = f"{first.file}: row group {first.index}, row 0"
    try:
        with Image.open(io.BytesIO(data or b"")) as im:  # lazy: reads the header only
            w, h = im.size
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{where}: not a readable image ({exc})") from exc
    return dataclasses.replace(m, height=h, width=w,
                               size_source=f"the first image ({where}) is")
