"""Reading ImageNet as it is held: images/s of conversion and of a fit's first kernel stage.

Writes N ImageNet-shaped JPEGs (``tools.bench.imagenet_shaped``: 3 x S x S, C classes) as a
folder tree ``train/<class>/*.jpg``, the same bytes as Hugging Face style shards
(``data/train-0000i-of-00004.parquet``, ``struct<bytes, path>``) and, through ``convert`` (bytes
kept as they are), as the project's own parquet. Then prints one JSON line per measurement:

* ``convert``: images/s of ``convert folder:TREE`` as stored and re-encoded to ``--resize``,
  in this process and on 1 and 2 Ray workers (Ray started beforehand, not counted), and of
  the previous, single-process ``convert`` when ``--old PATH`` names a copy of that package
  (``git archive <commit> ray_convrfm | tar -x -C PATH``), run in a subprocess;
* ``load``: images/s of one worker's load (read and decode) of every row of each source;
* ``first_stage``: images/s of a ``workers=2`` Nystrom fit's first kernel stage
  (``timings_["nystrom_rows"]``: the workers read, decode and compute their rows of
  K(train, centers)) from each source, each fitted twice (the first ones warm Ray up).

    python examples/ondisk_rates.py --n 5000 --size 64 --classes 100 --old /tmp/head
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_sources(root: Path, n: int, size: int, classes: int) -> dict[str, str]:
    """The three copies of the same JPEGs; returns their specs."""
    import numpy as np

    from ray_convrfm.data import images as img
    from ray_convrfm.data.parquet import convert
    from ray_convrfm.tools.bench import imagenet_shaped

    ds = imagenet_shaped(size, n, 1, seed=0, classes=classes)  # (no empty test split)
    rows = []
    for i, (x, y) in enumerate(zip(ds.X_train, ds.y_train, strict=True)):
        data = img.encode_image(x, "jpeg", quality=90)
        path = root / "tree" / "train" / f"c{int(y):04d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append((data, int(y)))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from image_files import write_hf

    order = np.random.default_rng(0).permutation(n)  # the Hub's shards come shuffled
    write_hf(root / "hf", "train", [rows[i] for i in order], shards=4, row_group_size=256)
    convert(f"folder:{root / 'tree'}", root / "pq", encoding="jpeg", rows_per_group=256)
    return {"folder": f"folder:{root / 'tree'}", "hf": f"hf:{root / 'hf'}",
            "parquet": f"parquet:{root / 'pq'}"}


def convert_rates(root: Path, n: int, resize: int, old: str | None, per_file: int) -> None:
    from ray_convrfm.backends.embedded_ray import start_ray
    from ray_convrfm.data.parquet import convert

    start_ray(2)
    convert(f"folder:{root / 'tree'}", root / "out", encoding="jpeg", workers=2,
            rows_per_file=per_file)  # warm-up: Ray's worker processes start here, untimed
    for label, size in (("as stored", None), (f"re-encoded {resize}x{resize}", (resize,) * 2)):
        runs = [("this process", None), ("1 Ray worker", 1), ("2 Ray workers", 2)]
        for name, workers in runs:
            t0 = time.perf_counter()
            convert(f"folder:{root / 'tree'}", root / "out", encoding="jpeg", size=size,
                    workers=workers, overwrite=True, rows_per_file=per_file)
            print(json.dumps({"measure": "convert", "mode": label, "run": name,
                              "images_per_s": round(n / (time.perf_counter() - t0), 1)}),
                  flush=True)
        if old:
            source, out = f"folder:{root / 'tree'}", str(root / "old")
            code = ("import time; from ray_convrfm.data.parquet import convert; "
                    "t0 = time.perf_counter(); "
                    f"convert({source!r}, {out!r}, encoding='jpeg', size={size!r}, "
                    f"overwrite=True, rows_per_file={per_file}); "
                    "print(time.perf_counter() - t0)")
            env = {**os.environ, "PYTHONPATH": old}
            seconds = float(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                           capture_output=True, text=True).stdout.split()[-1])
            print(json.dumps({"measure": "convert", "mode": label, "run": "previous convert",
                              "images_per_s": round(n / seconds, 1)}), flush=True)


def load_rates(specs: dict[str, str], n: int) -> None:
    from ray_convrfm.data.sources import open_disk_images

    for kind, spec in specs.items():
        rows = open_disk_images(spec, channels=3).rows([(0, n)])
        t0 = time.perf_counter()
        rows.load()
        print(json.dumps({"measure": "load", "source": kind,
                          "images_per_s": round(n / (time.perf_counter() - t0), 1)}), flush=True)


def first_stage(specs: dict[str, str], n: int, centers: int, depth: int) -> None:
    from ray_convrfm import ConvRFM, Options
    from ray_convrfm.data.sources import open_disk_images

    for kind, spec in [*specs.items(), *specs.items()]:  # twice: the first fit warms up
        model = ConvRFM(depth=depth, iters=1, solver="nystrom", centers=centers, random_state=0,
                        options=Options.of(workers=2, verbose=False))
        images = open_disk_images(spec, channels=3)
        X_val, y_val = images.read([(0, 100)])  # given: every source fits all its n rows
        model.fit(images, X_val=X_val, y_val=y_val)
        seconds = model.timings_["nystrom_rows"]
        model.close()
        print(json.dumps({"measure": "first_stage", "source": kind, "n": n, "m": centers,
                          "seconds": round(seconds, 2),
                          "images_per_s": round(n / seconds, 1)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--resize", type=int, default=56, help="the re-encoding conversion's size")
    p.add_argument("--rows-per-file", type=int, default=1000,
                   help="conversion: rows per output file, each file one task")
    p.add_argument("--centers", type=int, default=100)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--old", default=None, help="a copy of the previous package, to compare")
    p.add_argument("--skip", nargs="*", default=(), choices=("convert", "load", "first_stage"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        specs = write_sources(root, args.n, args.size, args.classes)
        if "convert" not in args.skip:
            convert_rates(root, args.n, args.resize, args.old, args.rows_per_file)
        if "load" not in args.skip:
            load_rates(specs, args.n)
        if "first_stage" not in args.skip:
            first_stage(specs, args.n, args.centers, args.depth)


if __name__ == "__main__":
    main()
