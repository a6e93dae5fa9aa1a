"""The cost model counts the scale-out Nystrom flow (centers in blocks, resident or spilled rows,
CG over m x c vectors, the preconditioner on the first worker; pixels as stored, budget-sized
prepared chunks, labels instead of one-hot targets) and predicts sensibly."""

import ast
import dataclasses
import json
import math

import pytest

from ray_convrfm.tools import costmodel, costtime, imagenet_costs
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
    VALIDATION,
    WORKER_BASE_BYTES,
    Workload,
    memory,
    memory_breakdown,
    peak_stages,
    storage,
    total,
    tree_levels,
)
from ray_convrfm.tools.costtime import Rates, predict
from ray_convrfm.tools.imagenet_costs import (
    breakdown_table,
    imagenet_memory_table,
    imagenet_rows,
    imagenet_table,
    imagenet_workload,
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
    # the labels (n int64) and their per-worker puts: the rest of the driver's memory
    labels = 2 * BASE.n_fit * 8
    assert d[2000] == pytest.approx(labels + vectors * 2000 * BASE.classes * 8)
    once = {m: dataclasses.replace(BASE, m=m).stages()["once"][GATHER]["driver_memory"]
            for m in (1000, 2000)}
    assert once[2000] - once[1000] == 1000 * (BASE.classes * 8 + 2 * BASE.stored_pixel_bytes)


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
    # every prepared center, and the last block's stored pixels while it is prepared
    assert small.center_memory() == small.side_bytes(small.m) + 100 * small.stored_pixel_bytes
    assert small.centers_refetched() == 0
    big = dataclasses.replace(BASE, m=64_000, height=64, width=64)
    chunk = big.prepared_images(big.block)
    assert 1 <= chunk < big.block  # a block is prepared a budget-sized chunk at a time
    assert big.side_bytes(chunk) <= big.budget_bytes * costmodel.PREPARED_SHARE
    cache = big.budget_bytes * costmodel.CENTER_CACHE_SHARE
    # the cached blocks, the chunk in use and the block's stored pixels
    assert big.center_memory() <= cache + big.side_bytes(chunk) \
        + big.block * big.stored_pixel_bytes
    assert big.center_memory() < big.side_bytes(big.m) / 50
    assert 0.9 < big.centers_refetched() <= 1
    # one prepared image is the floor when it alone exceeds the chunk's share
    tiny = dataclasses.replace(big, budget_bytes=2**20)
    assert tiny.prepared_images(256) == 1 and tiny.prepared_images(0) == 0


def test_prepared_chunks_and_sides_are_the_workers():
    """The model's prepared side, chunk and patch-gram chunk are the code's, image for image."""
    import numpy as np

    from ray_convrfm.backends import chunks
    from ray_convrfm.backends.protocol import KernelSpec
    from ray_convrfm.kernels.kernel import KernelParams, side_bytes_per_image

    for size, depth, basis in ((32, 3, None), (64, 2, 5), (224, 3, None)):
        work = Workload(n=200_000, m=1000, channels=3, height=size, width=size, depth=depth,
                        basis_dim=basis)
        params = KernelParams(depth=depth, patch_size=3)
        spec = KernelSpec(params, dtype="float32")
        Q = None if basis is None else np.zeros((27, basis))
        assert work.side_bytes(1) == side_bytes_per_image(params.grids(size, size), work.r, 4)
        assert work.prepared_images(10**6) == chunks.prepared_chunk((3, size, size), spec, Q)
        assert work.gram_images() == chunks.gram_chunk((3, size, size), 3, False, 4,
                                                       spec.memory_budget_mb)


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
    # those of every step are chained into the step and timed with it: counted with CG
    assert full.applications_in_steps() == 2 * full.cg_steps * R * c
    assert full.applications_outside_steps() == 2 * R * c
    assert full.apply_flops() == (m * m, 2 * m * m)
    assert rank.apply_flops() == (0, 4 * m * q)
    fac, gem = full.factor_flops()  # one factor for every ridge: Cholesky and eigh, T T^T
    assert fac == m**3 / 3 + 9 * m**3 and gem == 2 * m**3
    assert st[PRECONDITIONER]["flops"] == fac + gem + 2 * R * c * 3 * m * m
    assert st[CG]["flops"] == 4 * full.n_fit * m * c * (R * full.cg_steps + 1) \
        + 2 * full.cg_steps * R * c * 3 * m * m
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
        apply = 2 * work.cg_steps * R * work.classes * 3 * work.m**2  # B, B^T in the steps
        assert st["flops"] == 4 * work.n_fit * work.m * work.classes * (R * work.cg_steps + 1) \
            + apply
        inner = sum(tree_levels(w)[1:])  # sums made on workers, then sent on
        # a step: v to the first worker, B v to every worker, the tree, B^T H B v back
        assert st["bytes_moved"] == (work.cg_steps * (2 * w + inner + 2) * R * mc8
                                     + (2 * w + inner) * mc8)
    # K^T Y: class_sums adds every entry of the rows into its label's column
    assert per_iteration(BASE)[KTY]["flops"] == BASE.n_fit * BASE.m
    # with a network that costs nothing, CG's seconds are its products' FLOPs per worker at
    # GEMM rate, and the first worker's applications of B (a triangular solve at the factor's
    # rate, Q's product at GEMM rate per column)
    fast = dataclasses.replace(RATES, network_bytes_per_s=1e30)
    m, R, c = BASE.m, BASE.ridges, BASE.classes
    products = 4 * BASE.n_fit * m * c * (R * BASE.cg_steps + 1) * BASE.shard / BASE.n_fit
    applications = BASE.applications_in_steps() * (m * m / RATES.factor_flops
                                                   + 2 * m * m / RATES.gemm_flops)
    assert predict(BASE, fast)[CG] == pytest.approx(
        BASE.iters * (products / RATES.gemm_flops + applications), rel=1e-3)  # + trees' adds


def test_prediction_scales_with_workers_entries_and_centers():
    p2 = predict(BASE, RATES)
    p4 = predict(dataclasses.replace(BASE, workers=4), RATES)
    assert p4[ROWS] == pytest.approx(p2[ROWS] / 2, rel=1e-3)
    assert p4[PRECONDITIONER] == pytest.approx(p2[PRECONDITIONER], rel=1e-3)
    shard = math.ceil(BASE.n_fit / 2)
    # compute, the centers' stored pixels received once, every slab written to the store
    expected = BASE.iters * (shard * 2000 * (1e-5 + 4 / 3e8)
                             + 2000 * BASE.stored_pixel_bytes / RATES.network_bytes_per_s)
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
    new = {ROWS: BASE.iters * (S * m * entry + S * m / RATES.gemm_flops + store),  # class sums
           AGOP: agop}
    old = {"kernel K(train, centers)": BASE.iters * (S * m * entry + store
                                                     + 2 * S * m * (m + c) / RATES.gemm_flops),
           AGOP: agop}
    old_rates = dataclasses.asdict(RATES)
    old_rates["cholesky_flops"] = old_rates.pop("factor_flops")
    scale = target.flops_per_entry() / BASE.flops_per_entry()
    for measured, rates in ((new, dataclasses.asdict(RATES)), (old, old_rates)):
        run = {"workload": dataclasses.asdict(BASE), "rates": rates, "measured": measured}
        got = costtime.calibrated(run, target, RATES)
        assert got.kernel_entry_s == pytest.approx(entry * scale)
        assert got.agop_over_kernel == pytest.approx(2.5)


def test_bench_scale_table_reads_the_stage_names():
    """``ray-convrfm bench scale`` prints measured next to predicted seconds by stage name."""
    from ray_convrfm.tools.cli_bench import _scale_table

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


def test_pixels_rest_and_travel_as_stored():
    """uint8 pixels (1 byte a value) against float32 images (4): what rests in a worker's
    shard, what travels to it (center blocks, held-out and test images) shrinks by 3 bytes a
    value, and so does a ConvRFM's model (its centers rest as stored)."""
    f32 = dataclasses.replace(BASE, stored_bytes=4)
    assert BASE.stored_bytes == 1 and f32.pixel_bytes == BASE.pixel_bytes
    delta = BASE.channels * BASE.height * BASE.width * 3  # bytes per image saved
    assert f32.stored_pixel_bytes - BASE.stored_pixel_bytes == delta
    u8, f = BASE.stages(), f32.stages()
    moved = {k: f[p][k]["bytes_moved"] - u8[p][k]["bytes_moved"] for p in u8 for k in u8[p]}
    w, m, refetch = BASE.workers, BASE.m, BASE.centers_refetched()
    assert refetch > 0  # the blocks the cache lacks travel again
    assert moved[ROWS] == w * m * delta  # every block to every worker, once
    assert moved[VALIDATION] == pytest.approx(w * refetch * m * delta)
    assert moved[AGOP] == pytest.approx(w * refetch * m * delta)
    assert moved[LOAD] == BASE.n_val * delta  # validation parts, put once
    # test images, and a ConvRFM's centers (as stored), put and fetched by every worker
    assert moved[PREDICT] == (BASE.n_test + (1 + w) * m) * delta
    assert moved[GATHER] == m * delta  # the model's centers to the driver
    assert moved[KTY] == moved[CG] == moved[PRECONDITIONER] == 0
    blk = min(BASE.block, m)
    worker = {k: f[p][k]["worker_memory"] - u8[p][k]["worker_memory"] for p in u8 for k in u8[p]}
    # the shard, and the block of centers being prepared
    assert worker[ROWS] == (BASE.shard + blk) * delta
    assert worker[CG] == BASE.shard * delta  # the shard only: no centers in CG
    # ... and the validation part, kept on the worker as stored
    assert worker[VALIDATION] == (BASE.shard + blk + math.ceil(BASE.n_val / w)) * delta
    # a block of test images as sent, its shard of the model's centers
    assert worker[PREDICT] == (blk + math.ceil(m / w)) * delta
    assert memory(f32)["worker"] - memory(BASE)["worker"] >= BASE.shard * delta
    # the prediction: test images and the model's centers, each with its puts
    assert memory(f32)["driver"] - memory(BASE)["driver"] == 2 * (BASE.n_test + m) * delta
    seconds = predict(f32, RATES)[ROWS] - predict(BASE, RATES)[ROWS]
    assert seconds == pytest.approx(BASE.iters * m * delta / RATES.network_bytes_per_s)


def test_driver_memory_does_not_grow_with_n_times_c():
    """Targets travel as class indices: the driver holds n labels (and their puts), never the
    n x c one-hot targets; classes cost it m x c vectors only."""
    def driver(n: int, classes: int) -> float:
        return memory(Workload(n=n, m=4000, channels=3, height=64, width=64, workers=64,
                               classes=classes))["driver"]

    n = imagenet_costs.IMAGENET_TRAIN
    grows = driver(n, 1000) - driver(n, 500)
    assert 0 < grows < n * 500 * 8 / 5  # n x c float64 would add 5.1 GB; this is m x c only
    assert grows == pytest.approx(driver(20_000, 1000) - driver(20_000, 500))  # not n
    # in the iterations: n labels (int64) and their per-worker puts
    one = Workload(n=n, m=4000, channels=3, height=64, width=64, workers=64, classes=1000)
    two = dataclasses.replace(one, n=2 * n)
    assert driver_in_iterations(two) - driver_in_iterations(one) == pytest.approx(
        2 * 8 * (two.n_fit - one.n_fit))
    # the rows stage: the labels of a shard, not its one-hot targets
    items = dict((what, b) for what, b, _ in per_iteration(BASE)[ROWS]["worker_items"])
    assert items["its shard's labels"] == BASE.shard * 8
    assert per_iteration(BASE)[KTY]["bytes_moved"] == BASE.n_fit * 8 + sum(
        tree_levels(BASE.workers)) * BASE.m * BASE.classes * 8


def test_memory_breakdown_sums_to_the_peaks():
    cases = [BASE, dataclasses.replace(BASE, resident_bytes=16 * 2**20),
             dataclasses.replace(BASE, m=100, preconditioner_rank=50),
             imagenet_workload(224, 64), imagenet_workload(64, 8, rank=16_000)]
    for work in cases:
        parts, peaks, at = memory_breakdown(work), memory(work), peak_stages(work)
        assert set(parts) == set(peaks) == set(at) == {"worker", "first_worker", "driver"}
        for process, items in parts.items():
            assert total(items) == pytest.approx(peaks[process])
            assert all(isinstance(what, str) and b > 0 and code for what, b, code in items)
        stages = {**work.stages()["per_iteration"], **work.stages()["once"]}
        assert total(parts["worker"]) == stages[at["worker"]]["worker_memory"]
        assert parts["driver"][0] == ("the process", WORKER_BASE_BYTES, "WORKER_BASE_BYTES")
    # at ImageNet scale the first worker's peak is Falkon's factor while it is built
    big = memory_breakdown(imagenet_workload(224, 64))
    assert big["first_worker"][-1][1] == imagenet_workload(224, 64).factor_memory()[1]
    table = breakdown_table(imagenet_workload(224, 64))
    assert table.count("**peak**") == 4  # worker, first worker, driver, driver in iterations


def test_class_sketch_lowers_the_agops_coefficients():
    """Beyond 64 classes the AGOP runs on 64 sketched outputs: fit_rfm sends coef @ Omega
    (m x k) to the workers, and the AGOP's buffers hold k outputs."""
    auto = Workload(n=20_000, m=2000, channels=3, height=32, width=32, classes=1000)
    exact = dataclasses.replace(auto, agop_classes=1000)
    assert auto.agop_columns() == costmodel.AUTO_SKETCH_CLASSES
    assert exact.agop_columns() == 1000 and BASE.agop_columns() == BASE.classes
    assert dataclasses.replace(BASE, agop_classes=4).agop_columns() == 4
    a, e = per_iteration(auto)[AGOP], per_iteration(exact)[AGOP]
    assert e["bytes_moved"] - a["bytes_moved"] == auto.workers * auto.m * (1000 - 64) * 4

    def coef(stage: dict) -> float:
        return next(b for what, b, code in stage["worker_items"] if code == "agop_part: coef")

    assert coef(e) - coef(a) == auto.m * (1000 - 64) * 4
    assert a["driver_memory"] < e["driver_memory"]
    # the gradient buffers fit the budget either way, down to one sample image: at 224 x 224
    # one image's gradients of 1,000 outputs take 5.3 GB, of 64 outputs 0.34 GB
    big = imagenet_workload(224, 64)
    assert per_iteration(big)[AGOP]["worker_memory"] < per_iteration(
        dataclasses.replace(big, agop_classes=1000))[AGOP]["worker_memory"] - 10e9
    assert predict(auto, RATES)[AGOP] < predict(exact, RATES)[AGOP]
    # ImageNet: the AGOP / kernel ratio scales with the k outputs, so at 1,000 classes the
    # AGOP costs as at 64 (both 64 outputs); 10 classes are exact (the reference)
    by = {c: {(r["size"], r["gpus"]): r["per_iteration"][AGOP]
              for r in imagenet_rows(3.22, classes=c)} for c in (64, 1000)}
    assert by[64] == pytest.approx(by[1000])


def test_breakdown_entry_point(capsys):
    assert main(["--breakdown", "--rank", "16000"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == breakdown_table(imagenet_workload(224, 64, rank=16_000))
    assert main(["--breakdown", "--size", "64", "--gpus", "8"]) == 0
    assert capsys.readouterr().out.strip() == breakdown_table(imagenet_workload(64, 8))
