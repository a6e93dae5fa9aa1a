"""The one place that decides devices and dtypes (no ``.cuda()`` anywhere else)."""

from __future__ import annotations

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


def resolve_engine(engine: str, device: torch.device) -> str:
    """numba on CPU, torch elsewhere, unless the caller insists."""
    if engine == "auto":
        return "numba" if device.type == "cpu" else "torch"
    if engine == "numba" and device.type != "cpu":
        raise ValueError(f"engine='numba' runs on the CPU only; device is {device}")
    return engine
