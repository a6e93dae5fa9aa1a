"""The engine is chosen where the work runs, from that worker's device, and never replaced."""

import importlib.util

import numpy as np
import pytest
import torch

from ray_convrfm.backends import KernelSpec
from ray_convrfm.backends.protocol import LayerState
from ray_convrfm.backends.workers import ShardWorker
from ray_convrfm.backends.workers import shard as workers_module
from ray_convrfm.kernels.kernel import KernelParams

CUDA = torch.device("cuda")  # only its type is read: no GPU is needed
SPEC = KernelSpec(KernelParams(2, 3, False))


@pytest.mark.parametrize("triton_imports", [True, False])
def test_auto_on_a_cuda_worker_is_triton_when_it_imports_else_torch(monkeypatch, triton_imports):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real("torch") if triton_imports else None)
                        if name == "triton" else real(name, *a))
    assert SPEC.engine == "auto"
    assert SPEC.engine_on(CUDA) == ("triton" if triton_imports else "torch")
    assert SPEC.engine_on(torch.device("cpu")) == "numba"


def test_an_explicit_engine_is_honoured_or_refused_never_replaced():
    for engine in ("torch", "triton"):
        assert KernelSpec(SPEC.params, engine=engine).engine_on(CUDA) == engine
    with pytest.raises(ValueError, match="engine='numba' runs on the CPU only"):
        KernelSpec(SPEC.params, engine="numba").engine_on(CUDA)
    with pytest.raises(ValueError, match="engine='triton' runs on CUDA only"):
        KernelSpec(SPEC.params, engine="triton").engine_on(torch.device("cpu"))


def test_a_worker_computes_with_the_engine_of_its_own_device(monkeypatch):
    """A worker on a GPU is handed the spec a CPU driver made ("auto"): it resolves it on its
    device, where it once forced the eager torch engine."""
    seen = []
    monkeypatch.setattr(workers_module, "kernel_matrix",
                        lambda xs, zs, engine, budget, symmetric: seen.append(engine))
    worker = ShardWorker(np.zeros((2, 1, 6, 6), np.float32), 0)

    def layer(spec):
        return LayerState("k", spec, np.eye(9, dtype=np.float32))

    worker._kernel(None, None, layer(SPEC))
    worker.device = CUDA
    worker._kernel(None, None, layer(SPEC))
    worker._kernel(None, None, layer(KernelSpec(SPEC.params, engine="torch")))
    expected = "triton" if importlib.util.find_spec("triton") else "torch"
    assert seen == ["numba", expected, "torch"]
    with pytest.raises(ValueError, match="runs on the CPU only"):
        worker._kernel(None, None, layer(KernelSpec(SPEC.params, engine="numba")))
