"""On-disk image sets by spec, as the command line names them; each read where it is used.

``parquet:PATH_OR_URL`` (the project's layout, ``dataset.json``), ``hf:PATH_OR_URL`` (Hugging
Face style shards, ``data.hf_parquet``), ``folder:DIR`` or ``imagenet:DIR`` (a folder tree,
``data.folder_tree``; two names for one reader). The layout is named, not guessed: a folder
of parquet files may be either kind, and the kinds differ in what they check. Every kind opens
as a ``data.ondisk.DiskImages`` for ``fit`` (and batch predictions).
"""

from __future__ import annotations

import os

from ray_convrfm.data import images as img
from ray_convrfm.data.folder_tree import FolderImages, scan_tree
from ray_convrfm.data.hf_parquet import hf_splits
from ray_convrfm.data.ondisk import DiskImages
from ray_convrfm.data.parquet import ParquetImages
from ray_convrfm.data.parquet_fs import resolve
from ray_convrfm.data.parquet_io import open_parquet_dataset

__all__ = ["DISK_KINDS", "held_out_split", "is_disk_spec", "open_disk_images", "splits_of"]

DISK_KINDS = ("parquet", "hf", "folder", "imagenet")
#: The split a fit reports on, the first a set has: Hugging Face ImageNet's ``test`` has no
#: labels (all -1), so ``validation`` (and a tree's ``val``) come first.
HELD_OUT_SPLITS = ("validation", "val", "test")


def _parse(spec: str) -> tuple[str, str]:
    kind, _, where = spec.strip().partition(":")
    if kind.lower() not in DISK_KINDS or not where:
        raise ValueError(f"not an on-disk image set spec: {spec!r}; expected "
                         f"{', '.join(k + ':PATH' for k in DISK_KINDS)}")
    return kind.lower(), where


def is_disk_spec(spec: str) -> bool:
    """Whether ``spec`` names an on-disk set (``parquet:``, ``hf:``, ``folder:``, ...)."""
    kind, _, where = spec.strip().partition(":")
    return kind.lower() in DISK_KINDS and bool(where)


def open_disk_images(spec: str, split: str = "train", size: tuple[int, int] | None = None,
                     limit: int | None = None, resize: str | None = None,
                     channels: int | None = None,
                     labels_file: str | os.PathLike[str] | None = None) -> DiskImages:
    """Split ``split`` of the set ``spec`` names, left on disk. ``resize`` defaults to
    ``"stretch"`` for the project's layout (as ``convert --size`` writes it) and ``"crop"``
    for the others (ImageNet's convention); ``channels`` (1 or 3; Hugging Face and folders
    only, default 3) is how images are decoded; ``labels_file`` labels a folder's flat split."""
    kind, where = _parse(spec)
    if kind == "parquet":
        images = ParquetImages.open(where, split, size, limit, resize or "stretch")
        if channels is not None and img.check_channels(channels) != images.manifest.channels:
            raise ValueError(f"{where}: its images have {images.manifest.channels} channel(s) "
                             f"(dataset.json); channels={channels} is for hf: and folder: sets")
        return images
    if kind == "hf":
        return ParquetImages.open_hf(where, split, size, limit, resize or "crop", channels or 3)
    return FolderImages.open(where, split, size, channels or 3, resize or "crop", limit,
                             labels_file=labels_file)


def splits_of(spec: str) -> list[str]:
    """The splits the set ``spec`` names holds, from its manifest or listing only."""
    kind, where = _parse(spec)
    if kind == "parquet":
        return [s for s, groups in open_parquet_dataset(where).groups.items() if groups]
    if kind == "hf":
        fs, root, _ = resolve(where)
        return list(hf_splits(fs, root, where))
    return list(scan_tree(where).splits)


def held_out_split(spec: str) -> str | None:
    """The split a fit on ``spec``'s ``train`` reports on (``HELD_OUT_SPLITS``), or None."""
    have = splits_of(spec)
    return next((s for s in HELD_OUT_SPLITS if s in have), None)
