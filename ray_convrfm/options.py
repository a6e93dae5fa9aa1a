"""Options, one frozen dataclass per subsystem; override with ``dataclasses.replace``."""

from __future__ import annotations

from dataclasses import dataclass

#: Default working-memory budget of one kernel block. 512 MiB keeps a 2-core laptop responsive and
#: is far below a GPU's memory; raise it on big machines for fewer, larger blocks.
DEFAULT_MEMORY_BUDGET_MB = 512


@dataclass(frozen=True)
class ComputeOptions:
    """How kernels and AGOPs are computed.

    Parameters
    ----------
    dtype : {"float32", "float64"}
        Working precision. float32 is fast; float64 is for checking.
    device : str
        "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    engine : {"auto", "numba", "torch"}
        "numba" is the fused CPU path (one pass per image pair, in cache); "torch" is the
        vectorised path that runs on any torch device. "auto" takes numba on CPU, torch on GPU.
    memory_budget_mb : int
        Working memory one block may use; block sizes are derived from it, never from n.
    """

    dtype: str = "float32"
    device: str = "auto"
    engine: str = "auto"
    memory_budget_mb: int = DEFAULT_MEMORY_BUDGET_MB

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64'; found {self.dtype!r}")
        if self.engine not in ("auto", "numba", "torch"):
            raise ValueError(f"engine must be 'auto', 'numba' or 'torch'; found {self.engine!r}")
        if self.memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be positive; found {self.memory_budget_mb}")
