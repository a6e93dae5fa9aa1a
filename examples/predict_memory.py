"""Driver memory of a batch prediction against the number of images (parquet, Ray workers).

    python examples/predict_memory.py --sizes 1000,10000 --workers 2

Writes an ImageNet-shaped parquet set (3 x 32 x 32 PNGs, 10 classes: a class's colour and
stripes plus noise) and a ConvRFM fitted on 200 of its training images, then, per size N, in a
fresh process: ``predict_to_parquet`` of the first N test images with the workers reading
their own rows; prints one JSON line per size with the driver's peak RSS (VmHWM) before and
after it, seconds, images/s, and whether the parts equal ``model.predict`` and
``decision_function`` (rtol 1e-5) on the same images, read into the driver afterwards (the
peak after that check, ``..._after_check``, shows what holding the images costs).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_mib() -> float:
    """This process's peak RSS: VmHWM (``ru_maxrss`` would carry the parent's peak over
    ``fork`` + ``exec``)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**10
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux


def make(work: Path, n_test: int) -> None:
    """The data set and the saved model (once)."""
    import numpy as np

    from ray_convrfm import ConvRFM
    from ray_convrfm.data.images import ImageDataset
    from ray_convrfm.data.parquet import write_parquet_dataset

    rng = np.random.default_rng(0)

    def images(n: int):
        y = rng.integers(0, 10, n)
        colour = np.stack([(y % 3) / 2, (y // 3 % 3) / 2, (y % 2) * 1.0], 1)
        stripes = np.sin(np.arange(32)[None, :] * (1 + y[:, None]) / 3)
        X = 0.5 * colour[:, :, None, None] + 0.25 * stripes[:, None, :, None] \
            + 0.15 * rng.standard_normal((n, 3, 32, 32))
        return np.clip(X + 0.25, 0, 1).astype(np.float32), y

    X_train, y_train = images(1000)
    X_test, y_test = images(n_test)
    ds = ImageDataset(X_train, y_train, X_test, y_test, name="shapes32",
                      classes=tuple(str(k) for k in range(10)))
    write_parquet_dataset(ds, work / "data", rows_per_group=256, overwrite=True)
    ConvRFM(depth=2, iters=1, random_state=0).fit(X_train[:200], y_train[:200]).save(
        work / "model")


def measure(work: Path, n: int, workers: int) -> dict:
    """One batch prediction of the first n test images (run in its own process)."""
    import numpy as np

    from ray_convrfm import ConvRFM, Options
    from ray_convrfm.data.parquet import ParquetImages
    from ray_convrfm.data.predictions import read_predictions

    model = ConvRFM.load(work / "model", options=Options.of(workers=workers))
    images = ParquetImages.open(work / "data", "test", limit=n)
    before = peak_mib()
    t0 = time.perf_counter()
    done = model.predict_to_parquet(images, work / f"preds-{n}", overwrite=True)
    seconds = time.perf_counter() - t0
    after = peak_mib()
    X, _ = images.read()  # the check, outside the measurement
    table = read_predictions(work / f"preds-{n}")
    scores = np.stack(table.column("scores").to_numpy(zero_copy_only=False))
    predicted, expected = model.predict(X), model.decision_function(X)
    model.close()
    return {"images": n, "workers": workers, "driver_peak_mib_before": round(before),
            "driver_peak_mib_after": round(after),
            "driver_peak_mib_after_check": round(peak_mib()), "seconds": round(seconds, 1),
            "images_per_s": round(n / seconds), "accuracy": done.accuracy,
            "parts": done.parts,
            "predict_equal": bool(np.array_equal(table.column("predicted_label").to_numpy(),
                                                 predicted)),
            "scores_close": bool(np.allclose(scores, expected, rtol=1e-5, atol=1e-6))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default="runs/predict-memory")
    p.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    if args.measure is not None:
        print(json.dumps(measure(work, args.measure, args.workers)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    work.mkdir(parents=True, exist_ok=True)
    make(work, max(sizes))
    for n in sizes:  # a fresh process each: its peak is its own
        subprocess.run([sys.executable, __file__, "--work", str(work), "--workers",
                        str(args.workers), "--measure", str(n)], check=True)


if __name__ == "__main__":
    main()
