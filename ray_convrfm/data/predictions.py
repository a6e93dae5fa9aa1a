"""Batch predictions on disk: one parquet part file per worker and a marker written last.

``OUT`` (a folder, or a URL as ``parquet_io.resolve`` takes them, that every worker reaches)::

    OUT/part-00000.parquet   worker 0's rows: row, predicted_label, scores[, true_label]
    OUT/part-00001.parquet   ...
    OUT/_SUCCESS             JSON: the parts, their rows, the classes, the accuracy; last

Every file is written under a temporary name in ``OUT`` (``.part-00000.parquet.<run>.tmp``)
and renamed when complete, and ``_SUCCESS`` only after every part: a killed or failed run
leaves no marker, so nothing it left looks complete. Readers that ignore names starting with
``.`` or ``_`` (pyarrow, Spark) see only the parts; :func:`read_predictions` reads those the
marker names. A folder holding files is refused unless ``overwrite``, which deletes only the
files this layout names, never others.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_convrfm.data.parquet_io import resolve

__all__ = ["MARKER", "PartWriter", "PredictionTarget", "label_indices", "prepare_out",
           "read_predictions", "write_marker"]

#: Value of ``"format"`` in the marker.
FORMAT = "ray_convrfm-predictions"
VERSION = 1
MARKER = "_SUCCESS"
_PART = "part-{:05d}.parquet"
#: The names this layout writes (parts, their temporary names, the marker and its own).
_OURS = re.compile(r"^(part-\d{5}\.parquet|\.part-\d{5}\.parquet\.[0-9a-f]+\.tmp|_SUCCESS"
                   r"|\._SUCCESS\.[0-9a-f]+\.tmp)$")


@dataclass(frozen=True)
class PredictionTarget:
    """Where and what workers write: the folder (``url``: an absolute path or a URL), the
    run's id (in temporary names), the classes (for the predicted labels) and the schema of
    every part, so that all parts agree."""

    url: str
    run: str
    classes: np.ndarray
    schema: pa.Schema

    @property
    def labelled(self) -> bool:
        return "true_label" in self.schema.names

    def join(self, name: str) -> str:
        return f"{resolve(self.url)[1].rstrip('/')}/{name}"


def _arrow_type(values: np.ndarray) -> pa.DataType:
    """The parquet type of labels like ``values`` (a few of them: integers, floats, strings,
    booleans)."""
    if values.dtype.kind in "US":
        return pa.string()
    return pa.array(values.tolist() if values.dtype.kind == "O" else values).type


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


def _schema(classes: np.ndarray, label_type: pa.DataType | None) -> pa.Schema:
    fields = [("row", pa.int64()), ("predicted_label", _arrow_type(classes)),
              ("scores", pa.list_(pa.float32(), len(classes)))]
    if label_type is not None:
        fields.append(("true_label", label_type))
    return pa.schema(fields, metadata={"ray_convrfm.classes": json.dumps(classes.tolist(),
                                                                         default=_plain)})


def label_indices(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Index of each label of ``y`` in sorted ``classes``; -1 for labels of no class."""
    pos = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
    return np.where(classes[pos] == y, pos, -1)


def _kind(dtype: np.dtype) -> str:
    return "text" if dtype.kind in "USO" else "number"


def prepare_out(out: str | os.PathLike[str], classes: np.ndarray,
                labels: np.ndarray | None, overwrite: bool = False) -> PredictionTarget:
    """Check ``out`` and make it ready for a run: refused when it holds files, unless
    ``overwrite`` (then the marker goes first, so an interrupted overwrite is incomplete, and
    only this layout's files are deleted: a folder holding others is refused). ``labels``, a
    few of the data's true labels (None when it has none), must compare with the classes."""
    classes = np.asarray(classes)
    if labels is not None and _kind(np.asarray(labels).dtype) != _kind(classes.dtype):
        raise ValueError(f"the data's labels ({np.asarray(labels).dtype}) cannot be compared "
                         f"with the model's classes ({classes.dtype})")
    fs, path, local = resolve(out)
    url = path if local else os.fspath(out).rstrip("/")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise FileExistsError(f"{out} is a file; batch predictions are a folder of parts")
    if info.type == pafs.FileType.Directory:
        names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))]
        if names and not overwrite:
            state = ("the predictions of an earlier run" if MARKER in names else
                     f"an incomplete run (no {MARKER}: killed or failed)" if any(
                         _OURS.match(n) for n in names) else "other files")
            raise FileExistsError(f"{out} already holds {state}; pass overwrite=True "
                                  "to replace them, or choose another folder")
        foreign = sorted(n for n in names if not _OURS.match(n))
        if foreign:
            raise FileExistsError(f"{out} holds files batch prediction did not write "
                                  f"({', '.join(foreign[:5])}); choose another folder")
        if MARKER in names:
            fs.delete_file(f"{path}/{MARKER}")
        for name in names:
            if name != MARKER:
                fs.delete_file(f"{path}/{name}")
    fs.create_dir(path, recursive=True)
    label_type = None if labels is None else _arrow_type(np.asarray(labels))
    return PredictionTarget(url, uuid.uuid4().hex, classes, _schema(classes, label_type))


class PartWriter:
    """A worker's part file: rows appended a block at a time (one row group each) under a
    temporary name, renamed by ``close``."""

    def __init__(self, target: PredictionTarget, part: int):
        self.target, self.name = target, _PART.format(part)
        self.fs = resolve(target.url)[0]
        self.tmp = target.join(f".{self.name}.{target.run}.tmp")
        self.stream = self.fs.open_output_stream(self.tmp)
        self.writer = pq.ParquetWriter(self.stream, target.schema)
        self.rows = 0
        self.first: int | None = None

    def write(self, start: int, predicted: np.ndarray, scores: np.ndarray,
              labels: np.ndarray | None) -> None:
        """Rows ``start..`` with their predicted class indices, scores and true labels."""
        t, n = self.target, len(predicted)
        c = len(t.classes)
        columns = [pa.array(np.arange(start, start + n, dtype=np.int64)),
                   pa.array(t.classes[predicted], type=t.schema.field("predicted_label").type),
                   pa.FixedSizeListArray.from_arrays(
                       pa.array(np.ascontiguousarray(scores, np.float32).reshape(n * c)), c)]
        if t.labelled:
            if labels is None:
                raise ValueError(f"rows {start}..{start + n} have no labels")
            columns.append(pa.array(np.asarray(labels),
                                    type=t.schema.field("true_label").type))
        self.writer.write_table(pa.Table.from_arrays(columns, schema=t.schema))
        self.first = start if self.first is None else self.first
        self.rows += n

    def close(self) -> dict:
        """Finish the file and give it its name; returns its entry in the marker."""
        self.writer.close()
        self.stream.close()
        self.fs.move(self.tmp, self.target.join(self.name))
        return {"file": self.name, "rows": self.rows, "first_row": self.first}

    def abort(self) -> None:
        """Drop the unfinished file (best effort: a run that failed)."""
        for close in (self.writer.close, self.stream.close):
            try:
                close()
            except Exception:  # noqa: BLE001 - the run has failed already
                pass
        try:
            self.fs.delete_file(self.tmp)
        except OSError:
            pass


def write_marker(target: PredictionTarget, parts: list[dict], summary: dict) -> str:
    """Write ``_SUCCESS`` (atomically, after every part): the run is complete. Returns the
    folder."""
    fs = resolve(target.url)[0]
    doc = {"format": FORMAT, "version": VERSION, "rows": int(sum(p["rows"] for p in parts)),
           "parts": sorted(parts, key=lambda p: p["first_row"]),
           "columns": target.schema.names,
           "classes": json.loads(target.schema.metadata[b"ray_convrfm.classes"]), **summary}
    tmp = target.join(f".{MARKER}.{target.run}.tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(doc, indent=2).encode())
    fs.move(tmp, target.join(MARKER))
    return target.url


def read_predictions(out: str | os.PathLike[str]) -> pa.Table:
    """The predictions of a complete run, rows in order; a folder without ``_SUCCESS`` (a run
    killed or failing) is refused."""
    fs, path, _ = resolve(out)
    try:
        with fs.open_input_stream(f"{path}/{MARKER}") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"{out} holds no complete batch prediction (no {MARKER})") \
            from None
    if doc.get("format") != FORMAT:
        raise ValueError(f"{out}/{MARKER} is not a batch prediction marker")
    tables = [pq.read_table(f"{path}/{p['file']}", filesystem=fs) for p in doc["parts"]]
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows != doc["rows"]:
        raise ValueError(f"{out}: the parts hold {0 if table is None else table.num_rows} "
                         f"rows; {MARKER} says {doc['rows']}")
    return table
