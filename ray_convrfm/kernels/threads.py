"""The one place that decides this process's thread pools: torch's, numba's and the BLAS ones.

A process here holds up to five pools: torch's OpenMP and MKL (one setting), numba's, and the
OpenBLAS copies that numpy and scipy bundle. Each sizes itself to every core and busy-waits a
while after its work, so on a small machine two of them fight: a 1,350 x 1,350 ``eigh`` took
1.3 s in a fresh process and 21.8 s right after numpy had run a product (issue 24). So:

- dense linear algebra (Cholesky, eigh, triangular solves, the large products) runs in torch,
  whose intra-op threads and numba's are both set to ``threads``;
- numpy's and scipy's BLAS get one thread: they only do small products here, and a second pool
  of spinning threads costs more than it gives.

``configure_threads`` is called once per process by whoever computes: ``backends.open_backend``
(the estimators' in-process work and a Ray driver), each Ray shard worker with its
``ClusterOptions.threads_per_worker``, and the CLI (``--threads``). ``worker_environment`` gives
the same numbers as environment variables, so a Ray worker's libraries start their pools at that
size instead of one thread per core of the node.
"""

from __future__ import annotations

import os

#: Threads of numpy's and scipy's BLAS pools: dense linear algebra goes through torch.
BLAS_THREADS = 1

_configured: int | None = None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or Ray's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None) -> int:
    """Size this process's pools: torch's and numba's to ``threads`` (None: every available
    CPU), numpy's and scipy's BLAS to ``BLAS_THREADS``. Returns the threads chosen.

    Cheap to call again: the pools are only touched when the number changes.
    """
    global _configured
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads must be a positive integer or None; found {threads!r}")
    n = threads or available_cpus()
    if n == _configured:
        return n
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(limits=BLAS_THREADS, user_api="blas")
    _configured = n
    return n


def configured_threads() -> int | None:
    """The threads ``configure_threads`` last chose in this process (None: never called)."""
    return _configured


def pool_sizes() -> dict[str, int]:
    """Threads of each pool in this process: torch's, numba's (in use, and launched), and the
    largest BLAS pool threadpoolctl finds (numpy's, scipy's OpenBLAS)."""
    import numba
    import torch
    from threadpoolctl import threadpool_info

    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    return {"torch": torch.get_num_threads(), "numba": numba.get_num_threads(),
            "numba_launched": numba.config.NUMBA_NUM_THREADS, "blas": max(blas, default=0)}


def worker_environment(threads: int) -> dict[str, str]:
    """Environment variables that make a new process's pools start at ``threads`` threads
    (numba sizes its pool once, at import, from ``NUMBA_NUM_THREADS``)."""
    t = str(int(threads))
    return {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "NUMBA_NUM_THREADS": t,
            "OPENBLAS_NUM_THREADS": str(BLAS_THREADS)}
