"""A real multi-node Ray cluster on this machine: a head and a second node as separate
processes on loopback; a fit joins it through ``address`` and its workers span both nodes."""

import re

import numpy as np
import pytest

ray = pytest.importorskip("ray")


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.parametrize("solver", ["exact", "nystrom"])
def test_fit_through_address_uses_both_nodes(two_node_cluster, solver):
    """With ``nystrom`` the centers (blocks of 16) live on both nodes, each worker fetches the
    other's blocks, the preconditioner's factor is on the first worker and validation is
    scored on both: the in-process model's predictions."""
    from ray_convrfm import ConvRFM, Options
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    X, y, Xt = ds.X_train[:120], ds.y_train[:120], ds.X_test[:40]
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=5, solver=solver,
              centers=None if solver == "exact" else 60)
    remote = ConvRFM(options=Options.of(workers=2, address=two_node_cluster.address,
                                        block=16), **kw).fit(X, y)
    if solver == "nystrom":  # centers on both shards (rows 0-53 and 54-107 of the fit rows)
        idx = remote.center_indices_
        assert (idx < 54).any() and (idx >= 54).any()
        assert all(h["cg_iterations_by_ridge"] for h in remote.history_)
    nodes = {node for h in remote.history_ for node in h["worker_nodes"]}
    assert len(nodes) == 2  # one worker per node: the placement group spreads them
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert nodes <= alive
    local = ConvRFM(**kw).fit(X, y)
    np.testing.assert_allclose(remote.decision_function(Xt), local.decision_function(Xt),
                               rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------ a lost node
#: Nodes are declared dead within about 2 s (Ray's default: about 15 s)
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
               "health_check_timeout_ms": 500}


@pytest.fixture
def worker_nodes():
    """A head without CPUs (the driver's node) and two worker nodes of one CPU each, so the
    two workers' bundles can only live on worker nodes: losing one leaves its bundle no home
    until a node is added."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _fit_in_thread(model, X, y):
    """Run ``model.fit`` in a thread (Ray's ``add_node`` must run in the main thread);
    returns the thread and a list that receives the fit's exception, if any."""
    import threading

    failed: list = []

    def fit():
        try:
            model.fit(X, y)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failed.append(exc)

    thread = threading.Thread(target=fit)
    thread.start()
    return thread, failed


def _done_blocks(store) -> int:
    """Kernel blocks finished in ``store`` (a finished block has its digest)."""
    import zarr

    total = 0
    for path in store.glob("K-*"):
        try:  # a kernel's folder exists before its metadata and arrays are complete
            digests = zarr.open_group(str(path), mode="r")["K.digest"][...]
            total += int(digests.any(axis=-1).sum())
        except (FileNotFoundError, KeyError, ValueError):
            continue
    return total


def _kill_worker_node_once_writing(cluster, store, thread, seconds=120.0):
    """Remove one worker node (each holds one worker) once kernel blocks are in ``store``;
    its id."""
    import time

    deadline = time.monotonic() + seconds
    while _done_blocks(store) < 2:
        assert thread.is_alive(), "the fit ended before any block was stored"
        assert time.monotonic() < deadline, "no kernel block was ever written"
        time.sleep(0.05)
    victim = next(iter(cluster.worker_nodes))
    cluster.remove_node(victim, allow_graceful=False)
    return victim.node_id


def _digits(n=400):
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    return ds.X_train[:n], ds.y_train[:n], ds.X_test[:60]


def test_a_fit_survives_a_lost_node_replaced_mid_kernel(worker_nodes, tmp_path, caplog):
    """Worker 1's node is removed while the kernel is written and a new node added: the
    tasks wait for the actor's restart there (logged), and the model predicts as the
    in-process fit does."""
    import logging
    import time

    from ray_convrfm import ConvRFM, Options

    X, y, Xt = _digits()
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=3)
    model = ConvRFM(options=Options.of(workers=2, address=worker_nodes.address, block=16,
                                       store=str(tmp_path / "k.zarr"),
                                       recovery_timeout_s=120), **kw)
    caplog.set_level(logging.WARNING, logger="ray_convrfm.backends.recovery")
    thread, failed = _fit_in_thread(model, X, y)
    victim = _kill_worker_node_once_writing(worker_nodes, tmp_path / "k.zarr", thread)
    time.sleep(1.0)
    worker_nodes.add_node(num_cpus=1)  # what an autoscaler does
    thread.join(300)
    assert not thread.is_alive() and not failed, failed
    text = caplog.text
    assert f"lost node {victim[:12]}" in text and re.search(r"worker \d is back on node", text)
    nodes = {node for h in model.history_ for node in h["worker_nodes"]}
    assert victim not in nodes and len(nodes) == 2
    local = ConvRFM(**kw).fit(X, y)
    np.testing.assert_allclose(model.decision_function(Xt), local.decision_function(Xt),
                               rtol=1e-3, atol=1e-4)
    model.close()


def test_a_node_never_replaced_stops_the_fit_naming_it_and_a_rerun_resumes(
        worker_nodes, tmp_path):
    """No node comes back within recovery_timeout_s: one WorkerLostError names the lost node
    and the store; the same fit rerun (with a node added) computes only missing blocks and
    predicts as the in-process fit."""
    from ray_convrfm import ConvRFM, Options
    from ray_convrfm.backends.recovery import WorkerLostError

    X, y, Xt = _digits()
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=3)
    options = Options.of(workers=2, address=worker_nodes.address, block=16,
                         store=str(tmp_path / "k.zarr"), recovery_timeout_s=4)
    thread, failed = _fit_in_thread(ConvRFM(options=options, **kw), X, y)
    victim = _kill_worker_node_once_writing(worker_nodes, tmp_path / "k.zarr", thread)
    thread.join(300)
    assert not thread.is_alive() and len(failed) == 1
    message = str(failed[0])
    assert isinstance(failed[0], WorkerLostError), repr(failed[0])
    assert re.search(rf"worker \d was lost with node {victim[:12]}", message)
    assert "recovery_timeout_s=4" in message and "k.zarr" in message and "resume" in message
    assert "\n" not in message

    worker_nodes.add_node(num_cpus=1)
    rerun = ConvRFM(options=options, **kw).fit(X, y)
    computed = rerun.history_[0]["stored_blocks_computed"]
    assert 0 < computed < _done_blocks(tmp_path / "k.zarr")  # blocks stored before were kept
    local = ConvRFM(**kw).fit(X, y)
    np.testing.assert_allclose(rerun.decision_function(Xt), local.decision_function(Xt),
                               rtol=1e-3, atol=1e-4)
    rerun.close()


def test_a_fit_survives_a_lost_node_replaced_during_the_cg_steps(worker_nodes, monkeypatch):
    """A node removed between CG steps of the Nystrom solve (after the workers built their
    resident rows) and a node added: the restarted worker rebuilds its rows, the steps go on,
    and the model predicts as the in-process fit."""
    import threading
    import time

    from ray_convrfm import ConvRFM, Options
    from ray_convrfm.backends.nystrom import NystromSolvers

    X, y, Xt = _digits()
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=3, solver="nystrom",
              centers=120)
    steps, stepping = [], threading.Event()
    real = NystromSolvers.preconditioned_step

    def counted(self, *args, **kwargs):  # the driver's side of a CG step, observed
        steps.append(time.monotonic())
        if len(steps) == 3:
            stepping.set()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(NystromSolvers, "preconditioned_step", counted)
    model = ConvRFM(options=Options.of(workers=2, address=worker_nodes.address, block=16,
                                       recovery_timeout_s=120), **kw)
    thread, failed = _fit_in_thread(model, X, y)
    assert stepping.wait(240), failed or "no CG step was taken"
    taken = len(steps)
    victim = next(iter(worker_nodes.worker_nodes))
    worker_nodes.remove_node(victim, allow_graceful=False)
    time.sleep(1.0)
    worker_nodes.add_node(num_cpus=1)
    thread.join(300)
    assert not thread.is_alive() and not failed, failed
    assert len(steps) > taken  # steps went on after the loss
    nodes = {node for h in model.history_ for node in h["worker_nodes"]}
    assert victim.node_id not in nodes
    monkeypatch.setattr(NystromSolvers, "preconditioned_step", real)
    local = ConvRFM(**kw).fit(X, y)
    np.testing.assert_allclose(model.decision_function(Xt), local.decision_function(Xt),
                               rtol=1e-3, atol=1e-4)
    model.close()
