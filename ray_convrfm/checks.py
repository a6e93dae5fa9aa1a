"""Input checks shared by the estimators: clear messages that name what is wrong."""

from __future__ import annotations

import numpy as np
import torch


def as_images(X, name: str = "X", channels: int | None = None,
              image_size: tuple[int, int] | None = None) -> np.ndarray | torch.Tensor:
    """Check an image batch: rank 4, non-empty, floating/int pixels, finite, expected C and size."""
    if not isinstance(X, np.ndarray | torch.Tensor):
        X = np.asarray(X)
    shape = tuple(X.shape)
    if len(shape) != 4:
        hint = " (add a channel axis: X[:, None])" if len(shape) == 3 else ""
        raise ValueError(f"{name} must have shape (n, C, H, W); found {shape}{hint}")
    if shape[0] == 0:
        raise ValueError(f"{name} has no images (shape {shape})")
    if channels is not None and shape[1] != channels:
        raise ValueError(f"{name} has {shape[1]} channels; the model was fitted on {channels}")
    if image_size is not None and tuple(shape[2:]) != tuple(image_size):
        raise ValueError(f"{name} has images of size {shape[2:]}; the model was fitted on "
                         f"{tuple(image_size)}")
    if isinstance(X, np.ndarray):
        if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
            raise TypeError(f"{name} must hold numbers; found dtype {X.dtype}")
        bad = ~np.isfinite(X) if np.issubdtype(X.dtype, np.floating) else None
    else:
        bad = ~torch.isfinite(X) if X.is_floating_point() else None
    if bad is not None and bool(bad.any()):
        count = int(bad.sum())
        first = int(np.argwhere(np.asarray(bad.reshape(shape[0], -1).any(1)))[0, 0])
        raise ValueError(f"{name} contains {count} NaN or inf pixels (first in image {first})")
    return X


def as_labels(y, n: int, name: str = "y") -> np.ndarray:
    """Check a label vector: 1-D and one label per image."""
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D with one label per image; found shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} labels for {n} images")
    return y
