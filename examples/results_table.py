"""Fixed kernel, ConvRFM, Deep ConvRFM (layers chosen on validation; 2 and 3 forced) and a CNN,
on one split, from one stack fit and one CNN run.

Run:  python examples/results_table.py --n-train 2000 --out runs/table/fm2k.json
      python examples/results_table.py --n-train 2000 --noise-frame 42 --out runs/table/n42.json
      python examples/results_table.py --dataset photos --out runs/table/photos.json
      python examples/results_table.py --collect runs/table/fm2k.json runs/table/n42.json

A Deep ConvRFM layer does not depend on the layers after it, so the first L layers of a
3-layer stack are the L-layer stack (``tests/models/test_deep.py``): one fit gives every
column. Fixed kernel = iteration 0 of the first layer (M = I), ConvRFM = the first layer,
Deep 2 and Deep 3 = the second and third layers, Deep chosen = the stack
``DeepConvRFM(layer_patience=1)`` keeps (the rule applied to the layers' validation
accuracies, as ``tests/models/test_deep.py`` checks it). Without ``--pool`` layer l has kernel
depth 3 - l (the reference's total depth); with it every layer has depth 3 and the images are
pooled between layers. The CNN is ``cnfa.networks.SmallCNN`` (4 conv layers of ``--cnn-width``)
trained with Adam on the same training rows, its epoch chosen on the same validation rows
(training stops ``--cnn-patience`` epochs after the best). A data set that carries its own
validation split (the photographs task) gives it to every column. ``--filters`` draws the
first layer's M beside the CNN's first-layer filters and their W^T W.
Each column's choices use only the validation split; test accuracy is on the first
``--n-test`` test images (monitored, never used for a choice); seconds are the layers'
cumulative wall time (the fixed kernel: iteration 0's kernels and solve).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ray_convrfm import ConvRFM, DeepConvRFM, Options
from ray_convrfm.cnfa.networks import SmallCNN, accuracy, train_on_validation
from ray_convrfm.data.datasets import load_dataset, with_noise_frame
from ray_convrfm.kernels.patches import ACTIVATIONS, POOL_MODES
from ray_convrfm.models.inputs import prepare_fit_inputs
from ray_convrfm.tools.cli import patch_basis_arg
from ray_convrfm.tools.viz import plot_cnn_comparison

COLUMNS = ("fixed kernel", "ConvRFM", "Deep ConvRFM, layers chosen", "Deep ConvRFM, 2 layers",
           "Deep ConvRFM, 3 layers", "CNN")


def chosen_layers(val_acc: list[float], patience: int = 1) -> int:
    """The layers DeepConvRFM(layer_patience=patience) keeps, from each layer's val accuracy."""
    best = 0
    for layer, acc in enumerate(val_acc):
        best = layer if acc > val_acc[best] else best
        if layer - best >= patience:
            break
    return best + 1


def cnn_row(X, y, seed: int, val_fraction: float, X_test, y_test, width: int,
            epochs: int, X_val=None, y_val=None, patience: int = 20):
    """The CNN anchor on the estimator's own split (its epoch chosen on validation)."""
    data = prepare_fit_inputs(X, y, X_val, y_val, None, val_fraction,
                              np.random.default_rng(seed))
    y_test_idx = np.searchsorted(data.classes, y_test)
    torch.manual_seed(seed)
    model = SmallCNN(X.shape[1], len(data.classes), width=width, depth=4)
    t0 = time.perf_counter()
    history = train_on_validation(model, np.asarray(data.X_fit), data.y_fit,
                                  np.asarray(data.X_val), data.y_val, epochs=epochs,
                                  patience=patience, seed=seed)
    seconds = time.perf_counter() - t0
    chosen = next(h for h in history if h["chosen"])
    return {"model": COLUMNS[-1], "iter": chosen["epoch"], "ridge": None,
            "val_acc": chosen["val_acc"], "test_acc": accuracy(model, X_test, y_test_idx),
            "seconds": seconds, "learned": True, "epochs_run": len(history)}, model


def results(model: DeepConvRFM) -> list[dict]:
    """One record per column of the table from a fitted stack (see the module docstring)."""
    first = model.layers_[0]["history"][0]
    rows = [{"model": COLUMNS[0], "iter": 0, "ridge": first["ridge"],
             "val_acc": first["val_acc"], "test_acc": first["monitor_acc"],
             "seconds": first["seconds_kernel"] + first["seconds_solve"], "learned": False}]
    seconds, per_layer = 0.0, []
    for info in model.layers_:
        seconds += info["seconds"]
        chosen = info["history"][info["best_iter"]]
        per_layer.append({"iter": info["best_iter"], "ridge": info["ridge"],
                          "val_acc": chosen["val_acc"], "test_acc": chosen["monitor_acc"],
                          "seconds": seconds, "layer_seconds": info["seconds"],
                          # the layer's own cost: without scoring the monitored test images
                          "fit_seconds": info["seconds"] - sum(h.get("seconds_monitor", 0.0)
                                                               for h in info["history"]),
                          "learned": info["learned"], "depth": info["depth"],
                          "iterations_run": len(info["history"]),
                          "top_eigen_share": top_share(info["M"])})
    kept = chosen_layers([r["val_acc"] for r in per_layer])
    names = [COLUMNS[1], COLUMNS[3], COLUMNS[4]]
    for name, row in zip(names, per_layer, strict=False):
        rows.append({"model": name, **row})
    rows.insert(2, {"model": COLUMNS[2], **per_layer[kept - 1], "layers": kept})
    return rows


def top_share(M: torch.Tensor) -> float:
    """The top eigenvalue's share of M's spectrum: 1 when M has collapsed to rank one."""
    vals = torch.linalg.eigvalsh(M.double()).clamp(min=0)
    return float(vals[-1] / vals.sum())


def markdown(runs: list[dict]) -> str:
    """The table: one row per model, one column per run."""
    head = "| model | " + " | ".join(r["task"] for r in runs) + " |"
    lines = [head, "|" + " --- |" * (len(runs) + 1)]
    for name in COLUMNS:
        cells = []
        for run in runs:
            r = next((r for r in run["rows"] if r["model"] == name), None)
            if r is None:
                cells.append("-")
                continue
            what = (f"epoch {r['iter']}" if r["ridge"] is None
                    else f"it {r['iter']}, ridge {r['ridge']:g}")
            if "layers" in r:
                what = f"{r['layers']} layer(s), " + what
            cells.append(f"{100 * r['test_acc']:.2f} % ({what}, val {100 * r['val_acc']:.2f} %, "
                         f"{r['seconds']:.0f} s)")
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
    p.add_argument("--pool", type=int, default=1,
                   help="Deep ConvRFM: pooling between layers (every layer then has depth 3)")
    p.add_argument("--pool-mode", default="avg", choices=POOL_MODES)
    p.add_argument("--activation", default="none", choices=ACTIVATIONS,
                   help="Deep ConvRFM: what each filter's map goes through before pooling")
    p.add_argument("--feature-basis", type=patch_basis_arg, default=None,
                   help="DeepConvRFM.feature_basis: the later layers' patch basis (auto, full "
                        "or a share; default: --patch-basis)")
    p.add_argument("--padding", action="store_true", help="padded kernels and filter banks")
    p.add_argument("--normalise", action="store_true",
                   help="Deep ConvRFM: feature maps scaled to unit mean square between layers")
    p.add_argument("--cnn-width", type=int, default=64)
    p.add_argument("--cnn-epochs", type=int, default=200)
    p.add_argument("--cnn-patience", type=int, default=20,
                   help="the CNN stops this many epochs after its best validation epoch")
    p.add_argument("--patch-basis", type=patch_basis_arg, default="auto",
                   help="ConvRFM.patch_basis: auto, full or a share of the patches' energy")
    p.add_argument("--out", default=None, help="JSON file for this run's records")
    p.add_argument("--filters", default=None,
                   help="PNG: ConvRFM's first-layer M beside the CNN's first-layer filters "
                        "and W^T W")
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
    basis = args.patch_basis
    layer = ConvRFM(depth=3, iters=args.iters, patience=args.patience or None,
                    padding=args.padding, random_state=args.seed, patch_basis=basis,
                    options=Options.of(verbose=True), **extra)
    model = DeepConvRFM(layer, layers=3, width=args.width, layer_patience=None,
                        normalise=args.normalise, activation=args.activation,
                        feature_basis=args.feature_basis,
                        pool=args.pool, pool_mode=args.pool_mode,
                        total_depth=None if args.pool > 1 else 3)
    model.fit(ds.X_train, ds.y_train, monitor=(ds.X_test, ds.y_test), **ds.validation())
    rows = results(model)
    cnn, network = cnn_row(ds.X_train, ds.y_train, args.seed, layer.val_fraction, ds.X_test,
                           ds.y_test, args.cnn_width, args.cnn_epochs, ds.X_val, ds.y_val,
                           args.cnn_patience)
    rows.append(cnn)
    if args.filters:
        first = model.layers_[0]
        chosen = (f"ConvRFM's M\n(iteration {first['best_iter']})" if first["learned"]
                  else "ConvRFM: M = I\n(chosen)")
        weights = network.features[0].weight.detach().double().numpy()
        plot_cnn_comparison([(chosen, first["M"].double().numpy())], weights, args.filters,
                            title=f"{ds.name}: top eigenvectors of ConvRFM's first-layer M "
                                  f"beside the CNN's first layer (value above each)")
        print(f"wrote {args.filters}")
    if args.pool > 1:
        task += f", pool {args.pool}" + (f" ({args.pool_mode})" if args.pool_mode != "avg" else "")
    if args.activation != "none":
        task += f", {args.activation} between layers"
    if args.feature_basis is not None:
        task += f", feature basis {args.feature_basis}"
    if basis != "auto":
        task += f", patch basis {basis}"
    if args.normalise:
        task += ", normalised"
    run = {"task": task, "n_train": len(ds.y_train), "n_test": len(ds.y_test),
           "width": args.width, "iters": args.iters, "patience": args.patience,
           "pool": args.pool, "padding": args.padding, "patch_basis": basis,
           "normalise": args.normalise, "activation": args.activation,
           "pool_mode": args.pool_mode, "feature_basis": args.feature_basis,
           "filter_power": model.filter_power, "rows": rows}
    print(markdown([run]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
