"""Where ConvRFM's kernels and AGOPs are computed: in this process, or by Ray shard workers.

Both backends run the same core functions (``kernel``, ``agop``); the estimator calls one
interface, so a laptop fit and a cluster fit differ only in ``workers`` / ``address``.
"""

from __future__ import annotations

import numpy as np
import torch

from ray_convrfm.kernels.agop import Workspace, patch_agop
from ray_convrfm.kernels.kernel import KernelParams, block_rows, kernel_matrix, prepare_side
from ray_convrfm.kernels.patches import patch_span, span_from_gram
from ray_convrfm.kernels.solvers import normal_equations

#: Rows and columns per stored kernel block (one zarr chunk, one task's unit of work).
DEFAULT_BLOCK = 256


class LocalKernels:
    """The single-machine core: one prepared side of the training images per metric."""

    def __init__(self, X_fit: torch.Tensor, params: KernelParams, engine: str, budget_mb: int,
                 progress: bool = False):
        self.X, self.params, self.basis = X_fit, params, None
        self.engine, self.budget, self.progress = engine, budget_mb, progress
        self.workspace = Workspace()

    @property
    def n(self) -> int:
        return len(self.X)

    def patch_span(self) -> torch.Tensor | None:
        """Orthonormal basis of the training patches' span (None: all of R^d)."""
        return patch_span(self.X, self.params.patch_size, self.params.padding)

    def set_basis(self, basis: torch.Tensor | None) -> None:
        self.basis = basis

    def centres(self, center_idx: np.ndarray | None) -> torch.Tensor:
        """The training images the predictor is built on (all, or the Nystrom centres)."""
        return self.X if center_idx is None else self.X[torch.as_tensor(center_idx)]

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

    ``shards`` (a ``distributed.ShardedImages``) are the training images on their workers;
    ``start`` makes them from an array. Columns of every kernel (all training images, the
    Nystrom centres) go from the workers that hold them to the workers that need them. With
    ``store`` (a path or fsspec URL) the kernels of the training rows go through a zarr store:
    workers write the blocks of their rows, a rerun computes only missing blocks, and the
    driver reads the finished kernel back (the exact solver needs it whole).
    """

    def __init__(self, shards, params: KernelParams, engine: str, budget_mb: int,
                 dtype: torch.dtype, device: torch.device, store: str | None = None,
                 owns_shards: bool = True):
        self.shards, self.owns = shards, owns_shards
        self.store, self.block = store, shards.block
        self.blocks_computed = 0
        self.dtype = "float32" if dtype == torch.float32 else "float64"
        self.torch_dtype, self.device = dtype, device
        self.params = {"depth": params.depth, "patch_size": params.patch_size,
                       "padding": params.padding}
        self.opts = {"dtype": self.dtype, "engine": engine, "budget_mb": budget_mb,
                     "basis": None, "block": shards.block}
        if store:
            from ray_convrfm.backends.store import open_run_store

            self.rows_fp = shards.fingerprint()
            open_run_store(store, self.rows_fp, self.params, self.dtype, self.block)

    @classmethod
    def start(cls, X_fit: torch.Tensor, params: KernelParams, engine: str, budget_mb: int,
              workers: int, address: str | None = None, gpus_per_worker: float | None = None,
              store: str | None = None, progress: bool = False, block: int = DEFAULT_BLOCK,
              placement_timeout_s: float | None = None, dtype: torch.dtype | None = None,
              device: torch.device | None = None) -> RayKernels:
        """Start (or join) Ray and hand the training images out to ``workers`` actors
        (``X_fit`` a tensor, or ``ParquetRows`` each worker reads its part of)."""
        shards = open_shards(X_fit, workers, address, gpus_per_worker, progress, block,
                             placement_timeout_s, align=bool(store))
        dtype = X_fit.dtype if dtype is None else dtype
        device = X_fit.device if device is None else device
        try:
            return cls(shards, params, engine, budget_mb, dtype, device, store)
        except BaseException:
            shards.close()  # e.g. a store of another run: release the workers
            raise

    @property
    def n(self) -> int:
        return self.shards.n

    def patch_span(self) -> torch.Tensor | None:
        """The training patches' span from the sum of the shards' patch Grams."""
        gram = self.shards.patch_gram(self.params["patch_size"], self.params["padding"])
        return span_from_gram(torch.from_numpy(gram), dtype=self.torch_dtype)

    def set_basis(self, basis: torch.Tensor | None) -> None:
        self.opts["basis"] = None if basis is None else basis.cpu().numpy()

    def centres(self, center_idx: np.ndarray | None) -> torch.Tensor:
        return self._tensor(self.shards.gather(center_idx))

    def set_metric(self, M: torch.Tensor) -> None:
        self.M = M.cpu().numpy()

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _spec(self, cols_fp: str):
        """What a stored kernel of the training rows against some columns, under M, is of."""
        from ray_convrfm.backends.store import StoreSpec, fingerprint

        basis = self.opts["basis"]
        return StoreSpec(rows_fingerprint=self.rows_fp, cols_fingerprint=cols_fp,
                         metric_fingerprint=fingerprint(self.M, *([] if basis is None
                                                                  else [basis])),
                         depth=self.params["depth"], patch_size=self.params["patch_size"],
                         padding=self.params["padding"], dtype=self.dtype, block=self.block)

    def _rows_against(self, cols, n_cols: int, cols_fp, desc: str) -> np.ndarray:
        """K(training images, cols): from the workers, through the store when there is one.
        ``cols_fp`` gives the columns' fingerprint (called only with a store)."""
        if not self.store:
            return self.shards.kernel(cols, self.M, self.params, self.opts, desc)
        from ray_convrfm.backends.store import kernel_url

        spec = self._spec(cols_fp())
        K, computed = self.shards.kernel_via_store(cols, n_cols, self.M, self.params,
                                                   kernel_url(self.store, spec), spec, "K",
                                                   self.opts, desc)
        self.blocks_computed += computed
        return K

    def train_kernel(self, desc: str = "train kernel") -> torch.Tensor:
        return self._tensor(self._rows_against(self.shards.parts(), self.n,
                                               lambda: self.rows_fp, desc))

    def cross_kernel(self, Z: torch.Tensor, desc: str = "kernel") -> torch.Tensor:
        from ray_convrfm.backends.store import rows_fingerprint

        Z = Z.cpu().numpy()
        K = self._rows_against(Z, len(Z), lambda: rows_fingerprint(Z, self.block), desc)
        return self._tensor(K.T)

    def agop(self, coef: torch.Tensor, sample_idx: np.ndarray,
             center_idx: np.ndarray | None = None) -> torch.Tensor:
        G = self.shards.agop(self.shards.parts(center_idx), coef.cpu().numpy(), sample_idx,
                             self.M, self.params, self.opts)
        return self._tensor(G).to(coef.dtype)

    def nystrom_system(self, center_idx: np.ndarray, Y: torch.Tensor):
        """Per-shard (K^T K, K^T Y) against the centres, summed (spec section 9); with a store
        the n x m kernel's blocks are stored, so an interrupted fit resumes."""
        store = None
        if self.store:
            from ray_convrfm.backends.store import fingerprint, kernel_url

            spec = self._spec(fingerprint(np.asarray(center_idx),
                                          extra=["centres of", self.rows_fp]))
            store = (kernel_url(self.store, spec), spec)
        KtK, KtY, K_mm, computed = self.shards.nystrom_system(
            self.shards.parts(center_idx), center_idx, Y.cpu().numpy(), self.M, self.params,
            self.opts, store)
        self.blocks_computed += computed
        return self._tensor(KtK), self._tensor(KtY), self._tensor(K_mm)

    def cross_centres(self, Z: torch.Tensor, center_idx: np.ndarray) -> torch.Tensor:
        K = self.shards.map_kernel(Z.cpu().numpy(), self.shards.parts(center_idx), self.M,
                                   self.params, self.opts)
        return self._tensor(K)

    def close(self) -> None:
        if self.owns:
            self.shards.close()


def open_shards(X: torch.Tensor | np.ndarray, workers: int, address: str | None = None,
                gpus_per_worker: float | None = None, progress: bool = False,
                block: int = DEFAULT_BLOCK, placement_timeout_s: float | None = None,
                align: bool = False):
    """Start or join Ray and spread images X over ``workers`` shard actors (block-aligned
    with ``align``, as a kernel store needs)."""
    from ray_convrfm.backends.driver import ShardedImages, resolve_gpus_per_worker, start_ray

    start_ray(workers, address)
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    elif not hasattr(X, "load"):  # ParquetRows stay a description: workers read them
        X = np.asarray(X)
    return ShardedImages(X, workers, threads=1, block=block, align=align, elastic=bool(address),
                         gpus_per_worker=resolve_gpus_per_worker(gpus_per_worker),
                         placement_timeout_s=placement_timeout_s, progress=progress)


def ray_scores(X, chain: list, centres: torch.Tensor, coef: torch.Tensor, M: torch.Tensor,
               basis: torch.Tensor | None, params: KernelParams, engine: str, budget_mb: int,
               workers: int, address: str | None = None, gpus_per_worker: float | None = None,
               progress: bool = False, placement_timeout_s: float | None = None) -> np.ndarray:
    """Predictions on Ray: test images X sharded over workers, featurised there by ``chain``,
    scored against ``centres`` with coefficients ``coef`` (both sent once)."""
    dtype = centres.dtype
    X = X.detach().cpu() if isinstance(X, torch.Tensor) else torch.from_numpy(np.asarray(X))
    shards = open_shards(X.to(dtype), workers, address, gpus_per_worker, progress,
                         placement_timeout_s=placement_timeout_s)
    try:
        for filters, padding in chain:
            shards.featurise(np.asarray(filters), padding)
        opts = {"dtype": "float32" if dtype == torch.float32 else "float64", "engine": engine,
                "budget_mb": budget_mb, "basis": None if basis is None else basis.cpu().numpy()}
        p = {"depth": params.depth, "patch_size": params.patch_size, "padding": params.padding}
        return shards.scores(centres.cpu().numpy(), coef.cpu().numpy(), M.cpu().numpy(), p,
                             opts)
    finally:
        shards.close()
