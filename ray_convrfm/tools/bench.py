"""Measurements: throughput of the kernel and the AGOP on a standard shape (``ray-convrfm bench``),
the per-worker rates the cost model predicts from (``measure_rates``), the distributed kernel
stage's scaling and the Nystrom pipeline measured next to its prediction (``bench scale``), and
the peak memory of every process of a local Ray cluster (``MemorySampler``)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import torch

from ray_convrfm.kernels.agop import Workspace, agop_from_sides
from ray_convrfm.kernels.devices import resolve_device, resolve_dtype, resolve_engine
from ray_convrfm.kernels.kernel import KernelParams, kernel_block, prepare_side
from ray_convrfm.kernels.threads import configure_threads, configured_threads
from ray_convrfm.tools import costmodel, costtime


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
        agop_from_sides(xs, coef, zs, M, engine=eng, budget_mb=1024, workspace=workspace)
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


def measure_rates(work: costmodel.Workload, parquet_path: str | None = None,
                  repeats: int = 3, store_dir: str | None = None,
                  source: str | None = None) -> costtime.Rates:
    """Measure ``costtime.Rates`` in this process on one thread, as one worker would run them.

    The kernel and AGOP are timed on a 512 x 128 block of random images of the workload's
    shape; the GEMM and a Cholesky (the preconditioner's factor rate) at the workload's m;
    decoding on the first row group of ``parquet_path`` (when given), or on the first 1,024
    training rows of the on-disk set ``source`` (``folder:DIR``, ...: as a worker reads its
    shard); store throughput by writing and reading blocks of ``block`` x m float32 values
    into a zarr store under ``store_dir``.
    """
    import tempfile

    before = configured_threads()
    configure_threads(1)
    try:
        kb = kernel_and_agop_throughput(size=work.height, channels=work.channels,
                                        depth=work.depth, patch_size=work.patch_size,
                                        n_train=512, n_sample=128, classes=work.classes,
                                        device="cpu", repeats=repeats)
        rows = max(work.block, 512)
        A = torch.randn(rows, work.m, dtype=torch.float64)
        t0 = time.perf_counter()
        A.T @ A
        gemm = 2 * rows * work.m**2 / (time.perf_counter() - t0)
    finally:
        configure_threads(before)
    B = torch.randn(work.m, work.m, dtype=torch.float64)
    S = B @ B.T + work.m * torch.eye(work.m, dtype=torch.float64)
    t0 = time.perf_counter()
    torch.linalg.cholesky(S)
    factor = (work.m**3 / 3) / (time.perf_counter() - t0)
    decode = float("nan")
    if parquet_path is not None:
        from ray_convrfm.data.parquet import ParquetImages, read_rows

        images = ParquetImages.open(parquet_path)
        k = min(len(images), 1024)
        t0 = time.perf_counter()
        read_rows(images.manifest, "train", 0, k)
        decode = k / (time.perf_counter() - t0)
    elif source is not None:
        from ray_convrfm.data.sources import open_disk_images

        images = open_disk_images(source, "train")
        k = min(len(images), 1024)
        t0 = time.perf_counter()
        images.rows([(0, k)]).load()
        decode = k / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(dir=store_dir) as tmp:
        import zarr

        arr = zarr.open_array(f"{tmp}/k.zarr", mode="w", shape=(4 * work.block, work.m),
                              chunks=(work.block, work.block), dtype="float32")
        block = np.random.default_rng(0).random((work.block, work.m), dtype=np.float32)
        t0 = time.perf_counter()
        for i in range(4):
            arr[i * work.block : (i + 1) * work.block] = block
        arr[...]
        store = 4 * block.nbytes / (time.perf_counter() - t0)
    return costtime.Rates(kernel_entry_s=1 / kb["kernel_entries_per_s"],
                           agop_over_kernel=kb["agop_over_kernel"], gemm_flops=gemm,
                           factor_flops=factor, decode_images_per_s=decode,
                           store_bytes_per_s=store)


def distributed_kernel_scaling(X: np.ndarray, workers: tuple[int, ...] = (1, 2), depth: int = 3,
                               patch_size: int = 3, gpus_per_worker: float = 0,
                               address: str | None = None) -> list[dict]:
    """Kernel stage K(X, X) on Ray shard workers (one thread each), for each worker count.

    As in a fit (``ShardedBackend.train_kernel``), the columns are the workers' own shards,
    passed worker to worker, and each entry of the symmetric kernel is computed once. Reports
    wall seconds, entries of K per second, the speed-up over the first count, and the driver's
    own CPU time as a share of the wall time (it should only schedule and gather).
    """
    import ray

    from ray_convrfm.backends import open_backend
    from ray_convrfm.backends.protocol import KernelSpec
    from ray_convrfm.backends.ray_executor import start_ray
    from ray_convrfm.options import Options

    started_here = not ray.is_initialized()
    start_ray(max(workers), address)
    spec = KernelSpec(KernelParams(depth, patch_size, False))
    M = torch.eye(X.shape[1] * patch_size**2)
    rows = []
    try:
        for w in workers:
            options = Options.of(workers=w, threads_per_worker=1, address=address,
                                 gpus_per_worker=gpus_per_worker)
            backend = open_backend(X, options, torch.device("cpu"))
            try:
                backend.configure(spec, None)
                backend.set_metric(M, None)
                # warm-up: every worker loads the compiled kernel
                backend.ex.get([backend.ex.submit(k, "kernel_rows", backend.layer_ref, 0, 2,
                                                  "warm-up", X[:4]) for k in range(w)])
                cpu0, t0 = time.process_time(), time.perf_counter()
                K = backend.train_kernel()
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            finally:
                backend.close()
            rows.append({"workers": w, "seconds": wall, "entries_per_s": K.numel() / wall,
                         "driver_cpu_share": cpu / wall,
                         "speedup": rows[0]["seconds"] / wall if rows else 1.0})
    finally:
        if started_here:
            ray.shutdown()
    return rows


def imagenet_shaped(size: int, n_train: int, n_test: int, seed: int = 0, classes: int = 10):
    """RGB images of ImageNet's shapes (3 x size x size, 224 included) made from Fashion-MNIST:
    each image resized and tinted with a random colour, so content and labels stay real. With
    ``classes`` other than 10, each image is a tuple of items side by side
    (``datasets.item_tuples``: 1,000 classes are three items) before it is resized."""
    import torch.nn.functional as F

    from ray_convrfm.data.datasets import ImageDataset, item_tuples, load_fashion_mnist

    if classes == 10:
        ds = load_fashion_mnist().subset(n_train, n_test)
    else:
        ds = item_tuples(load_fashion_mnist(), classes, n_train, n_test, random_state=seed)
    rng = np.random.default_rng(seed)

    def rgb(X: np.ndarray) -> np.ndarray:
        out = []
        for b in range(0, len(X), 1024):
            x = F.interpolate(torch.from_numpy(X[b : b + 1024]), size=(size, size),
                              mode="bilinear", align_corners=False)
            tint = torch.from_numpy(rng.uniform(0.3, 1.0, (len(x), 3, 1, 1)).astype(np.float32))
            out.append((x * tint).clamp(0, 1).numpy())
        return np.concatenate(out)

    return ImageDataset(rgb(ds.X_train), ds.y_train, rgb(ds.X_test), ds.y_test,
                        name=f"fmnist-rgb{size}" + ("" if classes == 10 else f"-{classes}"),
                        classes=ds.classes)


def _write_imagenet_shaped(size: int, n: int, n_test: int, seed: int, out: str,
                           classes: int = 10) -> str:
    from ray_convrfm.data.parquet import write_parquet_dataset

    return str(write_parquet_dataset(imagenet_shaped(size, n, n_test, seed, classes), out))


def write_jpeg_tree(root: str, size: int, n: int, n_test: int, seed: int = 0,
                    classes: int = 10) -> dict:
    """``imagenet_shaped`` as an ImageNet-style folder tree, ``train/<class>/*.jpg`` and
    ``val/<class>/*.jpg`` (JPEG quality 90), for fits that read ``folder:ROOT`` in place;
    the images written and their rate (making them included)."""
    from pathlib import Path

    from ray_convrfm.data import images as img

    t0 = time.perf_counter()
    ds = imagenet_shaped(size, n, n_test, seed, classes)
    for split, X, y in (("train", ds.X_train, ds.y_train), ("val", ds.X_test, ds.y_test)):
        for i, (x, label) in enumerate(zip(X, y, strict=True)):
            path = Path(root) / split / f"c{int(label):04d}" / f"{i:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(img.encode_image(x, "jpeg", quality=90))
    seconds, images = time.perf_counter() - t0, len(ds.X_train) + len(ds.X_test)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def _worker_start_seconds(workers: int) -> float:
    """Seconds to start (and reach) a set of shard workers on this Ray: the fixed cost of a
    stage that opens workers (a fit's shards, a prediction's test shards)."""
    from ray_convrfm.backends.ray_executor import RayExecutor, start_ray

    start_ray(workers)
    t0 = time.perf_counter()
    RayExecutor(np.zeros((workers, 1, 4, 4), np.float32), workers, threads=1).close()
    return time.perf_counter() - t0


def scale_run(size: int = 32, n: int = 20000, centers: int = 2000, workers: int = 2,
              iters: int = 2, n_test: int = 1000, out: str = "runs/scale",
              seed: int = 0, calibration: dict | None = None, classes: int = 10) -> dict:
    """The distributed Nystrom pipeline end to end on ImageNet-shaped parquet data, measured
    per stage, next to what ``costmodel`` predicts from rates measured beforehand.

    Writes the data as parquet shards, measures per-worker rates (``measure_rates``),
    fits ``ConvRFM(solver="nystrom", workers=...)`` from the parquet set with a kernel store,
    predicts the test images on the workers, and returns measured and predicted seconds per
    stage, peak memory (driver, workers) and bytes stored. With ``calibration`` (the result of
    an earlier run) a second prediction uses the kernel and AGOP costs that run achieved,
    scaled to this run's image shape (``costtime.calibrated``).
    """
    import resource
    import shutil
    from pathlib import Path

    from ray_convrfm.data.parquet import ParquetImages
    from ray_convrfm.models.convrfm import ConvRFM
    from ray_convrfm.options import Options

    root = Path(out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    # data and rates are made in a child process, so this process's peak memory is the fit's
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spawn = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        data = pool.submit(_write_imagenet_shaped, size, n, n_test, seed,
                           str(root / "data"), classes).result()
    seconds_convert = time.perf_counter() - t0
    work = costmodel.Workload(n=n, m=centers, channels=3, height=size, width=size,
                              workers=workers, iters=iters, n_test=n_test, classes=classes)
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        rates = pool.submit(measure_rates, work, str(data),
                            store_dir=str(root)).result()
    rates = dataclasses.replace(rates, worker_start_s=_worker_start_seconds(workers))
    predicted = costtime.predict(work, rates)
    predicted_calibrated = None
    if calibration is not None:
        predicted_calibrated = costtime.predict(
            work, costtime.calibrated(calibration, work, rates))

    t0 = time.perf_counter()
    model = ConvRFM(depth=work.depth, iters=iters, solver="nystrom", centers=centers,
                    random_state=seed,
                    options=Options.of(workers=workers, store=str(root / "kernels.zarr")))
    model.fit(ParquetImages.open(data, "train"))
    seconds_fit = time.perf_counter() - t0
    timings = dict(model.timings_)
    test = ParquetImages.open(data, "test")
    X_test, y_test = test.read()
    t0 = time.perf_counter()
    test_acc = float(np.mean(model.predict(X_test) == y_test))
    seconds_predict = time.perf_counter() - t0

    hist = model.history_
    # the driver's wall seconds per stage (ShardedBackend.timings), by the cost model's names
    measured = {
        costmodel.LOAD: None,  # not timed apart: the fit's seconds outside the stages below
        costmodel.ROWS: timings.get("nystrom_rows", 0.0),  # K^T Y is summed in the same tasks
        costmodel.KTY: timings.get("nystrom_reduce", 0.0),  # its reduction
        costmodel.PRECONDITIONER: timings.get("precondition", 0.0),  # factors and applications
        costmodel.CG: timings.get("cg_step", 0.0),
        costmodel.VALIDATION: timings.get("evaluate_validation", 0.0),
        costmodel.AGOP: timings.get("agop", 0.0),
        costmodel.GATHER: None,  # not timed apart from the fit
        costmodel.PREDICT: seconds_predict,
    }
    measured[costmodel.LOAD] = seconds_fit - sum(
        v for k, v in measured.items() if v is not None and k != costmodel.PREDICT)
    store_bytes = sum(f.stat().st_size for f in (root / "kernels.zarr").rglob("*")
                      if f.is_file())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return {
        "workload": dataclasses.asdict(work), "rates": dataclasses.asdict(rates),
        "flops_per_entry": work.flops_per_entry(),
        "seconds_convert": seconds_convert, "seconds_fit": seconds_fit,
        "measured": measured, "predicted": predicted,
        "cg_products": int(timings.get("cg_steps", 0)),
        "predicted_cg_products": work.iters * work.cg_products(),
        "predicted_calibrated": predicted_calibrated,
        "measured_total": seconds_fit + seconds_predict,
        "driver_peak_rss_mb": peak,
        "worker_peak_rss_mb": max(max(h["worker_peak_rss_mb"]) for h in hist),
        "predicted_memory_mb": {k: v / 2**20 for k, v in costmodel.memory(work).items()},
        "store_bytes": store_bytes, "predicted_store_bytes": costmodel.storage(work),
        "test_acc": test_acc, "val_acc": hist[model.best_iter_]["val_acc"],
    }


#: Ray's helper processes by script, for ``MemorySampler``.
_SCRIPTS = {"agent.py": "dashboard agent", "main.py": "runtime-env agent",
            "dashboard.py": "dashboard API server", "log_monitor.py": "log monitor",
            "monitor.py": "autoscaler monitor", "setup_worker.py": "Ray worker (starting)",
            "default_worker.py": "Ray worker (starting)"}


def _peak_mb(p) -> float:
    """A process's peak resident memory (Linux: VmHWM), else its resident memory now."""
    try:
        with open(f"/proc/{p.pid}/status") as fh:
            hwm = [line.split()[1] for line in fh if line.startswith("VmHWM:")]
        if hwm:
            return int(hwm[0]) / 2**10
    except OSError:
        pass
    return p.memory_info().rss / 2**20


def _role(p) -> tuple[str, bool]:
    """(role, whether it is final): a Ray actor's title (``ray::Class.method``) is."""
    name, cmd = p.name(), p.cmdline()
    if cmd and cmd[0].startswith("ray::") and not cmd[0].startswith("ray::IDLE"):
        return cmd[0][5:].split(".")[0].split()[0], True
    script = next((os.path.basename(a) for a in cmd if a.endswith(".py")), None)
    return _SCRIPTS.get(script, script or name), name in ("gcs_server", "raylet")


class MemorySampler(threading.Thread):
    """Every process under this one (a local cluster's GCS, raylets, agents, actors): role,
    node and peak resident memory, looked at every ``period_s``, so that no process's peak is
    missed, the driver's included. ``raylets`` maps a raylet's pid to (node label, node id),
    filled by whoever starts the nodes; a process under none is on "head"."""

    def __init__(self, period_s: float = 0.2):
        import ray  # noqa: F401 - psutil is Ray's dependency, importable once ray is

        super().__init__(daemon=True)
        self.period_s, self.raylets, self.seen = period_s, {}, {}
        self.done, self._lock = threading.Event(), threading.Lock()

    def run(self) -> None:
        while not self.done.wait(self.period_s):
            self.sample()

    def sample(self) -> list[dict]:
        """Look now; a copy of every process seen so far (``ended``: gone by now)."""
        import psutil  # importable: ray is (see __init__)

        with self._lock:
            me, alive = psutil.Process(), set()
            for p in [me, *me.children(recursive=True)]:
                try:
                    (role, final), parent = ("driver", True) if p is me else _role(p), p.ppid()
                    peak = _peak_mb(p)
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    continue
                alive.add(p.pid)
                rec = self.seen.setdefault(p.pid, {"pid": p.pid, "role": role, "final": False,
                                                   "peak_mb": 0.0, "since": time.monotonic()})
                if final and not rec["final"]:  # e.g. a worker process became an actor
                    rec.update(role=role, final=True, since=time.monotonic())
                node = self.raylets.get(p.pid) or self.raylets.get(parent) or ("head", None)
                rec.update(node=node[0], node_id=node[1], peak_mb=max(rec["peak_mb"], peak))
            for pid, rec in self.seen.items():
                rec["ended"] = pid not in alive
            return [dict(rec) for rec in self.seen.values()]
