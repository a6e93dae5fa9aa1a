"""Conversion of an on-disk image set to the project's parquet layout, in parallel on Ray.

The driver plans the output files from the source's listing or manifest (no image decoded
here: the first image's header gives the size when none is asked for), makes room at the
output (``parquet_io.begin_write``), and runs one task per output file: the task reads the
stored bytes of its rows (``DiskImages.encoded``), keeps those already in the wanted encoding,
mode and size byte for byte, decodes, resizes and re-encodes the others, and writes its own
``SPLIT/part-<i>.parquet`` (``parquet_io.write_part``), so images never pass through the
driver. A bar advances as files complete; ``dataset.json`` is written last
(``parquet_io.finish_write``). A failed conversion (an image refused, Ctrl-C) stops the other
tasks and removes the files it wrote, so nothing is left in the way of a rerun.

Ray tasks, not Ray Data: ``ray.data`` is not importable in this project's environment (it
needs pandas, no dependency of ours), and a task per output file gives the layout's own file
names, row groups and row order directly (Ray Data's ``write_parquet`` names and sizes files
its own way) and one error naming the image that failed. Without ``workers`` the same task
function runs here, file after file.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from pathlib import Path

import pyarrow.fs as pafs

from ray_convrfm.data import images as img
from ray_convrfm.data import parquet_io as pio
from ray_convrfm.data.ondisk import DiskImages, DiskRows
from ray_convrfm.data.parquet_fs import join

__all__ = ["Target", "convert_images", "convert_part"]

logger = logging.getLogger(__name__)

_MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
# PIL modes that hold one (grey) channel; every other mode is treated as colour.
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


@dataclasses.dataclass(frozen=True)
class Target:
    """What every written image is: ``fmt`` (PIL's ``"PNG"``/``"JPEG"``), ``channels``,
    ``height`` x ``width``; ``resized``/``converted``: whether images of another size/channel
    count are resized/converted (else refused, naming ``first``, the image that set them)."""

    fmt: str
    quality: int
    channels: int
    height: int
    width: int
    resized: bool
    converted: bool
    crop: bool
    first: str


def header(data: bytes | None, where: str) -> tuple[str | None, str, int, int, int]:
    """``(format, mode, height, width, channels)`` from an encoded image's header only."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data or b"")) as im:  # lazy: reads the header only
            return (im.format, im.mode, im.height, im.width,
                    1 if im.mode in _GREY_MODES else 3)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{where}: not a readable image ({exc})") from exc


def _stored(data: bytes | None, where: str, t: Target) -> bytes:
    """``data`` as the layout stores it: as it is when it already is, else re-encoded."""
    fmt, mode, h, w, c = header(data, where)
    if (not t.resized and (h, w) != (t.height, t.width)) or (not t.converted and c != t.channels):
        raise ValueError(
            f"{where}: image is {h}x{w} with {c} channel(s), but the first image {t.first}; "
            "pass size=(H, W) (and channels=1 or 3) to convert all")
    if (fmt == t.fmt and data.startswith(_MAGIC[t.fmt]) and mode == ("L", "RGB")[t.channels == 3]
            and (h, w) == (t.height, t.width)):
        return data
    try:
        pixels = img.decode_uint8(data, t.channels, (t.height, t.width), t.crop)
        return img.encode_uint8(pixels, t.fmt, t.quality)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def convert_part(rows: DiskRows, target: Target, out: str, path: str, group: int
                 ) -> tuple[str, int]:
    """Write ``rows`` (their stored bytes, re-encoded where needed) as the file ``path`` of
    the set at ``out``; returns its name and row count. What each task runs."""
    fs, _, _ = pio.resolve(out)
    rows_out = ((_stored(data, where, target), label)
                for data, label, where in rows.images.encoded(rows.ranges))
    return path.rsplit("/", 1)[-1], pio.write_part(fs, path, rows_out, group)


def first_image(images: DiskImages) -> tuple[int, int, int, str]:
    """``(height, width, channels, description)`` of row 0, from its header."""
    data, _, where = next(iter(images.encoded([(0, 1)])))
    _, _, h, w, c = header(data, where)
    return h, w, c, f"{where} is {h}x{w} with {c}"


def convert_images(sources: dict[str, DiskImages], out: str | os.PathLike[str], meta: dict,
                   target: Target, rows_per_file: int = 16384, rows_per_group: int = 1024,
                   overwrite: bool = False, progress: bool = False, workers: int | None = None,
                   address: str | None = None) -> Path | str:
    """Write the splits ``sources`` at ``out`` in the layout (``meta``: its ``dataset.json``
    fields but the counts and files), one task per output file on ``workers`` Ray workers
    (``address``: a cluster to join, default an embedded local Ray), or here without
    ``workers``. Returns the root, as ``write_parquet_dataset`` does."""
    from tqdm.auto import tqdm

    counts = {split: len(images) for split, images in sources.items() if len(images)}
    fs, root, local, group = pio.begin_write(out, counts, rows_per_file, rows_per_group,
                                             overwrite)
    jobs = []
    for split, n in counts.items():
        fs.create_dir(join(root, split), recursive=True)
        for i, a in enumerate(range(0, n, int(rows_per_file))):
            b = min(n, a + int(rows_per_file))
            jobs.append((split, b - a, (sources[split].rows([(a, b)]), target, os.fspath(out),
                                        join(root, split, f"part-{i}.parquet"), group)))
    files: dict[str, list[str]] = {split: [] for split in counts}
    try:
        with tqdm(total=sum(counts.values()), desc=f"convert {meta['name']}", unit="img",
                  disable=not progress, leave=False) as bar:
            results = _run(jobs, workers, address, bar)
        for (split, n, _), (name, written) in zip(jobs, results, strict=True):
            if written != n:
                raise RuntimeError(f"{name} of split {split!r}: wrote {written} rows, not {n}")
            files[split].append(name)
    except BaseException:  # an image refused, Ctrl-C: no half set left in the way of a rerun
        for *_, args in jobs:
            if fs.get_file_info(args[3]).type == pafs.FileType.File:
                fs.delete_file(args[3])
        fs.delete_file(join(root, pio.PENDING_FILE))
        raise
    pio.finish_write(out, fs, root, meta, counts, files)
    return Path(root) if local else os.fspath(out)


def _run(jobs: list, workers: int | None, address: str | None, bar) -> list[tuple[str, int]]:
    """Each job's ``convert_part`` result, in order: here, or as Ray tasks (``workers`` at a
    time, however many CPUs the cluster has), the bar advancing as each completes."""
    results: list = [None] * len(jobs)
    if not workers:
        for i, (_, n, args) in enumerate(jobs):
            results[i] = convert_part(*args)
            bar.update(n)
        return results
    import ray

    from ray_convrfm.backends.embedded_ray import start_ray

    start_ray(int(workers), address)
    task = ray.remote(num_cpus=1)(convert_part)
    pending: dict = {}
    todo = list(enumerate(jobs))[::-1]  # taken from the end: first job first
    try:
        while todo or pending:
            while todo and len(pending) < int(workers):
                i, (_, _, args) = todo.pop()
                pending[task.remote(*args)] = i
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the task's own error, not Ray's
                raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
            bar.update(jobs[i][1])
        return results
    finally:  # after an error: the other tasks stopped before their files are removed
        for ref in pending:
            ray.cancel(ref, force=True)
        if pending:
            ray.wait(list(pending), num_returns=len(pending), timeout=60)
