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
