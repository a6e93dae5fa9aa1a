"""``bench rehearsal`` end to end at a tiny size: a JPEG folder tree, a two-node loopback
cluster, a Nystrom fit that loses a worker node mid-fit and gets a new one, every stage and
process beside the cost model's prediction."""

import json
import math

import pytest

ray = pytest.importorskip("ray")


def test_a_tiny_rehearsal_times_every_stage_and_survives_a_lost_node(tmp_path, capsys):
    from ray_convrfm.tools import costmodel
    from ray_convrfm.tools.cli import main
    from ray_convrfm.tools.rehearsal import UNTIMED

    if ray.is_initialized():  # the rehearsal starts its own cluster
        ray.shutdown()
    out = tmp_path / "rehearsal"
    assert main(["bench", "rehearsal", "--size", "8", "--n", "300", "--n-test", "100",
                 "--classes", "10", "--centers", "60", "--iters", "2", "--block", "16",
                 "--remove-after", "0.25", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "rehearsal.json").read_text())
    assert (out / "rehearsal.md").read_text().strip() in printed

    fit_stages = [UNTIMED, costmodel.ROWS, costmodel.KTY, costmodel.PRECONDITIONER,
                  costmodel.CG, costmodel.VALIDATION, costmodel.AGOP, costmodel.PREDICT,
                  "fit + predict"]
    assert set(fit_stages) <= set(r["stages"]) and len(r["stages"]) == len(fit_stages) + 3
    for stage, row in r["stages"].items():
        assert row["measured"] > 0, stage
        assert f"| {stage} | {row['measured']:.2f} |" in printed
        if stage in fit_stages:
            assert math.isfinite(row["predicted"]) and row["predicted"] >= 0, stage
            assert row["flagged"] == (row["off"] is not None and abs(row["off"]) > 0.25)
    assert r["data"]["images"] == 400 and r["data"]["images_per_s"] > 0

    # every process measured; the driver and the fit's shard workers beside the model
    mem = r["memory"]
    driver = next(v for k, v in mem.items() if k.startswith("driver"))
    assert driver["measured"] > 100 and math.isfinite(driver["predicted"])
    workers = {k: v for k, v in mem.items() if k.startswith("shard worker ")}
    assert {k.split()[2] for k in workers} == {"0", "1"}  # both indices, and the restart
    assert all(v["measured"] > 100 and math.isfinite(v["predicted"]) for v in workers.values())
    assert any(v["node"] == "replacement node" for v in workers.values())
    assert any("ended" in k and v["node"].startswith("worker node") for k, v in workers.items())
    assert any(k.startswith("raylet") for k in mem) and any(k.startswith("gcs_server")
                                                            for k in mem)

    loss = r["node_loss"]
    assert loss is not None and loss["worker"] in (0, 1)
    assert 0 < loss["removed_at_s"] < loss["added_at_s"] < loss["back_at_s"]
    assert loss["loss_seen_at_s"] is not None and loss["waited_s"] > 0
    assert "node loss: node" in printed
    assert r["test_acc"] > 3 * r["chance"]  # 10 classes: chance 10 %
