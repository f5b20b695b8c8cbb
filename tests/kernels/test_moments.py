"""moments_nchw / moments_nhwc against reference.batch_norm_train (float64 oracle)."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from batchnorm import reference
from batchnorm.kernels import moments, moments_nchw, moments_nhwc
from conftest import SHAPES, shape_id

from .layouts import to_kernel_layout

KERNELS = {"nchw": moments_nchw, "nhwc": moments_nhwc}
DTYPES = [np.float32, np.float64]
# The outputs are float64 computed in float64 from the input's exact values, so both input
# dtypes are held to the float64 tolerance against the reference on the same values.
F64_TOL = dict(rtol=1e-10, atol=1e-10)

# Beyond conftest.SHAPES: N = 1, a single value per channel, and shapes that exercise every
# branch of the block plan: rows grouped (8, 3, 1000), rows sliced (1, 2, 9000), C = 1 with
# several blocks (5000, 1, 1), several channels-last blocks (5000, 7; 600, 300 with a short last
# block), and more channels-last blocks than groups (8500, 16: 34 blocks of 256 rows in 32
# groups).
KERNEL_SHAPES = SHAPES + [
    (1, 3),
    (1, 4, 5),
    (8, 3, 1000),
    (1, 2, 9000),
    (5000, 1, 1),
    (5000, 7),
    (600, 300),
    (8500, 16),
]


def run_moments(x: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Run the kernel on ``x`` of shape ``(N, C, *)``; return ``(mean, m2, m)``."""
    c = x.shape[1]
    mean = np.full(c, -7.0)
    m2 = np.full(c, -7.0)
    KERNELS[layout](to_kernel_layout(x, layout), mean, m2)
    return mean, m2, x.size // c


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_moments_matches_reference(shape, dtype, layout):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3.0 + 1.5).astype(dtype)
    mean, m2, m = run_moments(x, layout)
    _, mu_B, sigma2_B = reference.batch_norm_train(x.astype(np.float64))
    np.testing.assert_allclose(mean, mu_B, **F64_TOL)
    np.testing.assert_allclose(m2 / m, sigma2_B, **F64_TOL)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_moments_stable_for_large_mean_small_std(dtype, layout):
    # Channel 0: mean 1e4, std 1e-2, so var / mean^2 = 1e-12. E[x^2] - E[x]^2 in float64 loses
    # about 1e-16 * 1e8 / 1e-4 = 1e-4 of the variance to cancellation (checked below so that
    # this test would catch it). The pivot-shifted blocked two-pass measures ~1e-16 against an
    # extended-precision oracle; 1e-12 leaves room for the reference's own rounding. (Merging
    # unshifted block means, which round to ~1e-12 near 1e4, measured ~1e-12 here.)
    rng = np.random.default_rng(1)
    shape = (16, 2, 700)  # 11200 values per channel: several blocks, merged
    x = rng.standard_normal(shape) * 1e-2
    x[:, 0] += 1e4
    x[:, 1] = x[:, 1] * 1e2 - 3.0
    x = x.astype(dtype)
    mean, m2, m = run_moments(x, layout)
    exact = x.astype(np.float64)
    _, mu_B, sigma2_B = reference.batch_norm_train(exact)
    np.testing.assert_allclose(mean, mu_B, rtol=1e-13, atol=0)
    np.testing.assert_allclose(m2 / m, sigma2_B, rtol=1e-12, atol=0)
    naive = (exact**2).mean(axis=(0, 2)) - exact.mean(axis=(0, 2)) ** 2
    assert abs(naive[0] / sigma2_B[0] - 1) > 1e-7, "test data no longer ill-conditioned"


@pytest.mark.parametrize(
    ("offset", "redo"),
    [(0.0, False), (1.0, False), (7.5, False), (8.5, True), (1e3, True), (1e8, True)],
)
def test_one_pass_m2_asks_for_a_second_pass_exactly_when_it_cancels(offset, redo):
    # Block of +-1 (variance 1) shifted `offset` SDs away from the pivot: sum(d^2) / M2 is
    # 1 + offset^2, and the one-pass form is kept only below 64 (offset < sqrt(63) = 7.94).
    d = np.tile([-1.0, 1.0], 50) + offset
    total, total_sq = d.sum(), (d * d).sum()
    m2, got_redo = moments._one_pass_m2(total, total_sq, total / d.size)
    assert got_redo == redo
    if not redo:
        assert m2 == pytest.approx(100.0, rel=1e-14)


@pytest.mark.parametrize(
    ("total", "total_sq"),
    [(np.nan, np.nan), (np.inf, np.inf), (-np.inf, np.inf), (1.0, np.nan)],
)
def test_one_pass_m2_never_redoes_non_finite_blocks(total, total_sq):
    with np.errstate(invalid="ignore"):
        m2, redo = moments._one_pass_m2(total, total_sq, total / 10)
    assert not redo and np.isnan(m2)


def test_one_pass_m2_redoes_when_only_the_squares_overflow():
    # float64 data near 1e200: squares overflow, the block mean does not; the second pass about
    # the mean may still give a finite M2.
    m2, redo = moments._one_pass_m2(1e200, np.inf, 1e199)
    assert redo


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_moments_blocks_starting_on_an_outlier_take_the_second_pass(layout):
    # Channel 0: 1e4 + N(0, 1e-3) with x[n, 0, 0] = 1e4 + 1, so in both layouts every block's
    # first value (its one-pass pivot) lies ~22 block SDs from the block mean and the second
    # pass must run (nchw blocks: 8 rows of 512; nhwc blocks: 2048 rows, starting at s = 0).
    # Its result must still match the float64 oracle to float64 accuracy.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 2, 512))
    x[:, 0] = 1e4 + 1e-3 * x[:, 0]
    x[:, 0, 0] = 1e4 + 1.0
    mean, m2, m = run_moments(x, layout)
    _, mu_B, sigma2_B = reference.batch_norm_train(x)
    np.testing.assert_allclose(mean, mu_B, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(m2 / m, sigma2_B, rtol=1e-12, atol=0)


# Under NUMBA_DISABLE_JIT the kernels run on NumPy scalars, which warn on Inf - Inf.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_moments_non_finite_poisons_only_its_channel(bad, layout):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 3, 50))
    x[4, 1, 17] = bad
    mean, m2, m = run_moments(x, layout)
    with np.errstate(invalid="ignore"):
        _, mu_B, sigma2_B = reference.batch_norm_train(x)
    # Oracle: NaN -> mean and var NaN; +-Inf -> mean +-Inf and var NaN (Inf - Inf).
    np.testing.assert_allclose(mean, mu_B, **F64_TOL)
    np.testing.assert_allclose(m2 / m, sigma2_B, **F64_TOL)
    assert np.isnan(m2[1])
    assert np.all(np.isfinite(mean[[0, 2]])) and np.all(np.isfinite(m2[[0, 2]]))


# Under NUMBA_DISABLE_JIT the kernels run on NumPy scalars, which warn on Inf - Inf.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_moments_opposite_infinities_give_nan_mean(layout):
    x = np.zeros((4, 2, 3))
    x[0, 0, 0] = np.inf
    x[3, 0, 2] = -np.inf
    mean, m2, _ = run_moments(x, layout)
    assert np.isnan(mean[0]) and np.isnan(m2[0])
    assert mean[1] == 0.0 and m2[1] == 0.0


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_moments_constant_channel_is_exact(layout):
    # Every block mean is exactly 2.5, every deviation exactly 0: no rounding may appear.
    x = np.full((7, 3, 900), 2.5, dtype=np.float32)
    mean, m2, _ = run_moments(x, layout)
    assert np.array_equal(mean, np.full(3, 2.5))
    assert np.array_equal(m2, np.zeros(3))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(5000, 7), (8, 3, 1000), (1, 2, 9000)], ids=shape_id)
def test_moments_deterministic(shape, layout):
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    first = run_moments(x, layout)
    second = run_moments(x, layout)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(5000, 7), (8, 3, 1000), (1, 2, 9000)], ids=shape_id)
def test_moments_independent_of_thread_count(shape, layout):
    # The block plan and merge order depend on the shape only, so this is exact, not merely
    # within float64 rounding.
    x = np.random.default_rng(4).standard_normal(shape)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run_moments(x, layout)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = run_moments(x, layout)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
