"""Deep ConvRFM: one layer is ConvRFM, stacks featurise consistently and survive save/load."""

import numpy as np
import pytest
import torch

from ray_convrfm import ConvRFM, DeepConvRFM
from ray_convrfm.data.datasets import load_digits


@pytest.fixture(scope="module")
def digits():
    ds = load_digits()
    # 8x8 digits padded to 12x12 so that two layers of 3x3 convolutions fit
    pad = lambda X: np.pad(X, ((0, 0), (0, 0), (2, 2), (2, 2)))  # noqa: E731
    return (pad(ds.X_train[:200]), ds.y_train[:200], pad(ds.X_train[200:260]),
            ds.y_train[200:260], pad(ds.X_test[:60]), ds.y_test[:60])


@pytest.mark.parametrize("given_validation", [True, False])
def test_one_layer_equals_convrfm(digits, given_validation):
    """Also when the validation split is carved from X: the first layer draws its AGOP
    samples from the generator ConvRFM uses, after the split."""
    X, y, Xv, yv, Xt, _ = digits
    kw = dict(patch_size=3, iters=3, agop_samples=30, random_state=5)
    held = dict(X_val=Xv, y_val=yv) if given_validation else {}
    deep = DeepConvRFM(ConvRFM(**kw), layers=1, total_depth=2).fit(X, y, **held)
    single = ConvRFM(depth=2, **kw).fit(X, y, **held)
    assert deep.layers_[0]["filters"] is None
    torch.testing.assert_close(deep.final_.M_, single.M_)
    for path, other in zip(deep.final_.M_path_, single.M_path_, strict=True):
        torch.testing.assert_close(path, other)
    np.testing.assert_allclose(deep.decision_function(Xt), single.decision_function(Xt))


def test_first_layers_are_the_shorter_stack(digits, two_layers):
    """With the same total_depth, a stack's first L layers are the L-layer stack: one fit of
    three layers measures ConvRFM, Deep 2 and Deep 3 (examples/results_table.py)."""
    X, y, _, _, Xt, yt = digits
    one = DeepConvRFM(ConvRFM(iters=2, agop_samples=30, random_state=1), layers=1, width=8,
                      total_depth=4).fit(X, y, monitor=(Xt, yt))
    first = two_layers.layers_[0]
    assert one.layers_[0]["best_iter"] == first["best_iter"]
    torch.testing.assert_close(one.layers_[0]["M"], first["M"])
    assert [h["monitor_acc"] for h in one.layers_[0]["history"]] == \
        [h["monitor_acc"] for h in first["history"]]
    assert one.score(Xt, yt) == first["history"][first["best_iter"]]["monitor_acc"]
    assert all(info["seconds"] > 0 for info in two_layers.layers_)


@pytest.fixture(scope="module")
def two_layers(digits):
    X, y, _, _, Xt, yt = digits
    return DeepConvRFM(ConvRFM(iters=2, agop_samples=30, random_state=1), layers=2,
                       layer_patience=None,
                       width=8).fit(X, y, monitor=(Xt, yt))


def test_two_layer_stack(digits, two_layers):
    _, _, _, _, Xt, yt = digits
    m = two_layers
    first, last = m.layers_
    assert first["depth"] == 4 and last["depth"] == 3  # total_depth = layers + 2
    assert first["filters"].shape == (8, 1, 3, 3) and last["filters"] is None
    assert last["M"].shape == (72, 72)  # 8 feature maps x 3 x 3
    assert m.final_.patch_basis_.shape[1] <= 25  # their patches span a 5 x 5 receptive field
    assert all("monitor_acc" in h for h in first["history"] + last["history"])
    assert m.score(Xt, yt) > 0.8


def test_filters_follow_the_learned_metric(two_layers):
    """W = G M^filter_power (the random bank G when M = I was kept)."""
    info = two_layers.layers_[0]
    W = info["filters"].reshape(8, -1).double()
    G = torch.from_numpy(np.random.default_rng([1, 0]).standard_normal((8, 9)))
    p = two_layers.filter_power
    if info["learned"]:
        vals, vecs = torch.linalg.eigh(info["M"].double())
        expected = G @ (vecs * vals.clamp_min(0) ** p) @ vecs.T
    else:
        expected = G
    torch.testing.assert_close(W, expected, rtol=1e-5, atol=1e-6)
    # W^T W ~ AGOP^(1/2), the CNFA's relation, with filter_power = 1/4
    vals, vecs = torch.linalg.eigh(info["M"].double())
    two_layers.set_params(filter_power=0.25)
    try:
        quarter = two_layers._filters(info["M"], 1, 3, 0, True, 1).reshape(8, -1).double()
    finally:
        two_layers.set_params(filter_power=p)
    torch.testing.assert_close(quarter, G @ (vecs * vals.clamp_min(0) ** 0.25) @ vecs.T,
                               rtol=1e-5, atol=1e-6)


def test_save_load_predicts_the_same(tmp_path, digits, two_layers):
    _, _, _, _, Xt, _ = digits
    path = two_layers.save(tmp_path / "deep")
    loaded = DeepConvRFM.load(path)
    np.testing.assert_array_equal(loaded.predict(Xt), two_layers.predict(Xt))
    np.testing.assert_allclose(loaded.decision_function(Xt), two_layers.decision_function(Xt))
    assert loaded.layers_[0]["history"] == two_layers.layers_[0]["history"]
    with pytest.raises(ValueError, match="holds a DeepConvRFM"):
        ConvRFM.load(path)


def test_parameter_errors(digits):
    X, y, *_ = digits
    with pytest.raises(ValueError, match="total_depth"):
        DeepConvRFM(layers=3, total_depth=2).fit(X, y)
    with pytest.raises(ValueError, match="width"):
        DeepConvRFM(width=0).fit(X, y)
    for bad in (0, 1.5, "half", True):
        with pytest.raises(ValueError, match="filter_power"):
            DeepConvRFM(filter_power=bad).fit(X, y)
    with pytest.raises(ValueError, match="needs images of at least"):
        DeepConvRFM(layers=2, total_depth=6).fit(X, y)


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_pooling_between_layers(tmp_path, digits, activation):
    """pool=2: the second layer sees the first bank's output (rectified with "relu") pooled
    to half its size, keeps the estimator's depth, and predicts as a ConvRFM on images
    featurised by hand; the pooling and the activation survive save/load."""
    from ray_convrfm.kernels.patches import featurise, pool_images

    X, y, Xv, yv, Xt, _ = digits
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=1)
    deep = DeepConvRFM(ConvRFM(**kw), layers=2, width=6, pool=2, pool_mode="avg",
                       layer_patience=None, activation=activation).fit(
        X, y, X_val=Xv, y_val=yv)
    assert [info["depth"] for info in deep.layers_] == [2, 2]
    assert deep.final_.image_shape_ == (6, 5, 5)  # 12 -> 10 (3 x 3, no padding) -> 5
    filters = deep.layers_[0]["filters"]
    maps = featurise(torch.from_numpy(Xt), filters, False)
    maps = maps.clamp_min(0) if activation == "relu" else maps
    assert activation == "none" or bool((maps == 0).any())  # the rectifier did something
    by_hand = pool_images(maps, 2, "avg").numpy()
    np.testing.assert_allclose(deep.decision_function(Xt),
                               deep.final_.decision_function(by_hand), rtol=1e-5, atol=1e-6)
    loaded = DeepConvRFM.load(deep.save(tmp_path / "pooled"))
    assert loaded.pool == 2 and loaded.pool_mode == "avg" and loaded.activation == activation
    np.testing.assert_allclose(loaded.decision_function(Xt), deep.decision_function(Xt),
                               rtol=1e-6)


def test_feature_basis_is_the_later_layers_patch_basis(tmp_path, digits):
    """feature_basis: the first layer keeps the estimator's exact basis, the later layers work
    in the leading directions holding that share of their max-pooled feature patches' energy
    (fewer than their exact span), and the setting survives save/load."""
    X, y, Xv, yv, Xt, _ = digits
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=1)

    def fit(basis):
        return DeepConvRFM(ConvRFM(**kw), layers=2, width=6, pool=2, pool_mode="max",
                           layer_patience=None, feature_basis=basis).fit(X, y, X_val=Xv,
                                                                         y_val=yv)

    exact, shared = fit(None), fit(0.9)
    for model in (exact, shared):  # 1 x 3 x 3 pixel patches: all 9 directions
        assert model.layers_[0]["M"].shape == (9, 9)
    r_exact, r_shared = (m.final_.patch_basis_ for m in (exact, shared))
    width = 6 * 9
    assert r_shared is not None and r_shared.shape[0] == width
    assert r_shared.shape[1] < (width if r_exact is None else r_exact.shape[1])
    assert shared.final_.patch_basis == 0.9 and exact.final_.patch_basis == "auto"
    loaded = DeepConvRFM.load(shared.save(tmp_path / "feature-basis"))
    assert loaded.feature_basis == 0.9
    np.testing.assert_allclose(loaded.decision_function(Xt), shared.decision_function(Xt),
                               rtol=1e-6)


@pytest.mark.parametrize("pool", [1, 2])
def test_normalised_filters_give_feature_maps_of_unit_mean_square(tmp_path, digits, pool):
    """normalise=True: every filter of a bank is scaled so that its (pooled) feature map over
    the training images has mean square 1; the scaled filters are saved and predicted with."""
    from ray_convrfm.kernels.patches import featurise, pool_images

    X, y, Xv, yv, Xt, _ = digits
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=1)
    plain, deep = (DeepConvRFM(ConvRFM(**kw), layers=2, width=6, pool=pool, normalise=norm,
                               layer_patience=None).fit(X, y, X_val=Xv, y_val=yv)
                   for norm in (False, True))
    maps = pool_images(featurise(torch.from_numpy(X).double(),
                                 deep.layers_[0]["filters"].double(), False), pool)
    np.testing.assert_allclose(maps.square().mean((0, 2, 3)).numpy(), np.ones(6), rtol=1e-4)
    # the same directions as without normalisation, only scaled
    ratio = deep.layers_[0]["filters"] / plain.layers_[0]["filters"]
    np.testing.assert_allclose(ratio / ratio[:, :1, :1, :1], torch.ones_like(ratio), rtol=1e-4)
    loaded = DeepConvRFM.load(deep.save(tmp_path / "normalised"))
    assert loaded.normalise is True
    np.testing.assert_allclose(loaded.decision_function(Xt), deep.decision_function(Xt),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="normalise must be True or False"):
        DeepConvRFM(normalise="yes").fit(X, y)


def test_pool_errors(digits):
    X, y, *_ = digits
    for bad in (0, 1.5, "2", (2, 2)):  # (2, 2): two values for the one bank of two layers
        with pytest.raises(ValueError, match="pool must be"):
            DeepConvRFM(layers=2, pool=bad).fit(X, y)
    with pytest.raises(ValueError, match="pool_mode"):
        DeepConvRFM(layers=2, pool=2, pool_mode="median").fit(X, y)
    with pytest.raises(ValueError, match="activation must be one of"):
        DeepConvRFM(layers=2, activation="tanh").fit(X, y)
    for bad in (0, 1, "most", True):
        with pytest.raises(ValueError, match="feature_basis: patch_basis must be"):
            DeepConvRFM(layers=2, feature_basis=bad).fit(X, y)
    with pytest.raises(ValueError, match="layer 2 sees images of 1 x 1"):
        DeepConvRFM(ConvRFM(depth=1), layers=3, pool=2).fit(X, y)  # 12 -> 5 -> 1


def _stack_rule(val_acc: list[float], patience: int, most: int) -> tuple[int, int]:
    """(layers fitted, layers kept) by the rule, from each fitted layer's validation accuracy:
    a layer beats the best so far only strictly; fitting stops ``patience`` layers after it."""
    best = 0
    for layer, acc in enumerate(val_acc):
        best = layer if acc > val_acc[best] else best
        if layer - best >= patience:
            return layer + 1, best + 1
    return min(len(val_acc), most), best + 1


@pytest.mark.parametrize("width", [1, 8])  # one filter: the second layer is likely worse
def test_the_number_of_layers_is_chosen_on_validation(tmp_path, digits, width):
    """layers is the most: the stack stops after a layer that does not beat the best on
    validation and keeps the best one; it is the stack a fit of that many layers gives (same
    total_depth), and survives save/load."""
    X, y, Xv, yv, Xt, _ = digits
    base = ConvRFM(iters=2, agop_samples=20, random_state=3)
    chosen = DeepConvRFM(base, layers=3, width=width, total_depth=4, layer_patience=1).fit(
        X, y, X_val=Xv, y_val=yv)
    fitted, kept = _stack_rule(chosen.layer_val_acc_, 1, 3)
    assert len(chosen.layer_val_acc_) == fitted and len(chosen.layers_) == kept
    assert chosen.layers_[-1]["filters"] is None
    assert chosen.final_.depth == 4 - (kept - 1)
    same = DeepConvRFM(base, layers=kept, width=width, total_depth=4,
                       layer_patience=None).fit(X, y, X_val=Xv, y_val=yv)
    np.testing.assert_allclose(chosen.decision_function(Xt), same.decision_function(Xt),
                               rtol=1e-6, atol=1e-7)
    loaded = DeepConvRFM.load(chosen.save(tmp_path / f"chosen{width}"))
    assert loaded.layer_val_acc_ == chosen.layer_val_acc_ and len(loaded.layers_) == kept
    np.testing.assert_allclose(loaded.decision_function(Xt), chosen.decision_function(Xt),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="layer_patience"):
        DeepConvRFM(layer_patience=0).fit(X, y)
