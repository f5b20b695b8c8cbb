"""The fused kernels, one call per pass, against reference.py.

The serial ones (small inputs) and the parallel ones (``kernels/fused.py``) share their
signatures and contract, so the training and backward tests run on both (``mode``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import reference
from batchnorm.kernels import (
    backward_parallel_nchw,
    backward_parallel_nhwc,
    backward_serial_nchw,
    backward_serial_nhwc,
    eval_serial_nchw,
    eval_serial_nhwc,
    train_parallel_nchw,
    train_parallel_nhwc,
    train_serial_nchw,
    train_serial_nhwc,
    update_running,
)
from conftest import SHAPES, TOL, shape_id

from .layouts import from_kernel_layout, to_kernel_layout

TRAIN = {
    ("serial", "nchw"): train_serial_nchw,
    ("serial", "nhwc"): train_serial_nhwc,
    ("parallel", "nchw"): train_parallel_nchw,
    ("parallel", "nhwc"): train_parallel_nhwc,
}
EVAL = {"nchw": eval_serial_nchw, "nhwc": eval_serial_nhwc}
BACKWARD = {
    ("serial", "nchw"): backward_serial_nchw,
    ("serial", "nhwc"): backward_serial_nhwc,
    ("parallel", "nchw"): backward_parallel_nchw,
    ("parallel", "nhwc"): backward_parallel_nhwc,
}
MODES = ["serial", "parallel"]
DTYPES = [np.float32, np.float64]
NP_TOL = {np.float32: TOL[torch.float32], np.float64: TOL[torch.float64]}
F64_TOL = dict(rtol=1e-10, atol=1e-10)
EPS = 1e-5
SERIAL_SHAPES = SHAPES + [(1, 4, 5), (40, 1, 7), (300, 6)]


def limit(a: np.ndarray) -> float:
    """The largest finite value of ``a``'s dtype: the kernels' bound for storable statistics."""
    return float(np.finfo(a.dtype).max)


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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SERIAL_SHAPES, ids=shape_id)
def test_train_matches_reference_with_running_update(mode, shape, dtype, layout, affine):
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
    kernel = TRAIN[mode, layout]
    kernel(xk, weight, bias, EPS, y, mean, var, running_mean, running_var, 0.3, limit(xk))
    np.testing.assert_allclose(from_kernel_layout(y, shape, layout), want_y, **NP_TOL[dtype])
    np.testing.assert_allclose(mean, want_mean, **F64_TOL)
    np.testing.assert_allclose(var, want_var, **F64_TOL)
    np.testing.assert_allclose(running_mean, want_rm, **NP_TOL[dtype])
    np.testing.assert_allclose(running_var, want_rv, **NP_TOL[dtype])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_train_without_running_statistics_leaves_nothing_else(mode, layout):
    x, _, weight, bias = make((6, 3, 4), np.float64, 3, True)
    xk = to_kernel_layout(x, layout)
    y = np.empty_like(xk)
    mean, var = np.empty(3), np.empty(3)
    absent = np.empty(0)
    TRAIN[mode, layout](xk, weight, bias, EPS, y, mean, var, absent, absent.copy(), 0.1, limit(xk))
    want_y, _, _ = reference.batch_norm_train(x, weight, bias, EPS)
    np.testing.assert_allclose(from_kernel_layout(y, x.shape, layout), want_y, **F64_TOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_train_is_accurate_for_large_mean_small_spread(mode, layout, dtype):
    rng = np.random.default_rng(4)
    x = (1e4 + 1e-2 * rng.standard_normal((50, 2, 30))).astype(dtype)
    _, want_mean, want_var = reference.batch_norm_train(x)
    xk = to_kernel_layout(x, layout)
    mean, var = np.empty(2), np.empty(2)
    absent = np.empty(0, dtype)
    TRAIN[mode, layout](
        xk, absent, absent, EPS, np.empty_like(xk), mean, var, absent, absent, 0.1, limit(xk)
    )
    np.testing.assert_allclose(mean, want_mean, rtol=1e-14)
    # Two-pass in float64 over the exact float32 values: the variance keeps ~12 digits even
    # though the mean is 1e6 standard deviations away from zero.
    np.testing.assert_allclose(var, want_var, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_train_nan_poisons_only_its_channel(mode, layout):
    x, _, weight, bias = make((5, 3, 4), np.float32, 5, True)
    x[2, 1, 3] = np.nan
    xk = to_kernel_layout(x, layout)
    y = np.empty_like(xk)
    mean, var = np.empty(3), np.empty(3)
    absent = np.empty(0, np.float32)
    TRAIN[mode, layout](xk, weight, bias, EPS, y, mean, var, absent, absent, 0.1, limit(xk))
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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SERIAL_SHAPES, ids=shape_id)
def test_backward_matches_reference(mode, shape, dtype, layout, training, affine):
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
    BACKWARD[mode, layout](
        to_kernel_layout(dy, layout), xk, mean, var, weight, EPS, training, dx, dweight, dbias
    )
    tol = NP_TOL[dtype]
    np.testing.assert_allclose(from_kernel_layout(dx, shape, layout), want[0], **tol)
    # dweight/dbias are float64 sums of the exact inputs; compared at the data's tolerance
    # because the reference recomputes mean/var from x where the kernel got them passed in.
    np.testing.assert_allclose(dweight, want[1], **tol)
    np.testing.assert_allclose(dbias, want[2], **tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(40, 6), (5, 3, 7, 9), (2, 1, 3000), (300, 4, 1)], ids=shape_id)
def test_backward_float32_parameter_grads_are_float64_sums_rounded_once(mode, layout, shape):
    # The layer passes parameter-gradient outputs in the data's dtype; the kernels must still
    # accumulate in float64 (a float32 running sum of thousands of terms would differ) and
    # round once at the store. Large mean offsets make float32 accumulation visibly worse.
    x, dy, weight, _ = make(shape, np.float32, 11, True)
    dy = (dy + 100.0).astype(np.float32)
    _, mean, var = reference.batch_norm_train(x, eps=EPS)
    xk, dyk = to_kernel_layout(x, layout), to_kernel_layout(dy, layout)
    c = shape[1]
    outputs = {}
    for out_dtype in (np.float64, np.float32):
        dx = np.empty_like(xk)
        dweight, dbias = np.full(c, np.nan, out_dtype), np.full(c, np.nan, out_dtype)
        BACKWARD[mode, layout](dyk, xk, mean, var, weight, EPS, True, dx, dweight, dbias)
        outputs[out_dtype] = (dx, dweight, dbias)
    wide, narrow = outputs[np.float64], outputs[np.float32]
    assert np.array_equal(narrow[0], wide[0])
    assert np.array_equal(narrow[1], wide[1].astype(np.float32))
    assert np.array_equal(narrow[2], wide[2].astype(np.float32))


def test_update_running_matches_reference_closed_form():
    rng = np.random.default_rng(10)
    running_mean, running_var = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    mean, var = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    want = reference.update_running_statistics(running_mean, running_var, mean, var, 7, 0.25)
    assert update_running(running_mean, running_var, mean, var, 7, 0.25, limit(mean))
    np.testing.assert_allclose(running_mean, want[0], **F64_TOL)
    np.testing.assert_allclose(running_var, want[1], **F64_TOL)


@pytest.mark.parametrize(
    "bad",
    ["nan_mean", "inf_mean", "nan_var", "inf_var", "var_beyond_float32"],
)
def test_update_running_leaves_buffers_untouched_for_nonfinite_batch(bad):
    rng = np.random.default_rng(11)
    running_mean = rng.standard_normal(3).astype(np.float32)
    running_var = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    before = running_mean.copy(), running_var.copy()
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    if bad == "nan_mean":
        mean[1] = np.nan
    elif bad == "inf_mean":
        mean[2] = -np.inf
    elif bad == "nan_var":
        var[0] = np.nan
    elif bad == "inf_var":
        var[1] = np.inf
    else:
        # Finite in float64, but its unbiased value would be stored as Inf in float32.
        var[1] = float(np.finfo(np.float32).max)
    assert not update_running(running_mean, running_var, mean, var, 4, 0.5, limit(running_mean))
    np.testing.assert_array_equal(running_mean, before[0])
    np.testing.assert_array_equal(running_var, before[1])


def test_update_running_accepts_large_but_storable_statistics():
    running_mean, running_var = np.zeros(2, np.float32), np.ones(2, np.float32)
    big = float(np.finfo(np.float32).max) / 4
    assert update_running(
        running_mean,
        running_var,
        np.array([big, 0.0]),
        np.array([1.0, big]),
        4,
        1.0,
        limit(running_mean),
    )
    np.testing.assert_allclose(running_mean, [big, 0.0], rtol=1e-6)
    np.testing.assert_allclose(running_var, [4 / 3, big * 4 / 3], rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_train_skips_running_update_for_nonfinite_batch(mode, layout):
    x, _, weight, bias = make((5, 3, 4), np.float32, 12, True)
    x[1, 2, 0] = np.inf
    xk = to_kernel_layout(x, layout)
    y = np.empty_like(xk)
    mean, var = np.empty(3), np.empty(3)
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    updated = TRAIN[mode, layout](
        xk, weight, bias, EPS, y, mean, var, running_mean, running_var, 0.1, limit(xk)
    )
    assert updated is False or updated == 0
    np.testing.assert_array_equal(running_mean, np.zeros(3, np.float32))
    np.testing.assert_array_equal(running_var, np.ones(3, np.float32))
    # The output is still computed: the clean channels normalized as usual.
    want_y, _, _ = reference.batch_norm_train(x[:, :2], weight[:2], bias[:2], EPS)
    got = from_kernel_layout(y, x.shape, layout)
    np.testing.assert_allclose(got[:, :2], want_y, **NP_TOL[np.float32])
    x[1, 2, 0] = 0.0
    assert TRAIN[mode, layout](
        to_kernel_layout(x, layout),
        weight,
        bias,
        EPS,
        y,
        mean,
        var,
        running_mean,
        running_var,
        0.1,
        limit(xk),
    )
    assert not np.array_equal(running_mean, np.zeros(3, np.float32))
