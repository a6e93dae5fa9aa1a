"""User-facing kernel functions: the ConvRFM kernel matrix and the patch AGOP of a predictor.

Both take images as numpy arrays or torch tensors and answer in kind (numpy in, numpy out);
they check their inputs, pick the working dtype, device and engine, then call the engine-level
code of ``kernel.py`` and ``agop.py``. The mathematics is in docs/math.md (sections 1, 2 and 4).
"""

from __future__ import annotations

import numpy as np
import torch

from ray_convrfm.checks import as_images
from ray_convrfm.kernels.agop import agop_from_sides
from ray_convrfm.kernels.devices import resolve_device, resolve_dtype_for, resolve_engine
from ray_convrfm.kernels.kernel import (
    KernelParams,
    as_tensor,
    kernel_matrix,
    prepare_side,
    resolve_M,
)
from ray_convrfm.options import ComputeOptions
from ray_convrfm.progress import Bar

__all__ = ["conv_ntk", "patch_agop"]


def _settings(X, dtype, device, engine, memory_budget_mb, options):
    """(dtype, device, engine, budget) from the arguments, falling back on ``options``.

    ``options`` is a ``ComputeOptions`` (or anything with a ``compute`` attribute holding one);
    a dtype of None, given or in the options, means "follow X" (``resolve_dtype_for``).
    """
    opts = getattr(options, "compute", options)
    if dtype is None and opts is not None:
        dtype = opts.dtype
    opts = opts or ComputeOptions()
    dev = resolve_device(device or opts.device)
    dt = resolve_dtype_for(X, dtype)
    eng = resolve_engine(engine if engine != "auto" else opts.engine, dev)
    budget = memory_budget_mb or opts.memory_budget_mb
    return dt, dev, eng, budget


def _check_second(X, Z, name: str):
    """Z checked as images with X's channels and image size; the message names ``name``."""
    Z = as_images(Z, name)
    if Z.shape[1] != X.shape[1]:
        raise ValueError(f"{name} has {Z.shape[1]} channels but X has {X.shape[1]}")
    if tuple(Z.shape[2:]) != tuple(X.shape[2:]):
        raise ValueError(f"X and {name} must have the same image size; found "
                         f"{tuple(X.shape[2:])} and {tuple(Z.shape[2:])}")
    return Z


def conv_ntk(X, Z=None, M=None, *, depth: int = 3, patch_size: int = 3, padding: bool = False,
             dtype: str | torch.dtype | None = None, device: str | None = None,
             engine: str = "auto", memory_budget_mb: float | None = None,
             options: ComputeOptions | None = None, progress: bool = False):
    """ConvRFM kernel matrix K_M(X, Z) (docs/math.md section 2); M = None gives the fixed CNTK.

    Parameters
    ----------
    X : array or tensor, shape (n, C, H, W)
    Z : array or tensor, shape (m, C, H, W), or None for K(X, X) (each symmetric pair once)
    M : (d, d) positive semi-definite patch metric, d = C*q*q, or None for the identity
    depth, patch_size, padding : the network the kernel describes (docs/math.md sections 1-2)
    dtype : "float32", "float64", a torch dtype, or None to follow X: float64 input computes in
        float64, any other input (float32, integer or uint8 pixels) in float32
    device, engine, memory_budget_mb : override the matching fields of ``options``.
        Peak working memory is set by ``memory_budget_mb`` (rows x columns per block), not by n:
        choose it as the memory you can spare; halving it doubles the number of blocks.
    options : ``ComputeOptions`` supplying whatever is not given explicitly
    progress : show a progress bar over the kernel blocks

    Returns
    -------
    K : (n, m) numpy array for numpy input, tensor (on the working device) for tensor input,
        in the working dtype. Not normalised (docs/math.md section 3 divides by the largest
        training entry).

    Examples
    --------
    >>> import numpy as np
    >>> from ray_convrfm.kernels import conv_ntk
    >>> X = np.random.default_rng(0).random((4, 1, 10, 10), dtype=np.float32)
    >>> conv_ntk(X, depth=2).shape
    (4, 4)
    """
    numpy_out = not isinstance(X, torch.Tensor)
    X = as_images(X, "X")
    if Z is not None:
        Z = _check_second(X, Z, "Z")
    dt, dev, eng, budget = _settings(X, dtype, device, engine, memory_budget_mb, options)
    params = KernelParams(depth, patch_size, padding)
    Xt = as_tensor(X, dt, dev)
    Mt = resolve_M(M, Xt.shape[1] * patch_size**2, dt, dev)
    xs = prepare_side(Xt, Mt, params)
    zs = xs if Z is None else prepare_side(as_tensor(Z, dt, dev), Mt, params)
    with Bar("kernel", enabled=progress) as bar:
        K = kernel_matrix(xs, zs, eng, budget, symmetric=Z is None, progress=bar.callback())
    return K.cpu().numpy() if numpy_out else K


def _as_coef(coef, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """coef as an (n, c) tensor; a vector (n,) is one output."""
    if not isinstance(coef, np.ndarray | torch.Tensor):
        coef = np.asarray(coef)
    if isinstance(coef, np.ndarray) and not (np.issubdtype(coef.dtype, np.floating)
                                             or np.issubdtype(coef.dtype, np.integer)):
        raise TypeError(f"coef must hold numbers; found dtype {coef.dtype}")
    shape = tuple(coef.shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"coef must have shape (n,) or (n, c); found {shape}")
    if shape[0] != n:
        raise ValueError(f"coef has {shape[0]} rows but X has {n} images; coef must have "
                         f"shape (n,) or (n, c) with n = len(X)")
    if len(shape) == 2 and shape[1] == 0:
        raise ValueError(f"coef has no outputs (shape {shape})")
    c = as_tensor(coef, dtype, device)
    if not torch.isfinite(c).all():
        raise ValueError("coef contains NaN or inf entries")
    return c[:, None] if c.ndim == 1 else c


def patch_agop(X, coef, Z, M=None, *, depth: int = 3, patch_size: int = 3,
               padding: bool = False, dtype: str | torch.dtype | None = None,
               device: str | None = None, engine: str = "auto",
               memory_budget_mb: float | None = None, options: ComputeOptions | None = None,
               progress: bool = False):
    """Patch AGOP of the kernel predictor f(z) = sum_i coef_i K_M(x_i, z) (docs/math.md section 4).

    AGOP = (1/s) sum_{z in Z} sum_p sum_k grad_{z_p} f_k(z) grad_{z_p} f_k(z)^T, with every patch
    z_p of z its own variable (docs/math.md section 1) and the gradient taken w.r.t. the raw
    patch, through M. At blank patches the derivative of sqrt at 0 is taken as 0 (never NaN).
    ConvRFM's next metric is ``G^power / ||G^power||_F`` of this G (docs/math.md section 5).

    Parameters
    ----------
    X : array or tensor, shape (n, C, H, W): the predictor's centers (x_i)
    coef : array or tensor, shape (n, c), one column per output, or (n,) for a single output.
        The kernel is used as is (not normalised): divide coef by any normaliser yourself.
    Z : array or tensor, shape (s, C, H, W): the images at which gradients are taken
    M : (d, d) positive semi-definite patch metric inside the kernel, d = C*q*q; None is I
    depth, patch_size, padding : the kernel's network (docs/math.md section 2)
    dtype : "float32", "float64", a torch dtype, or None to follow X (as in ``conv_ntk``)
    device, engine, memory_budget_mb, options, progress : as in ``conv_ntk``

    Returns
    -------
    G : (d, d) symmetric positive semi-definite matrix, numpy for numpy X, else a tensor, in the
        working dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from ray_convrfm.kernels import patch_agop
    >>> rng = np.random.default_rng(0)
    >>> X, Z = rng.random((6, 1, 9, 9)), rng.random((2, 1, 9, 9))
    >>> patch_agop(X, rng.standard_normal((6, 3)), Z, depth=2).shape
    (9, 9)
    """
    numpy_out = not isinstance(X, torch.Tensor)
    X = as_images(X, "X")
    Z = _check_second(X, Z, "Z")
    dt, dev, eng, budget = _settings(X, dtype, device, engine, memory_budget_mb, options)
    params = KernelParams(depth, patch_size, padding)
    coef_t = _as_coef(coef, X.shape[0], dt, dev)
    Xt = as_tensor(X, dt, dev)
    Mt = resolve_M(M, Xt.shape[1] * patch_size**2, dt, dev)
    xs = prepare_side(Xt, Mt, params)
    zs = prepare_side(as_tensor(Z, dt, dev), Mt, params)
    with Bar("AGOP", enabled=progress, unit="pair") as bar:
        G = agop_from_sides(xs, coef_t, zs, Mt, engine=eng, budget_mb=budget,
                            progress=bar.callback())
    G = 0.5 * (G + G.T)
    return G.cpu().numpy() if numpy_out else G
