"""The natural-image task: crops of scikit-image's photographs, train and test from disjoint
bands, labelled by photograph."""

import numpy as np
import pytest

pytest.importorskip("skimage")

from ray_convrfm.data import photos  # noqa: E402
from ray_convrfm.data.datasets import load_dataset  # noqa: E402


def test_crops_are_seeded_balanced_and_from_disjoint_bands():
    ds = photos.load_photo_crops(n_train=45, n_test=25, size=16, random_state=3)
    assert ds.X_train.shape == (45, 3, 16, 16) and ds.X_test.shape == (25, 3, 16, 16)
    assert ds.X_train.dtype == np.float32 and 0 <= ds.X_train.min() <= ds.X_train.max() <= 1
    assert ds.classes == photos.PHOTOS and set(np.bincount(ds.y_train)) <= {4, 5}
    again = photos.load_photo_crops(n_train=45, n_test=25, size=16, random_state=3)
    np.testing.assert_array_equal(again.X_train, ds.X_train)
    # every crop is a window of its photograph lying in a band of its split
    for X, y, parity in ((ds.X_train, ds.y_train, 0), (ds.X_test, ds.y_test, 1)):
        for x, label in zip(X[:12], y[:12], strict=True):
            photo = photos._photograph(photos.PHOTOS[label])
            W = photo.shape[2]
            edges = np.linspace(0, W, photos.BANDS + 1).astype(int)
            candidates = zip(*np.nonzero(photo[0, : photo.shape[1] - 15, : W - 15] == x[0, 0, 0]),
                             strict=True)
            hits = [(t, c) for t, c in candidates
                    if np.array_equal(photo[:, t : t + 16, c : c + 16], x)]
            assert hits, "a crop is not a window of its photograph"
            t, c = hits[0]
            band = np.searchsorted(edges, c, side="right") - 1
            assert band % 2 == parity and c + 16 <= edges[band + 1]


def test_the_spec_and_its_errors():
    ds = load_dataset("photos")
    assert ds.name == "photos32" and len(ds.X_train) == 2000 and len(ds.X_test) == 2000
    with pytest.raises(ValueError, match="at least one training crop per photograph"):
        photos.load_photo_crops(n_train=3)
    with pytest.raises(ValueError, match="do not fit"):
        photos.load_photo_crops(size=100)
