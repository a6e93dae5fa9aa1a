"""The Nystrom solvers' backend members, written once over Ray shards or in process.

Both backends hold ``shards``: an object with the driver-side methods of
``driver.ShardedImages`` (``nystrom``, ``hessian_matvec``, ``precondition``, ``release``,
``collect``), that is Ray shard workers, or ``local.LocalShards`` (one in-process
``ShardWorker``). ``NystromMembers`` gives both backends the same ``nystrom_operator`` and
``nystrom_system`` over them, so what runs on the rows, slabs, stores and factor is the same
code for a laptop and a cluster.
"""

from __future__ import annotations

import uuid

import numpy as np
import torch

from ray_convrfm.backends.protocol import KernelSpec, NystromOperator, Targets
from ray_convrfm.kernels.pcg import preconditioner_columns
from ray_convrfm.options import SolveOptions


class _RemotePreconditioner:
    """B and B^T for some ridges (a block of columns each), applied where the factor lives
    (``shards.precondition``)."""

    def __init__(self, shards, key: str, n: int, ridges: list[float], build: tuple):
        self.shards, self.key, self.n, self.ridges, self.build = shards, key, n, ridges, build

    def apply(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        out = self.shards.precondition(self.key, self.n, self.ridges, v.cpu().numpy(),
                                       transpose, self.build)
        return torch.from_numpy(np.array(out)).to(v.device)

    def apply_t(self, v: torch.Tensor) -> torch.Tensor:
        return self.apply(v, transpose=True)


def nystrom_operator(shards, center_idx: np.ndarray, targets: Targets, M: np.ndarray,
                     basis: np.ndarray | None, spec: KernelSpec, store: tuple | None,
                     solve: SolveOptions, device: torch.device) -> tuple[NystromOperator, int]:
    """The operator of docs/math.md 9a over rows kept by ``shards``, and the slabs computed.

    The rows of K(train, centers) stay with their shards (in memory up to
    ``solve.resident_mb``, beyond it in zarr slabs); the preconditioner's factor is built from
    the shards' K_mm rows on the first shard (m x m, or m x q with ``preconditioner_rank``); a
    CG step moves m x c vectors only.
    """
    key = uuid.uuid4().hex
    cols = preconditioner_columns(len(center_idx), solve.preconditioner_rank)
    resident = None if solve.resident_mb is None else solve.resident_mb * 2**20
    _, KtY, C_parts, kmax, computed = shards.nystrom(
        center_idx, targets, M, basis, spec, store, key=key, resident_bytes=resident,
        preconditioner_cols=cols)
    scale = float(kmax)
    build = (scale, cols, C_parts)  # the first shard fetches the parts when it factors
    n = len(targets)

    def hessian(V: torch.Tensor, ridges: list[float]) -> torch.Tensor:
        out = shards.hessian_matvec(key, V.cpu().numpy(), list(ridges), scale)
        return torch.from_numpy(np.array(out)).to(V.device)

    def step(ridges: list[float]):
        def preconditioned(v: torch.Tensor) -> torch.Tensor:
            out = shards.preconditioned_step(key, n, list(ridges), v.cpu().numpy(), scale,
                                             build)
            return torch.from_numpy(np.array(out)).to(v.device)

        return preconditioned

    KtY = torch.as_tensor(KtY).to(device) / (scale if scale > 0 else 1.0)
    op = NystromOperator(scale=scale, KtY=KtY, hessian=hessian,
                         preconditioner=lambda ridges: _RemotePreconditioner(
                             shards, key, n, list(ridges), build),
                         release=lambda: shards.release(key), preconditioned_step=step)
    return op, computed


class NystromMembers:
    """``KernelBackend.nystrom_operator`` and ``nystrom_system`` for a backend with ``shards``,
    ``run``/``store`` (its kernel store), ``M``, ``basis``, ``spec``, ``solve``, ``device``
    and a ``blocks_computed`` counter."""

    def _centers_store(self, center_idx: np.ndarray) -> tuple | None:
        """(url, spec) of K(train, centers) in row slabs, or None without a store."""
        if not self.store:
            return None
        return self.run.kernel(self.run.centers_fingerprint(center_idx), self.M, self.basis,
                               layout="slabs")

    def nystrom_operator(self, center_idx: np.ndarray, targets: Targets) -> NystromOperator:
        """The shards keep their rows of K(train, centers); a CG step moves m x c only, and
        the preconditioner's factor is built and applied on the first shard."""
        op, computed = nystrom_operator(self.shards, center_idx, targets, self.M, self.basis,
                                        self.spec, self._centers_store(center_idx), self.solve,
                                        self.device)
        self.blocks_computed += computed
        return op

    def nystrom_system(self, center_idx: np.ndarray, targets: Targets):
        """Per-shard (K^T K, K^T Y) against the centers, summed (docs/math.md section 9), and
        K_mm from the shards' center rows; with a store the rows go through zarr slabs, so an
        interrupted fit resumes. For small m: K_mm and K^T K are m x m here."""
        KtK, KtY, C_parts, _, computed = self.shards.nystrom(
            center_idx, targets, self.M, self.basis, self.spec,
            self._centers_store(center_idx))
        self.blocks_computed += computed
        return tuple(torch.from_numpy(np.array(a)).to(self.device)
                     for a in (KtK, KtY, self.shards.collect(C_parts)))
