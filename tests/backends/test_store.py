"""The zarr kernel store: blocks written then marked, resumable, refusing foreign inputs."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from ray_convrfm.backends.store import KernelStore, StoreMismatchError, StoreSpec, fingerprint


def _spec(**kw):
    X = np.arange(12, dtype=np.float32).reshape(3, 1, 2, 2)
    base = StoreSpec(rows_fingerprint=fingerprint(X), cols_fingerprint=fingerprint(X),
                     metric_fingerprint=fingerprint(np.eye(9)), depth=3, patch_size=3,
                     padding=False, dtype="float32", block=4)
    return replace(base, **kw)


def test_blocks_are_written_marked_and_read_back(tmp_path):
    store = KernelStore(tmp_path / "k.zarr", _spec())
    shape = (10, 7)
    K = np.random.default_rng(0).random(shape).astype(np.float32)
    assert store.blocks("train", shape) == [(i, j) for i in range(3) for j in range(2)]
    assert len(store.missing("train", shape)) == 6
    for i, j in store.blocks("train", shape):
        store.write_block("train", shape, i, j, K[4 * i : 4 * i + 4, 4 * j : 4 * j + 4])
    assert store.missing("train", shape) == []
    np.testing.assert_array_equal(store.read("train", shape), K)


def test_row_slabs_are_one_chunk_and_one_digest_each(tmp_path):
    """The Nystrom layout: chunks of block rows x every column; a damaged slab is found."""
    import zarr

    store = KernelStore(tmp_path / "k.zarr", _spec(layout="slabs"))
    shape = (10, 7)
    K = np.random.default_rng(1).random(shape).astype(np.float32)
    assert store.chunk(shape) == (4, 7)
    assert store.blocks("K", shape) == [(0, 0), (1, 0), (2, 0)]
    for i, _ in store.blocks("K", shape):
        store.write_block("K", shape, i, 0, K[4 * i : 4 * i + 4])
    np.testing.assert_array_equal(store.read("K", shape, block_rows=(1, 2)), K[4:8])
    group = zarr.open_group(str(tmp_path / "k.zarr"), mode="r")
    assert group["K"].chunks == (4, 7)
    assert "Nystrom centers" in group.attrs["kernels"] and "row slab" in group.attrs["kernels"]
    with pytest.raises(ValueError, match="must have shape"):
        store.write_block("K", shape, 0, 0, K[:4, :4])
    (tmp_path / "k.zarr" / "K" / "c" / "2" / "0").unlink()
    redone = []
    again = store.read("K", shape, recompute=lambda blocks: (redone.extend(blocks), [
        store.write_block("K", shape, i, 0, K[4 * i : 4 * i + 4]) for i, _ in blocks]))
    assert redone == [(2, 0)]
    np.testing.assert_array_equal(again, K)


def test_reopening_resumes_with_only_the_missing_blocks(tmp_path):
    shape = (10, 7)
    first = KernelStore(tmp_path / "k.zarr", _spec())
    first.write_block("train", shape, 0, 0, np.ones((4, 4)))
    first.write_block("train", shape, 2, 1, torch.ones(2, 3))
    # a block whose values landed but whose mark did not (the process died in between)
    first.kernel("train", shape)[4:8, 0:4] = 5.0
    again = KernelStore(str(tmp_path / "k.zarr"), _spec())
    missing = again.missing("train", shape)
    assert (0, 0) not in missing and (2, 1) not in missing and (1, 0) in missing
    assert len(missing) == 4
    with pytest.raises(ValueError, match="misses 4 blocks"):
        again.read("train", shape)


@pytest.mark.parametrize("change", [
    {"metric_fingerprint": fingerprint(2 * np.eye(9))}, {"depth": 2}, {"dtype": "float64"},
    {"block": 8}, {"rows_fingerprint": fingerprint(np.zeros(3))},
])
def test_a_store_of_other_inputs_is_refused(tmp_path, change):
    KernelStore(tmp_path / "k.zarr", _spec())
    with pytest.raises(StoreMismatchError, match="other inputs"):
        KernelStore(tmp_path / "k.zarr", _spec(**change))


def test_bad_blocks_and_shapes_are_refused(tmp_path):
    store = KernelStore(tmp_path / "k.zarr", _spec())
    with pytest.raises(ValueError, match=r"must have shape \(4, 3\)"):
        store.write_block("train", (10, 7), 0, 1, np.ones((4, 4)))
    store.kernel("train", (10, 7))
    with pytest.raises(StoreMismatchError, match="expected"):
        store.kernel("train", (10, 8))
    with pytest.raises(FileNotFoundError, match="not a ray_convrfm kernel store"):
        KernelStore(tmp_path / "empty.zarr", _spec(), mode="r")


def test_fingerprint_sees_values_dtype_and_shape():
    a = np.arange(6, dtype=np.float32)
    assert fingerprint(a) == fingerprint(torch.arange(6, dtype=torch.float32))
    assert fingerprint(a) != fingerprint(a.astype(np.float64))
    assert fingerprint(a) != fingerprint(a.reshape(2, 3))
    b = a.copy()
    b[3] += 1e-3
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a, extra={"depth": 3}) != fingerprint(a, extra={"depth": 2})


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls_hold_stores(tmp_path, scheme):
    """Object-storage URLs go through fsspec (memory:// here); file:// maps to a local path."""
    url = f"memory://{tmp_path.name}/k.zarr" if scheme == "memory" else f"file://{tmp_path}/k.zarr"
    shape = (5, 5)
    KernelStore(url, _spec()).write_block("K", shape, 1, 0, np.full((1, 4), 2.0))
    again = KernelStore(url, _spec())
    assert (1, 0) not in again.missing("K", shape) and len(again.missing("K", shape)) == 3
    with pytest.raises(StoreMismatchError):
        KernelStore(url, _spec(depth=2))


def test_rows_fingerprint_does_not_depend_on_sharding():
    from ray_convrfm.backends.store import block_digests, combine_digests, rows_fingerprint

    X = np.random.default_rng(0).random((10, 1, 3, 3)).astype(np.float32)
    parts = block_digests(X[:4], 2) + block_digests(X[4:], 2)  # two block-aligned shards
    assert combine_digests(parts, X.shape[1:], X.dtype.str) == rows_fingerprint(X, 2)
    assert rows_fingerprint(X, 2) != rows_fingerprint(X, 5)
    assert rows_fingerprint(X, 2) != rows_fingerprint(X[:9], 2)


def test_every_read_checks_blocks_against_their_digests(tmp_path):
    """A deleted chunk, a chunk copied from another block and flipped bytes are never returned
    (a bare zarr read would give NaN or wrong values): refused, or recomputed when offered."""
    import shutil

    from ray_convrfm.backends.store import DamagedBlockError

    shape = (12, 12)
    K = np.random.default_rng(1).random(shape).astype(np.float32)
    store = KernelStore(tmp_path / "k.zarr", _spec())
    for i, j in store.blocks("K", shape):
        store.write_block("K", shape, i, j, K[4 * i : 4 * i + 4, 4 * j : 4 * j + 4])
    chunks = tmp_path / "k.zarr" / "K" / "c"
    (chunks / "0" / "1").unlink()
    shutil.copyfile(chunks / "2" / "2", chunks / "1" / "1")  # same shape, another block
    data = bytearray((chunks / "2" / "0").read_bytes())
    data[len(data) // 2] ^= 1
    (chunks / "2" / "0").write_bytes(bytes(data))
    assert np.isnan(store.kernel("K", shape)[0:4, 4:8]).all()  # never plausible zeros
    with pytest.raises(DamagedBlockError, match=r"k.zarr: kernel K has damaged blocks: "
                       r"\(0, 1\) is missing its chunk; \(1, 1\) does not match its digest.*"
                       r"\(2, 0\) is unreadable"):
        store.read("K", shape)
    asked = []

    def recompute(blocks):
        asked.append(blocks)
        assert store.missing("K", shape) == blocks  # their marks were cleared first
        for i, j in blocks:
            store.write_block("K", shape, i, j, K[4 * i : 4 * i + 4, 4 * j : 4 * j + 4])

    np.testing.assert_array_equal(store.read("K", shape, recompute=recompute), K)
    assert asked == [[(0, 1), (1, 1), (2, 0)]]
    np.testing.assert_array_equal(store.read("K", shape, block_rows=(1, 2)), K[4:8])
    digest = tmp_path / "k.zarr" / "K.digest" / "c" / "1" / "2" / "0"  # block (1, 2)'s digest
    data = bytearray(digest.read_bytes())
    data[5] ^= 1
    digest.write_bytes(bytes(data))
    assert store.missing("K", shape) == [(1, 2)]  # unreadable mark: the block is redone


def test_arrays_created_by_racing_writers_are_opened_not_refused(tmp_path):
    """Writers creating a kernel's arrays at the same moment: none fails (today one gets
    ``ContainsArrayError``), and all see the same arrays."""
    import threading

    for round_ in range(5):
        url = tmp_path / f"k{round_}.zarr"
        KernelStore(url, _spec())  # the group exists; its kernels do not yet
        start, errors = threading.Barrier(6), []

        def create(url=url, start=start, errors=errors):
            store = KernelStore(url, _spec())
            start.wait()
            try:
                store.write_block("K", (8, 8), 0, 0, np.ones((4, 4)))
            except Exception as err:  # any failure is the finding
                errors.append(err)

        threads = [threading.Thread(target=create) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert KernelStore(url, _spec()).missing("K", (8, 8)) == [(0, 1), (1, 0), (1, 1)]


def test_a_store_is_leased_to_one_run_at_a_time(tmp_path):
    """A second opening of a store in use is refused naming the store and holder; closing the
    first gives it back. (Two processes and a holder killed mid-run: test_store_damage.py.)"""
    import os

    from ray_convrfm.backends import KernelSpec
    from ray_convrfm.backends.lease import StoreBusyError
    from ray_convrfm.backends.store import RunStore
    from ray_convrfm.kernels.kernel import KernelParams

    spec = KernelSpec(KernelParams(depth=2, patch_size=3, padding=False))
    url = str(tmp_path / "k.zarr")
    first = RunStore.open(url, "rows", spec, 4)
    with pytest.raises(StoreBusyError, match=rf"{url} is in use by another run \(pid "
                       rf"{os.getpid()} on .* since .*\)"):
        RunStore.open(url, "rows", spec, 4)
    first.close()
    with pytest.raises(StoreMismatchError):  # refused for other inputs: the lease is released
        RunStore.open(url, "other rows", spec, 4)
    RunStore.open(url, "rows", spec, 4).close()
