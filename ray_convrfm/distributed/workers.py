"""Ray actors owning shards of the images (spec section 9).

A worker keeps its shard where it runs and calls the single-machine core (``kernel``, ``agop``):
kernel rows of its images against columns that reach it once through Ray's object store, and
the unaveraged patch AGOP over the sample images it owns, against the whole training set.
Every method is a pure function of its arguments and the shard, so a retried task (after a
worker restart) gives the same answer.
"""

from __future__ import annotations

import numpy as np
import torch

from ..agop import patch_agop
from ..kernel import KernelParams, as_tensor, kernel_matrix, prepare_side


class ShardWorker:
    """Holds rows ``start..stop`` of the images; constructed by ``ray.remote(ShardWorker)``."""

    def __init__(self, images: np.ndarray, start: int, threads: int | None = None):
        if threads:
            import numba

            torch.set_num_threads(threads)
            numba.set_num_threads(threads)
        self.images = np.ascontiguousarray(images)
        self.start = start

    def size(self) -> int:
        return len(self.images)

    def pid(self) -> int:
        """The worker's process id (for tests that kill workers)."""
        import os

        return os.getpid()

    def _side(self, X: np.ndarray, M: np.ndarray, params: dict, dtype: str,
              basis: np.ndarray | None):
        dt = torch.float32 if dtype == "float32" else torch.float64
        dev = torch.device("cpu")
        Q = None if basis is None else as_tensor(basis, dt, dev)
        return prepare_side(as_tensor(X, dt, dev), as_tensor(M, dt, dev), KernelParams(**params),
                            Q)

    def kernel_rows(self, cols: np.ndarray, M: np.ndarray, params: dict, dtype: str = "float32",
                    engine: str = "numba", budget_mb: int = 512,
                    basis: np.ndarray | None = None) -> np.ndarray:
        """K(shard, cols), shape (shard size, len(cols)); ``cols`` arrives as an object ref."""
        xs = self._side(self.images, M, params, dtype, basis)
        zs = self._side(cols, M, params, dtype, basis)
        return kernel_matrix(xs, zs, engine, budget_mb).numpy()

    def store_kernel_rows(self, cols: np.ndarray, M: np.ndarray, params: dict, url: str,
                          spec_fields: dict, name: str, shape: tuple[int, int], start: int,
                          stop: int, dtype: str = "float32", engine: str = "numba",
                          budget_mb: int = 512, basis: np.ndarray | None = None) -> int:
        """Compute this shard's missing blocks of kernel ``name`` and write each to the store.

        Rows start..stop are this shard's (block-aligned); each block is written, then marked,
        so a retry after a crash recomputes only unmarked blocks. Returns the blocks computed.
        """
        from ..store import KernelStore, StoreSpec

        store = KernelStore(url, StoreSpec(**spec_fields))
        b = store.spec.block
        mine = [(i, j) for i, j in store.missing(name, shape) if start <= i * b < stop]
        if not mine:
            return 0
        xs = self._side(self.images, M, params, dtype, basis)
        zs = self._side(cols, M, params, dtype, basis)
        for i, j in mine:
            r0, c0 = i * b - self.start, j * b
            block = kernel_matrix(xs.rows(r0, r0 + b), zs.rows(c0, c0 + b), engine, budget_mb)
            store.write_block(name, shape, i, j, block.numpy())
        return len(mine)

    def kernel_pair(self, rows: np.ndarray, cols: np.ndarray, M: np.ndarray, params: dict,
                    dtype: str = "float32", engine: str = "numba", budget_mb: int = 512,
                    basis: np.ndarray | None = None) -> np.ndarray:
        """K(rows, cols) for images given by the driver (a slice of test or validation images)."""
        xs = self._side(rows, M, params, dtype, basis)
        zs = self._side(cols, M, params, dtype, basis)
        return kernel_matrix(xs, zs, engine, budget_mb).numpy()

    def normal_equations_part(self, centres: np.ndarray, Y: np.ndarray, centre_rows: np.ndarray,
                              M: np.ndarray, params: dict, dtype: str = "float32",
                              engine: str = "numba", budget_mb: int = 512,
                              basis: np.ndarray | None = None):
        """This shard's (K^T K, K^T Y) against the centres, and the K rows of the centres it
        holds (local indices ``centre_rows``): only m x m-sized results leave the worker."""
        from ..solvers import normal_equations

        K = torch.from_numpy(self.kernel_rows(centres, M, params, dtype, engine, budget_mb,
                                              basis))
        KtK, KtY = normal_equations(K, torch.from_numpy(np.asarray(Y)))
        return KtK.numpy(), KtY.numpy(), K[np.asarray(centre_rows, dtype=np.int64)].numpy()

    def agop_part(self, train: np.ndarray, coef: np.ndarray, sample_rows: np.ndarray,
                  M: np.ndarray, params: dict, dtype: str = "float32", engine: str = "numba",
                  budget_mb: int = 512, basis: np.ndarray | None = None) -> np.ndarray:
        """Unaveraged patch AGOP over this shard's sample images (local row indices).

        The predictor involves every training image, so ``train`` and ``coef`` come whole
        (once, through the object store); the result is a small (d, d) sum to be reduced.
        """
        d = M.shape[0]
        if len(sample_rows) == 0:
            return np.zeros((d, d))
        xs = self._side(train, M, params, dtype, basis)
        zs = self._side(self.images[np.asarray(sample_rows)], M, params, dtype, basis)
        dt = xs.left.dtype
        G = patch_agop(xs, torch.as_tensor(coef, dtype=dt), zs, torch.as_tensor(M, dtype=dt),
                       engine=engine, budget_mb=budget_mb, average=False)
        return G.to(torch.float64).numpy()
