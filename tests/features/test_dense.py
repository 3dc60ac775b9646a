"""Numeric features: standardize, log1p then standardize, quantile buckets; missing values."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from twotower.features.dense import DenseTransform, as_float
from twotower.features.specs import DenseFeature
from twotower.features.transform import MISSING, FitContext

INF = float("inf")
NAN = float("nan")


def _fitted(values: list, **spec) -> DenseTransform:
    transform = DenseTransform(DenseFeature("x", "x", **spec))
    transform.fit(pa.array(values, pa.float64()), FitContext())
    return transform


def test_as_float_counts_null_nan_and_inf_as_missing() -> None:
    x, missing = as_float(pa.array([1.5, None, NAN, INF, -INF, 0.0]))
    assert missing.tolist() == [False, True, True, True, True, False]
    assert x.tolist() == [1.5, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_standardize_by_hand() -> None:
    # Observed 1, 2, 3 (NaN is missing): mean 2, population std sqrt(2/3).
    transform = _fitted([1.0, 2.0, 3.0, NAN])
    assert transform.mean == 2.0
    assert transform.std == pytest.approx(math.sqrt(2 / 3))
    out = transform.transform(pa.array([1.0, 2.0, 3.0, NAN, None, INF, -INF, 5.0]))
    s = math.sqrt(2 / 3)
    expected = [
        [-1 / s, 0],
        [0, 0],
        [1 / s, 0],
        [0, 1],  # NaN
        [0, 1],  # null
        [0, 1],  # +inf
        [0, 1],  # -inf
        [3 / s, 0],
    ]
    assert out.dtype == np.float32
    assert out.shape == (8, 2)
    np.testing.assert_allclose(out, np.array(expected, np.float32), rtol=1e-6)


def test_standardize_matches_numpy() -> None:
    values = np.random.default_rng(0).lognormal(size=50)
    transform = _fitted(values.tolist())
    out = transform.transform(pa.array(values))
    np.testing.assert_allclose(out[:, 0], (values - values.mean()) / values.std(), rtol=1e-5)
    assert not out[:, 1].any()


def test_missing_values_do_not_shift_the_statistics() -> None:
    with_missing = _fitted([1.0, None, 2.0, INF, 3.0, -INF, NAN])
    without = _fitted([1.0, 2.0, 3.0])
    assert (with_missing.mean, with_missing.std) == (without.mean, without.std)


def test_integer_column_with_nulls() -> None:
    transform = DenseTransform(DenseFeature("x", "x"))
    transform.fit(pa.array([1, 3, None], pa.int64()), FitContext())  # mean 2, std 1
    np.testing.assert_array_equal(
        transform.transform(pa.array([3, None], pa.int64())), [[1, 0], [0, 1]]
    )


def test_log1p_is_signed() -> None:
    # sign(x) * log1p(|x|): e - 1 -> 1, 0 -> 0, -(e - 1) -> -1; mean 0, std sqrt(2/3).
    e = math.e
    transform = _fitted([-(e - 1), 0.0, e - 1], transform="log1p")
    assert transform.mean == pytest.approx(0.0, abs=1e-12)
    assert transform.std == pytest.approx(math.sqrt(2 / 3))
    out = transform.transform(pa.array([-(e**2 - 1), e - 1, NAN]))
    s = math.sqrt(2 / 3)
    np.testing.assert_allclose(out, np.array([[-2 / s, 0], [1 / s, 0], [0, 1]], np.float32))


def test_constant_column_keeps_std_1() -> None:
    transform = _fitted([5.0, 5.0, 5.0])
    assert (transform.mean, transform.std) == (5.0, 1.0)
    np.testing.assert_array_equal(transform.transform(pa.array([5.0, 7.0])), [[0, 0], [2, 0]])


def test_all_missing_column_is_all_flagged() -> None:
    transform = _fitted([None, NAN])
    assert (transform.mean, transform.std) == (0.0, 1.0)
    np.testing.assert_array_equal(transform.transform(pa.array([4.0, None])), [[4, 0], [0, 1]])


def test_bucketize_boundaries_and_values_on_a_boundary() -> None:
    # 0..4, 4 buckets: quantiles at 1/4, 2/4, 3/4 are 1, 2, 3.
    transform = _fitted([0.0, 1.0, 2.0, 3.0, 4.0, None], transform="bucketize", num_buckets=4)
    np.testing.assert_array_equal(transform.boundaries, [1.0, 2.0, 3.0])
    assert transform.size == 3 + 2  # buckets 1..4 and the missing bucket 0
    values = [-5.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 10.0, NAN, None, INF, -INF]
    buckets = transform.transform(pa.array(values))
    assert buckets.dtype == np.int64
    # A value equal to a boundary goes to the bucket above it: 1 -> 2, 2 -> 3, 3 -> 4.
    assert buckets.tolist() == [1, 1, 1, 2, 2, 3, 4, 4, MISSING, MISSING, MISSING, MISSING]


def test_bucketize_merges_equal_quantiles() -> None:
    # Quantiles 0, 0, 0 of [0, 0, 0, 0, 1] collapse into one boundary.
    transform = _fitted([0.0, 0.0, 0.0, 0.0, 1.0], transform="bucketize", num_buckets=4)
    np.testing.assert_array_equal(transform.boundaries, [0.0])
    assert transform.size == 3
    assert transform.transform(pa.array([-1.0, 0.0, 1.0])).tolist() == [1, 2, 2]


def test_bucketize_with_nothing_observed_in_training() -> None:
    transform = _fitted([None, NAN], transform="bucketize")
    assert transform.size == 2
    assert transform.transform(pa.array([3.0, None])).tolist() == [1, MISSING]


@pytest.mark.parametrize(
    "spec", [{}, {"transform": "log1p"}, {"transform": "bucketize", "num_buckets": 3}]
)
def test_state_round_trip(spec: dict) -> None:
    transform = _fitted([0.5, 1.0, 7.0, -2.0, None], **spec)
    meta, arrays = transform.state()
    restored = DenseTransform(transform.spec)
    restored.load_state(meta, arrays)
    probe = pa.array([-3.0, 0.0, 1.0, 100.0, None, NAN])
    np.testing.assert_array_equal(restored.transform(probe), transform.transform(probe))
