"""Where kernels are computed: shard workers in this process or on Ray, behind one Protocol.

``open_backend`` is the one switch: it picks the executor (``ClusterOptions.workers = 0``: one
in-process shard worker; N > 0: N Ray actors) and returns the one ``ShardedBackend`` over it,
which implements ``protocol.KernelBackend``. Both executors run the same worker code.
"""

from __future__ import annotations

import torch

from ray_convrfm.backends.protocol import KernelBackend, KernelSpec
from ray_convrfm.backends.sharded import ShardedBackend
from ray_convrfm.data.rows import ImageRows, image_rows
from ray_convrfm.kernels.threads import configure_threads
from ray_convrfm.options import Options

__all__ = ["KernelBackend", "KernelSpec", "ShardedBackend", "open_backend", "open_executor"]


def open_executor(X: ImageRows, options: Options, device: torch.device):
    """Shard workers holding images ``X`` (rows as stored: in memory, or parquet rows that Ray
    workers read themselves): in process without ``cluster.workers``, else Ray actors
    (block-aligned shards when there is a kernel store)."""
    cluster = options.cluster
    if not cluster.workers:
        from ray_convrfm.backends.executor import InProcessExecutor

        return InProcessExecutor(X, gpus=1 if device.type == "cuda" else 0,
                                 progress=options.verbose)
    from ray_convrfm.backends.ray_executor import RayExecutor, resolve_gpus_per_worker, start_ray

    start_ray(cluster.workers, cluster.address)
    return RayExecutor(X, cluster.workers, threads=cluster.threads_per_worker,
                       max_restarts=cluster.max_restarts, block=options.store.block,
                       align=bool(options.store.url), elastic=bool(cluster.address),
                       gpus_per_worker=resolve_gpus_per_worker(cluster.gpus_per_worker),
                       placement_timeout_s=cluster.placement_timeout_s,
                       recovery_timeout_s=cluster.recovery_timeout_s,
                       store=options.store.url, progress=options.verbose)


def open_backend(X, options: Options, device: torch.device) -> ShardedBackend:
    """The backend over shard workers holding training images ``X``; this process's thread
    pools are sized here, once (``kernels.threads``), for the work in process and the driver's."""
    configure_threads(options.compute.threads)
    X = image_rows(X)
    ex = open_executor(X, options, device)
    return ShardedBackend(ex, device, len(X), X.row_shape, block=options.store.block,
                          align=not options.cluster.workers or bool(options.store.url),
                          solve=options.solve, progress=options.verbose)
