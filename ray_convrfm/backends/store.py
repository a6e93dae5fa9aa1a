"""Kernel matrices in zarr stores (v3): blocks that outlive any process.

One group per store; one array per kernel (e.g. ``train_train``, ``test_train``), chunked by the
block size so that one block is one chunk, written by whoever computed it, with a crc32c
checksum in its codecs and NaN as fill value (a missing chunk never reads as plausible zeros).
Beside each kernel array a ``<name>.digest`` array (uint8, one 32-byte chunk per block) holds the
SHA-256 of each finished block's values, its (i, j) and the kernel's identity: a block's values
are written first and only then its digest, so a block with a digest is finished, and a rerun
computes only the blocks without one. Every read checks each block against its digest, so a
missing, corrupted or swapped-in chunk is never used: it is recomputed (with a warning naming
it) or refused with ``DamagedBlockError``.

The group's attributes record exactly what the kernels are of (a fingerprint of the images and
of M, the kernel parameters, dtype, block size and library version); opening a store made for
other inputs is refused, never silently reused. A run holds its store's lease (``StoreLease``)
while it fits, so a second run on the same store is refused with ``StoreBusyError``. Nothing
is pickled: values are plain arrays and the metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.errors import ContainsArrayError

from ray_convrfm.backends.lease import StoreLease
from ray_convrfm.backends.store_errors import part_name, store_io
from ray_convrfm.version import __version__

log = logging.getLogger(__name__)

#: Bumped when the layout changes; stores of other layouts are refused.
STORE_FORMAT = 4

#: Bytes of a block digest (SHA-256), kept per block in ``<name>.digest``.
DIGEST_BYTES = 32


#: What a kernel sub-store holds, per layout (recorded in its attributes as "kernels").
KERNEL_LAYOUTS = {
    "blocks": "K(training images, training images) for the exact solver: array 'K', one "
              "chunk per block x block block, its SHA-256 in 'K.digest'",
    "slabs": "K(training images, Nystrom centers) of one iteration: array 'K', one chunk per "
             "row slab (block rows x every center) written by the worker owning those rows, "
             "its SHA-256 in 'K.digest'; read back by the Nystrom solvers and at every "
             "conjugate-gradient step for rows beyond the worker's resident budget",
}


class StoreMismatchError(ValueError):
    """The store holds kernels of other inputs (images, M, parameters, dtype or block size)."""


class DamagedBlockError(ValueError):
    """A stored block is missing, corrupted or not the block its digest names, and no
    recomputation was offered (or the recomputed block read back damaged again)."""


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
    #: "blocks": chunks of block x block (kernels against all training images); "slabs":
    #: chunks of block rows x every column (K(train, centers): one chunk per row slab, the
    #: unit a worker computes, marks and reads back at every conjugate-gradient step)
    layout: str = "blocks"
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
            with store_io(self.url, "opening the kernel store"):
                self.group = open_group(self.url, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise FileNotFoundError(f"{self.url} is not a ray_convrfm kernel store") from err
        recorded = self.group.attrs.get("spec")
        if recorded is None:
            if mode == "r":
                raise FileNotFoundError(f"{self.url} is not a ray_convrfm kernel store")
            with store_io(self.url, "recording what the kernel store holds"):
                self.group.attrs["spec"] = asdict(spec)
                self.group.attrs["kernels"] = KERNEL_LAYOUTS[spec.layout]
        elif recorded != asdict(spec):
            diff = {k: (recorded.get(k), v) for k, v in asdict(spec).items()
                    if recorded.get(k) != v}
            raise StoreMismatchError(
                f"{self.url} holds kernels of other inputs; differing (store, now): {diff}. "
                "Use another store path, or delete this one to recompute."
            )
        self._arrays: dict[str, zarr.Array] = {}
        self._identities: dict[str, bytes] = {}
        #: warnings about damaged blocks met by this instance (workers send them back)
        self.reports: list[str] = []

    def kernel(self, name: str, shape: tuple[int, int]) -> zarr.Array:
        """The (rows, cols) kernel array ``name`` and its digests, created on first use (one
        chunk per block); creation is race-free (an array another writer just made is opened)."""
        chunk = self.chunk(shape)
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._array(name, shape=shape, chunks=chunk, dtype=self.spec.dtype,
                              fill_value=np.nan,
                              compressors=(ZstdCodec(level=0), Crc32cCodec()))
        if tuple(arr.shape) != tuple(shape):
            raise StoreMismatchError(f"{self.url}/{name} has shape {arr.shape}; "
                                     f"expected {shape}")
        if name not in self._arrays:
            grid = (*_grid(shape, chunk), DIGEST_BYTES)
            digests = self._array(f"{name}.digest", shape=grid, chunks=(1, 1, DIGEST_BYTES),
                                  dtype="uint8", fill_value=0, compressors=(Crc32cCodec(),))
            if tuple(digests.shape) != grid:
                raise StoreMismatchError(f"{self.url}/{name}.digest has shape {digests.shape}; "
                                         f"expected {grid}")
            self._arrays[name], self._arrays[f"{name}.digest"] = arr, digests
        return arr

    def chunk(self, shape: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of one block of a kernel of ``shape``: square blocks, or row slabs
        that span every column (``StoreSpec.layout``)."""
        b = self.spec.block
        return (b, max(1, shape[1])) if self.spec.layout == "slabs" else (b, b)

    def _array(self, key: str, **create) -> zarr.Array:
        """Open array ``key``, or create it; another writer creating it first is no error."""
        with self._io(key, "opening the array"):
            try:
                return self.group[key]
            except KeyError:
                pass
            try:
                return self.group.create_array(key, **create)
            except ContainsArrayError:
                return self.group[key]

    def _io(self, name: str, doing: str, *block: int, to: int | None = None):
        """``store_io`` naming array ``name``, ``doing`` and ``block`` (i, j) or rows i..to."""
        part = f" {part_name(self.spec.layout, *block, to=to)}" if block else ""
        return store_io(f"{self.url}/{name}", f"{doing}{part} of the kernel store")

    def _digests(self, name: str, shape: tuple[int, int]) -> zarr.Array:
        self.kernel(name, shape)
        return self._arrays[f"{name}.digest"]

    def marks(self, name: str, shape: tuple[int, int],
              block_rows: tuple[int, int] | None = None) -> np.ndarray:
        """The digests of block rows ``lo..hi`` (all zeros: not finished). A digest chunk that
        fails its checksum counts as unmarked (with a warning): its block is recomputed."""
        digests = self._digests(name, shape)
        lo, hi = (0, digests.shape[0]) if block_rows is None else block_rows
        try:
            with self._io(f"{name}.digest", "reading the digests of", lo, to=hi):
                return digests[lo:hi]
        except OSError:
            raise
        except Exception:
            out = np.zeros((hi - lo, *digests.shape[1:]), dtype=np.uint8)
            for i in range(lo, hi):
                for j in range(digests.shape[1]):
                    try:
                        with self._io(f"{name}.digest", "reading the digest of", i, j):
                            out[i - lo, j] = digests[i, j]
                    except OSError:
                        raise
                    except Exception as err:
                        log.warning("kernel store %s: the digest of block (%d, %d) of kernel "
                                    "%s is unreadable (%s); recomputing the block",
                                    self.url, i, j, name, err)
            return out

    def _identity(self, name: str) -> bytes:
        """What a block's digest binds it to besides (i, j): this store's spec and ``name``."""
        if name not in self._identities:
            self._identities[name] = fingerprint(extra=[asdict(self.spec), name]).encode()
        return self._identities[name]

    def block_digest(self, name: str, i: int, j: int, values: np.ndarray) -> np.ndarray:
        """SHA-256 (32 uint8) of block (i, j) of ``name``: its values, dtype, shape, position
        and the kernel's identity, so neither a flipped byte nor a chunk copied from another
        block or kernel matches."""
        values = np.ascontiguousarray(values)
        h = hashlib.sha256(self._identity(name))
        h.update(f":{i}:{j}:{values.dtype.str}{values.shape}:".encode())
        h.update(values.tobytes())
        return np.frombuffer(h.digest(), dtype=np.uint8)

    def blocks(self, name: str, shape: tuple[int, int]) -> list[tuple[int, int]]:
        """Every block index (i, j) of kernel ``name``."""
        self.kernel(name, shape)
        gi, gj = _grid(shape, self.chunk(shape))
        return [(i, j) for i in range(gi) for j in range(gj)]

    def missing(self, name: str, shape: tuple[int, int]) -> list[tuple[int, int]]:
        """Blocks of ``name`` without a digest yet (all of them for a new store)."""
        done = self.marks(name, shape).any(axis=-1)
        return [(int(i), int(j)) for i, j in np.argwhere(~done)]

    def unmark(self, name: str, shape: tuple[int, int], blocks: list[tuple[int, int]]) -> None:
        """Clear the digests of ``blocks``: they count as missing until written again."""
        digests = self._digests(name, shape)
        for i, j in blocks:
            with self._io(f"{name}.digest", "clearing the digest of", i, j):
                digests[i, j] = 0

    def write_block(self, name: str, shape: tuple[int, int], i: int, j: int, values) -> None:
        """Write block (i, j), then its digest: a block with a digest is always complete."""
        arr = self.kernel(name, shape)
        rb, cb = self.chunk(shape)
        r0, c0 = i * rb, j * cb
        values = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
        expected = (min(rb, shape[0] - r0), min(cb, shape[1] - c0))
        if values.shape != expected:
            raise ValueError(f"block ({i}, {j}) of {name} must have shape {expected}; "
                             f"found {values.shape}")
        values = np.ascontiguousarray(values, dtype=arr.dtype)  # digest what is stored
        digests, digest = self._digests(name, shape), self.block_digest(name, i, j, values)
        with self._io(name, "writing", i, j):
            arr[r0 : r0 + expected[0], c0 : c0 + expected[1]] = values
        with self._io(f"{name}.digest", "writing the digest of", i, j):
            digests[i, j] = digest

    def fill(self, name: str, shape: tuple[int, int], blocks: list[tuple[int, int]],
             rows_side, cols_side, kernel_fn) -> int:
        """Compute and write those of ``blocks`` not yet marked; returns how many.

        ``rows_side(r0, r1)`` prepares global rows r0..r1 (once per block row),
        ``cols_side.rows(c0, c1)`` gives the columns, ``kernel_fn(xs, zs)`` the block. The one
        loop that the in-process backend and the Ray workers share.
        """
        rb, cb = self.chunk(shape)
        missing = set(self.missing(name, shape))
        todo = [(i, j) for i, j in blocks if (i, j) in missing]
        for i in sorted({i for i, _ in todo}):
            xs = rows_side(i * rb, min((i + 1) * rb, shape[0]))
            for j in [j for k, j in todo if k == i]:
                block = kernel_fn(xs, cols_side.rows(j * cb, (j + 1) * cb))
                self.write_block(name, shape, i, j, block)
        return len(todo)

    def read(self, name: str, shape: tuple[int, int],
             recompute: Callable[[list[tuple[int, int]]], Any] | None = None,
             block_rows: tuple[int, int] | None = None) -> np.ndarray:
        """The kernel (or its block rows ``lo..hi``), every block checked against its digest.

        Refuses a kernel with blocks still unmarked. A marked block that is missing, corrupted
        or swapped is never returned: with ``recompute`` its mark is cleared, a warning names
        it, ``recompute(blocks)`` writes it again and it is read back (checked once more);
        without, ``DamagedBlockError``. Only the blocks read are hashed.
        """
        arr = self.kernel(name, shape)
        b = self.chunk(shape)
        gi, gj = _grid(shape, b)
        lo, hi = (0, gi) if block_rows is None else block_rows
        digests = self.marks(name, shape, (lo, hi))
        unmarked = [(lo + int(i), int(j)) for i, j in np.argwhere(~digests.any(axis=-1))]
        if unmarked:
            raise ValueError(f"{self.url}/{name} still misses {len(unmarked)} blocks, "
                             f"e.g. {unmarked[:3]}")
        r0, r1 = lo * b[0], min(hi * b[0], shape[0])
        bad: dict[tuple[int, int], str] = {}
        try:
            with self._io(name, "reading", lo, to=hi):
                K = arr[r0:r1]
        except OSError:  # the store could not be reached: not damage, nothing to recompute
            raise
        except Exception:  # a chunk fails its checksum or cannot be decoded: find which
            K = np.full((r1 - r0, shape[1]), np.nan, dtype=arr.dtype)
            for i in range(lo, hi):
                for j in range(gj):
                    try:
                        with self._io(name, "reading", i, j):
                            K[_slices(i, j, b, shape, r0)] = arr[_slices(i, j, b, shape)]
                    except OSError:
                        raise
                    except Exception as err:
                        bad[(i, j)] = f"is unreadable ({type(err).__name__}: {err})"
        for i in range(lo, hi):
            for j in range(gj):
                if (i, j) in bad:
                    continue
                got = self.block_digest(name, i, j, K[_slices(i, j, b, shape, r0)])
                if not np.array_equal(got, digests[i - lo, j]):
                    bad[(i, j)] = ("is missing its chunk" if not self._chunk_exists(arr, i, j)
                                   else "does not match its digest (corrupted, or another "
                                        "block's chunk)")
        if bad:
            self._recompute(name, shape, bad, recompute)
            for i, j in sorted(bad):
                K[_slices(i, j, b, shape, r0)] = self.read_block(name, shape, i, j)
        return K

    def read_block(self, name: str, shape: tuple[int, int], i: int, j: int) -> np.ndarray:
        """Block (i, j), checked against its digest (``DamagedBlockError`` if it fails)."""
        arr = self.kernel(name, shape)
        expected = self.marks(name, shape, (i, i + 1))[0, j]
        where = f"block ({i}, {j}) of kernel {name} in store {self.url}"
        if not expected.any():
            raise DamagedBlockError(f"{where} is not marked finished")
        try:
            with self._io(name, "reading", i, j):
                values = arr[_slices(i, j, self.chunk(shape), shape)]
        except OSError:
            raise
        except Exception as err:
            raise DamagedBlockError(f"{where} is unreadable: {err}") from err
        if not np.array_equal(self.block_digest(name, i, j, values), expected):
            raise DamagedBlockError(f"{where} does not match its digest; the store is being "
                                    "changed by something else, or its storage is failing")
        return values

    def _recompute(self, name: str, shape: tuple[int, int], bad: dict, recompute) -> None:
        """Warn about each damaged block, clear its mark and have ``recompute`` write it."""
        listed = "; ".join(f"({i}, {j}) {why}" for (i, j), why in sorted(bad.items()))
        if recompute is None:
            raise DamagedBlockError(f"kernel store {self.url}: kernel {name} has damaged "
                                    f"blocks: {listed}. Rerun the fit to recompute them, or "
                                    "delete the store.")
        for (i, j), why in sorted(bad.items()):
            message = (f"kernel store {self.url}: block ({i}, {j}) of kernel {name} {why}; "
                       "recomputing it")
            log.warning(message)
            self.reports.append(message)
        self.unmark(name, shape, list(bad))
        recompute(sorted(bad))

    @staticmethod
    def _chunk_exists(arr: zarr.Array, i: int, j: int) -> bool:
        """Whether block (i, j)'s chunk is in the store (only to word a warning)."""
        try:
            from zarr.core.sync import sync

            key = f"{arr.path}/{arr.metadata.encode_chunk_key((i, j))}".lstrip("/")
            return bool(sync(arr.store.exists(key)))
        except Exception:  # a zarr internal moved: the warning just says less
            return True


def _slices(i: int, j: int, chunk: tuple[int, int], shape: tuple[int, int],
            r0: int = 0) -> tuple[slice, slice]:
    """Where block (i, j) (of ``chunk`` = (rows, cols)) of a kernel of ``shape`` lies, rows
    counted from global row r0."""
    rb, cb = chunk
    rows = slice(i * rb - r0, min((i + 1) * rb, shape[0]) - r0)
    return rows, slice(j * cb, min((j + 1) * cb, shape[1]))


def _grid(shape: tuple[int, int], chunk: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // chunk[0]), -(-shape[1] // chunk[1]))


def open_run_store(url: str, rows_fingerprint: str, params: dict, dtype: str,
                   block: int) -> zarr.Group:
    """The root group of a run's kernel store; refuses a store made for another run.

    A run is its training images, kernel parameters, dtype and block size. Each kernel of the
    run (training images against some columns, with some M) lives in its own sub-store named by
    the fingerprint of those columns and M (``kernel_url``).
    """
    run = {"rows_fingerprint": rows_fingerprint, "params": params, "dtype": dtype,
           "block": block, "format": STORE_FORMAT}
    with store_io(str(url), "opening the kernel store"):
        root = open_group(str(url), mode="a")
    recorded = root.attrs.get("run")
    if recorded is None:
        with store_io(str(url), "recording the run of the kernel store"):
            root.attrs["run"] = run
    elif recorded != json.loads(json.dumps(run)):
        diff = {k: (recorded.get(k), v) for k, v in run.items() if recorded.get(k) != v}
        raise StoreMismatchError(f"{url} is the kernel store of another run; differing "
                                 f"(store, now): {diff}. Pass another store=PATH.")
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
    lease: StoreLease | None = field(default=None, compare=False, repr=False)

    @classmethod
    def open(cls, url: str, rows_fingerprint: str, spec, block: int,
             wait_s: float = 0.0) -> RunStore:
        """Take the store's lease (``StoreBusyError`` while another run holds it), then open
        (or create) the run's store for a ``KernelSpec``; refuses another run's store.
        ``close()`` gives the lease back."""
        p = spec.params
        lease = StoreLease.acquire(str(url), wait_s=wait_s)
        try:
            open_run_store(str(url), rows_fingerprint,
                           {"depth": p.depth, "patch_size": p.patch_size, "padding": p.padding},
                           spec.dtype, block)
        except BaseException:
            lease.release()
            raise
        return cls(str(url), rows_fingerprint, p.depth, p.patch_size, p.padding, spec.dtype,
                   block, lease)

    def close(self) -> None:
        """Release the store's lease (another run may use the store from now on)."""
        if self.lease is not None:
            self.lease.release()

    def kernel(self, cols_fingerprint: str, M, basis=None,
               layout: str = "blocks") -> tuple[str, StoreSpec]:
        """(url, spec) of the kernel of the training rows against some columns, under M
        (``layout`` "slabs" for K(train, centers), see ``StoreSpec``)."""
        metric = fingerprint(M, *([] if basis is None else [basis]))
        spec = StoreSpec(rows_fingerprint=self.rows_fingerprint,
                         cols_fingerprint=cols_fingerprint, metric_fingerprint=metric,
                         depth=self.depth, patch_size=self.patch_size, padding=self.padding,
                         dtype=self.dtype, block=self.block, layout=layout)
        return kernel_url(self.url, spec), spec

    def centers_fingerprint(self, center_idx) -> str:
        """The columns' fingerprint of K(train, centers): which training rows are centers."""
        return fingerprint(np.asarray(center_idx), extra=["centers of", self.rows_fingerprint])
