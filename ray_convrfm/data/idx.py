"""MNIST-style IDX files (plain or gzip), read without torchvision."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np

from ray_convrfm.data.images import ImageDataset, default_classes

__all__ = ["GZIP_MAGIC", "IDX_FILES", "find_idx_files", "load_idx_dir", "read_idx"]

logger = logging.getLogger(__name__)

#: Role -> canonical file name of the four MNIST-style IDX files.
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: First two bytes of a gzip stream.
GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed.

    Compression is detected from the magic bytes ``1f 8b``, not the suffix, because mirrors
    often store decompressed files under ``.gz`` names and vice versa.

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    np.ndarray
        Array with the dimensions from the header, in native byte order.

    Raises
    ------
    ValueError
        On a bad magic number, an unknown type code, or a data size that does not match the
        header (a truncated or padded file).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, gzip.BadGzipFile) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number {raw[:4].hex()} (must start with two zero bytes)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known})")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_len} bytes, "
            f"file has {len(raw)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        kind = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {kind}: dimensions {dims} of {dtype.name} need {expected} data "
            f"bytes, found {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _idx_candidates(canonical: str) -> list[str]:
    """File names accepted for one IDX file: ``-`` or ``.`` before ``idxN``, optional ``.gz``."""
    dotted = canonical.replace("-idx", ".idx")
    return [canonical, canonical + ".gz", dotted, dotted + ".gz"]


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """Map each role in :data:`IDX_FILES` to an existing file, or ``None`` if any is missing."""
    found: dict[str, Path] = {}
    for role, canonical in IDX_FILES.items():
        for candidate in _idx_candidates(canonical):
            if (directory / candidate).is_file():
                found[role] = directory / candidate
                break
        else:
            return None
    return found


def load_idx_dir(directory: str | os.PathLike[str], name: str = "idx") -> ImageDataset:
    """Load an MNIST-style directory of four IDX files as an :class:`ImageDataset`.

    Parameters
    ----------
    directory : path-like
        Holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally with ``.gz``
        and with ``.`` instead of ``-`` before ``idx`` (``train-images.idx3-ubyte``).
    name : str
        Name of the returned data set.

    Returns
    -------
    ImageDataset
        Images ``(n, 1, H, W)`` scaled from ``uint8`` to ``[0, 1]``; class names ``"0"`` ...

    Raises
    ------
    FileNotFoundError
        If a file is missing; the message lists every name looked for.
    ValueError
        If a file is malformed, images are not ``uint8`` of shape ``(n, H, W)``, or label and
        image counts differ.
    """
    directory = Path(directory)
    files = find_idx_files(directory)
    if files is None:
        missing = [
            " or ".join(_idx_candidates(canonical))
            for canonical in IDX_FILES.values()
            if not any((directory / c).is_file() for c in _idx_candidates(canonical))
        ]
        raise FileNotFoundError(
            f"IDX files missing in {directory}: looked for " + "; ".join(missing)
        )
    splits = {}
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"])
        labels = read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{files[f'{split}_images']}: expected uint8 images of shape (n, H, W), got "
                f"{images.dtype} of shape {images.shape}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{files[f'{split}_labels']}: {labels.shape} labels do not match "
                f"{images.shape[0]} images in {files[f'{split}_images'].name}"
            )
        X = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
        splits[split] = (X, labels.astype(np.int64))
    logger.info(
        "loaded IDX data set %r from %s: %d train, %d test",
        name,
        directory,
        splits["train"][0].shape[0],
        splits["test"][0].shape[0],
    )
    return ImageDataset(
        X_train=splits["train"][0],
        y_train=splits["train"][1],
        X_test=splits["test"][0],
        y_test=splits["test"][1],
        name=name,
        classes=default_classes(splits["train"][1], splits["test"][1]),
    )
