"""ImageNet-style folder trees, read as they are held: the workers open their own files.

Layouts (``*.png``, ``*.jpg``, ``*.jpeg`` in any case; names starting with ``.`` are skipped)::

    DIR/train/<class>/*.JPEG          class = folder name; classes sorted, label = index
    DIR/val/<class>/*.JPEG            (also test/, validation/), or a flat folder:
    DIR/val/*.JPEG                    labelled by a labels file (below)
    DIR/<class>/*.png                 without train/: DIR is the train split

Classes are the sorted class-folder names of every split, so that labels agree across splits.
A flat split's labels file is ``labels_file=`` or the first found of ``SPLIT/labels.txt``,
``SPLIT/labels.csv`` and, in ``DIR`` or up to three folders above it, ``LOC_SPLIT_solution.csv``,
``SPLIT_labels.txt``, ``SPLIT_labels.csv``, ``SPLIT.txt``. Two forms: Kaggle's CSV
(``ImageId,PredictionString`` with the class as the first token: ``LOC_val_solution.csv``), or
lines ``filename class`` (whitespace or a comma between; ``class`` a class name or an index
into the sorted classes, as Caffe's ``val.txt``); a file name may omit its extension.

The manifest is the file listing (``os.scandir``, no file opened) and the labels: nothing that
grows with the pixels. Symbolic links that lead out of ``DIR`` are refused unless
``follow_symlinks``. The folder must be at the same path on every worker (a shared file
system), as any local path a fit reads.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from ray_convrfm.data import images as img
from ray_convrfm.data.ondisk import DiskImages, DiskRows, check_resize

__all__ = ["FolderImages", "FolderTree", "scan_tree"]

SUFFIXES = (".png", ".jpg", ".jpeg")
_HEADERS = ("filename", "file", "image", "imageid", "image_id", "name", "path")
#: Folder names that are splits when ``DIR/train/`` exists.
SPLIT_FOLDERS = ("train", "test", "val", "validation")


class FolderTree(NamedTuple):
    """A tree's classes and split folders, from listings only."""
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, Path]
    follow_symlinks: bool


def check_link(path: Path, root: Path, follow_symlinks: bool) -> Path:
    """``path``, unless a symbolic link out of ``root`` and not ``follow_symlinks``."""
    if not follow_symlinks and path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(root):
            raise ValueError(
                f"{path} is a symbolic link to {target}, outside the folder {root} being "
                "read; pass follow_symlinks=True to "
                "read what links outside it point to")
    return path


def _images_under(folder: Path, root: Path, follow_symlinks: bool) -> list[str]:
    """Every image file under ``folder``, sorted as paths, links checked; a folder is visited
    once (links in circles end)."""
    out, stack, seen = [], [folder], {folder.resolve()}
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.is_symlink():
                    check_link(Path(e.path), root, follow_symlinks)
                if e.is_dir():
                    if (r := Path(e.path).resolve()) not in seen:
                        seen.add(r)
                        stack.append(Path(e.path))
                elif (e.is_file() and e.name.lower().endswith(SUFFIXES)
                      and not e.name.startswith(".")):
                    out.append(e.path)
    return sorted(out, key=lambda p: p.split(os.sep))


def _subfolders(folder: Path, root: Path, follow_symlinks: bool) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if check_link(p, root, follow_symlinks).is_dir() and not p.name.startswith("."))


def scan_tree(directory: str | os.PathLike[str], follow_symlinks: bool = False) -> FolderTree:
    """The classes and split folders of a tree (see the module's layouts)."""
    directory = Path(directory).expanduser().absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"folder data set {directory} is not a directory")
    root = directory.resolve()
    dirs = {s: check_link(directory / s, root, follow_symlinks) for s in SPLIT_FOLDERS
            if (directory / s).is_dir()}
    if dirs and "train" not in dirs:
        raise ValueError(f"{directory}: has a {next(iter(dirs))}/ folder but no train/ folder")
    dirs = dirs or {"train": directory}
    classes = tuple(sorted({c for d in dirs.values()
                            for c in _subfolders(d, root, follow_symlinks)}))
    if not classes:
        raise ValueError(f"{directory}: no class folders found; expected "
                         f"{directory}/[train|test]/<class>/*.png|jpg|jpeg")
    return FolderTree(directory, classes, dirs, follow_symlinks)


def list_split(tree: FolderTree, split: str, labels_file: str | os.PathLike[str] | None = None
               ) -> tuple[list[str], np.ndarray]:
    """The image files of ``split`` (paths relative to the tree's root) and their labels:
    class folder by class folder, or a flat folder's files labelled by its labels file
    (none: empty)."""
    if split not in tree.splits:
        raise ValueError(f"{tree.root}: no split {split!r}; found {sorted(tree.splits)}")
    folder, root = tree.splits[split], tree.root.resolve()
    cut = len(str(tree.root)) + 1
    subfolders = _subfolders(folder, root, tree.follow_symlinks)
    files: list[str] = []
    if subfolders:
        labels = []
        for cls in subfolders:
            found = _images_under(folder / cls, root, tree.follow_symlinks)
            files += [p[cut:] for p in found]
            labels += [tree.classes.index(cls)] * len(found)
        y = np.asarray(labels, dtype=np.int64)
    else:
        files = [p[cut:] for p in _images_under(folder, root, tree.follow_symlinks)]
        y = (_flat_labels(tree, split, folder, files, labels_file) if files
             else np.zeros(0, np.int64))
    return files, y


def _labels_file(tree: FolderTree, split: str, folder: Path) -> Path:
    names = (f"LOC_{split}_solution.csv", f"{split}_labels.txt", f"{split}_labels.csv",
             f"{split}.txt")
    places = [folder / "labels.txt", folder / "labels.csv"]
    places += [d / n for d in [tree.root, *tree.root.parents][:4] for n in names]
    for p in places:
        if p.is_file():
            return p
    raise ValueError(f"{folder}: images without class folders and no labels file (looked for "
                     f"{', '.join(str(p) for p in places[:6])}, ...); pass labels_file= "
                     "(CSV ImageId,PredictionString, or lines 'filename class')")


def _flat_labels(tree: FolderTree, split: str, folder: Path, files: list[str],
                 labels_file: str | os.PathLike[str] | None) -> np.ndarray:
    path = Path(labels_file) if labels_file is not None else _labels_file(tree, split, folder)
    by_name = read_labels_file(path, tree.classes)
    y = np.empty(len(files), dtype=np.int64)
    for i, f in enumerate(files):
        name = f.rsplit("/", 1)[-1]
        label = by_name.get(name, by_name.get(name.rsplit(".", 1)[0]))
        if label is None:
            raise ValueError(f"{path}: no label for {tree.root / f}")
        y[i] = label
    return y


def read_labels_file(path: Path, classes: Sequence[str]) -> dict[str, int]:
    """``{file name or stem: label}`` of a labels file (the module's two forms); a line that
    is not ``name class``, an unknown class or a name labelled twice is a ``ValueError``
    naming the file and line."""
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the labels file ({exc})") from exc
    kaggle = bool(lines) and lines[0].replace(" ", "").lower() == "imageid,predictionstring"
    rows = csv.reader(lines[1:]) if kaggle else (
        line.replace(",", " ").split() for line in lines)
    for number, fields in enumerate(rows, start=2 if kaggle else 1):
        if not fields or fields[0].startswith("#") or (
                number == 1 and fields[0].lower() in _HEADERS):  # a header line
            continue
        tokens = [fields[0], *fields[1].split()[:1]] if kaggle and len(fields) == 2 else fields
        if len(tokens) != 2:
            raise ValueError(f"{path}, line {number}: expected 'filename class'"
                             f"{' (ImageId,PredictionString)' if kaggle else ''}; found "
                             f"{','.join(fields)[:80]!r}")
        name, cls = tokens
        label = index.get(cls)
        if label is None and cls.isdigit() and int(cls) < len(classes):
            label = int(cls)
        if label is None:
            raise ValueError(f"{path}, line {number}: class {cls!r} is neither one of the "
                             f"{len(classes)} class folders ({', '.join(classes[:3])}, ...) "
                             "nor an index into them")
        if out.setdefault(name, label) != label:
            raise ValueError(f"{path}, line {number}: {name} is labelled twice, as "
                             f"{classes[out[name]]!r} and {cls!r}")
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class FolderImages(DiskImages):
    """One split of a folder tree, read where it is used: pass it to ``fit`` in place of an
    image array. The driver holds the file list and labels; each worker opens, decodes and
    resizes its own files. ``size`` ``(H, W)`` resizes (``resize``: ``"crop"``, scaled to cover
    it then centre-cropped, the ImageNet convention; ``"stretch"``); without it every image
    must have the first one's size. ``channels``: 3 (grey converted) or 1."""

    root: str
    split: str
    classes: tuple[str, ...]
    files: pa.Array  # paths relative to root, one per row
    targets: np.ndarray  # int64 labels, one per row
    size: tuple[int, int] | None = None
    channels: int = 3
    resize: str = "crop"
    first: tuple[int, int, str] | None = None  # (H, W, file) of row 0 when size is None

    @classmethod
    def open(cls, path: str | os.PathLike[str], split: str = "train",
             size: tuple[int, int] | None = None, channels: int = 3, resize: str = "crop",
             limit: int | None = None, shuffle_seed: int | None = 0,
             labels_file: str | os.PathLike[str] | None = None,
             follow_symlinks: bool = False) -> FolderImages:
        """Open ``split`` of the tree at ``path`` from its listing. Rows come class by class
        on disk; ``shuffle_seed`` (None: keep that order) shuffles them, so that ``limit``
        (the first rows) samples every class and each worker's shard mixes them."""
        tree = scan_tree(path, follow_symlinks)
        files, y = list_split(tree, split, labels_file)
        if not files:
            raise ValueError(f"{tree.root}: no *.png/*.jpg/*.jpeg images in the {split} split")
        out = cls(str(tree.root), split, tree.classes, pa.array(files, pa.string()), y,
                  img.check_size(size), img.check_channels(channels), check_resize(resize))
        if shuffle_seed is not None:
            out = out.take(np.random.default_rng(shuffle_seed).permutation(len(files)))
        out = out if limit is None else out.take(np.arange(min(int(limit), len(files))))
        return out if out.size is not None else out._sized()

    def take(self, order: np.ndarray) -> FolderImages:
        """The rows ``order`` (row numbers), in that order, as a set of their own."""
        order = np.asarray(order, dtype=np.int64)
        return dataclasses.replace(self, files=self.files.take(pa.array(order)),
                                   targets=self.targets[order])

    def _sized(self) -> FolderImages:
        """With the size of row 0 (its header only: the image is not decoded)."""
        from PIL import Image

        path = self.path(0)
        try:
            with Image.open(path) as im:  # lazy: reads the header only
                w, h = im.size
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{path}: not a readable image ({exc})") from exc
        return dataclasses.replace(self, first=(h, w, str(path)))

    def path(self, i: int) -> Path:
        return Path(self.root) / self.files[i].as_py()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        h, w = self.size or self.first[:2]
        return (len(self), self.channels, int(h), int(w))

    def labels(self) -> np.ndarray:
        return self.targets.copy()

    def rows(self, ranges: Sequence[tuple[int, int]], dtype: str = "uint8") -> DiskRows:
        """The rows as a set of their own files only: what a worker receives is small."""
        ranges = tuple((int(a), int(b)) for a, b in ranges)
        if ranges == ((0, len(self)),):
            return DiskRows(self, ranges, dtype)
        idx = np.concatenate([np.arange(a, b) for a, b in ranges] or [np.zeros(0, np.int64)])
        return DiskRows(self.take(idx), ((0, len(idx)),), dtype)

    def encoded(self, ranges: Sequence[tuple[int, int]]
                ) -> Iterator[tuple[bytes | None, int, str]]:
        for a, b in ranges:
            for i in range(a, b):
                path = self.path(i)
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    raise ValueError(f"{path}: cannot read the image ({exc})") from exc
                yield data, int(self.targets[i]), str(path)

    def read(self, ranges: Sequence[tuple[int, int]] | None = None, dtype: str = "float32"
             ) -> tuple[np.ndarray, np.ndarray]:
        ranges = [(0, len(self))] if ranges is None else list(ranges)
        if dtype not in ("float32", "uint8"):
            raise ValueError(f"dtype must be 'float32' or 'uint8'; found {dtype!r}")
        X = np.empty((sum(b - a for a, b in ranges), *self.shape[1:]), dtype=dtype)
        expected = None if self.first is None else f"the first image ({self.first[2]}) is"
        for j, (data, _, where) in enumerate(self.encoded(ranges)):
            try:
                img.decode_to(X[j], data, self.size, self.resize == "crop", expected)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
        idx = [np.arange(a, b) for a, b in ranges]
        return X, self.targets[np.concatenate(idx)] if idx else np.zeros(0, np.int64)

    def __repr__(self) -> str:  # never the file list
        return (f"FolderImages({self.root!r}, split={self.split!r}, {len(self)} images, "
                f"{len(self.classes)} classes, shape={self.shape[1:]}, resize={self.resize!r})")
