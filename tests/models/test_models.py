"""The ConvRFM estimator: contract, choices on validation only, persistence, input errors."""

import json

import numpy as np
import pytest
import torch
from sklearn.base import clone

from ray_convrfm import ConvRFM, Options
from ray_convrfm.data.datasets import load_digits
from ray_convrfm.models.convrfm import FORMAT_VERSION


@pytest.fixture(scope="module")
def digits():
    ds = load_digits()
    return ds.X_train[:240], ds.y_train[:240], ds.X_test[:60], ds.y_test[:60]


@pytest.fixture(scope="module")
def fitted(digits):
    X, y, Xt, yt = digits
    return ConvRFM(depth=2, iters=3, agop_samples=40, random_state=0).fit(X, y, monitor=(Xt, yt))


def test_fit_returns_self_and_learned_state(digits, fitted):
    X, y, Xt, yt = digits
    m = fitted
    assert isinstance(m, ConvRFM)
    assert m.M_.shape == (9, 9) and m.alpha_.shape[1] == 10
    assert m.ridge_ in m.ridges and 0 <= m.best_iter_ < 3
    assert len(m.history_) == 3 and len(m.M_path_) == 3
    assert torch.allclose(m.M_path_[0], torch.eye(9))
    assert torch.allclose(m.M_, m.M_path_[m.best_iter_])
    for h in m.history_:
        assert {"val_acc", "train_mse", "seconds_kernel", "seconds_solve", "seconds_agop",
                "monitor_acc", "seconds_monitor", "ridge"} <= set(h)
        assert h["seconds_monitor"] >= 0
    assert m.history_[m.best_iter_]["val_acc"] == max(h["val_acc"] for h in m.history_)
    assert m.score(Xt, yt) > 0.85
    assert m.predict(Xt).shape == (60,) and m.decision_function(Xt).shape == (60, 10)
    # later metrics are learned: unit Frobenius norm and not the identity
    M1 = m.M_path_[1]
    assert abs(float(torch.linalg.matrix_norm(M1)) - 1) < 1e-5
    assert not torch.allclose(M1 / M1.norm(), torch.eye(9) / 3, atol=1e-3)


def test_constructor_only_stores_and_clone_works():
    m = ConvRFM(depth=2, iters=7, ridges=(1e-3,))
    assert m.get_params()["iters"] == 7
    assert not hasattr(m, "M_")
    c = clone(m)
    assert c.get_params() == m.get_params()


def test_monitor_never_changes_choices(digits, fitted):
    X, y, _, _ = digits
    plain = ConvRFM(depth=2, iters=3, agop_samples=40, random_state=0).fit(X, y)
    assert plain.best_iter_ == fitted.best_iter_ and plain.ridge_ == fitted.ridge_
    assert torch.allclose(plain.M_, fitted.M_)


def test_explicit_validation_set(digits):
    X, y, Xt, yt = digits
    m = ConvRFM(depth=2, iters=1).fit(X, y, X_val=Xt, y_val=yt)
    assert m.X_fit_.shape[0] == len(X)  # nothing carved out
    assert m.history_[0]["val_acc"] == pytest.approx(m.score(Xt, yt))


def test_save_load_round_trip(tmp_path, digits, fitted):
    _, _, Xt, _ = digits
    path = fitted.save(tmp_path / "model")
    loaded = ConvRFM.load(path)
    np.testing.assert_array_equal(loaded.predict(Xt), fitted.predict(Xt))
    np.testing.assert_allclose(loaded.decision_function(Xt), fitted.decision_function(Xt))
    assert loaded.history_ == json.loads(json.dumps(fitted.history_))
    assert loaded.get_params() == fitted.get_params()
    assert not list(tmp_path.rglob("*.pkl"))


def test_load_refuses_other_versions_and_non_models(tmp_path, fitted):
    path = fitted.save(tmp_path / "model")
    cfg = json.loads((path / "config.json").read_text())
    cfg["format_version"] = FORMAT_VERSION + 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format version"):
        ConvRFM.load(path)
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        ConvRFM.load(tmp_path)


def test_string_labels(digits):
    X, y, Xt, yt = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])
    m = ConvRFM(depth=2, iters=1).fit(X, names[y])
    assert set(m.predict(Xt)) <= set(names)


@pytest.mark.parametrize("mutate,message", [
    (lambda X, y: (X[:, 0], y), r"shape \(n, C, H, W\)"),
    (lambda X, y: (X, y[:-1]), "labels for"),
    (lambda X, y: (np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), y), "NaN"),
    (lambda X, y: (X, np.zeros_like(y)), "at least 2 classes"),
    (lambda X, y: (X[:, :, :2, :2], y), "larger than the image"),
])
def test_fit_input_errors(digits, mutate, message):
    X, y, _, _ = digits
    Xb, yb = mutate(X, y)
    with pytest.raises(ValueError, match=message):
        ConvRFM(depth=1, iters=1).fit(Xb, yb)


def test_predict_input_errors(digits, fitted):
    _, _, Xt, _ = digits
    with pytest.raises(ValueError, match="3 channels; the model was fitted on 1"):
        fitted.predict(np.repeat(Xt, 3, axis=1))
    with pytest.raises(ValueError, match="size"):
        fitted.predict(np.zeros((2, 1, 9, 9)))
    with pytest.raises(Exception, match="not fitted"):
        ConvRFM().predict(Xt)


@pytest.mark.parametrize("kwargs,message", [
    ({"iters": 0}, "iters"), ({"ridges": ()}, "ridges"), ({"val_fraction": 1.5}, "val_fraction"),
    ({"agop_samples": 0}, "agop_samples"), ({"agop_power": -1}, "agop_power"),
    ({"depth": 0}, "depth"), ({"metric_floor": 1.0}, "metric_floor"),
    ({"metric_floor": "0.1"}, "metric_floor"),
])
def test_parameter_errors(digits, kwargs, message):
    X, y, _, _ = digits
    with pytest.raises(ValueError, match=message):
        ConvRFM(**kwargs).fit(X, y)


def test_nystrom_with_every_image_as_center_equals_exact(digits):
    X, y, Xt, _ = digits
    kw = dict(depth=2, iters=2, agop_samples=30, ridges=(1e-5, 1e-3),
              options=Options.of(dtype="float64"))
    exact = ConvRFM(**kw).fit(X, y)
    n_fit = exact.X_fit_.shape[0]
    nys = ConvRFM(solver="nystrom", centers=n_fit, **kw).fit(X, y)
    assert nys.center_indices_.tolist() == list(range(n_fit))
    assert nys.best_iter_ == exact.best_iter_ and nys.ridge_ == exact.ridge_
    np.testing.assert_allclose(nys.decision_function(Xt), exact.decision_function(Xt),
                               rtol=1e-4, atol=1e-6)
    for a, b in zip(nys.history_, exact.history_, strict=True):
        assert a["train_mse"] == pytest.approx(b["train_mse"], rel=1e-3, abs=1e-12)


def test_nystrom_with_fewer_centers(tmp_path, digits):
    X, y, Xt, yt = digits
    m = ConvRFM(depth=2, iters=2, agop_samples=30, solver="nystrom", centers=80).fit(X, y)
    assert m.alpha_.shape == (80, 10) and m.X_fit_.shape[0] == 80
    assert m.score(Xt, yt) > 0.8
    loaded = ConvRFM.load(m.save(tmp_path / "nys"))
    np.testing.assert_array_equal(loaded.center_indices_, m.center_indices_)
    np.testing.assert_array_equal(loaded.predict(Xt), m.predict(Xt))
    with pytest.raises(ValueError, match="solver"):
        ConvRFM(solver="lsqr").fit(X, y)


def test_iterative_nystrom_equals_the_direct_solve(digits):
    """Preconditioned CG over resident rows (the default) against the m x m normal equations."""
    X, y, Xt, _ = digits
    kw = dict(depth=2, iters=2, agop_samples=30, centers=60, ridges=(1e-5, 1e-3),
              options=Options.of(dtype="float64"))
    pcg = ConvRFM(solver="nystrom", **kw).fit(X, y)
    direct = ConvRFM(solver="nystrom-direct", **kw).fit(X, y)
    assert pcg.best_iter_ == direct.best_iter_ and pcg.ridge_ == direct.ridge_
    rel = float((pcg.alpha_ - direct.alpha_).norm() / direct.alpha_.norm())
    assert rel <= 1e-4
    np.testing.assert_array_equal(pcg.predict(Xt), direct.predict(Xt))
    for h in pcg.history_:
        assert set(h["cg_iterations_by_ridge"]) == {repr(1e-5), repr(1e-3)}
        assert all(0 < k < 200 for k in h["cg_iterations_by_ridge"].values())
        assert all(r <= 1e-8 for r in h["cg_residual_by_ridge"].values())
    assert "cg_iterations_by_ridge" not in direct.history_[0]


def test_rows_beyond_the_resident_budget_are_read_back_from_zarr(digits):
    """``resident_mb=0``: every slab of K(train, centers) goes to a temporary zarr store and
    is read back (checked) at every CG step; the model is the in-memory one, bit for bit."""
    X, y, Xt, _ = digits
    kw = dict(depth=2, iters=2, agop_samples=30, centers=60, ridges=(1e-5, 1e-3),
              solver="nystrom")
    memory = ConvRFM(options=Options.of(dtype="float64", block=64), **kw).fit(X, y)
    spilled = ConvRFM(options=Options.of(dtype="float64", block=64, resident_mb=0),
                      **kw).fit(X, y)
    assert torch.equal(spilled.alpha_, memory.alpha_)
    assert [h["cg_iterations_by_ridge"] for h in spilled.history_] == \
        [h["cg_iterations_by_ridge"] for h in memory.history_]
    assert all(h["seconds_reading_rows"] > 0 for h in spilled.history_)
    assert all(h["seconds_reading_rows"] == 0 for h in memory.history_)


def test_rank_q_preconditioner_fit_equals_the_direct_solve(digits):
    """A rank-20 preconditioner for 60 centers (m x q numbers, not m x m): the same model."""
    X, y, Xt, _ = digits
    kw = dict(depth=2, iters=2, agop_samples=30, centers=60, ridges=(1e-5, 1e-3))
    low = ConvRFM(solver="nystrom", options=Options.of(dtype="float64", preconditioner_rank=20),
                  **kw).fit(X, y)
    direct = ConvRFM(solver="nystrom-direct", options=Options.of(dtype="float64"),
                     **kw).fit(X, y)
    assert low.best_iter_ == direct.best_iter_ and low.ridge_ == direct.ridge_
    assert float((low.alpha_ - direct.alpha_).norm() / direct.alpha_.norm()) <= 1e-4
    np.testing.assert_array_equal(low.predict(Xt), direct.predict(Xt))
    assert all(r <= 1e-8 for h in low.history_ for r in h["cg_residual_by_ridge"].values())


def test_agop_classes_sketch_the_class_outputs(digits):
    """k >= c classes: an orthogonal sketch, the exact AGOP (same M to rounding); k < c: a
    seeded sketch, recorded per iteration; bad values name the parameter."""
    X, y, Xt, _ = digits
    kw = dict(depth=2, iters=2, agop_samples=30, options=Options.of(dtype="float64"))
    exact = ConvRFM(agop_classes="all", **kw).fit(X, y)
    wide = ConvRFM(agop_classes=10, **kw).fit(X, y)
    torch.testing.assert_close(wide.M_path_[1], exact.M_path_[1], rtol=1e-8, atol=1e-12)
    assert "agop_classes" not in exact.history_[0] and wide.history_[0]["agop_classes"] == 10
    narrow = ConvRFM(agop_classes=3, **kw).fit(X, y)
    again = ConvRFM(agop_classes=3, **kw).fit(X, y)
    assert narrow.history_[0]["agop_classes"] == 3
    torch.testing.assert_close(narrow.M_path_[1], again.M_path_[1])  # seeded
    assert not torch.allclose(narrow.M_path_[1], exact.M_path_[1])
    for bad in (0, -2, "some", 2.5, True):
        with pytest.raises(ValueError, match="agop_classes"):
            ConvRFM(agop_classes=bad, iters=1).fit(X, y)


def test_a_fitted_model_keeps_its_workers_but_never_pickles_them():
    """The fit's (in-process) workers serve the model's predictions; pickling, deep copies and
    clones carry none, and a copy opens its own on its first prediction."""
    import copy
    import pickle

    from sklearn.base import clone

    from ray_convrfm import ConvRFM
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    model = ConvRFM(depth=2, iters=1).fit(ds.X_train[:120], ds.y_train[:120])
    kept = model._backend
    assert kept is not None and kept.n == len(model.X_fit_)
    first = model.decision_function(ds.X_test[:20])
    assert model._backend is kept  # reused, not reopened
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert other._backend is None
        np.testing.assert_array_equal(other.decision_function(ds.X_test[:20]), first)
    assert clone(model)._backend is None
    with model:
        pass
    assert model._backend is None


def test_other_options_reopen_the_workers_the_same_options_reuse_them():
    from ray_convrfm import ConvRFM, Options
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    model = ConvRFM(depth=2, iters=1).fit(ds.X_train[:120], ds.y_train[:120])
    kept = model._backend
    first = model.decision_function(ds.X_test[:20])
    model.set_params(options=Options.of(dtype="float64"))
    np.testing.assert_allclose(model.decision_function(ds.X_test[:20]), first, rtol=1e-4,
                               atol=1e-5)  # the float64 kernel of the float32 model
    assert model._backend is not kept and model._backend.dtype == torch.float64
    again = model._backend
    model.decision_function(ds.X_test[:20])
    assert model._backend is again
