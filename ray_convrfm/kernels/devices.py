"""The one place that decides devices and dtypes (no ``.cuda()`` anywhere else)."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn "auto" into CUDA when available, else CPU; check explicit CUDA requests."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "float32"/"float64" (or a torch dtype) to a torch floating dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64; found {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64'; found {dtype!r}")
    return _DTYPES[dtype]


def resolve_dtype_for(X, requested: str | torch.dtype | None) -> torch.dtype:
    """Working dtype for images X: ``requested`` when given, else X's own precision.

    ``requested=None`` means float64 for float64 input and float32 for everything else (float32,
    half precision, integer or uint8 pixels). X is a numpy array or torch tensor; anything else
    is read through ``np.asarray``. An explicit ``requested`` always wins.
    """
    if requested is not None:
        return resolve_dtype(requested)
    if isinstance(X, torch.Tensor):
        return torch.float64 if X.dtype == torch.float64 else torch.float32
    dt = X.dtype if isinstance(X, np.ndarray) else np.asarray(X).dtype
    return torch.float64 if dt == np.float64 else torch.float32


def resolve_engine(engine: str, device: torch.device) -> str:
    """numba on the CPU, fused Triton on CUDA when installed, else eager torch; unless the
    caller insists."""
    if engine == "auto":
        if device.type == "cpu":
            return "numba"
        if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            return "triton"
        return "torch"
    if engine == "numba" and device.type != "cpu":
        raise ValueError(f"engine='numba' runs on the CPU only; device is {device}")
    if engine == "triton" and device.type != "cuda":
        raise ValueError(f"engine='triton' runs on CUDA only; device is {device}")
    return engine
