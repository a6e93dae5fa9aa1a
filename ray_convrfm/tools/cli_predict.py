"""``ray-convrfm predict MODEL DATA --out OUT``: batch predictions written where the data is.

MODEL is a folder ``fit`` wrote (``OUT/model``: a ``ConvRFM`` or a ``DeepConvRFM``), DATA a
data set spec as ``fit --dataset`` takes it and ``--split`` its split. An on-disk set
(``parquet:``, ``hf:``, ``folder:``/``imagenet:``, ``data.sources``) stays on disk: every worker
reads and decodes its own rows; the other sets are loaded here and sent to the workers in
blocks. Each worker writes its part of OUT, ``_SUCCESS`` comes last
(``data.predictions``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ray_convrfm.tools.cli_data import add_disk_arguments, disk_name, size_of
from ray_convrfm.tools.outputs import UsageError


def add_predict_parser(sub, common: argparse.ArgumentParser) -> None:
    """The ``predict`` subcommand and its flags (defaults from ``ComputeOptions`` and
    ``ClusterOptions``, as ``fit``'s)."""
    from ray_convrfm.options import ENGINES, ClusterOptions, ComputeOptions

    compute, cluster = ComputeOptions(), ClusterOptions()
    p = sub.add_parser("predict", parents=[common],
                       help="score a data set with a saved model; each worker writes its "
                            "predictions and scores as a parquet part of --out")
    p.add_argument("model", help="a model folder written by fit (OUT/model)")
    p.add_argument("data", help="digits | digits-noise | fashion-mnist | idx:DIR | npz:PATH | "
                                "parquet:PATH_OR_URL | hf:PATH_OR_URL | folder:DIR | "
                                "imagenet:DIR (on-disk sets: each worker reads its own rows)")
    p.add_argument("--out", required=True,
                   help="folder (or URL) every worker can write: part-*.parquet, then "
                        "_SUCCESS")
    p.add_argument("--split", default="test",
                   help="the split scored: test | train (on-disk sets: any split they hold, "
                        "e.g. validation, val)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the predictions of an earlier (or interrupted) run in --out")
    p.add_argument("--limit", type=int, default=None, help="the first N images of the split")
    p.add_argument("--resize", default=None,
                   help="HxW: on-disk images are resized to this on the workers as they read")
    add_disk_arguments(p)
    p.add_argument("--data-root", default=None, help="directory holding the dataset files")
    p.add_argument("--download", action="store_true")
    p.add_argument("--noise-frame", type=int, default=None,
                   help="as fit's: each image at a random place in an F x F noise frame")
    p.add_argument("--noise-std", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="the noise frame's seed (fit's --seed)")
    p.add_argument("--device", default=compute.device)
    p.add_argument("--dtype", default=None, choices=("float32", "float64"))
    p.add_argument("--engine", default=compute.engine, choices=ENGINES)
    p.add_argument("--memory-budget-mb", type=int, default=compute.memory_budget_mb)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=cluster.workers,
                   help="Ray shard workers (0: compute in this process)")
    p.add_argument("--address", default=None, help="Ray cluster to join (auto, ray://...)")
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--placement-timeout", type=float, default=cluster.placement_timeout_s)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _data(args: argparse.Namespace):
    """(name, images, labels) of DATA's split: an on-disk split left there (labels stored,
    read by the workers), any other set loaded here."""
    from ray_convrfm.data.datasets import load_dataset, with_noise_frame
    from ray_convrfm.data.sources import is_disk_spec, open_disk_images

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be a positive number of images; found {args.limit}")
    if is_disk_spec(args.data):
        if args.noise_frame:
            raise UsageError("--noise-frame works on in-memory data sets, not on-disk ones")
        images = open_disk_images(args.data, args.split, size=size_of(args.resize),
                                  limit=args.limit, resize=args.resize_mode,
                                  channels=args.channels, labels_file=args.labels_file)
        return disk_name(args.data, images), images, None
    if args.split not in ("test", "train"):
        raise UsageError(f"--split {args.split}: in-memory data sets have test and train")
    if args.resize:
        raise UsageError("--resize works with parquet:, hf: and folder: data sets")
    ds = load_dataset(args.data, root=args.data_root, download=args.download)
    if args.noise_frame:
        ds = with_noise_frame(ds, frame=args.noise_frame, noise_std=args.noise_std,
                              random_state=args.seed)
    X, y = (ds.X_test, ds.y_test) if args.split == "test" else (ds.X_train, ds.y_train)
    return ds.name, X[: args.limit], y[: args.limit]


def load_model(path: str | Path, options):
    """The ``ConvRFM`` or ``DeepConvRFM`` saved in folder ``path`` (its config names it)."""
    from ray_convrfm.models.convrfm import ConvRFM
    from ray_convrfm.models.deep import DeepConvRFM

    config = Path(path) / "config.json"
    try:
        kind = json.loads(config.read_text()).get("model")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} holds no saved model (no config.json); pass the "
                                "model folder fit wrote, OUT/model") from None
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config}: not a saved model's config ({err})") from err
    kinds = {"ConvRFM": ConvRFM, "DeepConvRFM": DeepConvRFM}
    if kind not in kinds:
        raise ValueError(f"{config}: model {kind!r} is none of {sorted(kinds)}")
    return kinds[kind].load(path, options=options)


def cmd_predict(args: argparse.Namespace) -> int:
    """Load the model and DATA, write the predictions, print the accuracy and the path."""
    from ray_convrfm.kernels.threads import configure_threads
    from ray_convrfm.options import Options

    configure_threads(args.threads)
    options = Options.of(device=args.device, dtype=args.dtype, engine=args.engine,
                         memory_budget_mb=args.memory_budget_mb, threads=args.threads,
                         workers=args.workers, address=args.address,
                         gpus_per_worker=args.gpus_per_worker,
                         placement_timeout_s=args.placement_timeout or None,
                         verbose=not args.quiet)
    name, X, y = _data(args)
    model = load_model(args.model, options)
    n = len(X)
    where = f"{args.workers} Ray workers" if args.workers else "this process"
    print(f"{name} ({args.split}): {n} images; {type(model).__name__} from {args.model}, in "
          f"{where} -> {args.out}", flush=True)
    t0 = time.perf_counter()
    with model:  # its workers are released at the end
        done = model.predict_to_parquet(X, args.out, y=y, overwrite=args.overwrite)
    seconds = time.perf_counter() - t0
    if done.accuracy is not None:
        print(f"accuracy {100 * done.accuracy:.2f}% ({done.correct} of {done.rows} images)")
    print(f"wrote {done.path}: {done.rows} predictions in {done.parts} part file(s) and "
          f"_SUCCESS, in {seconds:.1f} s ({done.rows / max(seconds, 1e-9):.0f} images/s)")
    return 0
