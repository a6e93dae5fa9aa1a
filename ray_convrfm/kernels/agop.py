"""Patch AGOP of a kernel predictor (docs/math.md section 4): the feature-learning step of ConvRFM.

For f(z) = sum_i coef_i K(x_i, z) (coef: (n, c), one column per class), the gradient with respect
to the raw patch z_p is, by the chain rule through the first-layer patch products,

    grad_{z_p} f_k = M ( sum_i coef_ik dcross_ip x_ip + 2 z_p sum_i coef_ik dself_ip )

where dcross/dself, the derivatives of K w.r.t. the patch products x_p^T M z_p and z_p^T M z_p,
come from the kernel's adjoint (``kernel.kernel_block_adjoint``). Since f is
linear in coef, the training set is processed in chunks whose gradients are summed; the AGOP is a
sum over sample images, so it can be split over sample shards and reduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ray_convrfm.kernels.kernel import KernelSide, bytes_per_pair, kernel_block_adjoint
from ray_convrfm.options import AUTO_SKETCH_CLASSES, DEFAULT_MEMORY_BUDGET_MB


class Workspace:
    """Scratch buffers kept between blocks and calls: fresh multi-MB allocations are page-faulted
    and zeroed by the OS every time, which costs as much as a fifth of an AGOP block."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
        """A contiguous tensor of ``shape`` (uninitialised), backed by a reused buffer."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


def patch_gradients(train: KernelSide, coef: torch.Tensor, sample: KernelSide,
                    engine: str, budget_mb: int,
                    progress: Callable[[int, int], None] | None = None,
                    workspace: Workspace | None = None, total: int = 0) -> torch.Tensor:
    """Patch gradients of every class output before the final M, shape (P1, s, c, d).

    Entry [p, z, k] is r = sum_i coef_ik dcross x_ip + 2 z_p sum_i coef_ik dself, so that
    grad_{z_p} f_k = M r.
    """
    n, c = coef.shape
    s, P1, d = sample.right.shape
    ws = workspace or Workspace()
    dt, dev = coef.dtype, coef.device
    R = ws.get("R", (P1, s, c, d), dt, dev).zero_()
    V = ws.get("V", (s, P1, c), dt, dev).zero_()
    itemsize = coef.element_size()
    # per training image: its derivative pairs plus its (P1, c, d) weighted patches, within a
    # quarter of the budget; sample columns are split too when one image's pairs do not fit
    pair_bytes = bytes_per_pair(train.grids, engine, itemsize, adjoint=True)
    share = budget_mb * 2**20 / 4
    weighted_bytes = P1 * c * d * itemsize
    cols = max(1, min(s, int((share - weighted_bytes) // pair_bytes)))
    rows = max(1, min(n, int(share // (cols * pair_bytes + weighted_bytes))))
    for r in range(0, n, rows):
        xs = train.rows(r, r + rows)
        nb = len(xs)
        cb = coef[r : r + rows]
        # weighted patches (nb, P1, c*d): coef_ik x_ip
        weighted = ws.get("weighted", (nb, P1, c, d), dt, dev)
        torch.mul(cb[:, None, :, None], xs.right[:, :, None, :], out=weighted)
        weighted = weighted.view(nb, P1, c * d).transpose(0, 1)
        for c0 in range(0, s, cols):
            zs = sample.rows(c0, c0 + cols)
            out = None
            if engine == "numba":
                out = ws.get("dcross", (len(zs), P1, nb), xs.left.dtype, xs.left.device)
            _, dcross, vself = kernel_block_adjoint(xs, zs, cb, engine, out=out)
            dcross = dcross.to(dev).transpose(0, 1)  # (P1, cols, nb), strided, no copy
            R[:, c0 : c0 + cols].view(P1, len(zs), c * d).baddbmm_(dcross, weighted)
            V[c0 : c0 + cols] += vself.to(dev)
            if progress is not None:
                progress(nb * len(zs), total or n * s)
    return R.addcmul_(sample.right.transpose(0, 1)[:, :, None, :], V.transpose(0, 1)[..., None],
                      value=2.0)


def agop_from_sides(train: KernelSide, coef: torch.Tensor, sample: KernelSide, M: torch.Tensor,
                    *, engine: str = "torch", budget_mb: int = DEFAULT_MEMORY_BUDGET_MB,
                    progress: Callable[[int, int], None] | None = None, average: bool = True,
                    workspace: Workspace | None = None) -> torch.Tensor:
    """AGOP (d, d) = (1/s) sum_z sum_p sum_k grad_{z_p} f_k grad_{z_p} f_k^T (docs/math.md 4).

    Parameters
    ----------
    train : prepared training images (the predictor's centers), M inside
    coef : (n, c) coefficients of the predictor, already divided by any kernel normaliser
    sample : prepared sample images at which gradients are taken
    M : (d, d) the metric inside the kernel (the chain rule goes through it)
    average : divide by s (False returns the plain sum, for reductions over shards)
    workspace : scratch buffers to reuse across calls (e.g. the iterations of one fit)
    progress : called as progress(pairs done now, total pairs); the caller draws any bar
    """
    return agop_from_blocks(lambda: [(train, coef)], sample, M, coef.shape[1], engine=engine,
                            budget_mb=budget_mb, average=average, workspace=workspace,
                            progress=progress, pairs=len(train) * len(sample))


def agop_from_blocks(blocks: Callable[[], Iterable[tuple[KernelSide, torch.Tensor]]],
                     sample: KernelSide, M: torch.Tensor, classes: int, *,
                     engine: str = "torch", budget_mb: int = DEFAULT_MEMORY_BUDGET_MB,
                     average: bool = True, workspace: Workspace | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     pairs: int = 0) -> torch.Tensor:
    """The one AGOP loop, with the predictor's centers in blocks: ``blocks()`` yields
    (prepared centers, their coef rows) one block at a time, afresh for every chunk of sample
    images. Gradients are linear in the centers, so a chunk's gradients are summed over the
    blocks before the outer product, and no two blocks of centers need be held at once.
    ``progress`` (with the total of ``pairs``) hears of every block's pairs."""
    workspace = workspace or Workspace()
    if len(sample) == 0:
        raise ValueError("the AGOP needs at least one sample image")
    d, s, P1 = M.shape[0], len(sample), sample.right.shape[1]
    G = torch.zeros(d, d, dtype=M.dtype, device=M.device)
    # the gradient buffer and its sum over blocks take at most half of the budget, the
    # weighted patches a quarter (``patch_gradients``)
    chunk = max(1, min(s, int(budget_mb * 2**20 / 4 // (P1 * classes * d * M.element_size()))))
    for start in range(0, s, chunk):
        part = sample.rows(start, start + chunk)
        total, owned = None, False
        for train, coef in blocks():
            if total is not None and not owned:  # the workspace's buffer: the next block
                total, owned = total.clone(), True  # writes it
            r = patch_gradients(train, coef, part, engine, budget_mb, progress, workspace,
                                total=pairs)
            if total is None:
                total = r
            else:
                total.add_(r)
        if total is None:
            continue
        r = total.reshape(-1, d)
        G += r.T @ r
    G = M @ G @ M
    return G / s if average else G


def sketch_columns(classes: int, agop_classes: str | int) -> int | None:
    """How many class columns the AGOP uses: None for all (exact), else k (a sketch)."""
    if agop_classes == "all":
        return None
    if agop_classes == "auto":
        return None if classes <= AUTO_SKETCH_CLASSES else AUTO_SKETCH_CLASSES
    return int(agop_classes)


def class_sketch(classes: int, k: int, generator: torch.Generator,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Omega (classes x k) with E[Omega Omega^T] = I (docs/math.md 4a).

    The AGOP of f is sum_k grad f_k grad f_k^T = J J^T (J: d x c); that of f Omega (the
    predictor with coefficients coef @ Omega, k outputs) is J Omega Omega^T J^T, so an Omega
    with E[Omega Omega^T] = I gives an unbiased AGOP from k outputs instead of c. For k < c the
    entries are N(0, 1/k); for k >= c Omega has orthonormal rows (Omega Omega^T = I exactly,
    so the AGOP is exact), the first c rows of a random k x k orthogonal matrix.
    """
    if k < 1:
        raise ValueError(f"agop_classes must be at least 1; found {k}")
    if k < classes:
        return torch.randn(classes, k, generator=generator, dtype=dtype) / k**0.5
    Q, R = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))[None, :]  # Haar-distributed
    return Q[:classes].to(dtype)


def psd_power(G: torch.Tensor, power: float, floor: float = 0.0) -> torch.Tensor:
    """G^power (float64) through a symmetric eigendecomposition, negative eigenvalues clipped;
    with ``floor``, every eigenvalue of G^power raised to at least floor x the largest."""
    vals, vecs = torch.linalg.eigh(0.5 * (G + G.T).to(torch.float64))
    vals = vals.clamp_min(0) ** power
    if floor > 0:
        vals = vals.clamp_min(floor * vals.max())
    return (vecs * vals) @ vecs.T


def metric_from_agop(G: torch.Tensor, power: float = 1.0, floor: float = 0.0) -> torch.Tensor:
    """M = G^power / ||G^power||_F (docs/math.md section 5), negative eigenvalues clipped to 0.

    The kernel is positively homogeneous in M, so only M's direction matters; the Frobenius
    normalisation keeps its scale fixed from one iteration to the next. ``floor`` raises every
    eigenvalue of G^power to at least ``floor`` times the largest: M = AGOP(M) repeated acts as
    a power iteration whose M can collapse onto one direction, and the floor bounds M's
    condition number by 1 / floor.
    """
    if power <= 0:
        raise ValueError(f"agop_power must be positive; found {power}")
    if not 0 <= floor < 1:
        raise ValueError(f"metric_floor must be in [0, 1); found {floor}")
    P = psd_power(G, power, floor)
    norm = torch.linalg.matrix_norm(P)
    if not norm > 0:
        raise ValueError("the AGOP is zero: the predictor does not depend on its input")
    return (P / norm).to(G.dtype)
