"""Ray actors owning shards of the images (spec section 9).

A worker keeps its shard where it runs (on its GPU when it has one) and calls the
single-machine core (``kernel``, ``agop``, ``patches``): kernel rows of its images against
columns that reach it once through Ray's object store, the unaveraged patch AGOP over the
sample images it owns, the partial sums of the Nystrom normal equations, predictions for a
shard of test images and, for Deep ConvRFM, the featurisation of its own shard.

Every method is a pure function of its arguments and the raw shard: the filter banks applied
so far (the *chain*) arrive with each call, and what a worker caches (featurised images,
prepared kernel sides) it can rebuild from them. A restarted actor (built again from its raw
shard) therefore gives the same answer to a retried task.
"""

from __future__ import annotations

import numpy as np
import torch

from ray_convrfm.backends.store import KernelStore, StoreSpec, block_digests, fingerprint
from ray_convrfm.kernels.agop import patch_agop
from ray_convrfm.kernels.kernel import KernelParams, as_tensor, kernel_matrix, prepare_side
from ray_convrfm.kernels.patches import featurise, patch_gram
from ray_convrfm.kernels.solvers import normal_equations

#: Options every kernel call takes: dtype, engine, budget_mb, basis (see ``RayKernels``).
Opts = dict


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
            Z = torch.from_numpy(self.raw).to(self.device)
            for filters, padding in chain:
                Z = featurise(Z, torch.as_tensor(filters), padding)
            self._features = (key, Z)
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
    def _prepare(self, X: torch.Tensor | np.ndarray, M: np.ndarray, params: dict, opts: Opts):
        dt = torch.float32 if opts["dtype"] == "float32" else torch.float64
        basis = opts.get("basis")
        Q = None if basis is None else as_tensor(basis, dt, self.device)
        return prepare_side(as_tensor(X, dt, self.device), as_tensor(M, dt, self.device),
                            KernelParams(**params), Q)

    def _cached(self, key: tuple, build):
        """A prepared side kept for the next task with the same key. Only one is kept: the
        centres under the current M serve the kernel, validation and AGOP stages in turn,
        and at scale a prepared side of the centres is the largest thing a worker holds."""
        if key not in self._sides:
            self._sides.clear()
            self._sides[key] = build()
        return self._sides[key]

    def _metric_key(self, M: np.ndarray, params: dict, opts: Opts) -> str:
        basis = opts.get("basis")
        return fingerprint(M, *([] if basis is None else [basis]),
                           extra=[params, opts["dtype"]])

    def _rows_side(self, chain: list, rows, M: np.ndarray, params: dict, opts: Opts):
        """The prepared side of some of the shard's rows (a slice or indices): prepared per
        task, so a worker's memory is set by its block of rows, not by its shard."""
        Z = self._images(chain)
        if not isinstance(rows, slice):
            rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=Z.device)
        return self._prepare(Z[rows], M, params, opts)

    def _cols_side(self, cols_key: str, cols: tuple, M: np.ndarray, params: dict, opts: Opts):
        key = ("cols", cols_key, self._metric_key(M, params, opts))

        def build():
            X = cols[0] if len(cols) == 1 else np.concatenate(cols, axis=0)
            return self._prepare(X, M, params, opts)

        return self._cached(key, build)

    def _engine(self, opts: Opts) -> str:
        return "torch" if self.device.type == "cuda" else opts["engine"]

    # ------------------------------------------------------------------ kernels
    def kernel_rows(self, chain: list, r0: int, r1: int, M: np.ndarray, params: dict,
                    opts: Opts, cols_key: str, *cols: np.ndarray) -> np.ndarray:
        """K(shard rows r0..r1, cols); ``cols`` are the parts of the columns, in order, each
        resolved from the object store (never sent by the driver per task)."""
        xs = self._rows_side(chain, slice(r0, r1), M, params, opts)
        zs = self._cols_side(cols_key, cols, M, params, opts)
        return kernel_matrix(xs, zs, self._engine(opts), opts["budget_mb"]).cpu().numpy()

    def store_kernel_blocks(self, chain: list, blocks: list[tuple[int, int]], url: str,
                            spec_fields: dict, name: str, shape: tuple[int, int],
                            M: np.ndarray, params: dict, opts: Opts, cols_key: str,
                            *cols: np.ndarray) -> int:
        """Compute the given blocks (i, j) of kernel ``name`` (rows of this shard) and write
        each to the store, then mark it; blocks already marked (by an earlier attempt) are
        skipped. Returns the number of blocks computed."""
        store = KernelStore(url, StoreSpec(**spec_fields))
        b = store.spec.block
        missing = set(store.missing(name, shape))
        todo = [(i, j) for i, j in blocks if (i, j) in missing]
        if not todo:
            return 0
        zs = self._cols_side(cols_key, cols, M, params, opts)
        for i in sorted({i for i, _ in todo}):
            r0 = i * b - self.start
            xs = self._rows_side(chain, slice(r0, r0 + b), M, params, opts)
            for j in [j for k, j in todo if k == i]:
                block = kernel_matrix(xs, zs.rows(j * b, (j + 1) * b), self._engine(opts),
                                      opts["budget_mb"])
                store.write_block(name, shape, i, j, block.cpu().numpy())
        return len(todo)

    def kernel_pair(self, rows: np.ndarray, M: np.ndarray, params: dict, opts: Opts,
                    cols_key: str, *cols: np.ndarray) -> np.ndarray:
        """K(rows, cols) for images the driver holds (a slice of validation images)."""
        xs = self._prepare(rows, M, params, opts)
        zs = self._cols_side(cols_key, cols, M, params, opts)
        return kernel_matrix(xs, zs, self._engine(opts), opts["budget_mb"]).cpu().numpy()

    def scores(self, chain: list, r0: int, r1: int, alpha: np.ndarray, M: np.ndarray,
               params: dict, opts: Opts, cols_key: str, *centres: np.ndarray) -> np.ndarray:
        """Class scores K(shard rows r0..r1, centres) @ alpha (float64): predictions for a
        shard of test images; only (rows, classes) leaves the worker."""
        K = self.kernel_rows(chain, r0, r1, M, params, opts, cols_key, *centres)
        return K.astype(np.float64) @ np.asarray(alpha, dtype=np.float64)

    def normal_equations_part(self, chain: list, Y: np.ndarray, centre_rows: np.ndarray,
                              M: np.ndarray, params: dict, opts: Opts, stored: tuple | None,
                              cols_key: str, *centres: np.ndarray):
        """This shard's (K^T K, K^T Y) against the centres, the K rows of the centres it holds
        (local indices ``centre_rows``) and the number of blocks computed: only m x m-sized
        results leave the worker.

        With ``stored`` = (url, spec fields, name, shape) the shard's rows of K(train, centres)
        go through the store: missing blocks are computed and written, then the rows are read
        back, so a resumed fit computes only what an interrupted one left out.
        """
        zs = self._cols_side(cols_key, centres, M, params, opts)
        n, b = len(self.raw), int(opts.get("block", 256))
        computed, store = 0, None
        if stored is not None:
            url, spec_fields, name, shape = stored
            b = spec_fields["block"]
            blocks = [(i, j) for i in range(self.start // b, -(-(self.start + n) // b))
                      for j in range(-(-shape[1] // b))]
            computed = self.store_kernel_blocks(chain, blocks, url, spec_fields, name, shape, M,
                                                params, opts, cols_key, *centres)
            store = KernelStore(url, StoreSpec(**spec_fields)).kernel(name, shape)
        Y = torch.as_tensor(np.asarray(Y), device=self.device)
        centre_rows = np.asarray(centre_rows, dtype=np.int64)
        KtK = KtY = None
        mine = []
        for r0 in range(0, n, b):  # one block of rows at a time: memory set by the block
            r1 = min(r0 + b, n)
            if store is None:
                xs = self._rows_side(chain, slice(r0, r1), M, params, opts)
                K = kernel_matrix(xs, zs, self._engine(opts), opts["budget_mb"])
            else:  # the stored values, so a resumed fit sums exactly what a fresh one does
                K = torch.from_numpy(store[self.start + r0 : self.start + r1]).to(self.device)
            a, c = normal_equations(K, Y[r0:r1])
            KtK, KtY = (a, c) if KtK is None else (KtK + a, KtY + c)
            here = centre_rows[(centre_rows >= r0) & (centre_rows < r1)] - r0
            mine.append(K[torch.as_tensor(here, device=K.device)].cpu().numpy())
        if KtK is None:
            m = zs.left.shape[0]
            KtK = torch.zeros(m, m, dtype=torch.float64)
            KtY = torch.zeros(m, Y.shape[1], dtype=torch.float64)
        rows = np.concatenate(mine) if mine else np.zeros((0, zs.left.shape[0]), np.float32)
        return KtK.cpu().numpy(), KtY.cpu().numpy(), rows, computed

    def agop_part(self, chain: list, sample_rows: np.ndarray, coef: np.ndarray, M: np.ndarray,
                  params: dict, opts: Opts, cols_key: str, *train: np.ndarray) -> np.ndarray:
        """Unaveraged patch AGOP over this shard's sample images (local row indices).

        The predictor involves every centre, so ``train`` (its parts) and ``coef`` arrive
        whole through the object store; the result is a small (d, d) sum to be reduced.
        """
        d = M.shape[0]
        if len(sample_rows) == 0:
            return np.zeros((d, d))
        xs = self._cols_side(cols_key, train, M, params, opts)
        zs = self._rows_side(chain, sample_rows, M, params, opts)
        dt = xs.left.dtype
        G = patch_agop(xs, torch.as_tensor(coef, dtype=dt, device=self.device), zs,
                       torch.as_tensor(M, dtype=dt, device=self.device),
                       engine=self._engine(opts), budget_mb=opts["budget_mb"], average=False)
        return G.to(torch.float64).cpu().numpy()
