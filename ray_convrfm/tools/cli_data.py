"""The command line's data sets on disk: ``convert``, and ``fit --dataset`` read in place.

``fit --dataset parquet:PATH | hf:PATH | folder:DIR | imagenet:DIR`` leaves the training images
where they are (``data.sources``): each Ray worker reads, decodes and resizes its own rows; the
report split (``--test-split``, default the first of validation, val, test the set has) is
read here. ``convert`` writes the project's parquet layout, from a folder tree or Hugging Face
shards one output file per Ray task with ``--workers``.
"""

from __future__ import annotations

import argparse
import time

from ray_convrfm.tools.outputs import UsageError

__all__ = ["add_convert_parser", "add_disk_arguments", "cmd_convert", "disk_fit_data",
           "disk_name", "size_of"]


def size_of(text: str | None) -> tuple[int, int] | None:
    """'HxW' (e.g. 64x64) as (H, W)."""
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"sizes are HxW, e.g. 64x64; found {text!r}") from None
    return h, w


def add_disk_arguments(p: argparse.ArgumentParser, report_split: bool = False) -> None:
    """How on-disk images are read: resize policy, channels, a flat split's labels file (and
    with ``report_split``, ``fit``'s report split)."""
    if report_split:
        p.add_argument("--test-split", default=None,
                       help="parquet:, hf:, folder:: the split reported on (default the first "
                            "of validation, val, test the set has; none: no report)")
    p.add_argument("--resize-mode", default=None, choices=("crop", "stretch"),
                   help="how --resize/--size is reached: crop (scale to cover, centre crop: "
                        "ImageNet's; default for hf: and folder:) or stretch (default for "
                        "parquet: and convert)")
    p.add_argument("--channels", type=int, default=None, choices=(1, 3),
                   help="hf:, folder:: decode images to 1 (grey) or 3 channels (default 3)")
    p.add_argument("--labels-file", default=None,
                   help="folder:: labels of a flat val/ (LOC_val_solution.csv, or lines "
                        "'filename class'); default: found beside the tree")


def disk_fit_data(args: argparse.Namespace):
    """An on-disk set for ``fit``: training images left in place for the workers to read, the
    report split's images (for reporting) read here."""
    from types import SimpleNamespace

    from ray_convrfm.data.sources import held_out_split, open_disk_images

    if args.noise_frame:
        raise UsageError("--noise-frame works on in-memory data sets, not on-disk ones")
    kw = {"size": size_of(args.resize), "resize": args.resize_mode, "channels": args.channels,
          "labels_file": args.labels_file}
    train = open_disk_images(args.dataset, "train", limit=args.n_train, **kw)
    split = args.test_split or held_out_split(args.dataset)
    X_test, y_test = train.read([])  # none: no report split
    if split not in (None, "none"):
        X_test, y_test = open_disk_images(args.dataset, split, limit=args.n_test, **kw).read()
    return SimpleNamespace(name=disk_name(args.dataset, train), X_train=train, y_train=None,
                           X_test=X_test, y_test=y_test,
                           validation=lambda: {})  # carved from the set's own units at fit


def disk_name(spec: str, images) -> str:
    """The name of an on-disk set: its manifest's (the project's layout), else its folder's."""
    name = getattr(getattr(images, "manifest", None), "name", None)
    return name or spec.partition(":")[2].rstrip("/").rsplit("/", 1)[-1]


def add_convert_parser(sub, common: argparse.ArgumentParser) -> None:
    """The ``convert`` subcommand and its flags."""
    v = sub.add_parser("convert", parents=[common],
                       help="write a data set as parquet shards (encoded images + labels) for "
                            "fits at scale")
    v.add_argument("source", help="digits | fashion-mnist | idx:DIR | npz:PATH | folder:DIR or "
                                  "imagenet:DIR (DIR/[train|test|val]/<class>/*.png|jpg, a "
                                  "flat val/ with --labels-file) | hf:PATH (Hugging Face "
                                  "shards)")
    v.add_argument("out", help="output directory or URL (s3://..., gs://...)")
    v.add_argument("--encoding", default="png", choices=("png", "jpeg"))
    v.add_argument("--quality", type=int, default=95, help="JPEG quality")
    v.add_argument("--size", default=None, help="resize every image to HxW, e.g. 64x64")
    v.add_argument("--rows-per-file", type=int, default=16384)
    v.add_argument("--rows-per-group", type=int, default=1024,
                   help="rows per parquet row group: the unit a worker reads")
    v.add_argument("--data-root", default=None)
    v.add_argument("--download", action="store_true")
    v.add_argument("--overwrite", action="store_true",
                   help="replace the data set at OUT: deletes only the files its dataset.json "
                        "names (files this command wrote), never others")
    v.add_argument("--follow-symlinks", action="store_true",
                   help="folder:DIR: read symbolic links that lead out of DIR (refused "
                        "otherwise)")
    v.add_argument("--splits", default=None,
                   help="folder:, hf:: comma-separated splits to convert (default all)")
    v.add_argument("--workers", type=int, default=None,
                   help="folder:, hf:: Ray tasks at a time, one per output file (default: "
                        "in this process)")
    v.add_argument("--address", default=None,
                   help="Ray cluster to join (auto, ray://...); default: an embedded local Ray")
    add_disk_arguments(v)
    v.add_argument("--quiet", action="store_true")


def cmd_convert(args: argparse.Namespace) -> int:
    from ray_convrfm.data.parquet import convert, open_parquet_dataset

    t0 = time.perf_counter()
    out = convert(args.source, args.out, encoding=args.encoding, size=size_of(args.size),
                  channels=args.channels, quality=args.quality,
                  rows_per_file=args.rows_per_file, rows_per_group=args.rows_per_group,
                  overwrite=args.overwrite, progress=not args.quiet, root=args.data_root,
                  download=args.download, follow_symlinks=args.follow_symlinks,
                  resize=args.resize_mode or "stretch", labels_file=args.labels_file,
                  splits=args.splits.split(",") if args.splits else None,
                  workers=args.workers, address=args.address)
    m = open_parquet_dataset(out)
    seconds = time.perf_counter() - t0
    n = sum(m.rows(s) for s in m.groups)
    print(f"wrote {out}: {m!r} in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} images/s)")
    return 0
