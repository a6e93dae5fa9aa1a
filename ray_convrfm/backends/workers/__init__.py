"""The one computing core: a shard worker owns rows of the images and computes, where they
live, everything a fit and its predictions need (docs/math.md section 9): kernel rows, the
Nystrom rows and their products, held-out scores, AGOP parts, digests and patch Grams.

Ray runs it as an actor (``backends.ray_executor``), the in-process executor calls the same
class directly (``backends.executor``), so a CPU test of an in-process fit runs the code a
cluster's workers run. Split by concern: ``shard`` (the images, their sides, kernel rows, the
AGOP), ``nystrom`` (the solvers' rows, products and factor), ``holdout`` (scoring),
``batch`` (batch predictions written where the workers are).
"""

from __future__ import annotations

from ray_convrfm.backends.workers.batch import BatchPrediction
from ray_convrfm.backends.workers.holdout import HoldoutScoring
from ray_convrfm.backends.workers.nystrom import NystromRows, NystromTask, ResidentRows
from ray_convrfm.backends.workers.shard import ShardCore

__all__ = ["NystromTask", "ResidentRows", "ShardWorker"]


class ShardWorker(BatchPrediction, HoldoutScoring, NystromRows, ShardCore):
    """Holds rows ``start..start + len(images)`` of the images; made by ``ray.remote`` on a
    cluster, called directly in process."""
