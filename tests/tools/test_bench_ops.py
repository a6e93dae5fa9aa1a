"""``bench ops``: every hot operation timed at each thread count, outliers flagged."""

import functools
import json
import time

import torch

from ray_convrfm.tools import bench_ops
from ray_convrfm.tools.cli import main

SMALL = dict(n_fit=40, n_patches=50, n_val=10, samples=8)
TINY_SHARE = dict(sizes=(8,), repeats=2, block_flops=2e7, peak_size=256)


def test_every_hot_operation_runs_and_gives_what_the_fit_computes():
    ops = bench_ops.hot_operations(**SMALL)
    names = list(ops)
    assert len(names) == 8 and any("AGOP" in n for n in names) and any("solve" in n for n in names)
    patches, im2col = ops[names[0]](), ops[names[1]]()  # the same images, both ways
    assert torch.equal(patches, im2col.transpose(1, 2))
    scores = ops[names[-1]]()
    assert len(scores) == 3 and scores[0].shape == (10, 10) and scores[0].dtype == torch.float64


def test_outliers_are_flagged_and_thread_counts_take_turns():
    calls = []

    def slow_third_call():
        calls.append(torch.get_num_threads())
        time.sleep(0.08 if len(calls) == 5 else 0.005)

    rows = bench_ops.time_operations({"op": slow_third_call}, threads=(1, 2), repeats=3)
    assert calls == [1, 2, 1, 2, 1, 2, 1, 2]  # warm-up at each count, then in turns
    by_threads = {r.threads: r for r in rows}
    assert by_threads[1].outlier and not by_threads[2].outlier
    assert by_threads[1].runs == 3 and by_threads[1].max_s >= 0.08
    assert "<- max over 3 x median" in bench_ops.format_ops(rows).splitlines()[2]


def test_cli_bench_ops_prints_json(monkeypatch, capsys):
    monkeypatch.setattr(bench_ops, "hot_operations",
                        functools.partial(bench_ops.hot_operations, **SMALL))
    monkeypatch.setattr(bench_ops, "kernel_shares",
                        functools.partial(bench_ops.kernel_shares, **TINY_SHARE))
    rc = main(["bench", "ops", "--repeats", "2", "--threads", "2", "--no-main-job", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["threads"] for r in out["ops"]} == {1, 2} and len(out["ops"]) == 16
    assert all(r["median_s"] <= r["max_s"] for r in out["ops"]) and out["main_job"] is None
    assert [(r["size"], r["threads"]) for r in out["kernel_share"]] == [(8, 1), (8, 2)]


def test_kernel_share_counts_the_cost_models_flops_against_the_gemm_peak():
    rows = bench_ops.kernel_shares(threads=(1,), **TINY_SHARE)
    (r,) = rows
    # 8 x 8 images, 3 x 3 patches, depth 3: positions 36, 16, 4 (docs/math.md section 2)
    assert r.flops_per_entry == 2 * 36 * 9 + 30 * (36 + 16 + 4) + 4 * 9 * (16 + 4) + 2 * 4
    assert r.images == int((2e7 / r.flops_per_entry) ** 0.5)
    assert r.flops_per_s == r.entries_per_s * r.flops_per_entry
    assert 0 < r.share == r.flops_per_s / r.peak_flops
    assert bench_ops.format_shares(rows).splitlines()[2].split()[:4] == ["8", "x", "8", "1"]
