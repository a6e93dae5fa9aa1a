"""The driver: starts or joins Ray, spreads image shards over workers, reduces small results."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from .workers import ShardWorker

log = logging.getLogger(__name__)


def start_ray(workers: int, address: str | None = None) -> None:
    """Join ``address`` ("auto", "ray://...") or start an embedded local Ray for ``workers``.

    The embedded instance binds to loopback with the dashboard off; Ray's token authentication
    is left as Ray configures it.
    """
    import ray

    if ray.is_initialized():
        return
    if address is None:
        ray.init(num_cpus=max(1, workers), include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


class ShardedImages:
    """Images split into contiguous shards, one per Ray actor, each shard ``ray.put`` once.

    Parameters
    ----------
    X : (n, C, H, W) images
    workers : number of actors (shards)
    threads : CPU threads per actor (None: the libraries' defaults)
    block : when given, shard boundaries fall on multiples of it, so that every block of a
        stored kernel belongs to exactly one worker
    """

    def __init__(self, X: np.ndarray, workers: int, threads: int | None = None,
                 max_restarts: int = 3, block: int | None = None):
        import ray

        if workers < 1:
            raise ValueError(f"workers must be at least 1; found {workers}")
        X = np.asarray(X)
        self.n = len(X)
        bounds = np.linspace(0, self.n, workers + 1).astype(int)
        if block:
            bounds = np.minimum(np.round(bounds / block).astype(int) * block, self.n)
            bounds[-1] = self.n
        self.bounds = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        actor = ray.remote(num_cpus=threads or 1, max_restarts=max_restarts,
                           max_task_retries=max_restarts)(ShardWorker)
        # the refs stay referenced here: a restarted actor is rebuilt from them
        self.shard_refs = [ray.put(X[a:b]) for a, b in self.bounds]
        self.actors = [actor.remote(ref, a, threads)
                       for ref, (a, b) in zip(self.shard_refs, self.bounds, strict=True)]

    def kernel(self, cols: np.ndarray, M: np.ndarray, params: dict, **kw) -> np.ndarray:
        """K(all shards, cols): each actor computes its rows; ``cols`` is put once for all."""
        import ray

        ref = ray.put(np.asarray(cols))
        rows = ray.get([a.kernel_rows.remote(ref, M, params, **kw) for a in self.actors])
        return np.concatenate(rows, axis=0)

    def kernel_via_store(self, cols: np.ndarray, M: np.ndarray, params: dict, url: str,
                         spec, name: str, **kw) -> tuple[np.ndarray, int]:
        """K(all shards, cols) through a zarr store: each worker writes its missing blocks.

        Returns the kernel, read back from the store, and how many blocks were computed now
        (0 when a previous run already stored them all).
        """
        import ray

        from ..store import KernelStore

        shape = (self.n, len(cols))
        KernelStore(url, spec).kernel(name, shape)  # create (or check) before workers write
        ref = ray.put(np.asarray(cols))
        spec_fields = dataclasses.asdict(spec)
        counts = ray.get([actor.store_kernel_rows.remote(ref, M, params, url, spec_fields, name,
                                                         shape, a, b, **kw)
                          for actor, (a, b) in zip(self.actors, self.bounds, strict=True)])
        return KernelStore(url, spec).read(name, shape), int(sum(counts))

    def map_kernel(self, rows: np.ndarray, cols: np.ndarray, M: np.ndarray, params: dict,
                   **kw) -> np.ndarray:
        """K(rows, cols) for images not held by the workers: rows split over the actors."""
        import ray

        cols_ref = ray.put(np.asarray(cols))
        parts = np.array_split(np.arange(len(rows)), len(self.actors))
        futures = [actor.kernel_pair.remote(np.asarray(rows)[idx], cols_ref, M, params, **kw)
                   for actor, idx in zip(self.actors, parts, strict=True) if len(idx)]
        return np.concatenate(ray.get(futures), axis=0)

    def nystrom_system(self, centres: np.ndarray, center_idx: np.ndarray, Y: np.ndarray,
                       M: np.ndarray, params: dict, **kw):
        """Sum of per-shard (K^T K, K^T Y) and K_mm assembled from the shards' centre rows."""
        import ray

        ref = ray.put(np.asarray(centres))
        center_idx = np.asarray(center_idx)
        mine = [center_idx[(center_idx >= a) & (center_idx < b)] for a, b in self.bounds]
        futures = [actor.normal_equations_part.remote(ref, Y[a:b], rows - a, M, params, **kw)
                   for actor, (a, b), rows in zip(self.actors, self.bounds, mine, strict=True)]
        parts = ray.get(futures)
        KtK = sum(p[0] for p in parts)
        KtY = sum(p[1] for p in parts)
        rows = np.concatenate([p[2] for p in parts], axis=0)  # in the order of concat(mine)
        position = {int(g): k for k, g in enumerate(np.concatenate(mine))}
        K_mm = rows[[position[int(g)] for g in center_idx]]
        return KtK, KtY, K_mm

    def agop(self, train: np.ndarray, coef: np.ndarray, sample_idx: np.ndarray, M: np.ndarray,
             params: dict, **kw) -> np.ndarray:
        """Patch AGOP averaged over ``sample_idx`` (global rows): per-shard sums, reduced here."""
        import ray

        train_ref, coef_ref = ray.put(np.asarray(train)), ray.put(np.asarray(coef))
        sample_idx = np.asarray(sample_idx)
        parts = []
        for actor, (a, b) in zip(self.actors, self.bounds, strict=True):
            local = sample_idx[(sample_idx >= a) & (sample_idx < b)] - a
            parts.append(actor.agop_part.remote(train_ref, coef_ref, local, M, params, **kw))
        return sum(ray.get(parts)) / len(sample_idx)

    def close(self) -> None:
        """Stop the actors (their shards go with them)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.shard_refs = []
