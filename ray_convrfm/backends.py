"""Where ConvRFM's kernels and AGOPs are computed: in this process, or by Ray shard workers.

Both backends run the same core functions (``kernel``, ``agop``); the estimator calls one
interface, so a laptop fit and a cluster fit differ only in ``workers`` / ``address``.
"""

from __future__ import annotations

import numpy as np
import torch

from .agop import Workspace, patch_agop
from .kernel import KernelParams, block_rows, kernel_matrix, prepare_side
from .solvers import normal_equations

#: Rows and columns per stored kernel block (one zarr chunk, one task's unit of work).
DEFAULT_BLOCK = 256


class LocalKernels:
    """The single-machine core: one prepared side of the training images per metric."""

    def __init__(self, X_fit: torch.Tensor, params: KernelParams, basis: torch.Tensor | None,
                 engine: str, budget_mb: int, progress: bool = False):
        self.X, self.params, self.basis = X_fit, params, basis
        self.engine, self.budget, self.progress = engine, budget_mb, progress
        self.workspace = Workspace()

    def set_metric(self, M: torch.Tensor) -> None:
        self.M = M
        self.xs = prepare_side(self.X, M, self.params, self.basis)

    def train_kernel(self, desc: str = "train kernel") -> torch.Tensor:
        return kernel_matrix(self.xs, self.xs, self.engine, self.budget, symmetric=True,
                             progress=self.progress, desc=desc)

    def cross_kernel(self, Z: torch.Tensor, desc: str = "kernel") -> torch.Tensor:
        """K(Z, training images), shape (len(Z), n)."""
        zs = prepare_side(Z, self.M, self.params, self.basis)
        return kernel_matrix(zs, self.xs, self.engine, self.budget, progress=self.progress,
                             desc=desc)

    def agop(self, coef: torch.Tensor, sample_idx: np.ndarray,
             center_idx: np.ndarray | None = None) -> torch.Tensor:
        """AGOP of f = coef^T K(centres, .) at the sample (centres: all training images)."""
        centres = self.xs if center_idx is None else self.xs.take(center_idx)
        return patch_agop(centres, coef, self.xs.take(sample_idx), self.M, engine=self.engine,
                          budget_mb=self.budget, progress=self.progress,
                          workspace=self.workspace)

    def nystrom_system(self, center_idx: np.ndarray, Y: torch.Tensor):
        """(K_nm^T K_nm, K_nm^T Y, K_mm), summed over row blocks: K_nm is never held whole."""
        cs = self.xs.take(center_idx)
        m = len(center_idx)
        rows = max(1, min(len(self.xs), block_rows(m, self.xs.grids, self.engine,
                                                   self.xs.left.element_size(), self.budget)))
        KtK = torch.zeros(m, m, dtype=torch.float64, device=Y.device)
        KtY = torch.zeros(m, Y.shape[1], dtype=torch.float64, device=Y.device)
        for r in range(0, len(self.xs), rows):
            Kb = kernel_matrix(self.xs.rows(r, r + rows), cs, self.engine, self.budget)
            a, b = normal_equations(Kb, Y[r : r + rows])
            KtK += a
            KtY += b
        K_mm = kernel_matrix(cs, cs, self.engine, self.budget, symmetric=True)
        return KtK, KtY, K_mm

    def cross_centres(self, Z: torch.Tensor, center_idx: np.ndarray) -> torch.Tensor:
        """K(Z, centres), shape (len(Z), m)."""
        zs = prepare_side(Z, self.M, self.params, self.basis)
        return kernel_matrix(zs, self.xs.take(center_idx), self.engine, self.budget)

    def close(self) -> None:
        pass


class RayKernels:
    """Shard workers on Ray hold the training images; the driver only reduces small results.

    ``workers`` actors (one CPU each) on an embedded local Ray, or on the cluster at
    ``address``. With ``store`` (a path or fsspec URL) every kernel goes through a zarr store:
    workers write the blocks of their rows, a rerun computes only missing blocks, and the
    driver reads the finished kernel back (the exact solver needs it whole).
    """

    def __init__(self, X_fit: torch.Tensor, params: KernelParams, basis: torch.Tensor | None,
                 engine: str, budget_mb: int, workers: int, address: str | None = None,
                 store: str | None = None, block: int = DEFAULT_BLOCK):
        from .distributed import ShardedImages, start_ray

        start_ray(workers, address)
        self.X = X_fit.cpu().numpy()
        self.store, self.block = store, block
        self.blocks_computed = 0
        self.dtype = "float32" if X_fit.dtype == torch.float32 else "float64"
        self.params = {"depth": params.depth, "patch_size": params.patch_size,
                       "padding": params.padding}
        self.kw = {"dtype": self.dtype, "engine": "numba" if engine == "numba" else engine,
                   "budget_mb": budget_mb,
                   "basis": None if basis is None else basis.cpu().numpy()}
        self.shards = ShardedImages(self.X, workers, threads=1, block=block if store else None)
        self.device = X_fit.device
        if store:
            from .store import fingerprint, open_run_store

            self.rows_fp = fingerprint(self.X)
            open_run_store(store, self.rows_fp, self.params, self.dtype, block)

    def set_metric(self, M: torch.Tensor) -> None:
        self.M = M.cpu().numpy()

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _rows_against(self, cols: np.ndarray) -> np.ndarray:
        """K(training images, cols): from the workers, through the store when there is one."""
        if not self.store:
            return self.shards.kernel(cols, self.M, self.params, **self.kw)
        from .store import StoreSpec, fingerprint, kernel_url

        basis = self.kw["basis"]
        spec = StoreSpec(rows_fingerprint=self.rows_fp, cols_fingerprint=fingerprint(cols),
                         metric_fingerprint=fingerprint(self.M, *([] if basis is None
                                                                  else [basis])),
                         depth=self.params["depth"], patch_size=self.params["patch_size"],
                         padding=self.params["padding"], dtype=self.dtype, block=self.block)
        K, computed = self.shards.kernel_via_store(cols, self.M, self.params,
                                                   kernel_url(self.store, spec), spec, "K",
                                                   **self.kw)
        self.blocks_computed += computed
        return K

    def train_kernel(self, desc: str = "train kernel") -> torch.Tensor:
        return self._tensor(self._rows_against(self.X))

    def cross_kernel(self, Z: torch.Tensor, desc: str = "kernel") -> torch.Tensor:
        return self._tensor(self._rows_against(Z.cpu().numpy()).T)

    def agop(self, coef: torch.Tensor, sample_idx: np.ndarray,
             center_idx: np.ndarray | None = None) -> torch.Tensor:
        centres = self.X if center_idx is None else self.X[center_idx]
        G = self.shards.agop(centres, coef.cpu().numpy(), sample_idx, self.M, self.params,
                             **self.kw)
        return self._tensor(G).to(coef.dtype)

    def nystrom_system(self, center_idx: np.ndarray, Y: torch.Tensor):
        """Per-shard (K^T K, K^T Y) against the centres, summed here (spec section 9)."""
        KtK, KtY, K_mm = self.shards.nystrom_system(self.X[center_idx], center_idx,
                                                    Y.cpu().numpy(), self.M, self.params,
                                                    **self.kw)
        return self._tensor(KtK), self._tensor(KtY), self._tensor(K_mm)

    def cross_centres(self, Z: torch.Tensor, center_idx: np.ndarray) -> torch.Tensor:
        K = self.shards.map_kernel(Z.cpu().numpy(), self.X[center_idx], self.M, self.params,
                                   **self.kw)
        return self._tensor(K)

    def close(self) -> None:
        self.shards.close()
