r"""Batch norm followed by a pointwise activation, one kernel call each way.

With :math:`z = (x - \mu)\,s + t` per channel (:math:`s = \gamma\,\mathrm{invstd}`,
:math:`t = \beta`) and an activation :math:`a` (:mod:`.activation`, by integer code):

.. math::
    \text{forward: } y = a(z), \qquad
    \text{backward: } \delta_z = \delta\,a'(z),\quad
    dx = k^{dy}\delta_z + k^{xmu}(x - \mu) + k^{const}

with batch norm's coefficients (:mod:`.backward`) computed from the sums
:math:`S_1 = \sum\delta_z` and :math:`S_2 = \sum\delta_z(x - \mu)`, and
:math:`d\gamma = \mathrm{invstd}\,S_2`, :math:`d\beta = S_1`. :math:`z` is never stored: the
backward recomputes it from ``x`` in both of its passes, so the memory traffic is batch norm's
(forward: read ``x`` for the moments and again to write ``y``; backward: read ``dy`` and ``x``
twice, write ``dx``) and the unfused pair's extra passes over ``z`` disappear.

One compiled kernel per activation:
    The activation is a compile-time constant of each kernel (:func:`kernels_for` builds the
    kernels of one code as closures over it, each cached on disk under its own index). A code
    passed at run time and branched on per value stops the loops from vectorising and costs a
    branch misprediction per value (ReLU: 6.5 ns per value against 0.17 ns, one thread);
    as a constant it folds away and ReLU and LeakyReLU run at the speed of the plain
    normalization. ELU, SiLU and GELU call ``exp``/``erf`` per value (no vector math library
    in the Numba build), so they are compute-bound.

Parallel decomposition, numerics, race freedom:
    As :mod:`.fused` (moments from :mod:`.moments`' blocks, then the per-channel step, then a
    parallel pass), the backward sums per block with private partial slots merged in a fixed
    order: float64 arithmetic for float32 and float64 data, bit-identical results whatever the
    thread count. With the identity code the kernels compute batch norm exactly.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import prange

from ._config import (
    BLOCK_ELEMS,
    nchw_plan,
    nchw_variant,
    nhwc_plan,
    nhwc_variant,
    njit_parallel,
)
from .activation import apply, derivative, derivative_from_output, invert
from .moments import _moments_cols, _moments_rows
from .serial import _affine, _backward_coefficients, update_running

__all__ = ["ActivatedKernels", "inplace_backward_for", "kernels_for", "select"]


class ActivatedKernels:
    """The compiled kernels of one activation code (see :func:`kernels_for`).

    Attributes (each takes ``(N, C, S)`` ``rows`` or ``(M, C)`` ``cols`` C-contiguous arrays):
        train_rows, train_cols: ``(x, weight, bias, eps, p, y, mean_out, var_out, running_mean,
            running_var, factor, limit) -> updated``: moments, ``y = a(z)``, running update.
        eval_rows, eval_cols: ``(x, mean, scale, shift, p, y)``: ``y = a((x - mean) scale +
            shift)`` with float64 ``(C,)`` statistics.
        backward_rows, backward_cols: ``(dy, x, mean, scale, shift, invstd, weight, p,
            training, dx, dweight_out, dbias_out)``.
        inplace_rows, inplace_cols: ``(x, mean, scale, shift, p)``: ``eval`` written over ``x``
            (compiled on first use; not in :func:`batchnorm.kernels.warmup`).
    """

    def __init__(self, code: int) -> None:
        self.code = code
        (
            self.train_rows,
            self.train_cols,
            self.eval_rows,
            self.eval_cols,
            self.backward_rows,
            self.backward_cols,
            self.inplace_rows,
            self.inplace_cols,
        ) = _build(code)


@functools.cache
def kernels_for(code: int) -> ActivatedKernels:
    """The kernels of activation ``code`` (built once; each compiles on its first call)."""
    return ActivatedKernels(code)


def _build(code: int):  # noqa: C901 - one closure per kernel, over the constant `code`
    # Every function below is a closure over `code`, an int: Numba freezes it as a constant,
    # and `apply`/`derivative` (inlined) reduce to the activation's own arithmetic.

    @njit_parallel
    def train_rows(x, weight, bias, eps, p, y, mean_out, var_out, running_mean, running_var,
                   factor, limit):  # fmt: skip
        n_batch, n_chan, n_spatial = x.shape
        count = n_batch * n_spatial
        m2 = np.empty(n_chan)
        scale = np.empty(n_chan)
        shift = np.empty(n_chan)
        _moments_rows(x, mean_out, m2)
        for c in prange(n_chan):
            var_out[c] = m2[c] / count
            scale[c], shift[c] = _affine(c, 1.0 / math.sqrt(var_out[c] + eps), weight, bias)
        chunks = (n_spatial + BLOCK_ELEMS - 1) // BLOCK_ELEMS
        xr = x.reshape((n_batch * n_chan, n_spatial))
        yr = y.reshape((n_batch * n_chan, n_spatial))
        # Item i writes only yr[r, s0:s1] (as normalize._normalize_rows).
        for i in prange(n_batch * n_chan * chunks):
            r = i // chunks
            k = i - r * chunks
            c = r % n_chan
            s0 = k * n_spatial // chunks
            s1 = (k + 1) * n_spatial // chunks
            mu = mean_out[c]
            a = scale[c]
            b = shift[c]
            x_row = xr[r, s0:s1]
            y_row = yr[r, s0:s1]
            for s in range(x_row.shape[0]):
                y_row[s] = apply((x_row[s] - mu) * a + b, code, p)
        return update_running(running_mean, running_var, mean_out, var_out, count, factor, limit)

    @njit_parallel
    def train_cols(x, weight, bias, eps, p, y, mean_out, var_out, running_mean, running_var,
                   factor, limit):  # fmt: skip
        n_rows, n_chan = x.shape
        m2 = np.empty(n_chan)
        scale = np.empty(n_chan)
        shift = np.empty(n_chan)
        _moments_cols(x, mean_out, m2)
        for c in prange(n_chan):
            var_out[c] = m2[c] / n_rows
            scale[c], shift[c] = _affine(c, 1.0 / math.sqrt(var_out[c] + eps), weight, bias)
        for r in prange(n_rows):
            x_row = x[r]
            y_row = y[r]
            for c in range(n_chan):
                y_row[c] = apply((x_row[c] - mean_out[c]) * scale[c] + shift[c], code, p)
        return update_running(running_mean, running_var, mean_out, var_out, n_rows, factor, limit)

    @njit_parallel
    def eval_rows(x, mean, scale, shift, p, y):
        n_batch, n_chan, n_spatial = x.shape
        chunks = (n_spatial + BLOCK_ELEMS - 1) // BLOCK_ELEMS
        xr = x.reshape((n_batch * n_chan, n_spatial))
        yr = y.reshape((n_batch * n_chan, n_spatial))
        for i in prange(n_batch * n_chan * chunks):
            r = i // chunks
            k = i - r * chunks
            c = r % n_chan
            s0 = k * n_spatial // chunks
            s1 = (k + 1) * n_spatial // chunks
            mu = mean[c]
            a = scale[c]
            b = shift[c]
            x_row = xr[r, s0:s1]
            y_row = yr[r, s0:s1]
            for s in range(x_row.shape[0]):
                y_row[s] = apply((x_row[s] - mu) * a + b, code, p)

    @njit_parallel
    def eval_cols(x, mean, scale, shift, p, y):
        n_rows, n_chan = x.shape
        for r in prange(n_rows):
            x_row = x[r]
            y_row = y[r]
            for c in range(n_chan):
                y_row[c] = apply((x_row[c] - mean[c]) * scale[c] + shift[c], code, p)

    @njit_parallel
    def inplace_rows(x, mean, scale, shift, p):
        # eval_rows writing over its input. One array read and written through one name: with
        # x and y the same memory, eval_rows' vectorised loop fails LLVM's run-time overlap
        # check and the scalar fallback runs (2.0 ms against 1.0 ms on (32, 128, 28, 28)).
        n_batch, n_chan, n_spatial = x.shape
        xr = x.reshape((n_batch * n_chan, n_spatial))
        for r in prange(n_batch * n_chan):
            c = r % n_chan
            mu = mean[c]
            a = scale[c]
            b = shift[c]
            row = xr[r]
            for s in range(row.shape[0]):
                row[s] = apply((row[s] - mu) * a + b, code, p)

    @njit_parallel
    def inplace_cols(x, mean, scale, shift, p):
        n_rows, n_chan = x.shape
        for r in prange(n_rows):
            row = x[r]
            for c in range(n_chan):
                row[c] = apply((row[c] - mean[c]) * scale[c] + shift[c], code, p)

    @njit_parallel
    def backward_rows(dy, x, mean, scale, shift, invstd, weight, p, training, dx, dweight_out,
                      dbias_out):  # fmt: skip
        n_batch, n_chan, n_spatial = x.shape
        rows, groups, chunks = nchw_plan(n_batch, n_spatial)
        per_chan = groups * chunks
        part_dz = np.empty(n_chan * per_chan)
        part_dz_xmu = np.empty(n_chan * per_chan)
        xr = x.reshape((n_batch * n_chan, n_spatial))
        dyr = dy.reshape((n_batch * n_chan, n_spatial))
        # Reduce: item i owns one partial slot; items in memory order (see backward._reduce_rows).
        for i in prange(n_chan * per_chan):
            g = i // (n_chan * chunks)
            j = i - g * (n_chan * chunks)
            c = j // chunks
            k = j - c * chunks
            n0 = g * rows
            n1 = min(n_batch, n0 + rows)
            s0 = k * n_spatial // chunks
            s1 = (k + 1) * n_spatial // chunks
            mu = mean[c]
            a = scale[c]
            b = shift[c]
            acc_dz = np.float64(0.0)
            acc_dz_xmu = np.float64(0.0)
            for n in range(n0, n1):
                x_row = xr[n * n_chan + c, s0:s1]
                dy_row = dyr[n * n_chan + c, s0:s1]
                for s in range(x_row.shape[0]):
                    xmu = x_row[s] - mu
                    dz = dy_row[s] * derivative(xmu * a + b, code, p)
                    acc_dz += dz
                    acc_dz_xmu += dz * xmu
            part_dz[c * per_chan + g * chunks + k] = acc_dz
            part_dz_xmu[c * per_chan + g * chunks + k] = acc_dz_xmu
        k_dy = np.empty(n_chan)
        k_xmu = np.empty(n_chan)
        k_const = np.empty(n_chan)
        count = n_batch * n_spatial
        for c in prange(n_chan):
            base = c * per_chan
            sum_dz = part_dz[base]
            sum_dz_xmu = part_dz_xmu[base]
            for j in range(1, per_chan):
                sum_dz += part_dz[base + j]
                sum_dz_xmu += part_dz_xmu[base + j]
            k_dy[c], k_xmu[c], k_const[c] = _backward_coefficients(
                c, sum_dz, sum_dz_xmu, invstd[c], weight, count, training
            )
            dweight_out[c] = sum_dz_xmu * invstd[c]
            dbias_out[c] = sum_dz
        dxr = dx.reshape((n_batch * n_chan, n_spatial))
        apply_chunks = (n_spatial + BLOCK_ELEMS - 1) // BLOCK_ELEMS
        # Apply: item i writes only dxr[r, s0:s1].
        for i in prange(n_batch * n_chan * apply_chunks):
            r = i // apply_chunks
            k = i - r * apply_chunks
            c = r % n_chan
            s0 = k * n_spatial // apply_chunks
            s1 = (k + 1) * n_spatial // apply_chunks
            mu = mean[c]
            a = scale[c]
            b = shift[c]
            kd = k_dy[c]
            kx = k_xmu[c]
            kc = k_const[c]
            x_row = xr[r, s0:s1]
            dy_row = dyr[r, s0:s1]
            dx_row = dxr[r, s0:s1]
            for s in range(x_row.shape[0]):
                xmu = x_row[s] - mu
                dz = dy_row[s] * derivative(xmu * a + b, code, p)
                dx_row[s] = kd * dz + kx * xmu + kc

    @njit_parallel
    def backward_cols(dy, x, mean, scale, shift, invstd, weight, p, training, dx, dweight_out,
                      dbias_out):  # fmt: skip
        n_rows, n_chan = x.shape
        block_rows, n_blocks, n_groups = nhwc_plan(n_rows, n_chan)
        group_dz = np.zeros((n_groups, n_chan))
        group_dz_xmu = np.zeros((n_groups, n_chan))
        # Group g owns row g of the partials (see backward._reduce_cols).
        for g in prange(n_groups):
            r_start = (g * n_blocks // n_groups) * block_rows
            r_stop = min(n_rows, ((g + 1) * n_blocks // n_groups) * block_rows)
            acc_dz = group_dz[g]
            acc_dz_xmu = group_dz_xmu[g]
            for r in range(r_start, r_stop):
                x_row = x[r]
                dy_row = dy[r]
                for c in range(n_chan):
                    xmu = x_row[c] - mean[c]
                    dz = dy_row[c] * derivative(xmu * scale[c] + shift[c], code, p)
                    acc_dz[c] += dz
                    acc_dz_xmu[c] += dz * xmu
        k_dy = np.empty(n_chan)
        k_xmu = np.empty(n_chan)
        k_const = np.empty(n_chan)
        for c in range(n_chan):
            sum_dz = group_dz[0, c]
            sum_dz_xmu = group_dz_xmu[0, c]
            for g in range(1, n_groups):
                sum_dz += group_dz[g, c]
                sum_dz_xmu += group_dz_xmu[g, c]
            k_dy[c], k_xmu[c], k_const[c] = _backward_coefficients(
                c, sum_dz, sum_dz_xmu, invstd[c], weight, n_rows, training
            )
            dweight_out[c] = sum_dz_xmu * invstd[c]
            dbias_out[c] = sum_dz
        for r in prange(n_rows):
            x_row = x[r]
            dy_row = dy[r]
            dx_row = dx[r]
            for c in range(n_chan):
                xmu = x_row[c] - mean[c]
                dz = dy_row[c] * derivative(xmu * scale[c] + shift[c], code, p)
                dx_row[c] = k_dy[c] * dz + k_xmu[c] * xmu + k_const[c]

    return (
        train_rows, train_cols, eval_rows, eval_cols, backward_rows, backward_cols, inplace_rows,
        inplace_cols,
    )  # fmt: skip


@functools.cache
def inplace_backward_for(code: int):
    r"""``(rows, cols)``: the backward of in-place activated batch norm from its output alone.

    For an invertible activation (identity, LeakyReLU, ELU), per value:
    :math:`z = a^{-1}(y)`, :math:`\hat{x} = (z - \beta)\,\gamma^{-1}`,
    :math:`\delta_z = \delta\,a'(z)` (from :math:`y`); the sums
    :math:`S_1 = \sum\delta_z`, :math:`S_2 = \sum\delta_z\hat{x}` per channel (float64,
    written to ``sum_dz_out`` and ``sum_dz_x_hat_out``, which are :math:`d\beta` and
    :math:`d\gamma`); then, when ``dx`` has values (``want_dx``),
    :math:`dx = k\,(\delta_z - S_1/m - \hat{x}\,S_2/m)` in training and :math:`k\,\delta_z`
    in evaluation, with :math:`k = \gamma\,\mathrm{invstd}`. Arguments:
    ``(dy, y, inv_gamma, beta, k, p, training, want_dx, dx, sum_dz_out, sum_dz_x_hat_out)``.
    Channels whose :math:`\gamma` cannot be inverted are the caller's: it passes
    ``inv_gamma = 0`` for them (finite values here) and replaces their results.
    """
    return _build_inplace(code)


def _build_inplace(code: int):  # noqa: C901 - closures over the constant `code`, as _build
    @njit_parallel
    def rows(dy, y, inv_gamma, beta, k, p, training, want_dx, dx, sum_dz_out, sum_dz_x_hat_out):
        n_batch, n_chan, n_spatial = y.shape
        groups_rows, groups, chunks = nchw_plan(n_batch, n_spatial)
        per_chan = groups * chunks
        part_dz = np.empty(n_chan * per_chan)
        part_dz_x_hat = np.empty(n_chan * per_chan)
        yr = y.reshape((n_batch * n_chan, n_spatial))
        dyr = dy.reshape((n_batch * n_chan, n_spatial))
        for i in prange(n_chan * per_chan):
            g = i // (n_chan * chunks)
            j = i - g * (n_chan * chunks)
            c = j // chunks
            kk = j - c * chunks
            n0 = g * groups_rows
            n1 = min(n_batch, n0 + groups_rows)
            s0 = kk * n_spatial // chunks
            s1 = (kk + 1) * n_spatial // chunks
            b = beta[c]
            ig = inv_gamma[c]
            acc_dz = np.float64(0.0)
            acc_dz_x_hat = np.float64(0.0)
            for n in range(n0, n1):
                y_row = yr[n * n_chan + c, s0:s1]
                dy_row = dyr[n * n_chan + c, s0:s1]
                for s in range(y_row.shape[0]):
                    yv = np.float64(y_row[s])
                    dz = dy_row[s] * derivative_from_output(yv, code, p)
                    acc_dz += dz
                    acc_dz_x_hat += dz * ((invert(yv, code, p) - b) * ig)
            part_dz[c * per_chan + g * chunks + kk] = acc_dz
            part_dz_x_hat[c * per_chan + g * chunks + kk] = acc_dz_x_hat
        count = n_batch * n_spatial
        a_dz = np.empty(n_chan)
        a_x_hat = np.empty(n_chan)
        for c in prange(n_chan):
            base = c * per_chan
            total_dz = part_dz[base]
            total_dz_x_hat = part_dz_x_hat[base]
            for j in range(1, per_chan):
                total_dz += part_dz[base + j]
                total_dz_x_hat += part_dz_x_hat[base + j]
            sum_dz_out[c] = total_dz
            sum_dz_x_hat_out[c] = total_dz_x_hat
            a_dz[c] = total_dz / count if training else 0.0
            a_x_hat[c] = total_dz_x_hat / count if training else 0.0
        if not want_dx:
            return
        dxr = dx.reshape((n_batch * n_chan, n_spatial))
        apply_chunks = (n_spatial + BLOCK_ELEMS - 1) // BLOCK_ELEMS
        for i in prange(n_batch * n_chan * apply_chunks):
            r = i // apply_chunks
            kk = i - r * apply_chunks
            c = r % n_chan
            s0 = kk * n_spatial // apply_chunks
            s1 = (kk + 1) * n_spatial // apply_chunks
            b = beta[c]
            ig = inv_gamma[c]
            kc = k[c]
            m_dz = a_dz[c]
            m_x_hat = a_x_hat[c]
            y_row = yr[r, s0:s1]
            dy_row = dyr[r, s0:s1]
            dx_row = dxr[r, s0:s1]
            for s in range(y_row.shape[0]):
                yv = np.float64(y_row[s])
                dz = dy_row[s] * derivative_from_output(yv, code, p)
                x_hat = (invert(yv, code, p) - b) * ig
                dx_row[s] = kc * (dz - m_dz - x_hat * m_x_hat)

    @njit_parallel
    def cols(dy, y, inv_gamma, beta, k, p, training, want_dx, dx, sum_dz_out, sum_dz_x_hat_out):
        n_rows, n_chan = y.shape
        block_rows, n_blocks, n_groups = nhwc_plan(n_rows, n_chan)
        group_dz = np.zeros((n_groups, n_chan))
        group_dz_x_hat = np.zeros((n_groups, n_chan))
        for g in prange(n_groups):
            r_start = (g * n_blocks // n_groups) * block_rows
            r_stop = min(n_rows, ((g + 1) * n_blocks // n_groups) * block_rows)
            acc_dz = group_dz[g]
            acc_dz_x_hat = group_dz_x_hat[g]
            for r in range(r_start, r_stop):
                y_row = y[r]
                dy_row = dy[r]
                for c in range(n_chan):
                    yv = np.float64(y_row[c])
                    dz = dy_row[c] * derivative_from_output(yv, code, p)
                    acc_dz[c] += dz
                    acc_dz_x_hat[c] += dz * ((invert(yv, code, p) - beta[c]) * inv_gamma[c])
        a_dz = np.empty(n_chan)
        a_x_hat = np.empty(n_chan)
        for c in range(n_chan):
            total_dz = group_dz[0, c]
            total_dz_x_hat = group_dz_x_hat[0, c]
            for g in range(1, n_groups):
                total_dz += group_dz[g, c]
                total_dz_x_hat += group_dz_x_hat[g, c]
            sum_dz_out[c] = total_dz
            sum_dz_x_hat_out[c] = total_dz_x_hat
            a_dz[c] = total_dz / n_rows if training else 0.0
            a_x_hat[c] = total_dz_x_hat / n_rows if training else 0.0
        if not want_dx:
            return
        for r in prange(n_rows):
            y_row = y[r]
            dy_row = dy[r]
            dx_row = dx[r]
            for c in range(n_chan):
                yv = np.float64(y_row[c])
                dz = dy_row[c] * derivative_from_output(yv, code, p)
                x_hat = (invert(yv, code, p) - beta[c]) * inv_gamma[c]
                dx_row[c] = k[c] * (dz - a_dz[c] - x_hat * a_x_hat[c])

    return rows, cols


def select(code: int, op: str, layout: str, shape: tuple[int, ...]):
    """The kernel for ``op`` (``"train"``, ``"eval"``, ``"inplace"`` or ``"backward"``) of
    activation ``code`` on a kernel view of ``shape`` (``(N, C, S)`` for ``layout="nchw"``,
    ``(M, C)`` for ``"nhwc"``), and the shape to view every data array as (see
    ``_config.nchw_variant``).
    """
    kernels = kernels_for(code)
    rows, cols = getattr(kernels, op + "_rows"), getattr(kernels, op + "_cols")
    if layout == "nchw":
        return nchw_variant(shape, rows, cols)
    return nhwc_variant(shape, rows, cols)
