"""Fused CPU engine: the spec-section-2 kernel and its adjoint, one image pair at a time.

The torch engine (``kernel.py``) makes ~20 passes over (pairs x positions) arrays per layer and is
memory-bound on a CPU. Here each pair's positions stay in L1 cache through every layer, the pairs
are spread over threads in tiles (a thread takes a few images of one side together, so each
image of the other side is read from memory once per tile, not once per pair), and arccos is a
branch-free polynomial so the position loop vectorises.
Both engines are checked against the float64 reference in the tests.

Inputs per image side (see ``kernel.prepare_side``): ``left`` holds M-transformed patches
(n, d, P1), ``right`` raw patches (m, d, P1) so that s1(x, z) = left_x . right_z / C; ``sq``/``rsq``
hold sqrt and safe 1/sqrt of the per-layer diagonal covariances s_l(x, x), concatenated over
layers (n, P_total). ``heights``/``widths`` give each layer's position grid.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import types
from numba.extending import overload

#: Consecutive training images whose derivative rows are buffered before being written, so the
#: (j, p, i)-ordered output is written 16 floats (one 64-byte cache line) at a time.
WRITE_BLOCK = 16


# The functions below are module-level (not built in a factory) so numba can cache their machine
# code on disk: a closure's cache key changes from process to process. They serve float32 and
# float64 alike; ``_const`` gives every constant the working type so float32 work is never
# promoted to float64, and ``_acos`` picks its implementation by type at compile time.


def _const(like, value):  # pragma: no cover - replaced by the overload in compiled code
    return value


@overload(_const, inline="always")
def _const_typed(like, value):
    if isinstance(like, types.Float) and like.bitwidth == 32:
        return lambda like, value: np.float32(value)
    return lambda like, value: np.float64(value)


def _acos(x):  # pragma: no cover - replaced by the overload in compiled code
    return math.acos(x)


@overload(_acos, fastmath=True)
def _acos_typed(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:

        def acos_f32(x):
            """arccos without branches (so loops vectorise); Cephes asinf polynomial, ~1 ulp."""
            half = np.float32(0.5)
            ax = abs(x)
            big = ax > half
            z = half * (np.float32(1.0) - ax) if big else x * x
            s = math.sqrt(z) if big else ax
            p = ((((np.float32(4.2163199048e-2) * z + np.float32(2.4181311049e-2)) * z
                   + np.float32(4.5470025998e-2)) * z + np.float32(7.4953002686e-2)) * z
                 + np.float32(1.6666752422e-1)) * z
            r = s + s * p  # asin(s)
            a = np.float32(2.0) * r
            near_one = np.float32(math.pi) - a if x < np.float32(0.0) else a
            near_zero = np.float32(0.5 * math.pi) - (r if x >= np.float32(0.0) else -r)
            return near_one if big else near_zero

        return acos_f32
    return lambda x: math.acos(x)



@nb.njit(inline="always", fastmath=True, cache=True)
def _cosine(s, r1, r2, snap):
    ONE = _const(snap, 1.0)
    c = s * r1 * r2
    c = min(ONE, max(-ONE, c))
    # Within a few ulps of +-1 the cosine carries no information in this precision; snapping
    # makes exact duplicates give angle 0 (and a zero derivative at the kink) reproducibly.
    if c > ONE - snap:
        c = ONE
    if c < -ONE + snap:
        c = -ONE
    return c

# Index arithmetic below is kept to loop variables over 1-D views: numba checks negative
# indices (wrap-around) for computed indices, and those checks stop LLVM from vectorising.


@nb.njit(inline="always", fastmath=True, cache=True)
def _window(a, h, w, q, tmp):
    """VALID q x q window sum of ``a`` (h, w), in place; ``tmp`` holds 2 h w values.

    Both sums run over the flat image, with the row stride w kept: row sums into the first
    half of ``tmp`` (the q - 1 values at each row's end that wrap into the next row are never
    read), column sums into the second, then one copy of the valid (h - q + 1, w - q + 1)
    corner back into ``a``. Long unit-stride loops over offset views vectorise; the per-row
    loops of w - q + 1 values they replace took 70 % of a depth-3 kernel entry at 42 x 42.
    """
    ho = h - q + 1
    wo = w - q + 1
    n = h * w
    rows = tmp[:n]
    cols = tmp[n : 2 * n]
    span = n - q + 1  # row sums needed: every start whose window stays inside the image
    for p in range(span):
        rows[p] = a[p]
    for v in range(1, q):
        shifted = a[v:]
        for p in range(span):
            rows[p] += shifted[p]
    last = (ho - 1) * w + wo  # column sums needed: up to the last valid output
    for p in range(last):
        cols[p] = rows[p]
    for u in range(1, q):
        shifted = rows[u * w :]
        for p in range(last):
            cols[p] += shifted[p]
    for y in range(ho):
        src = cols[y * w : y * w + wo]
        dst = a[y * wo : y * wo + wo]
        for x in range(wo):
            dst[x] = src[x]


@nb.njit(inline="always", fastmath=True, cache=True)
def _window_adjoint(g, ho, wo, q, tmp):
    """Adjoint of ``_window``, in place: spread each output's gradient over its q x q inputs.

    The reverse of ``_window``'s steps: the (ho, wo) gradients laid out at row stride w in
    ``tmp``'s second half (zeros elsewhere), spread down the columns into its first half, then
    along the rows back into ``g`` (h, w). Same flat, unit-stride loops.
    """
    h = ho + q - 1
    w = wo + q - 1
    n = h * w
    rows = tmp[:n]
    cols = tmp[n : 2 * n]
    last = (ho - 1) * w + wo
    cols[:last] = 0
    for y in range(ho):
        src = g[y * wo : y * wo + wo]
        dst = cols[y * w : y * w + wo]
        for x in range(wo):
            dst[x] = src[x]
    span = n - q + 1
    rows[:span] = 0
    for u in range(q):
        shifted = rows[u * w :]
        for p in range(last):
            shifted[p] += cols[p]
    g[:n] = 0
    for v in range(q):
        shifted = g[v:]
        for p in range(span):
            shifted[p] += rows[p]


@nb.njit(inline="always", fastmath=True, cache=True)
def _relu(S, T, ax, rx, az, rz, L, snap):
    """The sqrt(2)-ReLU step of docs/math.md section 2 on L positions of one pair, in place."""
    ZERO = _const(snap, 0.0)
    ONE = _const(snap, 1.0)
    _PI = _const(snap, math.pi)
    _INV_PI = _const(snap, 1.0 / math.pi)
    for p in range(L):
        c = _cosine(S[p], rx[p], rz[p], snap)
        k0 = ONE - _acos(c) * _INV_PI
        sn = math.sqrt(max(ONE - c * c, ZERO))
        T[p] *= k0
        S[p] = ax[p] * az[p] * (sn + _PI * k0 * c) * _INV_PI


@nb.njit(inline="always", fastmath=True, cache=True)
def _relu_record(S, T, ax, rx, az, rz, L, snap, cs, ks, ts):
    """``_relu`` that also records the cosine, kappa0 and the incoming theta for the adjoint.

    A separate copy rather than a flag inside ``_relu``'s loop, which must stay branch-free.
    """
    ZERO = _const(snap, 0.0)
    ONE = _const(snap, 1.0)
    _PI = _const(snap, math.pi)
    _INV_PI = _const(snap, 1.0 / math.pi)
    for p in range(L):
        c = _cosine(S[p], rx[p], rz[p], snap)
        k0 = ONE - _acos(c) * _INV_PI
        sn = math.sqrt(max(ONE - c * c, ZERO))
        cs[p] = c
        ks[p] = k0
        ts[p] = T[p]
        T[p] *= k0
        S[p] = ax[p] * az[p] * (sn + _PI * k0 * c) * _INV_PI


@nb.njit(inline="always", fastmath=True, cache=True)
def _relu_adjoint(gS, gT, gZ, ax, rx, az, rz, L, cs, ks, ts, merge, inv_c):
    """Pull gradients of (S', T') back to (S, T) and accumulate dK/ds(z, z) into gZ.

    With ``merge`` the S gradient also takes T's (T_l = W(T') + S_l below a window).
    """
    ZERO = _const(inv_c, 0.0)
    HALF = _const(inv_c, 0.5)
    ONE = _const(inv_c, 1.0)
    _PI = _const(inv_c, math.pi)
    _INV_PI = _const(inv_c, 1.0 / math.pi)
    for p in range(L):
        c = cs[p]
        k0 = ks[p]
        sn = math.sqrt(max(ONE - c * c, ZERO))
        k1 = (sn + _PI * k0 * c) * _INV_PI
        # d kappa0 / dc = 1 / (pi sqrt(1 - c^2)); 0 at the kink |c| = 1
        dk0 = _INV_PI / sn if sn > ZERO else ZERO
        ab = ax[p] * az[p]
        rz2 = rz[p] * rz[p]
        gc = gS[p] * ab * k0 + gT[p] * ts[p] * dk0
        gZ[p] += HALF * rz2 * (gS[p] * k1 * ab - gc * c)
        gt = gT[p] * k0
        gT[p] = gt
        gS[p] = gc * rx[p] * rz[p] + (gt if merge else ZERO)


@nb.njit(inline="always", fastmath=True, cache=True)
def _first_layer(left, right, i, j, inv_c, S, T):
    """s_1(x_i, z_j) at every position; patches are laid out (n, d, P1) so p is contiguous."""
    d = left.shape[1]
    P1 = left.shape[2]
    li = left[i]
    rj = right[j]
    for p in range(P1):
        S[p] = li[0, p] * rj[0, p]
    for e in range(1, d):
        le = li[e]
        re = rj[e]
        for p in range(P1):
            S[p] += le[p] * re[p]
    for p in range(P1):
        S[p] *= inv_c
        T[p] = S[p]


@nb.njit(inline="always", fastmath=True, cache=True)
def _pair_forward(left, right, sqx, rsqx, sqz, rsqz, heights, widths, q, inv_c, snap,
                  i, j, S, T, tmp, record, cs, ks, ts):
    """K(x_i, z_j); with ``record`` also the per-layer cosines and incoming thetas (adjoint)."""
    ZERO = _const(snap, 0.0)
    _first_layer(left, right, i, j, inv_c, S, T)
    depth = heights.shape[0]
    off = 0
    for layer in range(depth):
        L = heights[layer] * widths[layer]
        e = off + L
        if record:
            _relu_record(S, T, sqx[i, off:e], rsqx[i, off:e], sqz[j, off:e], rsqz[j, off:e], L,
                         snap, cs[off:e], ks[off:e], ts[off:e])
        else:
            _relu(S, T, sqx[i, off:e], rsqx[i, off:e], sqz[j, off:e], rsqz[j, off:e], L, snap)
        if layer < depth - 1:
            _window(S, heights[layer], widths[layer], q, tmp)
            _window(T, heights[layer], widths[layer], q, tmp)
            Lo = heights[layer + 1] * widths[layer + 1]
            for p in range(Lo):
                T[p] += S[p]
        off = e
    L = heights[depth - 1] * widths[depth - 1]
    acc = ZERO
    for p in range(L):
        acc += S[p] + T[p]
    return acc / L


@nb.njit(parallel=True, fastmath=True, cache=True)
def forward(left, right, sqx, rsqx, sqz, rsqz, heights, widths, q, inv_c, snap, symmetric,
            tile, out):
    """K for every pair into ``out`` (n, m); with ``symmetric`` only j >= i is computed.

    Rows go in tiles of ``tile``: each z_j's patches are read from memory once per tile and
    reused from cache by its rows (one row at a time streamed every column's patches from
    memory for every pair: at n = 1,000 Fashion-MNIST images that was 2.8 us a pair against
    1.8 us for the 200 images that fit the cache). Each pair's arithmetic is the same in
    any order, so the bits do not depend on the tile. Threads take tiles in pairs
    (t, tiles - 1 - t) when symmetric: tile t has about m - t * tile columns, so the pair's
    work is the same for every t and prange's equal chunks of it balance.
    """
    n = left.shape[0]
    m = right.shape[0]
    P1 = left.shape[2]
    tiles = (n + tile - 1) // tile
    tasks = (tiles + 1) // 2 if symmetric else tiles
    for k in nb.prange(tasks):
        S = np.empty(P1, dtype=left.dtype)
        T = np.empty(P1, dtype=left.dtype)
        tmp = np.empty(2 * P1, dtype=left.dtype)  # the window sums' two stages
        unused = np.empty(0, dtype=left.dtype)
        first = np.int64(k)  # prange's index is unsigned: keep the arithmetic signed
        for half in range(2 if symmetric else 1):
            t = first if half == 0 else tiles - 1 - first
            if half == 1 and t == first:  # the middle tile of an odd count
                continue
            i0 = t * tile
            i1 = min(n, i0 + tile)
            for j in range(i0 if symmetric else 0, m):
                for i in range(i0, min(i1, j + 1) if symmetric else i1):
                    out[i, j] = _pair_forward(left, right, sqx, rsqx, sqz, rsqz, heights,
                                              widths, q, inv_c, snap, i, j, S, T, tmp, False,
                                              unused, unused, unused)
    if symmetric:
        for i in range(n):
            for j in range(i):
                out[i, j] = out[j, i]


# Not fastmath: with it, this function's machine code loaded from numba's cache gave other
# bits than the same code compiled afresh (dcross and vself differed in the last place), so a
# rerun that resumes from a kernel store learned another M and recomputed every later kernel.
# Without it the two agree, and it measured no slower (600 x 128 pairs: 0.23-0.29 s vs
# 0.30-0.34 s with it, one thread).
@nb.njit(parallel=True, fastmath=False, cache=True)
def adjoint(left, right, sqx, rsqx, sqz, rsqz, heights, widths, q, inv_c, snap, tile,
            kout, dcross, coef, vself):
    """K and its derivatives w.r.t. the first-layer patch products of the right-hand image.

    ``dcross[j, p, i]`` = dK(x_i, z_j) / d(x_ip^T M z_jp) and, with dself[j, p, i] =
    dK(x_i, z_j) / d(z_jp^T M z_jp), ``vself[j, p, k]`` = sum_i coef[i, k] dself[j, p, i]
    (contracted here, it never needs its own (m, P1, n) array). Products are raw (not /C), so
    the gradient of sum_i coef_ik K(x_i, z_j) w.r.t. z_jp is
    M (sum_i coef_ik dcross x_ip + 2 vself z_jp). The derivative of sqrt at 0 is taken as 0.
    The (j, p, i) layout makes ``dcross[:, p, :]`` a plain strided matrix for the batched
    matrix product that contracts it with the coefficients, and lets each thread own its z_j:
    a thread takes ``tile`` of them at a time, so each x_i's patches, read from memory once,
    serve the whole tile from cache (as ``forward``'s row tiles; the bits do not depend on it).
    """
    ZERO = _const(snap, 0.0)
    ONE = _const(snap, 1.0)
    n = left.shape[0]
    m = right.shape[0]
    P1 = left.shape[2]
    depth = heights.shape[0]
    Ptot = sqx.shape[1]
    tiles = (m + tile - 1) // tile
    for t in nb.prange(tiles):
        S = np.empty(P1, dtype=left.dtype)
        T = np.empty(P1, dtype=left.dtype)
        cs = np.empty(Ptot, dtype=left.dtype)
        ks = np.empty(Ptot, dtype=left.dtype)
        ts = np.empty(Ptot, dtype=left.dtype)
        gS = np.empty(P1, dtype=left.dtype)
        gT = np.empty(P1, dtype=left.dtype)
        gZ = np.empty(P1, dtype=left.dtype)
        tmp = np.empty(2 * P1, dtype=left.dtype)  # the window sums' two stages
        j0 = np.int64(t) * tile  # prange's index is unsigned: keep the arithmetic signed
        j1 = min(m, j0 + tile)
        # each z_j's derivative rows of WRITE_BLOCK consecutive i, written as whole cache lines
        bc = np.empty((j1 - j0, WRITE_BLOCK, P1), dtype=left.dtype)
        for j in range(j0, j1):
            vself[j, :, :] = 0
        for i in range(n):
            u = i % WRITE_BLOCK
            ci = coef[i]
            for j in range(j0, j1):
                kout[i, j] = _pair_forward(left, right, sqx, rsqx, sqz, rsqz, heights, widths,
                                           q, inv_c, snap, i, j, S, T, tmp, True, cs, ks, ts)
                L = heights[depth - 1] * widths[depth - 1]
                # backward
                inv_l = ONE / L
                gS[:L] = inv_l
                gT[:L] = inv_l
                gZ[:L] = ZERO
                off = Ptot
                for layer in range(depth - 1, -1, -1):
                    L = heights[layer] * widths[layer]
                    e = off
                    off -= L
                    _relu_adjoint(gS, gT, gZ, sqx[i, off:e], rsqx[i, off:e], sqz[j, off:e],
                                  rsqz[j, off:e], L, cs[off:e], ks[off:e], ts[off:e],
                                  layer > 0, inv_c)
                    if layer > 0:
                        # S_l = W(S'), T_l = W(T') + S_l, Z_l = W(Z): pull back through W
                        ho = heights[layer]
                        wo = widths[layer]
                        _window_adjoint(gS, ho, wo, q, tmp)
                        _window_adjoint(gT, ho, wo, q, tmp)
                        _window_adjoint(gZ, ho, wo, q, tmp)
                bj = bc[j - j0]
                vj = vself[j]
                for p in range(P1):
                    bj[u, p] = (gS[p] + gT[p]) * inv_c
                    g = gZ[p] * inv_c
                    vp = vj[p]
                    for k in range(ci.shape[0]):
                        vp[k] += g * ci[k]
            if u == WRITE_BLOCK - 1 or i == n - 1:
                i0 = i - u
                for j in range(j0, j1):
                    bj = bc[j - j0]
                    for p in range(P1):
                        for w in range(u + 1):
                            dcross[j, p, i0 + w] = bj[w, p]


def get_engine(dtype: np.dtype) -> tuple:
    """(forward, adjoint), compiled on first use for the array dtype (float32 or float64)."""
    if np.dtype(dtype).name not in ("float32", "float64"):
        raise ValueError(f"numba engine supports float32 and float64; found {np.dtype(dtype)}")
    return forward, adjoint
