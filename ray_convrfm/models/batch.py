"""Batch prediction where the data lives: the estimators' ``predict_to_parquet``.

``predict`` returns every score to the caller; a data set of millions of images needs the
opposite: the rows sharded over the model's workers, each loading its own (a parquet set's
rows read and decoded there), scoring them and writing its part file beside the others
(``ShardedBackend.write_predictions``, ``data.predictions``), so that the driver holds counts,
never the scores. One code path for ``ConvRFM`` and ``DeepConvRFM`` (the chain of filter banks
is applied where the images are scored), in process and on Ray.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from ray_convrfm.checks import as_images, as_labels
from ray_convrfm.data.predictions import prepare_out, write_marker
from ray_convrfm.data.rows import ImageRows, image_rows

__all__ = ["BatchPredictions", "predict_to_parquet"]

#: Rows of an in-memory array checked for NaN at once (the driver never copies it whole).
_CHECK_ROWS = 4096


@dataclass(frozen=True)
class BatchPredictions:
    """What a batch prediction wrote: the folder, its rows and part files, the correct
    predictions (None without labels) and the seconds it took."""

    path: str
    rows: int
    parts: int
    correct: int | None
    seconds: float

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / max(self.rows, 1)


def _batch_rows(X, y, image_shape: tuple[int, ...]):
    """``X`` as ``ImageRows`` of the model's image shape, and the true labels: ``y`` checked
    (in memory), None for rows that carry their own (``labelled``), or none at all."""
    import torch

    from ray_convrfm.data.ondisk import DiskImages, DiskRows

    if isinstance(X, DiskImages):  # parquet, folder trees: read as 8-bit pixels by the workers
        X = X.rows(((0, len(X)),))
    if isinstance(X, ImageRows):
        shape = tuple(X.row_shape)
    else:
        X = image_rows(X if isinstance(X, (np.ndarray, torch.Tensor)) else np.asarray(X))
        shape = tuple(X.row_shape)
        if len(shape) == 3 and shape[0] == image_shape[0] and shape[1:] == image_shape[1:]:
            for a in range(0, len(X), _CHECK_ROWS):  # NaN, dtype; a chunk at a time
                as_images(X.slice(a, a + _CHECK_ROWS).load(),
                          f"X[{a}:{min(a + _CHECK_ROWS, len(X))}]")
        else:
            as_images(X.slice(0, 1).load(), "X")  # the rank and dtype, named
    if len(X) == 0:
        raise ValueError("X has no images")
    if shape != tuple(image_shape):
        raise ValueError(f"the images have shape {shape} (C, H, W); the model was fitted on "
                         f"{tuple(image_shape)}" + ("; resize them as they are read (parquet: "
                         "size=(H, W))" if shape[0] == image_shape[0] else ""))
    carried = isinstance(X, DiskRows)  # rows of an on-disk set carry their labels
    if y is not None:
        if carried:
            raise ValueError("these rows carry their own labels; pass y=None")
        y = as_labels(y, len(X), "y")
        return X, y, y[:1]
    return X, None, np.zeros(1, np.int64) if carried else None


def predict_to_parquet(layer, X, out: str | os.PathLike[str], y, overwrite: bool, chain: list,
                       image_shape: tuple[int, ...], model: str) -> BatchPredictions:
    """Write the predictions of fitted ``layer`` (a ``ConvRFM``: ``DeepConvRFM``'s last
    layer, after the filter banks ``chain``) for images ``X`` of ``image_shape`` into folder
    ``out``: one part per worker, then the marker. ``model`` names the estimator in it."""
    t0 = time.perf_counter()
    rows, y, sample = _batch_rows(X, y, image_shape)
    target = prepare_out(out, layer.classes_, sample, overwrite)
    backend, coef = layer.prediction_backend()
    parts, n, correct = backend.write_predictions(rows, y, coef, None, chain, target)
    seconds = time.perf_counter() - t0
    correct = None if correct < 0 else int(correct)
    write_marker(target, parts, {"model": model, "correct": correct,
                                 "accuracy": None if correct is None else correct / n,
                                 "seconds": seconds})
    return BatchPredictions(target.url, int(n), len(parts), correct, seconds)
