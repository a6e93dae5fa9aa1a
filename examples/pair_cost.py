"""What one kernel pair costs as a layer keeps more patch directions: the numba engine's
microseconds per image pair for a first layer (1 channel, 28 x 28) and a pooled later layer
(64 channels, 14 x 14) working in r directions of its patches.

Run:  python examples/pair_cost.py [--n 200] [--repeats 3]

The pair loop reads each pair's first-layer patch products (r values per position) from
memory, so a later layer with fewer positions but more directions can cost as much as the
first (README, "Where the goals stand").
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ray_convrfm.kernels.kernel import KernelParams, kernel_block, prepare_side


def pair_microseconds(n: int, channels: int, size: int, r: int, repeats: int) -> float:
    """Median microseconds per pair of ``kernel_block`` on n random images, r directions."""
    X = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))
    params = KernelParams(depth=3, patch_size=3, padding=True)
    d = channels * 9
    basis = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(1)))[0] \
        if r < d else None
    side = prepare_side(X, torch.eye(r), params, basis)
    kernel_block(side, side, "numba")  # compiled (or loaded from numba's cache) first
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kernel_block(side, side, "numba")
        seconds.append(time.perf_counter() - t0)
    return float(np.median(seconds)) * 1e6 / (n * n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print("| layer | positions | directions r | us per pair |")
    print("| --- | --- | --- | --- |")
    print(f"| first (1 x 28 x 28) | 784 | 9 | "
          f"{pair_microseconds(args.n, 1, 28, 9, args.repeats):.2f} |")
    for r in (1, 9, 24, 59):
        print(f"| pooled (64 x 14 x 14) | 196 | {r} | "
              f"{pair_microseconds(args.n, 64, 14, r, args.repeats):.2f} |")


if __name__ == "__main__":
    main()
