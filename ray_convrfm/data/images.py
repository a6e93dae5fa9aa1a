"""The in-memory image data set and the loaders that need no download.

Every loader returns an :class:`ImageDataset` holding NCHW ``float32`` images with pixels in
``[0, 1]`` and ``int64`` labels, so the models and the CLI never deal with file formats.

* scikit-learn's bundled 8x8 digits, which need no download and suit quick tests;
* a "digit in noise" transform that pastes small images into a larger noise frame, the task on
  which a convolutional (local) feature matrix should beat a global one.

IDX files and Fashion-MNIST are read by :mod:`ray_convrfm.data.idx` and
:mod:`ray_convrfm.data.datasets`, ``.npz`` archives by :mod:`ray_convrfm.data.npz`, parquet
shards by :mod:`ray_convrfm.data.parquet`.
"""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np

__all__ = [
    "ImageDataset",
    "default_classes",
    "digit_in_noise",
    "load_digits",
    "with_noise_frame",
]

logger = logging.getLogger(__name__)

_N_DIGITS_TEST = 297


# --------------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """Train and test images with labels, in the layout every model of the package expects.

    Attributes
    ----------
    X_train, X_test : np.ndarray
        ``float32`` images of shape ``(n, C, H, W)``; pixels are in ``[0, 1]`` for the raw
        loaders (derived variants such as :func:`with_noise_frame` may leave that range).
        The test split may have 0 rows.
    y_train, y_test : np.ndarray
        ``int64`` class indices of shape ``(n,)``.
    name : str
        Short identifier used in logs and result files.
    classes : tuple of str
        Class names; ``classes[k]`` names label ``k``.
    X_val, y_val : np.ndarray or None
        A validation split the data set carries, for tasks whose training rows are not
        exchangeable (overlapping crops of the same photographs): fits choose on it instead of
        carving rows from the training split (:meth:`validation`). None for most data sets.

    Notes
    -----
    Arrays are converted to the documented dtypes on construction and shapes are checked, so a
    malformed data set fails here rather than deep inside a kernel computation. ``eq=False``
    because element-wise array comparison has no single truth value.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    name: str
    classes: tuple[str, ...]
    X_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.X_val is None) != (self.y_val is None):
            raise ValueError("pass both X_val and y_val, or neither")
        for split in ("train", "test") + (("val",) if self.X_val is not None else ()):
            X = np.asarray(getattr(self, f"X_{split}"), dtype=np.float32)
            y = np.asarray(getattr(self, f"y_{split}"))
            if X.ndim != 4:
                raise ValueError(f"X_{split} must have shape (n, C, H, W), got shape {X.shape}")
            if y.ndim != 1 or y.shape[0] != X.shape[0]:
                raise ValueError(
                    f"y_{split} must have shape ({X.shape[0]},) to match X_{split}, "
                    f"got shape {y.shape}"
                )
            if y.size and not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"y_{split} must hold integer labels, got dtype {y.dtype}")
            # Frozen dataclass: normalising the fields needs object.__setattr__.
            object.__setattr__(self, f"X_{split}", X)
            object.__setattr__(self, f"y_{split}", y.astype(np.int64, copy=False))
        for split in ("test", "val"):
            X = getattr(self, f"X_{split}")
            if X is not None and X.shape[0] and X.shape[1:] != self.X_train.shape[1:]:
                raise ValueError(f"train and {split} images differ in (C, H, W): "
                                 f"{self.X_train.shape[1:]} vs {X.shape[1:]}")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.X_train.shape[1:])  # type: ignore[return-value]

    @property
    def n_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    def validation(self) -> dict[str, np.ndarray]:
        """``fit`` keyword arguments for the data set's own validation split (``X_val``,
        ``y_val``), or none when validation is to be carved from the training rows."""
        return {} if self.X_val is None else {"X_val": self.X_val, "y_val": self.y_val}

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> ImageDataset:
        """Return a data set with the first ``n_train`` / ``n_test`` rows (``None`` keeps all);
        a validation split it carries is kept whole.

        Taking a prefix rather than a random sample keeps runs reproducible and lets the caller
        shuffle beforehand if it wants a random subset.

        Raises
        ------
        ValueError
            If a requested size is negative or larger than the split.
        """
        n_tr = _check_subset_size("n_train", n_train, self.X_train.shape[0])
        n_te = _check_subset_size("n_test", n_test, self.X_test.shape[0])
        return dataclasses.replace(
            self,
            X_train=self.X_train[:n_tr],
            y_train=self.y_train[:n_tr],
            X_test=self.X_test[:n_te],
            y_test=self.y_test[:n_te],
        )

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={self.X_train.shape}, "
            f"test={self.X_test.shape}"
            + ("" if self.X_val is None else f", val={self.X_val.shape}")
            + f", n_classes={self.n_classes})"
        )


def _check_subset_size(arg: str, n: int | None, available: int) -> int:
    if n is None:
        return available
    n = int(n)
    if n < 0:
        raise ValueError(f"{arg} must be non-negative, got {n}")
    if n > available:
        raise ValueError(f"{arg}={n} requested but only {available} rows are available")
    return n


def default_classes(*labels: np.ndarray) -> tuple[str, ...]:
    """Name classes ``"0" .. str(max_label)`` when the source carries no names."""
    top = max((int(y.max()) for y in labels if y.size), default=-1)
    return tuple(str(k) for k in range(top + 1))


# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------
def load_digits() -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits with a fixed 1500/297 split.

    Ships with scikit-learn, so tests and examples work offline. Pixels (0..16) are divided
    by 16; rows are shuffled with ``np.random.default_rng(0)`` and the last 297 form the test
    split, so every call returns identical arrays.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(0).permutation(images.shape[0])
    images, labels = images[order][:, None, :, :], labels[order]
    n_train = images.shape[0] - _N_DIGITS_TEST
    return ImageDataset(
        X_train=images[:n_train],
        y_train=labels[:n_train],
        X_test=images[n_train:],
        y_test=labels[n_train:],
        name="digits",
        classes=tuple(str(k) for k in range(10)),
    )


# --------------------------------------------------------------------------------------------
# Digit-in-noise transform
# --------------------------------------------------------------------------------------------
def digit_in_noise(
    images: np.ndarray,
    frame: int = 42,
    noise_std: float = 0.5,
    random_state: int | None = 0,
) -> np.ndarray:
    """Place each image at a random position inside a larger frame of Gaussian noise.

    The class signal then occupies a small, moving window, which a local (patch-based) feature
    matrix can find and a global one cannot. The frame is ``N(0, noise_std**2)`` noise
    everywhere and the image's pixels are *added* onto the noise inside the window whose
    top-left corner is uniform on ``[0, frame - h] x [0, frame - w]``.

    Parameters
    ----------
    images : np.ndarray
        Shape ``(n, C, h, w)``.
    frame : int
        Side of the square output frame; must be at least ``h`` and ``w``.
    noise_std : float
        Standard deviation of the noise (0 gives a clean zero background).
    random_state : int or None
        Seed for a local ``np.random.default_rng``; the global RNG is never used.

    Returns
    -------
    np.ndarray
        ``float32`` of shape ``(n, C, frame, frame)``.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (n, C, h, w), got shape {images.shape}")
    frame = int(frame)
    n, c, h, w = images.shape
    if h > frame or w > frame:
        raise ValueError(f"image size {h}x{w} is larger than the {frame}x{frame} frame")
    if not np.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be a finite non-negative number, got {noise_std}")
    rng = np.random.default_rng(random_state)
    rows = rng.integers(0, frame - h, size=n, endpoint=True)
    cols = rng.integers(0, frame - w, size=n, endpoint=True)
    out = np.empty((n, c, frame, frame), dtype=np.float32)
    # Draw straight into the float32 output: no float64 temporary of the full frame stack.
    rng.standard_normal(dtype=np.float32, out=out)
    out *= np.float32(noise_std)
    src = images.astype(np.float32, copy=False)
    for i in range(n):
        r, q = rows[i], cols[i]
        out[i, :, r : r + h, q : q + w] += src[i]
    return out


def with_noise_frame(
    ds: ImageDataset, frame: int = 42, noise_std: float = 0.5, random_state: int = 0
) -> ImageDataset:
    """Apply :func:`digit_in_noise` to every split of ``ds``.

    Train uses seed ``random_state``, test ``random_state + 1`` and a validation split the
    data set carries ``random_state + 2``, so no two splits share positions or noise. Pixels
    are no longer in ``[0, 1]``; that is intended.
    """
    val = {} if ds.X_val is None else {
        "X_val": digit_in_noise(ds.X_val, frame, noise_std, random_state + 2)}
    return dataclasses.replace(
        ds,
        X_train=digit_in_noise(ds.X_train, frame, noise_std, random_state),
        X_test=digit_in_noise(ds.X_test, frame, noise_std, random_state + 1),
        name=f"{ds.name}-noise{int(frame)}",
        **val,
    )


# --------------------------------------------------------------------------------------------
# PNG/JPEG codecs (the parquet layout's images)
# --------------------------------------------------------------------------------------------
_ENCODINGS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG"}


def format_of(encoding: str) -> str:
    """PIL format name (``"PNG"``, ``"JPEG"``) of an ``encoding`` argument."""
    fmt = _ENCODINGS.get(str(encoding).lower())
    if fmt is None:
        raise ValueError(f"encoding must be 'png' or 'jpeg', got {encoding!r}")
    return fmt


def check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    return int(channels)


def check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        h = w = 0
    if h < 1 or w < 1:
        raise ValueError(f"size must be a pair (H, W) of positive integers, got {size!r}")
    return h, w


def quantise(x: np.ndarray, where: str) -> np.ndarray:
    """``round(255 * x)`` as ``uint8``; NaN and values outside ``[0, 1]`` are refused."""
    x = np.asarray(x)
    ok = (x >= 0) & (x <= 1)  # NaN compares false, so it is refused too
    if not ok.all():
        bad = x[~ok]
        raise ValueError(f"{where}: pixels must be in [0, 1] to be stored as 8-bit images; found "
                         f"{bad.size} value(s) outside, e.g. {bad.flat[0]!r}: rescale or clip")
    return np.rint(x.astype(np.float32) * np.float32(255.0)).astype(np.uint8)


def hwc(q: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> PIL's layout ``(H, W)`` or ``(H, W, 3)``."""
    return q[0] if q.shape[0] == 1 else np.transpose(q, (1, 2, 0))


def chw(pixels: np.ndarray) -> np.ndarray:
    """PIL's layout ``(H, W)`` or ``(H, W, 3)`` -> ``(C, H, W)``."""
    return pixels[None] if pixels.ndim == 2 else np.transpose(pixels, (2, 0, 1))


def encode_uint8(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    """PNG or JPEG bytes of ``uint8`` pixels in PIL's layout."""
    from PIL import Image

    buf = io.BytesIO()  # PNG ignores quality
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format=fmt, quality=int(quality))
    return buf.getvalue()


def decode_uint8(data: bytes, channels: int, size: tuple[int, int] | None = None,
                 crop: bool = False) -> np.ndarray:
    """``uint8`` pixels ``(H, W)`` or ``(H, W, 3)`` of PNG/JPEG bytes, resized (bilinear) to
    ``size`` ``(H, W)`` when given: stretched to it, or with ``crop`` scaled to cover it and
    centre-cropped (``PIL.ImageOps.fit``: ImageNet's shorter side, then centre crop, keeping the
    aspect ratio). 16-bit grey is scaled down, not clipped as PIL would."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode.startswith("I;16"):
                wide = np.asarray(image, dtype=np.uint16).astype(np.float32)
                image = Image.fromarray(np.rint(wide / np.float32(257.0)).astype(np.uint8))
            image = image.convert("L" if channels == 1 else "RGB")
            if size is not None and (image.height, image.width) != tuple(size):
                image = (ImageOps.fit(image, (size[1], size[0]), Image.Resampling.BILINEAR)
                         if crop else image.resize((size[1], size[0]), Image.Resampling.BILINEAR))
            return np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image ({len(data)} bytes): {exc}") from exc


def decode_to(out: np.ndarray, data: bytes | None, size: tuple[int, int] | None, crop: bool,
              expected: str) -> None:
    """Decode one image into ``out`` ``(C, H, W)``: its 8-bit pixels (uint8 ``out``) or them
    divided by 255 (float ``out``), as every on-disk set reads a row. Without ``size`` the image
    must already be ``H x W`` (``expected`` says who says so: a ``ValueError`` otherwise)."""
    if data is None:
        raise ValueError("image is null")
    pixels = decode_uint8(data, out.shape[0], size, crop)
    if pixels.shape[:2] != out.shape[1:]:
        raise ValueError(f"image is {pixels.shape[0]}x{pixels.shape[1]}, but {expected} "
                         f"{out.shape[1]}x{out.shape[2]}; pass size=(H, W) to resize")
    if out.dtype == np.uint8:
        out[...] = chw(pixels)
    else:
        np.divide(chw(pixels), np.float32(255.0), out=out)


def encode_image(x: np.ndarray, encoding: str = "png", quality: int = 95) -> bytes:
    """PNG (lossless) or JPEG (``quality``) bytes of one ``(C, H, W)`` image, ``C`` = 1 or 3,
    pixels in ``[0, 1]``: quantised to ``round(255 * x)`` first, so PNG round trips are exact."""
    fmt = format_of(encoding)
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (C, H, W) with C = 1 or 3, got {x.shape}")
    return encode_uint8(hwc(quantise(x, "image")), fmt, quality)


def decode_image(data: bytes, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """PNG or JPEG bytes -> ``float32`` ``(channels, H, W)`` image in ``[0, 1]``. Any mode
    (palette, RGBA, 16-bit grey, ...) is converted to ``channels`` (1 or 3), so all images of a
    set have one layout; ``size`` ``(H, W)`` resizes (bilinear, no crop)."""
    pixels = decode_uint8(data, check_channels(channels), check_size(size))
    return chw(pixels).astype(np.float32) / np.float32(255.0)
