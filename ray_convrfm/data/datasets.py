"""Image data sets for ConvRFM experiments, by name: Fashion-MNIST and the spec dispatcher.

:func:`load_dataset` turns a short spec (``"digits"``, ``"fashion-mnist"``, ``"idx:DIR"``,
``"npz:PATH"``, ``"parquet:PATH_OR_URL"``) into an :class:`ImageDataset`. The loaders
themselves live in :mod:`~ray_convrfm.data.images` (container, digits, noise frame),
:mod:`~ray_convrfm.data.npz` (``.npz`` archives),
:mod:`~ray_convrfm.data.idx` (IDX files) and :mod:`~ray_convrfm.data.parquet_io` (parquet
shards); all but the parquet reader are re-exported here. Fashion-MNIST is found (or
downloaded) here because its search locations are module settings that users and tests repoint.

Imports go one way: ``images`` <- ``idx``, ``npz``, ``parquet_io``; all but the last <- ``datasets``
<- ``parquet`` (which holds ``convert``, as it needs this dispatcher).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

from ray_convrfm.data.idx import GZIP_MAGIC, IDX_FILES, find_idx_files, load_idx_dir, read_idx
from ray_convrfm.data.images import (
    ImageDataset,
    digit_in_noise,
    load_digits,
    with_noise_frame,
)
from ray_convrfm.data.npz import load_npz

__all__ = [
    "CACHE_DIR",
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV_VAR",
    "FASHION_MNIST_URL",
    "IDX_FILES",
    "ImageDataset",
    "digit_in_noise",
    "item_pairs",
    "item_tuples",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dir",
    "load_npz",
    "read_idx",
    "with_noise_frame",
]

logger = logging.getLogger(__name__)

#: Where Debian's ``dataset-fashion-mnist`` package installs the gzip IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Per-user cache for downloaded data; Fashion-MNIST goes to ``CACHE_DIR / "fashion-mnist"``.
CACHE_DIR = Path.home() / ".cache" / "ray_convrfm"
#: Environment variable naming a directory with the Fashion-MNIST IDX files.
FASHION_MNIST_ENV_VAR = "RAY_CONVRFM_FASHION_MNIST"
#: Base URL of the four gzip IDX files of Fashion-MNIST.
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_DOWNLOAD_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------
def _fashion_mnist_cache() -> Path:
    # Read the module constant at call time so tests (and users) can repoint it.
    return Path(CACHE_DIR) / "fashion-mnist"


def _download_fashion_mnist(target: Path) -> None:
    """Fetch the four gzip IDX files into ``target``, each written atomically.

    A temp file in the same directory followed by :func:`os.replace` means an interrupted
    download never leaves a partial file under the final name.
    """
    target.mkdir(parents=True, exist_ok=True)
    for canonical in IDX_FILES.values():
        fname = canonical + ".gz"
        dest = target / fname
        if dest.is_file():
            continue
        url = FASHION_MNIST_URL + fname
        logger.info("downloading %s -> %s", url, dest)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{fname}.", suffix=".part", dir=target)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
                url, timeout=_DOWNLOAD_TIMEOUT_S
            ) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            with open(tmp_name, "rb") as fh:
                if fh.read(2) != GZIP_MAGIC:
                    raise ValueError(f"download of {url} is not a gzip file")
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, download: bool = False
) -> ImageDataset:
    """Load Fashion-MNIST (60000 train / 10000 test, 1x28x28) from the first place that has it.

    Search order: ``root``, the directory in ``$RAY_CONVRFM_FASHION_MNIST``,
    :data:`DEBIAN_FASHION_MNIST_DIR` (Debian package ``dataset-fashion-mnist``), then
    ``CACHE_DIR / "fashion-mnist"``. Local copies come first so offline machines and clusters
    never touch the network.

    Parameters
    ----------
    root : path-like, optional
        Directory with the four IDX files (plain or gzip).
    download : bool
        If no location has the files, download them into the cache directory.

    Raises
    ------
    FileNotFoundError
        If no location has the files and ``download`` is false; the message names every
        location tried and how to fix it.
    """
    locations: list[tuple[str, Path]] = []
    if root is not None:
        locations.append(("root argument", Path(root)))
    env = os.environ.get(FASHION_MNIST_ENV_VAR)
    if env:
        locations.append((f"${FASHION_MNIST_ENV_VAR}", Path(env)))
    locations.append(("Debian package dataset-fashion-mnist", Path(DEBIAN_FASHION_MNIST_DIR)))
    cache = _fashion_mnist_cache()
    locations.append(("cache", cache))

    for label, directory in locations:
        if find_idx_files(directory) is not None:
            logger.info("Fashion-MNIST found at %s (%s)", directory, label)
            ds = load_idx_dir(directory, name="fashion-mnist")
            return dataclasses.replace(ds, classes=FASHION_MNIST_CLASSES)
        logger.debug("Fashion-MNIST not at %s (%s)", directory, label)

    if download:
        _download_fashion_mnist(cache)
        ds = load_idx_dir(cache, name="fashion-mnist")
        return dataclasses.replace(ds, classes=FASHION_MNIST_CLASSES)

    tried = "\n".join(f"  - {directory} ({label})" for label, directory in locations)
    raise FileNotFoundError(
        "Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] etc.) not found; tried:\n"
        f"{tried}\n"
        "Fix: pass download=True to fetch them into the cache, "
        "run `apt-get install dataset-fashion-mnist`, "
        f"or set {FASHION_MNIST_ENV_VAR} to a directory holding them."
    )


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------
#: ``load_dataset("digits-noise")``: 8 x 8 digits in a 14 x 14 noise frame of this deviation
#: (fixed kernel 43.1 % -> ConvRFM 52.2 % test accuracy, 6 iterations, about 20 s on 2 cores).
DIGITS_NOISE_FRAME = 14
DIGITS_NOISE_STD = 0.25

_SPEC_FORMS = ('"digits", "digits-noise", "fashion-mnist", "fashion-mnist-pairs", "photos", '
               '"idx:DIR", "npz:PATH", "parquet:PATH_OR_URL" or a path ending in .npz')


def item_pairs(ds: ImageDataset, n_train: int | None = None, n_test: int | None = None,
               random_state: int | None = 0) -> ImageDataset:
    """A many-class task from a c-class one: two items side by side (C x H x 2W), of class
    c a + b for the left item's class a and the right one's b, so c^2 classes (100 from
    Fashion-MNIST). Pairs are drawn uniformly with replacement within each split (training
    pairs from training items, test pairs from test items), seeded; every class is equally
    likely. ``n_train`` / ``n_test`` default to the splits' sizes."""
    import numpy as np

    c = len(ds.classes)
    gen = np.random.default_rng(random_state)

    def split(X, y, n):
        n = len(X) if n is None else int(n)
        if n < 0 or (n and not len(X)):
            raise ValueError(f"cannot draw {n} pairs from {len(X)} items")
        a, b = gen.integers(len(X), size=(2, n)) if n else (np.zeros(0, int),) * 2
        return np.concatenate([X[a], X[b]], axis=3), c * y[a] + y[b]

    X_train, y_train = split(ds.X_train, ds.y_train, n_train)
    X_test, y_test = split(ds.X_test, ds.y_test, n_test)
    names = tuple(f"{p} | {q}" for p in ds.classes for q in ds.classes)
    return ImageDataset(X_train, y_train, X_test, y_test, name=f"{ds.name}-pairs",
                        classes=names)


def item_tuples(ds: ImageDataset, classes: int, n_train: int, n_test: int,
                random_state: int | None = 0) -> ImageDataset:
    """A task of any number of classes from a c-class one: t items side by side
    (C x H x tW, t the fewest with c^t >= ``classes``) whose class is the number their
    items' classes spell in base c (most significant first). Labels are drawn uniformly from
    ``range(classes)``, then each item uniformly among its split's items of its digit's
    class, seeded: every class equally likely, each image real items. ``classes <= c`` gives
    single items of the first ``classes`` classes; ``classes = c^2`` the layout (not the
    draws) of ``item_pairs``."""
    import numpy as np

    c = len(ds.classes)
    if not isinstance(classes, int | np.integer) or classes < 2:
        raise ValueError(f"classes must be an integer >= 2; found {classes!r}")
    t = 1
    while c**t < classes:
        t += 1
    gen = np.random.default_rng(random_state)

    def split(X, y, n):
        if n < 0:
            raise ValueError(f"cannot draw {n} images of tuples")
        by_class = [np.flatnonzero(y == k) for k in range(c)]
        labels = gen.integers(classes, size=n)
        digits = [(labels // c ** (t - 1 - j)) % c for j in range(t)]
        missing = sorted({int(k) for dj in digits for k in np.unique(dj) if not len(by_class[k])})
        if missing:
            raise ValueError(f"no items of class(es) {missing} to draw tuples from")
        picks = [np.array([by_class[k][gen.integers(len(by_class[k]))] for k in dj], dtype=int)
                 for dj in digits]
        parts = [X[p] for p in picks] if n else [X[:0]] * t
        return np.concatenate(parts, axis=3), labels

    X_train, y_train = split(ds.X_train, ds.y_train, int(n_train))
    X_test, y_test = split(ds.X_test, ds.y_test, int(n_test))
    names = tuple(" | ".join(ds.classes[(k // c ** (t - 1 - j)) % c] for j in range(t))
                  for k in range(classes))
    return ImageDataset(X_train, y_train, X_test, y_test, name=f"{ds.name}-{classes}",
                        classes=names)


def load_dataset(
    spec: str, root: str | os.PathLike[str] | None = None, download: bool = False
) -> ImageDataset:
    """Load a data set from a short textual spec, as given on the command line.

    Parameters
    ----------
    spec : str
        ``"digits"``, ``"digits-noise"`` (each digit added at a random place onto a
        14 x 14 frame of N(0, 0.25^2) noise, seeded: the bundled local-signal task, where a
        learned patch metric pays), ``"fashion-mnist"``, ``"fashion-mnist-pairs"``
        (``item_pairs``: 100 classes of two items side by side, seeded), ``"idx:DIR"``,
        ``"npz:PATH"``, ``PATH.npz``, ``"photos"`` (``data.photos``: 32 x 32 colour crops of
        ten photographs, labelled by photograph; needs scikit-image) or
        ``"parquet:PATH_OR_URL"`` (read whole; fits on Ray read it lazily, see ``parquet``).
    root, download
        Passed to :func:`load_fashion_mnist`; ignored by the other forms.

    Raises
    ------
    ValueError
        For an unrecognised spec; the message lists the accepted forms.
    """
    s = spec.strip()
    key = s.lower()
    if key == "digits":
        return load_digits()
    if key in ("digits-noise", "digits_noise"):  # the bundled local-signal task
        return with_noise_frame(load_digits(), frame=DIGITS_NOISE_FRAME,
                                noise_std=DIGITS_NOISE_STD, random_state=0)
    if key in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return load_fashion_mnist(root=root, download=download)
    if key in ("fashion-mnist-pairs", "fashion_mnist_pairs"):  # 100 classes, 1 x 28 x 56
        return item_pairs(load_fashion_mnist(root=root, download=download))
    if key.startswith("idx:") and len(s) > 4:
        directory = Path(s[4:]).expanduser()
        return load_idx_dir(directory, name=directory.name or "idx")
    if key.startswith("npz:") and len(s) > 4:
        return load_npz(Path(s[4:]).expanduser())
    if key.endswith(".npz"):
        return load_npz(Path(s).expanduser())
    if key.startswith("parquet:") and len(s) > 8:
        from ray_convrfm.data.parquet_io import load_parquet  # pyarrow only when needed

        return load_parquet(s[8:])
    if key == "photos":  # natural images: crops of scikit-image's photographs
        from ray_convrfm.data.photos import load_photo_crops

        return load_photo_crops()
    raise ValueError(f"unknown data set spec {spec!r}; accepted: {_SPEC_FORMS}")
