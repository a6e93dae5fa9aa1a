"""Checked training, validation and monitor data for the estimators (one place for both).

Labels become indices into ``classes_``; validation is carved from the training data unless
given (stratified, seeded); on-disk sets (``data.ondisk.DiskImages``: parquet, Hugging Face
shards, folder trees) keep their training rows unread, for the workers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ray_convrfm.checks import as_images, as_labels
from ray_convrfm.data.split import ranges_of, split_validation
from ray_convrfm.kernels.kernel import as_tensor


class FitInputs(NamedTuple):
    """Checked training data: labels as indices into ``classes``; X_mon is None without monitor."""

    classes: np.ndarray
    X: np.ndarray | torch.Tensor
    X_fit: np.ndarray | torch.Tensor
    y_fit: np.ndarray
    X_val: np.ndarray | torch.Tensor
    y_val: np.ndarray
    X_mon: np.ndarray | torch.Tensor | None
    y_mon: np.ndarray | None


def prepare_fit_inputs(X, y, X_val, y_val, monitor, val_fraction: float,
                       rng: np.random.Generator) -> FitInputs:
    """Check inputs, find the classes and carve the validation split (shared by estimators).

    Without X_val, ``val_fraction`` of (X, y) is held out, drawn from ``rng``, by
    ``data.split.split_validation``: single rows (stratified) in memory, the units an on-disk
    set gives (whole row groups of a parquet set; single rows of a folder tree); every class
    keeps a training image or the split is refused with the counts. On-disk rows are read as
    8-bit pixels, where they are used. The
    split's seed is drawn from ``rng`` whether or not it is used, so a fit on a carved split
    draws what a fit given that split as X_val, y_val draws, and equals it.
    """
    from ray_convrfm.data.ondisk import DiskImages

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); found {val_fraction}")
    seed = int(rng.integers(2**31 - 1))
    if isinstance(X, DiskImages):
        return _disk_fit_inputs(X, y, X_val, y_val, monitor, val_fraction, seed)
    X = as_images(X, "X")
    if y is None:
        raise ValueError("y is required (only on-disk image sets such as "
                         "parquet.ParquetImages carry their own labels)")
    y = as_labels(y, X.shape[0], "y")
    classes, y_idx, X_val, y_val = _classes_and_given_validation(y, X_val, y_val, X.shape)
    if X_val is not None:
        X_fit, y_fit = X, y_idx
    else:
        fit_idx, val_idx = split_validation(y_idx, classes, val_fraction, seed)
        X_fit, y_fit, X_val, y_val = X[fit_idx], y_idx[fit_idx], X[val_idx], y_idx[val_idx]
    return FitInputs(classes, X, X_fit, y_fit, X_val, y_val,
                     *_monitor(classes, monitor, X.shape))


def _classes_and_given_validation(y: np.ndarray, X_val, y_val, shape: tuple[int, ...]):
    """The classes, y as class indices and the checked validation data passed to ``fit``
    (None, None when it is to be carved from the training data)."""
    classes, y_idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"y must contain at least 2 classes; found {len(classes)}")
    if (X_val is None) != (y_val is None):
        raise ValueError("pass both X_val and y_val, or neither")
    if X_val is not None:
        X_val = as_images(X_val, "X_val", channels=shape[1], image_size=shape[2:])
        y_val = encode_labels(classes, as_labels(y_val, X_val.shape[0], "y_val"), "y_val")
    return classes, y_idx, X_val, y_val


def _monitor(classes: np.ndarray, monitor, shape: tuple[int, ...]):
    if monitor is None:
        return None, None
    X_mon = as_images(monitor[0], "monitor X", channels=shape[1], image_size=shape[2:])
    y_mon = encode_labels(classes, as_labels(monitor[1], X_mon.shape[0], "monitor y"),
                          "monitor y")
    return X_mon, y_mon


def _disk_fit_inputs(X, y, X_val, y_val, monitor, val_fraction: float,
                     seed: int):
    """Fit inputs from an on-disk split: labels read here, validation rows held out in the
    set's units; the fit and validation rows are left for the workers to read
    (``DiskRows``)."""
    labels = X.labels()
    if y is not None:
        y = as_labels(y, len(labels), "y")
        if not np.array_equal(y, labels):
            raise ValueError("y differs from the labels stored in the on-disk data set; "
                             "pass y=None to use the stored labels")
    classes, y_idx, X_val, y_val = _classes_and_given_validation(labels, X_val, y_val, X.shape)
    if X_val is not None:
        fit_idx = np.arange(len(X))
    else:  # rows in the split's order, as an array's fit takes them (runs of rows on disk)
        fit_idx, val_idx = split_validation(y_idx, classes, val_fraction, seed,
                                            X.holdout_units())
        X_val, y_val = X.rows(ranges_of(val_idx)), y_idx[val_idx]  # read where scored
    X_fit, y_fit = X.rows(ranges_of(fit_idx)), y_idx[fit_idx]
    return FitInputs(classes, X, X_fit, y_fit, X_val, y_val,
                     *_monitor(classes, monitor, X.shape))


def encode_labels(classes: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
    """Indices of ``y`` in ``classes``; labels never seen in training are an error."""
    pos = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
    unknown = classes[pos] != y
    if unknown.any():
        raise ValueError(f"{name} has labels not seen in y: {np.unique(y[unknown])[:10]}")
    return pos


def is_pixels(X) -> bool:
    """Whether X holds 8-bit pixels (uint8): kept as stored, converted where they are used."""
    return getattr(X, "dtype", None) in (np.uint8, torch.uint8)


def training_images(X_fit, dtype: torch.dtype, device: torch.device):
    """Training images as a tensor in the working dtype, except 8-bit pixels, which stay uint8
    (a quarter of float32's bytes; ``kernel.as_working`` converts them per chunk), and on-disk
    rows, which stay a description: Ray workers read their own rows
    (``backends.open_backend`` reads them in-process)."""
    from ray_convrfm.data.ondisk import DiskRows

    if isinstance(X_fit, DiskRows):
        return X_fit
    if is_pixels(X_fit):
        return torch.as_tensor(X_fit).to(device)
    return as_tensor(X_fit, dtype, device)
