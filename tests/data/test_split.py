"""The one validation split (data/split.py): single rows stratified, blocks held out whole."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from ray_convrfm.data.split import ranges_of, split_validation


def test_rows_are_train_test_splits_stratified_split():
    y = np.repeat(np.arange(4), 25)
    fit, val = split_validation(y, np.arange(4), 0.2, 7)
    ref_fit, ref_val = train_test_split(np.arange(100), test_size=20, stratify=y,
                                        random_state=7)
    np.testing.assert_array_equal(fit, ref_fit)
    np.testing.assert_array_equal(val, ref_val)
    assert np.bincount(y[val]).tolist() == [5, 5, 5, 5]


def test_blocks_are_held_out_whole_and_partition_the_rows():
    y = np.tile(np.arange(5), 40)  # every block of 10 holds every class
    sizes = [10] * 19 + [10]
    for seed in range(5):
        fit, val = split_validation(y, np.arange(5), 0.25, seed, sizes)
        assert sorted([*fit, *val]) == list(range(200))
        assert len(val) == 50
        assert all(a % 10 == 0 and b % 10 == 0 for a, b in ranges_of(val))


def test_blocks_leave_one_to_train_even_at_a_large_fraction():
    y = np.tile(np.arange(2), 15)
    fit, val = split_validation(y, np.arange(2), 0.99, 0, [10, 10, 10])
    assert len(fit) == 10 and len(val) == 20


def test_a_block_split_that_takes_a_whole_class_is_refused_with_counts():
    y = np.array([0] * 10 + [1] * 10)
    seeds = []
    for seed in range(20):
        try:
            split_validation(y, np.array(["a", "b"]), 0.5, seed, [10, 10])
        except ValueError as exc:
            seeds.append(seed)
            assert "take every row of class(es) ['a']" in str(exc) or "['b']" in str(exc)
            assert "training rows per class" in str(exc)
    assert seeds == list(range(20))  # one of two single-class blocks is always held out


def test_units_that_do_not_partition_the_rows_are_refused():
    with pytest.raises(ValueError, match="do not partition the 20 rows"):
        split_validation(np.zeros(20, int), np.arange(1), 0.5, 0, [10, 5])
    with pytest.raises(ValueError, match="in one block cannot be split"):
        split_validation(np.zeros(20, int), np.arange(1), 0.5, 0, [20])


def test_ranges_of_joins_consecutive_rows():
    assert ranges_of(np.array([0, 1, 2, 5, 6, 9])) == ((0, 3), (5, 7), (9, 10))
    assert ranges_of(np.array([], int)) == ()
