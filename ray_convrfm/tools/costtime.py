"""The cost model's seconds: ``Rates`` measured on one worker, and the wall seconds of every
stage of a Nystrom fit they predict for a ``costmodel.Workload`` (pure arithmetic, as the
counts in ``costmodel`` are); ``calibrated`` takes the costs a measured run achieved.
"""

from __future__ import annotations

import dataclasses
import math

from ray_convrfm.options import REDUCE_FAN_IN
from ray_convrfm.tools.costmodel import (
    AGOP,
    CG,
    GATHER,
    KTY,
    LOAD,
    PRECONDITIONER,
    PREDICT,
    ROWS,
    VALIDATION,
    Workload,
    tree_levels,
)


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


def predict(work: Workload, rates: Rates, store: bool = True,
            kept_workers: bool = True) -> dict[str, float]:
    """Wall seconds of every stage of the fit (all iterations) with ``work.workers`` workers
    in parallel. Keys as in ``Workload.stages``, plus "total". ``kept_workers``: the
    prediction reuses the fit's workers (``models.lifecycle``), else it starts new ones."""
    w, it, m, c, S = work.workers, work.iters, work.m, work.classes, work.shard
    spx, dt, net = work.stored_pixel_bytes, work.dtype_bytes, rates.network_bytes_per_s
    mc8 = m * c * 8
    _, spilled = work.resident()
    # compute, the centers' stored pixels received once, slabs written (run store, or spilled)
    rows = S * m * rates.kernel_entry_s + m * spx / net \
        + (S * m * dt if store else spilled) / rates.store_bytes_per_s
    # class sums (one add per entry), the shard's labels, the tree of m x c parts
    kty = S * m / rates.gemm_flops + S * 8 / net + _tree_seconds(work, rates, mc8, adds=True)
    fac, gem = work.factor_flops()
    afac, agem = work.apply_flops()
    width = work.rank() or m
    apply = afac / rates.factor_flops + agem / rates.gemm_flops  # B (or B^T) on one column
    # the factor and the run's first and last applications; those of every step are the CG's
    pre = fac / rates.factor_flops + gem / rates.gemm_flops + m * width * dt / net \
        + work.applications_outside_steps() * apply + 4 * work.ridges * mc8 / net
    # one CG step: every ridge's R c columns in one pass over the rows; the chained
    # preconditioner's v and B v travel with it; the training error's c-column product last
    Rc8 = work.ridges * mc8

    def product(cols8: float) -> float:
        return (4 * S * cols8 / 8 / rates.gemm_flops + _tree_seconds(work, rates, cols8,
                adds=False) + _tree_seconds(work, rates, cols8, adds=True)
                + spilled / rates.store_bytes_per_s)

    cg = work.cg_steps * (product(Rc8) + 2 * Rc8 / net) + product(mc8) \
        + work.applications_in_steps() * apply
    v_rows = math.ceil(work.n_val / w)
    refetched = work.centers_refetched() * m * spx
    val = v_rows * m * rates.kernel_entry_s + 2 * work.ridges * v_rows * m * c \
        / rates.gemm_flops + (work.ridges * mc8 + refetched) / net
    agop = math.ceil(work.agop_samples / w) * m * rates.kernel_entry_s \
        * rates.agop_over_kernel + (m * work.agop_columns() * dt + refetched) / net \
        + _tree_seconds(work, rates, work.r**2 * 8, adds=True)
    out = {
        LOAD: rates.worker_start_s + S / rates.decode_images_per_s,
        ROWS: it * rows, KTY: it * kty, PRECONDITIONER: it * pre,
        CG: it * cg,
        # the validation parts are read (parquet) by the workers at the first evaluation
        VALIDATION: it * val + v_rows / rates.decode_images_per_s,
        # the AGOP is taken after every iteration but the last
        AGOP: (it - 1) * agop,
        GATHER: m * spx / net,
        # the centers put again, then fetched by every worker, and test images as stored; alpha
        PREDICT: (0.0 if kept_workers else rates.worker_start_s)
        + (2 * m * spx + work.n_test * spx + mc8) / net
        + math.ceil(work.n_test / w) * m * rates.kernel_entry_s,
    }
    out["total"] = sum(out.values())
    return out


def calibrated(run: dict, target: Workload, fresh: Rates) -> Rates:
    """Rates for ``target`` from a measured run (``bench scale`` JSON): the per-entry kernel
    cost its row stage achieved (all workers busy, task overheads included) scaled to
    ``target``'s FLOPs per entry, and the AGOP's cost relative to it; the rest from ``fresh``.
    Runs of the earlier pipeline ("kernel K(train, centers)" with an m x m Gram) are read too;
    K^T Y, now class sums (S m adds), was 2 S m c GEMM FLOPs: under 1 % of the stage either way."""
    work = Workload(**run["workload"])
    rates = Rates.from_dict(run["rates"])
    S, m, c = work.shard, work.m, work.classes
    store = S * m * work.dtype_bytes / rates.store_bytes_per_s
    if ROWS in run["measured"]:
        stage, other = run["measured"][ROWS], S * m / rates.gemm_flops  # class sums
    else:
        stage, other = run["measured"]["kernel K(train, centers)"], \
            2 * S * m * (m + c) / rates.gemm_flops
    entry = (stage / work.iters - other - store) / (S * m)
    agop_entries = (work.iters - 1) * math.ceil(work.agop_samples / work.workers) * m
    agop_ratio = run["measured"][AGOP] / (agop_entries * entry) if agop_entries else \
        rates.agop_over_kernel
    scale = target.flops_per_entry() / work.flops_per_entry()
    return dataclasses.replace(fresh, kernel_entry_s=entry * scale, agop_over_kernel=agop_ratio)
