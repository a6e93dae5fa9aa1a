"""The small CNN's training: the epoch chosen on validation, as a kernel machine's iteration."""

import numpy as np
import torch

from ray_convrfm.cnfa.networks import SmallCNN, accuracy, train_classifier, train_on_validation
from ray_convrfm.data.datasets import load_digits


def test_the_kept_weights_are_those_of_the_best_validation_epoch():
    ds = load_digits()
    X, y, Xv, yv = ds.X_train[:300], ds.y_train[:300], ds.X_train[300:400], ds.y_train[300:400]
    torch.manual_seed(0)
    model = SmallCNN(1, 10, width=8, depth=2)
    history = train_on_validation(model, X, y, Xv, yv, epochs=6, patience=2, lr=3e-3)
    chosen = [h for h in history if h["chosen"]]
    assert len(chosen) == 1
    best = max(h["val_acc"] for h in history)
    assert chosen[0]["val_acc"] == best
    assert chosen[0]["epoch"] == min(h["epoch"] for h in history if h["val_acc"] == best)
    assert accuracy(model, Xv, yv) == best  # the best epoch's weights were restored
    # stopped `patience` epochs after the best, or ran them all
    assert len(history) == 6 or history[-1]["epoch"] - chosen[0]["epoch"] == 2

    # the same seed and data give the same run as plain training, epoch by epoch
    torch.manual_seed(0)
    plain = SmallCNN(1, 10, width=8, depth=2)
    runs = train_classifier(plain, X, y, epochs=len(history), lr=3e-3)
    np.testing.assert_allclose([h["loss"] for h in runs], [h["loss"] for h in history],
                               rtol=1e-6)
