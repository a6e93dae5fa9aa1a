"""Faults made for the error tests: a kernel store whose disk fills (or that turns unwritable)
mid-run, and parquet shards with bytes corrupted inside a data page."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import zarr.storage


def failing_after_first_kernel(monkeypatch, prefix: str, code: int) -> list[str]:
    """zarr's local writes of chunks under ``prefix`` (``K/c/``: a kernel's values,
    ``K.digest/c/``: its digests) fail with ``code`` once a second kernel (sub-store) is being
    written: the first kernel of the run is stored, the next finds the disk full or the store
    unwritable. The error names no file, as a failing ``write`` does (and as root, who runs
    these tests, ``chmod`` stops nothing). Returns the sub-stores in the order written."""
    real, roots = zarr.storage.LocalStore.set, []

    async def set_(self, key, value):
        if key.startswith(prefix):
            if str(self.root) not in roots:
                roots.append(str(self.root))
            if len(roots) > 1:
                raise OSError(code, os.strerror(code))
        return await real(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)
    return roots


def corrupt_page(path: Path, row_group: int, column: int = 0, span: int = 256) -> None:
    """Flip ``span`` bytes in the middle of the pages of ``column`` (0: the images) in row
    group ``row_group`` of parquet file ``path``, found from the footer's offsets (the column
    chunk starts at its dictionary page, if it has one, else its first data page): the footer
    stays intact, the page no longer decompresses."""
    meta = pq.ParquetFile(path).metadata.row_group(row_group).column(column)
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    assert meta.total_compressed_size > 2 * span, meta
    mid = start + meta.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    for k in range(mid - span // 2, mid + span // 2):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
