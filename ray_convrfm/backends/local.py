"""The in-process backend: the training images in this process, the kernel core called directly."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import torch

from ray_convrfm.backends.chunks import CenterBlocks, apply_chain
from ray_convrfm.backends.nystrom import NystromMembers
from ray_convrfm.backends.protocol import KernelSpec
from ray_convrfm.backends.store import KernelStore, RunStore, rows_fingerprint
from ray_convrfm.backends.workers import NystromTask, ShardWorker
from ray_convrfm.kernels.agop import Workspace, agop_from_sides
from ray_convrfm.kernels.kernel import KernelSide, as_working, kernel_matrix, prepare_side
from ray_convrfm.kernels.patches import featurise, patch_span
from ray_convrfm.options import DEFAULT_BLOCK, SolveOptions
from ray_convrfm.progress import Bar

_versions = itertools.count()


class LocalShards:
    """The training images as one shard of an in-process ``ShardWorker``, with the driver-side
    methods of ``driver.ShardedImages`` that the Nystrom solver uses: the rows, slabs, stores
    and preconditioner factor of an in-process fit run the workers' code."""

    def __init__(self, X: torch.Tensor, block: int, progress: bool):
        self.worker = ShardWorker(X.detach().cpu().numpy(), 0,
                                  gpus=1 if X.device.type == "cuda" else 0)
        self.X, self.block, self.progress = X, block, progress
        self.version = next(_versions)  # tells these images' centers from earlier ones'
        self.task: NystromTask | None = None

    def center_blocks(self, idx: np.ndarray | None) -> CenterBlocks:
        idx = np.arange(len(self.X)) if idx is None else np.asarray(idx)
        raw = self.worker.raw
        parts = tuple(raw[idx[k : k + self.block]] for k in range(0, len(idx), self.block))
        digest = hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()
        return CenterBlocks(f"local:{self.version}:{digest}:{self.block}", parts,
                            tuple(len(p) for p in parts))

    def nystrom(self, center_idx, targets, M, basis, spec, store=None, key=None,
                resident_bytes=None, preconditioner_cols=None):
        """As ``ShardedImages.nystrom``, for the one in-process shard."""
        stored = None
        if store is not None:
            url, store_spec = store
            shape = (len(self.X), len(center_idx))
            KernelStore(url, store_spec).kernel("K", shape)
            stored = (url, store_spec, "K", shape)
        task = NystromTask(key=key, chain=[], labels=np.asarray(targets.labels),
                           classes=int(targets.classes),
                           center_rows=np.asarray(center_idx, dtype=np.int64), center_offset=0,
                           M=M, basis=basis, spec=spec, block=self.block,
                           centers=self.center_blocks(center_idx), stored=stored,
                           resident_bytes=resident_bytes,
                           preconditioner_cols=preconditioner_cols)
        with Bar("Nystrom rows", enabled=self.progress, unit="row") as bar:
            self.worker.progress = bar.callback()
            try:
                KtK, KtY, C, kmax, computed, _ = self.worker.nystrom_rows(task)
            finally:
                self.worker.progress = None
        self.task = task if key is not None else None
        return KtK, KtY, [C], kmax, computed

    def hessian_matvec(self, key: str, V: np.ndarray, ridges: list[float],
                       scale: float) -> np.ndarray:
        if self.task is None or self.task.key != key:
            raise ValueError(f"no resident rows for {key!r}; call nystrom(key=...) first")
        return self.worker.hessian_matvec(self.task, V, ridges, scale)

    def precondition(self, key, n, ridges, v, transpose, build) -> np.ndarray:
        return self.worker.precondition(key, n, ridges, v, transpose, build)

    def preconditioned_step(self, key, n, ridges, v, scale, build) -> np.ndarray:
        """B^T H B v: as the Ray workers chain it, here in turn."""
        u = self.precondition(key, n, ridges, v, False, build)
        return self.precondition(key, n, ridges, self.hessian_matvec(key, u, ridges, scale),
                                 True, build)

    def release(self, key: str) -> None:
        self.worker.release(key)
        if self.task is not None and self.task.key == key:
            self.task = None

    def read_seconds(self) -> float:
        return self.worker.read_seconds()

    def collect(self, parts: list) -> np.ndarray:
        """The K_mm rows ``nystrom`` returned, as one array."""
        return np.concatenate(parts, axis=0)


class LocalBackend(NystromMembers):
    """``KernelBackend`` over images held here: one prepared side of them per metric.

    With a kernel store (``configure(spec, store=url)``) the training kernels go through the
    same zarr layout as the Ray workers write, so an in-process fit resumes too.
    """

    def __init__(self, X: torch.Tensor, progress: bool = False, block: int = DEFAULT_BLOCK,
                 solve: SolveOptions | None = None):
        self.X, self.progress, self.block = X, progress, block
        self.stored = X  # the images as given (8-bit pixels: the model's centers stay uint8)
        self.solve = solve or SolveOptions()
        self.chain: list = []  # filter banks applied so far (to held-out sets when scored)
        self.holdouts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._shards: LocalShards | None = None
        self.workspace = Workspace()
        self.spec: KernelSpec | None = None
        self.store: str | None = None
        self.runs: list[RunStore] = []  # each holds its store's lease until close()
        self.blocks_computed = 0

    @property
    def n(self) -> int:
        return len(self.X)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.X.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.X.device

    @property
    def dtype(self) -> torch.dtype:
        return self.X.dtype

    @property
    def shards(self) -> LocalShards:
        """The in-process shard worker (rebuilt after the images change)."""
        if self._shards is None or self._shards.X is not self.X:
            self._shards = LocalShards(self.X, self.block, self.progress)
        return self._shards

    def configure(self, spec: KernelSpec, store: str | None) -> None:
        self.spec, self.store = spec, store
        self.X = as_working(self.X, spec.torch_dtype, self.X.device)
        if store:
            self.run = RunStore.open(store, rows_fingerprint(self.X, self.block), spec,
                                     self.block)
            self.runs.append(self.run)

    def patch_span(self) -> torch.Tensor | None:
        p = self.spec.params
        return patch_span(self.X, p.patch_size, p.padding)

    def set_metric(self, M: torch.Tensor, basis: torch.Tensor | None) -> None:
        self.M, self.basis = M, basis
        self.xs = self._side(self.X)

    def _side(self, Z: torch.Tensor) -> KernelSide:
        return prepare_side(Z.to(self.X.device, self.X.dtype), self.M, self.spec.params,
                            self.basis)

    def _columns(self, center_idx: np.ndarray | None) -> KernelSide:
        return self.xs if center_idx is None else self.xs.take(center_idx)

    def _kernel(self, xs: KernelSide, zs: KernelSide, desc: str | None = None,
                symmetric: bool = False) -> torch.Tensor:
        with Bar(desc or "kernel", enabled=self.progress and desc is not None) as bar:
            return kernel_matrix(xs, zs, self.spec.engine_on(self.X.device),
                                 self.spec.memory_budget_mb,
                                 symmetric=symmetric, progress=bar.callback())

    def train_kernel(self, desc: str = "train kernel") -> torch.Tensor:
        if not self.store:
            return self._kernel(self.xs, self.xs, desc, symmetric=True)
        return self._stored(self.xs, self.run.rows_fingerprint, desc)

    def _fill(self, cols: KernelSide, cols_fp: str):
        """K(train, cols) into the store: only blocks not yet marked are computed. Returns the
        store, the kernel's shape and ``compute(blocks)``, which (re)computes blocks whose
        marks are cleared (what a read found damaged)."""
        store = KernelStore(*self.run.kernel(cols_fp, self.M, self.basis))
        shape = (self.n, len(cols))

        def compute(blocks: list[tuple[int, int]]) -> None:
            self.blocks_computed += store.fill("K", shape, blocks,
                                               lambda r0, r1: self.xs.rows(r0, r1), cols,
                                               lambda xs, zs: self._kernel(xs, zs))

        compute(store.blocks("K", shape))
        return store, shape, compute

    def _stored(self, cols: KernelSide, cols_fp: str, desc: str) -> torch.Tensor:
        store, shape, compute = self._fill(cols, cols_fp)
        return torch.from_numpy(store.read("K", shape, recompute=compute)).to(self.X.device)

    def holdout(self, name: str, X, y: np.ndarray) -> None:
        if hasattr(X, "load"):  # parquet rows: read here (there are no workers)
            X = X.load()
        X = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
        self.holdouts[name] = (X, np.asarray(y))

    def evaluate(self, name: str, coefs: list[torch.Tensor],
                 center_idx: np.ndarray | None) -> np.ndarray:
        X, y = self.holdouts[name]
        stacked = np.stack([c.detach().cpu().numpy() for c in coefs])
        shards = self.shards
        with Bar(f"{name} scores", enabled=self.progress):
            return shards.worker.evaluate(name, X, y, self.chain, stacked, self.M, self.basis,
                                          self.spec, shards.center_blocks(center_idx),
                                          self.block)

    def agop(self, coef: torch.Tensor, sample_idx: np.ndarray,
             center_idx: np.ndarray | None) -> torch.Tensor:
        with Bar("AGOP", enabled=self.progress, unit="pair") as bar:
            return agop_from_sides(self._columns(center_idx), coef, self.xs.take(sample_idx),
                                   self.M, engine=self.spec.engine_on(self.X.device),
                                   budget_mb=self.spec.memory_budget_mb,
                                   progress=bar.callback(), workspace=self.workspace)

    def centers(self, center_idx: np.ndarray | None) -> torch.Tensor:
        X = self.stored if not self.chain and self.stored.dtype == torch.uint8 else self.X
        return X if center_idx is None else X[torch.as_tensor(center_idx, device=X.device)]

    def featurise(self, filters: torch.Tensor, padding: bool) -> None:
        self.X = featurise(self.X, filters, padding)
        self.chain = [*self.chain, (filters.detach().cpu().numpy(), bool(padding))]

    def scores(self, Z, coef: torch.Tensor, center_idx: np.ndarray | None,
               chain: list) -> np.ndarray:
        Z = apply_chain(as_working(Z, self.X.dtype, self.X.device), chain)
        K = self._kernel(self._side(Z), self._columns(center_idx), "predict kernel")
        return (K.to(torch.float64) @ coef.to(K.device, torch.float64)).cpu().numpy()

    def report(self) -> dict:
        computed, self.blocks_computed = self.blocks_computed, 0
        out = {"seconds_reading_rows": self.shards.read_seconds()} if self._shards else {}
        if self.store:
            out["stored_blocks_computed"] = computed
        return out

    def timings(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        while self.runs:  # give the stores' leases back
            self.runs.pop().close()
