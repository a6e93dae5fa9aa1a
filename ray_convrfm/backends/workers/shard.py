"""A shard worker's core: its images, how they become kernel sides, kernel rows and the AGOP.

A worker keeps its shard where it runs (on its GPU when it has one), in the data's own dtype
(8-bit pixels stay ``uint8``), and calls the single-machine core (``kernels``). Images become
working values a chunk at a time (``_features``): converted from the stored pixels on the device
that uses them, then, for Deep ConvRFM, through the layer's chain of filter banks. Chunks are
sized so that a prepared chunk fits ``PREPARED_SHARE`` of the memory budget
(``chunks.prepared_chunk``), so a worker's memory is set by its budget and its raw shard, never
by a featurised shard or the width of a layer.

Every method is a pure function of its arguments and the raw shard: the ``LayerState`` arrives
with each call, and what a worker caches (prepared sides, under the state's key) it can rebuild
from them. A restarted actor (built again from its raw shard) gives the same answer to a retried
task, and the in-process executor runs this same class.
"""

from __future__ import annotations

import numpy as np
import torch

from ray_convrfm.backends.chunks import (
    CenterBlocks,
    apply_chain,
    chain_shape,
    columns_key,
    gram_chunk,
    prepared_chunk,
    resolve,
    side_bytes,
    torch_dtype,
)
from ray_convrfm.backends.protocol import LayerState
from ray_convrfm.backends.store import KernelStore, StoreSpec, block_digests
from ray_convrfm.kernels.agop import Workspace, agop_from_blocks
from ray_convrfm.kernels.kernel import as_tensor, as_working, kernel_matrix, prepare_side
from ray_convrfm.kernels.patches import patch_gram
from ray_convrfm.kernels.threads import configure_threads, pool_sizes
from ray_convrfm.options import CENTER_CACHE_SHARE


class ShardCore:
    """Holds rows ``start..start + len(images)`` of the images."""

    def __init__(self, images, start: int, threads: int | None = None, gpus: float = 0):
        if threads:  # a Ray worker: as many as the CPUs reserved for it (in process: as set)
            configure_threads(threads)
        gpu = gpus and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")
        self.load(images, start)
        #: progress(done, total) over rows of long stages; set by the in-process executor
        self.progress = None

    def load(self, images, start: int = 0) -> int:
        """Hold ``images`` (an array, or parquet rows read here) as rows start.. of a new set,
        forgetting everything prepared from the previous one; returns how many rows."""
        self.raw = np.ascontiguousarray(resolve(images))  # stored pixels, in their own dtype
        self.start = start
        self._sides: dict[tuple, object] = {}
        self._center_cache: tuple[tuple, dict] = ((), {})
        self._resident = None  # ResidentRows of a Nystrom solve (workers.nystrom)
        self._factor: tuple | None = None  # (key, factor, {ridges: preconditioner})
        self._holdouts: dict[str, tuple[str, np.ndarray]] = {}  # name: (key, images)
        self._read_seconds = 0.0  # reading spilled rows back, since read_seconds() last asked
        return len(self.raw)

    # ------------------------------------------------------------------ the shard
    def threads(self) -> dict[str, int]:
        """This worker's thread pools (``kernels.threads.pool_sizes``)."""
        return pool_sizes()

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
        """The id of the Ray node this worker runs on ("local" in process)."""
        try:
            import ray

            return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        except ImportError:
            return "local"

    def _tick(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)

    def _layer_input(self, X, chain, dtype: torch.dtype) -> torch.Tensor:
        """Stored images X as the current layer sees them: converted on this device
        (``as_working``), then through ``chain``."""
        return apply_chain(as_working(X, dtype, self.device), chain)

    def _features(self, chain, rows, dtype: torch.dtype) -> torch.Tensor:
        """Rows of the shard (a slice or local indices) as the current layer sees them. Made
        per chunk when needed, never for the whole shard."""
        if not isinstance(rows, slice):
            rows = np.asarray(rows, dtype=np.int64)
        return self._layer_input(self.raw[rows], chain, dtype)

    @staticmethod
    def _chunks(n: int, step: int):
        for a in range(0, n, max(1, step)):
            yield a, min(n, a + max(1, step))

    def pixels(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The shard's stored pixels (its local ``rows``): blocks of kernel columns and of
        centers travel as stored and are converted and featurised where they are used."""
        return self.raw if rows is None else self.raw[np.asarray(rows, dtype=np.int64)]

    def images(self, chain, rows: np.ndarray, dtype: str, chunk: int = 256) -> np.ndarray:
        """Local ``rows`` as the current layer sees them: the model's centers at the end of a
        fit. Without a chain, as stored (8-bit pixels stay uint8, a quarter of the bytes);
        else featurised a chunk at a time, in working ``dtype``."""
        rows = np.asarray(rows, dtype=np.int64)
        if not chain and self.raw.dtype == np.uint8:
            return self.raw[rows]
        dt = torch_dtype(dtype)
        parts = [self._features(chain, rows[a:b], dt).cpu().numpy()
                 for a, b in self._chunks(len(rows), chunk)]
        return np.concatenate(parts) if parts else np.zeros(
            (0, *chain_shape(self.raw.shape[1:], chain)), dtype=dtype)

    def digests(self, chain, block: int, dtype: str) -> list[str]:
        """Per-block SHA-256 of the shard as the layer sees it (working ``dtype``: uint8 and
        float32 shards of the same pixels agree); the driver combines them in order."""
        dt = torch_dtype(dtype)
        return [block_digests(self._features(chain, slice(a, b), dt).cpu().numpy(), block)[0]
                for a, b in self._chunks(len(self.raw), block)]

    def patch_gram(self, chain, patch_size: int, padding: bool, dtype: str,
                   budget_mb: float) -> np.ndarray:
        """Sum of p p^T over the shard's patches (the driver sums and finds their span),
        featurised and unfolded a chunk at a time (``chunks.gram_chunk`` of the budget)."""
        dt = torch_dtype(dtype)
        shape = chain_shape(self.raw.shape[1:], chain)
        step = gram_chunk(shape, patch_size, padding, torch.empty(0, dtype=dt).element_size(),
                          budget_mb)
        total = None
        for a, b in self._chunks(len(self.raw), step):
            g = patch_gram(self._features(chain, slice(a, b), dt), patch_size, padding)
            total = g if total is None else total.add_(g)
        if total is None:
            return np.zeros((shape[0] * patch_size**2,) * 2)
        return total.cpu().numpy()

    def channel_moments(self, chain, dtype: str, budget_mb: float) -> np.ndarray:
        """(C + 1,): the sum of squares of every channel of the shard's images after
        ``chain``, over images and positions, then the positions summed over (the driver
        sums shards' and divides), featurised a chunk at a time."""
        dt = torch_dtype(dtype)
        shape = chain_shape(self.raw.shape[1:], chain)
        step = gram_chunk(shape, 1, False, torch.empty(0, dtype=dt).element_size(), budget_mb)
        total = np.zeros(shape[0] + 1)
        for a, b in self._chunks(len(self.raw), step):
            Z = self._features(chain, slice(a, b), dt).to(torch.float64)
            total[:-1] += Z.square().sum((0, 2, 3)).cpu().numpy()
            total[-1] += Z.shape[0] * Z.shape[2] * Z.shape[3]
        return total

    def add(self, *parts: np.ndarray) -> np.ndarray:
        """Sum of partial results: one node of the driver's reduction tree."""
        return sum(parts[1:], parts[0])

    # ------------------------------------------------------------------ kernel sides
    def _prepare(self, X: torch.Tensor, layer: LayerState):
        dt = layer.spec.torch_dtype
        Q = None if layer.basis is None else as_tensor(layer.basis, dt, self.device)
        return prepare_side(as_tensor(X, dt, self.device), as_tensor(layer.M, dt, self.device),
                            layer.spec.params, Q)

    def _rows_side(self, layer: LayerState, rows):
        """The prepared side of some of the shard's rows (a slice or indices): prepared per
        task, so a worker's memory is set by its block of rows, not by its shard."""
        return self._prepare(self._features(layer.chain, rows, layer.spec.torch_dtype), layer)

    def _rows_sides(self, layer: LayerState, rows):
        """(a, b, prepared side) of rows[a:b] for chunks of ``rows`` (a slice or local
        indices) sized by ``prepared_chunk``: one chunk is prepared at a time."""
        idx = np.arange(len(self.raw))[rows] if isinstance(rows, slice) else np.asarray(rows)
        step = prepared_chunk(chain_shape(self.raw.shape[1:], layer.chain), layer.spec,
                              layer.basis)
        for a, b in self._chunks(len(idx), step):
            yield a, b, self._rows_side(layer, idx[a:b])

    def _cols_side(self, layer: LayerState, cols_key: str, cols: tuple):
        """The prepared side of kernel columns (their parts, in order), kept for the next task
        with the same columns and layer. Only one is kept: at scale a prepared side of the
        columns is the largest thing a worker holds."""
        key = self._cols_key(cols_key, layer)
        if key not in self._sides:
            self._sides.clear()
            parts = [resolve(c) for c in cols]
            X = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            self._sides[key] = self._prepare(
                self._layer_input(X, layer.chain, layer.spec.torch_dtype), layer)
        return self._sides[key]

    @staticmethod
    def _cols_key(cols_key: str, layer: LayerState) -> tuple:
        """Where ``_cols_side`` keeps the prepared columns ``cols_key`` of ``layer``."""
        return ("cols", cols_key, layer.key)

    def _row_block(self, layer: LayerState, r0: int, r1: int, cols_key: str, zs):
        """The prepared side of shard rows r0..r1 for a kernel against columns ``zs``: a
        slice of them when the columns are every training image (they hold these rows,
        prepared already: a featurised row costs half its kernel entries against 1,600
        columns to make again), else prepared now."""
        if cols_key == columns_key(layer.key):
            return zs.rows(self.start + r0, self.start + r1)
        return self._rows_side(layer, slice(r0, r1))

    def _kernel(self, xs, zs, layer: LayerState, symmetric: bool = False) -> torch.Tensor:
        return kernel_matrix(xs, zs, layer.spec.engine_on(self.device),
                             layer.spec.memory_budget_mb, symmetric=symmetric)

    # ------------------------------------------------------------------ kernels
    def kernel_rows(self, layer: LayerState, r0: int, r1: int, cols_key: str,
                    *cols) -> np.ndarray:
        """K(shard rows r0..r1, cols); ``cols`` are the parts of the columns, in order, each
        resolved from the object store (never sent by the driver per task)."""
        zs = self._cols_side(layer, cols_key, cols)
        return self._kernel(self._row_block(layer, r0, r1, cols_key, zs), zs,
                            layer).cpu().numpy()

    def train_rows(self, layer: LayerState, r0: int, r1: int, cols_key: str,
                   *cols) -> np.ndarray:
        """K(shard rows r0..r1, training columns from global row start + r0 on): the upper
        triangle of the symmetric training kernel, the diagonal block computed once per pair
        (the driver mirrors the rest), so K(train, train) costs half of its entries."""
        zs = self._cols_side(layer, cols_key, cols)
        xs = self._row_block(layer, r0, r1, cols_key, zs)
        g0, g1 = self.start + r0, self.start + r1
        out = torch.empty(r1 - r0, len(zs) - g0, dtype=layer.spec.torch_dtype)
        out[:, : g1 - g0] = self._kernel(xs, xs, layer, symmetric=True).cpu()
        if g1 < len(zs):
            out[:, g1 - g0 :] = self._kernel(xs, zs.rows(g1, len(zs)), layer).cpu()
        return out.numpy()

    def store_kernel_blocks(self, layer: LayerState, blocks: list[tuple[int, int]], url: str,
                            store_spec: StoreSpec, name: str, shape: tuple[int, int],
                            cols_key: str, *cols) -> int:
        """Compute the given blocks (i, j) of kernel ``name`` (rows of this shard) and write
        each to the store, then mark it; blocks already marked (by an earlier attempt) are
        skipped. Returns the number of blocks computed."""
        zs = self._cols_side(layer, cols_key, cols)
        return KernelStore(url, store_spec).fill(
            name, shape, blocks,
            lambda r0, r1: self._row_block(layer, r0 - self.start, r1 - self.start, cols_key,
                                           zs),
            zs, lambda xs, zs: self._kernel(xs, zs, layer))

    # ------------------------------------------------------------------ centers in blocks
    def _center_sides(self, layer: LayerState, centers: CenterBlocks):
        """(c0, c1, prepared side) of every block of centers in turn, each fetched when it is
        needed. Prepared blocks are kept for the next pass while they fit a sixteenth of the
        memory budget (``CENTER_CACHE_SHARE``); the others are fetched (from this node's
        object store after the first time) and prepared again, so a worker's memory stays set
        by its rows and its budget, not by m. When the centers are every training image and
        this worker holds the layer's prepared columns (the exact solver's training kernel
        made them), blocks are slices of those: preparing a featurised center (its filter
        bank, pooling and basis projection) cost 2.6 x its kernel entries against a block of
        250 held-out rows (a pooled 64-channel layer)."""
        held = self._sides.get(self._cols_key(columns_key(layer.key), layer))
        if centers.every_row and held is not None and len(held) == centers.m:
            for c0, c1 in centers.bounds():
                yield c0, c1, held.rows(c0, c1)
            return
        key = (centers.key, layer.key)
        if self._center_cache[0] != key:
            self._center_cache = (key, {})
        cache = self._center_cache[1]
        budget = layer.spec.memory_budget_mb * 2**20 * CENTER_CACHE_SHARE
        dt = layer.spec.torch_dtype
        for j, (c0, _) in enumerate(centers.bounds()):
            sides = cache.get(j)
            if sides is not None:
                for a, b, side in sides:
                    yield c0 + a, c0 + b, side
                continue
            X = resolve(centers.parts[j])
            step = prepared_chunk(chain_shape(X.shape[1:], layer.chain), layer.spec,
                                  layer.basis)
            kept: list | None = []
            used = sum(side_bytes(s) for block in cache.values() for *_, s in block)
            for a, b in self._chunks(len(X), step):
                side = self._prepare(self._layer_input(X[a:b], layer.chain, dt), layer)
                if kept is not None and used + side_bytes(side) <= budget:
                    kept.append((a, b, side))
                    used += side_bytes(side)
                else:
                    kept = None  # a block is cached whole or not at all
                yield c0 + a, c0 + b, side
            if kept is not None:
                cache[j] = kept

    def _against_centers(self, xs, layer: LayerState, centers: CenterBlocks,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """K(prepared rows xs, every center), (rows, m), filled one chunk of centers at a time
        (into ``out`` when given)."""
        if out is None:
            out = torch.empty(len(xs), centers.m, dtype=layer.spec.torch_dtype,
                              device=self.device)
        for c0, c1, zs in self._center_sides(layer, centers):
            out[:, c0:c1] = self._kernel(xs, zs, layer)
        return out

    # ------------------------------------------------------------------ the AGOP
    def agop_part(self, layer: LayerState, sample_rows: np.ndarray, coef: np.ndarray,
                  centers: CenterBlocks) -> np.ndarray:
        """Unaveraged patch AGOP over this shard's sample images (local row indices).

        The predictor involves every center: its blocks are fetched (or taken from the cache)
        one at a time with their rows of ``coef``; the result is a small (d, d) sum.
        """
        d = layer.M.shape[0]
        if len(sample_rows) == 0:
            return np.zeros((d, d))
        dt = layer.spec.torch_dtype
        coef = torch.as_tensor(np.asarray(resolve(coef)), dtype=dt, device=self.device)
        Mt = torch.as_tensor(layer.M, dtype=dt, device=self.device)
        engine = layer.spec.engine_on(self.device)

        def blocks():
            for c0, c1, xs in self._center_sides(layer, centers):
                yield xs, coef[c0:c1]

        G, workspace = torch.zeros(d, d, dtype=torch.float64), Workspace()
        # the AGOP is a sum over sample images: one prepared chunk of them at a time
        for a, b, zs in self._rows_sides(layer, sample_rows):
            G += agop_from_blocks(blocks, zs, Mt, coef.shape[1], engine=engine,
                                  budget_mb=layer.spec.memory_budget_mb, average=False,
                                  workspace=workspace).to(torch.float64).cpu()
            self._tick((b - a) * centers.m, len(sample_rows) * centers.m)
        return G.numpy()
