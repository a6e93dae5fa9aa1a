"""The driver: starts or joins Ray, places one shard worker per bundle, reduces small results.

The driver holds no training images after handing the shards out: columns of a kernel (the
training images themselves, the Nystrom centers, the AGOP's predictor) travel from the workers
that own them to the workers that need them through Ray's object store, and only kernel rows
for the exact solver, m x m sums and (d, d) AGOPs come back.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid

import numpy as np

from ray_convrfm.backends.chunks import CenterBlocks, chain_shape
from ray_convrfm.backends.embedded_ray import (  # noqa: F401  (the driver's entry points)
    RayConfinementError,
    embedded_ray_processes,
    listening_sockets,
    start_ray,
)
from ray_convrfm.backends.protocol import KernelSpec
from ray_convrfm.backends.store import StoreSpec
from ray_convrfm.backends.workers import NystromTask, ShardWorker
from ray_convrfm.kernels.threads import worker_environment
from ray_convrfm.options import DEFAULT_BLOCK, REDUCE_FAN_IN
from ray_convrfm.progress import progress_bar

log = logging.getLogger(__name__)


class ShardParts(list):
    """Object refs of the workers' images (``ShardedImages.parts``), with a key naming the
    selection, so that workers recognise columns they have already prepared."""

    key: str = ""


class PlacementTimeoutError(TimeoutError):
    """The cluster did not provide the requested workers within the timeout."""


def resolve_gpus_per_worker(gpus_per_worker: float | None) -> float:
    """None means 1 when the Ray cluster has GPUs (now, or as autoscaler node types), else 0."""
    import ray

    if gpus_per_worker is not None:
        if gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0; found {gpus_per_worker}")
        return float(gpus_per_worker)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def reserve_workers(workers: int, bundle: dict, timeout_s: float | None, poll_s: float = 10.0,
                    elastic: bool = True):
    """A placement group of ``workers`` bundles (SPREAD over nodes), waited for.

    On an autoscaling cluster the pending group is what makes the autoscaler start nodes; while
    waiting this logs what it waits for and what the cluster has, and after ``timeout_s``
    (None: wait forever) it removes the group and raises ``PlacementTimeoutError``. A cluster
    that cannot grow (``elastic=False``: the embedded local Ray) is refused at once when its
    total resources are too small.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    total = ray.cluster_resources()
    short = {k: v * workers for k, v in bundle.items() if v * workers > total.get(k, 0)}
    if short and not elastic:
        raise PlacementTimeoutError(
            f"{workers} workers of {bundle} need {short}, but this local Ray has "
            f"{ {k: total.get(k, 0) for k in short} } in all; lower --workers / "
            "--gpus-per-worker, or join a larger cluster with --address")

    pg = placement_group([dict(bundle)] * workers, strategy="SPREAD")
    start = time.monotonic()
    while True:
        ready, _ = ray.wait([pg.ready()], timeout=poll_s if timeout_s is None
                            else max(0.0, min(poll_s, timeout_s - (time.monotonic() - start))))
        if ready:
            return pg
        waited = time.monotonic() - start
        have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        if timeout_s is not None and waited >= timeout_s:
            remove_placement_group(pg)
            raise PlacementTimeoutError(
                f"gave up after {waited:.0f} s waiting for {workers} workers of {bundle}; the "
                f"cluster has {have} available. Add nodes (or let the autoscaler), lower "
                "--workers / --gpus-per-worker, or raise the placement timeout.")
        log.warning("waiting %.0f s so far for %d workers of %s; cluster has %s available",
                    waited, workers, bundle, have)


def wait_all(futures: list, desc: str = "", progress: bool = False) -> list:
    """``ray.get`` with one progress bar over every worker's tasks (results in order)."""
    import ray

    if not progress:
        return ray.get(futures)
    pending = list(futures)
    with progress_bar(len(futures), desc, True) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
    return ray.get(futures)


class ShardedImages:
    """Images split into contiguous shards, one per Ray actor, each shard ``ray.put`` once.

    Parameters
    ----------
    X : (n, C, H, W) images in their stored dtype (8-bit pixels stay uint8; workers convert a
        chunk at a time), or a description of rows each worker loads itself
        (``parquet.ParquetRows``: images never pass through the driver)
    workers : number of actors (shards)
    threads : CPU threads (and CPUs reserved) per actor; None means 1 (``kernels.threads``)
    block : rows per task (and per stored kernel block)
    align : shard boundaries fall on multiples of ``block``, so that every block of a stored
        kernel belongs to exactly one worker (needed with a store)
    gpus_per_worker : GPUs reserved per actor (its shard and kernels then live on its GPU)
    placement_timeout_s : give up waiting for the workers' resources after this long
    elastic : whether the cluster can grow (an autoscaler); if not, resources it does not
        have at all are refused at once
    progress : one progress bar per stage across all workers
    """

    def __init__(self, X: np.ndarray, workers: int, threads: int | None = None,
                 max_restarts: int = 3, block: int = DEFAULT_BLOCK, align: bool = False,
                 gpus_per_worker: float = 0,
                 placement_timeout_s: float | None = 600, progress: bool = False,
                 elastic: bool = True):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if workers < 1:
            raise ValueError(f"workers must be at least 1; found {workers}")
        if hasattr(X, "load"):  # rows of a parquet data set: each worker reads its own
            self.n, self.row_shape, self.dtype = len(X), tuple(X.row_shape), np.dtype(X.dtype)
        else:
            X = np.asarray(X)
            self.n, self.row_shape, self.dtype = len(X), tuple(X.shape[1:]), X.dtype
        self.block, self.align, self.progress = block, align, progress
        bounds = np.linspace(0, self.n, workers + 1).astype(int)
        if align:
            bounds = np.minimum(np.round(bounds / block).astype(int) * block, self.n)
            bounds[-1] = self.n
        self.bounds = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        bundle = {"CPU": float(threads or 1)}
        if gpus_per_worker:
            bundle["GPU"] = float(gpus_per_worker)
        self.actors: list = []
        self.pg = reserve_workers(workers, bundle, placement_timeout_s, elastic=elastic)
        actor = ray.remote(max_restarts=max_restarts, max_task_retries=max_restarts)(ShardWorker)
        # the refs stay referenced here: a restarted actor is rebuilt from them
        self.shard_refs = [ray.put(X.slice(a, b) if hasattr(X, "load") else X[a:b])
                           for a, b in self.bounds]
        self.actors = [
            actor.options(num_cpus=threads or 1, num_gpus=gpus_per_worker or 0,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(
                              self.pg, placement_group_bundle_index=k),
                          runtime_env={"env_vars": worker_environment(threads or 1)},
                          ).remote(ref, a, threads or 1, gpus_per_worker)
            for k, (ref, (a, b)) in enumerate(zip(self.shard_refs, self.bounds, strict=True))]
        self.chain: list = []
        self.chain_ref = ray.put(self.chain)
        #: held-out sets (validation, monitor): per worker, its part and the part's labels
        self.holdouts: dict[str, list[tuple]] = {}
        self._tasks: tuple[str, list[NystromTask]] | None = None
        #: seconds spent per stage (driver wall time): for benchmarks and the cost model
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:  # the workers load their shards (parquet rows are read and decoded there)
            wait_all([a.size.remote() for a in self.actors], "load shards", progress)
        except BaseException:
            self.close()  # e.g. an unreadable row group: release the workers and reservation
            raise
        self._time("load", t0)

    def _time(self, stage: str, t0: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ the images
    def featurise(self, filters: np.ndarray, padding: bool) -> None:
        """Deep ConvRFM's next inputs: the images convolved with ``filters``. Nothing is
        computed now: every task gets the chain of filter banks and featurises the chunk of
        stored pixels it works on, so no featurised shard ever exists."""
        import ray

        self.chain = [*self.chain, (np.asarray(filters), bool(padding))]
        self.chain_ref = ray.put(self.chain)
        self.row_shape = chain_shape(self.row_shape, self.chain[-1:])

    def _local(self, idx: np.ndarray | None):
        """Per shard, the local rows of sorted global indices ``idx`` (None: all rows)."""
        if idx is None:
            return [None] * len(self.bounds)
        idx = np.asarray(idx)
        if np.any(np.diff(idx) < 0):
            raise ValueError("row indices must be sorted")
        return [idx[(idx >= a) & (idx < b)] - a for a, b in self.bounds]

    def parts(self, idx: np.ndarray | None = None) -> list:
        """Object refs of the shards' images (rows ``idx`` when given), in global order; they
        stay on the workers' nodes until a task that needs them runs."""
        refs = ShardParts(a.pixels.remote(rows)
                          for a, rows in zip(self.actors, self._local(idx), strict=True)
                          if rows is None or len(rows))
        # the same selection of the same (featurised) images gets the same key, so workers
        # keep one prepared copy of it across stages (kernel, validation, AGOP)
        selection = "all" if idx is None else hashlib.sha256(
            np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()
        refs.key = f"parts:{self.chain_ref.hex()}:{selection}"
        return refs

    def gather(self, idx: np.ndarray | None, dtype: str) -> np.ndarray:
        """The images (rows ``idx``) as the current layer sees them, in this process: for the
        model's centers only (8-bit pixels as stored; featurised images, by the workers that
        own them, in working ``dtype``)."""
        import ray

        local = [np.arange(b - a) if rows is None else rows
                 for rows, (a, b) in zip(self._local(idx), self.bounds, strict=True)]
        parts = ray.get([actor.images.remote(self.chain_ref, rows, dtype)
                         for actor, rows in zip(self.actors, local, strict=True) if len(rows)])
        if not parts:
            return np.zeros((0, *self.row_shape), dtype=dtype)
        return np.concatenate(parts, axis=0)

    def fingerprint(self, dtype: str) -> str:
        """Fingerprint of the images as the current layer sees them in working ``dtype``,
        equal to ``store.rows_fingerprint`` of those values."""
        import ray

        if not self.align:
            raise ValueError("fingerprints need block-aligned shards (align=True)")
        from ray_convrfm.backends.store import combine_digests

        digests = ray.get([a.digests.remote(self.chain_ref, self.block, dtype)
                           for a in self.actors])
        return combine_digests([d for part in digests for d in part], self.row_shape,
                               np.dtype(dtype).str)

    def patch_gram(self, patch_size: int, padding: bool, dtype: str,
                   budget_mb: float) -> np.ndarray:
        """Sum over every patch of every shard of p p^T (float64, (d, d))."""
        return self.reduce([a.patch_gram.remote(self.chain_ref, patch_size, padding, dtype,
                                                budget_mb)
                            for a in self.actors])

    # ------------------------------------------------------------------ reductions
    def reduce(self, refs: list, fan_in: int = REDUCE_FAN_IN):
        """Sum of partial results; with many parts, a tree of sums computed on the workers
        (so the driver receives one result, not one per worker)."""
        import ray

        parts = ray.get(self._tree(refs, fan_in, fan_in))
        return sum(parts[1:], parts[0])

    def _tree(self, refs: list, fan_in: int = REDUCE_FAN_IN, keep: int = 1) -> list:
        """Sum ``refs`` by a tree of ``add`` tasks on the workers until at most ``keep`` refs
        are left (nothing is fetched here)."""
        level = 0
        while len(refs) > keep:
            groups = [refs[k : k + fan_in] for k in range(0, len(refs), fan_in)]
            refs = [self.actors[(g * fan_in + level) % len(self.actors)].add.remote(*group)
                    for g, group in enumerate(groups)]
            level += 1
        return refs

    # ------------------------------------------------------------------ kernels
    def _columns(self, cols) -> tuple[str, list]:
        """(key, refs) of kernel columns: an array is put once; a list of refs is used as is."""
        import ray

        if isinstance(cols, ShardParts):
            return cols.key, list(cols)
        if isinstance(cols, list):
            return "-".join(r.hex() for r in cols), cols
        return uuid.uuid4().hex, [ray.put(np.asarray(cols))]

    def _row_tasks(self):
        """(actor, local r0, r1) for every block of rows, shard by shard."""
        for actor, (a, b) in zip(self.actors, self.bounds, strict=True):
            for r in range(a, b, self.block):
                yield actor, r - a, min(r + self.block, b) - a

    def kernel(self, cols, M: np.ndarray, basis: np.ndarray | None, spec: KernelSpec,
               desc: str = "kernel") -> np.ndarray:
        """K(all shards, cols) with ``cols`` an array or a list of refs (e.g. ``parts()``)."""
        key, refs = self._columns(cols)
        futures = [actor.kernel_rows.remote(self.chain_ref, r0, r1, M, basis, spec, key, *refs)
                   for actor, r0, r1 in self._row_tasks()]
        rows = wait_all(futures, desc, self.progress)
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, 0), np.float32)

    def kernel_via_store(self, cols, n_cols: int, M: np.ndarray, basis: np.ndarray | None,
                         spec: KernelSpec, url: str, store_spec: StoreSpec, name: str,
                         desc: str = "kernel") -> tuple[np.ndarray, int]:
        """K(all shards, cols) through a zarr store: workers write the missing blocks.

        Returns the kernel, read back from the store (each block checked against its digest),
        and how many blocks were computed now, damaged ones recomputed included (0 when a
        previous run already stored them all intact).
        """
        from ray_convrfm.backends.store import KernelStore

        if not self.align:
            raise ValueError("a stored kernel needs block-aligned shards (align=True)")
        shape = (self.n, n_cols)
        store = KernelStore(url, store_spec)
        missing = store.missing(name, shape)  # creates the arrays before workers write
        key, refs = self._columns(cols)

        def compute(blocks: list[tuple[int, int]]) -> int:
            """The workers owning ``blocks``' rows write those not marked; how many."""
            futures = []
            for actor, (a, b) in zip(self.actors, self.bounds, strict=True):
                for i in range(a // self.block, -(-b // self.block)):
                    row = [(bi, bj) for bi, bj in blocks if bi == i]
                    if row:
                        futures.append(actor.store_kernel_blocks.remote(
                            self.chain_ref, row, url, store_spec, name, shape, M, basis, spec,
                            key, *refs))
            return int(sum(wait_all(futures, desc, self.progress)))

        computed = [compute(missing)]
        # every block is checked against its digest as it is read; damaged ones are recomputed
        K = store.read(name, shape, recompute=lambda blocks: computed.append(compute(blocks)))
        return K, sum(computed)

    def center_blocks(self, idx: np.ndarray | None = None) -> CenterBlocks:
        """The (featurised) rows ``idx`` (None: all) as blocks of at most ``block`` images, each
        made by and left on the worker that owns it: kernels against them fetch one block at a
        time where they are computed."""
        parts, sizes = [], []
        for actor, rows, (a, b) in zip(self.actors, self._local(idx), self.bounds, strict=True):
            rows = np.arange(b - a) if rows is None else rows
            for k in range(0, len(rows), self.block):
                parts.append(actor.pixels.remote(rows[k : k + self.block]))
                sizes.append(len(rows[k : k + self.block]))
        selection = "all" if idx is None else hashlib.sha256(
            np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()
        return CenterBlocks(f"centers:{self.chain_ref.hex()}:{selection}:{self.block}",
                            tuple(parts), tuple(sizes), self.chain)

    def map_scores(self, rows: np.ndarray, chain: list, centers: CenterBlocks,
                   alpha: np.ndarray, M: np.ndarray, basis: np.ndarray | None,
                   spec: KernelSpec, desc: str = "predict") -> np.ndarray:
        """K(chain(rows), centers) @ alpha for images the driver sends, in blocks over the
        actors: each block is featurised and scored where it lands; only scores return."""
        import ray

        alpha = np.asarray(alpha)
        alpha_ref, chain_ref = ray.put(alpha), ray.put(list(chain))
        rows = np.asarray(rows)
        futures = [self.actors[k % len(self.actors)].scores.remote(
                       rows[r : r + self.block], chain_ref, alpha_ref, M, basis, spec, centers)
                   for k, r in enumerate(range(0, len(rows), self.block))]
        t0 = time.perf_counter()
        parts = wait_all(futures, desc, self.progress)
        self._time("scores", t0)
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, alpha.shape[1]))

    def add_holdout(self, name: str, X, y: np.ndarray) -> None:
        """Spread a held-out set (validation, monitor) over the workers: images as an array
        (one object per worker, put once) or parquet rows (each worker reads its part when
        first asked); labels stay beside them. ``evaluate`` returns only numbers."""
        import ray

        y = np.asarray(y)
        edges = np.linspace(0, len(y), len(self.actors) + 1).astype(int)
        parts = []
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            part = X.slice(a, b) if hasattr(X, "load") else ray.put(np.asarray(X[a:b]))
            parts.append((part, ray.put(y[a:b])))
        self.holdouts[name] = parts

    def evaluate(self, name: str, coefs: np.ndarray, centers: CenterBlocks, M: np.ndarray,
                 basis: np.ndarray | None, spec: KernelSpec, desc: str = "validation"):
        """[correct, summed squared error, count] per coefficient matrix (R, m, c) over the
        held-out set ``name``, summed over the workers that hold its parts."""
        import ray

        coefs_ref = ray.put(np.ascontiguousarray(coefs, dtype=np.float64))
        futures = [actor.evaluate.remote(name, images, labels, self.chain_ref, coefs_ref, M,
                                         basis, spec, centers, self.block)
                   for actor, (images, labels) in zip(self.actors, self.holdouts[name],
                                                      strict=True)]
        t0 = time.perf_counter()
        out = sum(wait_all(futures, desc, self.progress))
        self._time(f"evaluate_{name}", t0)
        return out

    def nystrom(self, center_idx: np.ndarray, targets, M: np.ndarray,
                basis: np.ndarray | None, spec: KernelSpec, store: tuple | None = None,
                key: str | None = None, resident_bytes: int | None = None,
                preconditioner_cols: np.ndarray | None = None):
        """Every worker's rows of K(train, centers) (the centers' blocks fetched from their
        owners one at a time), summed: returns (K^T K or None, K^T Y, refs of the shards'
        K_mm rows, max of K_mm, slabs computed). ``targets`` (``protocol.Targets``) go to the
        workers as class indices, each its rows', and become one-hot targets a slab at a time
        there. With ``store`` = (url, store spec) the rows go
        through zarr slabs, so an interrupted fit resumes. With ``key`` the workers keep their
        rows for ``hessian_matvec`` and K^T K is not formed (the iterative solver)."""
        import ray

        centers = self.center_blocks(center_idx)
        stored = None
        if store is not None:
            from ray_convrfm.backends.store import KernelStore

            if not self.align:
                raise ValueError("a stored kernel needs block-aligned shards (align=True)")
            url, store_spec = store
            shape = (self.n, len(center_idx))
            KernelStore(url, store_spec).kernel("K", shape)  # created before the workers write
            stored = (url, store_spec, "K", shape)
        tasks, offset = [], 0
        for (a, b), rows in zip(self.bounds, self._local(center_idx), strict=True):
            tasks.append(NystromTask(key=key, chain=self.chain,
                                     labels=ray.put(np.asarray(targets.labels[a:b])),
                                     classes=int(targets.classes),
                                     center_rows=rows.astype(np.int64), center_offset=offset,
                                     M=M, basis=basis, spec=spec, block=self.block,
                                     centers=centers, stored=stored,
                                     resident_bytes=resident_bytes,
                                     preconditioner_cols=preconditioner_cols))
            offset += len(rows)
        futures = [actor.nystrom_rows.options(num_returns=6).remote(task)
                   for actor, task in zip(self.actors, tasks, strict=True)]
        if key is not None:  # what hessian_matvec sends (a restarted worker rebuilds from it)
            self._tasks = (key, tasks)
        t0 = time.perf_counter()
        wait_all([f[1] for f in futures], "Nystrom rows", self.progress)
        self._time("nystrom_rows", t0)
        t0 = time.perf_counter()
        KtK = None if key is not None else self.reduce([f[0] for f in futures])
        KtY = self.reduce([f[1] for f in futures])
        self._time("nystrom_reduce", t0)
        for reports in ray.get([f[5] for f in futures]):  # damaged slabs the workers redid
            for message in reports:
                log.warning("%s (on a shard worker)", message)
        kmax = max(ray.get([f[3] for f in futures]))
        computed = int(sum(ray.get([f[4] for f in futures])))
        return KtK, KtY, [f[2] for f in futures], kmax, computed

    def hessian_matvec(self, key: str, V: np.ndarray, ridges: list[float],
                       scale: float) -> np.ndarray:
        """(K^T K + ridge K_mm) V on the kernel divided by ``scale`` (column block r for
        ``ridges[r]``), summed over the workers' resident rows: one product moves m x R c in
        and out per worker, never m x m."""
        kept, tasks = self._tasks or (None, None)
        if kept != key:
            raise ValueError(f"no resident rows for {key!r}; call nystrom(key=...) first")
        import ray

        V_ref = ray.put(np.ascontiguousarray(V, dtype=np.float64))
        t0 = time.perf_counter()
        out = self.reduce([actor.hessian_matvec.remote(task, V_ref, ridges, scale)
                           for actor, task in zip(self.actors, tasks, strict=True)])
        self._time("cg_step", t0)
        self.timings["cg_steps"] = self.timings.get("cg_steps", 0) + 1
        return out

    def preconditioned_step(self, key: str, n: int, ridges: list[float], v: np.ndarray,
                            scale: float, build: tuple) -> np.ndarray:
        """B^T H B v, one CG step, chained on the workers: the first worker applies B, every
        worker its share of H (fetching B v from the first), a tree of sums, the first worker
        B^T; the driver sends v and waits once (m x c in, m x c out)."""
        import ray

        kept, tasks = self._tasks or (None, None)
        if kept != key:
            raise ValueError(f"no resident rows for {key!r}; call nystrom(key=...) first")
        first = self.actors[0]
        t0 = time.perf_counter()
        u = first.precondition.remote(key, n, ridges, np.ascontiguousarray(v), False, build)
        parts = [actor.hessian_matvec.remote(task, u, ridges, scale)
                 for actor, task in zip(self.actors, tasks, strict=True)]
        out = ray.get(first.precondition.remote(key, n, ridges, self._tree(parts)[0], True,
                                                build))
        self._time("cg_step", t0)
        self.timings["cg_steps"] = self.timings.get("cg_steps", 0) + 1
        return out

    def precondition(self, key: str, n: int, ridges: list[float], v: np.ndarray,
                     transpose: bool, build: tuple) -> np.ndarray:
        """B v (B^T v) on the first worker, which holds the preconditioner's factor."""
        import ray

        t0 = time.perf_counter()
        out = ray.get(self.actors[0].precondition.remote(key, n, ridges, v, transpose, build))
        self._time("precondition", t0)
        return out

    def collect(self, parts: list) -> np.ndarray:
        """The shards' K_mm rows (refs ``nystrom`` returned) here, as one array: for the
        direct solver only (small m)."""
        import ray

        return np.concatenate(ray.get(parts), axis=0)

    def read_seconds(self) -> float:
        """Seconds the workers spent reading spilled rows back (the out-of-core tier) since
        the previous call, summed over workers."""
        import ray

        return float(sum(ray.get([a.read_seconds.remote() for a in self.actors])))

    def release(self, key: str) -> None:
        """The workers drop the resident rows and the factor of a finished solve."""
        import ray

        ray.get([actor.release.remote(key) for actor in self.actors])
        if self._tasks is not None and self._tasks[0] == key:
            self._tasks = None

    def agop(self, centers: CenterBlocks, coef: np.ndarray, sample_idx: np.ndarray,
             M: np.ndarray, basis: np.ndarray | None, spec: KernelSpec) -> np.ndarray:
        """Patch AGOP averaged over sorted ``sample_idx`` (global rows): per-shard sums of the
        predictor f = coef^T K(centers, .), reduced here."""
        import ray

        coef_ref = ray.put(np.asarray(coef))
        futures = [actor.agop_part.remote(self.chain_ref, rows, coef_ref, M, basis, spec,
                                          centers)
                   for actor, rows in zip(self.actors, self._local(sample_idx), strict=True)]
        t0 = time.perf_counter()
        wait_all(futures, "AGOP", self.progress)
        self._time("agop", t0)
        return self.reduce(futures) / len(sample_idx)

    def peak_rss_mb(self) -> list[float]:
        """Every worker's peak resident memory so far (MiB)."""
        import ray

        return ray.get([a.peak_rss_mb.remote() for a in self.actors])

    def nodes(self) -> list[str]:
        """The Ray node of every worker (to check that work spread over nodes)."""
        import ray

        return ray.get([a.node.remote() for a in self.actors])

    def __enter__(self) -> ShardedImages:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors (their shards go with them) and release their reservation."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.shard_refs = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

