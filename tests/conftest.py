import numpy as np
import pytest
import torch

from ray_convrfm.backends.sharded import ShardedBackend


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_psd(rng, d):
    A = rng.standard_normal((d, d))
    return A @ A.T / d


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the error relative to the largest reference entry."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------- one backend, two executors


@pytest.fixture(params=["in-process", "ray"])
def executor(request):
    """A function (images, workers, block, align) -> an executor of the parametrised kind;
    everything it opened is closed after the test."""
    opened = []

    def make(X, workers: int = 2, block: int = 4, align: bool = True):
        if request.param == "in-process":
            from ray_convrfm.backends.executor import InProcessExecutor

            ex = InProcessExecutor(X)
        else:
            pytest.importorskip("ray")
            from ray_convrfm.backends.ray_executor import RayExecutor, start_ray

            start_ray(workers=2)  # a loopback Ray, kept for the session's other Ray tests

            ex = RayExecutor(X, workers, threads=1, block=block, align=align,
                             placement_timeout_s=60)
        opened.append(ex)
        return ex

    make.kind = request.param
    yield make
    for ex in opened:
        ex.close()


def sharded(ex, X, block: int = 4, align: bool = True) -> ShardedBackend:
    """The backend over executor ``ex`` holding images X."""
    return ShardedBackend(ex, torch.device("cpu"), len(X), np.shape(X)[1:], block=block,
                          align=align)
