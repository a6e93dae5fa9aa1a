"""The Ray backend: shard workers hold the training images; the driver reduces small results.

It runs the same kernel core as ``LocalBackend`` on the workers (``workers.py``), so a laptop
fit and a cluster fit differ only in ``ClusterOptions``.
"""

from __future__ import annotations

import numpy as np
import torch

from ray_convrfm.backends.driver import ShardedImages, resolve_gpus_per_worker, start_ray
from ray_convrfm.backends.nystrom import NystromMembers
from ray_convrfm.backends.protocol import KernelSpec
from ray_convrfm.backends.store import RunStore
from ray_convrfm.kernels.patches import span_from_gram
from ray_convrfm.options import Options, SolveOptions


def open_shards(X, options: Options) -> ShardedImages:
    """Start or join Ray and spread images X over ``options.cluster.workers`` shard actors
    (block-aligned when there is a kernel store). ``X`` is an array or tensor, or rows of a
    parquet data set (``ParquetRows``) that every worker reads itself."""
    cluster = options.cluster
    start_ray(cluster.workers, cluster.address)
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    elif not hasattr(X, "load"):
        X = np.asarray(X)
    return ShardedImages(X, cluster.workers, threads=cluster.threads_per_worker,
                         max_restarts=cluster.max_restarts, block=options.store.block,
                         align=bool(options.store.url), elastic=bool(cluster.address),
                         gpus_per_worker=resolve_gpus_per_worker(cluster.gpus_per_worker),
                         placement_timeout_s=cluster.placement_timeout_s,
                         progress=options.verbose)


class RayBackend(NystromMembers):
    """``KernelBackend`` over shard workers (``ShardedImages``).

    Columns of every kernel (all training images, the Nystrom centers, the AGOP's predictor) go
    from the workers that hold them to the workers that need them. With a store the kernels of
    the training rows go through zarr: workers write the blocks of their rows, a rerun computes
    only missing blocks, and the driver reads the finished kernel back (the exact solver needs
    it whole).
    """

    def __init__(self, shards: ShardedImages, device: torch.device, owns_shards: bool = True,
                 solve: SolveOptions | None = None):
        self.shards, self._device, self.owns = shards, device, owns_shards
        self.solve = solve or SolveOptions()
        self.block = shards.block
        self.spec: KernelSpec | None = None
        self.store: str | None = None
        self.runs: list[RunStore] = []  # each holds its store's lease until close()
        self.blocks_computed = 0

    @classmethod
    def open(cls, X, options: Options, device: torch.device) -> RayBackend:
        return cls(open_shards(X, options), device, solve=options.solve)

    @property
    def n(self) -> int:
        return self.shards.n

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.shards.row_shape)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.torch_dtype

    def configure(self, spec: KernelSpec, store: str | None) -> None:
        self.spec, self.store = spec, store
        if store:
            self.run = RunStore.open(store, self.shards.fingerprint(spec.dtype), spec, self.block)
            self.runs.append(self.run)

    def patch_span(self) -> torch.Tensor | None:
        p = self.spec.params
        gram = self.shards.patch_gram(p.patch_size, p.padding, self.spec.dtype,
                                      self.spec.memory_budget_mb)
        return span_from_gram(torch.from_numpy(gram), dtype=self.spec.torch_dtype)

    def set_metric(self, M: torch.Tensor, basis: torch.Tensor | None) -> None:
        self.M = M.cpu().numpy()
        self.basis = None if basis is None else basis.cpu().numpy()

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _rows_against(self, cols, n_cols: int, cols_fp, desc: str) -> np.ndarray:
        """K(training images, cols), through the store when there is one (``cols_fp()`` gives
        the columns' fingerprint, computed only then)."""
        if not self.store:
            return self.shards.kernel(cols, self.M, self.basis, self.spec, desc)
        url, store_spec = self.run.kernel(cols_fp(), self.M, self.basis)
        K, computed = self.shards.kernel_via_store(cols, n_cols, self.M, self.basis, self.spec,
                                                   url, store_spec, "K", desc)
        self.blocks_computed += computed
        return K

    def train_kernel(self, desc: str = "train kernel") -> torch.Tensor:
        return self._tensor(self._rows_against(self.shards.parts(), self.n,
                                               lambda: self.run.rows_fingerprint, desc))

    def holdout(self, name: str, X, y: np.ndarray) -> None:
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        self.shards.add_holdout(name, X, y)

    def evaluate(self, name: str, coefs: list[torch.Tensor],
                 center_idx: np.ndarray | None) -> np.ndarray:
        stacked = np.stack([c.detach().cpu().numpy() for c in coefs])
        return self.shards.evaluate(name, stacked, self.shards.center_blocks(center_idx),
                                    self.M, self.basis, self.spec, desc=f"{name} scores")

    def agop(self, coef: torch.Tensor, sample_idx: np.ndarray,
             center_idx: np.ndarray | None) -> torch.Tensor:
        G = self.shards.agop(self.shards.center_blocks(center_idx), coef.cpu().numpy(),
                             sample_idx, self.M, self.basis, self.spec)
        return self._tensor(G).to(coef.dtype)

    def centers(self, center_idx: np.ndarray | None) -> torch.Tensor:
        return self._tensor(self.shards.gather(center_idx, self.spec.dtype))

    def featurise(self, filters: torch.Tensor, padding: bool) -> None:
        self.shards.featurise(filters.cpu().numpy(), padding)

    def scores(self, Z, coef: torch.Tensor, center_idx: np.ndarray | None,
               chain: list) -> np.ndarray:
        Z = Z.detach().cpu().numpy() if isinstance(Z, torch.Tensor) else np.asarray(Z)
        chain = [(np.asarray(f.cpu() if isinstance(f, torch.Tensor) else f), bool(p))
                 for f, p in chain]
        if Z.dtype != np.uint8:  # 8-bit pixels travel as they are; workers convert them
            Z = Z.astype(self.spec.dtype, copy=False)
        return self.shards.map_scores(Z, chain,
                                      self.shards.center_blocks(center_idx),
                                      coef.cpu().numpy(), self.M, self.basis, self.spec)

    def report(self) -> dict:
        out = {"worker_peak_rss_mb": self.shards.peak_rss_mb(),
               "worker_nodes": self.shards.nodes(),
               "seconds_reading_rows": self.shards.read_seconds()}
        if self.store:
            out["stored_blocks_computed"] = self.blocks_computed
        self.blocks_computed = 0
        return out

    def timings(self) -> dict[str, float]:
        return dict(self.shards.timings)

    def close(self) -> None:
        try:
            if self.owns:
                self.shards.close()
        finally:
            while self.runs:  # give the stores' leases back once no worker writes
                self.runs.pop().close()
