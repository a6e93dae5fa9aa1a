"""The validation split: the one place a fit's held-out rows are chosen, for any images.

Rows are held out in *units*: single rows for images in memory (stratified, as
``sklearn.model_selection.train_test_split``), whole row groups for a parquet data set (so
the driver reads none of the training rows and each worker only its own), as the data set's
``holdout_units`` gives them. Either way every class keeps a training row, or the split is
refused naming the counts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import train_test_split


def split_validation(y_idx: np.ndarray, classes: np.ndarray, fraction: float, seed: int,
                     units: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) as index arrays: ``round(fraction * n)`` rows held out
    (at least one), drawn with ``seed``.

    ``units`` (sizes of consecutive row blocks that are held out whole, summing to n; None:
    single rows): with single rows a class with one image, or a fraction leaving fewer
    training rows than classes, is refused; the split is stratified when the validation set
    can hold every class, and a class still left untrained swaps one validation row for a
    training row of a class that keeps two (seeded), otherwise it is exactly
    ``train_test_split``'s. With blocks, random blocks are held out until the fraction is
    reached (at least one block trains), and a class left without a training row is refused.
    """
    counts = np.bincount(y_idx, minlength=len(classes))
    if units is None:
        return _split_rows(y_idx, classes, counts, fraction, seed)
    return _split_blocks(y_idx, classes, list(units), fraction, seed)


def _split_rows(y_idx: np.ndarray, classes: np.ndarray, counts: np.ndarray, fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    n, k = len(y_idx), len(classes)
    if counts.min() < 2:
        single = [_label(classes[c]) for c in np.flatnonzero(counts < 2)]
        raise ValueError(
            f"class(es) {single[:10]} have a single image, which cannot be both trained on and "
            f"held out for validation (images per class: {counts_text(classes, counts)}); "
            f"add images of those classes, drop them, or pass X_val and y_val")
    n_val = max(1, int(round(fraction * n)))
    if n - n_val < k:
        most = (n - k + 0.5) / n  # round(f * n) <= n - k
        raise ValueError(
            f"val_fraction={fraction} holds out {n_val} of the {n} images, leaving "
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


def _split_blocks(y_idx: np.ndarray, classes: np.ndarray, sizes: list[int], fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(y_idx)
    if sum(sizes) != n or min(sizes, default=0) < 1:
        raise ValueError(f"holdout units {sizes[:10]} do not partition the {n} rows")
    if len(sizes) < 2:
        raise ValueError(f"{n} rows in one block cannot be split into fit and validation parts")
    starts = [0, *itertools.accumulate(sizes)]
    want = max(1, int(round(fraction * n)))
    held, taken = [], 0
    for b in np.random.default_rng(seed).permutation(len(sizes)):
        if taken >= want or len(held) == len(sizes) - 1:
            break
        held.append(b)
        taken += sizes[b]
    is_val = np.zeros(n, bool)
    for b in held:
        is_val[starts[b]:starts[b + 1]] = True
    fit_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    _refuse_untrained(classes, y_idx[fit_idx], y_idx[val_idx], fraction)
    return fit_idx, val_idx


def _refuse_untrained(classes: np.ndarray, y_fit: np.ndarray, y_val: np.ndarray,
                      fraction: float) -> None:
    """A block split that leaves a class no training row: refused with the counts."""
    k = len(classes)
    fit_counts = np.bincount(y_fit, minlength=k)
    if fit_counts.min() > 0:
        return
    missing = [_label(classes[c]) for c in np.flatnonzero(fit_counts == 0)]
    raise ValueError(
        f"the validation row groups held out by val_fraction={fraction} take every row of "
        f"class(es) {missing[:10]}, which would never be predicted (training rows per class: "
        f"{counts_text(classes, fit_counts)}; validation rows: "
        f"{counts_text(classes, np.bincount(y_val, minlength=k))}); use a smaller "
        f"val_fraction, write the data set with its classes mixed across row groups, or pass "
        f"X_val and y_val")


def ranges_of(rows: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Row indices as ``(start, stop)`` ranges of consecutive rows, in their order."""
    if not len(rows):
        return ()
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return tuple((int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops, strict=True))


def counts_text(classes: np.ndarray, counts: np.ndarray, limit: int = 20) -> str:
    """``{label: count, ...}`` for at most ``limit`` classes (the smallest counts first)."""
    order = np.argsort(counts, kind="stable")[:limit]
    text = ", ".join(f"{_label(classes[c])!r}: {int(counts[c])}" for c in sorted(order))
    return "{" + text + (", ...}" if len(classes) > limit else "}")


def _label(value):
    """A class label as a plain Python value (numpy scalars unwrapped) for messages."""
    return value.item() if isinstance(value, np.generic) else value
