"""The one interface between the RFM loop and where kernels are computed.

``fit_rfm`` (``models/rfm.py``) and the estimators' predictions call only these methods, so a
laptop fit and a cluster fit run the same loop over one ``ShardedBackend`` (two executors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ray_convrfm.kernels.devices import resolve_engine
from ray_convrfm.kernels.kernel import KernelParams
from ray_convrfm.kernels.pcg import Preconditioner
from ray_convrfm.options import DEFAULT_MEMORY_BUDGET_MB


@dataclass(frozen=True)
class KernelSpec:
    """How one layer's kernels are computed, besides the images and M: sent with every task.

    ``dtype`` is resolved (no None). ``engine`` is the one asked for ("auto" included): it is
    resolved where the work runs (``engine_on``), since a CPU driver's "numba" is no engine for
    a worker's GPU; an explicit engine the device cannot run is refused there, never replaced.
    """

    params: KernelParams
    dtype: str = "float32"
    engine: str = "auto"
    memory_budget_mb: int = DEFAULT_MEMORY_BUDGET_MB

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype == "float32" else torch.float64

    def engine_on(self, device: torch.device) -> str:
        """The engine for work on ``device``: "auto" gives numba on a CPU, Triton on CUDA when
        it imports, else torch (``devices.resolve_engine``)."""
        return resolve_engine(self.engine, device)


@dataclass(frozen=True)
class LayerState:
    """Everything a task needs about the current layer besides the images, in one value: the
    chain of filter banks the stored images pass through first (Deep ConvRFM's feature map,
    ((filters, padding), ...)), the metric M (r x r in the basis' coordinates), the patch basis
    (d, r) or None, and the kernel spec. ``key`` names this state: workers keep what they
    prepared under it (sides, center blocks) and drop it when a task brings another."""

    key: str
    spec: KernelSpec
    M: np.ndarray
    basis: np.ndarray | None = None
    chain: tuple = ()


@dataclass(frozen=True)
class Targets:
    """The training targets as class indices (n,) and the number of classes c. The one-hot
    n x c matrix is made only where rows of the kernel are, a slab at a time (its K^T Y by
    ``solvers.class_sums``), and whole only for the exact solver, whose n is small."""

    labels: np.ndarray
    classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def one_hot(self, device: torch.device | None = None) -> torch.Tensor:
        """Y (n, c) float64: for the exact solver only."""
        Y = torch.zeros(len(self.labels), self.classes, dtype=torch.float64, device=device)
        Y[torch.arange(len(self.labels)), torch.as_tensor(self.labels, device=device)] = 1.0
        return Y


@dataclass
class NystromOperator:
    """The Nystrom problem (docs/math.md 9a) on the kernel divided by ``scale`` (the largest
    entry of K_mm), without K_nm^T K_nm: the rows of K(train, centers) stay where they were
    computed, and only m x c vectors travel to and from them."""

    scale: float
    KtY: torch.Tensor  # (m, c) float64: (K_nm / scale)^T Y
    #: (V, ridges) -> ((K_nm^T K_nm) / scale^2 + ridge K_mm / scale) V, float64 (m, R c):
    #: column block r with ``ridges[r]`` (every ridge in one pass over the rows)
    hessian: Callable[[torch.Tensor, list[float]], torch.Tensor]
    #: ridges -> B with B^T H B ~ I per block (its factor lives where K_mm's rows were gathered)
    preconditioner: Callable[[list[float]], Preconditioner]
    release: Callable[[], None]  # frees the resident rows and the factor
    #: ridges -> (v -> B^T H B v) in one round trip (chained where the rows and factor are),
    #: or None: the solver composes ``preconditioner`` and ``hessian``
    preconditioned_step: Callable[[list[float]], Callable[[torch.Tensor], torch.Tensor]] | None \
        = None


@runtime_checkable
class KernelBackend(Protocol):
    """Training images held somewhere, and the kernel work the RFM loop asks of them.

    Row indices (``center_idx``, ``sample_idx``) are sorted positions in the training images;
    ``center_idx=None`` means every training image. Results come back as tensors on the
    driver's device, and are small: m x c vectors, (d, d) AGOPs, scores per ridge (and the
    n x n kernel or m x m sums only for the exact and direct solvers, which are for small sizes).
    """

    @property
    def n(self) -> int:
        """Number of training images."""
        ...

    def configure(self, spec: KernelSpec, store: str | None) -> None:
        """Kernel parameters (and the kernel store, if any) of the calls that follow."""
        ...

    def patch_span(self, energy: float | None = None) -> torch.Tensor | None:
        """Orthonormal basis (d, r) of the training patches' span, or None when r = d;
        ``energy``: only the leading directions holding that share (``span_from_gram``)."""
        ...

    def channel_mean_squares(self, bank) -> np.ndarray:
        """Mean square of every channel of the training images after the current filter
        banks and one more, ``bank`` (a ``chunks.FilterBank``), over images and positions."""
        ...

    def set_metric(self, M: torch.Tensor, basis: torch.Tensor | None) -> None:
        """The metric of the calls that follow (r x r in the basis' coordinates)."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the driver's small results (m x c vectors, (d, d) metrics) live."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The working dtype (after ``configure``)."""
        ...

    @property
    def row_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the training images as the kernel sees them (after any featurisation)."""
        ...

    def train_kernel(self, desc: str) -> torch.Tensor:
        """K(train, train), (n, n): the exact solver's matrix."""
        ...

    def nystrom_system(self, center_idx: np.ndarray,
                       targets: Targets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K_nm^T K_nm, K_nm^T Y, K_mm) summed over row blocks: the direct solver (small m)."""
        ...

    def nystrom_operator(self, center_idx: np.ndarray, targets: Targets) -> NystromOperator:
        """The iterative solver's operator over resident rows of K_nm (nothing m x m here, and
        the one-hot targets made per slab where the rows are)."""
        ...

    def holdout(self, name: str, X, y: np.ndarray) -> None:
        """Keep held-out images (validation, monitor) and their class indices where kernels
        are computed; ``featurise`` applies to them too."""
        ...

    def evaluate(self, name: str, coefs: list[torch.Tensor],
                 center_idx: np.ndarray | None) -> np.ndarray:
        """(R, 3): [correct, summed squared error on one-hot targets, count] of the predictor
        K(., centers) @ coef for every coef (m, c) in ``coefs`` on held-out set ``name``."""
        ...

    def agop(self, coef: torch.Tensor, sample_idx: np.ndarray,
             center_idx: np.ndarray | None) -> torch.Tensor:
        """Patch AGOP (d, d) of f = coef^T K(centers, .) averaged over the sample images."""
        ...

    def centers(self, center_idx: np.ndarray | None) -> torch.Tensor:
        """The predictor's centers (training images after any featurisation), in the driver."""
        ...

    def featurise(self, bank) -> None:
        """Replace the training (and held-out) images by their image through ``bank`` (a
        ``chunks.FilterBank``: convolution, activation, pooling) (Deep ConvRFM)."""
        ...

    def scores(self, Z: torch.Tensor | np.ndarray, coef: torch.Tensor,
               center_idx: np.ndarray | None, chain: list) -> np.ndarray:
        """K(chain(Z), centers) @ coef (float64): predictions. ``chain`` is the filter banks
        [(filters, padding), ...] applied to Z first (Deep ConvRFM's feature map)."""
        ...

    def report(self) -> dict:
        """Facts to record for the iteration just ended (blocks computed since the previous
        call, workers' peak memory)."""
        ...

    def timings(self) -> dict[str, float]:
        """Seconds spent per distributed stage so far (empty in-process)."""
        ...

    def close(self) -> None:
        """Release workers and their reservations."""
        ...
