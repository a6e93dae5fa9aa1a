"""What a distributed Nystrom ConvRFM fit costs, stage by stage, and how long it will take.

``Workload`` describes a fit (n, m, image shape, patch size, depth, workers, ...) and counts,
per stage, the kernel entries, floating-point operations, bytes moved and stored, and memory
per worker and in the driver. ``Rates`` are per-worker costs, given: measured on one machine by
``ray_convrfm.tools.bench.measure_rates`` (a kernel block and its AGOP at the run's image shape,
a float64 GEMM, a Cholesky, PNG decoding, zarr block writes), taken from a finished run
(``calibrated``) or assumed (``ClusterAssumptions``). ``predict`` combines the two into wall
seconds per stage. This module only does arithmetic: it measures nothing and imports nothing
heavier than the standard library. ``ray-convrfm bench scale`` runs a real fit next to the
prediction, and ``docs/scaling.md`` extrapolates to ImageNet.

The kernel's cost per entry follows docs/math.md section 2: 2 P_1 r for the patch products of the
first layer (r = d = C q^2, or the patch-span dimension), and per position of every layer a
ReLU step (about ``RELU_FLOPS``) and, between layers, q x q window sums of three covariances and
theta (4 q^2 adds).
"""

from __future__ import annotations

import dataclasses
import math

from ray_convrfm.options import DEFAULT_BLOCK, DEFAULT_MEMORY_BUDGET_MB, REDUCE_FAN_IN

#: Floating-point operations of one ReLU step of the kernel at one position (cosine, square
#: root, polynomial arccos, sine from the cosine, the theta update).
RELU_FLOPS = 30

#: Bytes of a Python/torch/numba/Ray worker before it holds any data (measured: about 0.45 GB).
WORKER_BASE_BYTES = 450 * 2**20


@dataclasses.dataclass(frozen=True)
class Workload:
    """One Nystrom ConvRFM fit: n training images, m centers, ``iters`` kernels."""

    n: int
    m: int
    channels: int
    height: int
    width: int
    patch_size: int = 3
    depth: int = 3
    workers: int = 2
    iters: int = 2
    agop_samples: int = 256
    classes: int = 10
    ridges: int = 3
    val_fraction: float = 0.1
    n_test: int = 0
    basis_dim: int | None = None  # r < d when the patches span fewer dimensions
    dtype_bytes: int = 4
    block: int = DEFAULT_BLOCK
    # memory_budget_mb: the kernel's and AGOP's working memory
    budget_bytes: int = DEFAULT_MEMORY_BUDGET_MB * 2**20

    @property
    def d(self) -> int:
        return self.channels * self.patch_size**2

    @property
    def r(self) -> int:
        return self.basis_dim or self.d

    @property
    def n_val(self) -> int:
        return int(round(self.val_fraction * self.n))

    @property
    def n_fit(self) -> int:
        return self.n - self.n_val

    def positions(self) -> list[int]:
        """Patch positions at every layer (stride 1, no padding)."""
        q = self.patch_size
        h, w = self.height - q + 1, self.width - q + 1
        out = []
        for _ in range(self.depth):
            out.append(h * w)
            h, w = h - q + 1, w - q + 1
        return out

    def flops_per_entry(self) -> float:
        """Floating-point operations of one kernel entry (docs/math.md section 2)."""
        P = self.positions()
        q2 = self.patch_size**2
        return 2 * P[0] * self.r + RELU_FLOPS * sum(P) + 4 * q2 * sum(P[1:]) + 2 * P[-1]

    def side_bytes(self, images: int) -> float:
        """Memory of a prepared kernel side (patches, M-transformed patches, norms)."""
        P = self.positions()
        return images * (2 * P[0] * self.r + 2 * sum(P)) * self.dtype_bytes

    def stages(self) -> dict[str, dict]:
        """Per stage: kernel entries, FLOPs, bytes moved between processes, bytes stored,
        and the peak memory it needs per worker and in the driver."""
        n, m, w, c = self.n_fit, self.m, self.workers, self.classes
        pixels = self.channels * self.height * self.width
        shard = math.ceil(n / w)
        f = self.flops_per_entry()
        entries_k = n * m
        # a worker holds its shard's pixels, the prepared centers, one prepared block of its
        # rows with their kernel rows (float32 and float64), the kernel's working memory
        # (the budget) and the running m x m Gram
        kernel_worker = (WORKER_BASE_BYTES + shard * pixels * 4 + self.side_bytes(m)
                         + self.side_bytes(self.block) + self.budget_bytes
                         + self.block * m * (self.dtype_bytes + 8) + 2 * m * m * 8)
        per_iter = {
            "kernel K(train, centers)": {
                "entries": entries_k, "flops": entries_k * f,
                "bytes_moved": w * m * pixels * 4,  # the centers, to every worker
                "bytes_stored": entries_k * self.dtype_bytes,
                "worker_memory": kernel_worker, "driver_memory": 0},
            "Gram K^T K, K^T Y (float64)": {
                "entries": 0, "flops": 2 * n * m * (m + c),
                "bytes_moved": 0, "bytes_stored": 0,
                "worker_memory": kernel_worker, "driver_memory": 0},
            "reduction of the m x m parts": {
                "entries": 0, "flops": w * m * (m + c),
                "bytes_moved": w * m * (m + c) * 8, "bytes_stored": 0,
                "worker_memory": 0, "driver_memory": 3 * m * m * 8},
            "validation kernel": {
                "entries": self.n_val * m, "flops": self.n_val * m * f,
                "bytes_moved": self.n_val * pixels * 4 + self.n_val * m * self.dtype_bytes,
                "bytes_stored": 0, "worker_memory": kernel_worker,
                "driver_memory": self.n_val * (pixels * 4 + m * 8)},
            "solve (Cholesky, every ridge)": {
                "entries": 0, "flops": self.ridges * (m**3 / 3 + 2 * m * m * c + 3 * m * m),
                "bytes_moved": 0, "bytes_stored": 0, "worker_memory": 0,
                "driver_memory": 5 * m * m * 8},
            "AGOP": {
                "entries": self.agop_samples * m, "flops": None,
                "bytes_moved": w * m * (pixels * 4 + c * self.dtype_bytes) + w * self.r**2 * 8,
                "bytes_stored": 0, "worker_memory": kernel_worker, "driver_memory": 0},
        }
        once = {
            "load (read + decode parquet)": {
                "entries": 0, "flops": 0, "bytes_moved": 0, "bytes_stored": 0,
                "worker_memory": WORKER_BASE_BYTES + shard * pixels * 4, "driver_memory": 0},
            "predict (test shards)": {
                "entries": self.n_test * m, "flops": self.n_test * m * f,
                "bytes_moved": w * m * pixels * 4 + self.n_test * c * 8, "bytes_stored": 0,
                "worker_memory": WORKER_BASE_BYTES + self.side_bytes(m), "driver_memory": 0},
        }
        return {"per_iteration": per_iter, "once": once}


@dataclasses.dataclass(frozen=True)
class Rates:
    """Costs measured on one worker (one thread or one GPU).

    kernel_entry_s : seconds per kernel entry at the workload's image shape
    agop_over_kernel : AGOP seconds / kernel seconds on the same block of pairs
    gemm_flops : float64 GEMM FLOP/s (the Gram of the kernel rows)
    cholesky_flops : float64 FLOP/s of a Cholesky in the driver
    decode_images_per_s : images a worker reads and decodes per second
    store_bytes_per_s : bytes of kernel blocks a worker writes and reads back per second
    worker_start_s : seconds to start a set of shard workers (processes, imports, placement)
    network_bytes_per_s : bytes per second one transfer of a partial result moves
    """

    kernel_entry_s: float
    agop_over_kernel: float
    gemm_flops: float
    cholesky_flops: float
    decode_images_per_s: float
    store_bytes_per_s: float
    worker_start_s: float = 0.0
    network_bytes_per_s: float = 2e9  # object store transfers (same machine: memory copies)

    def scaled(self, workload_from: Workload, workload_to: Workload,
               kernel_flops_per_s: float | None = None) -> Rates:
        """These rates for another image shape (kernel cost in proportion to its FLOPs), or,
        with ``kernel_flops_per_s``, for a device with that effective kernel FLOP rate."""
        if kernel_flops_per_s is None:
            entry = self.kernel_entry_s * (workload_to.flops_per_entry()
                                           / workload_from.flops_per_entry())
        else:
            entry = workload_to.flops_per_entry() / kernel_flops_per_s
        return dataclasses.replace(self, kernel_entry_s=entry)


def predict(work: Workload, rates: Rates, store: bool = True) -> dict[str, float]:
    """Wall seconds of every stage of the fit (all iterations) with ``work.workers`` workers
    in parallel; the solve runs in the driver. Keys as in ``Workload.stages``, plus "total"."""
    st = work.stages()
    it, w = work.iters, work.workers
    per = st["per_iteration"]
    shard = math.ceil(work.n_fit / w)
    kernel = shard * work.m * rates.kernel_entry_s
    if store:
        kernel += shard * work.m * work.dtype_bytes / rates.store_bytes_per_s
    out = {
        "load (read + decode parquet)": rates.worker_start_s + shard / rates.decode_images_per_s,
        "kernel K(train, centers)": it * kernel,
        "Gram K^T K, K^T Y (float64)": it * per["Gram K^T K, K^T Y (float64)"]["flops"] / w
        / rates.gemm_flops,
        "reduction of the m x m parts": it * _reduction_seconds(work, rates),
        "validation kernel": it * math.ceil(work.n_val / w) * work.m * rates.kernel_entry_s,
        "solve (Cholesky, every ridge)": it * per["solve (Cholesky, every ridge)"]["flops"]
        / rates.cholesky_flops,
        # the AGOP is taken after every iteration but the last
        "AGOP": (it - 1) * math.ceil(work.agop_samples / w) * work.m * rates.kernel_entry_s
        * rates.agop_over_kernel,
        "predict (test shards)": rates.worker_start_s
        + math.ceil(work.n_test / w) * work.m * rates.kernel_entry_s,
    }
    out["total"] = sum(out.values())
    return out


def calibrated(run: dict, target: Workload, fresh: Rates) -> Rates:
    """Rates for ``target`` from a measured run (``bench scale`` JSON): the kernel's per-entry
    cost as the run's kernel stage achieved it (all workers busy at once, store writes and
    task overheads included), scaled to ``target``'s shape by FLOPs per entry, and the AGOP's
    cost relative to it; the other rates from ``fresh`` measurements."""
    work = Workload(**run["workload"])
    rates = Rates(**run["rates"])
    shard = math.ceil(work.n_fit / work.workers)
    gram = (2 * shard * work.m * (work.m + work.classes)) / rates.gemm_flops
    store = shard * work.m * work.dtype_bytes / rates.store_bytes_per_s
    kernel_stage = run["measured"]["kernel K(train, centers)"] / work.iters - gram - store
    entry = kernel_stage / (shard * work.m)
    agop_entries = (work.iters - 1) * math.ceil(work.agop_samples / work.workers) * work.m
    agop_ratio = run["measured"]["AGOP"] / (agop_entries * entry) if agop_entries else \
        rates.agop_over_kernel
    scale = target.flops_per_entry() / work.flops_per_entry()
    return dataclasses.replace(fresh, kernel_entry_s=entry * scale, agop_over_kernel=agop_ratio)


def _reduction_seconds(work: Workload, rates: Rates, fan_in: int = REDUCE_FAN_IN) -> float:
    """The driver's tree of sums: each level moves up to ``fan_in`` m x (m + c) float64 parts
    into one receiver, which adds them; levels run one after another."""
    part = work.m * (work.m + work.classes) * 8
    levels = max(1, math.ceil(math.log(max(work.workers, 2), fan_in)))
    per_level = fan_in * part / rates.network_bytes_per_s + fan_in * part / 8 / rates.gemm_flops
    return levels * per_level


def memory(work: Workload) -> dict[str, float]:
    """Peak bytes per worker and in the driver over all stages."""
    st = work.stages()
    rows = [*st["per_iteration"].values(), *st["once"].values()]
    return {"worker": max(r["worker_memory"] for r in rows),
            "driver": max(r["driver_memory"] for r in rows) + WORKER_BASE_BYTES}


def storage(work: Workload) -> float:
    """Bytes of kernel blocks a fit stores (one n x m kernel per iteration)."""
    return work.iters * work.n_fit * work.m * work.dtype_bytes


@dataclasses.dataclass(frozen=True)
class ClusterAssumptions:
    """What a cloud GPU cluster is assumed to deliver where nothing was measured on one.

    The kernel is element-wise work over (pairs x positions) arrays, bound by memory
    bandwidth on a GPU: at about 30 FLOPs per 8 bytes moved, an H100's 3.35 TB/s bounds it near
    12 TFLOP/s, so 10 TFLOP/s effective is assumed (15 % of the FP32 peak).
    """

    gpu_kernel_flops: float = 10e12
    gpu_gemm_flops: float = 40e12  # FP64 tensor-core GEMM (67 TFLOP/s peak on an H100)
    head_cholesky_flops: float = 0.5e12  # FP64 Cholesky on a 16-32 core CPU head node
    decode_images_per_s: float = 4 * 400  # 4 CPU cores per GPU decoding JPEG 224 or PNG 64
    store_bytes_per_s: float = 200e6  # object-storage writes per worker
    network_bytes_per_s: float = 12.5e9  # 100 Gbit/s between nodes
    worker_start_s: float = 60.0  # warm nodes; an autoscaler starting nodes adds minutes
    reference_classes: int = 10  # the class count the AGOP ratio was measured with


IMAGENET_TRAIN = 1_281_167
IMAGENET_VAL = 50_000


def imagenet_rows(measured: Rates, assume: ClusterAssumptions = ClusterAssumptions(),
                  sizes: tuple[int, ...] = (64, 224), gpus: tuple[int, ...] = (8, 64, 512),
                  m: int = 64_000, classes: int = 1000,
                  val_fraction: float = 0.01) -> list[dict]:
    """Predicted seconds per stage of one ConvRFM iteration on ImageNet (plus the one-off
    load and prediction), storage and memory, for every image size and GPU count.

    The validation rows live in the driver, so ImageNet holds out 1 % (12,800 images) rather
    than the default 10 %, which at 224 x 224 would be 77 GB of pixels in the driver."""
    rows = []
    for size in sizes:
        for w in gpus:
            work = Workload(n=IMAGENET_TRAIN, m=m, channels=3, height=size, width=size,
                            workers=w, iters=1, classes=classes, n_test=IMAGENET_VAL,
                            val_fraction=val_fraction)
            rates = Rates(
                kernel_entry_s=work.flops_per_entry() / assume.gpu_kernel_flops,
                agop_over_kernel=measured.agop_over_kernel * classes / assume.reference_classes,
                gemm_flops=assume.gpu_gemm_flops, cholesky_flops=assume.head_cholesky_flops,
                decode_images_per_s=assume.decode_images_per_s,
                store_bytes_per_s=assume.store_bytes_per_s,
                worker_start_s=assume.worker_start_s,
                network_bytes_per_s=assume.network_bytes_per_s)
            seconds = predict(dataclasses.replace(work, iters=2), rates)
            one = predict(work, rates)
            # one iteration = (two-iteration run) - (one-iteration run), which adds the AGOP
            per_iter = {k: seconds[k] - one[k] for k in seconds if k != "total"}
            mem = memory(work)
            rows.append({"size": size, "gpus": w, "flops_per_entry": work.flops_per_entry(),
                         "per_iteration": per_iter,
                         "iteration_s": sum(per_iter.values()),
                         "load_s": one["load (read + decode parquet)"],
                         "predict_s": one["predict (test shards)"],
                         "store_bytes_per_iteration": storage(work),
                         "worker_bytes": mem["worker"], "driver_bytes": mem["driver"],
                         "centers_side_bytes": work.side_bytes(m)})
    return rows


def _fmt_s(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def imagenet_table(rows: list[dict]) -> str:
    """Markdown table of ``imagenet_rows``."""
    out = ["| image | GPUs | kernel + Gram | AGOP | solve | reduction | one iteration | "
           "load | predict 50k | stored / iteration | worker memory | driver memory |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        p = r["per_iteration"]
        out.append(
            f"| 3 x {r['size']} x {r['size']} | {r['gpus']} | "
            f"{_fmt_s(p['kernel K(train, centers)'] + p['Gram K^T K, K^T Y (float64)'])} | "
            f"{_fmt_s(p['AGOP'])} | {_fmt_s(p['solve (Cholesky, every ridge)'])} | "
            f"{_fmt_s(p['reduction of the m x m parts'])} | **{_fmt_s(r['iteration_s'])}** | "
            f"{_fmt_s(r['load_s'])} | {_fmt_s(r['predict_s'])} | "
            f"{r['store_bytes_per_iteration'] / 1e9:.0f} GB | "
            f"{r['worker_bytes'] / 2**30:.0f} GiB | {r['driver_bytes'] / 2**30:.0f} GiB |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m ray_convrfm.tools.costmodel runs/scale-32/scale.json``: the ImageNet table from
    the AGOP ratio measured by ``ray-convrfm bench scale`` and the stated GPU assumptions."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m ray_convrfm.tools.costmodel",
                                description=main.__doc__)
    p.add_argument("scale_json", help="scale.json written by `ray-convrfm bench scale`")
    p.add_argument("--gpu-kernel-tflops", type=float, default=10.0)
    p.add_argument("--centers", type=int, default=64_000)
    args = p.parse_args(argv)
    measured = Rates(**json.loads(open(args.scale_json).read())["rates"])
    assume = ClusterAssumptions(gpu_kernel_flops=args.gpu_kernel_tflops * 1e12)
    print(imagenet_table(imagenet_rows(measured, assume, m=args.centers)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
