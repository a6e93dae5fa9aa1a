"""The in-process backend: the training images in this process, the kernel core called directly."""

from __future__ import annotations

import numpy as np
import torch

from ray_convrfm.backends.protocol import KernelSpec, NystromOperator
from ray_convrfm.backends.store import KernelStore, RunStore, rows_fingerprint
from ray_convrfm.backends.workers import apply_chain
from ray_convrfm.kernels.agop import Workspace, agop_from_sides
from ray_convrfm.kernels.kernel import KernelSide, block_rows, kernel_matrix, prepare_side
from ray_convrfm.kernels.patches import featurise, patch_span
from ray_convrfm.kernels.solvers import normal_equations
from ray_convrfm.options import DEFAULT_BLOCK
from ray_convrfm.progress import Bar


class LocalBackend:
    """``KernelBackend`` over images held here: one prepared side of them per metric.

    With a kernel store (``configure(spec, store=url)``) the training kernels go through the
    same zarr layout as the Ray workers write, so an in-process fit resumes too.
    """

    def __init__(self, X: torch.Tensor, progress: bool = False, block: int = DEFAULT_BLOCK):
        self.X, self.progress, self.block = X, progress, block
        self.workspace = Workspace()
        self.spec: KernelSpec | None = None
        self.store: str | None = None
        self.runs: list[RunStore] = []  # each holds its store's lease until close()
        self.blocks_computed = 0

    @property
    def n(self) -> int:
        return len(self.X)

    def configure(self, spec: KernelSpec, store: str | None) -> None:
        self.spec, self.store = spec, store
        self.X = self.X.to(spec.torch_dtype)
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
            return kernel_matrix(xs, zs, self.spec.engine, self.spec.memory_budget_mb,
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

    def cross_kernel(self, Z: torch.Tensor, center_idx: np.ndarray | None,
                     desc: str = "kernel") -> torch.Tensor:
        cols = self._columns(center_idx)
        if self.store and center_idx is None:  # K(train, Z) stored like the Ray workers do
            Zt = Z.to(self.X.device, self.X.dtype)
            return self._stored(self._side(Zt), rows_fingerprint(Zt, self.block), desc).T
        return self._kernel(self._side(Z), cols, desc)

    def agop(self, coef: torch.Tensor, sample_idx: np.ndarray,
             center_idx: np.ndarray | None) -> torch.Tensor:
        with Bar("AGOP", enabled=self.progress, unit="pair") as bar:
            return agop_from_sides(self._columns(center_idx), coef, self.xs.take(sample_idx),
                                   self.M, engine=self.spec.engine,
                                   budget_mb=self.spec.memory_budget_mb,
                                   progress=bar.callback(), workspace=self.workspace)

    def nystrom_operator(self, center_idx: np.ndarray, Y: torch.Tensor) -> NystromOperator:
        rows: list[torch.Tensor] = []
        _, KtY, K_mm = self.nystrom_system(center_idx, Y, keep=rows)
        K = torch.cat(rows) if rows else torch.zeros(0, len(center_idx), dtype=self.X.dtype)

        def gram(V: torch.Tensor) -> torch.Tensor:  # float64, one block of rows at a time
            out = torch.zeros(K.shape[1], V.shape[1], dtype=torch.float64, device=V.device)
            for r in range(0, len(K), self.block):
                Kb = K[r : r + self.block].to(V.device, torch.float64)
                out += Kb.T @ (Kb @ V)
            return out

        return NystromOperator(K_mm=K_mm, KtY=KtY, gram_matvec=gram, release=rows.clear)

    def nystrom_system(self, center_idx: np.ndarray, Y: torch.Tensor,
                       keep: list | None = None):
        """(K^T K, K^T Y, K_mm) summed over blocks of rows; with ``keep`` (a list) the rows are
        appended to it instead and K^T K is not formed (None)."""
        cs = self.xs.take(center_idx)
        m = len(center_idx)
        if self.store:  # the n x m kernel through the store, then summed block by block
            store, shape, compute = self._fill(cs, self.run.centers_fingerprint(center_idx))
            rows = self.block

            def block(r):  # one block row, each block checked against its digest
                i = r // rows
                return torch.from_numpy(store.read("K", shape, recompute=compute,
                                                   block_rows=(i, i + 1))).to(self.X.device)
        else:
            rows = max(1, min(self.n, block_rows(m, self.xs.grids, self.spec.engine,
                                                 self.xs.left.element_size(),
                                                 self.spec.memory_budget_mb)))

            def block(r):
                return self._kernel(self.xs.rows(r, r + rows), cs)
        KtK = None if keep is not None else torch.zeros(m, m, dtype=torch.float64,
                                                        device=Y.device)
        KtY = torch.zeros(m, Y.shape[1], dtype=torch.float64, device=Y.device)
        for r in range(0, self.n, rows):
            K = block(r)
            if keep is None:
                a, b = normal_equations(K, Y[r : r + rows])
                KtK += a
            else:
                keep.append(K)
                b = K.T.to(torch.float64) @ Y[r : r + rows].to(torch.float64)
            KtY += b
        return KtK, KtY, self._kernel(cs, cs, symmetric=True)

    def centers(self, center_idx: np.ndarray | None) -> torch.Tensor:
        return self.X if center_idx is None else self.X[torch.as_tensor(center_idx)]

    def featurise(self, filters: torch.Tensor, padding: bool) -> None:
        self.X = featurise(self.X, filters, padding)

    def scores(self, Z, coef: torch.Tensor, center_idx: np.ndarray | None,
               chain: list) -> np.ndarray:
        Z = torch.as_tensor(np.asarray(Z)) if not isinstance(Z, torch.Tensor) else Z
        Z = apply_chain(Z.to(self.X.device, self.X.dtype), chain)
        K = self._kernel(self._side(Z), self._columns(center_idx), "predict kernel")
        return (K.to(torch.float64) @ coef.to(K.device, torch.float64)).cpu().numpy()

    def report(self) -> dict:
        computed, self.blocks_computed = self.blocks_computed, 0
        return {"stored_blocks_computed": computed} if self.store else {}

    def timings(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        while self.runs:  # give the stores' leases back
            self.runs.pop().close()
