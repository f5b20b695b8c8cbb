"""The batch norm + activation kernels (kernels/activated.py) against reference.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import reference
from batchnorm.activations import ACTIVATIONS
from batchnorm.kernels import activated
from batchnorm.kernels.activation import apply, derivative
from conftest import TOL
from kernels.layouts import from_kernel_layout, to_kernel_layout

DTYPES = [np.float32, np.float64]
NP_TOL = {np.float32: TOL[torch.float32], np.float64: TOL[torch.float64]}
EPS = 1e-5
# (name, parameter): every activation, LeakyReLU and ELU with non-default parameters.
ACTS = [
    ("identity", None),
    ("relu", None),
    ("leaky_relu", 0.2),
    ("elu", 0.7),
    ("silu", None),
    ("gelu", None),
]
# (shape, layout): rows of several blocks, short rows grouped, S == 1 (the cols twin),
# channels-last (M, C), and C == 1 channels-last (the rows twin).
CASES = [
    ((6, 3, 4100), "nchw"),
    ((40, 5, 7), "nchw"),
    ((300, 4), "nchw"),
    ((7, 3, 5, 2), "nhwc"),
    ((9, 1, 4, 3), "nhwc"),
]


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    # A per-channel offset and a spread that puts z on both sides of 0 for every activation.
    x = rng.standard_normal(shape) * 2.0 + rng.standard_normal((1, c) + (1,) * (len(shape) - 2))
    dy = rng.standard_normal(shape)
    weight = rng.random(c) + 0.5
    bias = rng.standard_normal(c) * 0.5
    return x.astype(dtype), dy.astype(dtype), weight.astype(dtype), bias.astype(dtype)


def _code(name):
    return ACTIVATIONS[name].code


def _param(p):
    return 0.0 if p is None else p


@pytest.mark.parametrize("name,p", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", CASES)
def test_training_forward_and_backward_match_the_reference(name, p, dtype, shape, layout):
    x, dy, weight, bias = _data(shape, dtype)
    xk, dyk = to_kernel_layout(x, layout), to_kernel_layout(dy, layout)
    c = shape[1]
    y = np.empty_like(xk)
    mean, var = np.empty(c), np.empty(c)
    running_mean, running_var = np.zeros(c, dtype), np.ones(c, dtype)
    fn, view = activated.select(_code(name), "train", layout, xk.shape)
    updated = fn(
        xk.reshape(view), weight, bias, EPS, _param(p), y.reshape(view), mean, var,
        running_mean, running_var, 0.1, float(np.finfo(dtype).max),
    )  # fmt: skip
    want_y, want_mean, want_var = reference.batch_norm_act_train(x, weight, bias, EPS, name, p)
    tol = NP_TOL[dtype]
    assert updated
    np.testing.assert_allclose(from_kernel_layout(y, shape, layout), want_y, **tol)
    np.testing.assert_allclose(mean, want_mean, **tol)
    np.testing.assert_allclose(var, want_var, **tol)
    m = x.size // c
    want_rm, want_rv = reference.update_running_statistics(
        np.zeros(c), np.ones(c), want_mean, want_var, m, 0.1
    )
    np.testing.assert_allclose(running_mean, want_rm, **tol)
    np.testing.assert_allclose(running_var, want_rv, **tol)

    invstd = 1.0 / np.sqrt(var + EPS)
    dx = np.empty_like(xk)
    dweight, dbias = np.empty(c, dtype), np.empty(c, dtype)
    fn, view = activated.select(_code(name), "backward", layout, xk.shape)
    fn(
        dyk.reshape(view), xk.reshape(view), mean, invstd * weight, bias.astype(np.float64),
        invstd, weight, _param(p), True, dx.reshape(view), dweight, dbias,
    )  # fmt: skip
    want_dx, want_dw, want_db = reference.batch_norm_act_train_backward(
        dy, x, weight, bias, EPS, name, p
    )
    # dx is a difference of sums of ~m terms: scale the tolerance by its typical size.
    np.testing.assert_allclose(from_kernel_layout(dx, shape, layout), want_dx, **tol)
    np.testing.assert_allclose(dweight, want_dw, rtol=tol["rtol"], atol=tol["atol"] * m)
    np.testing.assert_allclose(dbias, want_db, rtol=tol["rtol"], atol=tol["atol"] * m)


@pytest.mark.parametrize("name,p", ACTS)
@pytest.mark.parametrize("shape,layout", CASES)
def test_eval_forward_and_backward_use_the_given_statistics(name, p, shape, layout):
    x, dy, weight, bias = _data(shape, np.float64, seed=1)
    xk, dyk = to_kernel_layout(x, layout), to_kernel_layout(dy, layout)
    c = shape[1]
    mean = np.linspace(-0.5, 0.5, c)
    var = np.linspace(0.5, 2.0, c)
    invstd = 1.0 / np.sqrt(var + EPS)
    y = np.empty_like(xk)
    fn, view = activated.select(_code(name), "eval", layout, xk.shape)
    fn(xk.reshape(view), mean, invstd * weight, bias, _param(p), y.reshape(view))
    z = reference.batch_norm_inference(x, mean, var, weight, bias, EPS)
    np.testing.assert_allclose(
        from_kernel_layout(y, shape, layout), reference.activation(z, name, p), rtol=1e-12,
        atol=1e-12,
    )  # fmt: skip
    dx = np.empty_like(xk)
    dweight, dbias = np.empty(c), np.empty(c)
    fn, view = activated.select(_code(name), "backward", layout, xk.shape)
    fn(
        dyk.reshape(view), xk.reshape(view), mean, invstd * weight, bias, invstd, weight,
        _param(p), False, dx.reshape(view), dweight, dbias,
    )  # fmt: skip
    dz = dy * reference.activation_derivative(z, name, p)
    want_dx, want_dw = reference.batch_norm_inference_backward(dz, x, mean, var, weight, EPS)[:2]
    np.testing.assert_allclose(from_kernel_layout(dx, shape, layout), want_dx, rtol=1e-10)
    np.testing.assert_allclose(dweight, want_dw, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dbias, dz.sum(axis=(0, *range(2, x.ndim))), rtol=1e-10)


def test_identity_kernels_are_batch_norm_bit_for_bit():
    # With the identity code the fused kernels compute BatchNorm itself.
    from batchnorm.kernels import select_kernel

    x, dy, weight, bias = _data((8, 3, 50), np.float32)
    c = 3
    outs = []
    for fn, extra in (
        (activated.select(0, "train", "nchw", x.shape)[0], (0.0,)),
        (select_kernel("train_parallel", "nchw", np.float32), ()),
    ):
        y = np.empty_like(x)
        mean, var = np.empty(c), np.empty(c)
        args = (x, weight, bias, EPS, *extra, y, mean, var, np.zeros(c, np.float32))
        fn(*args, np.ones(c, np.float32), 0.1, 3e38)
        outs.append((y, mean, var))
    for got, want in zip(outs[0], outs[1], strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name,p", ACTS)
def test_scalar_functions_match_torch_including_kinks_and_nan(name, p):
    z = np.array([-3.0, -0.5, -0.0, 0.0, 1e-8, 0.5, 3.0, np.nan])
    spec = ACTIVATIONS[name]
    want = spec.forward(torch.from_numpy(z), p).numpy()
    got = np.array([apply(v, spec.code, _param(p)) for v in z])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, equal_nan=True)
    # torch's own backward of the activation at each point (NaN included).
    t = torch.from_numpy(z).requires_grad_(True)
    spec.forward(t, p).sum().backward()
    got_d = np.array([derivative(v, spec.code, _param(p)) for v in z])
    np.testing.assert_allclose(got_d, t.grad.numpy(), rtol=1e-12, atol=1e-15, equal_nan=True)


def test_every_activation_but_the_identity_has_warmed_kernels():
    from batchnorm.kernels import ACTIVATED_CODES

    codes = {spec.code for spec in ACTIVATIONS.values() if spec.name != "identity"}
    assert set(ACTIVATED_CODES) == codes and ACTIVATIONS["identity"].code == 0
