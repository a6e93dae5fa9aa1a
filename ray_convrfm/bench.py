"""Throughput of the kernel and the AGOP on a standard shape (``ray-convrfm bench``)."""

from __future__ import annotations

import time

import numpy as np
import torch

from .agop import Workspace, patch_agop
from .devices import resolve_device, resolve_dtype, resolve_engine
from .kernel import KernelParams, kernel_block, prepare_side


def _interleaved_medians(fns, repeats: int) -> list[float]:
    """Median seconds of each function, run in turns so they share the machine's conditions."""
    for fn in fns:
        fn()  # warm-up: JIT compilation (or loading it from the cache) and allocator
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times]


def kernel_and_agop_throughput(size: int = 42, channels: int = 1, depth: int = 3,
                               patch_size: int = 3, n_train: int = 1024, n_sample: int = 256,
                               classes: int = 10, dtype: str = "float32", device: str = "auto",
                               engine: str = "auto", repeats: int = 5, seed: int = 0) -> dict:
    """Time one kernel block K(train, sample) and the AGOP that differentiates it.

    The default block is what a fit differentiates: ``agop_samples`` = 256 sample images against
    a chunk of 1,024 training images. (Smaller blocks pay relatively more for the parts of the
    AGOP that scale with only one side: weighting the training patches, the Gram of the
    gradients; 256 x 64 costs about 3.5 times its kernel block instead of about 2.6.)

    Returns entries per second of the kernel, image pairs per second of the AGOP and the ratio
    AGOP seconds / kernel seconds for the same block (medians over ``repeats``, the two timed
    in turns so both see the same load).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    eng = resolve_engine(engine, dev)
    rng = np.random.default_rng(seed)
    params = KernelParams(depth, patch_size, False)
    X = torch.from_numpy(rng.random((n_train, channels, size, size), dtype=np.float32)).to(dev, dt)
    Z = torch.from_numpy(rng.random((n_sample, channels, size, size), dtype=np.float32)).to(dev, dt)
    d = channels * patch_size**2
    A = torch.from_numpy(rng.standard_normal((d, d))).to(dev, dt)
    M = A @ A.T / d
    xs, zs = prepare_side(X, M, params), prepare_side(Z, M, params)
    coef = torch.from_numpy(rng.standard_normal((n_train, classes))).to(dev, dt)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run_kernel():
        kernel_block(xs, zs, eng)
        sync()

    workspace = Workspace()  # as in a fit: scratch buffers persist across AGOP calls

    def run_agop():
        patch_agop(xs, coef, zs, M, engine=eng, budget_mb=1024, workspace=workspace)
        sync()

    t_kernel, t_agop = _interleaved_medians([run_kernel, run_agop], repeats)
    pairs = n_train * n_sample
    return {
        "shape": f"{channels}x{size}x{size}", "depth": depth, "patch_size": patch_size,
        "dtype": dtype, "device": str(dev), "engine": eng, "threads": torch.get_num_threads(),
        "pairs": pairs, "classes": classes,
        "kernel_seconds": t_kernel, "kernel_entries_per_s": pairs / t_kernel,
        "agop_seconds": t_agop, "agop_pairs_per_s": pairs / t_agop,
        "agop_over_kernel": t_agop / t_kernel,
    }


def distributed_kernel_scaling(X: np.ndarray, workers: tuple[int, ...] = (1, 2), depth: int = 3,
                               patch_size: int = 3, gpus_per_worker: float = 0,
                               address: str | None = None) -> list[dict]:
    """Kernel stage K(X, X) on Ray shard workers (one thread each), for each worker count.

    As in a fit, the columns are the workers' own shards, passed worker to worker. Reports
    wall seconds, entries per second, the speed-up over the first count, and the driver's own
    CPU time as a share of the wall time (it should only schedule and gather).
    """
    import ray

    from .distributed import ShardedImages, start_ray

    started_here = not ray.is_initialized()
    start_ray(max(workers), address)
    params = {"depth": depth, "patch_size": patch_size, "padding": False}
    M = np.eye(X.shape[1] * patch_size**2, dtype=np.float32)
    rows = []
    try:
        for w in workers:
            with ShardedImages(X, w, threads=1, gpus_per_worker=gpus_per_worker) as shards:
                shards.kernel(X[:4], M, params)  # warm-up: workers load the compiled kernel
                cpu0, t0 = time.process_time(), time.perf_counter()
                K = shards.kernel(shards.parts(), M, params)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            rows.append({"workers": w, "seconds": wall, "entries_per_s": K.size / wall,
                         "driver_cpu_share": cpu / wall,
                         "speedup": rows[0]["seconds"] / wall if rows else 1.0})
    finally:
        if started_here:
            ray.shutdown()
    return rows
