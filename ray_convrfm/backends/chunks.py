"""How images travel to and become working values on shard workers (docs/architecture.md).

Images rest and travel as stored (8-bit pixels stay ``uint8``): a worker's shard, the blocks
of the Nystrom centers (``CenterBlocks``, object refs left where they were made), held-out and
test images. Whoever uses them converts them (``kernel.as_working``) and applies the chain of
Deep ConvRFM's filter banks (``apply_chain``) one prepared chunk at a time, sized by
``prepared_chunk`` from the memory budget: no process holds a featurised shard, and a
worker's memory is set by its budget, not by n, m or the width of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ray_convrfm.backends.protocol import KernelSpec
from ray_convrfm.kernels.kernel import side_bytes_per_image
from ray_convrfm.kernels.patches import activate, featurise, grid_shape, pool_images
from ray_convrfm.options import PREPARED_SHARE


class Pending:
    """The in-process executor's future: a worker call run when its value is first needed (then
    kept), as a Ray object ref is a call that runs on a worker; ``item`` picks one of several
    returned values."""

    def __init__(self, call, item: int | None = None):
        self._call, self._item, self._done, self._value = call, item, False, None

    def value(self):
        if not self._done:
            self._value, self._done = self._call(), True
            self._call = None
        return self._value if self._item is None else self._value[self._item]

    def part(self, item: int) -> Pending:
        return Pending(self.value, item)


def resolve(part):
    """The value a task was given: an array as is, an in-process ``Pending`` run, image rows
    loaded (``data.rows.ImageRows``: parquet rows are read where they are used) or a Ray object
    ref fetched."""
    from ray_convrfm.data.rows import ImageRows

    if isinstance(part, np.ndarray | torch.Tensor | list | tuple) or part is None:
        return part
    if isinstance(part, Pending):
        return part.value()
    if isinstance(part, ImageRows):
        return part.load()
    import ray

    return ray.get(part)


@dataclass(frozen=True)
class CenterBlocks:
    """The predictor's centers as blocks of at most ``block`` images in their stored pixels,
    each left where it was made (a Ray object ref on the worker that owns those rows, or a
    ``Pending`` call in process) and fetched by whoever needs it one block at a time: no
    process holds every center at once. The user of a block converts it and applies the
    layer's chain (the filter banks of Deep ConvRFM) a prepared chunk at a time. ``key``
    names the selection, so workers recognise blocks they have already prepared."""

    key: str
    parts: tuple
    sizes: tuple[int, ...]
    #: the centers are every training image, in the order of the kernel's columns (the exact
    #: solver's): a worker holding the layer's prepared columns slices them instead
    every_row: bool = False

    @property
    def m(self) -> int:
        return int(sum(self.sizes))

    def bounds(self) -> list[tuple[int, int]]:
        edges = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def columns_key(layer_key: str) -> str:
    """The key of the kernel columns that are every training image, for the layer
    ``layer_key``: workers keep those columns' prepared side under it."""
    return f"parts:{layer_key}:all"


def side_bytes(side) -> int:
    """Bytes of a prepared side's tensors (for the centers' cache budget)."""
    return sum(t.element_size() * t.numel() for t in (side.left, side.right, side.sq, side.rsq)
               if isinstance(t, torch.Tensor))


def torch_dtype(name: str) -> torch.dtype:
    """The working dtype a task names ("float32" or "float64")."""
    return torch.float32 if name == "float32" else torch.float64


@dataclass(frozen=True, eq=False)
class FilterBank:
    """One link of Deep ConvRFM's feature map: a bias-free convolution with ``filters``
    (k, C, q, q), ``padding`` as the kernel's, ``activation`` ("none" or "relu"), then
    ``pool`` x ``pool`` pooling (``mode`` "avg" or "max"; 1: none)."""

    filters: np.ndarray
    padding: bool
    pool: int = 1
    mode: str = "avg"
    activation: str = "none"

    def shape(self, H: int, W: int) -> tuple[int, int]:
        """(H, W) of an image after this link."""
        H, W = grid_shape(H, W, self.filters.shape[-1], self.padding)
        return H // self.pool, W // self.pool


def filter_bank(link) -> FilterBank:
    """A link of a chain as a ``FilterBank`` (a ``(filters, padding)`` pair: no pooling)."""
    if isinstance(link, FilterBank):
        return link
    filters, padding = link
    f = filters.detach().cpu().numpy() if isinstance(filters, torch.Tensor) else filters
    return FilterBank(np.asarray(f), bool(padding))


def apply_chain(Z: torch.Tensor, chain: list) -> torch.Tensor:
    """Images after the filter banks ``chain`` (``FilterBank``s or (filters, padding) pairs)."""
    for link in map(filter_bank, chain):
        Z = featurise(Z, torch.as_tensor(link.filters), link.padding)
        Z = pool_images(activate(Z, link.activation), link.pool, link.mode)
    return Z


def chain_shape(shape: tuple[int, ...], chain: list) -> tuple[int, int, int]:
    """(C, H, W) of images of ``shape`` after the filter banks ``chain``, without computing."""
    C, H, W = (int(s) for s in shape)
    for link in map(filter_bank, chain):
        H, W = link.shape(H, W)
        C = int(link.filters.shape[0])
    return C, H, W


def gram_chunk(shape: tuple[int, ...], patch_size: int, padding: bool, itemsize: int,
               budget_mb: float, share: float | None = None) -> int:
    """Images whose unfolded patches (in the working dtype, and their float64 copy) take at
    most ``share`` of the budget while ``patches.patch_gram`` sums p p^T over them."""
    share = PREPARED_SHARE if share is None else share
    C, H, W = shape
    h, w = grid_shape(H, W, patch_size, padding)
    per = h * w * C * patch_size**2 * (itemsize + 8)
    return max(1, int(budget_mb * 2**20 * share // per))


def prepared_chunk(shape: tuple[int, ...], spec: KernelSpec, basis,
                   share: float | None = None) -> int:
    """Images of (featurised) ``shape`` prepared at once so that their kernel side takes at
    most ``share`` (default ``PREPARED_SHARE``) of ``spec.memory_budget_mb`` (at least one)."""
    share = PREPARED_SHARE if share is None else share
    C, H, W = shape
    d = C * spec.params.patch_size**2
    r = d if basis is None else int(np.shape(basis)[1])
    itemsize = torch.empty(0, dtype=spec.torch_dtype).element_size()
    per = side_bytes_per_image(spec.params.grids(H, W), r, itemsize)
    return max(1, int(spec.memory_budget_mb * 2**20 * share // per))
