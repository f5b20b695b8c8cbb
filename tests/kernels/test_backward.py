"""backward_reduce_* / backward_apply_* against reference.batch_norm_*_backward."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from batchnorm import reference
from batchnorm.kernels import (
    backward_apply_nchw,
    backward_apply_nhwc,
    backward_reduce_nchw,
    backward_reduce_nhwc,
)
from conftest import SHAPES, TOL, shape_id

from .layouts import from_kernel_layout, to_kernel_layout

REDUCE = {"nchw": backward_reduce_nchw, "nhwc": backward_reduce_nhwc}
APPLY = {"nchw": backward_apply_nchw, "nhwc": backward_apply_nhwc}
DTYPES = [np.float32, np.float64]
# The sums are float64 computed from the inputs' exact values: float64 tolerance for both
# input dtypes. dx has the input's dtype: one final rounding for float32.
F64_TOL = dict(rtol=1e-10, atol=1e-10)
NP_TOL = {np.float32: TOL[torch.float32], np.float64: TOL[torch.float64]}
EPS = 1e-5

# Beyond conftest.SHAPES: N = 1, and shapes that exercise every branch of the block plan
# (see tests/kernels/test_moments.py).
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


def run_reduce(dy, x, mean, layout):
    sum_dy = np.full(x.shape[1], -7.0)
    sum_dy_xmu = np.full(x.shape[1], -7.0)
    REDUCE[layout](
        to_kernel_layout(dy, layout), to_kernel_layout(x, layout), mean, sum_dy, sum_dy_xmu
    )
    return sum_dy, sum_dy_xmu


def run_apply(dy, x, mean, k_dy, k_xmu, k_const, layout):
    xk = to_kernel_layout(x, layout)
    dx = np.full_like(xk, -7.0)
    APPLY[layout](to_kernel_layout(dy, layout), xk, mean, k_dy, k_xmu, k_const, dx)
    return from_kernel_layout(dx, x.shape, layout)


def make_inputs(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, shape[1])
    return x, dy, gamma


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_backward_reduce_matches_reference(shape, dtype, layout):
    x, dy, _ = make_inputs(shape, dtype, 20)
    exact_x, exact_dy = x.astype(np.float64), dy.astype(np.float64)
    _, mu_B, sigma2_B = reference.batch_norm_train(exact_x, eps=EPS)
    _, dgamma, dbeta = reference.batch_norm_train_backward(exact_dy, exact_x, eps=EPS)
    sum_dy, sum_dy_xmu = run_reduce(dy, x, mu_B, layout)
    invstd = 1.0 / np.sqrt(sigma2_B + EPS)
    # Reference: dbeta = sum(dy), dgamma = sum(dy * x_hat) = invstd * sum(dy * (x - mean)).
    np.testing.assert_allclose(sum_dy, dbeta, **F64_TOL)
    np.testing.assert_allclose(sum_dy_xmu * invstd, dgamma, **F64_TOL)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_backward_apply_matches_reference_train(shape, dtype, layout):
    x, dy, gamma = make_inputs(shape, dtype, 21)
    exact_x, exact_dy = x.astype(np.float64), dy.astype(np.float64)
    m = x.size // x.shape[1]
    _, mu_B, sigma2_B = reference.batch_norm_train(exact_x, eps=EPS)
    dx_ref, _, _ = reference.batch_norm_train_backward(exact_dy, exact_x, gamma, eps=EPS)
    # The coefficients as the torch layer forms them (kernels/backward.py header).
    invstd = 1.0 / np.sqrt(sigma2_B + EPS)
    sum_dy, sum_dy_xmu = run_reduce(dy, x, mu_B, layout)
    k_dy = gamma * invstd
    k_xmu = -gamma * invstd**3 * sum_dy_xmu / m
    k_const = -gamma * invstd * sum_dy / m
    dx = run_apply(dy, x, mu_B, k_dy, k_xmu, k_const, layout)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, dx_ref, **NP_TOL[dtype])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5, 6), (5000, 1, 1), (1, 2, 9000)], ids=shape_id)
def test_backward_apply_matches_reference_inference(shape, dtype, layout):
    x, dy, gamma = make_inputs(shape, dtype, 22)
    rng = np.random.default_rng(23)
    c = shape[1]
    running_mean, running_var = rng.standard_normal(c), rng.uniform(0.5, 4.0, c)
    dx_ref, _, _ = reference.batch_norm_inference_backward(
        dy.astype(np.float64), x.astype(np.float64), running_mean, running_var, gamma, EPS
    )
    k_dy = gamma / np.sqrt(running_var + EPS)
    zeros = np.zeros(c)
    dx = run_apply(dy, x, running_mean, k_dy, zeros, zeros, layout)
    np.testing.assert_allclose(dx, dx_ref, **NP_TOL[dtype])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_backward_apply_in_place_over_dy(layout):
    rng = np.random.default_rng(24)
    x = to_kernel_layout(rng.standard_normal((3, 4, 5)), layout)
    dy = to_kernel_layout(rng.standard_normal((3, 4, 5)), layout)
    mean, k_dy, k_xmu, k_const = (rng.standard_normal(4) for _ in range(4))
    expected = np.empty_like(x)
    APPLY[layout](dy, x, mean, k_dy, k_xmu, k_const, expected)
    APPLY[layout](dy, x, mean, k_dy, k_xmu, k_const, dy)
    assert np.array_equal(dy, expected)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_backward_reduce_non_finite_poisons_only_its_channel(bad, layout):
    x, dy, _ = make_inputs((5, 3, 40), np.float64, 25)
    dy[3, 1, 7] = bad
    mean = x.mean(axis=(0, 2))
    sum_dy, sum_dy_xmu = run_reduce(dy, x, mean, layout)
    assert not np.isfinite(sum_dy[1]) and not np.isfinite(sum_dy_xmu[1])
    if np.isnan(bad):
        assert np.isnan(sum_dy[1])
    assert np.all(np.isfinite(sum_dy[[0, 2]])) and np.all(np.isfinite(sum_dy_xmu[[0, 2]]))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(5000, 7), (8, 3, 1000), (1, 2, 9000)], ids=shape_id)
def test_backward_reduce_deterministic_and_thread_count_independent(shape, layout):
    x, dy, _ = make_inputs(shape, np.float32, 26)
    mean = x.astype(np.float64).mean(axis=tuple(i for i in range(x.ndim) if i != 1))
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run_reduce(dy, x, mean, layout)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = run_reduce(dy, x, mean, layout)
        again = run_reduce(dy, x, mean, layout)
    finally:
        numba.set_num_threads(before)
    for a, b in [(one, two), (two, again)]:
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
