"""What the kernel engines share about a batch of images: its prepared ``KernelSide`` and the
snapping of cosines near +-1. Kept apart from ``kernel.py`` so that every engine (torch, numba,
Triton) can import it without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Cosines within this many machine epsilons of +-1 are snapped to +-1 (see ``numba_engine``).
SNAP_ULPS = 8


@dataclass(frozen=True)
class KernelSide:
    """Everything the kernel needs about one batch of images, computed once per batch.

    Attributes
    ----------
    left : (n, P1, r) patches multiplied by M (used when the batch is the left argument);
        ``kernel.side_from_patches`` stores left and right as (n, r, P1) and these are views.
    right : (n, P1, r) raw patches (used when the batch is the right argument); r = d = C*q*q,
        or fewer coordinates in an orthonormal basis of the patches' span (``prepare_side``).
    sq, rsq : (n, P_total) sqrt and safe 1/sqrt of the diagonal covariances s_l(x, x) of every
        layer, concatenated over layers (1/sqrt(0) is taken as 0).
    grids : position grid (H_l, W_l) of every layer.
    channels : C, the number of input channels (the first-layer covariances are divided by it).
    patch_size : q, the window of the kernel's later layers.
    """

    left: torch.Tensor
    right: torch.Tensor
    sq: torch.Tensor
    rsq: torch.Tensor
    grids: tuple[tuple[int, int], ...]
    channels: int
    patch_size: int

    def __len__(self) -> int:
        return self.left.shape[0]

    def rows(self, start: int, stop: int) -> KernelSide:
        """Images start..stop-1 (views, no copy)."""
        return KernelSide(self.left[start:stop], self.right[start:stop], self.sq[start:stop],
                          self.rsq[start:stop], self.grids, self.channels, self.patch_size)

    def take(self, index) -> KernelSide:
        """Images at the given indices (e.g. the AGOP sample)."""
        t = torch.as_tensor(index, device=self.left.device)

        def pick(a: torch.Tensor) -> torch.Tensor:  # keeps the (n, r, P1) storage order
            return a.transpose(1, 2)[t].transpose(1, 2)

        return KernelSide(pick(self.left), pick(self.right), self.sq[t], self.rsq[t],
                          self.grids, self.channels, self.patch_size)


def snap_width(dtype: torch.dtype) -> float:
    return SNAP_ULPS * torch.finfo(dtype).eps
