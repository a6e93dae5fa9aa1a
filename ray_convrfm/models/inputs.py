"""Checked training, validation and monitor data for the estimators (one place for both).

Labels become indices into ``classes_``; validation is carved from the training data unless
given (stratified, seeded); parquet data sets keep their training rows unread, for the workers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ray_convrfm.checks import as_images, as_labels
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

    Without X_val, ``val_fraction`` of (X, y) is held out (``round(val_fraction * n)``
    images, at least one), drawn from ``rng``, and every class keeps at least one training
    image:

    - a class with a single image is refused (with the per-class counts): it cannot be both
      trained on and validated; pass X_val, y_val to fit on it;
    - a ``val_fraction`` that would leave fewer training images than classes is refused,
      naming the largest one that works;
    - the split is stratified (``sklearn.model_selection.train_test_split``) when the
      validation set can hold every class; a class that still has no training image (a large
      ``val_fraction`` on few images) swaps one of its validation images for a training image
      of a class that keeps two or more, seeded. Splits in which every class already has a
      training image are exactly ``train_test_split``'s.

    Parquet data sets hold out whole row groups; a class left without a training row is
    refused with the counts. Parquet rows are read as their stored 8-bit pixels.
    """
    from ray_convrfm.data.parquet import ParquetImages

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); found {val_fraction}")
    if isinstance(X, ParquetImages):
        return _parquet_fit_inputs(X, y, X_val, y_val, monitor, val_fraction, rng)
    X = as_images(X, "X")
    if y is None:
        raise ValueError("y is required (only parquet.ParquetImages carry their own labels)")
    y = as_labels(y, X.shape[0], "y")
    classes, y_idx, X_val, y_val = _classes_and_given_validation(y, X_val, y_val, X.shape)
    if X_val is not None:
        X_fit, y_fit = X, y_idx
    else:
        fit_idx, val_idx = split_validation(classes, y_idx, val_fraction,
                                            int(rng.integers(2**31 - 1)))
        X_fit, y_fit, X_val, y_val = X[fit_idx], y_idx[fit_idx], X[val_idx], y_idx[val_idx]
    return FitInputs(classes, X, X_fit, y_fit, X_val, y_val,
                     *_monitor(classes, monitor, X.shape))


def split_validation(classes: np.ndarray, y_idx: np.ndarray, val_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of ``prepare_fit_inputs``'s carved split (see there)."""
    n, k = len(y_idx), len(classes)
    counts = np.bincount(y_idx, minlength=k)
    if counts.min() < 2:
        single = [_label(classes[c]) for c in np.flatnonzero(counts < 2)]
        raise ValueError(
            f"class(es) {single[:10]} have a single image, which cannot be both trained on and "
            f"held out for validation (images per class: {_counts_text(classes, counts)}); "
            f"add images of those classes, drop them, or pass X_val and y_val")
    n_val = max(1, int(round(val_fraction * n)))
    if n - n_val < k:
        most = (n - k + 0.5) / n  # round(f * n) <= n - k
        raise ValueError(
            f"val_fraction={val_fraction} holds out {n_val} of the {n} images, leaving "
            f"{n - n_val} for training, fewer than the {k} classes (each needs one); use "
            f"val_fraction < {np.floor(most * 1e4) / 1e4:g} (at most {n - k} images held out), "
            f"or pass X_val and y_val")
    stratify = y_idx if n_val >= k else None
    fit_idx, val_idx = train_test_split(np.arange(n), test_size=n_val, stratify=stratify,
                                        random_state=seed)
    return _every_class_trained(fit_idx, val_idx, y_idx, k, seed)


def _every_class_trained(fit_idx: np.ndarray, val_idx: np.ndarray, y_idx: np.ndarray, k: int,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The split unchanged when every class has a training row; else, for each class without
    one, one of its validation rows swapped (seeded) for a training row of a class that keeps
    at least two. Needs len(fit_idx) >= k (then such a class always exists)."""
    fit_counts = np.bincount(y_idx[fit_idx], minlength=k)
    missing = np.flatnonzero(fit_counts == 0)
    if not len(missing):
        return fit_idx, val_idx
    gen = np.random.default_rng(seed)
    fit_idx, val_idx = fit_idx.copy(), val_idx.copy()
    for c in missing:
        v = gen.choice(np.flatnonzero(y_idx[val_idx] == c))
        f = gen.choice(np.flatnonzero(fit_counts[y_idx[fit_idx]] >= 2))
        fit_counts[c] += 1
        fit_counts[y_idx[fit_idx[f]]] -= 1
        fit_idx[f], val_idx[v] = val_idx[v], fit_idx[f]
    return fit_idx, val_idx


def _counts_text(classes: np.ndarray, counts: np.ndarray, limit: int = 20) -> str:
    """``{label: count, ...}`` for at most ``limit`` classes (the smallest counts first)."""
    order = np.argsort(counts, kind="stable")[:limit]
    text = ", ".join(f"{_label(classes[c])!r}: {int(counts[c])}" for c in sorted(order))
    return "{" + text + (", ...}" if len(classes) > limit else "}")


def _label(value):
    """A class label as a plain Python value (numpy scalars unwrapped) for messages."""
    return value.item() if isinstance(value, np.generic) else value


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


def _parquet_fit_inputs(X, y, X_val, y_val, monitor, val_fraction: float,
                        rng: np.random.Generator):
    """Fit inputs from a parquet split: labels read here, validation rows held out in whole
    row groups; the fit and validation rows are left for the workers to read
    (``ParquetRows``)."""
    from ray_convrfm.data.parquet import ParquetRows

    labels = X.labels()
    if y is not None:
        y = as_labels(y, len(labels), "y")
        if not np.array_equal(y, labels):
            raise ValueError("y differs from the labels stored in the parquet data set; "
                             "pass y=None to use the stored labels")
    classes, y_idx, X_val, y_val = _classes_and_given_validation(labels, X_val, y_val, X.shape)
    if X_val is not None:
        fit = [(0, len(X))]
    else:
        fit, val = X.split_validation(val_fraction, rng)
        y_val = np.concatenate([y_idx[a:b] for a, b in val])
        _refuse_untrained_classes(classes, np.concatenate([y_idx[a:b] for a, b in fit]),
                                  y_val, val_fraction)
        X_val = ParquetRows(X, tuple(val))  # read where it is scored, as stored pixels
    X_fit = ParquetRows(X, tuple(fit))
    y_fit = np.concatenate([y_idx[a:b] for a, b in fit])
    return FitInputs(classes, X, X_fit, y_fit, X_val, y_val,
                     *_monitor(classes, monitor, X.shape))


def _refuse_untrained_classes(classes: np.ndarray, y_fit: np.ndarray, y_val: np.ndarray,
                              val_fraction: float) -> None:
    """A parquet split (whole row groups held out) that leaves a class no training row."""
    k = len(classes)
    fit_counts = np.bincount(y_fit, minlength=k)
    if fit_counts.min() > 0:
        return
    missing = [_label(classes[c]) for c in np.flatnonzero(fit_counts == 0)]
    val_counts = np.bincount(y_val, minlength=k)
    raise ValueError(
        f"the validation row groups held out by val_fraction={val_fraction} take every row of "
        f"class(es) {missing[:10]}, which would never be predicted (training rows per class: "
        f"{_counts_text(classes, fit_counts)}; validation rows: "
        f"{_counts_text(classes, val_counts)}); use a smaller val_fraction, write the data "
        f"set with its classes mixed across row groups, or pass X_val and y_val")


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
    (a quarter of float32's bytes; ``kernel.as_working`` converts them per chunk), and parquet
    rows, which stay a description: Ray workers read their own rows
    (``backends.open_backend`` reads them in-process)."""
    from ray_convrfm.data.parquet import ParquetRows

    if isinstance(X_fit, ParquetRows):
        return X_fit
    if is_pixels(X_fit):
        return torch.as_tensor(X_fit).to(device)
    return as_tensor(X_fit, dtype, device)
