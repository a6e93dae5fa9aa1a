"""Fused CPU engine: the spec-section-2 kernel and its adjoint, one image pair at a time.

The torch engine (``kernel.py``) makes ~20 passes over (pairs x positions) arrays per layer and is
memory-bound on a CPU. Here each pair's positions stay in L1 cache through every layer, the pairs
are spread over threads, and arccos is a branch-free polynomial so the position loop vectorises.
Both engines are checked against the float64 reference in the tests.

Inputs per image side (see ``kernel.prepare_side``): ``left`` holds M-transformed patches
(n, P1, d), ``right`` raw patches (m, P1, d) so that s1(x, z) = left_x . right_z / C; ``sq``/``rsq``
hold sqrt and safe 1/sqrt of the per-layer diagonal covariances s_l(x, x), concatenated over
layers (n, P_total). ``heights``/``widths`` give each layer's position grid.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

# Cephes asinf polynomial: about 1 ulp in float32 over [0, 0.5].
_ASIN_COEFFS = (4.2163199048e-2, 2.4181311049e-2, 4.5470025998e-2, 7.4953002686e-2, 1.6666752422e-1)


def _make_engine(ft):
    """Build (forward, adjoint) kernels for one float type ``ft`` (np.float32 or np.float64).

    Every constant is of type ``ft`` so that float32 work is not promoted to float64.
    """
    _PI = ft(math.pi)
    _INV_PI = ft(1.0 / math.pi)
    _HALF_PI = ft(0.5 * math.pi)
    ZERO, HALF, ONE, TWO = ft(0.0), ft(0.5), ft(1.0), ft(2.0)
    _P0, _P1, _P2, _P3, _P4 = (ft(c) for c in _ASIN_COEFFS)

    if ft is np.float32:

        @nb.njit(inline="always", fastmath=True)
        def acos(x):
            """arccos without branches (so loops vectorise), float32-accurate on [-1, 1]."""
            ax = abs(x)
            big = ax > HALF
            z = HALF * (ONE - ax) if big else x * x
            s = math.sqrt(z) if big else ax
            p = ((((_P0 * z + _P1) * z + _P2) * z + _P3) * z + _P4) * z
            r = s + s * p  # asin(s)
            if big:
                a = TWO * r
                return _PI - a if x < ZERO else a
            return _HALF_PI - (r if x >= ZERO else -r)

    else:

        @nb.njit(inline="always")
        def acos(x):
            return math.acos(x)

    @nb.njit(inline="always", fastmath=True)
    def _cosine(s, r1, r2, snap):
        c = s * r1 * r2
        c = min(ONE, max(-ONE, c))
        # Within a few ulps of +-1 the cosine carries no information in this precision; snapping
        # makes exact duplicates give angle 0 (and a zero derivative at the kink) reproducibly.
        if c > ONE - snap:
            c = ONE
        if c < -ONE + snap:
            c = -ONE
        return c

    @nb.njit(inline="always", fastmath=True)
    def _window_inplace(a, h, w, q):
        """VALID q x q window sum, written over the front of ``a`` (row-major order is safe)."""
        ho = h - q + 1
        wo = w - q + 1
        for y in range(ho):
            for x in range(wo):
                acc = ZERO
                for u in range(q):
                    base = (y + u) * w + x
                    for v in range(q):
                        acc += a[base + v]
                a[y * wo + x] = acc

    @nb.njit(inline="always", fastmath=True)
    def _window_adjoint(g, ho, wo, q, out):
        """Adjoint of the window sum: spread each output's gradient over its q x q inputs."""
        w = wo + q - 1
        h = ho + q - 1
        for k in range(h * w):
            out[k] = ZERO
        for y in range(ho):
            for x in range(wo):
                v = g[y * wo + x]
                for u in range(q):
                    base = (y + u) * w + x
                    for t in range(q):
                        out[base + t] += v

    @nb.njit(inline="always", fastmath=True)
    def _first_layer(left, right, i, j, inv_c, S, T):
        P1 = left.shape[1]
        d = left.shape[2]
        for p in range(P1):
            acc = ZERO
            for e in range(d):
                acc += left[i, p, e] * right[j, p, e]
            S[p] = acc * inv_c
            T[p] = acc * inv_c

    @nb.njit(inline="always", fastmath=True)
    def _pair_forward(left, right, sqx, rsqx, sqz, rsqz, heights, widths, q, inv_c, snap,
                      i, j, S, T):
        _first_layer(left, right, i, j, inv_c, S, T)
        depth = heights.shape[0]
        off = 0
        for layer in range(depth):
            L = heights[layer] * widths[layer]
            for p in range(L):
                k = off + p
                c = _cosine(S[p], rsqx[i, k], rsqz[j, k], snap)
                k0 = ONE - acos(c) * _INV_PI
                sn = math.sqrt(max(ONE - c * c, ZERO))
                T[p] *= k0
                S[p] = sqx[i, k] * sqz[j, k] * (sn + _PI * k0 * c) * _INV_PI
            if layer < depth - 1:
                _window_inplace(S, heights[layer], widths[layer], q)
                _window_inplace(T, heights[layer], widths[layer], q)
                Lo = heights[layer + 1] * widths[layer + 1]
                for p in range(Lo):
                    T[p] += S[p]
            off += L
        L = heights[depth - 1] * widths[depth - 1]
        acc = ZERO
        for p in range(L):
            acc += S[p] + T[p]
        return acc / ft(L)

    @nb.njit(parallel=True, fastmath=True)
    def forward(left, right, sqx, rsqx, sqz, rsqz, heights, widths, q, inv_c, snap, symmetric,
                out):
        """K for every pair into ``out`` (n, m); with ``symmetric`` only j >= i is computed."""
        n = left.shape[0]
        m = right.shape[0]
        P1 = left.shape[1]
        for i in nb.prange(n):
            S = np.empty(P1, dtype=left.dtype)
            T = np.empty(P1, dtype=left.dtype)
            j0 = i if symmetric else 0
            for j in range(j0, m):
                out[i, j] = _pair_forward(left, right, sqx, rsqx, sqz, rsqz, heights, widths, q,
                                          inv_c, snap, i, j, S, T)
        if symmetric:
            for i in range(n):
                for j in range(i):
                    out[i, j] = out[j, i]

    @nb.njit(parallel=True, fastmath=True)
    def adjoint(left, right, sqx, rsqx, sqz, rsqz, heights, widths, q, inv_c, snap,
                kout, dcross, dself):
        """K and its derivatives w.r.t. the first-layer covariances of the right-hand image.

        ``dcross[i, j, p]`` = dK(x_i, z_j) / d(x_ip^T M z_jp) and ``dself[i, j, p]`` =
        dK(x_i, z_j) / d(z_jp^T M z_jp), the raw (not /C) patch products, so the patch gradient is
        M (dcross x_ip + 2 dself z_jp). The derivative of sqrt at a zero covariance is taken as 0.
        """
        n = left.shape[0]
        m = right.shape[0]
        P1 = left.shape[1]
        depth = heights.shape[0]
        Ptot = sqx.shape[1]
        for i in nb.prange(n):
            S = np.empty(P1, dtype=left.dtype)
            T = np.empty(P1, dtype=left.dtype)
            cs = np.empty(Ptot, dtype=left.dtype)
            ts = np.empty(Ptot, dtype=left.dtype)
            gS = np.empty(P1, dtype=left.dtype)
            gT = np.empty(P1, dtype=left.dtype)
            gZ = np.empty(P1, dtype=left.dtype)
            hS = np.empty(P1, dtype=left.dtype)
            hT = np.empty(P1, dtype=left.dtype)
            hZ = np.empty(P1, dtype=left.dtype)
            for j in range(m):
                # forward, recording the cosine and the incoming theta of every layer
                _first_layer(left, right, i, j, inv_c, S, T)
                off = 0
                for layer in range(depth):
                    L = heights[layer] * widths[layer]
                    for p in range(L):
                        k = off + p
                        c = _cosine(S[p], rsqx[i, k], rsqz[j, k], snap)
                        cs[k] = c
                        ts[k] = T[p]
                        k0 = ONE - acos(c) * _INV_PI
                        sn = math.sqrt(max(ONE - c * c, ZERO))
                        T[p] *= k0
                        S[p] = sqx[i, k] * sqz[j, k] * (sn + _PI * k0 * c) * _INV_PI
                    if layer < depth - 1:
                        _window_inplace(S, heights[layer], widths[layer], q)
                        _window_inplace(T, heights[layer], widths[layer], q)
                        Lo = heights[layer + 1] * widths[layer + 1]
                        for p in range(Lo):
                            T[p] += S[p]
                    off += L
                L = heights[depth - 1] * widths[depth - 1]
                acc = ZERO
                for p in range(L):
                    acc += S[p] + T[p]
                kout[i, j] = acc / ft(L)
                # backward
                inv_l = ONE / ft(L)
                for p in range(L):
                    gS[p] = inv_l
                    gT[p] = inv_l
                    gZ[p] = ZERO
                off = Ptot
                for layer in range(depth - 1, -1, -1):
                    L = heights[layer] * widths[layer]
                    off -= L
                    for p in range(L):
                        k = off + p
                        c = cs[k]
                        k0 = ONE - acos(c) * _INV_PI
                        sn = math.sqrt(max(ONE - c * c, ZERO))
                        k1 = (sn + _PI * k0 * c) * _INV_PI
                        dk0 = _INV_PI / sn if abs(c) < ONE else ZERO
                        ab = sqx[i, k] * sqz[j, k]
                        rr = rsqx[i, k] * rsqz[j, k]
                        rz2 = rsqz[j, k] * rsqz[j, k]
                        gc = gS[p] * ab * k0 + gT[p] * ts[k] * dk0
                        gZ[p] += HALF * rz2 * (gS[p] * k1 * ab - gc * c)
                        gS[p] = gc * rr
                        gT[p] = gT[p] * k0
                    if layer > 0:
                        # S_l = W(S'), T_l = W(T') + S_l, Z_l = W(Z)
                        for p in range(L):
                            gS[p] += gT[p]
                        ho = heights[layer]
                        wo = widths[layer]
                        _window_adjoint(gS, ho, wo, q, hS)
                        _window_adjoint(gT, ho, wo, q, hT)
                        _window_adjoint(gZ, ho, wo, q, hZ)
                        Li = heights[layer - 1] * widths[layer - 1]
                        for p in range(Li):
                            gS[p] = hS[p]
                            gT[p] = hT[p]
                            gZ[p] = hZ[p]
                for p in range(P1):
                    dcross[i, j, p] = (gS[p] + gT[p]) * inv_c
                    dself[i, j, p] = gZ[p] * inv_c

    return forward, adjoint


_ENGINES: dict[str, tuple] = {}


def get_engine(dtype: np.dtype) -> tuple:
    """(forward, adjoint) compiled for float32 (polynomial arccos) or float64 (libm arccos)."""
    key = np.dtype(dtype).name
    if key not in _ENGINES:
        if key not in ("float32", "float64"):
            raise ValueError(f"numba engine supports float32 and float64; found {key}")
        _ENGINES[key] = _make_engine(np.float32 if key == "float32" else np.float64)
    return _ENGINES[key]
