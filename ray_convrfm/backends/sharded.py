"""``ShardedBackend``: the one ``KernelBackend``, over shard workers in process or on Ray.

The training images live with shard workers (``workers.ShardWorker``) behind an ``Executor``;
this class holds none of them. Columns of every kernel (all training images, the Nystrom
centers, the AGOP's predictor) go from the workers that own them to the workers that need
them, and only small results come back: m x c vectors, (d, d) AGOPs, scores per ridge (and the
n x n kernel or m x m sums only for the exact and direct solvers, which are for small sizes).
With a store, kernels of the training rows go through zarr: workers write the blocks of their
rows, a rerun computes only missing blocks, and the driver reads the finished kernel back.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from ray_convrfm.backends.chunks import (
    CenterBlocks,
    FilterBank,
    chain_shape,
    columns_key,
    filter_bank,
)
from ray_convrfm.backends.nystrom import NystromSolvers
from ray_convrfm.backends.protocol import KernelSpec, LayerState
from ray_convrfm.backends.store import KernelStore, RunStore, combine_digests
from ray_convrfm.data.rows import image_rows
from ray_convrfm.kernels.patches import span_from_gram
from ray_convrfm.options import DEFAULT_BLOCK, REDUCE_FAN_IN, SolveOptions
from ray_convrfm.progress import progress_bar

#: Batch predictions: blocks per task (one read of parquet rows, one row group written; 4 x
#: 256 rows: the default row group of ``convert``) and tasks in flight per worker.
PREDICT_SPAN = 4
PREDICT_WINDOW = 3


@dataclass(frozen=True)
class Columns:
    """Kernel columns as futures of their parts, in order, and a key naming the selection and
    the layer, so that workers recognise columns they have already prepared."""

    key: str
    parts: tuple
    n: int


def _selection(idx: np.ndarray | None) -> str:
    return "all" if idx is None else hashlib.sha256(
        np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()


class ShardedBackend(NystromSolvers):
    """``KernelBackend`` over the shard workers of ``executor``.

    ``n``, ``row_shape`` and ``stored_dtype`` describe the images the executor's workers hold;
    ``align`` says whether shard boundaries fall on multiples of ``block`` (needed with a
    store: every stored block then has one owner).
    """

    def __init__(self, executor, device: torch.device, n: int, row_shape: tuple[int, ...],
                 block: int = DEFAULT_BLOCK, align: bool = True,
                 solve: SolveOptions | None = None, progress: bool = False):
        self.ex, self._device, self._n = executor, device, int(n)
        self._row_shape = tuple(int(s) for s in row_shape)
        self.block, self.align, self.progress = block, align, progress
        self.solve = solve or SolveOptions()
        self.spec: KernelSpec | None = None
        self.store: str | None = None
        self.runs: list[RunStore] = []  # each holds its store's lease until close()
        self.blocks_computed = 0
        self.chain: tuple = ()  # filter banks applied so far (Deep ConvRFM)
        self.layer: LayerState | None = None
        self.layer_ref = None
        #: held-out sets (validation, monitor): per worker, its part and the part's labels
        self.holdouts: dict[str, list[tuple]] = {}
        self._tasks: tuple[str, list] | None = None  # the Nystrom solve's tasks, by key
        #: seconds spent per stage (driver wall time): for benchmarks and the cost model
        self._timings: dict[str, float] = {}

    # ------------------------------------------------------------------ what it holds
    @property
    def n(self) -> int:
        return self._n

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self._row_shape

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The working dtype (float32 until ``configure`` names one)."""
        return torch.float32 if self.spec is None else self.spec.torch_dtype

    def timings(self) -> dict[str, float]:
        """Seconds spent per stage so far (driver wall time), and the CG steps taken."""
        return dict(self._timings)

    def _time(self, stage: str, t0: float) -> None:
        self._timings[stage] = self._timings.get(stage, 0.0) + time.perf_counter() - t0

    def _each(self, method: str, *args) -> list:
        """``method(*args)`` submitted to every worker."""
        return [self.ex.submit(k, method, *args) for k in range(len(self.ex.bounds))]

    def _local(self, idx: np.ndarray | None) -> list:
        """Per shard, the local rows of sorted global indices ``idx`` (None: all rows)."""
        if idx is None:
            return [np.arange(b - a) for a, b in self.ex.bounds]
        idx = np.asarray(idx)
        if np.any(np.diff(idx) < 0):
            raise ValueError("row indices must be sorted")
        return [idx[(idx >= a) & (idx < b)] - a for a, b in self.ex.bounds]

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    # ------------------------------------------------------------------ the layer
    def configure(self, spec: KernelSpec, store: str | None) -> None:
        self.spec, self.store = spec, store
        if store:
            self.run = RunStore.open(store, self.fingerprint(spec.dtype), spec, self.block)
            self.runs.append(self.run)

    def fingerprint(self, dtype: str) -> str:
        """Fingerprint of the images as the current layer sees them in working ``dtype``,
        equal to ``store.rows_fingerprint`` of those values."""
        if not self.align:
            raise ValueError("fingerprints need block-aligned shards (align=True)")
        digests = self.ex.get(self._each("digests", self.chain, self.block, dtype))
        return combine_digests([d for part in digests for d in part], self.row_shape,
                               np.dtype(dtype).str)

    def patch_span(self, energy: float | None = None) -> torch.Tensor | None:
        p = self.spec.params
        gram = self.reduce(self._each("patch_gram", self.chain, p.patch_size, p.padding,
                                      self.spec.dtype, self.spec.memory_budget_mb))
        return span_from_gram(torch.from_numpy(gram), dtype=self.spec.torch_dtype,
                              energy=energy)

    def channel_mean_squares(self, bank: FilterBank) -> np.ndarray:
        """Mean square of every channel of the training images after the chain and then
        ``bank``, over images and positions (Deep ConvRFM's normalisation between layers)."""
        total = self.reduce(self._each("channel_moments", (*self.chain, bank), self.spec.dtype,
                                       self.spec.memory_budget_mb))
        return total[:-1] / max(total[-1], 1.0)

    def set_metric(self, M: torch.Tensor, basis: torch.Tensor | None) -> None:
        self.layer = LayerState(uuid.uuid4().hex, self.spec, M.detach().cpu().numpy(),
                                None if basis is None else basis.detach().cpu().numpy(),
                                self.chain)
        self.layer_ref = self.ex.put(self.layer)

    def featurise(self, bank: FilterBank) -> None:
        """Deep ConvRFM's next inputs: the images through ``bank`` (convolved, activated,
        pooled). Nothing is computed now: every task gets the chain of filter banks and
        featurises the chunk of stored pixels it works on, so no featurised shard ever
        exists."""
        self.chain = (*self.chain, bank)
        self._row_shape = chain_shape(self._row_shape, self.chain[-1:])
        self.layer = self.layer_ref = None

    # ------------------------------------------------------------------ reductions
    def reduce(self, futures: list):
        """Sum of partial results (a tree of sums on the workers when there are many)."""
        parts = self.ex.get(self.ex.tree(futures, keep=REDUCE_FAN_IN))
        return sum(parts[1:], parts[0])

    # ------------------------------------------------------------------ kernels
    def parts(self) -> Columns:
        """Every training image as kernel columns: futures of the shards' stored pixels."""
        return Columns(columns_key(self.layer.key),
                       tuple(self._each("pixels", None)), self.n)

    def _row_tasks(self):
        """(worker, local r0, r1) for every block of rows, shard by shard."""
        for k, (a, b) in enumerate(self.ex.bounds):
            for r in range(a, b, self.block):
                yield k, r - a, min(r + self.block, b) - a

    def train_kernel(self, desc: str = "train kernel") -> torch.Tensor:
        cols = self.parts()
        if self.store:
            url, store_spec = self.run.kernel(self.run.rows_fingerprint, self.layer.M,
                                              self.layer.basis)
            K, computed = self.kernel_via_store(cols, url, store_spec, "K", desc)
            self.blocks_computed += computed
            return self._tensor(K)
        tasks = list(self._row_tasks())
        rows = self.ex.get([self.ex.submit(k, "train_rows", self.layer_ref, r0, r1, cols.key,
                                           *cols.parts) for k, r0, r1 in tasks], desc)
        K = np.empty((self.n, self.n), dtype=self.spec.dtype)
        for (k, r0, _), block in zip(tasks, rows, strict=True):
            g0 = self.ex.bounds[k][0] + r0
            K[g0 : g0 + len(block), g0:] = block
        lower = np.tril_indices(self.n, -1)
        K[lower] = K.T[lower]  # the upper triangle, mirrored
        return self._tensor(K)

    def kernel_via_store(self, cols: Columns, url: str, store_spec, name: str,
                         desc: str = "kernel") -> tuple[np.ndarray, int]:
        """K(all shards, cols) through a zarr store: workers write the missing blocks.

        Returns the kernel, read back from the store (each block checked against its digest),
        and how many blocks were computed now, damaged ones recomputed included (0 when a
        previous run already stored them all intact).
        """
        if not self.align:
            raise ValueError("a stored kernel needs block-aligned shards (align=True)")
        shape = (self.n, cols.n)
        store = KernelStore(url, store_spec)
        missing = store.missing(name, shape)  # creates the arrays before workers write

        def compute(blocks: list[tuple[int, int]]) -> int:
            """The workers owning ``blocks``' rows write those not marked; how many."""
            futures = []
            for k, (a, b) in enumerate(self.ex.bounds):
                for i in range(a // self.block, -(-b // self.block)):
                    row = [(bi, bj) for bi, bj in blocks if bi == i]
                    if row:
                        futures.append(self.ex.submit(
                            k, "store_kernel_blocks", self.layer_ref, row, url, store_spec,
                            name, shape, cols.key, *cols.parts))
            return int(sum(self.ex.get(futures, desc)))

        computed = [compute(missing)]
        # every block is checked against its digest as it is read; damaged ones are recomputed
        K = store.read(name, shape, recompute=lambda blocks: computed.append(compute(blocks)))
        return K, sum(computed)

    def center_blocks(self, idx: np.ndarray | None = None) -> CenterBlocks:
        """The rows ``idx`` (None: all) as blocks of at most ``block`` stored images, each made
        by and left on the worker that owns it: kernels against them fetch one block at a
        time where they are computed, and pass them through the layer's chain there."""
        parts, sizes = [], []
        for k, rows in enumerate(self._local(idx)):
            for a in range(0, len(rows), self.block):
                parts.append(self.ex.submit(k, "pixels", rows[a : a + self.block]))
                sizes.append(len(rows[a : a + self.block]))
        return CenterBlocks(f"centers:{_selection(idx)}:{self.block}", tuple(parts),
                            tuple(sizes), every_row=idx is None)

    def centers(self, center_idx: np.ndarray | None) -> torch.Tensor:
        """The predictor's centers as the current layer sees them, in this process (8-bit
        pixels as stored; featurised images, by the workers that own them, working dtype)."""
        futures = [self.ex.submit(k, "images", self.chain, rows, self.spec.dtype)
                   for k, rows in enumerate(self._local(center_idx)) if len(rows)]
        parts = self.ex.get(futures)
        if not parts:
            return torch.zeros((0, *self.row_shape), dtype=self.dtype, device=self.device)
        return self._tensor(np.concatenate(parts, axis=0))

    # ------------------------------------------------------------------ held-out sets
    def holdout(self, name: str, X, y: np.ndarray) -> None:
        """Spread a held-out set (validation, monitor) over the workers: images put once per
        worker (or parquet rows each worker reads when first asked), labels beside them;
        ``evaluate`` returns only numbers."""
        X, y, key = image_rows(X), np.asarray(y), uuid.uuid4().hex
        edges = np.linspace(0, len(y), len(self.ex.bounds) + 1).astype(int)
        self.holdouts[name] = [(key, self.ex.put(X.slice(a, b)), self.ex.put(y[a:b]))
                               for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def evaluate(self, name: str, coefs: list[torch.Tensor],
                 center_idx: np.ndarray | None) -> np.ndarray:
        stacked = np.stack([c.detach().cpu().numpy() for c in coefs]).astype(np.float64)
        coefs_ref, centers = self.ex.put(stacked), self.center_blocks(center_idx)
        futures = [self.ex.submit(k, "evaluate", name, key, images, labels, coefs_ref,
                                  self.layer_ref, centers, self.block)
                   for k, (key, images, labels) in enumerate(self.holdouts[name])]
        t0 = time.perf_counter()
        out = sum(self.ex.get(futures, f"{name} scores"))
        self._time(f"evaluate_{name}", t0)
        return out

    def agop(self, coef: torch.Tensor, sample_idx: np.ndarray,
             center_idx: np.ndarray | None) -> torch.Tensor:
        """Patch AGOP averaged over sorted ``sample_idx`` (global rows): per-shard sums of the
        predictor f = coef^T K(centers, .), reduced here."""
        coef_ref, centers = self.ex.put(coef.detach().cpu().numpy()), \
            self.center_blocks(center_idx)
        futures = [self.ex.submit(k, "agop_part", self.layer_ref, rows, coef_ref, centers)
                   for k, rows in enumerate(self._local(sample_idx)) if len(rows)]
        t0 = time.perf_counter()
        self.ex.get(futures, "AGOP", unit="pair")
        self._time("agop", t0)
        return self._tensor(self.reduce(futures) / len(sample_idx)).to(coef.dtype)

    def scores(self, Z, coef: torch.Tensor, center_idx: np.ndarray | None,
               chain: list) -> np.ndarray:
        """K(chain(Z), centers) @ coef for images the driver sends, in blocks over the workers:
        each block is featurised and scored where it lands; only scores return."""
        Z = Z.detach().cpu().numpy() if isinstance(Z, torch.Tensor) else np.asarray(Z)
        if Z.dtype != np.uint8:  # 8-bit pixels travel as they are; workers convert them
            Z = Z.astype(self.spec.dtype, copy=False)
        alpha = coef.detach().cpu().numpy()
        alpha_ref, chain_ref = self.ex.put(alpha), self._chain_ref(chain)
        centers, workers = self.center_blocks(center_idx), len(self.ex.bounds)
        futures = [self.ex.submit(k % workers, "scores", Z[r : r + self.block], chain_ref,
                                  alpha_ref, self.layer_ref, centers)
                   for k, r in enumerate(range(0, len(Z), self.block))]
        t0 = time.perf_counter()
        parts = self.ex.get(futures, "predict")
        self._time("scores", t0)
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, alpha.shape[1]))

    def _chain_ref(self, chain: list):
        """The filter banks ``chain`` as arrays, put once for every task."""
        return self.ex.put(tuple(map(filter_bank, chain)))

    def write_predictions(self, X, labels: np.ndarray | None, coef: torch.Tensor,
                          center_idx: np.ndarray | None, chain: list,
                          target) -> tuple[list[dict], int, int]:
        """Batch predictions of images ``X`` written where the workers are (``data.
        predictions``): worker k takes the k-th contiguous share of the rows, loads them a span
        of ``PREDICT_SPAN`` blocks at a time (``ImageRows``: parquet rows it reads itself, or
        an array's rows sent with the task), scores them and appends them to its own part
        file. At most ``PREDICT_WINDOW`` spans per worker are in flight and only counts come
        back, so the driver's memory does not grow with the images. Returns the parts' marker
        entries, the rows written and the correct predictions (-1 without labels)."""
        X = image_rows(X)
        n, workers = len(X), len(self.ex.bounds)
        edges = np.linspace(0, n, workers + 1).astype(int)
        span = self.block * PREDICT_SPAN
        shards = [[(k, r, min(r + span, int(b))) for r in range(int(a), int(b), span)]
                  for k, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True))]
        opened = [k for k, spans in enumerate(shards) if spans]
        # round robin over the workers, so that the window keeps every one of them busy
        tasks = [t for level in itertools.zip_longest(*shards) for t in level if t]
        alpha_ref, chain_ref = self.ex.put(coef.detach().cpu().numpy()), self._chain_ref(chain)
        centers, t0 = self.center_blocks(center_idx), time.perf_counter()
        rows, correct, pending = 0, 0, collections.deque()
        try:
            self.ex.get([self.ex.submit(k, "batch_open", target, k) for k in opened])
            with progress_bar(n, "predict", self.progress, unit="image") as bar:
                for i, (k, r0, r1) in enumerate(tasks):
                    pending.append(self.ex.submit(
                        k, "batch_block", target.run, r0, X.slice(r0, r1),
                        None if labels is None else labels[r0:r1], self.block, chain_ref,
                        alpha_ref, self.layer_ref, centers))
                    while pending and (len(pending) >= PREDICT_WINDOW * workers
                                       or i == len(tasks) - 1):
                        done, right = self.ex.get([pending.popleft()])[0]
                        rows, correct = rows + done, correct + right
                        bar.update(done)
            parts = self.ex.get([self.ex.submit(k, "batch_close", target.run) for k in opened])
        except BaseException:
            for k in opened:  # drop the unfinished parts where the workers still can
                try:
                    self.ex.get([self.ex.submit(k, "batch_abort", target.run)])
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
            raise
        self._time("write_predictions", t0)
        return parts, rows, correct if target.labelled else -1

    # ------------------------------------------------------------------ lifecycle
    def report(self) -> dict:
        out = {"worker_peak_rss_mb": self.ex.get(self._each("peak_rss_mb")),
               "worker_nodes": self.ex.get(self._each("node")),
               "seconds_reading_rows": float(sum(self.ex.get(self._each("read_seconds"))))}
        if self.store:
            out["stored_blocks_computed"] = self.blocks_computed
        self.blocks_computed = 0
        return out

    def release_stores(self) -> None:
        """Give the stores' leases back (once no worker writes)."""
        while self.runs:
            self.runs.pop().close()

    def keep_for_predictions(self, centers: torch.Tensor) -> ShardedBackend:
        """After a fit: the same workers, now holding only the model's ``centers`` (as the
        last layer sees them), for the model's predictions; the stores are released."""
        self.release_stores()
        X = centers.detach().cpu().numpy()
        self.ex.reload(X)
        self._n, self._row_shape, self.chain = len(X), tuple(X.shape[1:]), ()
        self.store, self.holdouts, self._tasks, self.layer = None, {}, None, None
        return self

    def close(self) -> None:
        try:
            self.ex.close()
        finally:
            self.release_stores()
