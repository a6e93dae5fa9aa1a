"""The in-process backend writes and reuses kernel stores like the Ray workers do."""

import numpy as np
import pytest

from ray_convrfm import ConvRFM, Options
from ray_convrfm.backends.store import StoreMismatchError
from ray_convrfm.data.datasets import load_digits


@pytest.mark.parametrize("solver", ["exact", "nystrom"])
def test_in_process_fit_resumes_from_its_store(tmp_path, solver):
    ds = load_digits()
    X, y, Xt = ds.X_train[:300], ds.y_train[:300], ds.X_test[:30]
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=6, solver=solver, centers=40)
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
