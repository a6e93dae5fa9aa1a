"""Plain oracle of docs/math.md sections 1-2, written independently of the library.

Loops over image pairs and positions; slow, obvious, and only used on tiny inputs. The patch
products are float64; everything after them is carried in 40-digit mpmath arithmetic, so that
rounding in the oracle itself (an identical pair whose cosine rounds to 1 - 1e-16, giving an angle
of 1e-8) never hides or fakes an error of the library's float64 path.
"""

import mpmath
import numpy as np

mpmath.mp.dps = 40


def patches(x, q, padding):
    """(P, d) patches of a (C, H, W) image in (channel, row, column) order, positions row-major."""
    C, H, W = x.shape
    if padding:
        p = q // 2
        x = np.pad(x, ((0, 0), (p, p), (p, p)))
        H, W = H + 2 * p, W + 2 * p
    out = []
    for i in range(H - q + 1):
        for j in range(W - q + 1):
            out.append(x[:, i : i + q, j : j + q].reshape(-1))
    return np.array(out), (H - q + 1, W - q + 1)


def relu_step(sxz, sxx, szz, theta):
    norm = mpmath.sqrt(sxx * szz)
    if norm == 0:
        return mpmath.mpf(0), theta / 2
    c = min(mpmath.mpf(1), max(mpmath.mpf(-1), sxz / norm))
    t = mpmath.acos(c)
    pi = mpmath.pi
    return norm * (mpmath.sin(t) + (pi - t) * c) / pi, theta * (pi - t) / pi


def window(a, q):
    h, w = a.shape
    out = np.empty((h - q + 1, w - q + 1), dtype=object)
    for i in range(h - q + 1):
        for j in range(w - q + 1):
            out[i, j] = mpmath.fsum(a[i : i + q, j : j + q].reshape(-1))
    return out


def kernel_entry(x, z, M, depth, q, padding):
    C = x.shape[0]
    px, grid = patches(np.asarray(x, np.float64), q, padding)
    pz, _ = patches(np.asarray(z, np.float64), q, padding)
    M = np.asarray(M, np.float64)

    def cov(a, b):
        vals = [mpmath.mpf(float(a[p] @ M @ b[p])) / C for p in range(len(a))]
        return np.array(vals, dtype=object).reshape(grid)

    sxz, sxx, szz = cov(px, pz), cov(px, px), cov(pz, pz)
    theta = sxz.copy()
    for layer in range(depth):
        new_s = np.empty_like(sxz)
        new_t = np.empty_like(theta)
        for i in range(sxz.shape[0]):
            for j in range(sxz.shape[1]):
                new_s[i, j], new_t[i, j] = relu_step(sxz[i, j], sxx[i, j], szz[i, j], theta[i, j])
        sxz, theta = new_s, new_t
        if layer < depth - 1:
            sxz = window(sxz, q)
            theta = window(theta, q) + sxz
            sxx = window(sxx, q)
            szz = window(szz, q)
    size = sxz.size
    return float(mpmath.fsum(sxz.reshape(-1)) / size + mpmath.fsum(theta.reshape(-1)) / size)


def kernel_matrix(X, Z, M, depth, q, padding):
    return np.array([[kernel_entry(x, z, M, depth, q, padding) for z in Z] for x in X])
