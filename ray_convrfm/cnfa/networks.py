"""A small CNN and a plain training loop, for CNFA experiments anyone can rerun on a CPU."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ray_convrfm.progress import progress_bar

log = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """``depth`` 3 x 3 conv layers of ``width`` filters with ReLU; every second one has stride 2;
    global average pooling and a linear read-out."""

    def __init__(self, in_channels: int = 1, classes: int = 10, width: int = 64, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(depth):
            layers += [nn.Conv2d(c, width, 3, stride=2 if i % 2 else 1, padding=1), nn.ReLU()]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def train_classifier(model: nn.Module, X: np.ndarray, y: np.ndarray, *, epochs: int = 3,
                     batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                     progress: bool = False,
                     on_epoch: Callable[[dict], bool] | None = None) -> list[dict]:
    """Adam on cross-entropy; returns one dict per epoch (loss, train accuracy, seconds).
    ``on_epoch`` sees each epoch's record (and may add to it); True stops the training."""
    gen = torch.Generator().manual_seed(seed)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(yt), generator=gen)
        total, correct, seen = 0.0, 0, 0
        batches = range(0, len(yt), batch_size)
        with progress_bar(len(batches), f"epoch {epoch}", progress, unit="batch") as bar:
            for b in batches:
                idx = order[b : b + batch_size]
                out = model(Xt[idx])
                loss = loss_fn(out, yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                correct += int((out.argmax(1) == yt[idx]).sum())
                seen += len(idx)
                bar.update()
        rec = {"epoch": epoch, "loss": total / seen, "train_acc": correct / seen,
               "seconds": time.perf_counter() - t0}
        log.info("epoch %d: loss %.4f, train acc %.4f (%.0f s)", epoch, rec["loss"],
                 rec["train_acc"], rec["seconds"])
        history.append(rec)
        if on_epoch is not None and on_epoch(rec):
            break
    model.eval()
    return history


def train_on_validation(model: nn.Module, X: np.ndarray, y: np.ndarray, X_val: np.ndarray,
                        y_val: np.ndarray, *, epochs: int = 30, patience: int | None = 5,
                        batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                        progress: bool = False) -> list[dict]:
    """``train_classifier`` with its epoch chosen on (X_val, y_val), as a kernel machine's
    iteration is: the model ends with the weights of its best validation epoch (the first on
    ties), and training stops ``patience`` epochs after it. Returns one dict per epoch with
    ``val_acc`` and ``chosen`` (the kept epoch)."""
    import copy

    best: dict = {"epoch": -1, "val_acc": -1.0, "state": None}

    def choose(rec: dict) -> bool:
        rec["val_acc"] = accuracy(model, X_val, y_val)
        model.train()
        if rec["val_acc"] > best["val_acc"]:
            best.update(epoch=rec["epoch"], val_acc=rec["val_acc"],
                        state=copy.deepcopy(model.state_dict()))
        return patience is not None and rec["epoch"] - best["epoch"] >= patience

    history = train_classifier(model, X, y, epochs=epochs, batch_size=batch_size, lr=lr,
                               seed=seed, progress=progress, on_epoch=choose)
    model.load_state_dict(best["state"])
    model.eval()
    for rec in history:
        rec["chosen"] = rec["epoch"] == best["epoch"]
    return history


@torch.no_grad()
def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Classification accuracy of a model on (X, y)."""
    model.eval()
    Xt = torch.as_tensor(X, dtype=torch.float32)
    preds = torch.cat([model(Xt[b : b + batch_size]).argmax(1)
                       for b in range(0, len(Xt), batch_size)])
    return float((preds.numpy() == np.asarray(y)).mean())
