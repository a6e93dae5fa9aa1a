"""Fused GPU engine (Triton): the kernel (docs/math.md 2) and its adjoint in one pass per tile.

The eager torch engine makes ~15 full-size passes over (pairs x positions) tensors per layer and
is bound by memory traffic. Here one Triton program owns one image x_i against BLOCK_J images
z_j and one tile of the last layer's positions, and runs the first-layer patch products, the
ReLU recursion, the q x q window sums and the tile's share of the final mean without returning
to Python. A tile's region in layer l is the tile plus the (depth - 1 - l)(q - 1) halo the later
windows need (valid windows keep the origin), recomputed by every tile that needs it, so a
program's working memory is set by the tile, never by the image size (``plan_launch``: the tile
from the device's L2 per SM, rows and columns of pairs from the memory budget). Triton cannot
shift register tensors spatially, so each layer's (S, theta) values of the program's pairs go to
a small per-program scratch buffer (ping-pong, indexed by pair and local position) and the next
layer reloads shifted windows from it; on a GPU it stays in L2. Tiles write partial sums that
the host adds. The adjoint records each layer's cosine and incoming theta in the same way and
runs the reverse recursion (the window adjoint is a gather over the q x q shifts) in the same
program; overlapping halos add into the same first-layer derivatives, so its tiles are launched
in classes whose regions cannot overlap. The launch configuration (positions per step, warps)
is the fastest of ``CONFIGS`` per shape class, timed once per process on CUDA.

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
from ray_convrfm.kernels.triton_plan import (
    BLOCK_J,
    _colours,
    _cuda_timer,
    _planes,
    _region_sizes,
    plan_launch,
    tuned_config,
)

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
def _region(meta, layer, depth, q, ty, tx, TH, TW):
    """Layer ``layer``'s part of a position tile: its grid (h, w), its offset into P_total and
    into a program's saved values, the tile's origin there and its extent with the halo the
    later layers' q x q windows need, clipped to the grid. Valid windows keep the origin."""
    h = tl.load(meta + 4 * layer)
    w = tl.load(meta + 4 * layer + 1)
    off = tl.load(meta + 4 * layer + 2)
    roff = tl.load(meta + 4 * layer + 3)
    halo = (depth - 1 - layer) * (q - 1)
    y0 = ty * TH
    x0 = tx * TW
    rh = tl.minimum(TH + halo, h - y0)
    rw = tl.minimum(TW + halo, w - x0)
    return h, w, off, roff, y0, x0, rh, rw


@triton.jit
def _conv_ntk_kernel(
    left, right,  # (n, r, P1) M-transformed patches of x; (m, r, P1) raw patches of z
    sqx, rsqx, sqz, rsqz,  # (n, Ptot), (m, Ptot)
    meta,  # int32 (depth, 4): height, width, offset into Ptot, offset into a tile's saved values
    consts,  # working dtype: pi, 1/pi, pi/2, snap, 1/C
    kout, stride_kt, stride_kn,  # (tiles, n, m) partial sums of the final mean, one per tile
    scratch,  # per program: [ping-pong 2][S, T (, gZ)][BLOCK_J][R]
    saved,  # per program: [cosine, theta in][BLOCK_J][Rtot] (ADJOINT only)
    dcross, stride_dj, stride_dp, stride_di,  # (m, P1, n) outputs, accumulated (ADJOINT only)
    dself, stride_sj, stride_sp, stride_si,
    m, r, P1, Ptot, depth, q,
    TH, TW, R, Rtot,  # position tile (last layer), region and saved sizes per pair
    cy, cx, step_y, step_x, ntx,  # this launch's tiles: (cy + step_y a, cx + step_x b)
    tiles_x,  # tiles per row of the grid: tile (ty, tx) writes partial ty * tiles_x + tx
    BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, IS_F64: tl.constexpr,
    ADJOINT: tl.constexpr,
):
    i = tl.program_id(0)
    jb = tl.program_id(1)
    t = tl.program_id(2)
    ty = cy + step_y * (t // ntx)
    tx = cx + step_x * (t % ntx)
    slot = ((i * tl.num_programs(1) + jb) * tl.num_programs(2) + t).to(tl.int64)
    PI, INV_PI, HALF_PI, snap, inv_c = _load_consts(consts)

    jj = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = jj < m
    j64 = jj.to(tl.int64)
    offs = tl.arange(0, BLOCK_P)
    rows = tl.arange(0, BLOCK_J).to(tl.int64)[:, None] * R  # scratch row of each pair
    plane = BLOCK_J * R
    if ADJOINT:
        buf = scratch + slot * (6 * plane)
    else:
        buf = scratch + slot * (4 * plane)
    sav_c = saved + slot * (2 * BLOCK_J * Rtot)
    sav_t = sav_c + BLOCK_J * Rtot
    srows = tl.arange(0, BLOCK_J).to(tl.int64)[:, None] * Rtot
    x_left = left + i.to(tl.int64) * r * P1
    z_right = right + j64[:, None] * r * P1
    sqx_i = sqx + i.to(tl.int64) * Ptot
    rsqx_i = rsqx + i.to(tl.int64) * Ptot
    sqz_j = sqz + j64[:, None] * Ptot
    rsqz_j = rsqz + j64[:, None] * Ptot

    # ---- forward over the tile's region of every layer: layer 0 (first-layer products), then
    # windows + ReLU layer by layer; scratch holds a layer's region in local coordinates
    tot = tl.zeros([BLOCK_J], dtype=sqx.dtype.element_ty)
    rw_prev = tl.load(meta + 1)  # a loop-carried int32, set by every layer before it is read
    for layer in range(0, depth):
        h, w, off, roff, y0, x0, rh, rw = _region(meta, layer, depth, q, ty, tx, TH, TW)
        src = buf + ((layer + 1) % 2) * (2 * plane)
        dst = buf + (layer % 2) * (2 * plane)
        tot = tl.zeros([BLOCK_J], dtype=sqx.dtype.element_ty)
        for k0 in range(0, rh * rw, BLOCK_P):
            k = k0 + offs
            km = k < rh * rw
            ly = k // rw
            lx = k - ly * rw
            p = (y0 + ly) * w + x0 + lx  # position in the layer's grid
            m2 = jmask[:, None] & km[None, :]
            if layer == 0:
                S = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                for e in range(0, r):
                    a = tl.load(x_left + e * P1 + p, mask=km, other=0.0)
                    b = tl.load(z_right + e * P1 + p[None, :], mask=m2, other=0.0)
                    S += a[None, :] * b
                S = S * inv_c
                T = S
            else:
                S = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                Tw = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                for a in range(0, q):
                    for b in range(0, q):
                        idx = rows + ((ly + a) * rw_prev + lx + b)[None, :]
                        S += tl.load(src + idx, mask=m2, other=0.0)
                        Tw += tl.load(src + plane + idx, mask=m2, other=0.0)
                T = Tw + S
            ax = tl.load(sqx_i + off + p, mask=km, other=0.0)
            rx = tl.load(rsqx_i + off + p, mask=km, other=0.0)
            az = tl.load(sqz_j + off + p[None, :], mask=m2, other=0.0)
            rz = tl.load(rsqz_j + off + p[None, :], mask=m2, other=0.0)
            c = _cosine(S, rx, rz, snap)
            kap0 = 1.0 - _acos(c, PI, HALF_PI, IS_F64) * INV_PI
            sn = _sqrt(tl.maximum(1.0 - c * c, 0.0), IS_F64)
            if ADJOINT:
                sidx = srows + (roff + k)[None, :]
                tl.store(sav_c + sidx, c, mask=m2)
                tl.store(sav_t + sidx, T, mask=m2)
            T = T * kap0
            S = ax[None, :] * az * (sn + PI * kap0 * c) * INV_PI
            idx = rows + k[None, :]
            tl.store(dst + idx, S, mask=m2)
            tl.store(dst + plane + idx, T, mask=m2)
            tot += tl.sum(tl.where(m2, S + T, 0.0), axis=1)
        rw_prev = rw
        tl.debug_barrier()
    h = tl.load(meta + 4 * (depth - 1))
    w = tl.load(meta + 4 * (depth - 1) + 1)
    tile = (ty * tiles_x + tx).to(tl.int64)
    tl.store(kout + tile * stride_kt + i.to(tl.int64) * stride_kn + jj,
             tot / (h * w).to(tot.dtype), mask=jmask)

    if ADJOINT:
        # ---- reverse recursion over the same regions; per program [ping-pong 2][gS, gT, gZ]
        # [BLOCK_J][R] reusing the forward's buffers. Stored gS already holds gT (T_l = W(T') +
        # S_l). Tiles of one launch never share a first-layer position (``_colours``), so the
        # outputs are accumulated by plain loads and stores.
        gbuf = buf + 0
        rh_next = tl.load(meta)  # loop-carried int32s, set by every layer before they are read
        rw_next = tl.load(meta + 1)
        for kk in range(0, depth):
            layer = depth - 1 - kk
            h, w, off, roff, y0, x0, rh, rw = _region(meta, layer, depth, q, ty, tx, TH, TW)
            hl = tl.load(meta + 4 * (depth - 1))
            wl = tl.load(meta + 4 * (depth - 1) + 1)
            gsrc = gbuf + ((layer + 1) % 2) * (3 * plane)
            gdst = gbuf + (layer % 2) * (3 * plane)
            for k0 in range(0, rh * rw, BLOCK_P):
                k = k0 + offs
                km = k < rh * rw
                ly = k // rw
                lx = k - ly * rw
                p = (y0 + ly) * w + x0 + lx
                m2 = jmask[:, None] & km[None, :]
                if layer == depth - 1:
                    g0 = tl.where(m2, 1.0, 0.0).to(sqx.dtype.element_ty) / (hl * wl).to(
                        sqx.dtype.element_ty)
                    gS = g0
                    gT = g0
                    gZ = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                else:
                    # window adjoint: input position (y, x) collects outputs (y - a, x - b)
                    gS = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                    gT = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                    gZ = tl.zeros([BLOCK_J, BLOCK_P], dtype=sqx.dtype.element_ty)
                    for a in range(0, q):
                        for b in range(0, q):
                            yo = ly - a
                            xo = lx - b
                            ok = km & (yo >= 0) & (yo < rh_next) & (xo >= 0) & (xo < rw_next)
                            mk = jmask[:, None] & ok[None, :]
                            idx = rows + (yo * rw_next + xo)[None, :]
                            gS += tl.load(gsrc + idx, mask=mk, other=0.0)
                            gT += tl.load(gsrc + plane + idx, mask=mk, other=0.0)
                            gZ += tl.load(gsrc + 2 * plane + idx, mask=mk, other=0.0)
                ax = tl.load(sqx_i + off + p, mask=km, other=0.0)
                rx = tl.load(rsqx_i + off + p, mask=km, other=0.0)
                az = tl.load(sqz_j + off + p[None, :], mask=m2, other=0.0)
                rz = tl.load(rsqz_j + off + p[None, :], mask=m2, other=0.0)
                sidx = srows + (roff + k)[None, :]
                c = tl.load(sav_c + sidx, mask=m2, other=0.0)
                t_in = tl.load(sav_t + sidx, mask=m2, other=0.0)
                kap0 = 1.0 - _acos(c, PI, HALF_PI, IS_F64) * INV_PI
                sn = _sqrt(tl.maximum(1.0 - c * c, 0.0), IS_F64)
                k1 = (sn + PI * kap0 * c) * INV_PI
                # d kappa0 / dc = 1 / (pi sqrt(1 - c^2)); 0 at the kink |c| = 1
                dk0 = tl.where(sn > 0, INV_PI / tl.where(sn > 0, sn, 1.0), 0.0)
                ab = ax[None, :] * az
                gc = gS * ab * kap0 + gT * t_in * dk0
                gZ = gZ + 0.5 * (rz * rz) * (gS * k1 * ab - gc * c)
                gT = gT * kap0
                gS = gc * rx[None, :] * rz + gT
                if layer > 0:
                    idx = rows + k[None, :]
                    tl.store(gdst + idx, gS, mask=m2)
                    tl.store(gdst + plane + idx, gT, mask=m2)
                    tl.store(gdst + 2 * plane + idx, gZ, mask=m2)
                else:
                    pcol = p.to(tl.int64)[None, :]
                    irow = i.to(tl.int64)
                    dptr = dcross + j64[:, None] * stride_dj + pcol * stride_dp + irow * stride_di
                    sptr = dself + j64[:, None] * stride_sj + pcol * stride_sp + irow * stride_si
                    tl.store(dptr, tl.load(dptr, mask=m2, other=0.0) + gS * inv_c, mask=m2)
                    tl.store(sptr, tl.load(sptr, mask=m2, other=0.0) + gZ * inv_c, mask=m2)
            rh_next = rh
            rw_next = rw
            tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# host side


def _consts(xs: KernelSide) -> torch.Tensor:
    dt = xs.left.dtype
    vals = [math.pi, 1.0 / math.pi, 0.5 * math.pi, snap_width(dt), 1.0 / xs.channels]
    return torch.tensor(vals, dtype=dt, device=xs.left.device)


def _meta(grids, q: int, tile: tuple[int, int], device) -> torch.Tensor:
    """int32 (depth, 4): each layer's grid, its offset into P_total and into a tile's saved
    values."""
    rows, off, roff = [], 0, 0
    for (h, w), size in zip(grids, _region_sizes(grids, q, tile), strict=True):
        rows.append([h, w, off, roff])
        off += h * w
        roff += size
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _check(xs: KernelSide, zs: KernelSide) -> None:
    if xs.left.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"triton engine supports float32 and float64; found {xs.left.dtype}")
    if xs.left.dtype != zs.right.dtype or tuple(xs.grids) != tuple(zs.grids):
        raise ValueError("both kernel sides must share dtype and grids")


def _launch(xs: KernelSide, zs: KernelSide, adjoint: bool, budget_mb: float | None,
            symmetric: bool = False, region: int | None = None):
    """Run the fused kernel over launches sized by ``plan_launch``; returns K (and dcross,
    dself). ``region`` overrides the device's tile size (tests split small images with it)."""
    _check(xs, zs)
    n, m = len(xs), len(zs)
    dt, dev = xs.left.dtype, xs.left.device
    grids = tuple(xs.grids)
    q = xs.patch_size
    P1 = grids[0][0] * grids[0][1]
    Ptot = sum(h * w for h, w in grids)
    r = xs.left.shape[2]
    K = torch.empty(n, m, dtype=dt, device=dev)
    dcross = torch.zeros(m, P1, n, dtype=dt, device=dev) if adjoint else None
    dself = torch.zeros(m, P1, n, dtype=dt, device=dev) if adjoint else None
    if n == 0 or m == 0:
        return (K, dcross, dself) if adjoint else K
    plan = plan_launch(n, m, grids, q, xs.left.element_size(), dev, budget_mb, adjoint, region)
    # (n, r, P1): positions contiguous, so a program's loads over positions coalesce
    left = xs.left.transpose(1, 2).contiguous()
    right = zs.right.transpose(1, 2).contiguous()
    sqx, rsqx = xs.sq.contiguous(), xs.rsq.contiguous()
    sqz, rsqz = zs.sq.contiguous(), zs.rsq.contiguous()
    meta, consts = _meta(grids, q, plan.tile, dev), _consts(xs)
    nb_max = triton.cdiv(plan.cols, BLOCK_J)
    programs = plan.rows * nb_max * plan.n_tiles
    scratch = torch.empty(programs * _planes(adjoint) * BLOCK_J * plan.region, dtype=dt,
                          device=dev)
    saved = torch.empty(programs * 2 * BLOCK_J * plan.saved if adjoint else 1, dtype=dt,
                        device=dev)
    partial = torch.empty(plan.n_tiles, plan.rows, plan.cols, dtype=dt, device=dev)
    dummy = torch.empty(1, dtype=dt, device=dev)
    colours = _colours(plan, (len(grids) - 1) * (q - 1), adjoint)
    key = (str(dev), dt, adjoint, len(grids), q, r, plan.region, plan.n_tiles > 1)

    def run(r0, r1, c0, c1, cfg, dc=None, ds=None):
        kv = partial[:, : r1 - r0, : c1 - c0]
        dargs = (dc, *dc.stride(), ds, *ds.stride()) if adjoint else \
            (dummy, 0, 0, 0, dummy, 0, 0, 0)
        for cy, cx, sy, sx, nty, ntx in colours:
            grid = (r1 - r0, triton.cdiv(c1 - c0, BLOCK_J), nty * ntx)
            _conv_ntk_kernel[grid](
                left[r0:r1], right[c0:c1], sqx[r0:r1], rsqx[r0:r1], sqz[c0:c1], rsqz[c0:c1],
                meta, consts, kv, kv.stride(0), kv.stride(1), scratch, saved, *dargs,
                c1 - c0, r, P1, Ptot, len(grids), q,
                plan.tile[0], plan.tile[1], plan.region, plan.saved, cy, cx, sy, sx, ntx,
                plan.tiles[1],
                BLOCK_J=BLOCK_J, IS_F64=dt == torch.float64, ADJOINT=adjoint, **cfg,
            )
        return kv

    def trial(cfg):  # the first launch, into throwaway outputs
        r1, c1 = min(n, plan.rows), min(m, plan.cols)
        scratch_out = (torch.zeros(c1, P1, r1, dtype=dt, device=dev) for _ in range(2)) \
            if adjoint else ()
        run(0, r1, 0, c1, cfg, *scratch_out)

    cfg = tuned_config(key, trial, timer=_cuda_timer if dev.type == "cuda" else None)
    for r0 in range(0, n, plan.rows):
        r1 = min(n, r0 + plan.rows)
        # symmetric: only columns j >= r0 are needed for rows r0..r1-1 (mirrored below)
        for c0 in range(r0 if symmetric else 0, m, plan.cols):
            c1 = min(m, c0 + plan.cols)
            dc = dcross[c0:c1, :, r0:r1] if adjoint else None
            ds = dself[c0:c1, :, r0:r1] if adjoint else None
            kv = run(r0, r1, c0, c1, cfg, dc, ds)
            K[r0:r1, c0:c1] = kv[0] if plan.n_tiles == 1 else kv.sum(0)
    if symmetric:
        K = torch.triu(K) + torch.triu(K, 1).T
    return (K, dcross, dself) if adjoint else K


def kernel_block_triton(xs: KernelSide, zs: KernelSide, symmetric: bool = False,
                        budget_mb: float | None = None, region: int | None = None) -> torch.Tensor:
    """K(x_i, z_j) (n, m) for one block; ``symmetric`` when xs and zs are the same images."""
    return _launch(xs, zs, adjoint=False, budget_mb=budget_mb,
                   symmetric=symmetric and len(xs) == len(zs), region=region)


def kernel_block_adjoint_triton(xs: KernelSide, zs: KernelSide, coef: torch.Tensor,
                                budget_mb: float | None = None, region: int | None = None):
    """(K, dcross (m, P1, n), vself (m, P1, c)) as ``kernel.kernel_block_adjoint`` returns them.

    dself (m, P1, n) is written by the kernel and contracted with ``coef`` by one batched
    matrix product (tensor cores on a GPU) rather than by atomics inside the kernel.
    """
    K, dcross, dself = _launch(xs, zs, adjoint=True, budget_mb=budget_mb, region=region)
    return K, dcross, dself @ coef.to(device=dself.device, dtype=dself.dtype)
