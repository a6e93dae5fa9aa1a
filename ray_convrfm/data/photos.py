"""A natural-image task from the photographs scikit-image ships (no download): 32 x 32 colour
crops labelled by the photograph they come from.

Each photograph is scaled (antialiased) so that its shorter side is ``PHOTO_SIDE`` pixels and
cut into a ``GRID`` x ``GRID`` grid of tiles; tile (r, c) gives crops to the split
``ROLES[(r + c) % GRID]`` (a Latin square: every row and column of tiles has training,
validation and test tiles). Every crop lies wholly inside one tile, so no validation or test
pixel was seen in training and a model must recognise a photograph's textures, edges and
colours rather than remember places; the validation crops are as far from the training ones as
the test crops, so choices made on them (iterations, ridges, layers, epochs) can be trusted.
Validation rows carved at random from the training crops would not do: overlapping crops of
one region make validation reward memorising places. Crops are drawn uniformly inside a tile,
seeded. Grey photographs are repeated over three channels.

Optional: needs ``scikit-image`` (``pip install ray-convrfm[photos]``).
"""

from __future__ import annotations

import numpy as np

from ray_convrfm.data.images import ImageDataset

__all__ = ["PHOTOS", "load_photo_crops"]

#: The photographs (scikit-image's ``skimage.data`` names; ``stereo_motorcycle``'s left view):
#: eight colour photographs and two grey textures.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "stereo_motorcycle", "grass", "gravel")
#: The shorter side of every photograph after scaling, in pixels.
PHOTO_SIDE = 192
#: Tiles per side of a photograph's grid.
GRID = 4
#: The split of tile (r, c) is ``ROLES[(r + c) % GRID]``: half the tiles train.
ROLES = ("train", "validation", "train", "test")


def _photograph(name: str) -> np.ndarray:
    """Photograph ``name`` as float32 (3, H, W) in [0, 1], its shorter side ``PHOTO_SIDE``."""
    try:
        from skimage import data
    except ImportError as err:
        raise ImportError("the photographs task needs scikit-image: pip install "
                          "'ray-convrfm[photos]' (or scikit-image)") from err
    from PIL import Image

    image = getattr(data, name)()
    image = image[0] if isinstance(image, tuple) else image  # stereo pairs: the left view
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    pil = Image.fromarray(image[:, :, :3].astype(np.uint8))
    scale = PHOTO_SIDE / min(pil.size)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)),
                     Image.Resampling.LANCZOS)
    return np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)


def tile_edges(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column edges of a photograph's ``GRID`` x ``GRID`` tiles."""
    _, H, W = photo.shape
    return np.linspace(0, H, GRID + 1).astype(int), np.linspace(0, W, GRID + 1).astype(int)


def tiles_of(role: str) -> list[tuple[int, int]]:
    """The (row, column) tiles whose crops go to split ``role``."""
    return [(r, c) for r in range(GRID) for c in range(GRID) if ROLES[(r + c) % GRID] == role]


def _crops(photo: np.ndarray, tiles: list[tuple[int, int]], count: int, size: int,
           rng: np.random.Generator) -> np.ndarray:
    """``count`` crops of ``size`` x ``size``, each lying wholly inside one of ``tiles``."""
    rows, cols = tile_edges(photo)
    if min(min(np.diff(rows)), min(np.diff(cols))) < size:
        raise ValueError(f"crops of {size} x {size} do not fit the photographs' tiles "
                         f"({PHOTO_SIDE}-pixel side, {GRID} x {GRID} tiles)")
    r, c = np.asarray(tiles)[rng.integers(len(tiles), size=count)].T
    top = rng.integers(rows[r], rows[r + 1] - size + 1)
    left = rng.integers(cols[c], cols[c + 1] - size + 1)
    return np.stack([photo[:, t : t + size, x : x + size] for t, x in zip(top, left,
                                                                          strict=True)])


def load_photo_crops(n_train: int = 2000, n_test: int = 2000, n_val: int = 400,
                     size: int = 32, photos: tuple[str, ...] = PHOTOS,
                     random_state: int = 0) -> ImageDataset:
    """``n_train`` training, ``n_val`` validation and ``n_test`` test crops (3 x ``size`` x
    ``size``), about equally many per photograph, labelled by photograph (``classes`` are the
    names), shuffled. The validation crops are the data set's own (``ImageDataset.X_val``):
    fits use them instead of carving validation rows from the training crops."""
    if size < 1 or n_train < len(photos) or n_test < 0 or n_val < len(photos):
        raise ValueError(f"need size >= 1 and at least one training and one validation crop "
                         f"per photograph ({len(photos)}); found size={size}, "
                         f"n_train={n_train}, n_val={n_val}, n_test={n_test}")
    rng = np.random.default_rng(random_state)
    splits = {"train": n_train, "validation": n_val, "test": n_test}
    images = [_photograph(name) for name in photos]
    out = {}
    for split, n in splits.items():
        counts = np.full(len(photos), n // len(photos))
        counts[: n % len(photos)] += 1
        X = np.concatenate([_crops(p, tiles_of(split), int(k), size, rng)
                            for p, k in zip(images, counts, strict=True)])
        y = np.repeat(np.arange(len(photos)), counts)
        order = rng.permutation(len(y))
        out[split] = (X[order], y[order])
    return ImageDataset(*out["train"], *out["test"], name=f"photos{size}",
                        classes=tuple(photos), X_val=out["validation"][0],
                        y_val=out["validation"][1])
