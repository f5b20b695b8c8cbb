r"""Whole parallel passes in one kernel call: the training forward, and the backward.

The parallel building blocks (:mod:`.moments`, :mod:`.normalize`, :mod:`.backward`) need a few
per-channel steps between them: variances, ``invstd``, the affine coefficients, the running
update. Done from Python, those steps are ~10 small NumPy operations and three kernel calls,
each a few microseconds; on mid-sized inputs (~1e5 values, a ~60 us call) that is a sixth of
the time. These kernels run the same blocks and the per-channel steps inside one compiled call,
with the signatures of their serial twins in :mod:`.serial`, so the torch layer calls either
the same way.

.. math::
    \text{forward: } \mu, \sigma^2 \text{ (moments)}, \quad
    s_c = \gamma_c / \sqrt{\sigma_c^2 + \epsilon}, \quad
    y = (x - \mu)\,s + \beta, \quad \text{then the running update}

    \text{backward: } S_1 = \sum\delta,\ S_2 = \sum\delta(x - \mu) \text{ (reduce)}, \quad
    dx = k^{dy}\delta + k^{xmu}(x - \mu) + k^{const} \text{ (apply)}, \quad
    d\gamma = \sigma^{-1}S_2,\ d\beta = S_1

Parallel decomposition, numerics, race freedom, memory passes:
    Those of the blocks they call (see their modules): these kernels add only ``O(C)`` serial
    work between the parallel regions. Results are bit-identical to calling the blocks one
    after the other with the same per-channel arithmetic.

NOTE: these are parallel functions calling parallel functions, each a parallel region of its
own. That is safe from the on-disk cache (tested in fresh processes); a *serial* cached function
calling a parallel one is not (see the NOTE in :mod:`._config`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ._config import contiguous_view, nchw_variant, nhwc_variant, njit_kernel, njit_parallel
from .backward import _apply_cols, _apply_rows, _reduce_cols, _reduce_rows
from .moments import _moments_cols, _moments_rows
from .normalize import _normalize_cols, _normalize_rows
from .serial import _affine, _backward_coefficients, update_running

__all__ = [
    "backward_parallel_nchw",
    "backward_parallel_nhwc",
    "train_parallel_nchw",
    "train_parallel_nhwc",
]


@njit_kernel
def _forward_channel(c, m2, count, eps, weight, bias, var_out, scale, shift):
    """Channel ``c``: biased variance, then the affine map of the normalisation."""
    var_out[c] = m2[c] / count
    scale[c], shift[c] = _affine(c, 1.0 / math.sqrt(var_out[c] + eps), weight, bias)


@njit_parallel
def _train_rows(
    x, weight, bias, eps, y, mean_out, var_out, running_mean, running_var, factor, limit
):
    n_batch, n_chan, n_spatial = x.shape
    count = n_batch * n_spatial
    m2 = np.empty(n_chan)
    scale = np.empty(n_chan)
    shift = np.empty(n_chan)
    _moments_rows(x, mean_out, m2)
    # A prange of its own (not a serial loop) also keeps Numba from warning that this function,
    # whose other parallel regions are in the blocks it calls, has nothing to parallelise.
    for c in prange(n_chan):
        _forward_channel(c, m2, count, eps, weight, bias, var_out, scale, shift)
    _normalize_rows(x, mean_out, scale, shift, y)
    return update_running(running_mean, running_var, mean_out, var_out, count, factor, limit)


@njit_parallel
def _train_cols(
    x, weight, bias, eps, y, mean_out, var_out, running_mean, running_var, factor, limit
):
    n_rows, n_chan = x.shape
    m2 = np.empty(n_chan)
    scale = np.empty(n_chan)
    shift = np.empty(n_chan)
    _moments_cols(x, mean_out, m2)
    for c in prange(n_chan):
        _forward_channel(c, m2, n_rows, eps, weight, bias, var_out, scale, shift)
    _normalize_cols(x, mean_out, scale, shift, y)
    return update_running(running_mean, running_var, mean_out, var_out, n_rows, factor, limit)


@njit_kernel
def _backward_channel(
    c, sum_dy, sum_dy_xmu, var, weight, eps, count, training, k_dy, k_xmu, k_const, dweight_out,
    dbias_out,
):  # fmt: skip
    """Channel ``c``: the coefficients of ``dx``, and the parameter gradients (stored once, in
    the outputs' dtype, from the float64 sums)."""
    invstd = 1.0 / math.sqrt(np.float64(var[c]) + eps)
    k_dy[c], k_xmu[c], k_const[c] = _backward_coefficients(
        c, sum_dy[c], sum_dy_xmu[c], invstd, weight, count, training
    )
    dweight_out[c] = sum_dy_xmu[c] * invstd
    dbias_out[c] = sum_dy[c]


@njit_parallel
def _backward_rows(dy, x, mean, var, weight, eps, training, dx, dweight_out, dbias_out):
    n_batch, n_chan, n_spatial = x.shape
    mean64 = mean.astype(np.float64)
    sum_dy = np.empty(n_chan)
    sum_dy_xmu = np.empty(n_chan)
    k_dy = np.empty(n_chan)
    k_xmu = np.empty(n_chan)
    k_const = np.empty(n_chan)
    _reduce_rows(dy, x, mean64, sum_dy, sum_dy_xmu)
    for c in prange(n_chan):
        _backward_channel(
            c, sum_dy, sum_dy_xmu, var, weight, eps, n_batch * n_spatial, training,
            k_dy, k_xmu, k_const, dweight_out, dbias_out,
        )  # fmt: skip
    _apply_rows(dy, x, mean64, k_dy, k_xmu, k_const, dx)


@njit_parallel
def _backward_cols(dy, x, mean, var, weight, eps, training, dx, dweight_out, dbias_out):
    n_rows, n_chan = x.shape
    mean64 = mean.astype(np.float64)
    sum_dy = np.empty(n_chan)
    sum_dy_xmu = np.empty(n_chan)
    k_dy = np.empty(n_chan)
    k_xmu = np.empty(n_chan)
    k_const = np.empty(n_chan)
    _reduce_cols(dy, x, mean64, sum_dy, sum_dy_xmu)
    for c in prange(n_chan):
        _backward_channel(
            c, sum_dy, sum_dy_xmu, var, weight, eps, n_rows, training,
            k_dy, k_xmu, k_const, dweight_out, dbias_out,
        )  # fmt: skip
    _apply_cols(dy, x, mean64, k_dy, k_xmu, k_const, dx)


def train_parallel_nchw(
    x, weight, bias, eps, y, mean_out, var_out, running_mean, running_var, factor, limit
):
    """Training forward of an ``(N, C, S)`` array on all threads; see ``train_serial_nchw``.

    Same arguments and return value as :func:`.serial.train_serial_nchw`.
    """
    kernel, shape = nchw_variant(x.shape, _train_rows, _train_cols)
    return kernel(
        contiguous_view(x, shape), weight, bias, eps, contiguous_view(y, shape),
        mean_out, var_out, running_mean, running_var, factor, limit,
    )  # fmt: skip


def train_parallel_nhwc(
    x, weight, bias, eps, y, mean_out, var_out, running_mean, running_var, factor, limit
):
    """Training forward of a channels-last ``(M, C)`` array; see :func:`train_parallel_nchw`."""
    kernel, shape = nhwc_variant(x.shape, _train_rows, _train_cols)
    return kernel(
        contiguous_view(x, shape), weight, bias, eps, contiguous_view(y, shape),
        mean_out, var_out, running_mean, running_var, factor, limit,
    )  # fmt: skip


def backward_parallel_nchw(dy, x, mean, var, weight, eps, training, dx, dweight_out, dbias_out):
    """Gradients of an ``(N, C, S)`` array on all threads; see ``backward_serial_nchw``.

    Same arguments as :func:`.serial.backward_serial_nchw`; returns None.
    """
    kernel, shape = nchw_variant(x.shape, _backward_rows, _backward_cols)
    kernel(
        contiguous_view(dy, shape), contiguous_view(x, shape), mean, var, weight, eps, training,
        contiguous_view(dx, shape), dweight_out, dbias_out,
    )  # fmt: skip


def backward_parallel_nhwc(dy, x, mean, var, weight, eps, training, dx, dweight_out, dbias_out):
    """Gradients of a channels-last ``(M, C)`` array; see :func:`backward_parallel_nchw`."""
    kernel, shape = nhwc_variant(x.shape, _backward_rows, _backward_cols)
    kernel(
        contiguous_view(dy, shape), contiguous_view(x, shape), mean, var, weight, eps, training,
        contiguous_view(dx, shape), dweight_out, dbias_out,
    )  # fmt: skip
