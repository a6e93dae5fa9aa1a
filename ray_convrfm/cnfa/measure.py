"""Convolutional Neural Feature Ansatz (docs/math.md section 7): W^T W against the patch AGOP.

For a conv layer y_p = W u_p + b (u_p: the layer's input patch at output position p, with the
layer's own stride, padding and dilation), the gradient of any output f_k with respect to u_p is
W^T dF_k/dy_p. Hence the patch AGOP of the sub-network from the layer's input to the outputs is

    AGOP = (1/n) W^T ( sum_{x, p, k} g_{xpk} g_{xpk}^T ) W,    g_{xpk} = d f_k(x) / d y_p

which needs only gradients with respect to the layer's outputs: no patches and no Jacobian
larger than one chunk of classes are ever stored.

Reference: Beaglehole et al., arXiv 2309.00570 (2023), section on the CNFA.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ray_convrfm.kernels.agop import psd_power

log = logging.getLogger(__name__)


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every ``nn.Conv2d`` of a model, in registration order, with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def filter_covariance(conv: nn.Conv2d) -> torch.Tensor:
    """W^T W (d x d) with W reshaped to (filters, C_in/groups * kh * kw), in float64."""
    W = _weights(conv)
    return W.T @ W


def agop_and_root(W: torch.Tensor, S: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The AGOP G = W^T S W / n (d x d) and G^(1/2), through an eigenproblem of size min(d, F).

    With S = L L^T and B = L^T W / sqrt(n) (F x d), G = B^T B and, from B B^T = U diag(l) U^T,
    G^(1/2) = B^T U diag(l^(-1/2)) U^T B. Deep layers have d = 9 C_in much larger than their F
    filters (4,608 vs 512 in ResNet18), where this is hundreds of times cheaper than eigh(G).
    """
    G = W.T @ S @ W / n
    F_, d = W.shape
    if d <= F_:
        return G, psd_power(G, 0.5)
    vals, vecs = torch.linalg.eigh(0.5 * (S + S.T))
    B = (vecs * vals.clamp_min(0).sqrt()).T @ W / math.sqrt(n)
    lam, U = torch.linalg.eigh(B @ B.T)
    keep = lam > lam.max().clamp_min(0) * 1e-12
    U, lam = U[:, keep], lam[keep]
    UB = U.T @ B
    return G, UB.T @ (UB * lam.rsqrt()[:, None])


def pearson(A: torch.Tensor, B: torch.Tensor) -> float:
    """Pearson correlation of two matrices' entries (center each, then cosine)."""
    a = A.reshape(-1).to(torch.float64)
    b = B.reshape(-1).to(torch.float64)
    a = a - a.mean()
    b = b - b.mean()
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else float("nan")


def layer_patch_agops(model: nn.Module, images: torch.Tensor, layers=None, *,
                      class_chunk: int = 32, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Patch AGOP (d x d, float64) of the sub-network after each conv layer's input.

    Same arguments as ``layer_output_grams``; the AGOP is W^T S W / n.
    """
    grams = layer_output_grams(model, images, layers, class_chunk=class_chunk,
                               batch_size=batch_size)
    convs = dict(conv_layers(model))
    return {name: _weights(convs[name]).T @ S @ _weights(convs[name]) / images.shape[0]
            for name, S in grams.items()}


def _weights(conv: nn.Conv2d) -> torch.Tensor:
    W = conv.weight.detach().to(torch.float64)
    return W.reshape(W.shape[0], -1)


def layer_output_grams(model: nn.Module, images: torch.Tensor, layers=None, *,
                       class_chunk: int = 32, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """S = sum over images, positions and classes of g g^T, g = d f_k / d y_p (filters x filters).

    Parameters
    ----------
    model : a CNN mapping (n, C, H, W) images to (n, c) outputs; put it in eval mode first
    images : (n, C, H, W) on the model's device
    layers : names of conv layers (default: every ``nn.Conv2d``)
    class_chunk : outputs differentiated per backward pass (bounds memory for 1000 classes)
    batch_size : images per forward pass
    """
    convs = dict(conv_layers(model))
    names = list(convs) if layers is None else list(layers)
    unknown = [n for n in names if n not in convs]
    if unknown:
        raise ValueError(f"not conv layers of this model: {unknown}; conv layers: {list(convs)}")
    for name in names:
        if convs[name].groups != 1:
            raise ValueError(f"layer {name} is a grouped convolution (groups="
                             f"{convs[name].groups}); the CNFA is defined for groups=1")
    outputs: dict[str, torch.Tensor] = {}
    hooks = [convs[n].register_forward_hook(_keep_output(outputs, n)) for n in names]
    sums = {n: None for n in names}
    n_images = images.shape[0]
    try:
        for start in range(0, n_images, batch_size):
            x = images[start : start + batch_size]
            out = model(x)
            if out.ndim != 2:
                raise ValueError(f"the model must return (n, classes); found {tuple(out.shape)}")
            ys = [outputs[n] for n in names]
            c = out.shape[1]
            for k0 in range(0, c, class_chunk):
                for name, g in zip(names, _class_grads(out, ys, k0, min(c, k0 + class_chunk)),
                                   strict=True):
                    # Gram in the model's precision (the costly part: classes x images x
                    # positions x filters^2), accumulated over chunks in float64
                    g = g.detach().permute(0, 1, 3, 4, 2).reshape(-1, g.shape[2])
                    s = (g.T @ g).to(torch.float64)
                    sums[name] = s if sums[name] is None else sums[name] + s
            outputs.clear()
    finally:
        for h in hooks:
            h.remove()
    return sums


def _class_grads(out: torch.Tensor, ys: list[torch.Tensor], k0: int, k1: int):
    """d out[:, k] / d y for classes k0..k1-1 at once: one (k, n, filters, H, W) per layer.

    Uses a batched (vmapped) backward; models with operations vmap cannot batch fall back to
    one backward pass per class. Either way only one chunk of classes is held in memory.
    """
    eye = torch.zeros(k1 - k0, *out.shape, dtype=out.dtype, device=out.device)
    eye[torch.arange(k1 - k0), :, torch.arange(k0, k1)] = 1.0
    try:
        return torch.autograd.grad(out, ys, grad_outputs=eye, retain_graph=True,
                                   is_grads_batched=True)
    except RuntimeError as err:
        log.debug("batched backward failed (%s); one pass per class", err)
    per_class = [torch.autograd.grad(out, ys, grad_outputs=e, retain_graph=True) for e in eye]
    return [torch.stack(gs) for gs in zip(*per_class, strict=True)]


def _keep_output(store: dict, name: str):
    def hook(module, inputs, output):
        if not output.requires_grad:
            raise ValueError("CNFA needs gradients: do not call it under torch.no_grad()")
        store[name] = output

    return hook


@dataclass(frozen=True)
class CNFARow:
    layer: str
    filters: int
    d: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    corr_power_1: float
    corr_power_half: float
    init_corr_power_1: float | None = None
    init_corr_power_half: float | None = None


def measure_cnfa(model: nn.Module, images: torch.Tensor, initial_model: nn.Module | None = None,
                 *, class_chunk: int = 32, batch_size: int = 64) -> list[CNFARow]:
    """Correlation of W^T W with AGOP^1 and AGOP^(1/2) for every conv layer (docs/math.md 7).

    ``initial_model`` (same architecture, e.g. a copy taken before training) gives the baseline:
    the initial weights' W_0^T W_0 against the same (trained network's) AGOP, i.e. how much of
    the agreement was there before any feature learning. (Against its own network's AGOP,
    W_0^T S W_0, a random W_0 always correlates well, so that comparison says nothing.)
    """
    model = model.eval()
    grams = layer_output_grams(model, images, class_chunk=class_chunk, batch_size=batch_size)
    init_convs = None if initial_model is None else dict(conv_layers(initial_model))
    rows = []
    for name, conv in conv_layers(model):
        G, G_half = agop_and_root(_weights(conv), grams[name], images.shape[0])
        wtw = filter_covariance(conv)
        extra = {}
        if init_convs is not None:
            iw = filter_covariance(init_convs[name])
            extra = {"init_corr_power_1": pearson(iw, G),
                     "init_corr_power_half": pearson(iw, G_half)}
        rows.append(CNFARow(
            layer=name, filters=conv.out_channels, d=wtw.shape[0],
            kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride),
            padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            dilation=tuple(conv.dilation),
            corr_power_1=pearson(wtw, G), corr_power_half=pearson(wtw, G_half),
            **extra))
    return rows


def to_table(rows: list[CNFARow]):
    """The CNFA rows as a pyarrow Table (``.to_pandas()`` for a DataFrame)."""
    import pyarrow as pa

    cols = {f: [getattr(r, f) for r in rows] for f in CNFARow.__dataclass_fields__}
    for f in ("kernel_size", "stride", "dilation", "padding"):
        cols[f] = [str(v) for v in cols[f]]
    return pa.table(cols)


def initial_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of a model's current weights (take it before training, for the baseline)."""
    return copy.deepcopy(model).eval()
