"""Fused GPU engine (Triton): the kernel (docs/math.md 2) and its adjoint in one pass per tile.

The eager torch engine makes ~15 full-size passes over (pairs x positions) tensors per layer and
is bound by memory traffic. Here one Triton program owns one image x_i against BLOCK_J images
z_j and runs the first-layer patch products, the ReLU recursion, the q x q window sums and the
final mean without returning to Python. Triton cannot shift register tensors spatially, so each
layer's (S, theta) values of the program's pairs go to a small per-program scratch buffer
(ping-pong, indexed by pair and position) and the next layer reloads shifted windows from it;
on a GPU it stays in L2. The scratch is bounded by the launch (rows x columns of pairs chosen
from the memory budget by ``tile_shape``), never by n. The adjoint records each layer's cosine
and incoming theta in the same way and runs the reverse recursion (the window adjoint is a
gather over the q x q shifts) in the same program.

Semantics are those of ``kernel._torch_forward`` / ``numba_engine``: cosines within
``SNAP_ULPS`` machine epsilons of +-1 are snapped, 1/sqrt(0) = 0 (a blank patch has cosine 0),
d kappa0 / dc = 0 at |c| = 1. arccos is a branch-free Cephes polynomial (as in the numba engine)
plus, in float64, two Newton steps: Triton's libdevice ``acos`` does not run in the CPU
interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ray_convrfm.kernels.sides import KernelSide, snap_width
from ray_convrfm.options import DEFAULT_MEMORY_BUDGET_MB

#: Pairs (columns z_j) per Triton program; one program shares its x_i loads across them.
BLOCK_J = 16
#: Positions processed at once per program (a power of two).
BLOCK_P = 64


# --------------------------------------------------------------------------------------------
# device functions


@triton.jit
def _sqrt(x, IS_F64: tl.constexpr):
    """Correctly rounded sqrt: ``sqrt_rn`` is fp32-only, and fp64 ``sqrt`` is already exact."""
    if IS_F64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _acos(c, PI, HALF_PI, IS_F64: tl.constexpr):
    """arccos without branches: Cephes asinf on [0, 1/2] (~1 ulp fp32), Newton-refined in fp64."""
    ax = tl.abs(c)
    big = ax > 0.5
    z = tl.where(big, 0.5 * (1.0 - ax), c * c)
    s = tl.where(big, _sqrt(z, IS_F64), ax)
    p = ((((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z
          + 7.4953002686e-2) * z + 1.6666752422e-1) * z
    u = s + s * p  # asin(s), s in [0, 1/2]
    if IS_F64:
        # sin(u) = s is well conditioned for s <= 1/2 (cos u >= 0.86): 1e-7 -> 1e-14 -> 1 ulp
        u = u - (tl.sin(u) - s) / tl.cos(u)
        u = u - (tl.sin(u) - s) / tl.cos(u)
    a = 2.0 * u
    near_one = tl.where(c < 0, PI - a, a)
    near_zero = HALF_PI - tl.where(c >= 0, u, -u)
    return tl.where(big, near_one, near_zero)


@triton.jit
def _cosine(S, rx, rz, snap):
    """Clipped, snapped cosine of docs/math.md section 2 (rsq = 0 for blank patches gives 0)."""
    c = S * rx[None, :] * rz
    c = tl.minimum(tl.maximum(c, -1.0), 1.0)
    c = tl.where(c > 1.0 - snap, 1.0, c)
    return tl.where(c < -1.0 + snap, -1.0, c)


@triton.jit
def _load_consts(consts):
    """pi, 1/pi, pi/2, snap width, 1/C in the working dtype (Python floats would be fp32)."""
    PI = tl.load(consts)
    INV_PI = tl.load(consts + 1)
    HALF_PI = tl.load(consts + 2)
    snap = tl.load(consts + 3)
    inv_c = tl.load(consts + 4)
    return PI, INV_PI, HALF_PI, snap, inv_c


@triton.jit
def _conv_ntk_kernel(
    left, right,  # (n, r, P1) M-transformed patches of x; (m, r, P1) raw patches of z
    sqx, rsqx, sqz, rsqz,  # (n, Ptot), (m, Ptot)
    meta,  # int32 (depth, 3): height, width, offset into Ptot of every layer
    consts,  # working dtype: pi, 1/pi, pi/2, snap, 1/C
    kout, stride_kn,  # (n, m) output
    scratch,  # per program: [ping-pong 2][S, T (, gZ)][BLOCK_J][P1]
    saved,  # per program: [cosine, theta in][BLOCK_J][Ptot] (ADJOINT only)
    dcross, stride_dj, stride_dp, stride_di,  # (m, P1, n) outputs (ADJOINT only)
    dself, stride_sj, stride_sp, stride_si,
    m, r, P1, Ptot, depth, q,
    BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, IS_F64: tl.constexpr,
    ADJOINT: tl.constexpr,
):
    i = tl.program_id(0)
    jb = tl.program_id(1)
    slot = (i * tl.num_programs(1) + jb).to(tl.int64)
    PI, INV_PI, HALF_PI, snap, inv_c = _load_consts(consts)

    jj = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = jj < m
    j64 = jj.to(tl.int64)
    offs = tl.arange(0, BLOCK_P)
    rows = tl.arange(0, BLOCK_J).to(tl.int64)[:, None] * P1  # scratch row of each pair
    plane = BLOCK_J * P1
    if ADJOINT:
        buf = scratch + slot * (6 * plane)
    else:
        buf = scratch + slot * (4 * plane)
    sav_c = saved + slot * (2 * BLOCK_J * Ptot)
    sav_t = sav_c + BLOCK_J * Ptot
    srows = tl.arange(0, BLOCK_J).to(tl.int64)[:, None] * Ptot
    x_left = left + i.to(tl.int64) * r * P1
    z_right = right + j64[:, None] * r * P1
    sqx_i = sqx + i.to(tl.int64) * Ptot
    rsqx_i = rsqx + i.to(tl.int64) * Ptot
    sqz_j = sqz + j64[:, None] * Ptot
    rsqz_j = rsqz + j64[:, None] * Ptot

    # ---- forward: layer 0 (first-layer products), then windows + ReLU layer by layer
    tot = tl.zeros([BLOCK_J], dtype=sqx.dtype.element_ty)
    for layer in range(0, depth):
        h = tl.load(meta + 3 * layer)
        w = tl.load(meta + 3 * layer + 1)
        off = tl.load(meta + 3 * layer + 2)
        wp = tl.load(meta + 3 * tl.maximum(layer - 1, 0) + 1)
        src = buf + ((layer + 1) % 2) * (2 * plane)
        dst = buf + (layer % 2) * (2 * plane)
        tot = tl.zeros([BLOCK_J], dtype=sqx.dtype.element_ty)
        for p0 in range(0, h * w, BLOCK_P):
            p = p0 + offs
            pm = p < h * w
            m2 = jmask[:, None] & pm[None, :]
            if layer == 0:
                S = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                for e in range(0, r):
                    a = tl.load(x_left + e * P1 + p, mask=pm, other=0.0)
                    b = tl.load(z_right + e * P1 + p[None, :], mask=m2, other=0.0)
                    S += a[None, :] * b
                S = S * inv_c
                T = S
            else:
                y = p // w
                x = p - y * w
                S = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                Tw = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                for a in range(0, q):
                    for b in range(0, q):
                        idx = rows + ((y + a) * wp + x + b)[None, :]
                        S += tl.load(src + idx, mask=m2, other=0.0)
                        Tw += tl.load(src + plane + idx, mask=m2, other=0.0)
                T = Tw + S
            ax = tl.load(sqx_i + off + p, mask=pm, other=0.0)
            rx = tl.load(rsqx_i + off + p, mask=pm, other=0.0)
            az = tl.load(sqz_j + off + p[None, :], mask=m2, other=0.0)
            rz = tl.load(rsqz_j + off + p[None, :], mask=m2, other=0.0)
            c = _cosine(S, rx, rz, snap)
            k0 = 1.0 - _acos(c, PI, HALF_PI, IS_F64) * INV_PI
            sn = _sqrt(tl.maximum(1.0 - c * c, 0.0), IS_F64)
            if ADJOINT:
                sidx = srows + (off + p)[None, :]
                tl.store(sav_c + sidx, c, mask=m2)
                tl.store(sav_t + sidx, T, mask=m2)
            T = T * k0
            S = ax[None, :] * az * (sn + PI * k0 * c) * INV_PI
            idx = rows + p[None, :]
            tl.store(dst + idx, S, mask=m2)
            tl.store(dst + plane + idx, T, mask=m2)
            tot += tl.sum(tl.where(m2, S + T, 0.0), axis=1)
        tl.debug_barrier()
    h = tl.load(meta + 3 * (depth - 1))
    w = tl.load(meta + 3 * (depth - 1) + 1)
    tl.store(kout + i.to(tl.int64) * stride_kn + jj, tot / (h * w).to(tot.dtype), mask=jmask)

    if ADJOINT:
        # ---- reverse recursion; per program [ping-pong 2][gS, gT, gZ][BLOCK_J][P1] after the
        # forward's ping-pong buffers. Stored gS already holds gT (T_l = W(T') + S_l).
        gbuf = buf + 0  # the forward's S/T values are no longer needed
        for k in range(0, depth):
            layer = depth - 1 - k
            h = tl.load(meta + 3 * layer)
            w = tl.load(meta + 3 * layer + 1)
            off = tl.load(meta + 3 * layer + 2)
            hn = tl.load(meta + 3 * tl.minimum(layer + 1, depth - 1))
            wn = tl.load(meta + 3 * tl.minimum(layer + 1, depth - 1) + 1)
            gsrc = gbuf + ((layer + 1) % 2) * (3 * plane)
            gdst = gbuf + (layer % 2) * (3 * plane)
            for p0 in range(0, h * w, BLOCK_P):
                p = p0 + offs
                pm = p < h * w
                m2 = jmask[:, None] & pm[None, :]
                if layer == depth - 1:
                    g0 = tl.where(m2, 1.0, 0.0).to(sqx.dtype.element_ty) / (h * w).to(
                        sqx.dtype.element_ty)
                    gS = g0
                    gT = g0
                    gZ = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                else:
                    # window adjoint: input position (y, x) collects outputs (y - a, x - b)
                    y = p // w
                    x = p - y * w
                    gS = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                    gT = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                    gZ = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                    for a in range(0, q):
                        for b in range(0, q):
                            yo = y - a
                            xo = x - b
                            ok = pm & (yo >= 0) & (yo < hn) & (xo >= 0) & (xo < wn)
                            mk = jmask[:, None] & ok[None, :]
                            idx = rows + (yo * wn + xo)[None, :]
                            gS += tl.load(gsrc + idx, mask=mk, other=0.0)
                            gT += tl.load(gsrc + plane + idx, mask=mk, other=0.0)
                            gZ += tl.load(gsrc + 2 * plane + idx, mask=mk, other=0.0)
                ax = tl.load(sqx_i + off + p, mask=pm, other=0.0)
                rx = tl.load(rsqx_i + off + p, mask=pm, other=0.0)
                az = tl.load(sqz_j + off + p[None, :], mask=m2, other=0.0)
                rz = tl.load(rsqz_j + off + p[None, :], mask=m2, other=0.0)
                sidx = srows + (off + p)[None, :]
                c = tl.load(sav_c + sidx, mask=m2, other=0.0)
                t_in = tl.load(sav_t + sidx, mask=m2, other=0.0)
                k0 = 1.0 - _acos(c, PI, HALF_PI, IS_F64) * INV_PI
                sn = _sqrt(tl.maximum(1.0 - c * c, 0.0), IS_F64)
                k1 = (sn + PI * k0 * c) * INV_PI
                # d kappa0 / dc = 1 / (pi sqrt(1 - c^2)); 0 at the kink |c| = 1
                dk0 = tl.where(sn > 0, INV_PI / tl.where(sn > 0, sn, 1.0), 0.0)
                ab = ax[None, :] * az
                gc = gS * ab * k0 + gT * t_in * dk0
                gZ = gZ + 0.5 * (rz * rz) * (gS * k1 * ab - gc * c)
                gT = gT * k0
                gS = gc * rx[None, :] * rz + gT
                if layer > 0:
                    idx = rows + p[None, :]
                    tl.store(gdst + idx, gS, mask=m2)
                    tl.store(gdst + plane + idx, gT, mask=m2)
                    tl.store(gdst + 2 * plane + idx, gZ, mask=m2)
                else:
                    pcol = p.to(tl.int64)[None, :]
                    irow = i.to(tl.int64)
                    tl.store(dcross + j64[:, None] * stride_dj + pcol * stride_dp
                             + irow * stride_di, gS * inv_c, mask=m2)
                    tl.store(dself + j64[:, None] * stride_sj + pcol * stride_sp
                             + irow * stride_si, gZ * inv_c, mask=m2)
            tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# host side


def bytes_per_pair(grids, itemsize: int, adjoint: bool = False) -> int:
    """Scratch (and adjoint outputs) per image pair of a launch: 4 P1 values for the forward's
    ping-pong (S, theta); the adjoint adds 6 P1 gradients (sharing the forward's 4), the saved
    cosine and theta of every layer (2 P_total) and its dcross / dself rows (2 P1)."""
    p1 = grids[0][0] * grids[0][1]
    ptot = sum(h * w for h, w in grids)
    return itemsize * (4 * p1 + (2 * p1 + 2 * ptot + 2 * p1 if adjoint else 0))


def tile_shape(n: int, m: int, grids, itemsize: int, budget_mb: float | None = None,
               adjoint: bool = False) -> tuple[int, int]:
    """(rows, columns) of image pairs per launch so that its working memory fits the budget.

    The one place that sizes Triton launches: columns are whole multiples of BLOCK_J (at least
    one block), rows fill the rest of the budget (at least one).
    """
    budget = (DEFAULT_MEMORY_BUDGET_MB if budget_mb is None else budget_mb) * 2**20
    pairs = max(1, int(budget // bytes_per_pair(grids, itemsize, adjoint)))
    cols = min(m, max(BLOCK_J, pairs // BLOCK_J * BLOCK_J))
    rows = min(n, max(1, pairs // max(cols, 1)))
    return rows, cols


def launch_config(grids, device: torch.device) -> dict:
    """num_warps for a shape class: small grids do not fill more than a couple of warps."""
    p1 = grids[0][0] * grids[0][1]
    return {"num_warps": 4 if p1 >= 256 else 2}


def _consts(xs: KernelSide) -> torch.Tensor:
    dt = xs.left.dtype
    vals = [math.pi, 1.0 / math.pi, 0.5 * math.pi, snap_width(dt), 1.0 / xs.channels]
    return torch.tensor(vals, dtype=dt, device=xs.left.device)


def _meta(grids, device) -> torch.Tensor:
    rows, off = [], 0
    for h, w in grids:
        rows.append([h, w, off])
        off += h * w
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _check(xs: KernelSide, zs: KernelSide) -> None:
    if xs.left.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"triton engine supports float32 and float64; found {xs.left.dtype}")
    if xs.left.dtype != zs.right.dtype or tuple(xs.grids) != tuple(zs.grids):
        raise ValueError("both kernel sides must share dtype and grids")


def _launch(xs: KernelSide, zs: KernelSide, adjoint: bool, budget_mb: float | None,
            symmetric: bool = False):
    """Run the fused kernel over launches sized by ``tile_shape``; returns K (and dcross, dself)."""
    _check(xs, zs)
    n, m = len(xs), len(zs)
    dt, dev = xs.left.dtype, xs.left.device
    grids = tuple(xs.grids)
    P1 = grids[0][0] * grids[0][1]
    Ptot = sum(h * w for h, w in grids)
    r = xs.left.shape[2]
    K = torch.empty(n, m, dtype=dt, device=dev)
    dcross = torch.empty(m, P1, n, dtype=dt, device=dev) if adjoint else None
    dself = torch.empty(m, P1, n, dtype=dt, device=dev) if adjoint else None
    if n == 0 or m == 0:
        return (K, dcross, dself) if adjoint else K
    itemsize = xs.left.element_size()
    rows, cols = tile_shape(n, m, grids, itemsize, budget_mb, adjoint)
    # (n, r, P1): positions contiguous, so a program's loads over positions coalesce
    left = xs.left.transpose(1, 2).contiguous()
    right = zs.right.transpose(1, 2).contiguous()
    sqx, rsqx = xs.sq.contiguous(), xs.rsq.contiguous()
    sqz, rsqz = zs.sq.contiguous(), zs.rsq.contiguous()
    meta, consts = _meta(grids, dev), _consts(xs)
    nb_max = triton.cdiv(cols, BLOCK_J)
    scratch_per = (6 if adjoint else 4) * BLOCK_J * P1
    scratch = torch.empty(rows * nb_max * scratch_per, dtype=dt, device=dev)
    saved = torch.empty(rows * nb_max * 2 * BLOCK_J * Ptot if adjoint else 1, dtype=dt,
                        device=dev)
    dummy = torch.empty(1, dtype=dt, device=dev)
    cfg = launch_config(grids, dev)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        # symmetric: only columns j >= r0 are needed for rows r0..r1-1 (mirrored below)
        for c0 in range(r0 if symmetric else 0, m, cols):
            c1 = min(m, c0 + cols)
            kv = K[r0:r1, c0:c1]
            if adjoint:
                dc = dcross[c0:c1, :, r0:r1]
                ds = dself[c0:c1, :, r0:r1]
                dargs = (dc, *dc.stride(), ds, *ds.stride())
            else:
                dargs = (dummy, 0, 0, 0, dummy, 0, 0, 0)
            grid = (r1 - r0, triton.cdiv(c1 - c0, BLOCK_J))
            _conv_ntk_kernel[grid](
                left[r0:r1], right[c0:c1], sqx[r0:r1], rsqx[r0:r1], sqz[c0:c1], rsqz[c0:c1],
                meta, consts, kv, kv.stride(0), scratch, saved, *dargs,
                c1 - c0, r, P1, Ptot, len(grids), xs.patch_size,
                BLOCK_J=BLOCK_J, BLOCK_P=BLOCK_P, IS_F64=dt == torch.float64, ADJOINT=adjoint,
                **cfg,
            )
    if symmetric:
        K = torch.triu(K) + torch.triu(K, 1).T
    return (K, dcross, dself) if adjoint else K


def kernel_block_triton(xs: KernelSide, zs: KernelSide, symmetric: bool = False,
                        budget_mb: float | None = None) -> torch.Tensor:
    """K(x_i, z_j) (n, m) for one block; ``symmetric`` when xs and zs are the same images."""
    return _launch(xs, zs, adjoint=False, budget_mb=budget_mb,
                   symmetric=symmetric and len(xs) == len(zs))


def kernel_block_adjoint_triton(xs: KernelSide, zs: KernelSide, coef: torch.Tensor,
                                budget_mb: float | None = None):
    """(K, dcross (m, P1, n), vself (m, P1, c)) as ``kernel.kernel_block_adjoint`` returns them.

    dself (m, P1, n) is written by the kernel and contracted with ``coef`` by one batched
    matrix product (tensor cores on a GPU) rather than by atomics inside the kernel.
    """
    K, dcross, dself = _launch(xs, zs, adjoint=True, budget_mb=budget_mb)
    return K, dcross, dself @ coef.to(device=dself.device, dtype=dself.dtype)
