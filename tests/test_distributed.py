"""The Ray layer on a small local cluster gives what the single-machine core gives."""

import numpy as np
import pytest
import torch
from conftest import random_psd, rel_err

from ray_convrfm.agop import patch_agop
from ray_convrfm.kernel import KernelParams, kernel_matrix, prepare_side

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray_convrfm.distributed import start_ray

    start_ray(workers=2)
    yield
    ray.shutdown()


def test_sharded_kernel_and_agop_equal_local(cluster):
    from ray_convrfm.distributed import ShardedImages

    rng = np.random.default_rng(0)
    X = rng.random((23, 1, 12, 12), dtype=np.float32)
    Z = rng.random((7, 1, 12, 12), dtype=np.float32)
    M = random_psd(rng, 9).astype(np.float32)
    params = {"depth": 2, "patch_size": 3, "padding": False}
    shards = ShardedImages(X, workers=2, threads=1)
    assert shards.bounds == [(0, 11), (11, 23)]

    K = shards.kernel(Z, M, params)
    Mt = torch.from_numpy(M)
    xs = prepare_side(torch.from_numpy(X), Mt, KernelParams(**params))
    zs = prepare_side(torch.from_numpy(Z), Mt, KernelParams(**params))
    assert rel_err(K, kernel_matrix(xs, zs, "numba", 512).numpy()) < 1e-6

    coef = rng.standard_normal((23, 4)).astype(np.float32)
    sample = np.array([1, 5, 12, 20])  # rows in both shards
    G = shards.agop(X, coef, sample, M, params)
    local = patch_agop(xs, torch.from_numpy(coef), xs.take(sample), Mt, engine="numba")
    assert rel_err(G, local.numpy()) < 1e-5
