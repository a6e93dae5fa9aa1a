"""Kernel stores that fail under a run: a disk that fills, a store made unwritable, a chunk
that cannot be read. zarr's own error names no path; the one a fit raises is an OSError of
the same errno naming the store, the array and the block, in process and from Ray workers."""

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
import zarr.storage
from damaged_files import failing_after_first_kernel

from ray_convrfm import ConvRFM, Options
from ray_convrfm.backends.lease import StoreLease
from ray_convrfm.backends.store import KernelStore, StoreSpec
from ray_convrfm.data.datasets import load_digits
from ray_convrfm.tools.cli import _message

KW = dict(depth=2, iters=2, agop_samples=20, random_state=6)


def _digits():
    ds = load_digits()
    return ds.X_train[:300], ds.y_train[:300]


@pytest.mark.parametrize("solver, prefix, code, written", [
    ("exact", "K/c/", errno.ENOSPC, "writing block (0, 0)"),
    ("exact", "K.digest/c/", errno.EACCES, "writing the digest of block (0, 0)"),
    ("nystrom", "K/c/", errno.EPERM, "writing slab 0"),
])
def test_a_store_that_fills_or_turns_unwritable_mid_fit_is_named(tmp_path, monkeypatch, solver,
                                                                 prefix, code, written):
    """The second iteration's kernel cannot be written: the error keeps its errno (and class:
    EACCES and EPERM are PermissionErrors), names the kernel's array in the store and the block;
    the first kernel stays, so a rerun on a good disk computes only the second."""
    X, y = _digits()
    store = tmp_path / "k.zarr"
    kw = dict(KW, solver=solver, **({"centers": 40} if solver == "nystrom" else {}))
    opts = Options.of(store=str(store), block=128)
    with monkeypatch.context() as m:
        roots = failing_after_first_kernel(m, prefix, code)
        with pytest.raises(OSError) as info:
            ConvRFM(options=opts, **kw).fit(X, y)
    first, second = roots
    assert Path(first).parent == Path(second).parent == store
    array = f"{second}/K.digest" if "digest" in prefix else f"{second}/K"
    assert info.value.errno == code and info.value.filename == array
    assert isinstance(info.value, PermissionError) == (code != errno.ENOSPC)
    assert str(info.value) == (f"[Errno {code}] {os.strerror(code)} ({written} of the kernel "
                               f"store): '{array}'")
    assert _message(info.value) == str(info.value) and "\n" not in str(info.value)
    again = ConvRFM(options=opts, **kw).fit(X, y)
    assert again.history_[0]["stored_blocks_computed"] == 0  # the first kernel was kept
    assert again.history_[1]["stored_blocks_computed"] > 0


def _store(tmp_path: Path) -> tuple[KernelStore, tuple[int, int]]:
    spec = StoreSpec("r", "c", "m", depth=2, patch_size=3, padding=False, dtype="float32",
                     block=4)
    store, shape = KernelStore(str(tmp_path / "K-1"), spec), (8, 8)
    for i, j in store.blocks("K", shape):
        store.write_block("K", shape, i, j, np.full((4, 4), i + j, dtype=np.float32))
    return store, shape


def test_a_store_that_cannot_be_read_or_opened_is_named(tmp_path, monkeypatch):
    """A read of values or digests failing (EIO, no path) names the array and the blocks read;
    opening a store whose folder cannot be created names the store."""
    store, shape = _store(tmp_path)
    real = zarr.storage.LocalStore.get

    def failing(part):
        async def get(self, key, *args, **kwargs):
            if key.startswith(part):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return await real(self, key, *args, **kwargs)
        return get

    url = tmp_path / "K-1"
    for part, said in (("K/c/", f"reading block rows 0..1 of the kernel store): '{url}/K'"),
                       ("K.digest/c/", "reading the digests of block rows 0..1 of the kernel "
                                       f"store): '{url}/K.digest'")):
        with monkeypatch.context() as m:
            m.setattr(zarr.storage.LocalStore, "get", failing(part))
            with pytest.raises(OSError) as info:
                store.read("K", shape)
        assert str(info.value) == f"[Errno 5] Input/output error ({said}"
    with monkeypatch.context() as m:
        m.setattr(zarr.storage.LocalStore, "get", failing("K/c/1/"))
        with pytest.raises(OSError, match=re.escape(f"(reading block (1, 0) of the kernel "
                                                    f"store): '{url}/K'")):
            store.read_block("K", shape, 1, 0)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(NotADirectoryError) as info:
        KernelStore(str(blocker / "K-1"), store.spec)
    assert str(info.value) == f"[Errno 20] Not a directory (opening the kernel store): " \
        f"'{blocker / 'K-1'}'"
    with pytest.raises(NotADirectoryError, match=re.escape(
            f"(taking the kernel store's lease): '{blocker / 'k.zarr'}'")):
        StoreLease.acquire(str(blocker / "k.zarr"))


def test_a_store_write_failing_on_a_worker_reaches_the_driver_named(executor, tmp_path):
    """A real failure on the worker that writes (in process, and on a Ray worker): the chunk
    folder of the stored kernel is a file, so writing a block's chunk fails (ENOTDIR). The
    driver gets that NotADirectoryError with its errno, naming the chunk in the store, in one
    line, as the command line reports it."""
    import torch
    from conftest import sharded

    from ray_convrfm.backends import KernelSpec
    from ray_convrfm.backends.store import fingerprint, rows_fingerprint
    from ray_convrfm.kernels.kernel import KernelParams

    X = _digits()[0][:128]
    M = np.eye(9, dtype=np.float32)
    fp = rows_fingerprint(X, 64)
    store_spec = StoreSpec(fp, fp, fingerprint(M), 2, 3, False, "float32", 64)
    url, shape = str(tmp_path / "K"), (len(X), len(X))
    KernelStore(url, store_spec).kernel("K", shape)  # the arrays, as the driver makes them
    (tmp_path / "K" / "K" / "c").write_text("in the way of the chunks")
    backend = sharded(executor(X, workers=2, block=64, align=True), X, block=64)
    backend.configure(KernelSpec(KernelParams(depth=2, patch_size=3, padding=False)), None)
    backend.set_metric(torch.from_numpy(M), None)
    with pytest.raises(OSError) as info:
        backend.kernel_via_store(backend.parts(), url, store_spec, "K")
    said = _message(info.value)
    assert re.fullmatch(rf"\[Errno {errno.ENOTDIR}\] Not a directory \(writing block \(\d, \d\) "
                        rf"of the kernel store\): '{re.escape(url)}/K/c/\d'", said), said
    # the worker's own error, of its class and errno, in process and from a Ray worker
    assert type(info.value) is NotADirectoryError and info.value.errno == errno.ENOTDIR
