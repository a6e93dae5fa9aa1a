"""Where kernels are computed: in this process or on Ray shard workers, behind one Protocol.

``open_backend`` is the one switch: ``ClusterOptions.workers = 0`` gives ``LocalBackend``,
N > 0 a ``RayBackend`` over N shard workers. Both implement ``protocol.KernelBackend``.
"""

from __future__ import annotations

import torch

from ray_convrfm.backends.protocol import KernelBackend, KernelSpec
from ray_convrfm.kernels.threads import configure_threads
from ray_convrfm.options import Options

__all__ = ["KernelBackend", "KernelSpec", "open_backend"]


def open_backend(X, options: Options, device: torch.device) -> KernelBackend:
    """A backend holding training images ``X``: a tensor in the working dtype, or parquet rows
    (``data.parquet.ParquetRows``) that Ray workers read themselves. This process's thread
    pools are sized here, once (``kernels.threads``), for the work in process and the driver's."""
    configure_threads(options.compute.threads)
    if options.cluster.workers:
        from ray_convrfm.backends.distributed import RayBackend

        return RayBackend.open(X, options, device)
    from ray_convrfm.backends.local import LocalBackend

    if hasattr(X, "load"):  # parquet rows without workers: read them here
        X = torch.from_numpy(X.load())
    return LocalBackend(X.to(device), progress=options.verbose, block=options.store.block,
                        solve=options.solve)
