"""Patch extraction shared by the kernel, the AGOP and the feature maps (spec section 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grid_shape(height: int, width: int, patch_size: int, padding: bool) -> tuple[int, int]:
    """Number of patch positions (Hp, Wp) for stride 1 and optional zero padding q//2."""
    pad = 2 * (patch_size // 2) if padding else 0
    return height + pad - patch_size + 1, width + pad - patch_size + 1


def extract_patches(X: torch.Tensor, patch_size: int, padding: bool) -> torch.Tensor:
    """Patches of every image, shape (n, P, d) with d = C*q*q in (channel, row, column) order.

    The order is exactly ``torch.nn.functional.unfold``'s, so a q x q convolution with filters
    W (k, C, q, q) equals ``patches @ W.reshape(k, -1).T`` position by position.
    """
    pad = patch_size // 2 if padding else 0
    return F.unfold(X, patch_size, padding=pad).transpose(1, 2).contiguous()
