"""A shard worker's part of a batch prediction: it loads its own rows (parquet rows read and
decoded here, or blocks of an array the driver sent), scores them against the model's centers
and appends them to its own part file (``data.predictions``); only counts leave the worker.
"""

from __future__ import annotations

import numpy as np

from ray_convrfm.backends.chunks import CenterBlocks
from ray_convrfm.backends.protocol import LayerState
from ray_convrfm.data.predictions import PartWriter, PredictionTarget, label_indices
from ray_convrfm.data.rows import load_labelled


class BatchPrediction:
    """The batch prediction methods of ``ShardWorker`` (``HoldoutScoring.scores`` scores).

    Calls of one run reach a worker in order (``batch_open``, ``batch_block``...,
    ``batch_close``); its open file lives only in this process, so a worker restarted in
    between refuses the rest and the run fails without its marker (rerun it)."""

    _writers: dict | None = None

    def _writer(self, run: str) -> PartWriter:
        writer = (self._writers or {}).get(run)
        if writer is None:
            raise RuntimeError("this worker holds no open part file of the batch prediction "
                               f"{run} (it was restarted, or the run was closed); rerun the "
                               "prediction with overwrite")
        return writer

    def batch_open(self, target: PredictionTarget, part: int) -> str:
        """Start part file ``part`` of the run ``target`` (its temporary name)."""
        if self._writers is None:
            self._writers = {}
        self._writers[target.run] = PartWriter(target, part)
        return self._writers[target.run].tmp

    def batch_block(self, run: str, start: int, rows, labels, block: int, chain, alpha,
                    layer: LayerState, centers: CenterBlocks) -> tuple[int, int]:
        """Score the image rows (``ImageRows`` loaded here) starting at global row ``start``,
        ``block`` images at a time as ``scores`` scores the driver's blocks, and append them to
        this worker's part (one row group); ``labels`` are the rows' true labels (None: those
        the rows carry, if any). Returns (rows, correct predictions; -1 without labels)."""
        writer = self._writer(run)
        X, stored = load_labelled(rows)  # parquet rows are read and decoded here, once
        y = stored if labels is None else np.asarray(labels)
        scores = np.concatenate([self.scores(X[a:b], chain, alpha, layer, centers)
                                 for a, b in self._chunks(len(X), block)])
        predicted = scores.argmax(1)
        writer.write(start, predicted, scores, y)
        if y is None or not writer.target.labelled:
            return len(X), -1
        return len(X), int(np.sum(predicted == label_indices(writer.target.classes, y)))

    def batch_close(self, run: str) -> dict:
        """Finish this worker's part (renamed from its temporary name): its marker entry."""
        entry = self._writer(run).close()
        del self._writers[run]
        return entry

    def batch_abort(self, run: str) -> None:
        """Drop this worker's unfinished part of a failed run (nothing when none is open)."""
        writer = (self._writers or {}).pop(run, None)
        if writer is not None:
            writer.abort()
