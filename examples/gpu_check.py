"""GPU check of the fused Triton engine: its tests on CUDA, then eager torch vs Triton timings.

Run on a machine with one CUDA GPU (no Ray, no zarr, nothing installed from the network):

    python examples/gpu_check.py --out gpu_check.json

It runs the GPU-marked tests and the Triton tests compiled on the GPU, then times the kernel
block and its adjoint (the AGOP's cost) for the shapes of issue 12, printing entries/s, achieved
FLOP/s (FLOPs per entry from ``tools.costmodel.Workload.flops_per_entry``) and the fraction of
the device's fp32 peak, and writes them to a JSON whose ``gpu_kernel_flops`` is the rate the
cost model (``Rates.scaled(..., kernel_flops_per_s=...)``) takes for a GPU worker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: fp32 (non-tensor-core) peak TFLOP/s by device-name fragment; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 67.0, "H100 PCIe": 51.0, "H100": 67.0, "A100": 19.5, "L40S": 91.6}

#: (channels, height, width, depth, n, m): issue 12's standard shapes; n x m pairs per block.
SHAPES = [
    (1, 28, 28, 3, 256, 256),
    (1, 42, 42, 3, 128, 128),
    (3, 32, 32, 5, 128, 128),
    (3, 64, 64, 3, 64, 64),
    (3, 224, 224, 3, 4, 16),  # one tile of ImageNet-sized images
]

#: The shape whose Triton forward rate becomes the cost model's GPU kernel rate.
RATE_SHAPE = (3, 32, 32, 5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON to write")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device fp32 peak in TFLOP/s (default: looked up from the device name)")
    p.add_argument("--skip-tests", action="store_true", help="only run the benchmarks")
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="time each measurement for at least this long (after one warm-up)")
    p.add_argument("--no-torch", action="store_true",
                   help="skip the eager torch engine (e.g. when it runs out of memory)")
    return p.parse_args(argv)


def peak_for(name: str, override: float | None) -> float | None:
    """fp32 peak in FLOP/s: the override, else the first table entry the device name contains."""
    if override is not None:
        return override * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def run_tests() -> dict[str, int]:
    """pytest exit codes of the GPU-marked tests and of the Triton tests compiled on CUDA."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmds = {
        "gpu_marked": [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels"],
        "triton": [sys.executable, "-m", "pytest", "-q", "tests/kernels/test_triton.py"],
    }
    codes = {}
    for name, cmd in cmds.items():
        print(f"$ {' '.join(cmd[1:])}", flush=True)
        codes[name] = subprocess.call(cmd, cwd=ROOT, env=env)
    return codes


def timed(fn, min_seconds: float) -> float:
    """Seconds per call after one warm-up call (which includes Triton's compilation)."""
    import torch

    fn()
    torch.cuda.synchronize()
    reps, start = 0, time.perf_counter()
    while True:
        fn()
        torch.cuda.synchronize()
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or reps >= 50:
            return elapsed / reps


def bench(args: argparse.Namespace, peak: float | None) -> list[dict]:
    """Every shape of ``SHAPES`` in turn (one set of prepared images on the GPU at a time)."""
    import torch

    rows = []
    for shape in SHAPES:
        rows += bench_shape(*shape, args=args, peak=peak)
        torch.cuda.empty_cache()
    return rows


def bench_shape(C: int, H: int, W: int, depth: int, n: int, m: int,
                args: argparse.Namespace, peak: float | None) -> list[dict]:
    """Forward and adjoint of both engines on one block of n x m pairs of random images."""
    import torch

    from ray_convrfm.kernels.kernel import (
        KernelParams,
        kernel_block,
        kernel_block_adjoint,
        prepare_side,
    )
    from ray_convrfm.kernels.triton_engine import (
        kernel_block_adjoint_triton,
        kernel_block_triton,
        plan_launch,
    )
    from ray_convrfm.tools.costmodel import Workload

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    params = KernelParams(depth, 3, False)
    X = torch.rand(n, C, H, W, device=dev, generator=gen)
    Z = torch.rand(m, C, H, W, device=dev, generator=gen)
    M = torch.eye(C * 9, device=dev)
    xs, zs = prepare_side(X, M, params), prepare_side(Z, M, params)
    coef = torch.randn(n, 10, device=dev, generator=gen)
    flops = Workload(n=n, m=m, channels=C, height=H, width=W, depth=depth).flops_per_entry()
    runs = {
        ("forward", "triton"): lambda: kernel_block_triton(xs, zs),
        ("adjoint", "triton"): lambda: kernel_block_adjoint_triton(xs, zs, coef),
    }
    if not args.no_torch:
        runs[("forward", "torch")] = lambda: kernel_block(xs, zs, "torch")
        runs[("adjoint", "torch")] = lambda: kernel_block_adjoint(xs, zs, coef, "torch")
    times = {}
    for (op, engine), fn in runs.items():
        try:
            times[op, engine] = timed(fn, args.min_seconds)
        except torch.cuda.OutOfMemoryError:
            print(f"  {engine} {op}: out of memory", flush=True)
            torch.cuda.empty_cache()
            continue
        sec = times[op, engine]
        rate = n * m / sec
        row = {"shape": [C, H, W], "depth": depth, "n": n, "m": m, "op": op,
               "engine": engine, "seconds": sec, "entries_per_s": rate,
               "flops_per_entry": flops, "flops_per_s": rate * flops,
               "fraction_of_fp32_peak": rate * flops / peak if peak else None}
        if engine == "triton":  # how the block was cut: pairs per launch, position tiles
            plan = plan_launch(n, m, xs.grids, 3, 4, dev, adjoint=op == "adjoint")
            row["plan"] = {"rows": plan.rows, "cols": plan.cols, "tile": list(plan.tile),
                           "tiles": list(plan.tiles), "region": plan.region}
        rows.append(row)
    for row in rows:
        key_torch = (row["op"], "torch")
        if row["engine"] == "triton" and key_torch in times:
            row["speedup_vs_torch"] = times[key_torch] / row["seconds"]
        if row["op"] == "adjoint" and ("forward", row["engine"]) in times:
            row["adjoint_over_forward"] = row["seconds"] / times["forward", row["engine"]]
    for row in rows:
        frac = row["fraction_of_fp32_peak"]
        print(f"{C}x{H}x{W} d{depth} {n}x{m} {row['op']:8s} {row['engine']:6s} "
              f"{row['entries_per_s']:12.4g} entries/s {row['flops_per_s'] / 1e12:8.3f} "
              f"TFLOP/s" + (f" {100 * frac:6.2f}% of peak" if frac else "")
              + (f"  x{row['speedup_vs_torch']:.1f} vs torch"
                 if "speedup_vs_torch" in row else "")
              + (f"  adjoint/forward {row['adjoint_over_forward']:.2f}"
                 if "adjoint_over_forward" in row else ""), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available; nothing to check (run it on a GPU "
              "machine).", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, before triton is imported
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_check: triton is not installed (pip install '.[gpu]').", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    name = torch.cuda.get_device_name(0)
    peak = peak_for(name, args.peak_tflops)
    print(f"device: {name}; fp32 peak: "
          + (f"{peak / 1e12:.1f} TFLOP/s" if peak else "unknown (pass --peak-tflops)"))
    tests = {} if args.skip_tests else run_tests()
    rows = bench(args, peak)
    rate = next((r["flops_per_s"] for r in rows if r["engine"] == "triton"
                 and r["op"] == "forward" and (*r["shape"], r["depth"]) == RATE_SHAPE), None)
    from ray_convrfm.kernels.triton_plan import tuned_configs

    report = {"device": name, "fp32_peak_flops": peak, "tests": tests, "results": rows,
              "launch_configs": tuned_configs(),
              "gpu_kernel_flops": rate, "rate_shape": list(RATE_SHAPE)}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(code == 0 for code in tests.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
