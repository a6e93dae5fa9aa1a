"""Options: one frozen dataclass per subsystem, composed, with flat construction and errors."""

import dataclasses

import numpy as np
import pytest
from sklearn.base import clone

from ray_convrfm import ClusterOptions, ComputeOptions, ConvRFM, DeepConvRFM, Options
from ray_convrfm.options import StoreOptions


def test_flat_names_go_to_their_subsystem():
    opts = Options.of(workers=2, dtype="float64", store="/tmp/k.zarr", block=64, verbose=True)
    assert opts.cluster == ClusterOptions(workers=2)
    assert opts.compute == ComputeOptions(dtype="float64")
    assert opts.store == StoreOptions(url="/tmp/k.zarr", block=64)
    assert opts.verbose is True
    assert opts.replace(workers=4).cluster.workers == 4 and opts.cluster.workers == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.cluster.workers = 3


@pytest.mark.parametrize("kwargs,message", [
    ({"workers": -1}, "workers"), ({"workers": 1.5}, "workers"), ({"dtype": "float16"}, "dtype"),
    ({"engine": "cuda"}, "engine"), ({"memory_budget_mb": 0}, "memory_budget_mb"),
    ({"gpus_per_worker": -1}, "gpus_per_worker"), ({"block": 0}, "block"),
    ({"placement_timeout_s": 0}, "placement_timeout_s"),
])
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Options.of(**kwargs)


def test_an_address_without_workers_is_refused_naming_both():
    """An address with workers=0 would be ignored (the work runs in this process)."""
    with pytest.raises(ValueError) as err:
        Options.of(address="auto")
    assert str(err.value) == (
        "address='auto' has no effect with workers=0 (the work runs in this process); pass "
        "workers=N to run on N Ray workers of that cluster, or address=None")
    with pytest.raises(ValueError, match="address='ray://head:10001' has no effect"):
        ClusterOptions(address="ray://head:10001")
    assert Options.of(address="auto", workers=2).cluster.address == "auto"


def test_unknown_names_and_wrong_types_are_refused():
    with pytest.raises(TypeError, match="unknown option 'wokers'"):
        Options.of(wokers=2)
    X = np.zeros((4, 1, 8, 8))
    with pytest.raises(TypeError, match="options must be a ray_convrfm.Options"):
        ConvRFM(options={"workers": 2}).fit(X, [0, 1, 0, 1])


def test_estimators_keep_the_scikit_learn_contract_with_composed_options():
    opts = Options.of(workers=2)
    model = ConvRFM(depth=2, options=opts)
    assert model.get_params()["options"] is opts
    copy = clone(model)
    assert copy.get_params()["options"] == opts and copy.depth == 2

    deep = DeepConvRFM(ConvRFM(iters=2, options=opts), layers=2, width=8)
    params = deep.get_params()
    assert params["estimator__iters"] == 2 and params["estimator__options"] == opts
    deep.set_params(estimator__iters=4, width=16)
    assert deep.estimator.iters == 4 and deep.width == 16
    again = clone(deep)
    assert again.get_params()["estimator__iters"] == 4
    assert again.estimator is not deep.estimator
