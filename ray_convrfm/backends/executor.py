"""Where shard workers run: the ``Executor`` protocol and its in-process implementation.

``ShardedBackend`` (``sharded.py``) is written once against this protocol: it submits calls of
``ShardWorker`` methods to the worker owning each shard, passes futures of one call as
arguments of another (they are resolved where the call runs), and gets or sums the results.
``InProcessExecutor`` runs one ``ShardWorker`` over every image, in this process;
``ray_executor.RayExecutor`` runs one actor per shard on a Ray cluster. Both run the same worker
code, so a CPU test of the in-process fit exercises what a cluster's workers run.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ray_convrfm.backends.chunks import Pending
from ray_convrfm.backends.workers import ShardWorker
from ray_convrfm.data.rows import image_rows
from ray_convrfm.progress import Bar, progress_bar


def shard_bounds(n: int, workers: int, block: int, align: bool) -> list[tuple[int, int]]:
    """Contiguous row ranges of ``workers`` near-equal shards; with ``align`` every boundary
    falls on a multiple of ``block`` (every block of a stored kernel has one owner)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1; found {workers}")
    bounds = np.linspace(0, n, workers + 1).astype(int)
    if align:
        bounds = np.minimum(np.round(bounds / block).astype(int) * block, n)
        bounds[-1] = n
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@runtime_checkable
class Executor(Protocol):
    """Shard workers somewhere, each owning the rows ``bounds[k]`` of the training images."""

    bounds: list[tuple[int, int]]
    #: how many times workers were started (a fitted model's predictions start none)
    starts: int

    def submit(self, worker: int, method: str, *args, returns: int = 1) -> Any:
        """Call ``ShardWorker.method(*args)`` on worker ``worker``: a future (a list of
        ``returns`` futures when it returns a tuple). Futures among ``args`` are resolved
        where the call runs."""
        ...

    def put(self, value) -> Any:
        """``value`` as something every worker can be given (a Ray object ref, or itself)."""
        ...

    def get(self, futures: list, desc: str = "", unit: str = "block") -> list:
        """The values of ``futures``, in order, with one progress bar named ``desc``."""
        ...

    def tree(self, futures: list, keep: int = 1) -> list:
        """Futures of sums of ``futures`` (a tree of ``ShardWorker.add`` on the workers), at
        most ``keep`` of them; nothing is fetched here."""
        ...

    def reload(self, images) -> None:
        """Give the workers new images (rows spread as ``bounds``, recomputed): a fitted model
        keeps the fit's workers for its centers."""
        ...

    def keep(self) -> None:
        """The workers now serve a fitted model's predictions (idle between them): they may be
        released to make room for a new pool; the model then reopens its own."""
        ...

    @property
    def closed(self) -> bool:
        """Whether the workers were stopped (by ``close``, or to make room for a new pool)."""
        ...

    def close(self) -> None:
        """Stop the workers and release what they reserved."""
        ...


def _value(future):
    """What an in-process future (or a value ``put`` returned as is) stands for."""
    return future.value() if isinstance(future, Pending) else future


class InProcessExecutor:
    """One ``ShardWorker`` over all images, called in this process; calls run when their value
    is first needed (``chunks.Pending``), so a stage's progress bar sees its work."""

    def __init__(self, images, gpus: float = 0, progress: bool = False):
        self.worker = ShardWorker(image_rows(images), 0, gpus=gpus)
        self.bounds = [(0, self.worker.size())]
        self.progress, self.starts = progress, 1

    def submit(self, worker: int, method: str, *args, returns: int = 1):
        if worker != 0:
            raise ValueError(f"the in-process executor has one worker; asked for {worker}")
        fn = getattr(self.worker, method)
        call = Pending(lambda: fn(*map(_value, args)))
        return call if returns == 1 else [call.part(k) for k in range(returns)]

    def put(self, value):
        return value

    def get(self, futures: list, desc: str = "", unit: str = "block") -> list:
        if len(futures) == 1:  # one call: its own reports draw the bar (rows, pairs)
            with Bar(desc, self.progress and bool(desc), unit) as bar:
                self.worker.progress = bar.callback()
                try:
                    return [_value(futures[0])]
                finally:
                    self.worker.progress = None
        with progress_bar(len(futures), desc, self.progress and bool(desc), unit) as bar:
            out = []
            for f in futures:
                out.append(_value(f))
                bar.update(1)
            return out

    def tree(self, futures: list, keep: int = 1) -> list:
        if len(futures) <= keep:
            return list(futures)
        return [Pending(lambda: self.worker.add(*map(_value, futures)))]

    def reload(self, images) -> None:
        self.bounds = [(0, self.worker.load(image_rows(images)))]

    def keep(self) -> None:
        pass  # one process: nothing to make room for

    @property
    def closed(self) -> bool:
        return False

    def close(self) -> None:
        self.worker.release(None)
