"""Kernel matrices in zarr stores (v3): blocks that outlive any process.

One group per store; one array per kernel (e.g. ``train_train``, ``test_train``), chunked by the
block size so that one block is one chunk, written by whoever computed it. Beside each kernel
array a boolean ``<name>.done`` array (one chunk per block) records finished blocks: a block's
values are written first and only then marked, so a block marked done is never half-written,
and a rerun computes only the unmarked ones. The group's attributes record exactly what the
kernels are of (a fingerprint of the images and of M, the kernel parameters, dtype, block size
and library version); opening a store made for other inputs is refused, never silently reused.
Nothing is pickled: values are plain arrays and the metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import zarr

from ray_convrfm import __version__

#: Bumped when the layout changes; stores of other layouts are refused.
STORE_FORMAT = 2


class StoreMismatchError(ValueError):
    """The store holds kernels of other inputs (images, M, parameters, dtype or block size)."""


def fingerprint(*arrays, extra: Any = None) -> str:
    """SHA-256 of arrays' dtype, shape and bytes (and any JSON-able ``extra``), as hex."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def open_group(url: str, mode: str = "a") -> zarr.Group:
    """A zarr group at a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://``);
    ``file://`` URLs are opened as local paths, whose folders zarr creates."""
    url = str(url)
    if url.startswith("file://"):
        url = url[len("file://"):]
    return zarr.open_group(url, mode=mode)


def block_digests(X, block: int) -> list[str]:
    """SHA-256 of every ``block`` rows of X: what a worker holding a block-aligned shard sends."""
    X = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
    return [fingerprint(X[r : r + block]) for r in range(0, len(X), block)]


def combine_digests(digests: list[str], row_shape: tuple[int, ...], dtype: str) -> str:
    """The rows fingerprint from ordered block digests (independent of how rows were sharded)."""
    return fingerprint(extra=["rows", list(row_shape), str(dtype), list(digests)])


def rows_fingerprint(X, block: int) -> str:
    """Fingerprint of images X as block digests combined: equal to what shards report."""
    X = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
    return combine_digests(block_digests(X, block), X.shape[1:], X.dtype.str)


@dataclass(frozen=True)
class StoreSpec:
    """What a store's kernels are of; two specs must be equal for a store to be reused."""

    rows_fingerprint: str
    cols_fingerprint: str
    metric_fingerprint: str
    depth: int
    patch_size: int
    padding: bool
    dtype: str
    block: int
    library_version: str = __version__
    format: int = STORE_FORMAT


class KernelStore:
    """A zarr group of block-chunked kernel matrices with a record of finished blocks.

    Parameters
    ----------
    url : a local path or an fsspec URL (``s3://bucket/run/kernels.zarr``)
    spec : what the kernels are of; compared with the store's record when it exists
    mode : "a" (create or reuse) or "r" (read only)
    """

    def __init__(self, url: str, spec: StoreSpec, mode: str = "a"):
        self.url = str(url)
        self.spec = spec
        try:
            self.group = open_group(self.url, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise FileNotFoundError(f"{self.url} is not a ray_convrfm kernel store") from err
        recorded = self.group.attrs.get("spec")
        if recorded is None:
            if mode == "r":
                raise FileNotFoundError(f"{self.url} is not a ray_convrfm kernel store")
            self.group.attrs["spec"] = asdict(spec)
        elif recorded != asdict(spec):
            diff = {k: (recorded.get(k), v) for k, v in asdict(spec).items()
                    if recorded.get(k) != v}
            raise StoreMismatchError(
                f"{self.url} holds kernels of other inputs; differing (store, now): {diff}. "
                "Use another store path, or delete this one to recompute."
            )

    def kernel(self, name: str, shape: tuple[int, int]) -> zarr.Array:
        """The (rows, cols) kernel array ``name``, created on first use (one chunk per block)."""
        b = self.spec.block
        if name in self.group.array_keys():
            arr = self.group[name]
            if tuple(arr.shape) != tuple(shape):
                raise StoreMismatchError(f"{self.url}/{name} has shape {arr.shape}; "
                                         f"expected {shape}")
            return arr
        self.group.create_array(f"{name}.done", shape=_grid(shape, b), chunks=(1, 1),
                                dtype="bool", fill_value=False)
        return self.group.create_array(name, shape=shape, chunks=(b, b),
                                       dtype=self.spec.dtype, fill_value=0)

    def blocks(self, name: str, shape: tuple[int, int]) -> list[tuple[int, int]]:
        """Every block index (i, j) of kernel ``name``."""
        self.kernel(name, shape)
        gi, gj = _grid(shape, self.spec.block)
        return [(i, j) for i in range(gi) for j in range(gj)]

    def missing(self, name: str, shape: tuple[int, int]) -> list[tuple[int, int]]:
        """Blocks of ``name`` not yet marked done (all of them for a new store)."""
        self.kernel(name, shape)
        done = self.group[f"{name}.done"][...]
        return [(int(i), int(j)) for i, j in np.argwhere(~done)]

    def write_block(self, name: str, shape: tuple[int, int], i: int, j: int, values) -> None:
        """Write block (i, j), then mark it done: a marked block is always complete."""
        arr = self.kernel(name, shape)
        b = self.spec.block
        r0, c0 = i * b, j * b
        values = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
        expected = (min(b, shape[0] - r0), min(b, shape[1] - c0))
        if values.shape != expected:
            raise ValueError(f"block ({i}, {j}) of {name} must have shape {expected}; "
                             f"found {values.shape}")
        arr[r0 : r0 + expected[0], c0 : c0 + expected[1]] = values
        self.group[f"{name}.done"][i, j] = True

    def fill(self, name: str, shape: tuple[int, int], blocks: list[tuple[int, int]],
             rows_side, cols_side, kernel_fn) -> int:
        """Compute and write those of ``blocks`` not yet marked; returns how many.

        ``rows_side(r0, r1)`` prepares global rows r0..r1 (once per block row),
        ``cols_side.rows(c0, c1)`` gives the columns, ``kernel_fn(xs, zs)`` the block. The one
        loop that the in-process backend and the Ray workers share.
        """
        b = self.spec.block
        missing = set(self.missing(name, shape))
        todo = [(i, j) for i, j in blocks if (i, j) in missing]
        for i in sorted({i for i, _ in todo}):
            xs = rows_side(i * b, min((i + 1) * b, shape[0]))
            for j in [j for k, j in todo if k == i]:
                block = kernel_fn(xs, cols_side.rows(j * b, (j + 1) * b))
                self.write_block(name, shape, i, j, block)
        return len(todo)

    def read(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """The whole kernel; refuses to return one with blocks still missing."""
        missing = self.missing(name, shape)
        if missing:
            raise ValueError(f"{self.url}/{name} still misses {len(missing)} blocks, "
                             f"e.g. {missing[:3]}")
        return self.kernel(name, shape)[...]


def _grid(shape: tuple[int, int], block: int) -> tuple[int, int]:
    return (-(-shape[0] // block), -(-shape[1] // block))


def open_run_store(url: str, rows_fingerprint: str, params: dict, dtype: str,
                   block: int) -> zarr.Group:
    """The root group of a run's kernel store; refuses a store made for another run.

    A run is its training images, kernel parameters, dtype and block size. Each kernel of the
    run (training images against some columns, with some M) lives in its own sub-store named by
    the fingerprint of those columns and M (``kernel_url``).
    """
    run = {"rows_fingerprint": rows_fingerprint, "params": params, "dtype": dtype,
           "block": block, "format": STORE_FORMAT}
    root = open_group(str(url), mode="a")
    recorded = root.attrs.get("run")
    if recorded is None:
        root.attrs["run"] = run
    elif recorded != json.loads(json.dumps(run)):
        diff = {k: (recorded.get(k), v) for k, v in run.items() if recorded.get(k) != v}
        raise StoreMismatchError(f"{url} is the kernel store of another run; differing "
                                 f"(store, now): {diff}. Use another --store path.")
    return root


def kernel_url(root_url: str, spec: StoreSpec) -> str:
    """Sub-store of one kernel: named by its columns' and metric's fingerprints."""
    key = fingerprint(extra=[spec.cols_fingerprint, spec.metric_fingerprint])[:20]
    return f"{str(root_url).rstrip('/')}/K-{key}"


@dataclass(frozen=True)
class RunStore:
    """A run's kernel store as a backend uses it: the root, the training rows' fingerprint, the
    kernel parameters and block size that every kernel in it shares (both backends)."""

    url: str
    rows_fingerprint: str
    depth: int
    patch_size: int
    padding: bool
    dtype: str
    block: int

    @classmethod
    def open(cls, url: str, rows_fingerprint: str, spec, block: int) -> RunStore:
        """Open (or create) the run's store for a ``KernelSpec``; refuses another run's."""
        p = spec.params
        run = cls(str(url), rows_fingerprint, p.depth, p.patch_size, p.padding, spec.dtype,
                  block)
        open_run_store(run.url, rows_fingerprint, {"depth": p.depth, "patch_size": p.patch_size,
                                                   "padding": p.padding}, spec.dtype, block)
        return run

    def kernel(self, cols_fingerprint: str, M, basis=None) -> tuple[str, StoreSpec]:
        """(url, spec) of the kernel of the training rows against some columns, under M."""
        metric = fingerprint(M, *([] if basis is None else [basis]))
        spec = StoreSpec(rows_fingerprint=self.rows_fingerprint,
                         cols_fingerprint=cols_fingerprint, metric_fingerprint=metric,
                         depth=self.depth, patch_size=self.patch_size, padding=self.padding,
                         dtype=self.dtype, block=self.block)
        return kernel_url(self.url, spec), spec

    def centers_fingerprint(self, center_idx) -> str:
        """The columns' fingerprint of K(train, centers): which training rows are centers."""
        return fingerprint(np.asarray(center_idx), extra=["centers of", self.rows_fingerprint])
