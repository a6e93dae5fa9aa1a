"""A natural-image task from the photographs scikit-image ships (no download): 32 x 32 colour
crops labelled by the photograph they come from.

Each photograph is scaled (antialiased) so that its shorter side is ``PHOTO_SIDE`` pixels and
cut into ``BANDS`` vertical bands; training crops come from the even bands and test crops from
the odd ones, so no test pixel was seen in training and a model must recognise a photograph's
textures, edges and colours rather than remember places. Crops are drawn uniformly inside a
band, seeded. Grey photographs are repeated over three channels.

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
#: Vertical bands per photograph: even ones give training crops, odd ones test crops.
BANDS = 4


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


def _crops(photo: np.ndarray, bands: list[int], count: int, size: int,
           rng: np.random.Generator) -> np.ndarray:
    """``count`` crops of ``size`` x ``size`` lying wholly inside the given bands."""
    _, H, W = photo.shape
    edges = np.linspace(0, W, BANDS + 1).astype(int)
    if min(edges[b + 1] - edges[b] for b in bands) < size or H < size:
        raise ValueError(f"crops of {size} x {size} do not fit the photographs' bands "
                         f"({PHOTO_SIDE}-pixel side, {BANDS} bands)")
    band = rng.choice(bands, count)
    left = rng.integers(edges[band], edges[band + 1] - size + 1)
    top = rng.integers(0, H - size + 1, count)
    return np.stack([photo[:, t : t + size, x : x + size] for t, x in zip(top, left,
                                                                          strict=True)])


def load_photo_crops(n_train: int = 2000, n_test: int = 2000, size: int = 32,
                     photos: tuple[str, ...] = PHOTOS, random_state: int = 0) -> ImageDataset:
    """``n_train`` training and ``n_test`` test crops (3 x ``size`` x ``size``), about equally
    many per photograph, labelled by photograph (``classes`` are the names), shuffled."""
    if size < 1 or n_train < len(photos) or n_test < 0:
        raise ValueError(f"need size >= 1 and at least one training crop per photograph "
                         f"({len(photos)}); found size={size}, n_train={n_train}, "
                         f"n_test={n_test}")
    rng = np.random.default_rng(random_state)
    splits = {"train": ([b for b in range(BANDS) if b % 2 == 0], n_train),
              "test": ([b for b in range(BANDS) if b % 2 == 1], n_test)}
    images = [_photograph(name) for name in photos]
    out = {}
    for split, (bands, n) in splits.items():
        counts = np.full(len(photos), n // len(photos))
        counts[: n % len(photos)] += 1
        X = np.concatenate([_crops(p, bands, int(k), size, rng)
                            for p, k in zip(images, counts, strict=True)])
        y = np.repeat(np.arange(len(photos)), counts)
        order = rng.permutation(len(y))
        out[split] = (X[order], y[order])
    return ImageDataset(*out["train"], *out["test"], name=f"photos{size}",
                        classes=tuple(photos))
