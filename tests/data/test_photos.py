"""The natural-image task: crops of scikit-image's photographs, train, validation and test from
disjoint tiles, labelled by photograph."""

import numpy as np
import pytest

pytest.importorskip("skimage")

from ray_convrfm.data import photos  # noqa: E402
from ray_convrfm.data.datasets import load_dataset  # noqa: E402


def test_crops_are_seeded_balanced_and_from_disjoint_tiles():
    ds = photos.load_photo_crops(n_train=45, n_test=25, n_val=20, size=16, random_state=3)
    assert ds.X_train.shape == (45, 3, 16, 16) and ds.X_test.shape == (25, 3, 16, 16)
    assert ds.X_val.shape == (20, 3, 16, 16) and set(np.bincount(ds.y_val)) == {2}
    assert ds.X_train.dtype == np.float32 and 0 <= ds.X_train.min() <= ds.X_train.max() <= 1
    assert ds.classes == photos.PHOTOS and set(np.bincount(ds.y_train)) <= {4, 5}
    again = photos.load_photo_crops(n_train=45, n_test=25, n_val=20, size=16, random_state=3)
    np.testing.assert_array_equal(again.X_train, ds.X_train)
    np.testing.assert_array_equal(again.X_val, ds.X_val)
    # the three splits' tiles partition the grid, each row and column of tiles holding all
    grid = {role: set(photos.tiles_of(role)) for role in ("train", "validation", "test")}
    assert sum(map(len, grid.values())) == photos.GRID ** 2 == len(set().union(*grid.values()))
    for role, tiles in grid.items():
        assert {r for r, _ in tiles} == {c for _, c in tiles} == set(range(photos.GRID)), role
    # every crop is a window of its photograph lying wholly inside a tile of its split
    for X, y, role in ((ds.X_train, ds.y_train, "train"), (ds.X_val, ds.y_val, "validation"),
                       (ds.X_test, ds.y_test, "test")):
        for x, label in zip(X[:10], y[:10], strict=True):
            photo = photos._photograph(photos.PHOTOS[label])
            rows, cols = photos.tile_edges(photo)
            H, W = photo.shape[1:]
            candidates = zip(*np.nonzero(photo[0, : H - 15, : W - 15] == x[0, 0, 0]),
                             strict=True)
            hits = [(t, c) for t, c in candidates
                    if np.array_equal(photo[:, t : t + 16, c : c + 16], x)]
            assert hits, "a crop is not a window of its photograph"
            t, c = hits[0]
            r, q = np.searchsorted(rows, t, "right") - 1, np.searchsorted(cols, c, "right") - 1
            assert (r, q) in grid[role] and t + 16 <= rows[r + 1] and c + 16 <= cols[q + 1]


def test_the_spec_and_its_errors():
    ds = load_dataset("photos")
    assert ds.name == "photos32" and len(ds.X_train) == 2000 and len(ds.X_test) == 2000
    assert len(ds.X_val) == 400 and ds.validation().keys() == {"X_val", "y_val"}
    assert len(ds.subset(100, 50).X_val) == 400  # the validation split is kept whole
    with pytest.raises(ValueError, match="one training and one validation crop per photograph"):
        photos.load_photo_crops(n_train=3)
    with pytest.raises(ValueError, match="n_val=5"):
        photos.load_photo_crops(n_val=5)
    with pytest.raises(ValueError, match="do not fit"):
        photos.load_photo_crops(size=100)
