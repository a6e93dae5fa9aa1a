"""Input checks shared by the estimators: clear messages that name what is wrong."""

from __future__ import annotations

import numpy as np
import torch


def as_images(X, name: str = "X", channels: int | None = None,
              image_size: tuple[int, int] | None = None) -> np.ndarray | torch.Tensor:
    """Check an image batch: rank 4, non-empty, floating/int pixels, finite, expected C and size."""
    if not isinstance(X, np.ndarray | torch.Tensor):
        X = np.asarray(X)
    if isinstance(X, torch.Tensor):
        readable_tensor(X, name)
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
        if X.is_complex() or X.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers; found dtype {X.dtype}")
        bad = ~torch.isfinite(X) if X.is_floating_point() else None
    if bad is not None and bool(bad.any()):
        count = int(bad.sum())
        first = int(np.argwhere(np.asarray(bad.reshape(shape[0], -1).any(1)))[0, 0])
        raise ValueError(f"{name} contains {count} NaN or inf pixels (first in image {first})")
    return X


def readable_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse a tensor whose values cannot be read: on the ``meta`` device (shapes only, no
    data) or not a dense (strided) one."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is a tensor on the meta device, which holds shapes but no "
                         f"values; pass one on a device with data (cpu, cuda)")
    if t.layout != torch.strided:
        raise ValueError(f"{name} is a {t.layout} tensor on device {t.device}; pass a dense "
                         f"one ({name}.to_dense())")
    return t


def as_labels(y, n: int, name: str = "y") -> np.ndarray:
    """Check a label vector: 1-D, one label per image, no NaN or inf labels."""
    y = np.asarray(readable_tensor(y, name).cpu() if isinstance(y, torch.Tensor) else y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D with one label per image; found shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} labels for {n} images")
    if y.dtype.kind in "fc":
        bad = ~np.isfinite(y)
    elif y.dtype.kind == "O":
        bad = np.array([isinstance(v, float | complex | np.inexact) and not np.isfinite(v)
                        for v in y], dtype=bool)
    else:
        bad = None
    if bad is not None and bad.any():
        raise ValueError(f"{name} contains {int(bad.sum())} NaN or inf labels (first at index "
                         f"{int(np.flatnonzero(bad)[0])}); every label must be a class")
    return y


def psd_tolerance(dtype, d: int) -> float:
    """Relative tolerance of ``check_psd`` for a (d, d) matrix held in ``dtype``: 1e-6, or
    8 d eps where the dtype is coarser (rounding a PSD matrix to float32 moves its eigenvalues
    by up to about d eps times its largest entry)."""
    eps = torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) else np.finfo(dtype).eps
    return max(1e-6, 8 * d * float(eps))


def check_psd(M, name: str = "M", tol: float | None = None) -> None:
    """Refuse a square matrix that is not symmetric positive semi-definite.

    Within a relative tolerance (``psd_tolerance`` of M's dtype unless ``tol`` is given):
    max |M - M^T| <= tol * max |M_ij| and smallest eigenvalue >= -tol * largest |eigenvalue|.
    The message names ``name`` and its smallest eigenvalue. M must be finite (checked first).
    """
    if isinstance(M, torch.Tensor):
        dtype = M.dtype if M.is_floating_point() else torch.float64
        A = M.detach().to("cpu", torch.float64)
    else:
        M = np.asarray(M)
        dtype = M.dtype if np.issubdtype(M.dtype, np.floating) else np.float64
        A = torch.from_numpy(M.astype(np.float64))
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square matrix; found shape {tuple(A.shape)}")
    if not bool(torch.isfinite(A).all()):
        raise ValueError(f"{name} contains NaN or inf entries")
    tol = psd_tolerance(dtype, A.shape[0]) if tol is None else tol
    scale = float(A.abs().max()) if A.numel() else 0.0
    if scale == 0:
        return
    asym = float((A - A.T).abs().max())
    if asym > tol * scale:
        raise ValueError(f"{name} must be symmetric: max |{name} - {name}^T| is {asym:.3g}, "
                         f"{asym / scale:.3g} of its largest entry (tolerance {tol:.1g})")
    vals = torch.linalg.eigvalsh(0.5 * (A + A.T))
    low, top = float(vals[0]), float(vals.abs().max())
    if low < -tol * top:
        raise ValueError(f"{name} must be positive semi-definite: its smallest eigenvalue is "
                         f"{low:.4g} (largest |eigenvalue| {top:.4g}; eigenvalues down to "
                         f"-{tol:.1g} x that are taken as rounding)")
