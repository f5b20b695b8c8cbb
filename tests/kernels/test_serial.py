"""The serial fused kernels (small inputs) against reference.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import reference
from batchnorm.kernels import (
    backward_serial_nchw,
    backward_serial_nhwc,
    eval_serial_nchw,
    eval_serial_nhwc,
    train_serial_nchw,
    train_serial_nhwc,
    update_running,
)
from conftest import SHAPES, TOL, shape_id

from .layouts import from_kernel_layout, to_kernel_layout

TRAIN = {"nchw": train_serial_nchw, "nhwc": train_serial_nhwc}
EVAL = {"nchw": eval_serial_nchw, "nhwc": eval_serial_nhwc}
BACKWARD = {"nchw": backward_serial_nchw, "nhwc": backward_serial_nhwc}
DTYPES = [np.float32, np.float64]
NP_TOL = {np.float32: TOL[torch.float32], np.float64: TOL[torch.float64]}
F64_TOL = dict(rtol=1e-10, atol=1e-10)
EPS = 1e-5
SERIAL_SHAPES = SHAPES + [(1, 4, 5), (40, 1, 7), (300, 6)]


def make(shape, dtype, seed, affine):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3.0 - 1.0).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    if affine:
        weight = rng.uniform(0.5, 2.0, c).astype(dtype)
        bias = rng.standard_normal(c).astype(dtype)
    else:
        weight = bias = np.empty(0, dtype)
    return x, dy, weight, bias


def optional(a):
    return None if a.shape[0] == 0 else a


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SERIAL_SHAPES, ids=shape_id)
def test_train_serial_matches_reference_with_running_update(shape, dtype, layout, affine):
    x, _, weight, bias = make(shape, dtype, 1, affine)
    c = shape[1]
    rng = np.random.default_rng(2)
    running_mean = rng.standard_normal(c).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, c).astype(dtype)
    want_y, want_mean, want_var = reference.batch_norm_train(
        x, optional(weight), optional(bias), EPS
    )
    m = x.size // c
    want_rm, want_rv = reference.update_running_statistics(
        running_mean, running_var, want_mean, want_var, m, 0.3
    )
    xk = to_kernel_layout(x, layout)
    y = np.full_like(xk, np.nan)
    mean = np.full(c, np.nan)
    var = np.full(c, np.nan)
    TRAIN[layout](xk, weight, bias, EPS, y, mean, var, running_mean, running_var, 0.3)
    np.testing.assert_allclose(from_kernel_layout(y, shape, layout), want_y, **NP_TOL[dtype])
    np.testing.assert_allclose(mean, want_mean, **F64_TOL)
    np.testing.assert_allclose(var, want_var, **F64_TOL)
    np.testing.assert_allclose(running_mean, want_rm, **NP_TOL[dtype])
    np.testing.assert_allclose(running_var, want_rv, **NP_TOL[dtype])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_train_serial_without_running_statistics_leaves_nothing_else(layout):
    x, _, weight, bias = make((6, 3, 4), np.float64, 3, True)
    xk = to_kernel_layout(x, layout)
    y = np.empty_like(xk)
    mean, var = np.empty(3), np.empty(3)
    absent = np.empty(0)
    TRAIN[layout](xk, weight, bias, EPS, y, mean, var, absent, absent.copy(), 0.1)
    want_y, _, _ = reference.batch_norm_train(x, weight, bias, EPS)
    np.testing.assert_allclose(from_kernel_layout(y, x.shape, layout), want_y, **F64_TOL)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_train_serial_is_accurate_for_large_mean_small_spread(layout, dtype):
    rng = np.random.default_rng(4)
    x = (1e4 + 1e-2 * rng.standard_normal((50, 2, 30))).astype(dtype)
    _, want_mean, want_var = reference.batch_norm_train(x)
    xk = to_kernel_layout(x, layout)
    mean, var = np.empty(2), np.empty(2)
    absent = np.empty(0, dtype)
    TRAIN[layout](xk, absent, absent, EPS, np.empty_like(xk), mean, var, absent, absent, 0.1)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-14)
    # Two-pass in float64 over the exact float32 values: the variance keeps ~12 digits even
    # though the mean is 1e6 standard deviations away from zero.
    np.testing.assert_allclose(var, want_var, rtol=1e-10)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_train_serial_nan_poisons_only_its_channel(layout):
    x, _, weight, bias = make((5, 3, 4), np.float32, 5, True)
    x[2, 1, 3] = np.nan
    xk = to_kernel_layout(x, layout)
    y = np.empty_like(xk)
    mean, var = np.empty(3), np.empty(3)
    absent = np.empty(0, np.float32)
    TRAIN[layout](xk, weight, bias, EPS, y, mean, var, absent, absent, 0.1)
    y = from_kernel_layout(y, x.shape, layout)
    assert np.isnan(mean[1]) and np.isnan(var[1]) and np.isnan(y[:, 1]).all()
    assert np.isfinite(mean[[0, 2]]).all() and np.isfinite(y[:, [0, 2]]).all()


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SERIAL_SHAPES, ids=shape_id)
def test_eval_serial_matches_reference(shape, dtype, layout, affine):
    x, _, weight, bias = make(shape, dtype, 6, affine)
    rng = np.random.default_rng(7)
    running_mean = rng.standard_normal(shape[1]).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, shape[1]).astype(dtype)
    want = reference.batch_norm_inference(
        x, running_mean, running_var, optional(weight), optional(bias), EPS
    )
    xk = to_kernel_layout(x, layout)
    y = np.full_like(xk, np.nan)
    EVAL[layout](xk, running_mean, running_var, weight, bias, EPS, y)
    np.testing.assert_allclose(from_kernel_layout(y, shape, layout), want, **NP_TOL[dtype])


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SERIAL_SHAPES, ids=shape_id)
def test_backward_serial_matches_reference(shape, dtype, layout, training, affine):
    x, dy, weight, _ = make(shape, dtype, 8, affine)
    c = shape[1]
    if training:
        _, mean, var = reference.batch_norm_train(x, eps=EPS)
        want = reference.batch_norm_train_backward(dy, x, optional(weight), EPS)
    else:
        rng = np.random.default_rng(9)
        mean = rng.standard_normal(c).astype(dtype)
        var = rng.uniform(0.5, 2.0, c).astype(dtype)
        want = reference.batch_norm_inference_backward(dy, x, mean, var, optional(weight), EPS)
    xk = to_kernel_layout(x, layout)
    dx = np.full_like(xk, np.nan)
    dweight, dbias = np.full(c, np.nan), np.full(c, np.nan)
    BACKWARD[layout](
        to_kernel_layout(dy, layout), xk, mean, var, weight, EPS, training, dx, dweight, dbias
    )
    tol = NP_TOL[dtype]
    np.testing.assert_allclose(from_kernel_layout(dx, shape, layout), want[0], **tol)
    # dweight/dbias are float64 sums of the exact inputs; compared at the data's tolerance
    # because the reference recomputes mean/var from x where the kernel got them passed in.
    np.testing.assert_allclose(dweight, want[1], **tol)
    np.testing.assert_allclose(dbias, want[2], **tol)


def test_update_running_matches_reference_closed_form():
    rng = np.random.default_rng(10)
    running_mean, running_var = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    mean, var = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    want = reference.update_running_statistics(running_mean, running_var, mean, var, 7, 0.25)
    update_running(running_mean, running_var, mean, var, 7, 0.25)
    np.testing.assert_allclose(running_mean, want[0], **F64_TOL)
    np.testing.assert_allclose(running_var, want[1], **F64_TOL)
