"""Fit inputs: the carved validation split never takes a class from training, labels and ridges
are finite, and a val_fraction too large for the data is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from ray_convrfm import ConvRFM, DeepConvRFM
from ray_convrfm.data.datasets import ImageDataset, load_digits
from ray_convrfm.data.split import split_validation
from ray_convrfm.models.inputs import prepare_fit_inputs


@pytest.fixture(scope="module")
def digits():
    ds = load_digits()
    return ds.X_train, ds.y_train


def _images(y: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((len(y), 1, 8, 8), dtype=np.float32)


def _fit_classes(y, val_fraction, seed):
    data = prepare_fit_inputs(_images(y), y, None, None, None, val_fraction,
                              np.random.default_rng(seed))
    return np.bincount(data.y_fit, minlength=len(data.classes)), data


# ------------------------------------------------------------------ every class keeps training
@pytest.mark.parametrize("seed", range(4))
def test_stratified_split_keeps_a_training_image_of_every_class(seed):
    """A 2-image class with val_fraction 0.8: the stratified split took both into validation."""
    y = np.array([0] * 2 + [1] * 20 + [2] * 20)
    counts, data = _fit_classes(y, 0.8, seed)
    assert counts.min() >= 1, counts
    assert len(data.y_val) == round(0.8 * len(y))  # validation keeps its size
    assert np.bincount(data.y_val, minlength=3).min() >= 1  # and still sees every class
    assert sorted(np.concatenate([data.y_fit, data.y_val])) == sorted(y)


@pytest.mark.parametrize("seed", range(4))
def test_small_validation_split_keeps_a_training_image_of_every_class(seed):
    """n_val < n_classes (no stratification): a random draw took whole 2-image classes."""
    y = np.repeat(np.arange(10), 2)
    counts, data = _fit_classes(y, 0.3, seed)
    assert counts.min() >= 1, counts
    assert len(data.y_val) == 6


def test_estimator_predicts_a_class_that_the_split_would_have_taken(digits):
    """End to end: the model is built on one of the rare class's two images."""
    X, y = digits
    keep = np.concatenate([np.flatnonzero(y == 0)[:2], np.flatnonzero(y == 1)[:20],
                           np.flatnonzero(y == 2)[:20]])
    model = ConvRFM(depth=2, iters=1, val_fraction=0.8, random_state=0).fit(X[keep], y[keep])
    fit_rows = model.X_fit_.numpy().reshape(len(model.X_fit_), -1)
    rare = X[keep][:2].reshape(2, -1)
    assert sum((fit_rows == r).all(1).any() for r in rare) == 1


def test_common_case_is_the_seeded_stratified_split_unchanged(digits):
    X, y = digits[0][:240], digits[1][:240]
    data = prepare_fit_inputs(X, y, None, None, None, 0.1, np.random.default_rng(0))
    seed = int(np.random.default_rng(0).integers(2**31 - 1))
    fit_idx, val_idx = train_test_split(np.arange(240), test_size=24, stratify=y,
                                        random_state=seed)
    np.testing.assert_array_equal(data.X_fit, X[fit_idx])
    np.testing.assert_array_equal(data.X_val, X[val_idx])
    np.testing.assert_array_equal(data.y_fit, y[fit_idx])


def test_a_single_image_class_is_refused_with_the_counts():
    y = np.array([0] + [1] * 10 + [2] * 10)
    with pytest.raises(ValueError, match=r"class\(es\) \[0\] have a single image") as info:
        ConvRFM(depth=1, iters=1).fit(_images(y), y)
    assert "{0: 1, 1: 10, 2: 10}" in str(info.value) and "X_val" in str(info.value)
    # with validation data given, a single image is just training data
    ConvRFM(depth=1, iters=1).fit(_images(y), y, X_val=_images(y[:4], 1), y_val=y[:4])


# ------------------------------------------------------------------ val_fraction
@pytest.mark.parametrize("cls", [ConvRFM, DeepConvRFM])
def test_val_fraction_too_large_for_the_data_is_refused_by_name(cls):
    y = np.repeat(np.arange(10), 3)  # 30 images, 10 classes
    est = ConvRFM(depth=1, iters=1, val_fraction=0.9)
    model = est if cls is ConvRFM else DeepConvRFM(est, layers=1)
    with pytest.raises(ValueError, match=r"val_fraction=0.9 holds out 27 of the 30 images, "
                                         r"leaving 3 for training, fewer than the 10 classes"
                       ) as info:
        model.fit(_images(y), y)
    assert "val_fraction < 0.68" in str(info.value)
    # what the message says works, works
    ConvRFM(depth=1, iters=1, val_fraction=0.68).fit(_images(y), y)


def test_val_fraction_just_under_one_is_refused_not_an_empty_training_set():
    y = np.repeat(np.arange(2), 10)
    with pytest.raises(ValueError, match="val_fraction=0.999 holds out 20 of the 20 images"):
        ConvRFM(depth=1, iters=1, val_fraction=0.999).fit(_images(y), y)


# ------------------------------------------------------------------ parquet row groups
def test_parquet_split_that_holds_out_every_row_of_a_class_is_refused(tmp_path):
    from ray_convrfm.data.parquet import ParquetImages, write_parquet_dataset

    y = np.array([0] * 95 + [1] * 95 + [2] * 10)  # class 2: the last row group only
    X = _images(y)
    ds = ImageDataset(X, y, X[:0], y[:0], "sorted", ("a", "b", "c"))
    write_parquet_dataset(ds, tmp_path / "pq", rows_per_group=10, rows_per_file=200)
    images = ParquetImages.open(tmp_path / "pq")
    seed = next(s for s in range(100) if _refuses(y, images.holdout_units(), s))
    with pytest.raises(ValueError, match=r"val_fraction=0.5 take every row of class\(es\) "
                                         r"\[2\]") as info:
        ConvRFM(depth=1, iters=1, val_fraction=0.5, random_state=seed).fit(images)
    assert "training rows per class: {0: " in str(info.value)
    assert "2: 0}" in str(info.value)


def _refuses(y, units, random_state):
    """Whether the block split a fit with ``random_state`` draws leaves a class untrained."""
    seed = int(np.random.default_rng(random_state).integers(2**31 - 1))
    try:
        split_validation(y, np.unique(y), 0.5, seed, units)
    except ValueError:
        return True
    return False


# ------------------------------------------------------------------ labels and ridges
@pytest.mark.parametrize("where", ["y", "y_val", "monitor y"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_labels_are_refused_naming_the_argument(where, bad):
    y = np.repeat(np.arange(3.0), 6)
    X = _images(y)
    yb = y.copy()
    yb[4] = bad
    kw = {}
    if where == "y":
        args = (X, yb)
    elif where == "y_val":
        args, kw = (X, y), dict(X_val=X, y_val=yb)
    else:
        args, kw = (X, y), dict(monitor=(X, yb))
    with pytest.raises(ValueError, match=rf"^{where} contains 1 NaN or inf labels \(first at "
                                         r"index 4\)"):
        ConvRFM(depth=1, iters=1).fit(*args, **kw)


def test_nan_labels_in_an_object_array_are_refused():
    y = np.array(["a", "b"] * 5 + [float("nan")], dtype=object)
    with pytest.raises(ValueError, match="y contains 1 NaN or inf labels"):
        ConvRFM(depth=1, iters=1).fit(_images(y), y)


@pytest.mark.parametrize("ridges", [(np.inf,), (np.nan,), (1e-3, np.nan), (1e-3, -np.inf),
                                    ("small",)])
def test_non_finite_ridges_are_refused_at_fit_time(ridges):
    y = np.repeat(np.arange(2), 10)
    with pytest.raises(ValueError, match=r"ridges must be a non-empty list of finite values"):
        ConvRFM(depth=1, iters=1, ridges=ridges).fit(_images(y), y)


def test_a_carved_split_fits_as_the_same_split_given_explicitly():
    """The split's seed is drawn whether or not it is used, so every later draw (AGOP sample,
    centres) is the same: carving and passing the carved rows as X_val give one model."""
    ds = load_digits().subset(200, 10)
    kw = dict(depth=2, iters=2, agop_samples=30, random_state=4)
    carved = ConvRFM(**kw).fit(ds.X_train, ds.y_train)
    seed = int(np.random.default_rng(4).integers(2**31 - 1))
    fit, val = split_validation(ds.y_train, np.unique(ds.y_train), carved.val_fraction, seed)
    given = ConvRFM(**kw).fit(ds.X_train[fit], ds.y_train[fit], X_val=ds.X_train[val],
                              y_val=ds.y_train[val])
    np.testing.assert_allclose(given.decision_function(ds.X_test),
                               carved.decision_function(ds.X_test), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ parameters without effect
def test_centers_with_the_exact_solver_are_refused_before_the_fit(digits, tmp_path):
    """centers is the Nystrom solver's: with solver="exact" the fit refuses it by name (a
    model saved with it still loads: the check is the fit's)."""
    X, y = digits
    said = ("centers=40 has no effect with solver='exact' (it solves over every training "
            "image); pass solver='nystrom' or solver='nystrom-direct' with centers, or "
            "centers=None")
    for model in (ConvRFM(depth=2, iters=1, centers=40),
                  DeepConvRFM(ConvRFM(iters=1, centers=40), layers=2, width=4)):
        with pytest.raises(ValueError) as err:
            model.fit(X[:60], y[:60])
        assert str(err.value) == said
    fitted = ConvRFM(depth=2, iters=1, agop_samples=10).fit(X[:60], y[:60])
    path = fitted.set_params(centers=40).save(tmp_path / "model")  # as older versions could
    assert ConvRFM.load(path).centers == 40
