"""The one RFM loop: both estimators go through it; float64 fits match the float64 oracle."""

import numpy as np
import pytest
import reference
import torch
from sklearn.exceptions import NotFittedError

from ray_convrfm import ConvRFM, DeepConvRFM, Options, fit_rfm
from ray_convrfm.backends import KernelBackend, KernelSpec
from ray_convrfm.backends.executor import Executor, InProcessExecutor
from ray_convrfm.backends.sharded import ShardedBackend
from ray_convrfm.data.datasets import load_digits
from ray_convrfm.kernels import KernelParams
from ray_convrfm.models.rfm import Labelled, RFMParams


@pytest.fixture(scope="module")
def digits():
    ds = load_digits()
    return ds.X_train[:150], ds.y_train[:150], ds.X_train[150:190], ds.y_train[150:190]


def test_the_backend_and_both_executors_implement_their_protocols():
    ex = InProcessExecutor(np.zeros((3, 1, 8, 8), np.float32))
    assert isinstance(ex, Executor)
    assert isinstance(ShardedBackend(ex, torch.device("cpu"), 3, (1, 8, 8)), KernelBackend)
    pytest.importorskip("ray")
    from ray_convrfm.backends.ray_executor import RayExecutor

    members = {name for name in dir(Executor) if not name.startswith("_")}
    assert members <= set(dir(RayExecutor)) | {"bounds", "starts"}, \
        members - set(dir(RayExecutor))


def test_fit_rfm_is_what_the_estimator_runs(digits):
    X, y, Xv, yv = digits
    params = RFMParams(kernel=KernelParams(depth=2), iters=2, agop_samples=20)
    backend = ShardedBackend(InProcessExecutor(X), torch.device("cpu"), len(X), X.shape[1:])
    backend.configure(KernelSpec(params.kernel), None)
    rng = np.random.default_rng(3)
    rng.integers(2**31 - 1)  # the split's seed, drawn by the estimator whether used or not
    result = fit_rfm(backend, y, 10, Labelled(torch.from_numpy(Xv), yv), params, rng)
    model = ConvRFM(depth=2, iters=2, agop_samples=20, random_state=3).fit(
        X, y, X_val=Xv, y_val=yv)
    assert result.best_iter == model.best_iter_ and result.ridge == model.ridge_
    torch.testing.assert_close(result.M, model.M_)
    torch.testing.assert_close(result.alpha, model.alpha_)
    assert [h["val_acc"] for h in result.history] == [h["val_acc"] for h in model.history_]


def test_float64_input_fits_in_float64_and_matches_the_oracle(digits):
    """No dtype asked for: float64 images give float64 kernels, scores equal to the oracle."""
    X, y, Xv, yv = (a.astype(np.float64) if a.dtype.kind == "f" else a for a in digits)
    model = ConvRFM(depth=2, iters=2, agop_samples=20, ridges=(1e-3,)).fit(
        X[:60], y[:60], X_val=Xv, y_val=yv)
    assert model.X_fit_.dtype == torch.float64 and model.alpha_.dtype == torch.float64
    Xt = Xv[:4]
    K = reference.kernel_matrix(Xt, model.X_fit_.numpy(), model.M_.numpy(), 2, 3, False)
    expected = K @ model.alpha_.numpy() / model.kernel_scale_
    scores = model.decision_function(Xt)
    assert scores.dtype == np.float64
    assert np.abs(scores - expected).max() <= 1e-10 * np.abs(expected).max()
    single = ConvRFM(depth=2, iters=2, agop_samples=20, ridges=(1e-3,),
                     options=Options.of(dtype="float32")).fit(X[:60], y[:60], X_val=Xv,
                                                              y_val=yv)
    assert single.X_fit_.dtype == torch.float32  # an explicit dtype wins


def test_numpy_integers_are_accepted(digits):
    X, y, _, _ = digits
    model = ConvRFM(depth=np.int64(2), iters=np.int64(2), agop_samples=np.int32(10),
                    centers=np.int64(40), solver="nystrom").fit(X, y)
    assert len(model.history_) == 2 and model.alpha_.shape[0] == 40


def test_deep_predict_before_fit_is_not_fitted(digits):
    X, *_ = digits
    with pytest.raises(NotFittedError):
        DeepConvRFM().predict(X)
    with pytest.raises(NotFittedError):
        DeepConvRFM().decision_function(X)
    with pytest.raises(TypeError, match="estimator must be a ConvRFM"):
        DeepConvRFM(estimator="ConvRFM").fit(X, np.arange(len(X)) % 2)


def test_ties_in_accuracy_go_to_the_lower_validation_loss():
    from ray_convrfm.models.rfm import Score

    assert Score(0.9, 0.5).beats(Score(0.8, 0.1))  # accuracy first
    assert Score(0.9, 0.2).beats(Score(0.9, 0.3))  # then the squared error
    assert not Score(0.9, 0.3).beats(Score(0.9, 0.3))  # exact ties keep the earlier one
    assert Score(0.5, 9.0).beats(None)


@pytest.mark.parametrize("curve,patience,last,best", [
    ([0.5, 0.6, 0.7, 0.8, 0.9], 2, 4, 4),  # still rising: runs to the maximum
    ([0.5, 0.7, 0.6, 0.65, 0.9], 2, 3, 1),  # two iterations without a better score
    ([0.5, 0.7, 0.6, 0.65, 0.9], 3, 4, 4),  # more patience sees the late gain
    ([0.5, 0.5, 0.5, 0.5, 0.5], 1, 1, 0),  # flat: stops at once
    ([0.5, 0.4, 0.3, 0.2, 0.1], None, 4, 0),  # no patience: every iteration
])
def test_early_stopping_on_constructed_validation_curves(curve, patience, last, best):
    from ray_convrfm.models.rfm import Score, stops_early

    best_iter, best_score = None, None
    for it, acc in enumerate(curve):
        score = Score(acc, 1.0)
        if score.beats(best_score):
            best_iter, best_score = it, score
        if stops_early(it, best_iter, patience):
            break
    assert (it, best_iter) == (last, best)


def test_fit_stops_when_validation_stops_improving(digits):
    """Equal validation accuracies at every iteration: the loss decides, and patience stops."""
    X, y, Xv, yv = digits
    full = ConvRFM(depth=2, iters=6, agop_samples=20).fit(X, y, X_val=Xv, y_val=yv)
    scores = [(h["val_acc"], -h["val_loss"]) for h in full.history_]
    assert full.best_iter_ == max(range(6), key=lambda i: (scores[i], -i))
    early = ConvRFM(depth=2, iters=6, agop_samples=20, patience=1).fit(X, y, X_val=Xv,
                                                                       y_val=yv)
    stop = next((i for i in range(1, 6) if scores[i] <= max(scores[:i])), 5)
    assert len(early.history_) == stop + 1
    same = [h["val_acc"] for h in full.history_[: stop + 1]]
    assert [h["val_acc"] for h in early.history_] == same
    with pytest.raises(ValueError, match="patience"):
        ConvRFM(patience=0).fit(X, y)


def test_exact_refuses_an_n_it_cannot_hold(digits, monkeypatch):
    """Before any kernel is computed, with the memory it would need and what is available."""
    from ray_convrfm.models import rfm

    X, y, Xv, yv = digits
    monkeypatch.setattr(rfm, "available_memory_bytes", lambda: 100_000)  # 0.1 MB left
    with pytest.raises(MemoryError, match=r"solver='exact' needs about 0\.0 GiB for n = 150 "
                                          r"training images.*available.*solver='nystrom'"):
        ConvRFM(depth=2, iters=1).fit(X, y, X_val=Xv, y_val=yv)
    model = ConvRFM(depth=2, iters=1, solver="nystrom", centers=20).fit(X, y, X_val=Xv,
                                                                       y_val=yv)
    assert model.alpha_.shape[0] == 20  # Nystrom needs m x m, not n x n
