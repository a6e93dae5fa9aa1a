"""Measure the scale-out Nystrom solve: driver and worker peaks, seconds per stage and per
conjugate-gradient step, in memory and out of core.

Each configuration runs in its own process (so that the driver's peak memory is its own) on
the first N Fashion-MNIST training images (Debian's dataset-fashion-mnist) with W Ray workers,
``solver="nystrom"`` and one iteration of the fixed kernel, and prints one JSON line.

    python examples/scale_out.py --n-train 6000 --centers 500 3000 --workers 2
    python examples/scale_out.py --n-train 6000 --centers 3000 --resident-mb 8 --compare

``--resident-mb`` keeps at most that much of each worker's rows of K(train, centers) in
memory (the rest is read back from zarr at every CG step); ``--compare`` also runs the
in-memory fit and reports whether the two models are equal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(args: argparse.Namespace) -> dict:
    """One fit in this process; returns its measurements."""
    import numpy as np

    from ray_convrfm import ConvRFM, Options
    from ray_convrfm.data.datasets import load_fashion_mnist
    from ray_convrfm.tools.outputs import peak_rss_mb

    ds = load_fashion_mnist().subset(args.n_train, args.n_test)
    options = Options.of(workers=args.workers, resident_mb=args.resident_mb,
                         preconditioner_rank=args.rank, store=args.store)
    centers = args.centers[0] if isinstance(args.centers, list) else args.centers
    model = ConvRFM(depth=args.depth, iters=1, solver="nystrom", centers=centers,
                    random_state=0, options=options)
    t0 = time.perf_counter()
    model.fit(ds.X_train, ds.y_train, monitor=(ds.X_test, ds.y_test))
    seconds = time.perf_counter() - t0
    h = model.history_[0]
    t = model.timings_
    steps = int(t.get("cg_steps", 0))
    if args.alpha_out:
        np.save(args.alpha_out, model.alpha_.numpy())
    return {
        "n_train": args.n_train, "centers": centers, "workers": args.workers,
        "resident_mb": args.resident_mb, "preconditioner_rank": args.rank,
        "fit_seconds": seconds,
        "driver_peak_rss_mb": peak_rss_mb(),
        "worker_peaks_rss_mb": h["worker_peak_rss_mb"],
        "seconds": {"kernel rows": t.get("nystrom_rows", 0.0),
                    "solve (CG, every ridge)": t.get("cg_step", 0.0) + t.get("precondition", 0.0),
                    "validation": t.get("evaluate_validation", 0.0),
                    "prediction (test set)": t.get("evaluate_monitor", 0.0)},
        "cg_steps": steps, "cg_iterations_by_ridge": h["cg_iterations_by_ridge"],
        "seconds_per_cg_step": t.get("cg_step", 0.0) / max(steps, 1),
        "seconds_reading_rows": h.get("seconds_reading_rows", 0.0),
        "val_acc": h["val_acc"], "test_acc": h.get("monitor_acc"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--centers", type=int, nargs="+", default=[500, 3000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--resident-mb", type=int, default=None)
    p.add_argument("--rank", type=int, default=None, help="preconditioner rank q")
    p.add_argument("--store", default=None, help="kernel store (default: none)")
    p.add_argument("--compare", action="store_true",
                   help="also run in memory and compare the models")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--alpha-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="scale-out-"))
    base = [sys.executable, __file__, "--one", "--n-train", str(args.n_train), "--n-test",
            str(args.n_test), "--workers", str(args.workers), "--depth", str(args.depth)]
    if args.store:
        base += ["--store", args.store]
    if args.rank:
        base += ["--rank", str(args.rank)]
    for m in args.centers:
        runs = [("budget", args.resident_mb)] + ([("memory", None)] if args.compare else [])
        results = {}
        for name, resident in runs:
            cmd = [*base, "--centers", str(m), "--alpha-out", str(tmp / f"{name}-{m}.npy")]
            if resident is not None:
                cmd += ["--resident-mb", str(resident)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
            out = proc.stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(results[name]), flush=True)
        if args.compare:
            import numpy as np

            a, b = (np.load(tmp / f"{k}-{m}.npy") for k in ("budget", "memory"))
            print(json.dumps({"centers": m, "models_equal": bool(np.array_equal(a, b)),
                              "alpha_max_rel_diff": float(abs(a - b).max() / abs(b).max())}))


if __name__ == "__main__":
    main()
