"""Small real image files for the on-disk set tests: PNG/JPEG folder trees written with PIL and
Hugging Face style parquet shards written with pyarrow, as the Hub's ``datasets`` writes them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps


def encoded(pixels: np.ndarray, fmt: str = "PNG", quality: int = 90) -> bytes:
    """PNG/JPEG bytes of uint8 pixels ``(H, W)`` or ``(H, W, 3)``."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def reference(data: bytes, channels: int, size=None, crop: bool = True) -> np.ndarray:
    """A plain decode (and resize) of one image with PIL, as ``(C, H, W)`` uint8: the oracle
    the readers are compared with."""
    image = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
    if size is not None and (image.height, image.width) != tuple(size):
        if crop:
            image = ImageOps.fit(image, (size[1], size[0]), Image.Resampling.BILINEAR)
        else:
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    a = np.asarray(image)
    return a[None] if a.ndim == 2 else np.transpose(a, (2, 0, 1))


def digit_pixels(n: int, seed: int = 0):
    """``n`` of scikit-learn's 8x8 digits as uint8 grey pixels, with their labels."""
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    order = np.random.default_rng(seed).permutation(len(ds.y_train))[:n]
    pixels = np.rint(ds.X_train[order, 0] * 255).astype(np.uint8)
    return pixels, ds.y_train[order]


def write_tree(root: Path, split: str, images: dict[str, list[bytes]], suffix: str = ".png"
               ) -> dict[str, bytes]:
    """``root/split/<class>/<k><suffix>`` for each class's encoded images; returns
    {relative path: bytes}."""
    out = {}
    for cls, items in images.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for k, data in enumerate(items):
            rel = f"{split}/{cls}/{k:04d}{suffix}"
            (root / rel).write_bytes(data)
            out[rel] = data
    return out


def hf_metadata(names: list[str] | None, label_column: str = "label",
                image_column: str = "image") -> dict[bytes, bytes]:
    """The ``huggingface`` schema metadata ``datasets`` writes, with ClassLabel names."""
    label = {"names": names, "_type": "ClassLabel"} if names else {"dtype": "int64",
                                                                    "_type": "Value"}
    info = {"info": {"features": {image_column: {"_type": "Image"}, label_column: label}}}
    return {b"huggingface": json.dumps(info).encode()}


def write_hf(root: Path, split: str, rows: list[tuple[bytes, int]], shards: int = 2,
             row_group_size: int = 7, names: list[str] | None = None, struct: bool = True,
             subdir: str = "data", image_column: str = "image", label_column: str = "label"
             ) -> list[Path]:
    """``root/subdir/SPLIT-0000i-of-0000N.parquet`` shards of (bytes, label) rows, the image
    column a ``struct<bytes, path>`` (or plain binary); returns the files."""
    folder = root / subdir if subdir else root
    folder.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if struct \
        else pa.binary()
    schema = pa.schema([(image_column, image_type), (label_column, pa.int64())],
                       metadata=hf_metadata(names, label_column, image_column))
    bounds = np.linspace(0, len(rows), shards + 1).astype(int)
    files = []
    for i in range(shards):
        part = rows[bounds[i]:bounds[i + 1]]
        images = [{"bytes": b, "path": f"{split}_{bounds[i] + k}.png"} if struct else b
                  for k, (b, _) in enumerate(part)]
        table = pa.table({image_column: pa.array(images, image_type),
                          label_column: pa.array([y for _, y in part], pa.int64())},
                         schema=schema)
        path = folder / f"{split}-{i:05d}-of-{shards:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        files.append(path)
    return files


def count_decodes(monkeypatch) -> dict:
    """Count the images decoded and the files PIL opens in this process (``decode``, ``open``),
    for tests that check where images are read."""
    from ray_convrfm.data import images as img

    calls = {"decode": 0, "open": 0}
    real_decode, real_open = img.decode_uint8, Image.open

    def decode(*args, **kwargs):
        calls["decode"] += 1
        return real_decode(*args, **kwargs)

    def open_(*args, **kwargs):
        calls["open"] += 1
        return real_open(*args, **kwargs)

    monkeypatch.setattr(img, "decode_uint8", decode)
    monkeypatch.setattr(Image, "open", open_)
    return calls
