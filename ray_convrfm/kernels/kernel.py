"""The ConvRFM kernel (docs/math.md section 2): a convolutional NTK with a Mahalanobis patch metric.

All the mathematics of the kernel lives here and in its fused CPU twin ``numba_engine.py``:
pure functions of prepared image batches, M and (depth, patch_size, padding); no Ray, no I/O.
The fixed-kernel baseline (CNTK) is this kernel with M = I. The user-facing ``conv_ntk`` (input
checks, dtypes, devices, numpy in / numpy out) lives in ``api.py``. See docs/math.md section 2.

Reference: Beaglehole, Radhakrishnan, Pandit, Belkin, "Mechanism of feature learning in
convolutional neural networks", arXiv 2309.00570 (2023).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ray_convrfm.kernels.patches import extract_patches, grid_shape, projected_patches
from ray_convrfm.kernels.sides import SNAP_ULPS, KernelSide, snap_width  # noqa: F401

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class KernelParams:
    """What defines the kernel besides M: depth, patch size q and zero padding."""

    depth: int = 3
    patch_size: int = 3
    padding: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth must be a positive integer; found {self.depth!r}")
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer; found {self.patch_size!r}")

    def grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """Position grid of every layer; raises if the image is too small for the network."""
        q = self.patch_size
        h, w = grid_shape(height, width, q, self.padding)
        if h < 1 or w < 1:
            raise ValueError(
                f"patch_size {q} is larger than the image ({height} x {width}) "
                f"with padding={self.padding}"
            )
        out = [(h, w)]
        for _ in range(self.depth - 1):
            h, w = h - q + 1, w - q + 1
            if h < 1 or w < 1:
                raise ValueError(
                    f"depth {self.depth} with patch_size {q} needs images of at least "
                    f"{self._min_size()} x {self._min_size()} pixels (padding={self.padding}); "
                    f"found {height} x {width}"
                )
            out.append((h, w))
        return out

    def _min_size(self) -> int:
        q = self.patch_size
        pad = 2 * (q // 2) if self.padding else 0
        return self.depth * (q - 1) + 1 - pad


def safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    """1/sqrt(x) with 0 where x <= 0: a blank patch has zero norm and contributes nothing."""
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).rsqrt(), torch.zeros_like(x))


def window_sum(x: torch.Tensor, q: int) -> torch.Tensor:
    """VALID q x q sum over the last two axes (the "conv q x q" between kernel layers)."""
    h, w = x.shape[-2:]
    rows = x[..., 0 : h - q + 1, :]
    for a in range(1, q):
        rows = rows + x[..., a : h - q + 1 + a, :]
    out = rows[..., 0 : w - q + 1]
    for b in range(1, q):
        out = out + rows[..., b : w - q + 1 + b]
    return out


#: Images projected at once onto a patch basis (bounds the convolution's temporaries).
UNFOLD_BATCH = 256


def prepare_side(X: torch.Tensor, M: torch.Tensor, params: KernelParams,
                 basis: torch.Tensor | None = None) -> KernelSide:
    """Patches, M-transformed patches and per-layer diagonal covariances of a batch of images.

    With ``basis`` (d, r), orthonormal columns spanning the patches, each patch is kept as its r
    coordinates Q^T x_p and ``M`` is the (r, r) metric in those coordinates; x^T (Q M Q^T) z =
    (Q^T x)^T M (Q^T z), so the kernel is unchanged for patches in the span (see
    ``patches.patch_span``). Patches are then projected by a convolution
    (``patches.projected_patches``), never unfolded to (n, P, d).
    """
    n, C, H, W = X.shape
    grids = params.grids(H, W)
    q, pad = params.patch_size, params.padding
    if basis is None:
        right = extract_patches(X, q, pad)
    else:
        right = torch.cat([projected_patches(X[b : b + UNFOLD_BATCH], basis, q, pad)
                           .transpose(1, 2) for b in range(0, n, UNFOLD_BATCH)]).transpose(1, 2)
    return side_from_patches(right, M, params, grids, C)


def side_from_patches(right: torch.Tensor, M: torch.Tensor, params: KernelParams, grids,
                      channels: int) -> KernelSide:
    """``prepare_side`` from patches (n, P1, d); each patch is its own variable (docs/math.md 4)."""
    n = right.shape[0]
    q = params.patch_size
    # stored (n, r, P1), positions last, and exposed as (n, P1, r) views: the fused engines
    # read every coordinate's positions as one contiguous run, so a block needs no transposed
    # copy of its sides (a copy of the columns took 0.25 s of every block of rows at n = 9,000)
    right_t = right.transpose(1, 2).contiguous()
    left_t = torch.matmul(M.T, right_t)
    diag = (left_t * right_t).sum(1) / channels  # s_1(x, x), (n, P1)
    left, right = left_t.transpose(1, 2), right_t.transpose(1, 2)
    h, w = grids[0]
    layer = diag.reshape(n, h, w)
    per_layer = [diag]
    for _ in range(1, params.depth):
        layer = window_sum(layer, q)
        per_layer.append(layer.reshape(n, layer.shape[-2] * layer.shape[-1]))
    diag = torch.cat(per_layer, dim=1).clamp_min(0)
    return KernelSide(left, right, diag.sqrt(), safe_rsqrt(diag), tuple(grids), channels, q)


def _relu_cosine(S: torch.Tensor, rx: torch.Tensor, rz: torch.Tensor, snap: float) -> torch.Tensor:
    c = (S * rx[:, None] * rz[None, :]).clamp_(-1.0, 1.0)
    c = torch.where(c > 1.0 - snap, torch.ones_like(c), c)
    return torch.where(c < -1.0 + snap, -torch.ones_like(c), c)


def _torch_forward(xs: KernelSide, zs: KernelSide, adjoint: bool = False):
    """Vectorised kernel (and optionally adjoint) on any torch device, layout (n, m, H, W)."""
    n, m = len(xs), len(zs)
    q = xs.patch_size
    inv_c = 1.0 / xs.channels
    snap = snap_width(xs.left.dtype)
    S = torch.einsum("ipd,jpd->ijp", xs.left, zs.right) * inv_c
    T = S.clone()
    saved = []
    offsets = np.cumsum([0] + [h * w for h, w in xs.grids])
    depth = len(xs.grids)
    for layer, (h, w) in enumerate(xs.grids):
        sl = slice(int(offsets[layer]), int(offsets[layer + 1]))
        S = S.reshape(n, m, h * w)
        T = T.reshape(n, m, h * w)
        c = _relu_cosine(S, xs.rsq[:, sl], zs.rsq[:, sl], snap)
        k0 = 1.0 - torch.acos(c) / math.pi
        if adjoint:
            saved.append((c, T))
        T = T * k0
        ab = xs.sq[:, None, sl] * zs.sq[None, :, sl]
        S = ab * (torch.sqrt((1.0 - c * c).clamp_min(0)) + math.pi * k0 * c) / math.pi
        if layer < depth - 1:
            S = window_sum(S.reshape(n, m, h, w), q)
            T = window_sum(T.reshape(n, m, h, w), q) + S
    K = S.reshape(n, m, -1).mean(-1) + T.reshape(n, m, -1).mean(-1)
    if not adjoint:
        return K
    return K, _torch_backward(xs, zs, saved, offsets, q, inv_c)


def _window_adjoint(g: torch.Tensor, q: int) -> torch.Tensor:
    """Adjoint of ``window_sum``: a full correlation with a q x q block of ones."""
    n, m, h, w = g.shape
    ones = torch.ones(1, 1, q, q, dtype=g.dtype, device=g.device)
    return F.conv_transpose2d(g.reshape(n * m, 1, h, w), ones).reshape(n, m, h + q - 1, w + q - 1)


def _torch_backward(xs, zs, saved, offsets, q, inv_c):
    n, m = len(xs), len(zs)
    h, w = xs.grids[-1]
    gS = torch.full((n, m, h * w), 1.0 / (h * w), dtype=xs.left.dtype, device=xs.left.device)
    gT = gS.clone()
    gZ = torch.zeros_like(gS)
    for layer in range(len(xs.grids) - 1, -1, -1):
        h, w = xs.grids[layer]
        sl = slice(int(offsets[layer]), int(offsets[layer + 1]))
        c, T_in = saved[layer]
        k0 = 1.0 - torch.acos(c) / math.pi
        sn = torch.sqrt((1.0 - c * c).clamp_min(0))
        k1 = (sn + math.pi * k0 * c) / math.pi
        dk0 = torch.where(c.abs() < 1, 1.0 / (math.pi * sn.clamp_min(1e-30)), torch.zeros_like(c))
        ab = xs.sq[:, None, sl] * zs.sq[None, :, sl]
        rr = xs.rsq[:, None, sl] * zs.rsq[None, :, sl]
        rz2 = (zs.rsq[None, :, sl]) ** 2
        gc = gS * ab * k0 + gT * T_in * dk0
        gZ = gZ + 0.5 * rz2 * (gS * k1 * ab - gc * c)
        gS = gc * rr
        gT = gT * k0
        if layer > 0:
            gS = _window_adjoint((gS + gT).reshape(n, m, h, w), q).reshape(n, m, -1)
            gT = _window_adjoint(gT.reshape(n, m, h, w), q).reshape(n, m, -1)
            gZ = _window_adjoint(gZ.reshape(n, m, h, w), q).reshape(n, m, -1)
    return ((gS + gT) * inv_c).permute(1, 2, 0), (gZ * inv_c).permute(1, 2, 0)  # (m, P1, n)


def _numba_call(xs: KernelSide, zs: KernelSide, adjoint: bool, symmetric: bool = False,
                coef: torch.Tensor | None = None, out: torch.Tensor | None = None,
                tile: int | None = None):
    from ray_convrfm.kernels.numba_engine import WRITE_BLOCK, get_engine

    ft = np.float32 if xs.left.dtype == torch.float32 else np.float64
    forward, adjoint_fn = get_engine(ft)
    heights = np.array([h for h, _ in xs.grids], dtype=np.int64)
    widths = np.array([w for _, w in xs.grids], dtype=np.int64)
    q = xs.patch_size
    # (n, r, P1): no copy of sides made by ``side_from_patches``, which store them so
    left = xs.left.transpose(1, 2).contiguous().numpy()
    right = zs.right.transpose(1, 2).contiguous().numpy()
    args = (left, right, xs.sq.numpy(), xs.rsq.numpy(), zs.sq.numpy(),
            zs.rsq.numpy(), heights, widths, q, ft(1.0 / xs.channels),
            ft(snap_width(xs.left.dtype)))
    n, m = len(xs), len(zs)
    r, P1 = left.shape[1:]
    K = np.empty((n, m), dtype=ft)
    if not adjoint:  # a tile of rows holds their patches
        if tile is None:
            tile = pair_tile(r * P1 * left.itemsize, n, 2 if symmetric else 1)
        forward(*args, symmetric, tile, K)
        return torch.from_numpy(K)
    dcross = torch.empty(m, P1, n, dtype=xs.left.dtype) if out is None else out
    coef = coef.to(xs.left.dtype).contiguous()
    vself = torch.empty(m, P1, coef.shape[1], dtype=xs.left.dtype)
    if tile is None:  # a tile of columns holds their patches and buffered derivative rows
        tile = pair_tile((r + WRITE_BLOCK) * P1 * left.itemsize, m)
    adjoint_fn(*args, tile, K, dcross.numpy(), coef.numpy(), vself.numpy())
    return torch.from_numpy(K), dcross, vself


def pair_tile(image_bytes: int, count: int, parts: int = 1) -> int:
    """Images of one side that a numba thread takes together (``numba_engine``'s tiles): as
    many as fit half of a 1 MiB L2 cache with their prepared patches, at most 16, so the
    other side's patches, read from memory once per tile, serve all of it from cache (8
    against 1: 1.5 x faster for a first layer of 3,000 Fashion-MNIST images, 1.9 x for a
    pooled 64-channel second layer); but small enough that each of numba's threads gets a
    tile (``parts`` tiles make one task: 2 for a symmetric forward). The bits do not depend
    on it."""
    import numba

    share = count // (numba.get_num_threads() * parts)
    return max(1, min(16, 2**19 // max(1, image_bytes), share))


def kernel_block(xs: KernelSide, zs: KernelSide, engine: str = "torch",
                 symmetric: bool = False, tile: int | None = None) -> torch.Tensor:
    """K(x_i, z_j) for one block of image pairs; ``symmetric`` when xs and zs are the same.
    ``tile``: rows a numba thread takes together (None: ``pair_tile``'s choice); the result
    is the same bit for bit whatever it is."""
    if engine == "numba":
        return _numba_call(xs, zs, adjoint=False, symmetric=symmetric, tile=tile)
    if engine == "triton":  # imported here: triton is an optional extra
        from ray_convrfm.kernels.triton_engine import kernel_block_triton

        return kernel_block_triton(xs, zs, symmetric=symmetric)
    return _torch_forward(xs, zs)


def kernel_block_adjoint(xs: KernelSide, zs: KernelSide, coef: torch.Tensor,
                         engine: str = "torch", out: torch.Tensor | None = None):
    """K for a block and what the patch gradients of f = coef^T K(xs, .) at zs need.

    Returns ``K`` (n, m), ``dcross`` (m, P1, n) and ``vself`` (m, P1, c): with the raw (not /C)
    first-layer patch products x_ip^T M z_jp and z_jp^T M z_jp, ``dcross[j, p, i]`` is
    dK(x_i, z_j)/d(x_ip^T M z_jp) and ``vself[j, p, k]`` is sum_i coef_ik dK(x_i, z_j)/d(z_jp^T M
    z_jp). By the chain rule the gradient of f_k w.r.t. the patch z_jp is
    M (sum_i coef_ik dcross[j, p, i] x_ip + 2 vself[j, p, k] z_jp). ``out``: a contiguous
    (m, P1, n) CPU tensor the numba engine fills with dcross instead of allocating one.
    """
    if engine == "numba":
        return _numba_call(xs, zs, adjoint=True, coef=coef, out=out)
    if engine == "triton":
        from ray_convrfm.kernels.triton_engine import kernel_block_adjoint_triton

        return kernel_block_adjoint_triton(xs, zs, coef)
    K, (dcross, dself) = _torch_forward(xs, zs, adjoint=True)
    return K, dcross, dself @ coef.to(dself.dtype)


def bytes_per_pair(grids, engine: str, itemsize: int, adjoint: bool = False) -> int:
    """Working memory per image pair, so block sizes follow the memory budget, not n."""
    p1 = grids[0][0] * grids[0][1]
    if engine == "numba":
        # one output entry (+ the (P1) derivative row when differentiating)
        return itemsize * (1 + (p1 if adjoint else 0))
    if engine == "triton":
        # K (+ the dcross/dself rows); the launch scratch is bounded by triton_engine.plan_launch
        return itemsize * (1 + (2 * p1 if adjoint else 0))
    ptot = sum(h * w for h, w in grids)
    # about eight live (pairs x positions) temporaries, plus two saved per layer for the adjoint
    return itemsize * (8 * p1 + (2 * ptot + 6 * p1 if adjoint else 0))


def block_shape(n: int, m: int, grids, engine: str, itemsize: int, budget_mb: float,
                symmetric: bool = False) -> tuple[int, int]:
    """(rows, cols) of image pairs per block so that its working memory fits the memory budget,
    whatever the image size: square when ``symmetric`` (blocks under the diagonal are skipped
    and diagonal blocks mirrored), else as wide as the columns allow; at least one pair."""
    pairs = max(1, int(budget_mb * 2**20 // bytes_per_pair(grids, engine, itemsize)))
    if symmetric:
        side = max(1, min(n, math.isqrt(pairs)))
        return side, side
    cols = max(1, min(m, pairs))
    return max(1, min(n, pairs // cols)), cols


def as_tensor(X, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Numpy or torch input to a tensor of the working dtype and device (no copy when possible)."""
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(np.ascontiguousarray(X))
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"images must be a numpy array or torch tensor; found {type(X).__name__}")
    return X.to(device=device, dtype=dtype)


def as_working(X, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Stored images to working values: ``uint8`` holds 8-bit pixels and means value / 255
    (what the data loaders give: float32 division, then ``dtype``, so uint8 shards and
    float32 shards of the same pixels give the same kernel bit for bit); anything else is
    ``as_tensor``. Shards keep the data's own dtype and call this per block."""
    if isinstance(X, np.ndarray) and X.dtype == np.uint8:
        X = torch.from_numpy(np.ascontiguousarray(X))
    if isinstance(X, torch.Tensor) and X.dtype == torch.uint8:
        return (X.to(device=device, dtype=torch.float32) / 255.0).to(dtype)
    return as_tensor(X, dtype, device)


def side_bytes_per_image(grids, r: int, itemsize: int) -> int:
    """Bytes one image's prepared ``KernelSide`` takes while it is made: its raw and
    M-transformed patch coordinates (2 r per position) and one more r-coordinate copy in
    flight (the patches before their transpose, or a basis's projections before they are
    joined), and the per-layer diagonals (sqrt and 1/sqrt). A basis projects by a
    convolution, so the d-dimensional patches never exist (counting them made a pooled
    64-channel layer prepare a fifth of the images it could, and its centers over again)."""
    p1 = grids[0][0] * grids[0][1]
    ptot = sum(h * w for h, w in grids)
    return itemsize * (3 * p1 * r + 2 * ptot)


def resolve_M(M, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """M as a symmetric (d, d) tensor; None means the identity (the fixed CNTK baseline).

    M must be finite, symmetric and positive semi-definite within ``checks.check_psd``'s
    relative tolerance (of the coarser of M's own and the working dtype); anything else is
    refused with its smallest eigenvalue, since K_M of an indefinite M is no kernel.
    """
    from ray_convrfm.checks import check_psd, psd_tolerance

    if M is None:
        return torch.eye(d, dtype=dtype, device=device)
    given = M.dtype if isinstance(M, torch.Tensor) else getattr(M, "dtype", None)
    M = as_tensor(M, dtype, device)
    if M.shape != (d, d):
        raise ValueError(f"M must have shape ({d}, {d}) = (C*q*q, C*q*q); found {tuple(M.shape)}")
    if not torch.isfinite(M).all():
        raise ValueError("M contains NaN or inf entries")
    tol = psd_tolerance(dtype, d)
    if given is not None and (isinstance(given, torch.dtype) and given.is_floating_point
                              or isinstance(given, np.dtype) and given.kind == "f"):
        tol = max(tol, psd_tolerance(given, d))
    check_psd(M, "M", tol)
    return 0.5 * (M + M.T)


def kernel_matrix(xs: KernelSide, zs: KernelSide, engine: str, budget_mb: int,
                  symmetric: bool = False, progress: Callable[[int, int], None] | None = None,
                  scale: float = 1.0) -> torch.Tensor:
    """K(xs, zs) in row-and-column blocks sized by the memory budget, divided by ``scale``.

    ``progress(1, n_blocks)`` is called after every block (the caller draws any bar).
    """
    n, m = len(xs), len(zs)
    if n == 0 or m == 0:  # e.g. an empty shard
        return torch.empty(n, m, dtype=xs.left.dtype, device=xs.left.device)
    rows, cols = block_shape(n, m, xs.grids, engine, xs.left.element_size(), budget_mb,
                             symmetric)
    K = torch.empty(n, m, dtype=xs.left.dtype, device=xs.left.device)
    blocks = [(r, c) for r in range(0, n, rows) for c in range(0, m, cols)
              if not (symmetric and c + cols <= r)]
    for r, c in blocks:
        xb, zb = xs.rows(r, r + rows), zs.rows(c, c + cols)
        sym = symmetric and r == c and rows == cols
        K[r : r + rows, c : c + cols] = kernel_block(xb, zb, engine, symmetric=sym) / scale
        if progress is not None:
            progress(1, len(blocks))
    if symmetric:
        upper = torch.triu(K)
        K = upper + torch.triu(K, 1).T
    return K
