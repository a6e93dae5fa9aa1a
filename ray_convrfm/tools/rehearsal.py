"""``bench rehearsal``: a dress rehearsal of an ImageNet-shaped run beside the cost model.

End to end from files on disk: JPEGs written as a folder tree and rates measured on it (child
processes); a loopback cluster (a head without CPUs, two one-CPU worker nodes); a Nystrom fit
reading ``folder:`` in place, one worker node removed while the first kernel is stored and a
node added in its place (what an autoscaler does); the held-out images predicted on the
workers. Every stage is timed and every process's peak memory sampled, beside
``costtime.predict`` and ``costmodel.memory`` for the same ``costmodel.Workload``: a large run
is priced and rehearsed, node loss included, before a cluster is rented for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from pathlib import Path

from ray_convrfm.options import DEFAULT_BLOCK
from ray_convrfm.tools import costmodel, costtime
from ray_convrfm.tools.bench import MemorySampler

#: A stage (or process) further than this share from its prediction is flagged.
FLAG_SHARE = 0.25
#: Nodes declared dead within about 2 s (Ray's default: about 15 s), as the multi-node tests.
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
               "health_check_timeout_ms": 500}
#: What the fit spent outside the driver's timed stages (placement, workers reading and
#: decoding their shards, digests, patch span, the model's centers): predicted load + gather.
UNTIMED = "load + untimed (start, read, decode, centers)"
_RECOVERY_LOG = "ray_convrfm.backends.recovery"


@dataclasses.dataclass(frozen=True)
class RehearsalPlan:
    """What to rehearse. ``remove_after``: a share in (0, 1] of the first kernel's slabs
    stored before a worker node is removed, or ``"Ns"``: N seconds into the fit;
    ``replace_after_s``: seconds until the new node is added."""

    size: int = 32
    n: int = 20000
    n_test: int = 1000
    classes: int = 100
    centers: int = 2000
    iters: int = 2
    out: str = "runs/rehearsal"
    seed: int = 0
    remove_after: float | str = 0.25
    replace_after_s: float = 1.0
    block: int = DEFAULT_BLOCK
    recovery_timeout_s: float = 300.0
    object_store_mb: int = 512  # per node

    def trigger(self) -> tuple[str, float]:
        """("share", f) or ("seconds", s), checked."""
        text = str(self.remove_after).strip()
        kind, value = ("seconds", float(text[:-1])) if text.endswith("s") \
            else ("share", float(text))
        if not (value >= 0 if kind == "seconds" else 0 < value <= 1):
            raise ValueError(f"remove_after must be a share in (0, 1] or 'Ns'; found {text!r}")
        return kind, value


def _with_peak(fn, *args) -> tuple:
    """``fn(*args)`` and this process's peak resident MiB (run in a child process)."""
    import resource

    return fn(*args), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _in_child(fn, *args) -> tuple:
    """``fn(*args)`` in a spawned process, whose memory is not the driver's, and its peak."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_with_peak, fn, *args).result()


# ------------------------------------------------------------------ the cluster
class _RecoveryLog(logging.Handler):
    """The recovery module's warnings (a lost node, a worker back), with their times."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.events: list[tuple[float, str, tuple]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((time.monotonic(), str(record.msg), tuple(record.args or ())))

    def first(self, start: str) -> tuple[float, tuple] | None:
        return next(((t, a) for t, msg, a in self.events if msg.startswith(start)), None)


def _first_kernel(store: Path) -> tuple[int, int]:
    """(slabs stored, slabs) of the first kernel in the run's store ((0, 0) before it)."""
    import zarr

    try:  # a kernel's folder exists before its metadata and arrays are complete
        path = min(store.glob("K-*"), key=lambda p: p.stat().st_ctime)
        digests = zarr.open_group(str(path), mode="r")["K.digest"][...]
    except (FileNotFoundError, KeyError, ValueError):  # min() of none: ValueError
        return 0, 0
    return int(digests.any(axis=-1).sum()), int(digests.shape[0])


def _add_node(cluster, plan: RehearsalPlan, sampler: MemorySampler, label: str, **head):
    """A node on 127.0.0.1 with token authentication (the embedded Ray's settings); the
    head, with ``head``'s arguments, for no cluster yet."""
    from ray.cluster_utils import Cluster

    from ray_convrfm.backends.embedded_ray import _embedded_settings

    args = dict(node_ip_address="127.0.0.1", object_store_memory=plan.object_store_mb * 2**20)
    with _embedded_settings():
        if cluster is None:
            cluster = Cluster(initialize_head=True, head_node_args={**args, **head})
        node = cluster.head_node if head else cluster.add_node(num_cpus=1, **args)
    for info in node.all_processes.get("raylet", []):
        sampler.raylets[info.process.pid] = (label, node.node_id)
    return cluster, node


def _start_cluster(plan: RehearsalPlan, sampler: MemorySampler):
    """A head without CPUs and two one-CPU worker nodes, joined; every listener on loopback
    (checked, as for the embedded Ray)."""
    import psutil
    import ray

    from ray_convrfm.backends import embedded_ray as er

    er._check_token_file()
    cluster, _ = _add_node(None, plan, sampler, "head", num_cpus=0, include_dashboard=False,
                           _system_config=FAST_HEALTH)
    try:
        for k in (1, 2):
            _add_node(cluster, plan, sampler, f"worker node {k}")
        cluster.wait_for_nodes()
        with er._embedded_settings():
            ray.init(address=cluster.address, log_to_driver=False)
        me = psutil.Process()
        if wide := [s for s in er.listening_sockets([me, *me.children(recursive=True)])
                    if not er._is_loopback(s[2])]:
            raise er.RayConfinementError(f"the rehearsal's cluster listens beyond loopback: "
                                         f"{wide}")
    except BaseException:
        ray.shutdown()
        cluster.shutdown()
        raise
    return cluster


def _fit_and_lose_a_node(model, X, cluster, plan: RehearsalPlan, sampler: MemorySampler,
                         store: Path) -> tuple[float, dict | None]:
    """``model.fit(X)`` in a thread (``Cluster.add_node``/``remove_node`` must run in the main
    thread) while this one removes a worker node at the plan's trigger and adds another; the
    fit's seconds and the removal (None if the fit ended first)."""
    failed: list[BaseException] = []

    def fit() -> None:
        try:
            model.fit(X)
        except BaseException as exc:  # noqa: BLE001 - raised again in the main thread
            failed.append(exc)

    kind, value = plan.trigger()
    thread, t0, event = threading.Thread(target=fit), time.monotonic(), None
    thread.start()
    while thread.is_alive() and event is None:
        done, slabs = _first_kernel(store)
        if (time.monotonic() - t0 >= value) if kind == "seconds" else \
                (slabs > 0 and done >= max(1, math.ceil(value * slabs))):
            victim = next(iter(cluster.worker_nodes))
            cluster.remove_node(victim, allow_graceful=False)
            event = {"t0": t0, "node_id": victim.node_id, "removed_at_s": time.monotonic() - t0,
                     "slabs_stored_at_trigger": done, "slabs": slabs,
                     "slabs_stored_at_removal": _first_kernel(store)[0]}
            time.sleep(plan.replace_after_s)
            _, node = _add_node(cluster, plan, sampler, "replacement node")
            event.update(added_at_s=time.monotonic() - t0, replacement_id=node.node_id)
        time.sleep(0.02)
    thread.join()
    if failed:
        raise failed[0]
    return time.monotonic() - t0, event


def _node_loss(event: dict | None, log: _RecoveryLog, seen: list[dict],
               history: list[dict]) -> dict | None:
    """The removal; when the driver saw the loss and the worker back (its log, else the
    actor's start on the new node); the slabs the restarted worker read back from the store."""
    if event is None:
        return None
    t0, (lost, back) = event.pop("t0"), (log.first("lost node"), log.first("worker %d is back"))
    back_at = back[0] if back else min((r["since"] for r in seen if r["role"] == "RayShardWorker"
                                        and r["node_id"] == event["replacement_id"]), default=None)
    out = {**event, "worker": lost[1][1] if lost else None,
           "loss_seen_at_s": lost[0] - t0 if lost else None,
           "back_at_s": None if back_at is None else back_at - t0,
           "back_from": "recovery log" if back else "actor start on the new node"}
    out["waited_s"] = None if back_at is None else out["back_at_s"] - out["removed_at_s"]
    # slabs stored before the loss are read back (checked) by the restarted task, not computed
    # again; the slab in flight on the lost worker is work lost where the driver cannot see it
    computed = history[0].get("stored_blocks_computed")
    during = event["slabs_stored_at_trigger"] < event["slabs"] and computed is not None
    return {**out, "slabs_computed_first_kernel": computed,
            "slabs_read_back": event["slabs"] - computed if during else None}


# ------------------------------------------------------------------ the rehearsal
def _row(measured: float, predicted: float | None, **extra) -> dict:
    off = None if not predicted else measured / predicted - 1
    return {"measured": measured, "predicted": predicted, "off": off,
            "flagged": off is not None and abs(off) > FLAG_SHARE, **extra}


def _stages(timings: dict, fit_s: float, predict_s: float, predicted: dict) -> dict:
    """The driver's stage timings by the cost model's names, beside its predictions."""
    timed = {costmodel.ROWS: timings.get("nystrom_rows", 0.0),  # K^T Y summed in these tasks
             costmodel.KTY: timings.get("nystrom_reduce", 0.0),
             costmodel.PRECONDITIONER: timings.get("precondition", 0.0),
             costmodel.CG: timings.get("cg_step", 0.0),
             costmodel.VALIDATION: timings.get("evaluate_validation", 0.0),
             costmodel.AGOP: timings.get("agop", 0.0)}
    return {UNTIMED: _row(fit_s - sum(timed.values()),
                          predicted[costmodel.LOAD] + predicted[costmodel.GATHER]),
            **{k: _row(v, predicted[k]) for k, v in timed.items()},
            costmodel.PREDICT: _row(predict_s, predicted[costmodel.PREDICT]),
            "fit + predict": _row(fit_s + predict_s, predicted["total"])}


def _memory(seen: list[dict], predicted: dict, worker_of: dict, probe: set) -> dict:
    """Every process's peak; the driver and each shard worker of the fit (by index: 0 holds
    the preconditioner's factor) beside the cost model's."""
    out = {}
    order = {"driver": 0, "RayShardWorker": 1}  # then the others by role
    for r in sorted(seen, key=lambda r: (order.get(r["role"], 2), r["role"], r["node"],
                                         r["pid"])):
        k = worker_of.get(r["node_id"]) if r["role"] == "RayShardWorker" else None
        k = None if r["pid"] in probe else k
        pred = predicted["driver"] if r["role"] == "driver" else None if k is None else \
            predicted["first_worker" if k == 0 else "worker"]
        name = f"shard worker {k}" if k is not None else r["role"] + (
            " (worker-start probe)" if r["pid"] in probe else "")
        out[f"{name} (pid {r['pid']}{', ended' if r['ended'] else ''})"] = _row(
            r["peak_mb"], pred, node=r["node"])
    return out


def rehearsal(size: int = 32, n: int = 20000, n_test: int = 1000, classes: int = 100,
              centers: int = 2000, iters: int = 2, out: str = "runs/rehearsal",
              seed: int = 0, remove_after: float | str = 0.25, **plan) -> dict:
    """Rehearse the run (``RehearsalPlan``; ``plan``: its other fields); writes
    ``rehearsal.json`` and ``rehearsal.md`` into ``out`` and returns what they hold."""
    import shutil

    import ray

    from ray_convrfm.data.sources import open_disk_images
    from ray_convrfm.models.convrfm import ConvRFM
    from ray_convrfm.options import Options
    from ray_convrfm.tools.bench import _worker_start_seconds, measure_rates, write_jpeg_tree

    plan = RehearsalPlan(size=size, n=n, n_test=n_test, classes=classes, centers=centers,
                         iters=iters, out=out, seed=seed, remove_after=remove_after, **plan)
    plan.trigger()
    if ray.is_initialized():
        raise RuntimeError("the rehearsal starts its own cluster: call ray.shutdown() first")
    root = Path(plan.out).absolute()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    tree, store, started = root / "tree", root / "kernels.zarr", time.perf_counter()
    work = costmodel.Workload(n=n, m=centers, channels=3, height=size, width=size, workers=2,
                              iters=iters, n_test=n_test, classes=classes, block=plan.block)
    seconds, t0 = {}, time.perf_counter()
    data, data_mb = _in_child(write_jpeg_tree, str(tree), size, n, n_test, seed, classes)
    seconds["write the JPEG tree (child process)"], t0 = time.perf_counter() - t0, \
        time.perf_counter()
    rates, rates_mb = _in_child(measure_rates, work, None, 3, str(root), f"folder:{tree}")
    seconds["measure rates (child process)"] = time.perf_counter() - t0
    log, sampler, model, cluster = _RecoveryLog(), MemorySampler(), None, None
    logging.getLogger(_RECOVERY_LOG).addHandler(log)
    sampler.start()  # the children above report their own peaks
    try:
        t0 = time.perf_counter()
        cluster = _start_cluster(plan, sampler)
        rates = dataclasses.replace(rates, worker_start_s=_worker_start_seconds(2))  # here
        seconds["start the cluster, probe a worker start"] = time.perf_counter() - t0
        probe = {r["pid"] for r in sampler.sample() if r["role"] == "RayShardWorker"}
        model = ConvRFM(depth=work.depth, iters=iters, solver="nystrom", centers=centers,
                        random_state=seed, options=Options.of(
                            workers=2, address=cluster.address, store=str(store),
                            block=plan.block, recovery_timeout_s=plan.recovery_timeout_s))
        fit_s, event = _fit_and_lose_a_node(
            model, open_disk_images(f"folder:{tree}", "train", channels=3), cluster, plan,
            sampler, store)
        t0 = time.perf_counter()
        batch = model.predict_to_parquet(open_disk_images(f"folder:{tree}", "val", channels=3),
                                         root / "predictions", overwrite=True)
        predict_s, seen = time.perf_counter() - t0, sampler.sample()
    finally:
        logging.getLogger(_RECOVERY_LOG).removeHandler(log)
        if model is not None:
            model.close()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        sampler.done.set()
        sampler.join()
    node_loss = _node_loss(event, log, seen, model.history_)
    worker_of = {node: k for h in model.history_ for k, node in enumerate(h["worker_nodes"])}
    if node_loss is not None and node_loss["worker"] is not None:
        worker_of[node_loss["node_id"]] = node_loss["worker"]
    memory = _memory(seen, {k: v / 2**20 for k, v in costmodel.memory(work).items()},
                     worker_of, probe)
    memory["data writer (child process)"] = _row(data_mb, None, node="head")
    memory["rates (child process)"] = _row(rates_mb, None, node="head")
    result = {
        "plan": dataclasses.asdict(plan), "workload": dataclasses.asdict(work),
        "rates": dataclasses.asdict(rates), "data": data,
        "stages": {**{k: _row(v, None) for k, v in seconds.items()},
                   **_stages(model.timings_, fit_s, predict_s, costtime.predict(work, rates))},
        "memory": memory, "node_loss": node_loss, "test_acc": batch.accuracy,
        "val_acc": model.history_[model.best_iter_]["val_acc"], "chance": 1 / classes,
        "cg_products": int(model.timings_.get("cg_steps", 0)),
        "predicted_cg_products": work.iters * work.cg_products(),
        "store_bytes": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()),
        "predicted_store_bytes": costmodel.storage(work),
        "seconds": time.perf_counter() - started}
    (root / "rehearsal.json").write_text(json.dumps(result, indent=2))
    (root / "rehearsal.md").write_text(table(result) + "\n")
    return result


# ------------------------------------------------------------------ the table
def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _off(row: dict) -> str:
    off = "-" if row["off"] is None else f"{100 * row['off']:+.0f} %"
    return f"{off} | {'**> 25 % off**' if row['flagged'] else ''}"


def table(r: dict) -> str:
    """The rehearsal as markdown: stages, then processes, flagged rows marked; the node loss."""
    w, loss = r["workload"], r["node_loss"]
    lines = [f"Rehearsal: {w['n']:,} images of 3 x {w['height']} x {w['width']}, {w['classes']} "
             f"classes, m = {w['m']:,}, {w['iters']} iteration(s), 2 workers on a loopback "
             f"cluster; {r['seconds']:.1f} s in all", "",
             "| stage | measured s | predicted s | off | |", "| --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {stage} | {s['measured']:.2f} | {_fmt(s['predicted'], '.2f')} | {_off(s)} |"
              for stage, s in r["stages"].items()]
    lines += ["", "| process | node | peak MiB | predicted MiB | off | |",
              "| --- | --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {name} | {s['node']} | {s['measured']:,.0f} | {_fmt(s['predicted'], ',.0f')} "
              f"| {_off(s)} |" for name, s in r["memory"].items()]
    lines.append("")
    if loss is None:
        lines.append("node loss: none (the fit ended before the trigger)")
    else:
        lines.append(
            f"node loss: node {loss['node_id'][:12]} (worker {loss['worker']}) removed at "
            f"{loss['removed_at_s']:.1f} s into the fit, {loss['slabs_stored_at_removal']} of "
            f"{loss['slabs']} slabs of the first kernel stored; a node added at "
            f"{loss['added_at_s']:.1f} s; the loss seen at {_fmt(loss['loss_seen_at_s'], '.1f')}"
            f" s, the worker back at {_fmt(loss['back_at_s'], '.1f')} s ({loss['back_from']}; "
            f"waited {_fmt(loss['waited_s'], '.1f')} s); slabs read back, not computed again: "
            f"{_fmt(loss['slabs_read_back'], 'd')}. The stage under way includes the wait.")
    lines.append(f"CG products {r['cg_products']} (assumed {r['predicted_cg_products']}); store "
                 f"{r['store_bytes'] / 2**20:.1f} MiB (predicted "
                 f"{r['predicted_store_bytes'] / 2**20:.1f}); data written at "
                 f"{r['data']['images_per_s']:.0f} images/s; test accuracy "
                 f"{100 * r['test_acc']:.2f} % (chance {100 * r['chance']:.0f} %), validation "
                 f"{100 * r['val_acc']:.2f} %")
    return "\n".join(lines)
