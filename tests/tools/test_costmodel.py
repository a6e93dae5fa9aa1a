"""The cost model's counts follow the spec's arithmetic and its predictions scale sensibly."""

import ast
import dataclasses
import json
import math

import pytest

from ray_convrfm.tools import costmodel
from ray_convrfm.tools.costmodel import (
    RELU_FLOPS,
    Rates,
    Workload,
    imagenet_rows,
    imagenet_table,
    main,
    memory,
    predict,
    storage,
)

RATES = Rates(kernel_entry_s=1e-5, agop_over_kernel=3.0, gemm_flops=5e9, cholesky_flops=5e9,
              decode_images_per_s=5000, store_bytes_per_s=3e8, worker_start_s=2.0)


def test_flops_per_entry_counts_spec_section_2():
    w = Workload(n=100, m=10, channels=3, height=10, width=10, patch_size=3, depth=2)
    assert w.positions() == [64, 36]  # 8 x 8, then 6 x 6
    first = 2 * 64 * 27  # x_p^T (M z_p) at every position, d = 27
    relu = RELU_FLOPS * (64 + 36)
    window = 4 * 9 * 36  # s(x,z), s(x,x), s(z,z) and theta summed over 3 x 3 windows
    assert w.flops_per_entry() == first + relu + window + 2 * 36
    assert Workload(n=1, m=1, channels=3, height=10, width=10, depth=2,
                    basis_dim=5).flops_per_entry() < w.flops_per_entry()


def test_prediction_scales_with_workers_entries_and_centers():
    base = Workload(n=20000, m=2000, channels=3, height=32, width=32, workers=2, n_test=1000)
    p2 = predict(base, RATES)
    p4 = predict(Workload(**{**base.__dict__, "workers": 4}), RATES)
    assert p4["kernel K(train, centers)"] == pytest.approx(p2["kernel K(train, centers)"] / 2,
                                                           rel=1e-3)
    assert p4["solve (Cholesky, every ridge)"] == p2["solve (Cholesky, every ridge)"]
    shard = math.ceil(base.n_fit / 2)
    expected = base.iters * shard * 2000 * (1e-5 + 4 / 3e8)  # compute, then store write
    assert p2["kernel K(train, centers)"] == pytest.approx(expected)
    assert p2["total"] == pytest.approx(sum(v for k, v in p2.items() if k != "total"))
    assert storage(base) == base.iters * base.n_fit * 2000 * 4
    bigger = Workload(**{**base.__dict__, "m": 4000})
    assert memory(bigger)["driver"] > memory(base)["driver"]
    assert memory(bigger)["worker"] > memory(base)["worker"]


def test_imagenet_table_has_every_case():
    rows = imagenet_rows(RATES)
    assert [(r["size"], r["gpus"]) for r in rows] == [(s, g) for s in (64, 224)
                                                      for g in (8, 64, 512)]
    for r in rows:
        assert r["iteration_s"] > 0 and r["store_bytes_per_iteration"] > 0
    by = {(r["size"], r["gpus"]): r for r in rows}
    assert by[(224, 8)]["iteration_s"] > by[(64, 8)]["iteration_s"]
    assert by[(64, 512)]["per_iteration"]["kernel K(train, centers)"] < \
        by[(64, 8)]["per_iteration"]["kernel K(train, centers)"]
    assert imagenet_table(rows).count("\n") == len(rows) + 1


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
    path.write_text(json.dumps({"rates": dataclasses.asdict(RATES)}))
    assert main([str(path), "--centers", "32000"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == imagenet_table(imagenet_rows(RATES, m=32000))


def test_measured_rates_feed_the_prediction(tmp_path):
    from ray_convrfm.tools.bench import measure_rates

    work = Workload(n=100, m=64, channels=1, height=8, width=8, depth=2, block=32)
    rates = measure_rates(work, repeats=1, store_dir=str(tmp_path))
    assert isinstance(rates, Rates)
    for name in ("kernel_entry_s", "agop_over_kernel", "gemm_flops", "cholesky_flops",
                 "store_bytes_per_s"):
        assert 0 < getattr(rates, name) < math.inf, name
    assert math.isnan(rates.decode_images_per_s)  # no parquet data given
    assert list(tmp_path.iterdir()) == []  # the zarr store was temporary
    assert predict(work, dataclasses.replace(rates, decode_images_per_s=1e3))["total"] > 0
