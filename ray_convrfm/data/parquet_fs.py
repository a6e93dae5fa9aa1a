"""Where parquet data sets live: file systems, paths, listings and small JSON files.

Local paths and URLs (``s3://``, ``gs://``, ... as ``pyarrow.fs.FileSystem.from_uri`` takes
them, or any fsspec URL) behind one pyarrow interface, for the project's layout
(:mod:`ray_convrfm.data.parquet_io`) and Hugging Face style shards
(:mod:`ray_convrfm.data.hf_parquet`) alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs


def resolve(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str, bool]:
    """``(file system, path inside it, is local)``: pyarrow's own file systems first, any other
    URL through fsspec, wrapped so that the rest sees one pyarrow interface."""
    s = os.fspath(path)
    if "://" not in s:
        return pafs.LocalFileSystem(), str(Path(s).expanduser().resolve()), True
    try:
        fs, inner = pafs.FileSystem.from_uri(s)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        ffs, inner = fsspec.core.url_to_fs(s)
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(ffs))
    return fs, inner.rstrip("/") or inner, isinstance(fs, pafs.LocalFileSystem)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def natural_key(name: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def list_parquet(fs: pafs.FileSystem, directory: str) -> list[str]:
    """The ``*.parquet`` files of ``directory`` in natural order (``part-2`` before ``part-10``)."""
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    names = [i.base_name for i in infos if i.type == pafs.FileType.File
             and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))]
    return [join(directory, n) for n in sorted(names, key=natural_key)]


def is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def read_json(fs: pafs.FileSystem, path: str) -> object:
    """A JSON file's content (None when it is missing; ``ValueError`` when not JSON)."""
    if not is_file(fs, path):
        return None
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read())


def write_json(fs: pafs.FileSystem, path: str, doc: dict) -> None:
    with fs.open_output_stream(path) as fh:
        fh.write((json.dumps(doc, indent=2) + "\n").encode("utf-8"))


def overlaps(sizes: Iterable[int], start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """``(i, lo, hi)``: rows ``lo:hi`` of piece ``i`` (pieces of ``sizes`` laid end to end) fall
    in ``start:stop``."""
    first = 0
    for i, n in enumerate(sizes):
        if min(stop, first + n) > max(start, first):
            yield i, max(start, first) - first, min(stop, first + n) - first
        first += n


@contextlib.contextmanager
def reading(fs: pafs.FileSystem, path: str, part: str) -> Iterator[None]:
    """pyarrow's failures in the block re-raised naming file ``path`` and ``part`` of it (``row
    group 2``), which pyarrow's own messages do not ("Corrupt snappy compressed data."). An
    ``OSError`` with an errno, or any on a remote file system, is I/O and stays an ``OSError``
    (of that errno): ``[Errno 5] reason (reading row group 2): 'PATH'``. Any other (an
    ``ArrowInvalid``, or the errno-less ``OSError`` pyarrow raises for bytes it cannot
    decompress or parse) means the file is damaged: a ``ValueError``, ``PATH: row group 2: ...``.
    """
    try:
        yield
    except pa.ArrowMemoryError:
        raise
    except (pa.ArrowException, OSError) as exc:
        said = str(exc).strip() or type(exc).__name__
        if isinstance(exc, OSError) and exc.errno:
            raise OSError(exc.errno, f"{exc.strerror or os.strerror(exc.errno)} (reading "
                                     f"{part})", path) from exc
        if isinstance(exc, OSError) and not isinstance(fs, pafs.LocalFileSystem):
            raise OSError(f"{path}: {part}: {said}") from exc
        raise ValueError(f"{path}: {part} cannot be read, the file is damaged: {said}") from exc
