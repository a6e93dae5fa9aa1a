"""ConvRFM vs the fixed convolutional kernel on Fashion-MNIST and its local-signal variant.

Run:  python examples/fashion_mnist.py [--n-train 2000] [--n-test 2000] [--noise-frame 42]

The fixed kernel (CNTK) is iteration 0 of the same fit (M = I); the ridge and the iteration kept
are chosen on a validation split carved from the training images.
"""

import argparse
import logging

from ray_convrfm import ConvRFM, Options
from ray_convrfm.data.datasets import load_fashion_mnist, with_noise_frame


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--noise-frame", type=int, default=None)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    ds = load_fashion_mnist().subset(args.n_train, args.n_test)
    if args.noise_frame:
        ds = with_noise_frame(ds, frame=args.noise_frame)
    model = ConvRFM(depth=3, iters=args.iters, options=Options.of(verbose=True))
    model.fit(ds.X_train, ds.y_train, monitor=(ds.X_test, ds.y_test))
    fixed = model.history_[0]["monitor_acc"]
    learned = model.score(ds.X_test, ds.y_test)
    print(f"{ds.name}: fixed kernel {100 * fixed:.2f}%, ConvRFM {100 * learned:.2f}% "
          f"(iteration {model.best_iter_} chosen on validation)")


if __name__ == "__main__":
    main()
