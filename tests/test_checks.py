"""Input checks: tensors whose values cannot be read are refused by name, before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_convrfm import ConvRFM
from ray_convrfm.checks import as_images, as_labels
from ray_convrfm.data.datasets import load_digits

META = ("{name} is a tensor on the meta device, which holds shapes but no values; pass one "
        "on a device with data (cpu, cuda)")


def test_tensors_on_the_meta_device_are_refused_naming_the_argument():
    with pytest.raises(ValueError) as err:
        as_images(torch.zeros(3, 1, 8, 8, device="meta"), "X_val")
    assert str(err.value) == META.format(name="X_val")
    with pytest.raises(ValueError) as err:
        as_labels(torch.zeros(3, device="meta"), 3, "y")
    assert str(err.value) == META.format(name="y")


def test_sparse_and_complex_tensors_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"^X is a torch.sparse_coo tensor on device cpu; "
                                         r"pass a dense one \(X.to_dense\(\)\)$"):
        as_images(torch.zeros(3, 1, 8, 8).to_sparse())
    with pytest.raises(TypeError, match="^X must hold real numbers; found dtype "
                                        "torch.complex64$"):
        as_images(torch.zeros(3, 1, 8, 8, dtype=torch.complex64))


def test_fit_and_predict_refuse_meta_tensors():
    """Not torch's "Tensor.item() cannot be called on meta tensors" from inside the checks."""
    ds = load_digits()
    X, y = ds.X_train[:60], ds.y_train[:60]
    meta = torch.zeros(5, 1, 8, 8, device="meta")
    with pytest.raises(ValueError) as err:
        ConvRFM(depth=2, iters=1).fit(meta, np.arange(5) % 2)
    assert str(err.value) == META.format(name="X")
    with pytest.raises(ValueError) as err:
        ConvRFM(depth=2, iters=1).fit(X, torch.zeros(60, device="meta"))
    assert str(err.value) == META.format(name="y")
    model = ConvRFM(depth=2, iters=1, agop_samples=10).fit(X, y)
    for method in (model.predict, model.decision_function):
        with pytest.raises(ValueError) as err:
            method(meta)
        assert str(err.value) == META.format(name="X")
    with pytest.raises(ValueError) as err:
        model.fit(X, y, monitor=(meta, np.arange(5)))
    assert str(err.value) == META.format(name="monitor X")
