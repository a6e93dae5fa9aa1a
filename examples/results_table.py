"""Fixed kernel, ConvRFM, Deep ConvRFM with 2 and 3 layers on one split, from one fit.

Run:  python examples/results_table.py --n-train 2000 --out runs/table/fm2k.json
      python examples/results_table.py --n-train 2000 --noise-frame 42 --out runs/table/n42.json
      python examples/results_table.py --collect runs/table/fm2k.json runs/table/n42.json

A Deep ConvRFM layer does not depend on the layers after it, so with ``total_depth`` fixed the
first L layers of a 3-layer stack are the L-layer stack (``tests/models/test_deep.py``): one fit
gives every column. Fixed kernel = iteration 0 of the first layer (M = I), ConvRFM = the first
layer (kernel depth 3), Deep 2 and Deep 3 = the second and third layers (depths 2 and 1). Each
column's iteration and ridge are chosen on the same seeded validation split; its test accuracy
is on the first ``--n-test`` test images (monitored, never used for a choice); its seconds are
the layers' cumulative wall time (the fixed kernel: iteration 0's kernels and solve).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ray_convrfm import ConvRFM, DeepConvRFM, Options
from ray_convrfm.data.datasets import load_dataset, with_noise_frame

COLUMNS = ("fixed kernel", "ConvRFM", "Deep ConvRFM, 2 layers", "Deep ConvRFM, 3 layers")


def results(model: DeepConvRFM) -> list[dict]:
    """One record per column of the table from a fitted stack (see the module docstring)."""
    first = model.layers_[0]["history"][0]
    rows = [{"model": COLUMNS[0], "iter": 0, "ridge": first["ridge"],
             "val_acc": first["val_acc"], "test_acc": first["monitor_acc"],
             "seconds": first["seconds_kernel"] + first["seconds_solve"], "learned": False}]
    seconds = 0.0
    for layer, info in enumerate(model.layers_):
        seconds += info["seconds"]
        chosen = info["history"][info["best_iter"]]
        rows.append({"model": COLUMNS[layer + 1], "iter": info["best_iter"],
                     "ridge": info["ridge"], "val_acc": chosen["val_acc"],
                     "test_acc": chosen["monitor_acc"], "seconds": seconds,
                     "learned": info["learned"], "depth": info["depth"],
                     "iterations_run": len(info["history"])})
    return rows


def markdown(runs: list[dict]) -> str:
    """The table: one row per model, one column per run."""
    head = "| model | " + " | ".join(r["task"] for r in runs) + " |"
    lines = [head, "|" + " --- |" * (len(runs) + 1)]
    for i, name in enumerate(COLUMNS):
        cells = []
        for run in runs:
            r = run["rows"][i]
            cells.append(f"{100 * r['test_acc']:.2f} % (it {r['iter']}, ridge {r['ridge']:g}, "
                         f"val {100 * r['val_acc']:.2f} %, {r['seconds']:.0f} s)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--noise-frame", type=int, default=None)
    p.add_argument("--noise-std", type=float, default=0.5)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--metric-floor", type=float, default=None,
                   help="ConvRFM.metric_floor (default: the estimator's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for this run's records")
    p.add_argument("--collect", nargs="+", default=None,
                   help="print the markdown table of earlier runs' JSON files")
    args = p.parse_args()
    if args.collect:
        print(markdown([json.loads(Path(f).read_text()) for f in args.collect]))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    ds = load_dataset(args.dataset).subset(args.n_train, args.n_test)
    task = f"{ds.name}, n = {args.n_train:,}"
    if args.noise_frame:
        ds = with_noise_frame(ds, frame=args.noise_frame, noise_std=args.noise_std,
                              random_state=args.seed)
        task = f"{ds.name} ({args.noise_frame} x {args.noise_frame} noise frame), " \
               f"n = {args.n_train:,}"
    extra = {} if args.metric_floor is None else {"metric_floor": args.metric_floor}
    layer = ConvRFM(depth=3, iters=args.iters, patience=args.patience or None,
                    random_state=args.seed, options=Options.of(verbose=True), **extra)
    model = DeepConvRFM(layer, layers=3, width=args.width, total_depth=3)
    model.fit(ds.X_train, ds.y_train, monitor=(ds.X_test, ds.y_test))
    run = {"task": task, "n_train": args.n_train, "n_test": len(ds.y_test),
           "width": args.width, "iters": args.iters, "patience": args.patience,
           "filter_power": model.filter_power, "rows": results(model)}
    print(markdown([run]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
