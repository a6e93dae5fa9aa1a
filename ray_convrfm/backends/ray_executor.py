"""The Ray executor: one ``ShardWorker`` actor per shard, placed by a placement group.

It owns the pool's lifecycle: the placement group (SPREAD over nodes, waited for with a timeout
so an autoscaler can bring nodes up), the actors and their restarts, the tree of sums on the
workers and the progress of every stage. What the workers compute is ``ShardedBackend``'s
business.

Restarts: a restarted actor asks the pool's ``ShardDirectory`` (a small actor beside the driver)
for its current shard, so a pool reloaded with a model's centers is rebuilt with the centers, and
no actor's creation pins the training images once they are replaced. Tasks wait for a lost
worker's restart (``recovery.NodeWatch``, bounded by ``recovery_timeout_s``) instead of spending
a fixed number of retries.
"""

from __future__ import annotations

import logging
import time
import weakref

from ray_convrfm.backends.embedded_ray import start_ray
from ray_convrfm.backends.executor import shard_bounds
from ray_convrfm.backends.recovery import NodeWatch, WorkerLostError, wait_watched
from ray_convrfm.backends.workers import ShardWorker
from ray_convrfm.data.rows import image_rows
from ray_convrfm.kernels.threads import worker_environment
from ray_convrfm.options import DEFAULT_BLOCK, REDUCE_FAN_IN
from ray_convrfm.progress import progress_bar

log = logging.getLogger(__name__)

#: The resource Ray gives the head node alone.
HEAD_RESOURCE = "node:__internal_head__"

#: Executors kept by fitted models for their predictions, oldest first: released when a new
#: pool cannot be placed beside them (their models reopen workers on their next prediction).
_KEPT: list = []

__all__ = ["PlacementTimeoutError", "RayExecutor", "WorkerLostError", "reserve_workers",
           "resolve_gpus_per_worker", "start_ray", "wait_all"]


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
            f"{ {k: total.get(k, 0) for k in short} } in all; lower workers={workers} or "
            f"gpus_per_worker={bundle.get('GPU', 0):g}, or join a larger cluster with "
            "address=...")

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
                f"workers={workers} or gpus_per_worker={bundle.get('GPU', 0):g}, or raise "
                f"placement_timeout_s={timeout_s:g}.")
        log.warning("waiting %.0f s so far for %d workers of %s; cluster has %s available",
                    waited, workers, bundle, have)


def wait_all(futures: list, desc: str = "", progress: bool = False,
             unit: str = "block", watch: NodeWatch | None = None) -> list:
    """``ray.get`` with one progress bar over every worker's tasks (results in order), the
    workers' nodes watched meanwhile (``recovery.wait_watched``)."""
    if not progress:
        return wait_watched(futures, watch)
    with progress_bar(len(futures), desc, True, unit) as bar:
        return wait_watched(futures, watch, bar)


class ShardDirectory:
    """Each worker's current shard (its object ref, wrapped so that it is passed on, not
    fetched, and its first global row): what a restarted actor loads."""

    def __init__(self):
        self.shards: dict[int, tuple[list, int]] = {}

    def set(self, worker: int, ref: list, start: int) -> None:
        self.shards[worker] = (ref, start)

    def shard(self, worker: int) -> tuple[list, int]:
        return self.shards[worker]


class RayShardWorker(ShardWorker):
    """A ``ShardWorker`` that takes its shard from the pool's directory, at its first start
    and at every restart (Ray calls the constructor again with the same arguments)."""

    def __init__(self, directory, worker: int, threads: int, gpus: float):
        import ray

        (ref,), start = ray.get(directory.shard.remote(worker))
        super().__init__(ray.get(ref), start, threads, gpus)


class RayExecutor:
    """Images split into contiguous shards, one per Ray actor, each shard ``ray.put`` once.

    Parameters
    ----------
    images : (n, C, H, W) images in their stored dtype (8-bit pixels stay uint8; workers
        convert a chunk at a time), or parquet rows each worker reads itself
        (``parquet.ParquetRows``: images never pass through the driver)
    workers : number of actors (shards)
    threads : CPU threads (and CPUs reserved) per actor; None means 1 (``kernels.threads``)
    block : rows per task (and per stored kernel block)
    align : shard boundaries fall on multiples of ``block``, so that every block of a stored
        kernel belongs to exactly one worker (needed with a store)
    gpus_per_worker : GPUs reserved per actor (its shard and kernels then live on its GPU)
    max_restarts : how often Ray restarts each actor (its tasks wait for the restart)
    recovery_timeout_s : how long a lost worker may stay away (its node lost, its restart
        waiting for a node) before ``WorkerLostError`` stops the work
    store : the run's kernel store, if any (named in that error: a rerun resumes from it)
    placement_timeout_s : give up waiting for the workers' resources after this long
    elastic : whether the cluster can grow (an autoscaler); if not, resources it does not
        have at all are refused at once
    progress : one progress bar per stage across all workers
    """

    def __init__(self, images, workers: int, threads: int | None = None,
                 max_restarts: int = 3, block: int = DEFAULT_BLOCK, align: bool = False,
                 gpus_per_worker: float = 0, placement_timeout_s: float | None = 600,
                 progress: bool = False, elastic: bool = True,
                 recovery_timeout_s: float = 300, store: str | None = None):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.block, self.align, self.progress = block, align, progress
        self.bounds = shard_bounds(len(images), workers, block, align)
        bundle = {"CPU": float(threads or 1)}
        if gpus_per_worker:
            bundle["GPU"] = float(gpus_per_worker)
        self.actors: list = []
        self.shard_refs: list = []
        self.watch: NodeWatch | None = None
        self.directory = None
        _release_kept_for(workers, bundle)
        self.pg = reserve_workers(workers, bundle, placement_timeout_s, elastic=elastic)
        # on the head node, which the cluster cannot lose without losing the driver's work
        head = {HEAD_RESOURCE: 0.001} if HEAD_RESOURCE in ray.cluster_resources() else {}
        self.directory = ray.remote(ShardDirectory).options(num_cpus=0, resources=head).remote()
        # the refs stay referenced here and in the directory: restarted actors load them
        self.shard_refs = self._shards(images)
        actor = ray.remote(max_restarts=max_restarts, max_task_retries=-1)(RayShardWorker)
        self.actors = [
            actor.options(num_cpus=threads or 1, num_gpus=gpus_per_worker or 0,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(
                              self.pg, placement_group_bundle_index=k),
                          runtime_env={"env_vars": worker_environment(threads or 1)},
                          ).remote(self.directory, k, threads or 1, gpus_per_worker)
            for k in range(workers)]
        self.starts = 1
        resume = (f"rerun the same fit with store {store!r} to resume: the kernel blocks "
                  "already stored are kept" if store else
                  "with a kernel store (store=PATH) a rerun resumes from the "
                  "blocks already computed")
        try:  # the workers load their shards (parquet rows are read and decoded there)
            self.get([a.size.remote() for a in self.actors], "load shards")
            self.watch = NodeWatch(self.actors, recovery_timeout_s, max_restarts, resume)
        except BaseException:
            self.close()  # e.g. an unreadable row group: release the workers and reservation
            raise

    def _shards(self, images) -> list:
        """One object per shard: its rows (pixels in memory, or parquet rows read by the
        worker that loads them)."""
        import ray

        images = image_rows(images)
        refs = [ray.put(images.slice(a, b)) for a, b in self.bounds]
        ray.get([self.directory.set.remote(k, [ref], a)
                 for k, (ref, (a, _)) in enumerate(zip(refs, self.bounds, strict=True))])
        return refs

    def submit(self, worker: int, method: str, *args, returns: int = 1):
        call = getattr(self.actors[worker], method)
        if returns != 1:
            call = call.options(num_returns=returns)
        return call.remote(*args)

    def put(self, value):
        import ray

        return ray.put(value)

    def get(self, futures: list, desc: str = "", unit: str = "block") -> list:
        return wait_all(futures, desc, self.progress and bool(desc), unit, self.watch)

    def tree(self, futures: list, keep: int = 1, fan_in: int = REDUCE_FAN_IN) -> list:
        """Sum ``futures`` by a tree of ``add`` tasks on the workers until at most ``keep``
        are left (nothing is fetched here)."""
        level = 0
        while len(futures) > keep:
            groups = [futures[k : k + fan_in] for k in range(0, len(futures), fan_in)]
            futures = [self.actors[(g * fan_in + level) % len(self.actors)].add.remote(*group)
                       for g, group in enumerate(groups)]
            level += 1
        return futures

    def reload(self, images) -> None:
        """New images on the same actors (no new placement or actor start); the directory
        holds the new shards first, so an actor restarted from now on loads them."""
        self.bounds = shard_bounds(len(images), len(self.actors), self.block, self.align)
        self.shard_refs = self._shards(images)
        self.get([a.load.remote(ref, b[0]) for a, ref, b in
                  zip(self.actors, self.shard_refs, self.bounds, strict=True)])

    def keep(self) -> None:
        """This pool now serves a model's predictions: it is released first (oldest first)
        when a new pool cannot be placed beside it."""
        _KEPT.append(weakref.ref(self))

    @property
    def closed(self) -> bool:
        return not self.actors

    def close(self) -> None:
        """Stop the actors (their shards go with them) and release their reservation; after
        the Ray session ended (their handles are gone with it), only forget them."""
        import ray
        from ray.util.placement_group import remove_placement_group

        actors, pg = [a for a in (*self.actors, self.directory) if a is not None], self.pg
        self.actors, self.shard_refs, self.pg, self.watch = [], [], None, None
        self.directory = None
        _KEPT[:] = [r for r in _KEPT if r() is not None and r() is not self]
        if not ray.is_initialized():  # never start a Ray just to stop one
            return
        for actor in actors:
            ray.kill(actor)
        if pg is not None:
            remove_placement_group(pg)


def _release_kept_for(workers: int, bundle: dict) -> None:
    """Close pools kept for predictions, oldest first, while the cluster lacks the resources
    of ``workers`` bundles beside them (a model reopens its workers when it predicts again)."""
    import ray

    def short() -> bool:
        free = ray.available_resources()
        return any(free.get(k, 0) < v * workers for k, v in bundle.items())

    while _KEPT and short():
        kept = _KEPT.pop(0)()
        if kept is not None and not kept.closed:
            log.info("released %d workers kept for an earlier model's predictions, to place "
                     "%d new ones (that model reopens workers when it predicts again)",
                     len(kept.actors), workers)
            kept.close()
            time.sleep(0.5)  # Ray frees their resources asynchronously
