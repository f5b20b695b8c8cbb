"""normalize_nchw / normalize_nhwc against reference.batch_norm_train and batch_norm_inference."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from batchnorm import reference
from batchnorm.kernels import normalize_nchw, normalize_nhwc
from conftest import SHAPES, TOL, shape_id

from .layouts import from_kernel_layout, to_kernel_layout

KERNELS = {"nchw": normalize_nchw, "nhwc": normalize_nhwc}
DTYPES = [np.float32, np.float64]
# y has x's dtype: float64 output is held to the float64 row of the table; float32 output has
# one rounding to float32 (relative 6e-8) on top of float64 arithmetic, well inside its row.
NP_TOL = {np.float32: TOL[torch.float32], np.float64: TOL[torch.float64]}
EPS = 1e-5

# Beyond conftest.SHAPES: N = 1, one value per channel, rows sliced into several chunks
# (1, 2, 9000) and (1, 1, 9000), and a long C = 1 channels-last array (5000, 1, 1).
KERNEL_SHAPES = SHAPES + [
    (1, 3),
    (1, 4, 5),
    (8, 3, 1000),
    (1, 2, 9000),
    (1, 1, 9000),
    (5000, 1, 1),
    (5000, 7),
]


def run_normalize(x, mean, scale, shift, layout):
    xk = to_kernel_layout(x, layout)
    y = np.full_like(xk, -7.0)
    KERNELS[layout](xk, mean, scale, shift, y)
    return from_kernel_layout(y, x.shape, layout)


def channel_params(c: int, seed: int):
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 2.0, c)
    beta = rng.standard_normal(c)
    return gamma, beta


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_normalize_matches_reference_train(shape, dtype, layout):
    rng = np.random.default_rng(10)
    x = (rng.standard_normal(shape) * 2.0 - 1.0).astype(dtype)
    gamma, beta = channel_params(shape[1], 11)
    y_ref, mu_B, sigma2_B = reference.batch_norm_train(x.astype(np.float64), gamma, beta, EPS)
    invstd = 1.0 / np.sqrt(sigma2_B + EPS)
    y = run_normalize(x, mu_B, gamma * invstd, beta, layout)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, y_ref, **NP_TOL[dtype])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5, 6), (5000, 1, 1), (1, 2, 9000)], ids=shape_id)
def test_normalize_matches_reference_inference(shape, dtype, layout):
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
    c = shape[1]
    gamma, beta = channel_params(c, 13)
    running_mean = rng.standard_normal(c)
    running_var = rng.uniform(0.5, 4.0, c)
    y_ref = reference.batch_norm_inference(
        x.astype(np.float64), running_mean, running_var, gamma, beta, EPS
    )
    scale = gamma / np.sqrt(running_var + EPS)
    y = run_normalize(x, running_mean, scale, beta, layout)
    np.testing.assert_allclose(y, y_ref, **NP_TOL[dtype])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_normalize_accurate_for_large_mean_small_std(dtype, layout):
    # Mean 1e4, std 1e-2: the folded form x * scale + shift cancels ~1e6-sized terms. Centring
    # first leaves only the final rounding: half an ulp of |y| < 8 is 2.4e-7 in float32.
    rng = np.random.default_rng(14)
    x = (rng.standard_normal((8, 2, 300)) * 1e-2 + 1e4).astype(dtype)
    y_ref, mu_B, sigma2_B = reference.batch_norm_train(x.astype(np.float64), eps=0.0)
    y = run_normalize(x, mu_B, 1.0 / np.sqrt(sigma2_B), np.zeros(2), layout)
    atol = 2.5e-7 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=atol)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_normalize_in_place(layout):
    rng = np.random.default_rng(15)
    x = to_kernel_layout(rng.standard_normal((3, 4, 5)), layout)
    mean, scale, shift = rng.standard_normal(4), rng.uniform(1, 2, 4), rng.standard_normal(4)
    expected = np.empty_like(x)
    KERNELS[layout](x, mean, scale, shift, expected)
    KERNELS[layout](x, mean, scale, shift, x)
    assert np.array_equal(x, expected)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_normalize_non_finite_propagates_elementwise(bad, layout):
    rng = np.random.default_rng(16)
    x = rng.standard_normal((4, 3, 6))
    x[2, 1, 3] = bad
    mean, var = np.zeros(3), np.ones(3)
    y = run_normalize(x, mean, 1.0 / np.sqrt(var + EPS), np.zeros(3), layout)
    y_ref = reference.batch_norm_inference(x, mean, var, eps=EPS)
    np.testing.assert_allclose(y, y_ref, **NP_TOL[np.float64])
    assert np.isfinite(y).sum() == y.size - 1


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_normalize_independent_of_thread_count(layout):
    rng = np.random.default_rng(17)
    x = rng.standard_normal((4, 3, 2000)).astype(np.float32)
    mean, scale, shift = rng.standard_normal(3), rng.uniform(1, 2, 3), rng.standard_normal(3)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run_normalize(x, mean, scale, shift, layout)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = run_normalize(x, mean, scale, shift, layout)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one, two)
