"""Moments / merge_moments / merge_all / finalize against reference.py and their algebra."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchnorm import reference
from batchnorm.stats import Moments, finalize, merge_all, merge_moments

TOL = dict(rtol=1e-10, atol=1e-10)


def assert_moments_close(a: Moments, b: Moments, **tol) -> None:
    assert np.array_equal(np.asarray(a.count), np.asarray(b.count))
    np.testing.assert_allclose(a.mean, b.mean, **(tol or TOL))
    np.testing.assert_allclose(a.m2, b.m2, **(tol or TOL))


def assert_moments_equal(a: Moments, b: Moments) -> None:
    assert np.array_equal(np.asarray(a.count), np.asarray(b.count))
    assert np.array_equal(a.mean, b.mean, equal_nan=True)
    assert np.array_equal(a.m2, b.m2, equal_nan=True)


@st.composite
def batches(draw, min_rows=0, channels=None):
    """An (N, C, *) float64 array with a random offset and scale, N >= min_rows."""
    n = draw(st.integers(min_rows, 12))
    c = channels if channels is not None else draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 3), max_size=2))
    seed = draw(st.integers(0, 2**32 - 1))
    offset = draw(st.floats(-1e4, 1e4))
    scale = draw(st.floats(1e-2, 1e2))
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, c, *spatial)) * scale + offset


@st.composite
def batch_triples(draw):
    """Three batches with the same number of channels (possibly empty, different shapes)."""
    c = draw(st.integers(1, 4))
    return [draw(batches(min_rows=0, channels=c)) for _ in range(3)]


def split_rows(x: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    cuts = sorted(min(k, x.shape[0]) for k in cuts)
    return np.split(x, cuts, axis=0)


# -- from_array and finalize against the reference ------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(2, 1), (7, 3), (60, 100), (2, 3, 1, 1), (4, 3, 5, 6)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_from_array_finalize_matches_reference(shape):
    x = np.random.default_rng(0).standard_normal(shape) * 3 + 2
    mean, var, var_unbiased = finalize(Moments.from_array(x))
    _, mu_B, sigma2_B = reference.batch_norm_train(x)
    pooled_mean, pooled_var_unbiased = reference.population_statistics([x])
    np.testing.assert_allclose(mean, mu_B, **TOL)
    np.testing.assert_allclose(var, sigma2_B, **TOL)
    np.testing.assert_allclose(var_unbiased, pooled_var_unbiased, **TOL)
    np.testing.assert_allclose(mean, pooled_mean, **TOL)


def test_from_array_count_is_values_per_channel():
    s = Moments.from_array(np.zeros((3, 2, 4, 5)))
    assert s.count == 60 and isinstance(s.count, int)
    assert s.num_features == 2 and s.mean.dtype == np.float64 and s.m2.dtype == np.float64


def test_from_array_rejects_1d():
    with pytest.raises(ValueError, match=r"Moments.from_array\(\): expected .* got shape \(5,\)"):
        Moments.from_array(np.zeros(5))


def test_from_array_of_empty_batch_is_identity():
    s = Moments.from_array(np.zeros((0, 3, 2)))
    assert_moments_equal(s, Moments.empty(3))


def test_finalize_small_counts():
    # By hand: count 0 -> all NaN; count 1 -> var 0, var_unbiased NaN; count 2 of {1, 3}:
    # mean 2, m2 = 1 + 1 = 2, var = 2 / 2 = 1, bessel = 2 / 1, var_unbiased = 2.
    s = Moments(np.array([0, 1, 2]), np.array([0.0, 5.0, 2.0]), np.array([0.0, 0.0, 2.0]))
    mean, var, var_unbiased = finalize(s)
    np.testing.assert_array_equal(mean, [np.nan, 5.0, 2.0])
    np.testing.assert_array_equal(var, [np.nan, 0.0, 1.0])
    np.testing.assert_array_equal(var_unbiased, [np.nan, np.nan, 2.0])


def test_merge_large_mean_small_std_is_accurate():
    # Mean 1e4, std 1e-2 split into 10 uneven pieces: the merged variance keeps ~1e-12.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, 1)) * 1e-2 + 1e4
    parts = [
        Moments.from_array(p) for p in split_rows(x, [3, 4, 100, 101, 500, 731, 900, 998, 999])
    ]
    _, var, _ = finalize(merge_all(parts))
    _, _, sigma2_B = reference.batch_norm_train(x)
    np.testing.assert_allclose(var, sigma2_B, rtol=1e-10, atol=0)


def test_merge_propagates_nan_and_inf_per_channel():
    x = np.random.default_rng(2).standard_normal((10, 3))
    x[2, 0] = np.nan
    x[7, 1] = np.inf
    merged = merge_all(Moments.from_array(p) for p in split_rows(x, [5]))
    with np.errstate(invalid="ignore"):
        _, mu_B, sigma2_B = reference.batch_norm_train(x)
    mean, var, _ = finalize(merged)
    np.testing.assert_array_equal(mean[:2], mu_B[:2])  # NaN, Inf
    assert np.isnan(var[0]) and np.isnan(var[1])
    np.testing.assert_allclose([mean[2], var[2]], [mu_B[2], sigma2_B[2]], **TOL)


def test_merge_rejects_channel_mismatch():
    with pytest.raises(
        ValueError,
        match=r"merge_moments\(\): expected .* same number of channels, got \(2,\) and \(3,\)",
    ):
        merge_moments(Moments.empty(2), Moments.empty(3))


def test_merge_all_rejects_empty_iterable():
    with pytest.raises(ValueError, match=r"merge_all\(\): expected at least one Moments"):
        merge_all([])


def test_merge_per_channel_counts():
    # Per-channel counts (arrays) merge elementwise; channel 1 is empty on the left.
    a = Moments(np.array([2, 0]), np.array([1.0, 0.0]), np.array([2.0, 0.0]))
    b = Moments(np.array([2, 3]), np.array([3.0, 4.0]), np.array([2.0, 6.0]))
    merged = merge_moments(a, b)
    # Channel 0: {0, 2} and {2, 4}: mean 2, m2 = 2 + 2 + (3 - 1)^2 * 2 * 2 / 4 = 8.
    np.testing.assert_array_equal(merged.count, [4, 3])
    np.testing.assert_array_equal(merged.mean, [2.0, 4.0])
    np.testing.assert_array_equal(merged.m2, [8.0, 6.0])


# -- properties ------------------------------------------------------------------------------


@given(x=batches(min_rows=1), cuts=st.lists(st.integers(0, 12), max_size=4))
def test_merge_of_splits_equals_whole(x, cuts):
    parts = [Moments.from_array(p) for p in split_rows(x, cuts)]
    whole = Moments.from_array(x)
    # Merging and one pass round differently: relative 1e-9 covers it, and the absolute term
    # covers an M2 near 0 whose rounding scales with the data's magnitude squared.
    scale = max(1.0, float(np.abs(x).max()))
    assert_moments_close(merge_all(parts), whole, rtol=1e-9, atol=1e-12 * scale**2)


@given(xs=batch_triples())
def test_merge_is_associative(xs):
    a, b, d = (Moments.from_array(x) for x in xs)
    left = merge_moments(merge_moments(a, b), d)
    right = merge_moments(a, merge_moments(b, d))
    scale = max(1.0, *(float(np.abs(x).max(initial=0.0)) for x in xs))
    assert_moments_close(left, right, rtol=1e-9, atol=1e-12 * scale**2)


@given(x=batches(min_rows=0))
def test_merge_with_empty_is_exact_identity(x):
    s = Moments.from_array(x)
    empty = Moments.empty(s.num_features)
    assert_moments_equal(merge_moments(s, empty), s)
    assert_moments_equal(merge_moments(empty, s), s)


@given(x=batches(min_rows=0))
def test_merge_ignores_garbage_on_empty_side(x):
    # count 0 is decisive: whatever mean/m2 an empty side carries (even NaN) is ignored.
    s = Moments.from_array(x)
    junk = Moments(0, np.full(s.num_features, np.nan), np.full(s.num_features, np.inf))
    assert_moments_equal(merge_moments(s, junk), s)
    assert_moments_equal(merge_moments(junk, s), s)


def test_merge_constant_channel_is_exact():
    # Equal means (0.1 is not a dyadic fraction, so a weighted average would round) and zero M2.
    parts = [Moments(k, np.full(2, 0.1), np.zeros(2)) for k in (1, 3, 7, 2)]
    merged = merge_all(parts)
    assert np.array_equal(merged.mean, [0.1, 0.1]) and np.array_equal(merged.m2, [0.0, 0.0])


def test_merge_inf_mean_stays_inf_when_finite_data_joins():
    inf = Moments(2, np.array([np.inf, -np.inf]), np.array([np.nan, np.nan]))
    finite = Moments(3, np.array([1.0, 1.0]), np.array([0.5, 0.5]))
    for merged in (merge_moments(inf, finite), merge_moments(finite, inf)):
        np.testing.assert_array_equal(merged.mean, [np.inf, -np.inf])
        assert np.all(np.isnan(merged.m2))
