"""Pictures of what ConvRFM learned: eigenvectors of M as filters, accuracy per iteration;
and of the CNFA measured on a CNN (``plot_cnfa``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ray_convrfm.cnfa.measure import CNFARow


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def top_filters(M, channels: int, patch_size: int, count: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` leading eigenvectors of M as (count, C, q, q) filters, and their eigenvalues.

    The sign of an eigenvector is arbitrary; it is fixed so that the largest-magnitude entry is
    positive, which makes pictures comparable across runs.
    """
    M = np.asarray(M, dtype=np.float64)
    d = channels * patch_size**2
    if M.shape != (d, d):
        raise ValueError(f"M must have shape ({d}, {d}); found {M.shape}")
    vals, vecs = np.linalg.eigh(0.5 * (M + M.T))
    order = np.argsort(vals)[::-1][: min(count, d)]
    vecs = vecs[:, order].T
    signs = np.sign(vecs[np.arange(len(vecs)), np.abs(vecs).argmax(1)])
    vecs = vecs * signs[:, None]
    return vecs.reshape(-1, channels, patch_size, patch_size), vals[order]


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write a PNG and free the figure."""
    plt = pyplot()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _draw_filter(ax, f: np.ndarray, label: str) -> None:
    """One (C, h, w) filter: RGB for C = 3 (0.5 = zero), else a diverging map of the mean."""
    if f.shape[0] == 3:
        img = f.transpose(1, 2, 0)
        span = np.abs(img).max() or 1.0
        ax.imshow(0.5 + 0.5 * img / span, interpolation="nearest")
    else:
        img = f.mean(0)
        span = np.abs(img).max() or 1.0
        ax.imshow(img, cmap="RdBu_r", vmin=-span, vmax=span, interpolation="nearest")
    ax.set_title(label, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_filters(M, channels: int, patch_size: int, path: str | Path, count: int = 8,
                 title: str = "Top eigenvectors of M") -> Path:
    """Save the leading eigenvectors of M drawn as q x q filters (RGB when C = 3), with their
    eigenvalues. ``M`` is one metric, or a list of (label, metric) drawn one row each (e.g. the
    chosen M = I and the last learned M, when validation kept the fixed kernel)."""
    rows = [("", M)] if not isinstance(M, list) else M
    return plot_filter_rows([_eigen_row(label, m, channels, patch_size, count)
                             for label, m in rows], path, title)


def _eigen_row(label: str, M, channels: int, patch_size: int, count: int):
    filters, vals = top_filters(M, channels, patch_size, count)
    return label, filters, [f"{v:.2g}" for v in vals]


def plot_filter_rows(rows: list[tuple[str, np.ndarray, list[str]]], path: str | Path,
                     title: str) -> Path:
    """One row of drawn (C, q, q) filters per (label, filters, captions)."""
    plt = pyplot()
    k = max(len(f) for _, f, _ in rows)
    fig, axes = plt.subplots(len(rows), k, figsize=(1.6 * k, 2.0 * len(rows)), squeeze=False)
    for row, (label, filters, captions) in zip(axes, rows, strict=True):
        for ax, f, caption in zip(row, filters, captions, strict=False):
            _draw_filter(ax, f, caption)
        for ax in row[len(filters):]:
            ax.axis("off")
        if label:
            row[0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_cnn_comparison(metrics: list[tuple[str, np.ndarray]], weights: np.ndarray,
                        path: str | Path, count: int = 8,
                        title: str = "ConvRFM's M beside a CNN's first layer") -> Path:
    """ConvRFM's first-layer M beside a trained CNN's first convolution ``weights``
    (filters, C, q, q): a row of top eigenvectors per (label, M), then the top eigenvectors
    of the CNN's W^T W, then its filters of largest norm. Each M row's label gives its Pearson
    correlation with W^T W (the CNFA's measure; 1 = proportional)."""
    import torch

    from ray_convrfm.cnfa.measure import pearson

    W = np.asarray(weights, dtype=np.float64)
    _, C, q, _ = W.shape
    flat = W.reshape(len(W), -1)
    gram = flat.T @ flat
    rows = []
    for label, M in metrics:
        if np.shape(M) != gram.shape:
            raise ValueError(f"metric {label!r} must have shape {gram.shape} to match the "
                             f"CNN's (filters, {C}, {q}, {q}) weights; found {np.shape(M)}")
        r = pearson(torch.as_tensor(np.asarray(M, np.float64)), torch.from_numpy(gram))
        rows.append(_eigen_row(f"{label}\ncorr. with W^T W {r:.2f}", M, C, q, count))
    rows.append(_eigen_row("CNN: W^T W", gram, C, q, count))
    norms = np.linalg.norm(flat, axis=1)
    order = np.argsort(norms)[::-1][:count]
    rows.append(("CNN: filters\n(largest norm)", W[order], [f"|w| {norms[i]:.2g}"
                                                           for i in order]))
    return plot_filter_rows(rows, path, title)


def plot_history(history, path: str | Path, title: str = "ConvRFM",
                 chosen: list[int] | None = None) -> Path:
    """Validation (and monitored test) accuracy per iteration, one panel section per layer.

    ``history`` is one ConvRFM history (a list of dicts) or a list of them, one per Deep ConvRFM
    layer; iteration 0 of the first layer is the fixed kernel. ``chosen``: the iteration chosen
    on validation in each layer, ringed.
    """
    plt = pyplot()
    layers = [history] if history and isinstance(history[0], dict) else list(history)
    fig, ax = plt.subplots(figsize=(4.5 + 1.5 * (len(layers) - 1), 3.2))
    x0 = 0
    ticks, labels = [], []
    for i, hist in enumerate(layers):
        xs = [x0 + h["iter"] for h in hist]
        ax.plot(xs, [100 * h["val_acc"] for h in hist], "o-", color="C0",
                label="validation" if i == 0 else None)
        if all("monitor_acc" in h for h in hist):
            ax.plot(xs, [100 * h["monitor_acc"] for h in hist], "s--", color="C1",
                    label="test" if i == 0 else None)
        if chosen is not None:
            best = next(h for h in hist if h["iter"] == chosen[i])
            ax.plot([x0 + best["iter"]], [100 * best["val_acc"]], "o", ms=13, mfc="none",
                    mec="C3", mew=1.5, label="chosen on validation" if i == 0 else None)
        ticks += xs
        labels += [f"{h['iter']}" if len(layers) == 1 else f"L{i}.{h['iter']}" for h in hist]
        if i:
            ax.axvline(x0 - 0.5, color="grey", lw=0.8, ls=":")
        x0 = xs[-1] + 1
    ax.set_xlabel("iteration (0 = fixed kernel, M = I)" if len(layers) == 1
                  else "layer.iteration (L0.0 = fixed kernel)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def effective_filters(layers: list[dict], layer: int, count: int = 8):
    """Top eigenvectors of layer ``layer``'s M seen in pixel space, and their eigenvalues.

    Deep ConvRFM's layer l works on linear features of the image; an eigenvector v of its M
    (width, q, q) composed with the filter banks below it is one pixel-space filter over the
    layer's receptive field: E = conv_transpose(v, W_{l-1}) ... composed down to the image.
    """
    import torch
    import torch.nn.functional as F

    if layer == 0:
        raise ValueError("layer 0 works on pixels already: use top_filters")
    below = layers[layer - 1]["filters"]  # (width, C, q, q)
    filters, vals = top_filters(layers[layer]["M"], below.shape[0], below.shape[-1], count)
    E = torch.from_numpy(filters)
    for below in range(layer - 1, -1, -1):
        E = F.conv_transpose2d(E, layers[below]["filters"].to(torch.float64))
    return E.numpy(), vals


def plot_deep_filters(layers: list[dict], image_channels: int, path: str | Path, count: int = 8,
                      title: str = "Deep ConvRFM: top eigenvectors of each layer's M") -> Path:
    """One row per layer: the leading eigenvectors of its M as pixel-space filters."""
    plt = pyplot()
    q = int(round((layers[0]["M"].shape[0] / image_channels) ** 0.5))
    fig, axes = plt.subplots(len(layers), count, figsize=(1.5 * count, 2.0 * len(layers) + 0.3),
                             squeeze=False)
    for row, ax_row in enumerate(axes):
        if row == 0:
            filt, vals = top_filters(layers[0]["M"], image_channels, q, count)
        else:
            filt, vals = effective_filters(layers, row, count)
        for k, ax in enumerate(ax_row):
            if k < len(filt):
                _draw_filter(ax, filt[k], f"L{row}: {vals[k]:.2g}")
            else:
                ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_cnfa(rows: list[CNFARow], path: str | Path, title: str = "CNFA") -> Path:
    """Bar chart of the CNFA correlations per layer (``cnfa.measure.measure_cnfa``'s rows),
    trained against initial weights."""
    plt = pyplot()
    names = [r.layer for r in rows]
    x = np.arange(len(rows))
    series = [("trained, AGOP^1/2", [r.corr_power_half for r in rows]),
              ("trained, AGOP^1", [r.corr_power_1 for r in rows])]
    if rows and rows[0].init_corr_power_half is not None:
        series += [("initial, AGOP^1/2", [r.init_corr_power_half for r in rows]),
                   ("initial, AGOP^1", [r.init_corr_power_1 for r in rows])]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(rows) + 3.5), 3.4))
    for i, (label, vals) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Pearson correlation with W^T W")
    ax.set_ylim(min(0.0, *(min(v) for _, v in series)) - 0.05, 1.0)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path)
