"""numpy ``.npz`` archives as an :class:`~ray_convrfm.data.images.ImageDataset`.

Read with ``allow_pickle=False`` (no code execution); a file that is no ``.npz`` archive, a
damaged one, or one without the expected keys is a ``ValueError`` naming the file.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ray_convrfm.data.images import ImageDataset, default_classes

__all__ = ["load_npz"]

logger = logging.getLogger(__name__)


_NPZ_ALIASES: dict[str, tuple[str, ...]] = {
    "X_train": ("X_train", "x_train"),
    "y_train": ("y_train", "Y_train"),
    "X_test": ("X_test", "x_test"),
    "y_test": ("y_test", "Y_test"),
}


def _first_key(keys: Sequence[str], aliases: Sequence[str]) -> str | None:
    return next((k for k in aliases if k in keys), None)


def _npz_images(X: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Convert stored images to NCHW ``float32`` in ``[0, 1]``."""
    if X.ndim == 3:
        X = X[:, None, :, :]
    elif X.ndim == 4:
        # NHWC is recognised only when unambiguous: last axis looks like channels, second not.
        if X.shape[-1] in (1, 3) and X.shape[1] not in (1, 3):
            X = np.transpose(X, (0, 3, 1, 2))
    else:
        raise ValueError(
            f"{path}: {key} must have shape (n, H, W), (n, C, H, W) or (n, H, W, C), "
            f"got {X.shape}"
        )
    if X.dtype == np.bool_ or np.issubdtype(X.dtype, np.integer):
        if X.size and (X.min() < 0 or X.max() > 255):
            raise ValueError(
                f"{path}: integer images in {key} must be in [0, 255], found min {X.min()} "
                f"and max {X.max()}"
            )
        return np.ascontiguousarray(X, dtype=np.float32) / np.float32(255.0)
    if not np.issubdtype(X.dtype, np.floating):
        raise ValueError(f"{path}: {key} has unsupported dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.size:
        lo, hi = float(np.min(X)), float(np.max(X))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{path}: float images in {key} must be in [0, 1], found min {lo} and max {hi} "
                "(store uint8 pixels or rescale before saving)"
            )
    return X


def _npz_labels(y: np.ndarray, key: str, path: Path) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # column vectors are a common way to save labels
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{path}: {key} must be 1-D, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.mod(y, 1) == 0):
            raise ValueError(f"{path}: {key} must hold integer class labels, got {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{path}: {key} has negative labels (min {y.min()})")
    return y


def _open_npz(path: Path):
    """``np.load(path, allow_pickle=False)`` of an ``.npz`` archive (a zip of ``.npy``
    files); anything else, a plain ``.npy`` or a damaged zip, is a ``ValueError`` naming it."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        kind = "a single .npy array" if head == b"\x93NUMPY" else f"it starts with {head!r}"
        raise ValueError(f"{path} is not an .npz archive (a zip of .npy arrays): {kind}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable .npz archive ({err})") from err


def load_npz(path: str | os.PathLike[str]) -> ImageDataset:
    """Load an :class:`ImageDataset` from a numpy ``.npz`` archive.

    Keys ``X_train``/``x_train`` and ``y_train`` are required, ``X_test``/``x_test`` and
    ``y_test`` optional (empty test split otherwise); alternatively ``images`` and ``labels``
    give a train-only set. An optional string array ``classes`` names the classes.
    Images may be ``(n, H, W)``, ``(n, C, H, W)`` or ``(n, H, W, C)`` (when the last axis is
    1 or 3 and the second is not). Integer images are divided by 255; float images must already
    be in ``[0, 1]``. The archive is opened with ``allow_pickle=False`` so that a crafted file
    cannot execute code.

    Raises
    ------
    ValueError
        Naming the file: if it is no ``.npz`` archive (or a damaged one), if the required keys
        are absent (with the keys it has), on bad shapes, out-of-range pixels or non-integer
        labels.
    """
    path = Path(path)
    with _open_npz(path) as archive:
        keys = list(archive.files)
        x_tr = _first_key(keys, _NPZ_ALIASES["X_train"])
        y_tr = _first_key(keys, _NPZ_ALIASES["y_train"])
        if x_tr is None and y_tr is None and "images" in keys and "labels" in keys:
            x_tr, y_tr = "images", "labels"
        if x_tr is None or y_tr is None:
            raise ValueError(f"{path}: expected keys X_train and y_train (or x_train, or images "
                             f"and labels), optionally X_test and y_test; found {sorted(keys)}")
        x_te = _first_key(keys, _NPZ_ALIASES["X_test"])
        y_te = _first_key(keys, _NPZ_ALIASES["y_test"])
        if (x_te is None) != (y_te is None):
            raise ValueError(f"{path}: X_test and y_test must be given together; found "
                             f"{sorted(keys)}")

        def read(key):
            try:
                return archive[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                raise ValueError(f"{path}: cannot read {key} ({err})") from err

        X_train = _npz_images(read(x_tr), x_tr, path)
        y_train = _npz_labels(read(y_tr), y_tr, path)
        if x_te is not None:
            X_test = _npz_images(read(x_te), x_te, path)
            y_test = _npz_labels(read(y_te), y_te, path)
        else:
            X_test = np.zeros((0, *X_train.shape[1:]), dtype=np.float32)
            y_test = np.zeros(0, dtype=np.int64)
        classes = (
            tuple(str(c) for c in read("classes").reshape(-1))
            if "classes" in keys
            else default_classes(y_train, y_test)
        )
    for split, X, y in (("train", X_train, y_train), ("test", X_test, y_test)):
        if X.shape[0] != y.shape[0]:
            raise ValueError(
                f"{path}: {split} has {X.shape[0]} images but {y.shape[0]} labels"
            )
    logger.info("loaded %s: %d train, %d test", path, X_train.shape[0], X_test.shape[0])
    return ImageDataset(X_train, y_train, X_test, y_test, name=path.stem, classes=classes)
