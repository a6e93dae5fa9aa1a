"""A shard worker's share of the Nystrom solvers (docs/math.md 9a): its rows of K(train,
centers) slab by slab, kept between conjugate-gradient steps (in memory up to a budget, beyond
it in zarr slabs), their products with m x c blocks, and the preconditioner's factor on the
first worker. Every task carries the ``NystromTask`` it belongs to, so a restarted worker
rebuilds its rows from it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ray_convrfm.backends.chunks import CenterBlocks, resolve
from ray_convrfm.backends.protocol import LayerState
from ray_convrfm.backends.store import KernelStore, StoreSpec, fingerprint
from ray_convrfm.kernels.pcg import factor_centers
from ray_convrfm.kernels.solvers import class_sums
from ray_convrfm.options import MATVEC_ROWS


@dataclass(frozen=True)
class NystromTask:
    """One shard's share of the Nystrom problem: everything a worker needs to (re)compute its
    rows of K(train, centers), sent with every conjugate-gradient step so that a restarted
    worker rebuilds them (refs inside are fetched only then)."""

    key: str | None  # rows kept for CG steps under this key; None: the direct solver's sums
    layer: LayerState
    labels: object  # (rows of the shard,) class indices: an object ref or an array
    classes: int  # c: one-hot targets are made per slab from the labels
    center_rows: np.ndarray  # local rows of this shard that are centers
    center_offset: int  # position of its first center among all m
    block: int  # rows per slab (the store's block when stored)
    centers: CenterBlocks
    stored: tuple | None = None  # (url, StoreSpec, name, shape) of K(train, centers)
    resident_bytes: int | None = None  # resident rows' budget; beyond, slabs live in zarr
    preconditioner_cols: np.ndarray | None = None  # q center positions (rank-q) or None


@dataclass
class ResidentRows:
    """A worker's rows of K(train, centers) between CG steps: slabs in memory, or (beyond the
    budget) marked slabs of a zarr store read back at every step."""

    task: NystromTask
    slabs: list = field(default_factory=list)  # (r0, r1, values or None, slab index)
    store: KernelStore | None = None
    name: str = "K"
    shape: tuple[int, int] = (0, 0)
    spill_dir: str | None = None  # a temporary store on this worker's disk

    def close(self) -> None:
        if self.spill_dir:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None


def ridge_columns(ridges: list[float], columns: int, like: torch.Tensor) -> torch.Tensor:
    """(columns,) the ridge of every column of an (m, R c) block of R ridges' columns."""
    per = columns // max(len(ridges), 1)
    return torch.tensor([r for r in ridges for _ in range(per)], dtype=like.dtype,
                        device=like.device)


class NystromRows:
    """The Nystrom methods of ``ShardWorker`` (its ``ShardCore`` gives the shard and sides)."""

    def nystrom_rows(self, task: NystromTask):
        """This shard's rows of K(train, centers), slab by slab (``task.block`` rows against
        every center, the centers a block at a time), and what they give:

        (K^T K or None, K^T Y, C, max of K_mm's rows here, slabs computed, store warnings)

        C is the rows of the centers this shard holds (their K_mm rows: every column, or only
        the rank-q preconditioner's columns). With ``task.key`` the rows stay for CG steps
        (K^T K is not formed): in memory up to ``task.resident_bytes``, beyond it in zarr
        slabs. With ``task.stored`` every slab goes through the run's store, marked after it
        is written; a rerun reads (and checks) what an interrupted fit left.
        """
        self.release(None)
        n = len(self.raw)
        m, block = task.centers.m, task.block
        res = ResidentRows(task)
        computed, reports = 0, []
        if task.stored is not None:
            url, store_spec, res.name, res.shape = task.stored
            res.store = KernelStore(url, store_spec)
            res.store.kernel(res.name, res.shape)
        labels = torch.as_tensor(np.asarray(resolve(task.labels), dtype=np.int64),
                                 device=self.device)
        KtK = None if task.key is not None else torch.zeros(m, m, dtype=torch.float64,
                                                             device=self.device)
        KtY = torch.zeros(m, task.classes, dtype=torch.float64, device=self.device)
        width = m if task.preconditioner_cols is None else len(task.preconditioner_cols)
        # this shard's centers' rows of K_mm, filled in place (one copy, never a list of parts)
        C = np.empty((len(task.center_rows), width), dtype=task.layer.spec.dtype)
        filled, kmax, held = 0, -np.inf, 0
        for r0 in range(0, n, block):
            r1 = min(r0 + block, n)
            K, fresh = self._slab(res, r0, r1)
            computed += fresh
            if task.key is None:
                K64 = K.to(torch.float64)  # class_sums takes it as it is: one conversion
                KtK.addmm_(K64.T, K64)
            KtY += class_sums(K64 if task.key is None else K, labels[r0:r1], task.classes)
            here = torch.as_tensor(task.center_rows[(task.center_rows >= r0)
                                                    & (task.center_rows < r1)] - r0,
                                   device=K.device)
            rows = K[here]
            if len(rows):
                kmax = max(kmax, float(rows.max()))
            if task.preconditioner_cols is not None:
                rows = rows[:, torch.as_tensor(task.preconditioner_cols, device=K.device)]
            C[filled : filled + len(rows)] = rows.cpu().numpy()
            filled += len(rows)
            self._tick(r1 - r0, n)
            if task.key is None:
                continue
            if task.resident_bytes is None or held + K.numel() * K.element_size() \
                    <= task.resident_bytes:
                held += K.numel() * K.element_size()
                res.slabs.append((r0, r1, K, None))
            else:  # beyond the budget: the slab is read back from zarr at every step
                res.slabs.append((r0, r1, None, self._spill(res, r0, r1, K)))
        if res.store is not None:
            reports = list(res.store.reports)
        if task.key is not None:
            self._resident = res
        return (None if KtK is None else KtK.cpu().numpy(), KtY.cpu().numpy(), C, kmax,
                computed, reports)

    def _slab_index(self, res: ResidentRows, r0: int) -> int:
        return (self.start + r0) // res.task.block if res.spill_dir is None \
            else r0 // res.task.block

    def _compute_slab(self, task: NystromTask, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 of K(train, centers), prepared a chunk of rows at a time."""
        out = torch.empty(r1 - r0, task.centers.m, dtype=task.layer.spec.torch_dtype,
                          device=self.device)
        for a, b, xs in self._rows_sides(task.layer, slice(r0, r1)):
            self._against_centers(xs, task.layer, task.centers, out=out[a:b])
        return out

    def _slab(self, res: ResidentRows, r0: int, r1: int) -> tuple[torch.Tensor, int]:
        """Rows r0..r1 (local) of K(train, centers) and whether they were computed now: from
        the run's store when a finished slab is there (checked against its digest; a damaged
        one is recomputed), else computed (and written, then marked, when stored)."""
        if res.store is None:
            return self._compute_slab(res.task, r0, r1), 1
        i = self._slab_index(res, r0)
        store, name, shape = res.store, res.name, res.shape
        if store.marks(name, shape, (i, i + 1)).any():
            redone = []  # a damaged slab is recomputed (and counted)

            def recompute(_) -> None:
                self._write_slab(res, r0, r1)
                redone.append(1)

            K = store.read(name, shape, recompute=recompute, block_rows=(i, i + 1))
            return torch.from_numpy(K).to(self.device), len(redone)
        K = self._compute_slab(res.task, r0, r1)
        store.write_block(name, shape, i, 0, K)
        return K, 1

    def _write_slab(self, res: ResidentRows, r0: int, r1: int) -> None:
        res.store.write_block(res.name, res.shape, self._slab_index(res, r0), 0,
                              self._compute_slab(res.task, r0, r1))

    def _spill(self, res: ResidentRows, r0: int, r1: int, K: torch.Tensor) -> int:
        """Make sure slab r0..r1 is in a zarr store (the run's, or a temporary one on this
        worker's disk, made on first use); returns its slab index there."""
        if res.store is None:
            task = res.task
            params = task.layer.spec.params
            res.spill_dir = tempfile.mkdtemp(prefix="ray-convrfm-rows-")
            spec = StoreSpec(rows_fingerprint="spill", cols_fingerprint=task.centers.key,
                             metric_fingerprint=fingerprint(task.layer.M),
                             depth=params.depth, patch_size=params.patch_size,
                             padding=params.padding, dtype=task.layer.spec.dtype,
                             block=task.block, layout="slabs")
            res.store = KernelStore(f"{res.spill_dir}/rows.zarr", spec)
            res.shape = (len(self.raw), task.centers.m)
        i = self._slab_index(res, r0)
        if not res.store.marks(res.name, res.shape, (i, i + 1)).any():
            res.store.write_block(res.name, res.shape, i, 0, K)
        return i

    def _rows_for(self, task: NystromTask) -> ResidentRows:
        """The resident rows of ``task``, rebuilt first by a worker that lost them (a restart)."""
        if self._resident is None or self._resident.task.key != task.key:
            self.nystrom_rows(task)
        return self._resident

    def hessian_matvec(self, task: NystromTask, V: np.ndarray, ridges: list[float],
                       scale: float) -> np.ndarray:
        """This shard's share of H V = (K^T K + ridge K_mm) V on the kernel divided by
        ``scale`` (float64, m x R c in and out, column block r for ``ridges[r]``): K_s^T (K_s V),
        plus each block's ridge times K_s V at the rows of the centers it holds (their rows of
        K_mm V). One CG step's work on this worker: one pass over its rows for every ridge."""
        res = self._rows_for(task)
        m = task.centers.m
        V = torch.as_tensor(np.asarray(V), dtype=torch.float64, device=self.device) / scale
        out = torch.zeros(m, V.shape[1], dtype=torch.float64, device=self.device)
        # float64 copies of MATVEC_ROWS rows at a time: the two products read them from cache
        buf = torch.empty(MATVEC_ROWS, m, dtype=torch.float64, device=self.device)
        rows = task.center_rows
        weight = scale * ridge_columns(ridges, V.shape[1], V)  # each column's ridge, once
        for r0, r1, K, i in res.slabs:
            if K is None:
                t0 = time.perf_counter()
                K = torch.from_numpy(res.store.read(
                    res.name, res.shape, block_rows=(i, i + 1),
                    recompute=lambda _, a=r0, b=r1: self._write_slab(res, a, b))).to(self.device)
                self._read_seconds += time.perf_counter() - t0
            KV = torch.empty(len(K), V.shape[1], dtype=torch.float64, device=self.device)
            for a in range(0, len(K), MATVEC_ROWS):  # (K / scale) V, then its K^T product
                Kb = buf[: min(MATVEC_ROWS, len(K) - a)].copy_(K[a : a + MATVEC_ROWS])
                torch.mm(Kb, V, out=KV[a : a + len(Kb)])
                out.addmm_(Kb.T, KV[a : a + len(Kb)])
            sel = np.flatnonzero((rows >= r0) & (rows < r1))
            if len(sel):
                pos = torch.as_tensor(task.center_offset + sel, device=self.device)
                here = KV[torch.as_tensor(rows[sel] - r0, device=self.device)]
                out[pos] += here * weight
        return (out / scale).cpu().numpy()

    def read_seconds(self) -> float:
        """Seconds spent reading spilled slabs back (the out-of-core tier) since the previous
        call."""
        seconds, self._read_seconds = self._read_seconds, 0.0
        return seconds

    def release(self, key: str | None) -> None:
        """Drop the resident rows (and any temporary store) of a finished solve; None: any."""
        if self._resident is not None and (key is None or self._resident.task.key == key):
            self._resident.close()
            self._resident = None
        if self._factor is not None and (key is None or self._factor[0] == key):
            self._factor = None

    # ------------------------------------------------------------------ the preconditioner
    def precondition(self, key: str, n: int, ridges: list[float], v: np.ndarray,
                     transpose: bool, build: tuple) -> np.ndarray:
        """B v (or B^T v) of the preconditioner, column block r for ``ridges[r]``: this worker
        holds the factor
        (m x m, or m x q for rank q) built on first use from ``build`` = (scale, columns,
        [refs of the shards' K_mm rows]), fetched only then; no other process holds it."""
        if self._factor is None or self._factor[0] != key:
            scale, cols, parts = build
            C = np.concatenate([np.asarray(resolve(p)) for p in parts], axis=0)
            C = torch.as_tensor(C, device=self.device).to(torch.float64).div_(scale)
            self._factor = (key, factor_centers(C, cols, overwrite=True), {})
            del C
        _, factor, by_ridges = self._factor
        ridges = tuple(ridges)
        if ridges not in by_ridges:
            by_ridges.clear()
            by_ridges[ridges] = factor.for_ridges(list(ridges), n)
        pre = by_ridges[ridges]
        v = torch.as_tensor(np.asarray(v), dtype=torch.float64, device=self.device)
        return (pre.apply_t(v) if transpose else pre.apply(v)).cpu().numpy()
