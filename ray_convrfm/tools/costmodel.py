"""What a distributed Nystrom ConvRFM fit costs, stage by stage, and how long it will take.

``Workload`` describes a ``solver="nystrom"`` fit (centers as blocks left on their workers,
rows of K(train, centers) in slabs, resident up to ``resident_bytes`` and read back from zarr
beyond it, preconditioned CG moving m x c vectors, the preconditioner's factor on the first
worker, validation and AGOP where their data live) and counts, per stage, kernel entries, FLOPs,
bytes moved between processes, stored and read back, and the peak memory of a worker, of the
first worker and of the driver; every memory and byte count names the code that allocates or
sends it. ``solver="nystrom-direct"`` and ``"exact"`` are small-size paths, not modelled.
``Rates`` are per-worker costs, measured (``tools.bench.measure_rates``), taken from a finished
run (``calibrated``) or assumed (``tools.imagenet_costs.ClusterAssumptions``, which makes the
ImageNet tables); ``predict`` turns counts into seconds. Arithmetic only: standard library,
nothing is measured here.

The kernel's cost per entry follows docs/math.md section 2: 2 P_1 r for the patch products of the
first layer (r = d = C q^2, or the patch-span dimension), and per position of every layer a
ReLU step (about ``RELU_FLOPS``) and, between layers, q x q window sums of three covariances and
theta (4 q^2 adds). Not modelled: re-preparing uncached center blocks (about d / b of a slab's
kernel), task arguments (M, center indices), the digests checked on every store read.
"""

from __future__ import annotations

import dataclasses
import math

from ray_convrfm.options import DEFAULT_BLOCK, DEFAULT_MEMORY_BUDGET_MB, REDUCE_FAN_IN

#: Floating-point operations of one ReLU step of the kernel at one position (cosine, square
#: root, polynomial arccos, sine from the cosine, the theta update).
RELU_FLOPS = 30

#: Bytes of a Python/torch/numba/Ray worker before it holds any data (measured: about 0.45 GB).
WORKER_BASE_BYTES = 450 * 2**20

#: Share of the memory budget that cached prepared centers may take (as
#: ``backends/workers.py: CENTER_CACHE_SHARE``); other blocks are prepared again for every slab.
CENTER_CACHE_SHARE = 1 / 16

#: Rows of K(train, centers) converted to float64 at a time in a CG product: mirrors
#: ``backends.workers.MATVEC_ROWS`` (a test checks the two agree).
MATVEC_ROWS = 64

#: Stage names: keys of ``Workload.stages`` and ``predict``, and of ``bench scale``'s measurements.
LOAD = "load (read + decode parquet)"
ROWS = "rows of K(train, centers)"
KTY = "K^T Y"
PRECONDITIONER = "preconditioner (first worker)"
CG = "CG steps (all ridges)"
VALIDATION = "validation scores"
AGOP = "AGOP"
GATHER = "model centers to the driver"
PREDICT = "predict (test shards)"
PER_ITERATION = (ROWS, KTY, PRECONDITIONER, CG, VALIDATION, AGOP)


def tree_levels(parts: int, fan_in: int = REDUCE_FAN_IN) -> list[int]:
    """Parts that move at each level of ``ShardedImages.reduce``: the workers' parts, then the
    sums made on workers, ``fan_in`` at a time, until the driver takes at most ``fan_in``."""
    levels = [parts]
    while levels[-1] > fan_in:
        levels.append(math.ceil(levels[-1] / fan_in))
    return levels


@dataclasses.dataclass(frozen=True)
class Workload:
    """One Nystrom ConvRFM fit (``solver="nystrom"``): n training images, m centers, ``iters``
    kernels. ``cg_steps`` is an ASSUMPTION: the steps of one CG run, which solves every ridge
    at once (R blocks of c columns; the slowest ridge sets the count): 16 to 120 were measured
    on digits and Fashion-MNIST (CG stops at ``CG_TOLERANCE`` or ``CG_MAX_ITERATIONS``)."""

    n: int
    m: int
    channels: int
    height: int
    width: int
    patch_size: int = 3
    depth: int = 3
    workers: int = 2
    iters: int = 2
    agop_samples: int = 256
    classes: int = 10
    ridges: int = 3
    val_fraction: float = 0.1
    n_test: int = 0
    basis_dim: int | None = None  # r < d when the patches span fewer dimensions
    dtype_bytes: int = 4
    block: int = DEFAULT_BLOCK
    # memory_budget_mb: the kernel's and AGOP's working memory, and the centers' cache
    budget_bytes: int = DEFAULT_MEMORY_BUDGET_MB * 2**20
    resident_bytes: int | None = None  # SolveOptions.resident_mb in bytes; None: all resident
    preconditioner_rank: int | None = None  # SolveOptions.preconditioner_rank
    cg_steps: int = 60  # of the one run for all ridges (assumed, see above)

    @property
    def d(self) -> int:
        return self.channels * self.patch_size**2

    @property
    def r(self) -> int:
        return self.basis_dim or self.d

    @property
    def n_val(self) -> int:
        return int(round(self.val_fraction * self.n))

    @property
    def n_fit(self) -> int:
        return self.n - self.n_val

    @property
    def shard(self) -> int:
        """S, a worker's training rows."""
        return math.ceil(self.n_fit / self.workers)

    @property
    def pixel_bytes(self) -> int:
        """One image in the working dtype."""
        return self.channels * self.height * self.width * self.dtype_bytes

    def positions(self) -> list[int]:
        """Patch positions at every layer (stride 1, no padding)."""
        shrink = self.patch_size - 1
        return [(self.height - k * shrink) * (self.width - k * shrink)
                for k in range(1, self.depth + 1)]

    def flops_per_entry(self) -> float:
        """Floating-point operations of one kernel entry (docs/math.md section 2)."""
        P = self.positions()
        q2 = self.patch_size**2
        return 2 * P[0] * self.r + RELU_FLOPS * sum(P) + 4 * q2 * sum(P[1:]) + 2 * P[-1]

    def side_bytes(self, images: int) -> float:
        """Memory of a prepared kernel side (patches, M-transformed patches, norms)."""
        P = self.positions()
        return images * (2 * P[0] * self.r + 2 * sum(P)) * self.dtype_bytes

    def rank(self) -> int | None:
        """q, or None for Falkon's m x m factor (``pcg.preconditioner_columns``: q >= m)."""
        q = self.preconditioner_rank
        return q if q is not None and q < self.m else None

    def resident(self) -> tuple[float, float]:
        """(bytes of its rows of K(train, centers) a worker keeps in memory, bytes in zarr
        slabs): ``nystrom_rows`` keeps whole slabs while they fit ``resident_bytes``."""
        rows = self.shard * self.m * self.dtype_bytes
        if self.resident_bytes is None:
            return rows, 0.0
        slab = self.block * self.m * self.dtype_bytes
        kept = min(rows, self.resident_bytes // slab * slab)
        return kept, rows - kept

    def _cached_blocks(self) -> int:
        """Prepared blocks of centers a worker keeps between passes (``_center_sides``)."""
        cache = self.budget_bytes * CENTER_CACHE_SHARE
        return math.ceil(self.m / self.block) if self.side_bytes(self.m) <= cache \
            else int(cache // self.side_bytes(min(self.block, self.m)))

    def center_memory(self) -> float:
        """A worker's prepared centers (``ShardWorker._center_sides``): the cached blocks and,
        unless all are cached, the block in use, the one being prepared and its pixels."""
        blocks, blk = self._cached_blocks(), min(self.block, self.m)
        if blocks * blk >= self.m:
            return self.side_bytes(self.m)
        return self.side_bytes(blocks * blk) + 2 * self.side_bytes(blk) + blk * self.pixel_bytes

    def centers_refetched(self) -> float:
        """Fraction of the centers a worker fetches again in a later stage of an iteration
        (validation, AGOP make new refs of the same blocks): the blocks its cache lacks."""
        return max(0.0, 1 - self._cached_blocks() * self.block / self.m)

    def cg_products(self) -> int:
        """Passes over the rows per iteration: every CG step (all ridges at once), and H alpha
        in ``NystromPCG.train_mse``."""
        return self.cg_steps + 1

    def cg_columns(self) -> int:
        """Columns times products of H V per iteration: R c per step, c for the training
        error (``NystromPCG.solve_all``, ``train_mse``)."""
        return self.cg_steps * self.ridges * self.classes + self.classes

    def applications(self) -> int:
        """Columns to which B or B^T is applied per iteration (``preconditioned_cg``: 2 per
        step and 2 per run, R c columns each)."""
        return (2 * self.cg_steps + 2) * self.ridges * self.classes

    def factor_memory(self) -> tuple[float, float]:
        """(steady, peak) bytes of the factor on the first worker (``ShardWorker.precondition``)."""
        m, q = self.m, self.rank()
        if q is None:
            # FalkonFactor: T and Q (the eigenvectors of T T^T / m, computed in place), m x m
            # float64 each. Peak: ShardWorker.precondition's C (K_mm rows as float64, held
            # while FalkonFactor.from_cholesky builds T T^T), T, T T^T becoming Q, and the
            # eigensolver's workspace (LAPACK syevd: about 2 m^2 more)
            return 2 * 8 * m * m, 5 * 8 * m * m
        # SpectralFactor.U (m x q float64). Building (SpectralFactor.build): the caller's C,
        # then F = C L^-T, the QR's Q and U, freed as they are used (at most 3 m x q at once),
        # and L, R, R R^T, V (q x q)
        return 8 * m * q, 3 * 8 * m * q + 4 * 8 * q * q

    def factor_flops(self) -> tuple[float, float]:
        """One iteration's factor FLOPs: (at ``Rates.factor_flops``, at ``gemm_flops``)."""
        m, q, R = self.m, self.rank(), self.ridges
        del R  # one factor serves every ridge (FalkonFactor.for_ridges: a vector each)
        if q is None:  # Cholesky of K_mm and eigh of T T^T / m; the product T T^T
            return m**3 / 3 + 9 * m**3, 2 * m**3
        # Cholesky of K_qq, the triangular solve for F (m x q), QR of F with Q formed, eigh of
        # R R^T; products R R^T and Q V
        return q**3 / 3 + m * q**2 + 4 * m * q**2 - 4 * q**3 / 3 + 9 * q**3, \
            2 * q**3 + 2 * m * q**2

    def apply_flops(self) -> tuple[float, float]:
        """FLOPs of applying B (or B^T) to one column: (factor rate, GEMM rate)."""
        m, q = self.m, self.rank()
        if q is None:  # FalkonPreconditioner.apply: an m x m triangular solve and Q's product
            return m * m, 2 * m * m
        return 0.0, 4 * m * q  # SpectralPreconditioner.apply: U^T v, then U (...)

    def stages(self) -> dict[str, dict]:
        """Per stage (per iteration, and once): kernel entries, FLOPs, bytes moved, stored, read
        back; peak memory of a worker, the first worker, the driver (with its object store)."""
        n, m, w, c, S, R = self.n_fit, self.m, self.workers, self.classes, self.shard, self.ridges
        px, f, blk, dt = self.pixel_bytes, self.flops_per_entry(), min(self.block, m), \
            self.dtype_bytes
        mc8 = m * c * 8  # one m x c float64 matrix
        mrc8 = R * mc8  # the columns of a CG run: every ridge's m x c
        width = self.rank() or m  # columns of K_mm the factor needs
        kept, spilled = self.resident()
        products, tree = self.cg_products(), sum(tree_levels(w))
        steady, peak = self.factor_memory()
        kmm = math.ceil(m / w) * width * 4  # nystrom_rows: C, this shard's centers' K_mm rows
        refetch = self.centers_refetched()
        v_rows, a_rows = math.ceil(self.n_val / w), math.ceil(self.agop_samples / w)
        base = WORKER_BASE_BYTES + S * px  # ShardWorker.__init__: the process, self.raw

        rows_worker = (base + S * c * 8  # nystrom_rows: Y of the shard (resolve(task.Y))
                       + self.center_memory()  # _center_sides
                       + self.side_bytes(blk)  # _compute_slab: the slab's rows prepared
                       + self.budget_bytes  # kernel_matrix: working memory (memory_budget_mb)
                       + blk * m * (dt + 8)  # _against_centers: the slab; K.T.to(float64)
                       + kept  # nystrom_rows: res.slabs, the resident rows
                       + kmm  # nystrom_rows: C, filled in place
                       + mc8)  # nystrom_rows: KtY
        cg_worker = (base + kept  # hessian_matvec: _rows_for(task), the resident slabs
                     + kmm  # nystrom_rows' C, in this node's object store until released
                     + MATVEC_ROWS * m * 8  # hessian_matvec: buf, rows as float64
                     + (blk * m * dt if spilled else 0)  # hessian_matvec: a slab read back
                     + blk * R * c * 8  # hessian_matvec: KV of a slab
                     # hessian_matvec: V, out and the returned part; or, adding in the tree
                     # (ShardWorker.add), fan_in parts and their sum: R c columns each
                     + max(3, REDUCE_FAN_IN + 1) * mrc8)
        val_worker = (base + kept + kmm  # ShardWorker.evaluate runs before problem.close()
                      + v_rows * px  # ShardWorker.evaluate: its validation part (_holdouts)
                      + R * mc8  # evaluate: coefs, every ridge's (m, c) float64
                      + self.center_memory() + self.side_bytes(blk) + blk * px  # a block
                      + blk * m * (dt + 8)  # _against_centers, then .to(torch.float64)
                      + R * blk * c * 8 + self.budget_bytes)  # einsum scores; kernel_matrix
        agop_worker = (base + self.center_memory()  # agop_part: _center_sides
                       + self.side_bytes(a_rows)  # agop_part: _rows_side(sample_rows)
                       + m * c * dt  # agop_part: coef in the working dtype
                       + self.budget_bytes)  # agop_from_blocks: chunks sized to the budget
        predict_worker = (WORKER_BASE_BYTES + math.ceil(m / w) * px  # its shard of centers
                          + self.center_memory() + self.side_bytes(blk) + blk * px
                          + blk * m * (dt + 8)  # ShardWorker.scores: K, astype(float64)
                          + mc8 + self.budget_bytes)  # scores: alpha; kernel_matrix

        y = n * c * 8  # fit_rfm: Y, the one-hot targets (float64) for the whole fit
        y_put = n * c * 8  # ShardedImages.nystrom: ray.put(Y[a:b]), one per worker
        best = mc8  # fit_rfm: best["alpha"], kept across iterations
        cg_driver = (y + y_put + best + mc8  # nystrom_operator: KtY / scale (NystromPCG.KtY)
                     + R * mc8  # NystromPCG.solve_all: KtY.repeat, one block per ridge
                     + 6 * mrc8  # conjugate_gradient: x, r, p, b, Ap and one temporary
                     # a step in flight: preconditioned_step's v and the B^T H B v back
                     + 2 * mrc8
                     + R * mc8)  # _choose_ridge: the solved alphas
        val_driver = (y + y_put + best + mc8 + R * mc8  # KtY, the solved alphas
                      # _choose_ridge: float32 casts; RayBackend.evaluate: np.stack;
                      # ShardedImages.evaluate: float64 copy and its ray.put
                      + 3 * R * mc8)

        def row(entries=0, flops=0.0, moved=0.0, stored=0.0, read=0.0, worker=0.0,
                first=None, driver=0.0) -> dict:
            return dict(entries=entries, flops=flops, bytes_moved=moved, bytes_stored=stored,
                        bytes_read=read, worker_memory=worker, driver_memory=driver,
                        first_worker_memory=worker if first is None else first)

        fac, gem = self.factor_flops()
        app = sum(self.apply_flops())
        per_iter = {
            # _center_sides: every center block reaches every worker once (later slabs read
            # it from the node's object store); _slab: every slab written to the run's store
            # (with no store, only the spilled slabs, to a temporary one: _spill)
            ROWS: row(n * m, n * m * f, w * m * px, n * m * dt, 0, rows_worker,
                      driver=y + y_put + best),
            # nystrom_rows: K^T Y per slab (float64); ShardedImages.nystrom: Y's slices to
            # the workers, then reduce: the tree of m x c float64 parts
            KTY: row(0, 2 * n * m * c, n * c * 8 + tree * mc8, 0, 0, rows_worker,
                     driver=y + y_put + best + (REDUCE_FAN_IN + 1) * mc8 + mc8),
            # ShardWorker.precondition: the shards' K_mm rows (float32) to the first worker;
            # ShardedImages.precondition: v to it and B v back at every application
            # (ShardedImages.preconditioned_step chains B, H and B^T on the workers: B v goes
            # from the first worker to every worker, counted with the CG products)
            PRECONDITIONER: row(0, fac + gem + self.applications() * app,
                                m * width * 4 + 4 * mrc8, 0, 0,
                                cg_worker, cg_worker + peak, cg_driver),
            # hessian_matvec: K_s V and K_s^T (K_s V) in float64 (the ridge's K_mm term reuses
            # K_s V); ShardedImages.hessian_matvec: V to every worker, then the tree back;
            # hessian_matvec: the spilled slabs read back from zarr at every product
            # ShardedImages.preconditioned_step, every step: v to the first worker, B v from
            # it to every worker, hessian_matvec's parts up the tree (the sum lands on the
            # first worker), B^T H B v back: R c columns; then H alpha (c columns) for the
            # training error. K_s V and K_s^T (K_s V) in float64 (the ridges' K_mm terms reuse
            # K_s V); hessian_matvec: the spilled slabs read back from zarr at every pass
            CG: row(0, 4 * n * m * self.cg_columns(),
                    self.cg_steps * (w + tree + 2) * mrc8 + (w + tree) * mc8, 0,
                    products * w * spilled, cg_worker, cg_worker + steady, cg_driver),
            # ShardedImages.evaluate: every ridge's coefficients to every worker; center
            # blocks not cached fetched again (new refs from center_blocks); 3 numbers back
            VALIDATION: row(self.n_val * m, self.n_val * m * f + 2 * R * self.n_val * m * c,
                            w * (R * mc8 + refetch * m * px), 0, 0, val_worker,
                            val_worker + steady, val_driver),
            # ShardedImages.agop: ray.put(coef) (working dtype) to every worker, center blocks
            # not cached again; (r, r) float64 back through the tree
            AGOP: row(self.agop_samples * m, None,
                      w * (m * c * dt + refetch * m * px) + tree * self.r**2 * 8, 0, 0,
                      agop_worker, driver=y + best + mc8 + 2 * m * c * dt),
        }
        once = {
            # ShardWorker.__init__: each worker reads and decodes its parquet row groups;
            # ShardedImages.add_holdout: validation parts put once (parquet: read by workers)
            LOAD: row(moved=self.n_val * px, worker=base),
            # ShardedImages.gather: ray.get of the parts, then np.concatenate (RFMResult)
            GATHER: row(moved=m * px, worker=base, driver=y + best + 2 * m * px),
            # ConvRFM.scores: a new ShardedImages puts the model's centers (X_fit_), every
            # worker fetches every block (ShardWorker.scores); map_scores: test blocks and alpha
            # (float64) out, scores back. Driver: each of these and its put (or concatenation)
            PREDICT: row(self.n_test * m, self.n_test * m * f,
                         m * px + w * m * px + self.n_test * px + w * mc8 + self.n_test * c * 8,
                         worker=predict_worker,
                         driver=2 * (m * px + self.n_test * px + mc8 + self.n_test * c * 8)),
        }
        return {"per_iteration": per_iter, "once": once}


@dataclasses.dataclass(frozen=True)
class Rates:
    """Costs measured on one worker (one thread or one GPU).

    kernel_entry_s : seconds per kernel entry at the workload's image shape
    agop_over_kernel : AGOP seconds / kernel seconds on the same block of pairs
    gemm_flops : float64 GEMM FLOP/s (K^T Y, the CG products, the factor's matrix products)
    factor_flops : float64 FLOP/s of the factor's Cholesky, triangular solves, QR, eigh
    decode_images_per_s : images a worker reads and decodes per second
    store_bytes_per_s : bytes of kernel slabs a worker writes and reads back per second
    worker_start_s : seconds to start a set of shard workers (processes, imports, placement)
    network_bytes_per_s : bytes per second one transfer of a partial result moves
    """

    kernel_entry_s: float
    agop_over_kernel: float
    gemm_flops: float
    factor_flops: float
    decode_images_per_s: float
    store_bytes_per_s: float
    worker_start_s: float = 0.0
    network_bytes_per_s: float = 2e9  # object store transfers (same machine: memory copies)

    @classmethod
    def from_dict(cls, d: dict) -> Rates:
        """From ``scale.json``'s rates (earlier runs': ``cholesky_flops``)."""
        d = dict(d)
        if "cholesky_flops" in d:
            d.setdefault("factor_flops", d.pop("cholesky_flops"))
        return cls(**d)

    def scaled(self, workload_from: Workload, workload_to: Workload,
               kernel_flops_per_s: float | None = None) -> Rates:
        """These rates for another image shape (kernel cost in proportion to its FLOPs), or,
        with ``kernel_flops_per_s``, for a device with that effective kernel FLOP rate."""
        if kernel_flops_per_s is None:
            entry = self.kernel_entry_s * (workload_to.flops_per_entry()
                                           / workload_from.flops_per_entry())
        else:
            entry = workload_to.flops_per_entry() / kernel_flops_per_s
        return dataclasses.replace(self, kernel_entry_s=entry)


def _tree_seconds(work: Workload, rates: Rates, part: float, adds: bool) -> float:
    """A tree over the workers, level after level: each receiver takes up to ``fan_in`` parts
    of ``part`` bytes (and, with ``adds``, sums them). Broadcasts (V to every worker) are
    assumed to spread the same way, as nodes fetch from nodes that already hold a copy."""
    return sum(k * part / rates.network_bytes_per_s
               + (k * part / 8 / rates.gemm_flops if adds else 0.0)
               for k in (min(n, REDUCE_FAN_IN) for n in tree_levels(work.workers)))


def predict(work: Workload, rates: Rates, store: bool = True) -> dict[str, float]:
    """Wall seconds of every stage of the fit (all iterations) with ``work.workers`` workers
    in parallel. Keys as in ``Workload.stages``, plus "total"."""
    w, it, m, c, S = work.workers, work.iters, work.m, work.classes, work.shard
    px, dt, net = work.pixel_bytes, work.dtype_bytes, rates.network_bytes_per_s
    mc8 = m * c * 8
    _, spilled = work.resident()
    # compute, the centers' pixels received once, slabs written (run store, or spilled ones)
    rows = S * m * rates.kernel_entry_s + m * px / net \
        + (S * m * dt if store else spilled) / rates.store_bytes_per_s
    kty = 2 * S * m * c / rates.gemm_flops + S * c * 8 / net \
        + _tree_seconds(work, rates, mc8, adds=True)
    fac, gem = work.factor_flops()
    afac, agem = work.apply_flops()
    width = work.rank() or m
    pre = fac / rates.factor_flops + gem / rates.gemm_flops + m * width * 4 / net \
        + work.applications() * (afac / rates.factor_flops + agem / rates.gemm_flops) \
        + 4 * work.ridges * mc8 / net
    # one CG step: every ridge's R c columns in one pass over the rows; the chained
    # preconditioner's v and B v travel with it; the training error's c-column product last
    Rc8 = work.ridges * mc8

    def product(cols8: float) -> float:
        return (4 * S * cols8 / 8 / rates.gemm_flops + _tree_seconds(work, rates, cols8,
                adds=False) + _tree_seconds(work, rates, cols8, adds=True)
                + spilled / rates.store_bytes_per_s)

    cg = work.cg_steps * (product(Rc8) + 2 * Rc8 / net) + product(mc8)
    v_rows = math.ceil(work.n_val / w)
    val = v_rows * m * rates.kernel_entry_s + 2 * work.ridges * v_rows * m * c \
        / rates.gemm_flops + (work.ridges * mc8 + work.centers_refetched() * m * px) / net
    agop = math.ceil(work.agop_samples / w) * m * rates.kernel_entry_s \
        * rates.agop_over_kernel + (m * c * dt + work.centers_refetched() * m * px) / net \
        + _tree_seconds(work, rates, work.r**2 * 8, adds=True)
    out = {
        LOAD: rates.worker_start_s + S / rates.decode_images_per_s,
        ROWS: it * rows, KTY: it * kty, PRECONDITIONER: it * pre,
        CG: it * cg,
        # the validation parts are read (parquet) by the workers at the first evaluation
        VALIDATION: it * val + v_rows / rates.decode_images_per_s,
        # the AGOP is taken after every iteration but the last
        AGOP: (it - 1) * agop,
        GATHER: m * px / net,
        # the centers put again, then fetched by every worker; test images; alpha
        PREDICT: rates.worker_start_s + (2 * m * px + work.n_test * px + mc8) / net
        + math.ceil(work.n_test / w) * m * rates.kernel_entry_s,
    }
    out["total"] = sum(out.values())
    return out


def calibrated(run: dict, target: Workload, fresh: Rates) -> Rates:
    """Rates for ``target`` from a measured run (``bench scale`` JSON): the per-entry kernel
    cost its row stage achieved (all workers busy, task overheads included) scaled to
    ``target``'s FLOPs per entry, and the AGOP's cost relative to it; the rest from ``fresh``.
    Runs of the earlier pipeline ("kernel K(train, centers)" with an m x m Gram) are read too."""
    work = Workload(**run["workload"])
    rates = Rates.from_dict(run["rates"])
    S, m, c = work.shard, work.m, work.classes
    store = S * m * work.dtype_bytes / rates.store_bytes_per_s
    if ROWS in run["measured"]:
        stage, other = run["measured"][ROWS], 2 * S * m * c / rates.gemm_flops
    else:
        stage, other = run["measured"]["kernel K(train, centers)"], \
            2 * S * m * (m + c) / rates.gemm_flops
    entry = (stage / work.iters - other - store) / (S * m)
    agop_entries = (work.iters - 1) * math.ceil(work.agop_samples / work.workers) * m
    agop_ratio = run["measured"][AGOP] / (agop_entries * entry) if agop_entries else \
        rates.agop_over_kernel
    scale = target.flops_per_entry() / work.flops_per_entry()
    return dataclasses.replace(fresh, kernel_entry_s=entry * scale, agop_over_kernel=agop_ratio)


def memory(work: Workload) -> dict[str, float]:
    """Peak bytes of a worker, the first worker and the driver over all stages."""
    st = work.stages()
    rows = [*st["per_iteration"].values(), *st["once"].values()]
    return {"worker": max(r["worker_memory"] for r in rows),
            "first_worker": max(r["first_worker_memory"] for r in rows),
            "driver": max(r["driver_memory"] for r in rows) + WORKER_BASE_BYTES}


def storage(work: Workload) -> float:
    """Bytes of kernel slabs a fit stores (one n x m kernel per iteration in the run's store)."""
    return work.iters * work.n_fit * work.m * work.dtype_bytes
