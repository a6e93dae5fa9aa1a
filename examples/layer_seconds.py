"""Seconds per layer of a Deep ConvRFM fit on Fashion-MNIST, without monitored test images:
each layer's iterations' kernel, solve and AGOP seconds, and their means over the iterations
that learn (those with an AGOP), so a pooled layer's cost can be set beside the first's.

Run:  python examples/layer_seconds.py --n-train 10000 --layers 2 --pool 2 --pool-mode max \
          --feature-basis 0.99

(the README's n = 10,000 per-iteration seconds, "Where the goals stand").
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics

from ray_convrfm import ConvRFM, DeepConvRFM
from ray_convrfm.data.datasets import load_dataset
from ray_convrfm.options import Options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--pool", type=int, default=2)
    p.add_argument("--pool-mode", default="max")
    p.add_argument("--feature-basis", type=float, default=None)
    p.add_argument("--out", help="JSON file for the per-iteration records")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ds = load_dataset("fashion-mnist")
    layer = ConvRFM(depth=3, iters=args.iters, patience=2, padding=True, random_state=0,
                    options=Options.of(verbose=True))
    model = DeepConvRFM(layer, layers=args.layers, width=64, layer_patience=None,
                        feature_basis=args.feature_basis, pool=args.pool,
                        pool_mode=args.pool_mode, total_depth=None if args.pool > 1 else 3)
    model.fit(ds.X_train[: args.n_train], ds.y_train[: args.n_train])
    stages = ("seconds_kernel", "seconds_solve", "seconds_agop")
    records = []
    print("| layer | seconds | iterations | kernel / solve / AGOP s, mean of learning "
          "iterations | their sum |")
    print("| --- | --- | --- | --- | --- |")
    for k, info in enumerate(model.layers_, start=1):
        # every iteration but a layer's last takes an AGOP (the last ends the layer)
        learning = info["history"][:-1] or info["history"]
        means = [statistics.mean(h[s] for h in learning) for s in stages]
        print(f"| {k} | {info['seconds']:.0f} | {len(info['history'])} | "
              f"{' / '.join(f'{m:.1f}' for m in means)} | {sum(means):.1f} |")
        records.append({"layer": k, "seconds": info["seconds"], "best_iter": info["best_iter"],
                        "iterations": [{s: h[s] for s in (*stages, "val_acc", "ridge")}
                                       for h in info["history"]]})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
