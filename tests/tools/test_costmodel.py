"""The cost model counts the scale-out Nystrom flow (centers in blocks, resident or spilled rows,
CG over m x c vectors, the preconditioner on the first worker) and predicts sensibly."""

import ast
import dataclasses
import json
import math

import pytest

from ray_convrfm.tools import costmodel, imagenet_costs
from ray_convrfm.tools.costmodel import (
    AGOP,
    CG,
    GATHER,
    KTY,
    LOAD,
    PER_ITERATION,
    PRECONDITIONER,
    PREDICT,
    RELU_FLOPS,
    ROWS,
    WORKER_BASE_BYTES,
    Rates,
    Workload,
    memory,
    predict,
    storage,
    tree_levels,
)
from ray_convrfm.tools.imagenet_costs import (
    imagenet_memory_table,
    imagenet_rows,
    imagenet_table,
    main,
)

RATES = Rates(kernel_entry_s=1e-5, agop_over_kernel=3.0, gemm_flops=5e9, factor_flops=5e9,
              decode_images_per_s=5000, store_bytes_per_s=3e8, worker_start_s=2.0)
BASE = Workload(n=20000, m=2000, channels=3, height=32, width=32, workers=2, n_test=1000)


def per_iteration(work: Workload) -> dict:
    return work.stages()["per_iteration"]


def driver_in_iterations(work: Workload) -> float:
    return max(s["driver_memory"] for s in per_iteration(work).values())


def test_flops_per_entry_counts_spec_section_2():
    w = Workload(n=100, m=10, channels=3, height=10, width=10, patch_size=3, depth=2)
    assert w.positions() == [64, 36]  # 8 x 8, then 6 x 6
    first = 2 * 64 * 27  # x_p^T (M z_p) at every position, d = 27
    relu = RELU_FLOPS * (64 + 36)
    window = 4 * 9 * 36  # s(x,z), s(x,x), s(z,z) and theta summed over 3 x 3 windows
    assert w.flops_per_entry() == first + relu + window + 2 * 36
    assert Workload(n=1, m=1, channels=3, height=10, width=10, depth=2,
                    basis_dim=5).flops_per_entry() < w.flops_per_entry()


def test_driver_memory_is_flat_in_m_but_for_m_by_c_vectors_and_the_model_centers():
    """No m x m object anywhere in the driver: per iteration it is affine in m with a slope
    of a few m x c float64 matrices, whatever the image size; only the model's centers,
    gathered at the end, grow with m times the pixels."""
    d = {m: driver_in_iterations(dataclasses.replace(BASE, m=m)) for m in (1000, 2000, 3000)}
    slope = d[2000] - d[1000]
    assert d[3000] - d[2000] == pytest.approx(slope)  # no m^2 term
    vectors = slope / (1000 * BASE.classes * 8)
    # CG over every ridge's columns at once: its state is R m x c matrices per vector
    assert vectors == pytest.approx(round(vectors)) and 10 <= vectors <= 12 * BASE.ridges
    assert driver_in_iterations(dataclasses.replace(BASE, height=64, width=64)) == d[2000]
    # Y (n x c float64) and its per-worker puts: the rest of the driver's memory
    y = 2 * BASE.n_fit * BASE.classes * 8
    assert d[2000] == pytest.approx(y + vectors * 2000 * BASE.classes * 8)
    once = {m: dataclasses.replace(BASE, m=m).stages()["once"][GATHER]["driver_memory"]
            for m in (1000, 2000)}
    assert once[2000] - once[1000] == 1000 * (BASE.classes * 8 + 2 * BASE.pixel_bytes)


def test_resident_rows_cap_worker_memory_and_spill_to_reads_at_every_step():
    full = BASE.shard * BASE.m * 4
    slab = BASE.block * BASE.m * 4
    capped = dataclasses.replace(BASE, resident_bytes=16 * 2**20)
    kept, spilled = capped.resident()
    assert kept == (16 * 2**20 // slab) * slab and kept + spilled == full
    assert BASE.resident() == (full, 0)
    cg_full, cg_capped = per_iteration(BASE)[CG], per_iteration(capped)[CG]
    # the spilled rows leave memory; one slab is read back at a time
    assert cg_full["worker_memory"] - cg_capped["worker_memory"] == spilled - slab
    products = capped.cg_products()
    assert products == capped.cg_steps + 1  # one pass per step for every ridge
    assert cg_capped["bytes_read"] == products * capped.workers * spilled
    assert cg_full["bytes_read"] == 0
    extra = predict(capped, RATES)[CG] - predict(BASE, RATES)[CG]
    assert extra == pytest.approx(BASE.iters * products * spilled / RATES.store_bytes_per_s)
    assert memory(capped)["worker"] < memory(BASE)["worker"]


def test_centers_are_prepared_in_blocks_within_the_cache_share():
    small = dataclasses.replace(BASE, m=100)  # all prepared centers fit: kept, not refetched
    assert small.center_memory() == small.side_bytes(small.m)
    assert small.centers_refetched() == 0
    big = dataclasses.replace(BASE, m=64_000, height=64, width=64)
    blk = big.side_bytes(big.block)
    cache = big.budget_bytes * costmodel.CENTER_CACHE_SHARE
    assert big.center_memory() <= cache + 2 * blk + big.block * big.pixel_bytes
    assert big.center_memory() < big.side_bytes(big.m) / 50
    assert 0.9 < big.centers_refetched() <= 1


def test_mirrored_constants_are_the_workers():
    from ray_convrfm.backends import workers

    assert costmodel.CENTER_CACHE_SHARE == workers.CENTER_CACHE_SHARE
    assert costmodel.MATVEC_ROWS == workers.MATVEC_ROWS


def test_preconditioner_factor_memory_and_flops():
    m, q, c = 4000, 500, BASE.classes
    full = dataclasses.replace(BASE, m=m)
    rank = dataclasses.replace(full, preconditioner_rank=q)
    assert full.rank() is None and rank.rank() == q
    assert dataclasses.replace(full, preconditioner_rank=m).rank() is None  # q >= m: Falkon's
    # T and Q; building: + C, and the eigensolver's workspace
    assert full.factor_memory() == (2 * 8 * m * m, 5 * 8 * m * m)
    steady, peak = rank.factor_memory()
    assert steady == 8 * m * q  # U
    bigger = dataclasses.replace(rank, m=2 * m).factor_memory()
    assert bigger[0] == 2 * steady and bigger[1] - 2 * (peak - 32 * q * q) == 32 * q * q
    assert dataclasses.replace(rank, preconditioner_rank=2 * q).factor_memory()[0] == 2 * steady
    # the first worker holds the factor: the peak while building, the steady part in CG
    st = per_iteration(full)
    assert st[PRECONDITIONER]["first_worker_memory"] - st[PRECONDITIONER]["worker_memory"] \
        == 5 * 8 * m * m
    assert st[CG]["first_worker_memory"] - st[CG]["worker_memory"] == 2 * 8 * m * m
    assert st[AGOP]["first_worker_memory"] == st[AGOP]["worker_memory"]  # released by then
    # B and B^T twice per step and twice per run, on every ridge's R c columns at once: a
    # triangular solve and Q's product per column, or U^T v and U w
    R = full.ridges
    cols = (2 * full.cg_steps + 2) * R * c
    assert full.applications() == cols
    assert full.apply_flops() == (m * m, 2 * m * m)
    assert rank.apply_flops() == (0, 4 * m * q)
    fac, gem = full.factor_flops()  # one factor for every ridge: Cholesky and eigh, T T^T
    assert fac == m**3 / 3 + 9 * m**3 and gem == 2 * m**3
    assert st[PRECONDITIONER]["flops"] == fac + gem + cols * 3 * m * m
    # the shards' K_mm rows once; v out and B v back for the two applications outside the
    # steps (inside them B, H and B^T are chained on the workers: counted with CG)
    assert st[PRECONDITIONER]["bytes_moved"] == m * m * 4 + 4 * R * m * c * 8
    assert per_iteration(rank)[PRECONDITIONER]["bytes_moved"] == m * q * 4 + 4 * R * m * c * 8


def test_cg_flops_and_bytes_per_step():
    assert tree_levels(2) == [2] and tree_levels(8) == [8, 2]
    assert tree_levels(64) == [64, 16, 4] and tree_levels(65) == [65, 17, 5, 2]
    for w in (2, 8, 64):
        work = dataclasses.replace(BASE, workers=w)
        st = per_iteration(work)[CG]
        mc8, R = work.m * work.classes * 8, work.ridges
        # every step passes over the rows once for all R ridges (R c columns); then H alpha
        assert work.cg_products() == work.cg_steps + 1
        assert st["flops"] == 4 * work.n_fit * work.m * work.classes * (R * work.cg_steps + 1)
        inner = sum(tree_levels(w)[1:])  # sums made on workers, then sent on
        # a step: v to the first worker, B v to every worker, the tree, B^T H B v back
        assert st["bytes_moved"] == (work.cg_steps * (2 * w + inner + 2) * R * mc8
                                     + (2 * w + inner) * mc8)
    assert per_iteration(BASE)[KTY]["flops"] == 2 * BASE.n_fit * BASE.m * BASE.classes
    # with a network that costs nothing, CG's seconds are its FLOPs per worker at GEMM rate
    fast = dataclasses.replace(RATES, network_bytes_per_s=1e30)
    per_worker = per_iteration(BASE)[CG]["flops"] * BASE.shard / BASE.n_fit
    assert predict(BASE, fast)[CG] == pytest.approx(
        BASE.iters * per_worker / RATES.gemm_flops, rel=1e-3)  # + the trees' adds


def test_prediction_scales_with_workers_entries_and_centers():
    p2 = predict(BASE, RATES)
    p4 = predict(dataclasses.replace(BASE, workers=4), RATES)
    assert p4[ROWS] == pytest.approx(p2[ROWS] / 2, rel=1e-3)
    assert p4[PRECONDITIONER] == pytest.approx(p2[PRECONDITIONER], rel=1e-3)
    shard = math.ceil(BASE.n_fit / 2)
    # compute, the centers' pixels received once, every slab written to the store
    expected = BASE.iters * (shard * 2000 * (1e-5 + 4 / 3e8)
                             + 2000 * BASE.pixel_bytes / RATES.network_bytes_per_s)
    assert p2[ROWS] == pytest.approx(expected)
    assert predict(BASE, RATES, store=False)[ROWS] < p2[ROWS]
    assert p2["total"] == pytest.approx(sum(v for k, v in p2.items() if k != "total"))
    assert set(p2) == {*PER_ITERATION, LOAD, GATHER, PREDICT, "total"}
    assert storage(BASE) == BASE.iters * BASE.n_fit * 2000 * 4
    bigger = dataclasses.replace(BASE, m=4000)
    assert memory(bigger)["worker"] > memory(BASE)["worker"]
    assert memory(BASE)["driver"] > WORKER_BASE_BYTES


def test_calibrated_recovers_the_entry_cost_of_new_and_old_runs():
    target = dataclasses.replace(BASE, height=64, width=64)
    S, m, c = BASE.shard, BASE.m, BASE.classes
    entry = 2e-5
    store = S * m * 4 / RATES.store_bytes_per_s
    agop = (BASE.iters - 1) * math.ceil(BASE.agop_samples / 2) * m * entry * 2.5
    new = {ROWS: BASE.iters * (S * m * entry + 2 * S * m * c / RATES.gemm_flops + store),
           AGOP: agop}
    old = {"kernel K(train, centers)": BASE.iters * (S * m * entry + store
                                                     + 2 * S * m * (m + c) / RATES.gemm_flops),
           AGOP: agop}
    old_rates = dataclasses.asdict(RATES)
    old_rates["cholesky_flops"] = old_rates.pop("factor_flops")
    scale = target.flops_per_entry() / BASE.flops_per_entry()
    for measured, rates in ((new, dataclasses.asdict(RATES)), (old, old_rates)):
        run = {"workload": dataclasses.asdict(BASE), "rates": rates, "measured": measured}
        got = costmodel.calibrated(run, target, RATES)
        assert got.kernel_entry_s == pytest.approx(entry * scale)
        assert got.agop_over_kernel == pytest.approx(2.5)


def test_bench_scale_table_reads_the_stage_names():
    """``ray-convrfm bench scale`` prints measured next to predicted seconds by stage name."""
    from ray_convrfm.tools.cli import _scale_table

    predicted = predict(BASE, RATES)
    r = {"workload": dataclasses.asdict(BASE), "predicted": predicted,
         "measured": {k: 1.0 for k in (*PER_ITERATION, LOAD, PREDICT)} | {GATHER: None},
         "measured_total": 10.0, "driver_peak_rss_mb": 1.0, "worker_peak_rss_mb": 1.0,
         "predicted_memory_mb": {k: v / 2**20 for k, v in memory(BASE).items()},
         "store_bytes": 0, "predicted_store_bytes": storage(BASE), "test_acc": 0.5}
    table = _scale_table(r)
    assert all(k in table for k in PER_ITERATION) and GATHER not in table


def test_imagenet_tables_have_every_case():
    rows = imagenet_rows(3.22)
    assert [(r["size"], r["gpus"]) for r in rows] == [(s, g) for s in (64, 224)
                                                      for g in (8, 64, 512)]
    by = {(r["size"], r["gpus"]): r for r in rows}
    assert by[(224, 8)]["iteration_s"] > by[(64, 8)]["iteration_s"]
    assert by[(64, 512)]["per_iteration"][ROWS] < by[(64, 8)]["per_iteration"][ROWS]
    for r in rows:
        assert r["iteration_s"] == pytest.approx(sum(r["per_iteration"].values()))
        assert r["stored"] == storage(Workload(n=imagenet_costs.IMAGENET_TRAIN, m=64_000,
                                               channels=3, height=1, width=1, iters=1))
    # the driver's memory in the iterations does not depend on the image size
    assert by[(64, 8)]["driver_iteration"] == by[(224, 8)]["driver_iteration"]
    assert imagenet_table(rows).count("\n") == len(rows) + 1
    assert imagenet_memory_table(rows).count("\n") == len(rows) + 1
    ranked = imagenet_rows(3.22, m=256_000, rank=16_000)
    assert all(r["factor"][0] == 8 * 256_000 * 16_000 for r in ranked)
    full = imagenet_rows(3.22, m=256_000)
    assert all(r["factor"][0] / 2 == 8 * 256_000**2 for r in full)  # T alone is 524 GB


def test_cost_model_is_arithmetic_only():
    """It measures nothing: standard library (and numpy) only, and from this package at most
    ``ray_convrfm.options``; the measurements live in ``bench``, which imports it."""
    tree = ast.parse(open(costmodel.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    allowed = {"__future__", "dataclasses", "math", "argparse", "json", "numpy",
               "ray_convrfm.options"}
    assert imported <= allowed, imported - allowed
    assert not hasattr(costmodel, "measure_rates")


def test_imagenet_entry_point_reads_scale_json(tmp_path, capsys):
    path = tmp_path / "scale.json"
    rates = dataclasses.asdict(RATES)
    rates["cholesky_flops"] = rates.pop("factor_flops")  # a run of the earlier pipeline
    path.write_text(json.dumps({"rates": rates}))
    assert main([str(path), "--centers", "32000", "--rank", "4000"]) == 0
    out = capsys.readouterr().out
    rows = imagenet_rows(RATES.agop_over_kernel, m=32000, rank=4000)
    assert out.strip() == imagenet_table(rows) + "\n\n" + imagenet_memory_table(rows)
    assert main(["--agop-over-kernel", "3.0", "--centers", "32000", "--rank", "4000"]) == 0
    assert capsys.readouterr().out == out
    with pytest.raises(SystemExit):
        main([])


def test_measured_rates_feed_the_prediction(tmp_path):
    from ray_convrfm.tools.bench import measure_rates

    work = Workload(n=100, m=64, channels=1, height=8, width=8, depth=2, block=32)
    rates = measure_rates(work, repeats=1, store_dir=str(tmp_path))
    assert isinstance(rates, Rates)
    for name in ("kernel_entry_s", "agop_over_kernel", "gemm_flops", "factor_flops",
                 "store_bytes_per_s"):
        assert 0 < getattr(rates, name) < math.inf, name
    assert math.isnan(rates.decode_images_per_s)  # no parquet data given
    assert list(tmp_path.iterdir()) == []  # the zarr store was temporary
    assert predict(work, dataclasses.replace(rates, decode_images_per_s=1e3))["total"] > 0
