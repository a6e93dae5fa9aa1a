"""Ray actors owning shards of the images (docs/math.md section 9).

A worker keeps its shard where it runs (on its GPU when it has one), in the data's own dtype
(8-bit pixels stay ``uint8``), and calls the single-machine core (``kernels``): kernel rows of
its images against columns that reach it once through Ray's object store, the unaveraged patch
AGOP over the sample images it owns, the partial sums of the Nystrom normal equations and
class scores for blocks of held-out or test images.

Images become working values a chunk at a time (``_features``): converted from the stored
pixels on the device that uses them, then, for Deep ConvRFM, through the filter banks applied
so far (the *chain*). Chunks are sized so that a prepared chunk fits ``PREPARED_SHARE`` of
the memory budget (``chunks.prepared_chunk``), so a worker's memory is set by its budget and
its raw shard, never by a featurised shard or the width of a layer.

Every method is a pure function of its arguments and the raw shard: the chain arrives with each
call, and what a worker caches (prepared kernel sides) it can rebuild from them. A restarted
actor (built again from its raw shard) therefore gives the same answer to a retried task.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from ray_convrfm.backends.chunks import (
    CenterBlocks,
    apply_chain,
    chain_shape,
    gram_chunk,
    prepared_chunk,
    resolve,
    side_bytes,
    torch_dtype,
)
from ray_convrfm.backends.protocol import KernelSpec
from ray_convrfm.backends.store import KernelStore, StoreSpec, block_digests, fingerprint
from ray_convrfm.kernels.agop import Workspace, agop_from_blocks
from ray_convrfm.kernels.kernel import as_tensor, as_working, kernel_matrix, prepare_side
from ray_convrfm.kernels.patches import patch_gram
from ray_convrfm.kernels.pcg import factor_centers
from ray_convrfm.kernels.solvers import class_sums
from ray_convrfm.kernels.threads import configure_threads, pool_sizes

#: Rows of K(train, centers) converted to float64 at a time in a CG product (64 x m x 8 bytes:
#: small enough that both products read them from cache; 20 % faster than whole slabs).
MATVEC_ROWS = 64

#: Share of ``memory_budget_mb`` that prepared blocks of centers may keep between passes (32 MiB
#: of the default 512): every center of a small problem, a few blocks of a large one, whose
#: other blocks are prepared again for each slab of rows (about d / b of the slab's kernel).
CENTER_CACHE_SHARE = 1 / 16

@dataclass(frozen=True)
class NystromTask:
    """One shard's share of the Nystrom problem: everything a worker needs to (re)compute its
    rows of K(train, centers), sent with every conjugate-gradient step so that a restarted
    worker rebuilds them (refs inside are fetched only then)."""

    key: str | None  # rows kept for CG steps under this key; None: the direct solver's sums
    chain: list
    labels: object  # (rows of the shard,) class indices: an object ref or an array
    classes: int  # c: one-hot targets are made per slab from the labels
    center_rows: np.ndarray  # local rows of this shard that are centers
    center_offset: int  # position of its first center among all m
    M: np.ndarray
    basis: np.ndarray | None
    spec: KernelSpec
    block: int  # rows per slab (the store's block when stored)
    centers: CenterBlocks
    stored: tuple | None = None  # (url, StoreSpec, name, shape) of K(train, centers)
    resident_bytes: int | None = None  # resident rows' budget; beyond, slabs live in zarr
    preconditioner_cols: np.ndarray | None = None  # q center positions (rank-q) or None


@dataclass
class ResidentRows:
    """A worker's rows of K(train, centers) between CG steps: slabs in memory, or (beyond the
    budget) marked slabs of a zarr store read back at every step."""

    task: NystromTask
    slabs: list = field(default_factory=list)  # (r0, r1, values or None, slab index)
    store: KernelStore | None = None
    name: str = "K"
    shape: tuple[int, int] = (0, 0)
    spill_dir: str | None = None  # a temporary store on this worker's disk

    def close(self) -> None:
        if self.spill_dir:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None


def ridge_columns(ridges: list[float], columns: int, like: torch.Tensor) -> torch.Tensor:
    """(columns,) the ridge of every column of an (m, R c) block of R ridges' columns."""
    per = columns // max(len(ridges), 1)
    return torch.tensor([r for r in ridges for _ in range(per)], dtype=like.dtype,
                        device=like.device)


class ShardWorker:
    """Holds rows ``start..start + len(images)`` of the images; made by ``ray.remote``."""

    def __init__(self, images: np.ndarray, start: int, threads: int | None = None,
                 gpus: float = 0):
        if threads:  # a Ray worker: as many as the CPUs reserved for it (in process: as set)
            configure_threads(threads)
        gpu = gpus and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")
        if hasattr(images, "load"):  # a description of parquet rows: read them here
            images = images.load()
        self.raw = np.ascontiguousarray(images)  # the stored pixels, in the data's own dtype
        self.start = start
        self._sides: dict[tuple, object] = {}
        self._center_cache: tuple[tuple, dict] = ((), {})
        self._resident: ResidentRows | None = None
        self._factor: tuple | None = None  # (key, factor, {ridge: preconditioner})
        self._holdouts: dict[str, np.ndarray] = {}
        #: progress(done, total) over rows of long stages; set in process (LocalBackend)
        self.progress = None
        self._read_seconds = 0.0  # reading spilled rows back, since read_seconds() last asked

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
        """The id of the Ray node this worker runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def _layer_input(self, X, chain: list, dtype: torch.dtype) -> torch.Tensor:
        """Stored images X as the current layer sees them: converted on this device
        (``as_working``), then through ``chain``."""
        return apply_chain(as_working(X, dtype, self.device), chain)

    def _features(self, chain: list, rows, dtype: torch.dtype) -> torch.Tensor:
        """Rows of the shard (a slice or local indices) as the current layer sees them. Made
        per chunk when needed, never for the whole shard."""
        if not isinstance(rows, slice):
            rows = np.asarray(rows, dtype=np.int64)
        return self._layer_input(self.raw[rows], chain, dtype)

    def _chunks(self, n: int, step: int):
        for a in range(0, n, max(1, step)):
            yield a, min(n, a + max(1, step))

    def pixels(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The shard's stored pixels (its local ``rows``): blocks of kernel columns and of
        centers travel as stored and are converted and featurised where they are used."""
        return self.raw if rows is None else self.raw[np.asarray(rows, dtype=np.int64)]

    def images(self, chain: list, rows: np.ndarray, dtype: str,
               chunk: int = 256) -> np.ndarray:
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

    def digests(self, chain: list, block: int, dtype: str) -> list[str]:
        """Per-block SHA-256 of the shard as the layer sees it (working ``dtype``: uint8 and
        float32 shards of the same pixels agree); the driver combines them in order."""
        dt = torch_dtype(dtype)
        return [block_digests(self._features(chain, slice(a, b), dt).cpu().numpy(), block)[0]
                for a, b in self._chunks(len(self.raw), block)]

    def patch_gram(self, chain: list, patch_size: int, padding: bool, dtype: str,
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
        return self._prepare(self._features(chain, rows, spec.torch_dtype), M, basis, spec)

    def _rows_sides(self, chain: list, rows, M, basis, spec: KernelSpec):
        """(a, b, prepared side) of rows[a:b] for chunks of ``rows`` (a slice or local
        indices) sized by ``prepared_chunk``: one chunk is prepared at a time."""
        idx = np.arange(len(self.raw))[rows] if isinstance(rows, slice) else np.asarray(rows)
        step = prepared_chunk(chain_shape(self.raw.shape[1:], chain), spec, basis)
        for a, b in self._chunks(len(idx), step):
            yield a, b, self._rows_side(chain, idx[a:b], M, basis, spec)

    def _cols_side(self, cols_key: str, cols: tuple, chain: list, M, basis, spec: KernelSpec):
        metric = fingerprint(M, *([] if basis is None else [basis]), extra=[spec])
        key = ("cols", cols_key, metric)

        def build():
            X = cols[0] if len(cols) == 1 else np.concatenate(cols, axis=0)
            return self._prepare(self._layer_input(X, chain, spec.torch_dtype), M, basis, spec)

        return self._cached(key, build)

    def _kernel(self, xs, zs, spec: KernelSpec) -> torch.Tensor:
        return kernel_matrix(xs, zs, spec.engine_on(self.device), spec.memory_budget_mb)

    # ------------------------------------------------------------------ kernels
    def kernel_rows(self, chain: list, r0: int, r1: int, M, basis, spec: KernelSpec,
                    cols_key: str, *cols: np.ndarray) -> np.ndarray:
        """K(shard rows r0..r1, cols); ``cols`` are the parts of the columns, in order, each
        resolved from the object store (never sent by the driver per task)."""
        xs = self._rows_side(chain, slice(r0, r1), M, basis, spec)
        zs = self._cols_side(cols_key, cols, chain, M, basis, spec)
        return self._kernel(xs, zs, spec).cpu().numpy()

    def store_kernel_blocks(self, chain: list, blocks: list[tuple[int, int]], url: str,
                            store_spec: StoreSpec, name: str, shape: tuple[int, int], M,
                            basis, spec: KernelSpec, cols_key: str, *cols: np.ndarray) -> int:
        """Compute the given blocks (i, j) of kernel ``name`` (rows of this shard) and write
        each to the store, then mark it; blocks already marked (by an earlier attempt) are
        skipped. Returns the number of blocks computed."""
        store = KernelStore(url, store_spec)
        zs = self._cols_side(cols_key, cols, chain, M, basis, spec)
        return store.fill(name, shape, blocks, lambda r0, r1: self._rows_side(
                              chain, slice(r0 - self.start, r1 - self.start), M, basis, spec),
                          zs, lambda xs, zs: self._kernel(xs, zs, spec))

    # ------------------------------------------------------------------ centers in blocks
    def _center_sides(self, centers: CenterBlocks, M, basis, spec: KernelSpec):
        """(c0, c1, prepared side) of every block of centers in turn, each fetched when it is
        needed. Prepared blocks are kept for the next pass while they fit a sixteenth of the
        memory budget (``CENTER_CACHE_SHARE``); the others are fetched (from this node's
        object store after the first time) and prepared again. Preparing a center costs about
        d / b of its kernel entries against a slab of b rows, so the cache saves little and a
        worker's memory stays set by its rows and its budget, not by m."""
        metric = fingerprint(M, *([] if basis is None else [basis]), extra=[spec])
        key = (centers.key, metric)
        if self._center_cache[0] != key:
            self._center_cache = (key, {})
        cache = self._center_cache[1]
        budget = spec.memory_budget_mb * 2**20 * CENTER_CACHE_SHARE
        dt = spec.torch_dtype
        for j, (c0, _) in enumerate(centers.bounds()):
            sides = cache.get(j)
            if sides is not None:
                for a, b, side in sides:
                    yield c0 + a, c0 + b, side
                continue
            X = resolve(centers.parts[j])
            step = prepared_chunk(chain_shape(X.shape[1:], centers.chain), spec, basis)
            kept: list | None = []
            used = sum(side_bytes(s) for block in cache.values() for *_, s in block)
            for a, b in self._chunks(len(X), step):
                side = self._prepare(self._layer_input(X[a:b], centers.chain, dt), M, basis,
                                     spec)
                if kept is not None and used + side_bytes(side) <= budget:
                    kept.append((a, b, side))
                    used += side_bytes(side)
                else:
                    kept = None  # a block is cached whole or not at all
                yield c0 + a, c0 + b, side
            if kept is not None:
                cache[j] = kept

    def _against_centers(self, xs, centers: CenterBlocks, M, basis, spec: KernelSpec,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """K(prepared rows xs, every center), (rows, m), filled one chunk of centers at a time
        (into ``out`` when given)."""
        if out is None:
            out = torch.empty(len(xs), centers.m, dtype=spec.torch_dtype, device=self.device)
        for c0, c1, zs in self._center_sides(centers, M, basis, spec):
            out[:, c0:c1] = self._kernel(xs, zs, spec)
        return out

    def _held_out_kernel(self, images, chain: list, centers: CenterBlocks, M, basis,
                         spec: KernelSpec, block: int):
        """(r0, r1, K(chain(images[r0:r1]), centers)) for chunks of stored images that are not
        in the shard (held-out and test images): at most ``block`` images and one prepared
        chunk at a time, converted and featurised here."""
        shape = chain_shape(np.shape(images)[1:], chain)
        step = min(block, prepared_chunk(shape, spec, basis))
        for r0, r1 in self._chunks(len(images), step):
            Z = self._layer_input(np.asarray(images[r0:r1]), chain, spec.torch_dtype)
            yield r0, r1, self._against_centers(self._prepare(Z, M, basis, spec), centers, M,
                                                basis, spec)

    def scores(self, rows: np.ndarray, chain: list, alpha: np.ndarray, M, basis,
               spec: KernelSpec, centers: CenterBlocks) -> np.ndarray:
        """Class scores K(chain(rows), centers) @ alpha (float64) for a block of images the
        driver sends (test images); only (rows, classes) leaves the worker."""
        alpha = torch.as_tensor(np.asarray(alpha, dtype=np.float64), device=self.device)
        out = np.empty((len(rows), alpha.shape[1]))
        for r0, r1, K in self._held_out_kernel(rows, chain, centers, M, basis, spec,
                                               len(rows)):  # products in torch (threads.py)
            out[r0:r1] = (K.to(torch.float64) @ alpha).cpu().numpy()
        return out

    def evaluate(self, name: str, images, labels: np.ndarray, chain: list, coefs: np.ndarray,
                 M, basis, spec: KernelSpec, centers: CenterBlocks, block: int) -> np.ndarray:
        """Per coefficient matrix in ``coefs`` (R, m, c): [correct, summed squared error on the
        one-hot targets, count] over this worker's part of a held-out set (validation,
        monitor). The images (``name``'s part, an object ref resolved here, or parquet rows read
        here once) are featurised by ``chain`` block by block; only (R, 3) numbers leave."""
        if not isinstance(images, np.ndarray):  # parquet rows: read once, kept for next time
            key = f"{name}:{images!r}"
            if key not in self._holdouts:
                self._holdouts = {k: v for k, v in self._holdouts.items()
                                  if not k.startswith(f"{name}:")}
                self._holdouts[key] = resolve(images)
            images = self._holdouts[key]
        coefs = torch.as_tensor(np.asarray(resolve(coefs)), dtype=torch.float64,
                                device=self.device)
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=self.device)
        out = torch.zeros(coefs.shape[0], 3, dtype=torch.float64)
        for r0, r1, K in self._held_out_kernel(images, chain, centers, M, basis, spec, block):
            S = torch.einsum("bm,rmc->rbc", K.to(torch.float64), coefs)
            y = labels[r0:r1]
            target = torch.nn.functional.one_hot(y, coefs.shape[2]).to(torch.float64)
            out[:, 0] += (S.argmax(-1) == y).sum(-1).cpu().double()
            out[:, 1] += ((S - target) ** 2).sum((1, 2)).cpu()
            out[:, 2] += len(y)
        return out.numpy()

    # ------------------------------------------------------------------ Nystrom rows
    def nystrom_rows(self, task: NystromTask):
        """This shard's rows of K(train, centers), slab by slab (``task.block`` rows against
        every center, the centers a block at a time), and what they give:

        (K^T K or None, K^T Y, C, max of K_mm's rows here, slabs computed, store warnings)

        C is the rows of the centers this shard holds (their K_mm rows: every column, or only
        the rank-q preconditioner's columns). With ``task.key`` the rows stay for CG steps
        (K^T K is not formed): in memory up to ``task.resident_bytes``, beyond it in zarr
        slabs. With ``task.stored`` every slab goes through the run's store, marked after it
        is written; a rerun reads (and checks) what an interrupted fit left.
        """
        self.release(None)
        n = len(self.raw)
        m, block = task.centers.m, task.block
        res = ResidentRows(task)
        computed, reports = 0, []
        if task.stored is not None:
            url, store_spec, res.name, res.shape = task.stored
            res.store = KernelStore(url, store_spec)
            res.store.kernel(res.name, res.shape)
        labels = torch.as_tensor(np.asarray(resolve(task.labels), dtype=np.int64),
                                 device=self.device)
        KtK = None if task.key is not None else torch.zeros(m, m, dtype=torch.float64,
                                                             device=self.device)
        KtY = torch.zeros(m, task.classes, dtype=torch.float64, device=self.device)
        width = m if task.preconditioner_cols is None else len(task.preconditioner_cols)
        # this shard's centers' rows of K_mm, filled in place (one copy, never a list of parts)
        C = np.empty((len(task.center_rows), width), dtype=task.spec.dtype)
        filled, kmax, held = 0, -np.inf, 0
        for r0 in range(0, n, block):
            r1 = min(r0 + block, n)
            K, fresh = self._slab(res, r0, r1)
            computed += fresh
            if task.key is None:
                K64 = K.to(torch.float64)  # class_sums takes it as it is: one conversion
                KtK.addmm_(K64.T, K64)
            KtY += class_sums(K64 if task.key is None else K, labels[r0:r1], task.classes)
            here = torch.as_tensor(task.center_rows[(task.center_rows >= r0)
                                                    & (task.center_rows < r1)] - r0,
                                   device=K.device)
            rows = K[here]
            if len(rows):
                kmax = max(kmax, float(rows.max()))
            if task.preconditioner_cols is not None:
                rows = rows[:, torch.as_tensor(task.preconditioner_cols, device=K.device)]
            C[filled : filled + len(rows)] = rows.cpu().numpy()
            filled += len(rows)
            if self.progress is not None:
                self.progress(r1 - r0, n)
            if task.key is None:
                continue
            if task.resident_bytes is None or held + K.numel() * K.element_size() \
                    <= task.resident_bytes:
                held += K.numel() * K.element_size()
                res.slabs.append((r0, r1, K, None))
            else:  # beyond the budget: the slab is read back from zarr at every step
                res.slabs.append((r0, r1, None, self._spill(res, r0, r1, K)))
        if res.store is not None:
            reports = list(res.store.reports)
        if task.key is not None:
            self._resident = res
        return (None if KtK is None else KtK.cpu().numpy(), KtY.cpu().numpy(), C, kmax,
                computed, reports)

    def _slab_index(self, res: ResidentRows, r0: int) -> int:
        return (self.start + r0) // res.task.block if res.spill_dir is None \
            else r0 // res.task.block

    def _compute_slab(self, task: NystromTask, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 of K(train, centers), prepared a chunk of rows at a time."""
        out = torch.empty(r1 - r0, task.centers.m, dtype=task.spec.torch_dtype,
                          device=self.device)
        for a, b, xs in self._rows_sides(task.chain, slice(r0, r1), task.M, task.basis,
                                         task.spec):
            self._against_centers(xs, task.centers, task.M, task.basis, task.spec,
                                  out=out[a:b])
        return out

    def _slab(self, res: ResidentRows, r0: int, r1: int) -> tuple[torch.Tensor, int]:
        """Rows r0..r1 (local) of K(train, centers) and whether they were computed now: from
        the run's store when a finished slab is there (checked against its digest; a damaged
        one is recomputed), else computed (and written, then marked, when stored)."""
        if res.store is None:
            return self._compute_slab(res.task, r0, r1), 1
        i = self._slab_index(res, r0)
        store, name, shape = res.store, res.name, res.shape
        if store.marks(name, shape, (i, i + 1)).any():
            redone = []  # a damaged slab is recomputed (and counted)

            def recompute(_) -> None:
                self._write_slab(res, r0, r1)
                redone.append(1)

            K = store.read(name, shape, recompute=recompute, block_rows=(i, i + 1))
            return torch.from_numpy(K).to(self.device), len(redone)
        K = self._compute_slab(res.task, r0, r1)
        store.write_block(name, shape, i, 0, K)
        return K, 1

    def _write_slab(self, res: ResidentRows, r0: int, r1: int) -> None:
        res.store.write_block(res.name, res.shape, self._slab_index(res, r0), 0,
                              self._compute_slab(res.task, r0, r1))

    def _spill(self, res: ResidentRows, r0: int, r1: int, K: torch.Tensor) -> int:
        """Make sure slab r0..r1 is in a zarr store (the run's, or a temporary one on this
        worker's disk, made on first use); returns its slab index there."""
        if res.store is None:
            task = res.task
            res.spill_dir = tempfile.mkdtemp(prefix="ray-convrfm-rows-")
            spec = StoreSpec(rows_fingerprint="spill", cols_fingerprint=task.centers.key,
                             metric_fingerprint=fingerprint(task.M), depth=task.spec.params.depth,
                             patch_size=task.spec.params.patch_size,
                             padding=task.spec.params.padding, dtype=task.spec.dtype,
                             block=task.block, layout="slabs")
            res.store = KernelStore(f"{res.spill_dir}/rows.zarr", spec)
            res.shape = (len(self.raw), task.centers.m)
        i = self._slab_index(res, r0)
        if not res.store.marks(res.name, res.shape, (i, i + 1)).any():
            res.store.write_block(res.name, res.shape, i, 0, K)
        return i

    def _rows_for(self, task: NystromTask) -> ResidentRows:
        """The resident rows of ``task``, rebuilt first by a worker that lost them (a restart)."""
        if self._resident is None or self._resident.task.key != task.key:
            self.nystrom_rows(task)
        return self._resident

    def hessian_matvec(self, task: NystromTask, V: np.ndarray, ridges: list[float],
                       scale: float) -> np.ndarray:
        """This shard's share of H V = (K^T K + ridge K_mm) V on the kernel divided by
        ``scale`` (float64, m x R c in and out, column block r for ``ridges[r]``): K_s^T (K_s V),
        plus each block's ridge times K_s V at the rows of the centers it holds (their rows of
        K_mm V). One CG step's work on this worker: one pass over its rows for every ridge."""
        import time

        res = self._rows_for(task)
        m = task.centers.m
        V = torch.as_tensor(np.asarray(V), dtype=torch.float64, device=self.device) / scale
        out = torch.zeros(m, V.shape[1], dtype=torch.float64, device=self.device)
        # float64 copies of MATVEC_ROWS rows at a time: the two products read them from cache
        buf = torch.empty(MATVEC_ROWS, m, dtype=torch.float64, device=self.device)
        rows = task.center_rows
        weight = scale * ridge_columns(ridges, V.shape[1], V)  # each column's ridge, once
        for r0, r1, K, i in res.slabs:
            if K is None:
                t0 = time.perf_counter()
                K = torch.from_numpy(res.store.read(
                    res.name, res.shape, block_rows=(i, i + 1),
                    recompute=lambda _, a=r0, b=r1: self._write_slab(res, a, b))).to(self.device)
                self._read_seconds += time.perf_counter() - t0
            KV = torch.empty(len(K), V.shape[1], dtype=torch.float64, device=self.device)
            for a in range(0, len(K), MATVEC_ROWS):  # (K / scale) V, then its K^T product
                Kb = buf[: min(MATVEC_ROWS, len(K) - a)].copy_(K[a : a + MATVEC_ROWS])
                torch.mm(Kb, V, out=KV[a : a + len(Kb)])
                out.addmm_(Kb.T, KV[a : a + len(Kb)])
            sel = np.flatnonzero((rows >= r0) & (rows < r1))
            if len(sel):
                pos = torch.as_tensor(task.center_offset + sel, device=self.device)
                here = KV[torch.as_tensor(rows[sel] - r0, device=self.device)]
                out[pos] += here * weight
        return (out / scale).cpu().numpy()

    def read_seconds(self) -> float:
        """Seconds spent reading spilled slabs back (the out-of-core tier) since the previous
        call."""
        seconds, self._read_seconds = self._read_seconds, 0.0
        return seconds

    def release(self, key: str | None) -> None:
        """Drop the resident rows (and any temporary store) of a finished solve; None: any."""
        if self._resident is not None and (key is None or self._resident.task.key == key):
            self._resident.close()
            self._resident = None
        if self._factor is not None and (key is None or self._factor[0] == key):
            self._factor = None

    # ------------------------------------------------------------------ the preconditioner
    def precondition(self, key: str, n: int, ridges: list[float], v: np.ndarray,
                     transpose: bool, build: tuple) -> np.ndarray:
        """B v (or B^T v) of the preconditioner, column block r for ``ridges[r]``: this worker
        holds the factor
        (m x m, or m x q for rank q) built on first use from ``build`` = (scale, columns,
        [refs of the shards' K_mm rows]), fetched only then; no other process holds it."""
        if self._factor is None or self._factor[0] != key:
            scale, cols, parts = build
            C = np.concatenate([np.asarray(resolve(p)) for p in parts], axis=0)
            C = torch.as_tensor(C, device=self.device).to(torch.float64).div_(scale)
            self._factor = (key, factor_centers(C, cols, overwrite=True), {})
            del C
        _, factor, by_ridges = self._factor
        ridges = tuple(ridges)
        if ridges not in by_ridges:
            by_ridges.clear()
            by_ridges[ridges] = factor.for_ridges(list(ridges), n)
        pre = by_ridges[ridges]
        v = torch.as_tensor(np.asarray(v), dtype=torch.float64, device=self.device)
        return (pre.apply_t(v) if transpose else pre.apply(v)).cpu().numpy()

    # ------------------------------------------------------------------ the AGOP
    def agop_part(self, chain: list, sample_rows: np.ndarray, coef: np.ndarray, M, basis,
                  spec: KernelSpec, centers: CenterBlocks) -> np.ndarray:
        """Unaveraged patch AGOP over this shard's sample images (local row indices).

        The predictor involves every center: its blocks are fetched (or taken from the cache)
        one at a time with their rows of ``coef``; the result is a small (d, d) sum.
        """
        d = M.shape[0]
        if len(sample_rows) == 0:
            return np.zeros((d, d))
        dt = spec.torch_dtype
        coef = torch.as_tensor(np.asarray(coef), dtype=dt, device=self.device)
        Mt = torch.as_tensor(M, dtype=dt, device=self.device)
        engine = spec.engine_on(self.device)

        def blocks():
            for c0, c1, xs in self._center_sides(centers, M, basis, spec):
                yield xs, coef[c0:c1]

        G, workspace = torch.zeros(d, d, dtype=torch.float64), Workspace()
        # the AGOP is a sum over sample images: one prepared chunk of them at a time
        for _, _, zs in self._rows_sides(chain, sample_rows, M, basis, spec):
            G += agop_from_blocks(blocks, zs, Mt, coef.shape[1], engine=engine,
                                  budget_mb=spec.memory_budget_mb, average=False,
                                  workspace=workspace).to(torch.float64).cpu()
        return G.numpy()
