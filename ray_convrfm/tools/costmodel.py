"""What a distributed Nystrom ConvRFM fit costs, stage by stage, and how long it will take.

``Workload`` describes a ``solver="nystrom"`` fit (centers as blocks left on their workers,
rows of K(train, centers) in slabs, resident up to ``resident_bytes`` and read back from zarr
beyond it, preconditioned CG moving m x c vectors, the preconditioner's factor on the first
worker, validation and AGOP where their data live) and counts, per stage, kernel entries, FLOPs,
bytes moved between processes, stored and read back, and the peak memory of a worker, of the
first worker and of the driver, each as (what, bytes, the code that allocates or holds it)
(``memory_breakdown``). Images rest and travel as stored (``stored_bytes`` a value: 1 for 8-bit
pixels) and are prepared a budget-sized chunk at a time (``PREPARED_SHARE``); targets travel as
class indices. ``solver="nystrom-direct"`` and ``"exact"`` are small-size paths, not modelled.
``Rates`` are per-worker costs, measured (``tools.bench.measure_rates``), taken from a finished
run (``calibrated``) or assumed (``tools.imagenet_costs.ClusterAssumptions``); ``predict`` turns
counts into seconds. Arithmetic only: standard library, nothing is measured here.

The kernel's cost per entry follows docs/math.md section 2: 2 P_1 r for the patch products of the
first layer (r = d = C q^2, or the patch-span dimension), and per position of every layer a
ReLU step (about ``RELU_FLOPS``) and, between layers, q x q window sums of three covariances and
theta (4 q^2 adds). Not modelled: re-preparing uncached center blocks (about d / b of a slab's
kernel), task arguments (M, center indices), the digests checked on every store read, parquet
buffers while a shard is decoded, the driver's puts of in-memory shards (parquet: none).
"""

from __future__ import annotations

import dataclasses
import math

from ray_convrfm.options import (  # the constants the workers use, declared once there
    AUTO_SKETCH_CLASSES,
    CENTER_CACHE_SHARE,
    DEFAULT_BLOCK,
    DEFAULT_MEMORY_BUDGET_MB,
    MATVEC_ROWS,
    PREPARED_SHARE,
    REDUCE_FAN_IN,
)

#: Floating-point operations of one ReLU step of the kernel at one position (cosine, square
#: root, polynomial arccos, sine from the cosine, the theta update).
RELU_FLOPS = 30

#: Bytes of a Python/torch/numba/Ray worker before it holds any data (measured: about 0.45 GB).
WORKER_BASE_BYTES = 450 * 2**20

#: One line of a memory breakdown: (what, bytes, the code that allocates or holds it).
Item = tuple[str, float, str]

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
    """Parts that move at each level of ``ShardedBackend.reduce``: the workers' parts, then the
    sums made on workers, ``fan_in`` at a time, until the driver takes at most ``fan_in``."""
    levels = [parts]
    while levels[-1] > fan_in:
        levels.append(math.ceil(levels[-1] / fan_in))
    return levels


def total(items: list[Item]) -> float:
    return sum(b for _, b, _ in items)


def _peak(*phases: list[Item]) -> list[Item]:
    """Whichever of phases that do not overlap in time holds most (computing, then summing)."""
    return max(phases, key=total)


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
    dtype_bytes: int = 4  # the working dtype (prepared sides, kernels)
    block: int = DEFAULT_BLOCK
    # memory_budget_mb: the kernel's and AGOP's working memory, prepared chunks, centers' cache
    budget_bytes: int = DEFAULT_MEMORY_BUDGET_MB * 2**20
    resident_bytes: int | None = None  # SolveOptions.resident_mb in bytes; None: all resident
    preconditioner_rank: int | None = None  # SolveOptions.preconditioner_rank
    cg_steps: int = 60  # of the one run for all ridges (assumed, see above)
    stored_bytes: int = 1  # bytes a pixel value rests and travels in: 1 uint8, 4 float32
    agop_classes: int | None = None  # RFMParams.agop_classes: None is "auto", or k outputs

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
        """One image in the working dtype (converted, featurised)."""
        return self.channels * self.height * self.width * self.dtype_bytes

    @property
    def stored_pixel_bytes(self) -> int:
        """One image as it rests and travels (``stored_bytes`` per value)."""
        return self.channels * self.height * self.width * self.stored_bytes

    def agop_columns(self) -> int:
        """k, the AGOP's outputs: the classes, or the sketch's columns (fit_rfm sends
        coef @ Omega, m x k, to the workers)."""
        if self.agop_classes is not None:
            return self.agop_classes
        return self.classes if self.classes <= AUTO_SKETCH_CLASSES else AUTO_SKETCH_CLASSES

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
        """Memory of prepared kernel sides while they are made (``kernel.side_bytes_per_image``:
        raw and M-transformed patch coordinates, one more copy in flight, the per-layer
        diagonals)."""
        P = self.positions()
        return images * (3 * P[0] * self.r + 2 * sum(P)) * self.dtype_bytes

    def prepared_images(self, images: int) -> int:
        """Of ``images``, how many are prepared at once (``chunks.prepared_chunk``: a chunk's
        side within ``PREPARED_SHARE`` of the budget, at least one image)."""
        chunk = max(1, int(self.budget_bytes * PREPARED_SHARE // self.side_bytes(1)))
        return min(images, chunk)

    def gram_images(self) -> int:
        """Images ``ShardWorker.patch_gram`` unfolds at once (``chunks.gram_chunk``: patches in
        the working dtype and their float64 copy within ``PREPARED_SHARE`` of the budget)."""
        per = self.positions()[0] * self.d * (self.dtype_bytes + 8)
        return min(self.shard, max(1, int(self.budget_bytes * PREPARED_SHARE // per)))

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

    def center_parts(self, block_pixels: float | None = None) -> tuple[list[Item], list[Item]]:
        """A worker's centers (``_center_sides``) while a kernel runs against them: (the cached
        blocks, within ``CENTER_CACHE_SHARE`` of the budget; the chunk in use unless all are
        cached and the block's pixels, ``block_pixels`` bytes an image, as stored by default).
        Making the next chunk holds two and a converted one: less than the kernel's budget."""
        blocks, blk = self._cached_blocks(), min(self.block, self.m)
        chunk = self.prepared_images(blk)
        fetched = self.stored_pixel_bytes if block_pixels is None else block_pixels
        pixels = ("a block of centers, as fetched", blk * fetched,
                  "_center_sides: resolve(centers.parts[j])")
        if blocks * blk >= self.m:
            return [("prepared centers, all cached", self.side_bytes(self.m),
                     "_center_sides: cache (all within CENTER_CACHE_SHARE)")], [pixels]
        return [(f"prepared centers: {blocks} cached blocks", self.side_bytes(blocks * blk),
                 "_center_sides: cache (CENTER_CACHE_SHARE of the budget)")], \
            [(f"prepared chunk of centers in use ({chunk} images)", self.side_bytes(chunk),
              "_center_sides: self._prepare, per prepared_chunk"), pixels]

    def center_memory(self) -> float:
        return total(sum(self.center_parts(), []))

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
        return self.applications_in_steps() + self.applications_outside_steps()

    def applications_in_steps(self) -> int:
        """Of ``applications``, those chained into the CG steps (``preconditioned_step``: B
        before and B^T after every product), timed as the steps are."""
        return 2 * self.cg_steps * self.ridges * self.classes

    def applications_outside_steps(self) -> int:
        """Of ``applications``, the run's first and last (``ShardedBackend.precondition``)."""
        return 2 * self.ridges * self.classes

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
        m, q = self.m, self.rank()  # one factor serves every ridge (FalkonFactor.for_ridges)
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

    def agop_items(self) -> list[Item]:
        """The AGOP's working memory (``agop_part``): a prepared chunk of sample images; the
        gradient buffer and its sum over center blocks (``agop_from_blocks``: budget / 4 each);
        a center chunk's weighted patches and adjoint pairs (``patch_gradients``: budget / 4);
        at least one image each, the torch engine's pair bytes (GPU workers)."""
        P, k, r, dt, budget = self.positions(), self.agop_columns(), self.r, self.dtype_bytes, \
            self.budget_bytes
        samples = self.prepared_images(math.ceil(self.agop_samples / self.workers))
        one = P[0] * k * r * dt  # (P1, 1, k, r): one sample image's gradients
        grads = min(samples, max(1, int(budget / 4 // one)))
        per_row = grads * dt * (14 * P[0] + 2 * sum(P)) + one  # kernel.bytes_per_pair(adjoint)
        centers = self.prepared_images(min(self.block, self.m))  # len(train): a center chunk
        rows = max(1, min(centers, int(budget / 4 // per_row)))
        return [("prepared chunk of its samples", self.side_bytes(samples), "agop_part"),
                ("gradient buffer, its sum over blocks", 2 * grads * one, "agop_from_blocks"),
                ("weighted patches, adjoint pairs", rows * per_row, "patch_gradients")]

    def stages(self) -> dict[str, dict]:
        """Per stage (per iteration, and once): kernel entries, FLOPs, bytes moved, stored, read
        back; peak memory of a worker, the first worker, the driver (with its object store),
        each the sum of its ``*_items``: (what, bytes, the code that allocates or holds it)."""
        n, m, w, c, S, R = self.n_fit, self.m, self.workers, self.classes, self.shard, self.ridges
        px, spx, f, blk, dt = self.pixel_bytes, self.stored_pixel_bytes, \
            self.flops_per_entry(), min(self.block, m), self.dtype_bytes
        # one m x c float64 matrix; the columns of a CG run, every ridge's m x c
        k, mc8, mrc8 = self.agop_columns(), m * c * 8, R * m * c * 8
        width = self.rank() or m  # columns of K_mm the factor needs
        (kept, spilled), (steady, peak) = self.resident(), self.factor_memory()
        refetch, tree = self.centers_refetched(), sum(tree_levels(w))
        chunk = self.prepared_images(blk)  # rows of a slab, held-out or test images at once
        cached, in_use = self.center_parts()
        kernel = ("the kernel's working memory", self.budget_bytes, "kernel_matrix")
        base = [("the process", WORKER_BASE_BYTES, "WORKER_BASE_BYTES"),
                ("its shard, stored pixels", S * spx, "ShardWorker.load: self.raw")]
        held = [*base, ("its resident rows of K", kept, "nystrom_rows: res.slabs"),
                ("its centers' rows of K_mm", math.ceil(m / w) * width * dt,
                 "nystrom_rows: C (object store until released)")]
        side = ("the chunk's prepared side", self.side_bytes(chunk), "_prepare (prepared_chunk)")
        rows_worker = [*held, ("its shard's labels", S * 8, "nystrom_rows: resolve(task.labels)"),
                       ("K^T Y", mc8, "nystrom_rows: KtY"), *cached,
                       ("a slab of rows", blk * m * dt, "_compute_slab: out"), *_peak(
                           [*in_use, side, kernel, ("local row indices", S * 8, "_rows_sides")],
                           [("the slab in float64", blk * m * 8, "class_sums: K_block.to"),
                            ("the slab's class sums", c * m * 8, "class_sums: out (c, m)")])]
        cg_worker = [*held, ("a row chunk in float64", MATVEC_ROWS * m * 8, "hessian_matvec: buf"),
                     ("a spilled slab read back", blk * m * dt if spilled else 0,
                      "hessian_matvec: res.store.read"),
                     ("K V of a slab", blk * R * c * 8, "hessian_matvec: KV"),
                     # V, out and the part returned; or fan_in parts and their sum (the tree)
                     ("V, H V, tree parts", max(3, REDUCE_FAN_IN + 1) * mrc8,
                      "hessian_matvec: V, out; ShardWorker.add")]
        scored = [("a chunk of images, converted", chunk * px, "_held_out_kernel: Z"),
                  ("their kernel", chunk * m * dt, "_against_centers: out")]
        # ShardWorker.evaluate runs before problem.close(): the rows and C are still held
        val_worker = [*held, ("its validation part, stored pixels", math.ceil(self.n_val / w)
                              * spx, "evaluate: self._holdouts"),
                      ("every ridge's coefficients", R * mc8, "evaluate: coefs"), *cached,
                      *scored, *_peak([*in_use, side, kernel], [
                          ("their kernel in float64", chunk * m * 8, "evaluate: K.to"),
                          ("scores, error, squared", 3 * R * chunk * c * 8, "evaluate: einsum")])]
        agop_worker = [*base, *cached, *in_use, ("coef (m x k)", m * k * dt, "agop_part: coef"),
                       *self.agop_items()]
        # ConvRFM.scores: the fit's workers reloaded with the model's centers (working dtype): the
        # blocks its workers fetch are those shards' pixels; test blocks come as stored
        p_cached, p_in_use = self.center_parts(px)
        predict_worker = [base[0], ("its shard of the model's centers", math.ceil(m / w) * spx,
                                    "ShardWorker.load: self.raw"), *p_cached,
                          ("a block of test images", blk * spx, "ShardedBackend.scores: Z[r:r+b]"),
                          ("alpha", mc8, "scores: alpha"), ("scores", blk * c * 8, "scores: out"),
                          *scored, *_peak([*p_in_use, side, kernel], [
                              ("their kernel in float64", chunk * m * 8, "scores: astype")])]
        grams = self.gram_images()
        load_worker = [*base, ("a chunk of images, converted", grams * px, "patch_gram: _features"),
                       ("its patches unfolded, and in float64", grams * self.positions()[0]
                        * self.d * (dt + 8), "patches.patch_gram (chunks.gram_chunk)")]

        labels = ("the training labels (int64)", n * 8, "fit_rfm: Targets")
        puts = ("their slices, put", n * 8, "ShardedBackend._nystrom: put(labels[a:b])")
        best = ("the best solution so far", mc8, "fit_rfm: best['alpha']")
        solved = ("every ridge's solution", R * mc8, "_choose_ridge: alphas")
        pcg = [labels, puts, best, ("K^T Y", mc8, "nystrom_operator: KtY / scale")]
        cg_driver = [*pcg, ("K^T Y for every ridge", R * mc8, "NystromPCG.solve_all"),
                     ("CG's state (6 x m R c)", 6 * mrc8, "conjugate_gradient: x, r, p, b, Ap"),
                     ("a step in flight", 2 * mrc8, "preconditioned_step: v, B^T H B v"), solved]
        val_driver = [*pcg, solved, ("casts, stack, float64 copy, put", 3 * R * mc8,
                                     "_choose_ridge; ShardedBackend.evaluate")]
        coef = ("coef = alpha / scale", mc8, "fit_rfm: coef")
        coef_dt = ("coef (m x k, working dtype), its put", 2 * m * k * dt,
                   "fit_rfm: coef.to(dt); ShardedBackend.agop: put")
        sketch = ("coef @ Omega (m x k float64)", m * k * 8, "fit_rfm: coef @ omega")
        # with a sketch, the m x c coef is dropped once coef @ Omega is made
        agop_driver = [labels, best, *_peak([coef, sketch], [sketch, coef_dt])] \
            if self.agop_classes is not None or c > AUTO_SKETCH_CLASSES \
            else [labels, best, coef, coef_dt]

        def row(entries=0, flops=0.0, moved=0.0, stored=0.0, read=0.0, worker=(),
                first=None, driver=()) -> dict:  # items of 0 bytes left out
            worker, first, driver = ([i for i in x if i[1]] for x in (worker, first or worker,
                                                                      driver))
            return dict(entries=entries, flops=flops, bytes_moved=moved, bytes_stored=stored,
                        bytes_read=read, worker_memory=total(worker), driver_memory=total(driver),
                        first_worker_memory=total(first), worker_items=worker,
                        first_worker_items=first, driver_items=driver)

        built = [("the preconditioner's factor, built", peak, "ShardWorker.precondition")]
        steady = [("the preconditioner's factor", steady, "precondition: factor_centers")]
        (fac, gem), app = self.factor_flops(), sum(self.apply_flops())
        per_iter = {
            # _center_sides: every center block reaches every worker once, as stored; _slab:
            # every slab to the run's store (with none, the spilled slabs to a temporary one)
            ROWS: row(n * m, n * m * f, w * m * spx, n * m * dt, 0, rows_worker,
                      driver=[labels, puts, best]),
            # class_sums adds each slab's rows by label (index_add); ShardedBackend.nystrom: the
            # labels' slices (int64) to the workers, then reduce: the tree of m x c parts
            KTY: row(0, n * m, n * 8 + tree * mc8, 0, 0, rows_worker, driver=[
                labels, puts, best, ("the tree's last parts, their sum",
                                     (REDUCE_FAN_IN + 2) * mc8, "ShardedBackend.reduce")]),
            # ShardWorker.precondition: the shards' K_mm rows to the first worker; v to it and
            # B v back at the applications outside the steps (inside them: counted with CG)
            PRECONDITIONER: row(0, fac + gem + self.applications_outside_steps() * app,
                                m * width * dt + 4 * mrc8, 0, 0, cg_worker,
                                cg_worker + built, cg_driver),
            # ShardedBackend.preconditioned_step, every step: v to the first worker, B v to every
            # worker, hessian_matvec's parts up the tree, B^T H B v back (R c columns); then
            # H alpha (c columns). hessian_matvec: spilled slabs read back at every pass
            CG: row(0, 4 * n * m * self.cg_columns() + self.applications_in_steps() * app,
                    self.cg_steps * (w + tree + 2) * mrc8 + (w + tree) * mc8, 0,
                    self.cg_products() * w * spilled, cg_worker,
                    cg_worker + steady, cg_driver),
            # ShardedBackend.evaluate: every ridge's coefficients to every worker; center blocks
            # not cached fetched again as stored (new refs); 3 numbers back
            VALIDATION: row(self.n_val * m, self.n_val * m * f + 2 * R * self.n_val * m * c,
                            w * (R * mc8 + refetch * m * spx), 0, 0, val_worker,
                            val_worker + steady, val_driver),
            # ShardedBackend.agop: put(coef) (m x k) to every worker, center blocks not
            # cached again; (r, r) float64 back through the tree
            AGOP: row(self.agop_samples * m, None,
                      w * (m * k * dt + refetch * m * spx) + tree * self.r**2 * 8, 0, 0,
                      agop_worker, driver=agop_driver),
        }
        once = {
            # workers read their parquet row groups, then the patch gram; add_holdout: the
            # validation parts put once as stored (parquet: read by the workers)
            LOAD: row(moved=self.n_val * spx, worker=load_worker),
            # ShardedBackend.centers: ShardWorker.images, a ConvRFM's centers as stored (a Deep
            # model's last layer gathers featurised ones, in the working dtype), concatenated
            GATHER: row(moved=m * spx, worker=[*base, ("its centers as stored, concatenated",
                                                      2 * math.ceil(m / w) * spx, "images")],
                        driver=[labels, best, ("the model's centers, parts and concatenation",
                                               2 * m * spx, "ShardedBackend.centers")]),
            # ConvRFM.scores: the fit's workers reloaded with X_fit_ (as stored), every worker
            # fetches every block; ShardedBackend.scores: test blocks (as stored) and alpha
            # out, scores back
            PREDICT: row(self.n_test * m, self.n_test * m * f, m * spx + w * m * spx
                         + self.n_test * spx + w * mc8 + self.n_test * c * 8,
                         worker=predict_worker, driver=[
                             ("the model's centers, their shards' puts", 2 * m * spx,
                              "ConvRFM.scores: X_fit_; ShardedBackend"),
                             ("test images as stored, their puts", 2 * self.n_test * spx,
                              "ShardedBackend.scores: Z"),
                             ("alpha, its put", 2 * mc8, "scores: alpha, put"),
                             ("scores, parts and concatenation", 2 * self.n_test * c * 8,
                              "ShardedBackend.scores: concatenate")]),
        }
        return {"per_iteration": per_iter, "once": once}


def peak_stages(work: Workload) -> dict[str, str]:
    """The stage at which a worker, the first worker and the driver hold the most."""
    st = {**work.stages()["per_iteration"], **work.stages()["once"]}
    return {p: max(st, key=lambda s: st[s][f"{p}_memory"])
            for p in ("worker", "first_worker", "driver")}


def memory_breakdown(work: Workload) -> dict[str, list[Item]]:
    """For a worker, the first worker and the driver, (what, bytes, code) at the stage of its
    peak (``peak_stages``): each list sums to ``memory(work)``'s figure."""
    st, at = {**work.stages()["per_iteration"], **work.stages()["once"]}, peak_stages(work)
    out = {p: list(st[at[p]][f"{p}_items"]) for p in at}
    out["driver"].insert(0, ("the process", WORKER_BASE_BYTES, "WORKER_BASE_BYTES"))
    return out


def memory(work: Workload) -> dict[str, float]:
    """Peak bytes of a worker, the first worker and the driver over all stages."""
    return {p: total(items) for p, items in memory_breakdown(work).items()}


def storage(work: Workload) -> float:
    """Bytes of kernel slabs a fit stores (one n x m kernel per iteration in the run's store)."""
    return work.iters * work.n_fit * work.m * work.dtype_bytes
