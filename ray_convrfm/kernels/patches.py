"""Patch extraction shared by the kernel, the AGOP and the feature maps (docs/math.md section 1)."""

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
    W (k, C, q, q) equals ``patches @ W.reshape(k, -1).T`` position by position. Built from
    strided views and one copy rather than ``F.unfold``: on CPU with 2 threads, unfold's
    parallel im2col took 1-11 s for what takes 5-10 ms this way (issue 24).
    """
    q = patch_size
    if padding and q // 2:
        X = F.pad(X, (q // 2,) * 4)
    n, C = X.shape[:2]
    windows = X.unfold(2, q, 1).unfold(3, q, 1)  # (n, C, Hp, Wp, q, q), a view
    Hp, Wp = windows.shape[2:4]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(n, Hp * Wp, C * q * q)


def projected_patches(X: torch.Tensor, basis: torch.Tensor, patch_size: int,
                      padding: bool) -> torch.Tensor:
    """``extract_patches(X, q, padding) @ basis``, shape (n, P, r), as one q x q convolution
    with the r basis vectors as filters: no (n, P, d) temporary, which for the 64-channel
    inputs of a Deep ConvRFM layer (d = 576) took nine tenths of a layer's time."""
    C = X.shape[1]
    q = patch_size
    weight = basis.T.reshape(basis.shape[1], C, q, q).to(X.dtype)
    out = F.conv2d(X, weight, padding=q // 2 if padding else 0)
    return out.flatten(2).transpose(1, 2)  # a view of (n, r, P): see ``side_from_patches``


def patch_span(X: torch.Tensor, patch_size: int, padding: bool, rtol: float = 1e-6,
               batch_size: int = 256) -> torch.Tensor | None:
    """Orthonormal basis (d, r) of the span of all patches of X, or None when r = d.

    Patches of features made by a linear convolution (Deep ConvRFM's inputs) span far fewer than
    d = C*q*q dimensions: 64 feature maps of a 3 x 3 filter bank over 1-channel images give
    patches of d = 576 that all lie in a space of at most 25. The kernel and the AGOP only see
    x^T M z with M in that span, so working in r coordinates is exact and r/d as costly.
    Directions whose Gram eigenvalue is below ``rtol`` x the largest are dropped.
    """
    return span_from_gram(patch_gram(X, patch_size, padding, batch_size), rtol, X.dtype)


def patch_gram(X: torch.Tensor, patch_size: int, padding: bool,
               batch_size: int = 256) -> torch.Tensor:
    """Sum of p p^T over every patch p of X, in float64: (d, d); shards' grams add up."""
    d = X.shape[1] * patch_size**2
    gram = torch.zeros(d, d, dtype=torch.float64, device=X.device)
    for b in range(0, X.shape[0], batch_size):
        p = extract_patches(X[b : b + batch_size], patch_size, padding).reshape(-1, d)
        p = p.to(torch.float64)
        gram += p.T @ p
    return gram


def span_from_gram(gram: torch.Tensor, rtol: float = 1e-6,
                   dtype: torch.dtype = torch.float32,
                   energy: float | None = None) -> torch.Tensor | None:
    """``patch_span`` from the patches' Gram matrix (summed over shards by distributed fits).

    ``energy`` in (0, 1): only the fewest leading directions that hold that share of the
    patches' energy (sum of squared coordinates) are kept, as a PCA of the patches keeps its
    leading components: an approximation, not the exact span, for layers whose patches spread
    over many dimensions with most of their energy in a few (a pooled layer's)."""
    vals, vecs = torch.linalg.eigh(gram.to(torch.float64))
    keep = vals > rtol * vals.max().clamp_min(torch.finfo(torch.float64).tiny)
    if energy is not None:
        share = vals.flip(0).clamp_min(0).cumsum(0) / vals.clamp_min(0).sum()
        leading = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype))) + 1
        keep &= torch.arange(len(vals), device=vals.device) >= len(vals) - leading
    if bool(keep.all()):
        return None
    return vecs[:, keep].flip(1).to(dtype)


POOL_MODES = ("avg", "max")
#: What Deep ConvRFM may apply to each filter's map before pooling ("none": the reference's
#: linear bank; "relu": a CNN's rectifier, so the chain of banks is no longer linear).
ACTIVATIONS = ("none", "relu")


def activate(X: torch.Tensor, activation: str) -> torch.Tensor:
    """``X`` through ``activation`` (one of ``ACTIVATIONS``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; found {activation!r}")
    return X if activation == "none" else F.relu(X)


def pool_images(X: torch.Tensor, pool: int, mode: str = "avg") -> torch.Tensor:
    """Non-overlapping ``pool`` x ``pool`` average or max pooling of images (n, C, H, W), the
    last rows and columns that do not fill a window dropped (floor), as a CNN's pooling
    layer: Deep ConvRFM's next layer then sees a coarser image and fewer patch positions."""
    if pool == 1:
        return X
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode must be one of {POOL_MODES}; found {mode!r}")
    return (F.avg_pool2d if mode == "avg" else F.max_pool2d)(X, pool, pool)


def featurise(X: torch.Tensor, filters: torch.Tensor, padding: bool,
              batch_size: int = 256) -> torch.Tensor:
    """Bias-free q x q convolution of every image with ``filters`` (k, C, q, q), in batches.

    This is Deep ConvRFM's feature map (docs/math.md 6): with filters G M^(1/2) the next layer's
    patches carry the metric M learned at this layer. Output dtype and device follow X.
    """
    q = filters.shape[-1]
    pad = q // 2 if padding else 0
    filters = filters.to(device=X.device, dtype=X.dtype)
    return torch.cat([F.conv2d(X[b : b + batch_size], filters, padding=pad)
                      for b in range(0, X.shape[0], batch_size)])
