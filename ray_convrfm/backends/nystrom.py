"""The Nystrom solvers' side of ``ShardedBackend`` (docs/math.md 9a), written once for every
executor: the shards' rows of K(train, centers) stay where they were computed (in memory up to
``SolveOptions.resident_mb``, beyond it in zarr slabs); the preconditioner's factor is built
from the shards' K_mm rows on the first worker (m x m, or m x q with ``preconditioner_rank``);
a conjugate-gradient step moves m x c vectors only.
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np
import torch

from ray_convrfm.backends.protocol import NystromOperator, Targets
from ray_convrfm.backends.store import KernelStore
from ray_convrfm.backends.workers import NystromTask
from ray_convrfm.kernels.pcg import preconditioner_columns

log = logging.getLogger(__name__)


class _RemotePreconditioner:
    """B and B^T for some ridges (a block of columns each), applied where the factor lives."""

    def __init__(self, backend, key: str, n: int, ridges: list[float], build: tuple):
        self.backend, self.key, self.n, self.ridges, self.build = backend, key, n, ridges, build

    def apply(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        out = self.backend.precondition(self.key, self.n, self.ridges, v.cpu().numpy(),
                                        transpose, self.build)
        return torch.from_numpy(np.array(out)).to(v.device)

    def apply_t(self, v: torch.Tensor) -> torch.Tensor:
        return self.apply(v, transpose=True)


class NystromSolvers:
    """``nystrom_operator`` and ``nystrom_system`` of ``ShardedBackend`` (its executor ``ex``,
    ``layer``, stores and ``solve`` options)."""

    def _centers_store(self, center_idx: np.ndarray) -> tuple | None:
        """(url, store spec, name, shape) of K(train, centers) in row slabs, or None."""
        if not self.store:
            return None
        if not self.align:
            raise ValueError("a stored kernel needs block-aligned shards (align=True)")
        url, spec = self.run.kernel(self.run.centers_fingerprint(center_idx), self.layer.M,
                                    self.layer.basis, layout="slabs")
        shape = (self.n, len(center_idx))
        KernelStore(url, spec).kernel("K", shape)  # created before the workers write
        return url, spec, "K", shape

    def _nystrom(self, center_idx: np.ndarray, targets: Targets, key: str | None = None,
                 resident_bytes: int | None = None, preconditioner_cols=None):
        """Every worker's rows of K(train, centers) (the centers' blocks fetched from their
        owners one at a time), summed: (K^T K or None, K^T Y, futures of the shards' K_mm
        rows, max of K_mm). With ``key`` the workers keep their rows for ``hessian_matvec``
        and K^T K is not formed (the iterative solver)."""
        centers, stored = self.center_blocks(center_idx), self._centers_store(center_idx)
        tasks, offset = [], 0
        for (a, b), rows in zip(self.ex.bounds, self._local(center_idx), strict=True):
            tasks.append(NystromTask(key=key, layer=self.layer,
                                     labels=self.ex.put(np.asarray(targets.labels[a:b])),
                                     classes=int(targets.classes),
                                     center_rows=rows.astype(np.int64), center_offset=offset,
                                     block=self.block, centers=centers, stored=stored,
                                     resident_bytes=resident_bytes,
                                     preconditioner_cols=preconditioner_cols))
            offset += len(rows)
        futures = [self.ex.submit(k, "nystrom_rows", task, returns=6)
                   for k, task in enumerate(tasks)]
        if key is not None:  # what hessian_matvec sends (a restarted worker rebuilds from it)
            self._tasks = (key, tasks)
        t0 = time.perf_counter()
        self.ex.get([f[1] for f in futures], "Nystrom rows", unit="row")
        self._time("nystrom_rows", t0)
        t0 = time.perf_counter()
        KtK = None if key is not None else self.reduce([f[0] for f in futures])
        KtY = self.reduce([f[1] for f in futures])
        self._time("nystrom_reduce", t0)
        for reports in self.ex.get([f[5] for f in futures]):  # damaged slabs redone
            for message in reports:
                log.warning("%s (on a shard worker)", message)
        kmax = max(self.ex.get([f[3] for f in futures]))
        self.blocks_computed += int(sum(self.ex.get([f[4] for f in futures])))
        return KtK, KtY, [f[2] for f in futures], kmax

    def _tasks_of(self, key: str) -> list:
        kept, tasks = self._tasks or (None, None)
        if kept != key:
            raise ValueError(f"no resident rows for {key!r}; call nystrom_operator first")
        return tasks

    def hessian_matvec(self, key: str, V: np.ndarray, ridges: list[float],
                       scale: float) -> np.ndarray:
        """(K^T K + ridge K_mm) V on the kernel divided by ``scale`` (column block r for
        ``ridges[r]``), summed over the workers' resident rows: one product moves m x R c in
        and out per worker, never m x m."""
        tasks = self._tasks_of(key)
        V_ref = self.ex.put(np.ascontiguousarray(V, dtype=np.float64))
        t0 = time.perf_counter()
        out = self.reduce([self.ex.submit(k, "hessian_matvec", task, V_ref, ridges, scale)
                           for k, task in enumerate(tasks)])
        self._time("cg_step", t0)
        self._timings["cg_steps"] = self._timings.get("cg_steps", 0) + 1
        return out

    def preconditioned_step(self, key: str, n: int, ridges: list[float], v: np.ndarray,
                            scale: float, build: tuple) -> np.ndarray:
        """B^T H B v, one CG step, chained on the workers: the first worker applies B, every
        worker its share of H (fetching B v from the first), a tree of sums, the first worker
        B^T; the driver sends v and waits once (m x c in, m x c out)."""
        tasks = self._tasks_of(key)
        t0 = time.perf_counter()
        u = self.ex.submit(0, "precondition", key, n, ridges, np.ascontiguousarray(v), False,
                           build)
        parts = [self.ex.submit(k, "hessian_matvec", task, u, ridges, scale)
                 for k, task in enumerate(tasks)]
        (out,) = self.ex.get([self.ex.submit(0, "precondition", key, n, ridges,
                                             self.ex.tree(parts)[0], True, build)])
        self._time("cg_step", t0)
        self._timings["cg_steps"] = self._timings.get("cg_steps", 0) + 1
        return out

    def precondition(self, key: str, n: int, ridges: list[float], v: np.ndarray,
                     transpose: bool, build: tuple) -> np.ndarray:
        """B v (B^T v) on the first worker, which holds the preconditioner's factor."""
        t0 = time.perf_counter()
        (out,) = self.ex.get([self.ex.submit(0, "precondition", key, n, ridges, v, transpose,
                                             build)])
        self._time("precondition", t0)
        return out

    def release(self, key: str) -> None:
        """The workers drop the resident rows and the factor of a finished solve."""
        self.ex.get(self._each("release", key))
        if self._tasks is not None and self._tasks[0] == key:
            self._tasks = None

    def nystrom_operator(self, center_idx: np.ndarray, targets: Targets) -> NystromOperator:
        """The operator of docs/math.md 9a over the rows the workers keep."""
        key = uuid.uuid4().hex
        cols = preconditioner_columns(len(center_idx), self.solve.preconditioner_rank)
        resident = None if self.solve.resident_mb is None else self.solve.resident_mb * 2**20
        _, KtY, C_parts, kmax = self._nystrom(center_idx, targets, key=key,
                                              resident_bytes=resident, preconditioner_cols=cols)
        scale = float(kmax)
        build = (scale, cols, C_parts)  # the first worker fetches the parts when it factors
        n = len(targets)

        def hessian(V: torch.Tensor, ridges: list[float]) -> torch.Tensor:
            out = self.hessian_matvec(key, V.cpu().numpy(), list(ridges), scale)
            return torch.from_numpy(np.array(out)).to(V.device)

        def step(ridges: list[float]):
            def preconditioned(v: torch.Tensor) -> torch.Tensor:
                out = self.preconditioned_step(key, n, list(ridges), v.cpu().numpy(), scale,
                                               build)
                return torch.from_numpy(np.array(out)).to(v.device)

            return preconditioned

        KtY = torch.as_tensor(KtY).to(self.device) / (scale if scale > 0 else 1.0)
        return NystromOperator(scale=scale, KtY=KtY, hessian=hessian,
                               preconditioner=lambda ridges: _RemotePreconditioner(
                                   self, key, n, list(ridges), build),
                               release=lambda: self.release(key), preconditioned_step=step)

    def nystrom_system(self, center_idx: np.ndarray, targets: Targets):
        """Per-shard (K^T K, K^T Y) against the centers, summed (docs/math.md section 9), and
        K_mm from the shards' center rows; with a store the rows go through zarr slabs, so an
        interrupted fit resumes. For small m: K_mm and K^T K are m x m here."""
        KtK, KtY, C_parts, _ = self._nystrom(center_idx, targets)
        C = np.concatenate(self.ex.get(C_parts), axis=0)
        return tuple(torch.from_numpy(np.array(a)).to(self.device) for a in (KtK, KtY, C))
