"""One place sizes the thread pools: torch's and numba's to the compute threads, BLAS to one."""

import subprocess
import sys

import pytest

from ray_convrfm.kernels import threads


def _run(code: str, **env) -> str:
    """Run ``code`` in a fresh interpreter (pool sizes are per process) and return its output."""
    import os

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_configure_sets_torch_numba_and_blas_once():
    out = _run(
        "import numpy as np; np.ones((64, 64)) @ np.ones((64, 64))\n"
        "from ray_convrfm.kernels.threads import configure_threads, pool_sizes, available_cpus\n"
        "assert configure_threads(1) == 1\n"
        "print(pool_sizes())\n"
        "print(configure_threads(None) == available_cpus(), pool_sizes()['torch'])\n")
    first, second = out.splitlines()
    sizes = eval(first)  # a dict literal of ints
    assert sizes["torch"] == 1 and sizes["numba"] == 1 and sizes["blas"] == 1
    assert second.split()[0] == "True" and int(second.split()[1]) == threads.available_cpus()


def test_worker_environment_starts_numbas_pool_at_its_size():
    env = threads.worker_environment(1)
    assert env["NUMBA_NUM_THREADS"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["OPENBLAS_NUM_THREADS"] == str(threads.BLAS_THREADS)
    out = _run("from ray_convrfm.kernels.threads import configure_threads, pool_sizes\n"
               "configure_threads(2)\nprint(pool_sizes())", **env)
    sizes = eval(out)
    assert sizes["numba_launched"] == 1 and sizes["numba"] == 1  # capped by the launched pool
    assert sizes["torch"] == 2 and sizes["blas"] == 1


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_threads_must_be_positive_integers(bad):
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        threads.configure_threads(bad)


def test_compute_options_carry_threads():
    from ray_convrfm import Options

    assert Options.of(threads=3).compute.threads == 3
    with pytest.raises(ValueError, match="threads must be a positive integer or None"):
        Options.of(threads=0)
