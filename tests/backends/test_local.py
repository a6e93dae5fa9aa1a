"""The in-process backend writes and reuses kernel stores like the Ray workers do."""

import numpy as np
import pytest

from ray_convrfm import ConvRFM, Options
from ray_convrfm.backends import KernelSpec
from ray_convrfm.backends.store import StoreMismatchError
from ray_convrfm.data.datasets import load_digits
from ray_convrfm.kernels.kernel import KernelParams


@pytest.mark.parametrize("solver", ["exact", "nystrom"])
def test_in_process_fit_resumes_from_its_store(tmp_path, solver):
    ds = load_digits()
    X, y, Xt = ds.X_train[:300], ds.y_train[:300], ds.X_test[:30]
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=6, solver=solver,
              centers=None if solver == "exact" else 40)
    plain = ConvRFM(**kw).fit(X, y)
    opts = Options.of(store=str(tmp_path / "k.zarr"), block=128)
    stored = ConvRFM(options=opts, **kw).fit(X, y)
    computed = [h["stored_blocks_computed"] for h in stored.history_]
    # 270 fitting rows in blocks of 128: 3 row blocks; exact stores K(train, train) (3 x 3
    # blocks); Nystrom stores K(train, centers) as 3 row slabs (validation is scored, not
    # stored)
    assert computed == ([9, 9] if solver == "exact" else [3, 3])
    again = ConvRFM(options=opts, **kw).fit(X, y)
    assert [h["stored_blocks_computed"] for h in again.history_] == [0, 0]
    np.testing.assert_array_equal(again.decision_function(Xt), stored.decision_function(Xt))
    # float32 blocks summed in another order than the unstored (symmetric) kernel
    np.testing.assert_allclose(stored.decision_function(Xt), plain.decision_function(Xt),
                               rtol=1e-3, atol=1e-4)
    with pytest.raises(StoreMismatchError, match="another run"):
        ConvRFM(options=opts, **kw).fit(X[:290], y[:290])


def test_chunked_preparation_and_no_one_hot_targets_change_nothing(monkeypatch):
    """The Nystrom rows, validation scores and AGOP prepared one image at a time (a tiny
    ``PREPARED_SHARE``, no center cache) give the model prepared in whole blocks; and the
    Nystrom solvers never form the n x c one-hot targets (only the exact solver may)."""
    from ray_convrfm.backends import chunks
    from ray_convrfm.backends.protocol import Targets
    from ray_convrfm.backends.workers import shard

    ds = load_digits()
    X, y, Xt = ds.X_train[:200], ds.y_train[:200], ds.X_test[:30]
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=4, solver="nystrom", centers=50,
              options=Options.of(dtype="float64", block=64))
    whole = ConvRFM(**kw).fit(X, y)

    def refuse(self, device=None):
        raise AssertionError("the Nystrom solver formed the n x c targets")

    monkeypatch.setattr(Targets, "one_hot", refuse)
    monkeypatch.setattr(chunks, "PREPARED_SHARE", 1e-12)
    monkeypatch.setattr(shard, "CENTER_CACHE_SHARE", 0.0)
    spec = KernelSpec(KernelParams(2, 3, False))
    assert chunks.prepared_chunk((1, 8, 8), spec, None) == 1
    for solver in ("nystrom", "nystrom-direct"):
        chunked = ConvRFM(**dict(kw, solver=solver)).fit(X, y)
        if solver == "nystrom":
            assert chunked.best_iter_ == whole.best_iter_ and chunked.ridge_ == whole.ridge_
            assert [h["val_acc_by_ridge"] for h in chunked.history_] == \
                [h["val_acc_by_ridge"] for h in whole.history_]
            assert float((chunked.alpha_ - whole.alpha_).norm() / whole.alpha_.norm()) < 1e-9
            np.testing.assert_allclose(chunked.decision_function(Xt),
                                       whole.decision_function(Xt), rtol=1e-9, atol=1e-12)
    with pytest.raises(AssertionError, match="n x c targets"):
        ConvRFM(**dict(kw, solver="exact", centers=None)).fit(X, y)
