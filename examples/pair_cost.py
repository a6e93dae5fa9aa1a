"""What one kernel pair costs: the numba engine's microseconds per image pair for a first layer
(1 channel, 28 x 28) and a pooled later layer (64 channels, 14 x 14) working in r directions of
its patches, with the engine's tiles of rows and with one row at a time (its order before them).

Run:  python examples/pair_cost.py [--n 1000] [--repeats 3]

With n images of each side the pair loop reads every column's patches once per tile of rows;
one row at a time it read them once per pair, from memory as soon as the images outgrow the
cache (at n = 1,000 a first layer's prepared columns take 28 MB): the tiles are what make a
pooled layer's pairs cheaper than the first layer's (README, "Where the goals stand").
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ray_convrfm.kernels.kernel import KernelParams, kernel_block, prepare_side


def pair_microseconds(n: int, channels: int, size: int, r: int, repeats: int,
                      tile: int | None) -> float:
    """Median microseconds per pair of ``kernel_block`` on n random images, r directions,
    ``tile`` rows per thread's tile (None: the engine's choice)."""
    X = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))
    params = KernelParams(depth=3, patch_size=3, padding=True)
    d = channels * 9
    basis = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(1)))[0] \
        if r < d else None
    side = prepare_side(X, torch.eye(r), params, basis)
    kernel_block(side.rows(0, 8), side, "numba", tile=tile)  # compiled (or loaded) first
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kernel_block(side, side, "numba", tile=tile)
        seconds.append(time.perf_counter() - t0)
    return float(np.median(seconds)) * 1e6 / (n * n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print("| layer | positions | directions r | us per pair, tiles | one row at a time |")
    print("| --- | --- | --- | --- | --- |")
    cases = [("first (1 x 28 x 28)", 1, 28, 9, 784)] + [
        ("pooled (64 x 14 x 14)", 64, 14, r, 196) for r in (1, 9, 24, 59)]
    for name, channels, size, r, positions in cases:
        tiled, single = (pair_microseconds(args.n, channels, size, r, args.repeats, tile)
                         for tile in (None, 1))
        print(f"| {name} | {positions} | {r} | {tiled:.2f} | {single:.2f} |")


if __name__ == "__main__":
    main()
