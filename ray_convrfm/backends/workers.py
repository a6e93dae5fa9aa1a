"""Ray actors owning shards of the images (docs/math.md section 9).

A worker keeps its shard where it runs (on its GPU when it has one) and calls the
single-machine core (``kernels``): kernel rows of its images against columns that reach it once
through Ray's object store, the unaveraged patch AGOP over the sample images it owns, the
partial sums of the Nystrom normal equations, class scores for blocks of test images and, for
Deep ConvRFM, the featurisation of its own shard.

Every method is a pure function of its arguments and the raw shard: the filter banks applied
so far (the *chain*) arrive with each call, and what a worker caches (featurised images,
prepared kernel sides) it can rebuild from them. A restarted actor (built again from its raw
shard) therefore gives the same answer to a retried task.
"""

from __future__ import annotations

import numpy as np
import torch

from ray_convrfm.backends.protocol import KernelSpec
from ray_convrfm.backends.store import KernelStore, StoreSpec, block_digests, fingerprint
from ray_convrfm.kernels.agop import agop_from_sides
from ray_convrfm.kernels.kernel import as_tensor, kernel_matrix, prepare_side
from ray_convrfm.kernels.patches import featurise, patch_gram
from ray_convrfm.kernels.solvers import normal_equations


def apply_chain(Z: torch.Tensor, chain: list) -> torch.Tensor:
    """Images after the filter banks ``chain`` = [(filters, padding), ...] (Deep ConvRFM)."""
    for filters, padding in chain:
        Z = featurise(Z, torch.as_tensor(np.asarray(filters)), padding)
    return Z


class ShardWorker:
    """Holds rows ``start..start + len(images)`` of the images; made by ``ray.remote``."""

    def __init__(self, images: np.ndarray, start: int, threads: int | None = None,
                 gpus: float = 0):
        if threads:
            import numba

            torch.set_num_threads(threads)
            numba.set_num_threads(threads)
        gpu = gpus and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")
        if hasattr(images, "load"):  # a description of parquet rows: read them here
            images = images.load()
        self.raw = np.ascontiguousarray(images)
        self.start = start
        self._features: tuple[str, torch.Tensor] | None = None
        self._sides: dict[tuple, object] = {}

    # ------------------------------------------------------------------ the shard
    def size(self) -> int:
        return len(self.raw)

    def pid(self) -> int:
        """The worker's process id (for tests that kill workers)."""
        import os

        return os.getpid()

    def peak_rss_mb(self) -> float:
        """This worker process's peak resident memory so far, in MiB."""
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10

    def node(self) -> str:
        """The id of the Ray node this worker runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def _images(self, chain: list) -> torch.Tensor:
        """The shard after the chain of filter banks ``[(filters, padding), ...]``, cached."""
        key = fingerprint(*[f for f, _ in chain], extra=[p for _, p in chain])
        if self._features is None or self._features[0] != key:
            self._features = None
            self._sides.clear()
            self._features = (key, apply_chain(torch.from_numpy(self.raw).to(self.device), chain))
        return self._features[1]

    def prepare(self, chain: list) -> tuple[int, ...]:
        """Featurise the shard now (Deep ConvRFM, between layers); returns its shape."""
        return tuple(self._images(chain).shape)

    def images(self, chain: list, rows: np.ndarray | None = None) -> np.ndarray:
        """The shard's (featurised) images, or its local ``rows``: for columns and models."""
        Z = self._images(chain)
        if rows is not None:
            Z = Z[torch.as_tensor(np.asarray(rows, dtype=np.int64), device=Z.device)]
        return Z.cpu().numpy()

    def digests(self, chain: list, block: int) -> list[str]:
        """Per-block SHA-256 of the (featurised) shard; the driver combines them in order."""
        return block_digests(self._images(chain).cpu().numpy(), block)

    def patch_gram(self, chain: list, patch_size: int, padding: bool) -> np.ndarray:
        """Sum of p p^T over the shard's patches (the driver sums and finds their span)."""
        return patch_gram(self._images(chain), patch_size, padding).cpu().numpy()

    def add(self, *parts: np.ndarray) -> np.ndarray:
        """Sum of partial results: one node of the driver's reduction tree."""
        return sum(parts[1:], parts[0])

    # ------------------------------------------------------------------ kernel sides
    def _prepare(self, X, M: np.ndarray, basis: np.ndarray | None, spec: KernelSpec):
        dt = spec.torch_dtype
        Q = None if basis is None else as_tensor(basis, dt, self.device)
        return prepare_side(as_tensor(X, dt, self.device), as_tensor(M, dt, self.device),
                            spec.params, Q)

    def _cached(self, key: tuple, build):
        """A prepared side kept for the next task with the same key. Only one is kept: the
        centers under the current M serve the kernel, validation and AGOP stages in turn,
        and at scale a prepared side of the centers is the largest thing a worker holds."""
        if key not in self._sides:
            self._sides.clear()
            self._sides[key] = build()
        return self._sides[key]

    def _rows_side(self, chain: list, rows, M, basis, spec: KernelSpec):
        """The prepared side of some of the shard's rows (a slice or indices): prepared per
        task, so a worker's memory is set by its block of rows, not by its shard."""
        Z = self._images(chain)
        if not isinstance(rows, slice):
            rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=Z.device)
        return self._prepare(Z[rows], M, basis, spec)

    def _cols_side(self, cols_key: str, cols: tuple, M, basis, spec: KernelSpec):
        metric = fingerprint(M, *([] if basis is None else [basis]), extra=[spec])
        key = ("cols", cols_key, metric)

        def build():
            X = cols[0] if len(cols) == 1 else np.concatenate(cols, axis=0)
            return self._prepare(X, M, basis, spec)

        return self._cached(key, build)

    def _kernel(self, xs, zs, spec: KernelSpec) -> torch.Tensor:
        engine = "torch" if self.device.type == "cuda" else spec.engine
        return kernel_matrix(xs, zs, engine, spec.memory_budget_mb)

    # ------------------------------------------------------------------ kernels
    def kernel_rows(self, chain: list, r0: int, r1: int, M, basis, spec: KernelSpec,
                    cols_key: str, *cols: np.ndarray) -> np.ndarray:
        """K(shard rows r0..r1, cols); ``cols`` are the parts of the columns, in order, each
        resolved from the object store (never sent by the driver per task)."""
        xs = self._rows_side(chain, slice(r0, r1), M, basis, spec)
        zs = self._cols_side(cols_key, cols, M, basis, spec)
        return self._kernel(xs, zs, spec).cpu().numpy()

    def store_kernel_blocks(self, chain: list, blocks: list[tuple[int, int]], url: str,
                            store_spec: StoreSpec, name: str, shape: tuple[int, int], M,
                            basis, spec: KernelSpec, cols_key: str, *cols: np.ndarray) -> int:
        """Compute the given blocks (i, j) of kernel ``name`` (rows of this shard) and write
        each to the store, then mark it; blocks already marked (by an earlier attempt) are
        skipped. Returns the number of blocks computed."""
        store = KernelStore(url, store_spec)
        zs = self._cols_side(cols_key, cols, M, basis, spec)
        return store.fill(name, shape, blocks, lambda r0, r1: self._rows_side(
                              chain, slice(r0 - self.start, r1 - self.start), M, basis, spec),
                          zs, lambda xs, zs: self._kernel(xs, zs, spec))

    def scores(self, rows: np.ndarray, chain: list, alpha: np.ndarray, M, basis,
               spec: KernelSpec, cols_key: str, *centers: np.ndarray) -> np.ndarray:
        """Class scores K(chain(rows), centers) @ alpha (float64) for a block of images the
        driver sends (test or validation images); only (rows, classes) leaves the worker."""
        Z = apply_chain(torch.from_numpy(np.asarray(rows)).to(self.device), chain)
        K = self._kernel(self._prepare(Z, M, basis, spec),
                         self._cols_side(cols_key, centers, M, basis, spec), spec)
        return K.cpu().numpy().astype(np.float64) @ np.asarray(alpha, dtype=np.float64)

    def kernel_pair(self, rows: np.ndarray, M, basis, spec: KernelSpec, cols_key: str,
                    *cols: np.ndarray) -> np.ndarray:
        """K(rows, cols) for images the driver holds (a block of validation images)."""
        xs = self._prepare(rows, M, basis, spec)
        zs = self._cols_side(cols_key, cols, M, basis, spec)
        return self._kernel(xs, zs, spec).cpu().numpy()

    def normal_equations_part(self, chain: list, Y: np.ndarray, center_rows: np.ndarray, M,
                              basis, spec: KernelSpec, block: int, stored: tuple | None,
                              keep: str | None, cols_key: str, *centers: np.ndarray):
        """This shard's (K^T K, K^T Y) against the centers, the K rows of the centers it holds
        (local indices ``center_rows``), the number of blocks computed and warnings about
        damaged stored blocks (for the driver to log): only m x m-sized results leave the
        worker.

        With ``stored`` = (url, store spec, name, shape) the shard's rows of K(train, centers)
        go through the store: missing blocks are computed and written, then the rows are read
        back block row by block row, each block checked against its digest (a damaged one is
        recomputed here), so a resumed fit computes only what an interrupted one left out.

        With ``keep`` (a key) the rows stay resident here for ``gram_matvec`` (the iterative
        solver) and K^T K is not formed (None is returned in its place).
        """
        zs = self._cols_side(cols_key, centers, M, basis, spec)
        n = len(self.raw)
        computed, store = 0, None
        if stored is not None:
            url, store_spec, name, shape = stored
            block = store_spec.block
            blocks = [(i, j) for i in range(self.start // block, -(-(self.start + n) // block))
                      for j in range(-(-shape[1] // block))]
            computed = self.store_kernel_blocks(chain, blocks, url, store_spec, name, shape, M,
                                                basis, spec, cols_key, *centers)
            store = KernelStore(url, store_spec)

            def recompute(damaged: list[tuple[int, int]]) -> None:  # rows of this shard
                nonlocal computed
                computed += self.store_kernel_blocks(chain, damaged, url, store_spec, name,
                                                     shape, M, basis, spec, cols_key, *centers)

        Y = torch.as_tensor(np.asarray(Y), device=self.device)
        center_rows = np.asarray(center_rows, dtype=np.int64)
        KtK = KtY = None
        mine, kept = [], []
        for r0 in range(0, n, block):  # one block of rows at a time: memory set by the block
            r1 = min(r0 + block, n)
            if store is None:
                K = self._kernel(self._rows_side(chain, slice(r0, r1), M, basis, spec), zs, spec)
            else:  # the stored values, so a resumed fit sums exactly what a fresh one does
                i = (self.start + r0) // block
                K = torch.from_numpy(store.read(name, shape, recompute=recompute,
                                                block_rows=(i, i + 1))).to(self.device)
            if keep is None:
                a, c = normal_equations(K, Y[r0:r1])
            else:  # K^T Y only; the rows stay for the iterative solver's products
                a, c = None, K.T.to(torch.float64) @ Y[r0:r1].to(torch.float64)
                kept.append(K)
            KtK = a if KtK is None or a is None else KtK + a
            KtY = c if KtY is None else KtY + c
            here = center_rows[(center_rows >= r0) & (center_rows < r1)] - r0
            mine.append(K[torch.as_tensor(here, device=K.device)].cpu().numpy())
        m = zs.left.shape[0]
        if KtY is None:
            KtK = None if keep else torch.zeros(m, m, dtype=torch.float64)
            KtY = torch.zeros(m, Y.shape[1], dtype=torch.float64)
        if keep is not None:
            self._resident = (keep, torch.cat(kept) if kept
                              else torch.zeros(0, m, dtype=spec.torch_dtype))
        rows = np.concatenate(mine) if mine else np.zeros((0, m), np.float32)
        reports = [] if store is None else list(store.reports)
        return (None if KtK is None else KtK.cpu().numpy(), KtY.cpu().numpy(), rows, computed,
                reports)

    def gram_matvec(self, keep: str, V: np.ndarray, block: int, *rebuild) -> np.ndarray:
        """K_s^T (K_s V) (float64, m x c) with this shard's resident rows K_s of K(train,
        centers): one conjugate-gradient step's share. A restarted worker, which lost them,
        rebuilds them first from ``rebuild`` (``normal_equations_part``'s arguments)."""
        if getattr(self, "_resident", (None,))[0] != keep:
            self.normal_equations_part(*rebuild[:8], keep, *rebuild[8:])
        K = self._resident[1]
        V = torch.as_tensor(np.asarray(V), dtype=torch.float64, device=K.device)
        out = torch.zeros(K.shape[1], V.shape[1], dtype=torch.float64, device=K.device)
        for r in range(0, len(K), block):  # float64 products, one block of rows at a time
            Kb = K[r : r + block].to(torch.float64)
            out += Kb.T @ (Kb @ V)
        return out.cpu().numpy()

    def release(self, keep: str) -> None:
        """Drop the resident rows of a finished solve."""
        if getattr(self, "_resident", (None,))[0] == keep:
            self._resident = None

    def agop_part(self, chain: list, sample_rows: np.ndarray, coef: np.ndarray, M, basis,
                  spec: KernelSpec, cols_key: str, *train: np.ndarray) -> np.ndarray:
        """Unaveraged patch AGOP over this shard's sample images (local row indices).

        The predictor involves every center, so ``train`` (its parts) and ``coef`` arrive
        whole through the object store; the result is a small (d, d) sum to be reduced.
        """
        d = M.shape[0]
        if len(sample_rows) == 0:
            return np.zeros((d, d))
        xs = self._cols_side(cols_key, train, M, basis, spec)
        zs = self._rows_side(chain, sample_rows, M, basis, spec)
        dt = xs.left.dtype
        engine = "torch" if self.device.type == "cuda" else spec.engine
        G = agop_from_sides(xs, torch.as_tensor(coef, dtype=dt, device=self.device), zs,
                            torch.as_tensor(M, dtype=dt, device=self.device), engine=engine,
                            budget_mb=spec.memory_budget_mb, average=False)
        return G.to(torch.float64).cpu().numpy()
