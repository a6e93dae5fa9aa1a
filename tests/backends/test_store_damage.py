"""Kernel stores under real damage: chunk files deleted, swapped and corrupted on disk, and two
processes fitting on one store. A damaged block is recomputed with a warning naming it, never
read as fill values; a second run on a store in use is refused with a message naming the
holder."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ray_convrfm import ConvRFM, Options
from ray_convrfm.data.datasets import load_digits

KW = dict(depth=2, iters=2, agop_samples=20, random_state=6)


def _digits():
    ds = load_digits()
    return ds.X_train[:300], ds.y_train[:300], ds.X_test[:100]


def _kernels(store: Path, train: bool) -> list[Path]:
    """The store's training kernels (columns = rows), or its other kernels (validation,
    centers), in the order the fit created them (iteration 0 first)."""
    found = []
    for group in store.glob("K-*"):
        spec = json.loads((group / "zarr.json").read_text())["attributes"]["spec"]
        if (spec["cols_fingerprint"] == spec["rows_fingerprint"]) == train:
            found.append(group)
    return sorted(found, key=lambda g: (g / "zarr.json").stat().st_mtime_ns)


def _chunk(kernel: Path, i: int, j: int) -> Path:
    path = kernel / "K" / "c" / str(i) / str(j)  # zarr v3 chunk key of block (i, j)
    assert path.is_file(), path
    return path


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _computed(model) -> list[int]:
    return [h["stored_blocks_computed"] for h in model.history_]


def _warned(caplog, store: Path, block: tuple[int, int], why: str) -> bool:
    return any(str(store) in r.getMessage() and f"block {block} of kernel K" in r.getMessage()
               and why in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


# ---------------------------------------------------------------------------- in process
@pytest.fixture(scope="module")
def stored_fit(tmp_path_factory):
    """One in-process exact fit with a store (blocks of 128: 3 x 3 training blocks per
    iteration; validation is scored, not stored); each test damages a copy of its store."""
    X, y, Xt = _digits()
    store = tmp_path_factory.mktemp("fit") / "k.zarr"
    model = ConvRFM(options=Options.of(store=str(store), block=128), **KW).fit(X, y)
    assert _computed(model) == [9, 9]
    return store, model.decision_function(Xt), [h["val_acc"] for h in model.history_]


def _damage(kind: str, store: Path) -> tuple[tuple[int, int], str]:
    """Damage one chunk of the iteration-0 kernels; the block hit and the warning's words."""
    train0, train1 = _kernels(store, train=True)
    if kind == "delete":
        _chunk(train0, 1, 2).unlink()
        return (1, 2), "is missing its chunk"
    if kind == "swap":  # the same block of another kernel: a valid chunk, checksum and all
        shutil.copyfile(_chunk(train1, 0, 1), _chunk(train0, 0, 1))
        return (0, 1), "does not match its digest"
    _flip(_chunk(train0, 2, 2))
    return (2, 2), "is unreadable"


@pytest.mark.parametrize("kind", ["delete", "swap", "flip"])
def test_a_damaged_chunk_is_recomputed_with_a_warning(stored_fit, tmp_path, caplog, kind):
    """Today a deleted chunk reads as zeros (predictions change, validation accuracy 0.1) and
    a swapped or flipped one goes unnoticed; now each is found, named and recomputed."""
    template, scores, val_acc = stored_fit
    store = tmp_path / "k.zarr"
    shutil.copytree(template, store)
    block, why = _damage(kind, store)
    X, y, Xt = _digits()
    caplog.set_level(logging.WARNING)
    again = ConvRFM(options=Options.of(store=str(store), block=128), **KW).fit(X, y)
    assert _computed(again) == [1, 0]  # the damaged block of iteration 0, nothing else
    assert _warned(caplog, store, block, why), caplog.text
    assert [h["val_acc"] for h in again.history_] == val_acc
    np.testing.assert_array_equal(again.decision_function(Xt), scores)


def test_damaged_nystrom_blocks_are_recomputed_in_process(tmp_path, caplog):
    """The Nystrom sums read the stored K(train, centers) block row by block row: checked too."""
    X, y, Xt = _digits()
    opts = Options.of(store=str(tmp_path / "k.zarr"), block=128)
    kw = dict(KW, solver="nystrom", centers=40)
    first = ConvRFM(options=opts, **kw).fit(X, y)
    assert _computed(first) == [3, 3]
    it0, it1 = _kernels(tmp_path / "k.zarr", train=False)
    _chunk(it0, 0, 0).unlink()
    _flip(_chunk(it1, 2, 0))
    caplog.set_level(logging.WARNING)
    again = ConvRFM(options=opts, **kw).fit(X, y)
    assert _computed(again) == [1, 1]
    assert _warned(caplog, tmp_path / "k.zarr", (0, 0), "is missing its chunk"), caplog.text
    assert _warned(caplog, tmp_path / "k.zarr", (2, 0), "is unreadable"), caplog.text
    np.testing.assert_array_equal(again.decision_function(Xt), first.decision_function(Xt))


# ---------------------------------------------------------------------------- Ray workers
@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray_convrfm.backends.ray_executor import start_ray

    start_ray(workers=2)
    yield
    ray.shutdown()


def test_damage_read_by_ray_workers_is_recomputed(cluster, tmp_path, caplog):
    """Nystrom with two workers: each reads its own rows of the stored K(train, centers) for
    its sums, finds the deleted or corrupted chunk, recomputes it and tells the driver."""
    X, y, Xt = _digits()
    store = tmp_path / "k.zarr"
    opts = Options.of(workers=2, store=str(store))
    kw = dict(KW, solver="nystrom", centers=40)
    first = ConvRFM(options=opts, **kw).fit(X, y)
    assert _computed(first) == [2, 2]
    it0, it1 = _kernels(store, train=False)
    # blocks of 256: row block 0 is the first worker's, row block 1 the second's
    _chunk(it0, 1, 0).unlink()
    _flip(_chunk(it1, 0, 0))
    caplog.set_level(logging.WARNING)
    again = ConvRFM(options=opts, **kw).fit(X, y)
    assert _computed(again) == [1, 1]
    assert _warned(caplog, store, (1, 0), "is missing its chunk"), caplog.text
    assert _warned(caplog, store, (0, 0), "is unreadable"), caplog.text
    assert "(on a shard worker)" in caplog.text
    for model in (first, again):  # scored in this process: no second pool of workers
        model.set_params(options=None)
    np.testing.assert_array_equal(again.decision_function(Xt), first.decision_function(Xt))


def test_damage_read_by_the_driver_is_recomputed_by_the_workers(executor, tmp_path, caplog):
    """The exact solver's kernel, written by the workers and read whole by the driver: a
    deleted and a swapped-in chunk are found there, and the owning workers recompute them."""
    import torch
    from conftest import sharded

    from ray_convrfm.backends import KernelSpec
    from ray_convrfm.backends.store import StoreSpec, fingerprint, rows_fingerprint
    from ray_convrfm.kernels.kernel import KernelParams

    X = _digits()[0][:200]
    M = np.eye(9, dtype=np.float32)
    spec = KernelSpec(KernelParams(depth=2, patch_size=3, padding=False))
    fp = rows_fingerprint(X, 64)
    store_spec = StoreSpec(fp, fp, fingerprint(M), 2, 3, False, "float32", 64)
    other = StoreSpec(fp, fp, fingerprint(2 * M), 2, 3, False, "float32", 64)
    url, url2 = str(tmp_path / "K"), str(tmp_path / "K2")
    backend = sharded(executor(X, workers=2, block=64, align=True), X, block=64)
    backend.configure(spec, None)

    def stored(M, url, store_spec):
        backend.set_metric(torch.from_numpy(M), None)
        return backend.kernel_via_store(backend.parts(), url, store_spec, "K")

    K, computed = stored(M, url, store_spec)
    assert computed == 16
    stored(2 * M, url2, other)
    (tmp_path / "K" / "K" / "c" / "3" / "1").unlink()  # rows of the second (Ray) worker
    shutil.copyfile(tmp_path / "K2" / "K" / "c" / "0" / "2",
                    tmp_path / "K" / "K" / "c" / "0" / "2")  # another kernel's chunk
    caplog.set_level(logging.WARNING)
    again, computed = stored(M, url, store_spec)
    assert computed == 2
    np.testing.assert_array_equal(again, K)
    assert _warned(caplog, Path(url), (3, 1), "is missing its chunk"), caplog.text
    assert _warned(caplog, Path(url), (0, 2), "does not match its digest"), caplog.text


# ---------------------------------------------------------------------------- two processes
_HOLD = """
import sys, time
from ray_convrfm.backends.lease import StoreLease
lease = StoreLease.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""

_FIT = """
import json, sys, time
from pathlib import Path
from ray_convrfm import ConvRFM, Options
from ray_convrfm.data.datasets import load_digits
ds = load_digits()
X, y, Xt = ds.X_train[:300], ds.y_train[:300], ds.X_test[:30]
print("ready", flush=True)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.002)
try:
    model = ConvRFM(options=Options.of(store=sys.argv[1], block=128), depth=2, iters=2,
                    agop_samples=20, random_state=6).fit(X, y)
    out = {"ok": True, "scores": model.decision_function(Xt).tolist(),
           "computed": [h["stored_blocks_computed"] for h in model.history_]}
except Exception as err:
    out = {"ok": False, "error": type(err).__name__, "message": str(err)}
print(json.dumps(out), flush=True)
"""


def _python(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])


def test_a_store_in_use_is_refused_naming_its_holder_until_the_holder_dies(tmp_path):
    """Another process holds the store: a fit here is refused with the store, pid and host;
    once that process is SIGKILLed (no chance to clean up), its lease is gone and the fit runs."""
    import socket

    from ray_convrfm.backends.lease import StoreBusyError

    store = tmp_path / "k.zarr"
    holder = _python(_HOLD, store)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        X, y, Xt = _digits()
        model = ConvRFM(options=Options.of(store=str(store), block=128), **KW)
        with pytest.raises(StoreBusyError) as refused:
            model.fit(X, y)
        message = str(refused.value)
        assert str(store) in message and "in use by another run" in message
        assert f"pid {holder.pid} on {socket.gethostname()} since " in message
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert _computed(model.fit(X, y)) == [9, 9]  # the dead holder's lease was taken over


def test_two_processes_racing_on_one_store(tmp_path):
    """Two fits started together on one fresh store: never ``ContainsArrayError``; each
    finishes or is refused with the store-in-use message, and what finished is right."""
    store, go = tmp_path / "k.zarr", tmp_path / "go"
    procs = [_python(_FIT, store, go) for _ in range(2)]
    try:
        for p in procs:  # both have imported everything and wait at the same line
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        go.touch()
        outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1])
                for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    finished = [o for o in outs if o["ok"]]
    refused = [o for o in outs if not o["ok"]]
    assert finished, outs
    for o in refused:
        assert o["error"] == "StoreBusyError", o
        assert str(store) in o["message"] and "in use by another run" in o["message"], o
    # coordinated: no block was computed by both (today each computes all 18 on its own)
    assert sum(sum(o["computed"]) for o in finished) == 18, outs
    X, y, Xt = _digits()
    here = ConvRFM(options=Options.of(store=str(store), block=128), **KW).fit(X, y)
    assert _computed(here) == [0, 0]  # the finished run left a complete, intact store
    for o in finished:
        np.testing.assert_array_equal(here.decision_function(Xt[:30]), np.array(o["scores"]))


def test_a_lease_object_on_an_fsspec_store_is_taken_over_only_when_stale(caplog):
    """memory:// stands for object storage: a live holder refuses, a dead one (this host) or
    a silent one (heartbeat older than the TTL) is taken over with a warning."""
    import socket

    import fsspec

    from ray_convrfm.backends.lease import LEASE_NAME, StoreBusyError, StoreLease

    url = f"memory://lease-test-{time.time_ns()}/k.zarr"
    fs, root = fsspec.core.url_to_fs(url)
    with StoreLease.acquire(url):
        with pytest.raises(StoreBusyError, match=f"pid {os.getpid()} on"):
            StoreLease.acquire(url)
    assert not fs.exists(f"{root}/{LEASE_NAME}")  # released

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    caplog.set_level(logging.WARNING)
    for holder in ({"host": socket.gethostname(), "pid": int(dead), "heartbeat": time.time()},
                   {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600}):
        fs.pipe_file(f"{root}/{LEASE_NAME}", json.dumps(holder).encode())
        StoreLease.acquire(url).release()
        assert "taking over the stale lease" in caplog.text
    fs.pipe_file(f"{root}/{LEASE_NAME}", json.dumps(
        {"host": "elsewhere", "pid": 1, "since": "now", "heartbeat": time.time()}).encode())
    with pytest.raises(StoreBusyError, match="pid 1 on elsewhere since now"):
        StoreLease.acquire(url, wait_s=0.2, poll_s=0.05)
