"""``ray-convrfm bench``: its flags and its commands (kernel, ops, distributed, scale,
rehearsal)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ray_convrfm.kernels.threads import configure_threads
from ray_convrfm.options import ENGINES


def add_bench_parser(sub, common: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand and its flags."""
    b = sub.add_parser("bench", parents=[common],
                       help="kernel and AGOP throughput on a standard shape; 'bench "
                            "distributed': Ray workers' kernel-stage scaling")
    b.add_argument("what", nargs="?", default="kernel",
                   choices=("kernel", "ops", "distributed", "scale", "rehearsal"),
                   help="kernel: one block; ops: every hot operation of the main job at 1 "
                        "and --threads threads, median and max, outliers flagged, the kernel's "
                        "share of the fp32 peak, then the main job's stage seconds; "
                        "distributed: kernel stage over worker counts; "
                        "scale: the Nystrom pipeline on ImageNet-shaped parquet data, measured "
                        "per stage next to the cost model's prediction; rehearsal: the same "
                        "from a JPEG folder tree on a two-node loopback cluster, one node "
                        "removed and replaced mid-fit, every process's peak memory beside "
                        "the model's")
    b.add_argument("--centers", type=int, default=2000,
                   help="for 'scale', 'rehearsal': Nystrom centers")
    b.add_argument("--iters", type=int, default=2, help="for 'scale', 'rehearsal'")
    b.add_argument("--n-test", type=int, default=1000, help="for 'scale', 'rehearsal'")
    b.add_argument("--out", default=None,
                   help="for 'scale', 'rehearsal': work directory and result JSON")
    b.add_argument("--seed", type=int, default=0, help="for 'rehearsal': data, split, centers")
    b.add_argument("--remove-after", default="0.25",
                   help="for 'rehearsal': remove a worker node once this share of the first "
                        "kernel's slabs is stored, or 'Ns': N seconds into the fit")
    b.add_argument("--block", type=int, default=None,
                   help="for 'rehearsal': rows per task and per stored slab (default 256)")
    b.add_argument("--calibration", default=None,
                   help="for 'scale': scale.json of an earlier run; adds a prediction from the "
                        "kernel and AGOP costs that run achieved")
    b.add_argument("--dataset", default="fashion-mnist",
                   help="for 'distributed': images whose training kernel is timed")
    b.add_argument("--n", type=int, default=4000,
                   help="for 'distributed': images; 'rehearsal': training images")
    b.add_argument("--workers", default="1,2", help="for 'distributed': worker counts")
    b.add_argument("--gpus-per-worker", type=float, default=0,
                   help="for 'distributed': GPUs per worker (their kernels run there)")
    b.add_argument("--address", default=None, help="for 'distributed': Ray cluster to join")
    b.add_argument("--size", type=int, default=42)
    b.add_argument("--channels", type=int, default=1)
    b.add_argument("--depth", type=int, default=3)
    b.add_argument("--patch-size", type=int, default=3)
    # a fit-sized block: the default agop_samples=256 against a 1,024-image training chunk
    b.add_argument("--n-train", type=int, default=1024)
    b.add_argument("--n-sample", type=int, default=256)
    b.add_argument("--classes", type=int, default=10,
                   help="kernel: columns of the AGOP's coefficients; scale: classes of the "
                        "ImageNet-shaped data (beyond 10, tuples of items side by side)")
    b.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    b.add_argument("--device", default="auto")
    b.add_argument("--engine", default="auto", choices=ENGINES)
    b.add_argument("--repeats", type=int, default=None, help="default: 3 (kernel), 7 (ops)")
    b.add_argument("--no-main-job", action="store_true", help="for 'ops': skip the main job")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--json", action="store_true", help="print one JSON object")


def _scale_table(r: dict) -> str:
    """Measured vs predicted seconds per stage of ``bench scale``."""
    w = r["workload"]
    cal = r.get("predicted_calibrated")
    lines = [f"Nystrom pipeline, 3 x {w['height']} x {w['width']}, n = {w['n']}, m = {w['m']}, "
             f"{w['workers']} workers, {w['iters']} iterations",
             f"{'stage':<32} {'measured s':>11} {'predicted s':>12}"
             + (f" {'calibrated s':>13}" if cal else "")]
    preds = [r["predicted"]] + ([cal] if cal else [])
    for stage, seconds in r["measured"].items():
        if seconds is None:
            continue
        vals = [p[stage] for p in preds]
        lines.append(f"{stage:<32} {seconds:>11.1f}" + "".join(
            f" {v:>{12 if k == 0 else 13}.1f}" for k, v in enumerate(vals)))
    lines.append(f"{'total (fit + predict)':<32} {r['measured_total']:>11.1f}" + "".join(
        f" {p['total']:>{12 if k == 0 else 13}.1f}" for k, p in enumerate(preds)))
    lines.append(f"memory: driver {r['driver_peak_rss_mb']:.0f} MiB (predicted "
                 f"{r['predicted_memory_mb']['driver']:.0f}), worker {r['worker_peak_rss_mb']:.0f}"
                 f" MiB (predicted {r['predicted_memory_mb']['worker']:.0f}); store "
                 f"{r['store_bytes'] / 2**20:.0f} MiB (predicted "
                 f"{r['predicted_store_bytes'] / 2**20:.0f}); test accuracy "
                 f"{100 * r['test_acc']:.2f}%")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from ray_convrfm.tools.bench import distributed_kernel_scaling, kernel_and_agop_throughput

    if args.what == "scale":
        from ray_convrfm.tools.bench import scale_run

        out = Path(args.out or f"runs/scale-{args.size}")
        r = scale_run(size=args.size, n=args.n, centers=args.centers,
                      workers=int(args.workers.split(",")[-1]), iters=args.iters,
                      n_test=args.n_test, out=str(out), classes=args.classes,
                      calibration=json.loads(Path(args.calibration).read_text())
                      if args.calibration else None)
        (out / "scale.json").write_text(json.dumps(r, indent=2))
        print(_scale_table(r))
        return 0
    if args.what == "rehearsal":
        from ray_convrfm.tools.rehearsal import rehearsal, table

        r = rehearsal(size=args.size, n=args.n, n_test=args.n_test, classes=args.classes,
                      centers=args.centers, iters=args.iters,
                      out=args.out or f"runs/rehearsal-{args.size}", seed=args.seed,
                      remove_after=args.remove_after,
                      **({} if args.block is None else {"block": args.block}))
        print(table(r))
        return 0
    if args.what == "distributed":
        from ray_convrfm.data.datasets import load_dataset

        ds = load_dataset(args.dataset).subset(args.n, 0)
        counts = tuple(int(w) for w in args.workers.split(","))
        rows = distributed_kernel_scaling(ds.X_train, counts, depth=args.depth,
                                          patch_size=args.patch_size,
                                          gpus_per_worker=args.gpus_per_worker,
                                          address=args.address)
        if args.json:
            print(json.dumps(rows))
            return 0
        where = (f"{args.gpus_per_worker:g} GPU(s) per worker" if args.gpus_per_worker
                 else "one thread per worker")
        print(f"kernel stage K(X, X), {ds.name}, n = {args.n}, depth {args.depth}, {where}")
        for r in rows:
            print(f"{r['workers']:>3} worker(s): {r['seconds']:7.1f} s, "
                  f"{r['entries_per_s']:>10,.0f} entries/s, speed-up {r['speedup']:.2f}x, "
                  f"driver CPU {100 * r['driver_cpu_share']:.1f}% of wall")
        return 0
    if args.what == "ops":
        return _bench_ops(args)
    configure_threads(args.threads)
    r = kernel_and_agop_throughput(size=args.size, channels=args.channels, depth=args.depth,
                                   patch_size=args.patch_size, n_train=args.n_train,
                                   n_sample=args.n_sample, classes=args.classes,
                                   dtype=args.dtype, device=args.device, engine=args.engine,
                                   repeats=args.repeats or 3)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"shape {r['shape']}, depth {r['depth']}, patch {r['patch_size']}, {r['dtype']}, "
          f"{r['device']} ({r['engine']} engine, {r['threads']} threads); "
          f"medians of {args.repeats or 3} runs")
    print(f"kernel: {r['kernel_entries_per_s']:,.0f} entries/s "
          f"({r['pairs']} pairs in {r['kernel_seconds']:.3f} s)")
    print(f"AGOP ({r['classes']} classes): {r['agop_pairs_per_s']:,.0f} image pairs/s "
          f"({r['agop_seconds']:.3f} s), {r['agop_over_kernel']:.2f} x the kernel block")
    return 0


def _bench_ops(args: argparse.Namespace) -> int:
    import dataclasses

    from ray_convrfm.kernels.threads import available_cpus
    from ray_convrfm.tools import bench_ops

    most = args.threads or available_cpus()
    counts = tuple(sorted({1, most}))
    rows = bench_ops.time_operations(bench_ops.hot_operations(engine=args.engine), counts,
                                     args.repeats or 7)
    shares = bench_ops.kernel_shares(threads=counts, engine=args.engine)
    job = None if args.no_main_job else bench_ops.main_job_stages(args.threads)
    if args.json:
        print(json.dumps({"ops": [dataclasses.asdict(r) | {"outlier": r.outlier} for r in rows],
                          "kernel_share": [dataclasses.asdict(r) | {"share": r.share}
                                           for r in shares], "main_job": job}))
        return 0
    print(f"hot operations of the main job, {args.repeats or 7} runs each, threads "
          f"{' and '.join(map(str, counts))} in turns")
    print(bench_ops.format_ops(rows))
    print(f"\nthe kernel's share of this machine's fp32 peak (the best "
          f"{bench_ops.PEAK_GEMM_SIZE:,}-square GEMM)")
    print(bench_ops.format_shares(shares))
    if job is not None:
        print(bench_ops.format_stages(job))
    return 0
