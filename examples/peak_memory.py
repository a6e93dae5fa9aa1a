"""Peak resident memory of ConvRFM.fit on N Fashion-MNIST images (default 4,000).

Run:  python examples/peak_memory.py [--n-train 4000] [--iters 2]

Reports the process's peak RSS (``resource.getrusage``), which includes Python, torch and the
loaded data set (the full 70,000-image Fashion-MNIST is read, then subset).
"""

import argparse
import resource
import time

from ray_convrfm import ConvRFM
from ray_convrfm.data.datasets import load_fashion_mnist


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--depth", type=int, default=3)
    args = p.parse_args()
    ds = load_fashion_mnist().subset(args.n_train, 0)
    before = peak_rss_gib()
    t0 = time.perf_counter()
    model = ConvRFM(depth=args.depth, iters=args.iters).fit(ds.X_train, ds.y_train)
    val_acc = model.history_[model.best_iter_]["val_acc"]
    print(f"fit on {args.n_train} images, depth {args.depth}, {args.iters} iterations: "
          f"{time.perf_counter() - t0:.0f} s, val acc {val_acc:.4f}")
    print(f"peak RSS: {peak_rss_gib():.2f} GiB (before fit: {before:.2f} GiB)")


if __name__ == "__main__":
    main()
