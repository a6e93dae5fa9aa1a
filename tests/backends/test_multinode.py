"""A real multi-node Ray cluster on this machine: a head and a second node as separate
processes on loopback; a fit joins it through ``address`` and its workers span both nodes."""

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
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=5, solver=solver, centers=60)
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
