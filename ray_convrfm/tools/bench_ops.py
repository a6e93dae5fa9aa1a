"""``ray-convrfm bench ops``: every hot operation of a fit timed at 1 and 2 threads, with outliers.

CPU figures here once swung by 5x and more from one call to the next (torch's parallel im2col
took 1-11 s for a 10 ms extraction; an ``eigh`` slowed 17x beside another library's spinning
BLAS pool; issue 24), and a median alone hides that. So each operation is repeated, the thread
counts are interleaved (so both see the same machine), and the table shows the median and the
maximum and flags any operation whose maximum exceeds ``OUTLIER_RATIO`` x its median.
Beside them, the CPU engine's kernel is set against this machine's measured fp32 peak (a large
GEMM): its effective FLOP/s, counted with the cost model's FLOPs per entry, as a share of it.

The shapes are the default main job's (``ray-convrfm fit`` with no arguments: digits in a
14 x 14 noise frame, 1,350 fit images, depth 3, 3 x 3 patches, 256 AGOP samples, 150
validation images, 10 classes).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ray_convrfm.kernels.agop import Workspace, agop_from_sides
from ray_convrfm.kernels.devices import resolve_engine
from ray_convrfm.kernels.kernel import (
    KernelParams,
    kernel_block_adjoint,
    kernel_matrix,
    prepare_side,
)
from ray_convrfm.kernels.patches import extract_patches
from ray_convrfm.kernels.solvers import kernel_scale, solve_ridge
from ray_convrfm.kernels.threads import configure_threads
from ray_convrfm.options import DEFAULT_MEMORY_BUDGET_MB
from ray_convrfm.tools.costmodel import Workload

#: A maximum over this many times the median marks an operation as having outliers.
OUTLIER_RATIO = 3.0
#: The side of the square fp32 GEMM whose best time stands for the machine's peak.
PEAK_GEMM_SIZE = 4096
#: FLOPs of each timed kernel block (sets its images per side: about a second at 2 threads).
SHARE_BLOCK_FLOPS = 1.5e10


@dataclass(frozen=True)
class OpTiming:
    """Seconds of one operation at one thread count, over ``runs`` repeats."""

    name: str
    threads: int
    median_s: float
    max_s: float
    runs: int

    @property
    def outlier(self) -> bool:
        return self.max_s > OUTLIER_RATIO * self.median_s


def hot_operations(n_fit: int = 1350, n_patches: int = 1500, n_val: int = 150,
                   samples: int = 256, size: int = 14, depth: int = 3, patch_size: int = 3,
                   classes: int = 10, ridges: tuple[float, ...] = (1e-8, 1e-5, 1e-3),
                   engine: str = "auto", seed: int = 0) -> dict[str, Callable[[], object]]:
    """The operations one fit iteration runs, on the main job's shapes (float32, CPU)."""
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    eng = resolve_engine(engine, torch.device("cpu"))
    params = KernelParams(depth, patch_size, False)
    X = torch.from_numpy(rng.random((max(n_fit, n_patches), 1, size, size), dtype=np.float32))
    d = patch_size**2
    A = torch.from_numpy(rng.standard_normal((d, d)).astype(np.float32))
    M = A @ A.T / d
    xs = prepare_side(X[:n_fit], M, params)
    sample = xs.take(rng.choice(n_fit, samples, replace=False))
    val = prepare_side(X[:n_val], M, params)
    coef = torch.from_numpy(rng.standard_normal((n_fit, classes)).astype(np.float32))
    K = kernel_matrix(xs, xs, eng, DEFAULT_MEMORY_BUDGET_MB, symmetric=True).to(torch.float64)
    K /= kernel_scale(K)
    Y = torch.nn.functional.one_hot(torch.from_numpy(rng.integers(0, classes, n_fit)),
                                    classes).to(torch.float64)
    alphas = [solve_ridge(K, Y, r) for r in ridges]
    workspace = Workspace()
    budget = DEFAULT_MEMORY_BUDGET_MB
    images = X[:n_patches]
    return {
        f"patches ({n_patches} images)": lambda: extract_patches(images, patch_size, False),
        "im2col (F.unfold, the former path)": lambda: F.unfold(images, patch_size),
        f"prepare side ({n_fit} images)": lambda: prepare_side(X[:n_fit], M, params),
        f"kernel ({n_fit} x {n_fit}, symmetric)":
            lambda: kernel_matrix(xs, xs, eng, budget, symmetric=True),
        f"adjoint block ({n_fit} x {samples})":
            lambda: kernel_block_adjoint(xs, sample, coef, eng),
        f"AGOP ({n_fit} x {samples}, {classes} classes)":
            lambda: agop_from_sides(xs, coef, sample, M, engine=eng, budget_mb=budget,
                                    workspace=workspace),
        f"solve ({n_fit}, {len(ridges)} ridges, Cholesky)":
            lambda: [solve_ridge(K, Y, r) for r in ridges],
        f"held-out scores ({n_val} x {n_fit}, {len(ridges)} ridges)":
            lambda: held_out_scores(val, xs, eng, budget, alphas),
    }


def held_out_scores(val, xs, engine: str, budget: int, alphas: list) -> list[torch.Tensor]:
    """Validation scores of every ridge's coefficients from one kernel, as a fit scores them."""
    K = kernel_matrix(val, xs, engine, budget).to(torch.float64)
    return [K @ a for a in alphas]


def time_operations(ops: dict[str, Callable[[], object]], threads: tuple[int, ...] = (1, 2),
                    repeats: int = 7) -> list[OpTiming]:
    """Median and maximum seconds of each operation at each thread count; the thread counts
    take turns within every repeat, so that they share the machine's conditions."""
    out = []
    for name, fn in ops.items():
        times: dict[int, list[float]] = {t: [] for t in threads}
        for t in threads:  # warm-up: JIT compilation (or its cache) and the allocator
            configure_threads(t)
            fn()
        for _ in range(repeats):
            for t in threads:
                configure_threads(t)
                t0 = time.perf_counter()
                fn()
                times[t].append(time.perf_counter() - t0)
        out += [OpTiming(name, t, float(np.median(ts)), max(ts), len(ts))
                for t, ts in times.items()]
    return out


def main_job_stages(threads: int | None = None) -> dict:
    """The default main job (``ray-convrfm fit`` with no arguments) fitted here: its seconds
    per stage over the iterations (median and max), the fit's seconds and its accuracies."""
    from ray_convrfm.data.datasets import load_dataset
    from ray_convrfm.models.convrfm import ConvRFM
    from ray_convrfm.options import Options

    ds = load_dataset("digits-noise")
    configure_threads(threads)
    t0 = time.perf_counter()
    model = ConvRFM(options=Options.of(threads=threads)).fit(
        ds.X_train, ds.y_train, monitor=(ds.X_test, ds.y_test))
    seconds = time.perf_counter() - t0
    hist = model.history_
    # the last iteration computes no AGOP (its seconds are 0): only stages that ran count
    stages = {s: [h[f"seconds_{s}"] for h in hist if h[f"seconds_{s}"] > 0] or [0.0]
              for s in ("kernel", "solve", "agop")}
    return {"seconds_fit": seconds, "iterations": len(hist),
            "stages": {s: {"median_s": float(np.median(v)), "max_s": float(max(v))}
                       for s, v in stages.items()},
            "fixed_kernel_acc": hist[0]["monitor_acc"],
            "test_acc": hist[model.best_iter_]["monitor_acc"], "best_iter": model.best_iter_}


@dataclass(frozen=True)
class KernelShare:
    """The kernel's effective fp32 FLOP/s on ``size`` x ``size`` images at ``threads`` threads,
    against the best fp32 GEMM rate at the same thread count."""

    size: int
    threads: int
    images: int
    entries_per_s: float
    flops_per_entry: float
    peak_flops: float

    @property
    def flops_per_s(self) -> float:
        return self.entries_per_s * self.flops_per_entry

    @property
    def share(self) -> float:
        return self.flops_per_s / self.peak_flops


def gemm_peak(threads: int, size: int = PEAK_GEMM_SIZE, repeats: int = 3) -> float:
    """fp32 FLOP/s of the best of ``repeats`` square products (torch's BLAS) at ``threads``."""
    configure_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen) for _ in range(2))
    a @ b  # warm-up: the pool and the pages
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def kernel_shares(sizes: tuple[int, ...] = (14, 42), threads: tuple[int, ...] = (1, 2),
                  depth: int = 3, patch_size: int = 3, repeats: int = 3,
                  block_flops: float = SHARE_BLOCK_FLOPS, peak_size: int = PEAK_GEMM_SIZE,
                  engine: str = "auto", seed: int = 0) -> list[KernelShare]:
    """The kernel block's share of the fp32 peak for each image size and thread count; each
    block is n x n with n chosen so that it costs about ``block_flops``."""
    eng = resolve_engine(engine, torch.device("cpu"))
    peaks = {t: gemm_peak(t, peak_size) for t in threads}
    params = KernelParams(depth, patch_size, False)
    rng = np.random.default_rng(seed)
    out = []
    for size in sizes:
        per_entry = Workload(n=1, m=1, channels=1, height=size, width=size,
                             patch_size=patch_size, depth=depth).flops_per_entry()
        n = max(2, int(math.sqrt(block_flops / per_entry)))
        X = torch.from_numpy(rng.random((2 * n, 1, size, size), dtype=np.float32))
        M = torch.eye(patch_size**2)  # the first iteration's metric
        left, right = prepare_side(X[:n], M, params), prepare_side(X[n:], M, params)
        block = functools.partial(kernel_matrix, left, right, eng, DEFAULT_MEMORY_BUDGET_MB)
        rows = time_operations({"kernel": block}, threads, repeats)
        out += [KernelShare(size, r.threads, n, n * n / r.median_s, per_entry, peaks[r.threads])
                for r in rows]
    return out


def format_shares(rows: list[KernelShare]) -> str:
    """The kernel's shares of the peak as a table."""
    head = ("image    threads  block        entries/s  GFLOP/s  peak GFLOP/s  share")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.size:>2} x {r.size:<2}  {r.threads:>7}  {r.images:>4} x {r.images:<4}"
                     f"  {r.entries_per_s:>11,.0f}  {r.flops_per_s / 1e9:>7.1f}  "
                     f"{r.peak_flops / 1e9:>12.1f}  {100 * r.share:>4.1f} %")
    return "\n".join(lines)


def format_ops(rows: list[OpTiming]) -> str:
    """The timings as a table, one line per operation and thread count."""
    width = max(len(r.name) for r in rows)
    head = f"{'operation':<{width}}  threads  median ms     max ms  max/median"
    lines = [head, "-" * len(head)]
    for r in rows:
        flag = f"  <- max over {OUTLIER_RATIO:g} x median" if r.outlier else ""
        lines.append(f"{r.name:<{width}}  {r.threads:>7}  {1e3 * r.median_s:>9.1f}  "
                     f"{1e3 * r.max_s:>9.1f}  {r.max_s / r.median_s:>10.2f}{flag}")
    return "\n".join(lines)


def format_stages(job: dict) -> str:
    """The main job's stage seconds as lines of text."""
    lines = [f"main job: fit {job['seconds_fit']:.1f} s, {job['iterations']} iterations; "
             f"fixed kernel {100 * job['fixed_kernel_acc']:.2f} %, ConvRFM "
             f"{100 * job['test_acc']:.2f} % (iteration {job['best_iter']})"]
    for stage, s in job["stages"].items():
        flag = f"  <- max over {OUTLIER_RATIO:g} x median" \
            if s["max_s"] > OUTLIER_RATIO * s["median_s"] else ""
        lines.append(f"  {stage:<7} per iteration: median {s['median_s']:.2f} s, "
                     f"max {s['max_s']:.2f} s{flag}")
    return "\n".join(lines)
