"""Peak memory of Ray shard workers on ImageNet-shaped images: what sets it, measured.

Fits ConvRFM (``--layers 1``) or Deep ConvRFM on RGB images of ``--size`` pixels made from
Fashion-MNIST (``tools.bench.imagenet_shaped``: real content and labels, resized and tinted),
with the Nystrom solver on W Ray workers, and prints one JSON line: every worker's peak
resident memory after each layer, the driver's, seconds, validation and test accuracy.

    python examples/worker_memory.py --size 64 --n-train 4000 --layers 2 --centers 500
    python examples/worker_memory.py --size 224 --n-train 1000 --layers 1 --centers 500 --iters 1

``--float32`` passes the images as float32 instead of their 8-bit pixels (what earlier
versions held on the workers). It uses only APIs that exist since the scale-out solver, so the
same command measures an older checkout.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--depth", type=int, default=2, help="the last layer's kernel depth")
    p.add_argument("--width", type=int, default=64, help="filters per learned bank")
    p.add_argument("--centers", type=int, default=500)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-budget-mb", type=int, default=512)
    p.add_argument("--float32", action="store_true", help="float32 images, not uint8 pixels")
    args = p.parse_args(argv)

    import numpy as np

    from ray_convrfm import ConvRFM, DeepConvRFM, Options
    from ray_convrfm.tools.bench import imagenet_shaped
    from ray_convrfm.tools.outputs import peak_rss_mb

    ds = imagenet_shaped(args.size, args.n_train, args.n_test)
    to_pixels = (lambda X: X) if args.float32 else \
        (lambda X: np.rint(X * np.float32(255)).astype(np.uint8))
    X, Xt = to_pixels(ds.X_train), to_pixels(ds.X_test)
    options = Options.of(workers=args.workers, memory_budget_mb=args.memory_budget_mb)
    base = ConvRFM(depth=args.depth, iters=args.iters, solver="nystrom", centers=args.centers,
                   agop_samples=64, random_state=0, options=options)
    model = base if args.layers == 1 else DeepConvRFM(base, layers=args.layers,
                                                      width=args.width, layer_patience=None)
    t0 = time.perf_counter()
    model.fit(X, ds.y_train)
    seconds = time.perf_counter() - t0
    histories = [model.history_] if args.layers == 1 else \
        [info["history"] for info in model.layers_]
    t1 = time.perf_counter()
    test_acc = float(np.mean(model.predict(Xt) == ds.y_test))
    result = {
        "size": args.size, "n_train": args.n_train, "layers": args.layers,
        "width": args.width, "centers": args.centers, "iters": args.iters,
        "workers": args.workers, "memory_budget_mb": args.memory_budget_mb,
        "images": str(X.dtype), "shard_mb": X.nbytes / args.workers / 2**20,
        "fit_seconds": seconds, "predict_seconds": time.perf_counter() - t1,
        "worker_peak_rss_mb_after_layer": [h[-1]["worker_peak_rss_mb"] for h in histories],
        "driver_peak_rss_mb": peak_rss_mb(),
        "val_acc_by_layer": [max(r["val_acc"] for r in h) for h in histories],
        "test_acc": test_acc,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
