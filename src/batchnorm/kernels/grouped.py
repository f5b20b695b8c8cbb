r"""Ghost batch norm: batch norm of each chunk of consecutive samples, in one kernel call.

A C-contiguous ``(N, C, S)`` array is cut along ``N`` into ``G`` chunks: chunk ``g`` holds
samples ``g * size`` up to ``(g + 1) * size``, and the last chunk runs to ``N`` (it may be
shorter or longer than ``size``; see :func:`batchnorm.variants.ghost_chunks`). Each chunk is a
contiguous ``(k, C, S)`` block of memory, normalized with its own per-channel statistics:

.. math::
    y = (x - \mu_{g,c})\,\gamma_c / \sqrt{\sigma^2_{g,c} + \epsilon} + \beta_c, \qquad
    x \in \text{chunk } g

and the backward is batch norm's (:mod:`.backward`) applied to each chunk, with
:math:`d\gamma` and :math:`d\beta` summed over the chunks. The forward also merges the chunks'
moments per channel (Chan et al., :func:`.moments.chan_merge`, in chunk order): the moments of
the whole batch, for the one running update.

Parallel decomposition:
    * ``S > 1`` (rows variant): the ``prange`` runs over the ``G * C`` pairs (chunk, channel).
      An item computes the pair's moments with :func:`.moments.rows_channel_moments` on the
      chunk (the serial batch-norm blocks, so the statistics are those of batch norm on the
      chunk alone), then normalizes the pair's rows while they are still in cache. The backward
      item sums :math:`\delta` and :math:`\delta(x - \mu)` over the pair's rows, then writes
      ``dx`` for them.
    * ``S == 1`` (cols variant, ``(N, C)`` data): the ``prange`` runs over the ``G`` chunks; an
      item is the serial channels-last kernel's work on its rows
      (:func:`.moments.cols_group_moments`, :func:`.backward.cols_group_sums`).

    The kernels are parallel functions that call serial helpers only (see the NOTE in
    :mod:`._config`); the public functions are plain Python, like the other kernels'.

Numerics:
    float64 accumulation and arithmetic for float32 and float64 data, results rounded once at
    the store. The statistics of a pair are pivoted on its first value, as in :mod:`.moments`,
    so a mean of 1e4 with a spread of 1e-2 keeps its variance.

Race freedom and determinism:
    An item writes only its own ``(g, c)`` statistics and its own rows of ``y``/``dx`` (rows
    variant: rows ``n * C + c`` of chunk ``g``; cols variant: rows of chunk ``g``), and its own
    slots of the per-chunk partials. The merges over chunks run per channel in chunk order:
    results are bit-identical for a given shape whatever the thread count.

Memory passes:
    Forward: 1 read of ``x`` from DRAM and 1 write of ``y`` (a pair's rows, at most a few
    hundred KiB, are read again from cache to normalize). Backward: 1 read of ``dy`` and ``x``
    each and 1 write of ``dx`` (the second read, from cache). Roofline: ``2 * x.nbytes``
    forward, ``3 * x.nbytes`` backward.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ._config import contiguous_view, nchw_variant, nhwc_plan, njit_kernel, njit_parallel
from .backward import cols_group_sums
from .moments import chan_merge, channel_pivots, cols_group_moments, rows_channel_moments
from .serial import _affine, _backward_coefficients

__all__ = ["ghost_backward_nchw", "ghost_train_nchw"]


@njit_kernel
def _chunk_bounds(g, groups, size, n_batch):
    """Samples ``n0..n1-1`` of chunk ``g``: ``size`` each, the last one up to ``n_batch``."""
    n0 = g * size
    n1 = n_batch if g == groups - 1 else n0 + size
    return n0, n1


@njit_kernel
def _merge_chunks(n_batch, n_spatial, size, mean, var, merged_mean, merged_m2):
    """Chan's merge of the chunks' moments of each channel, in chunk order."""
    groups, n_chan = mean.shape
    for c in range(n_chan):
        n_a = np.float64(0.0)
        mean_a = np.float64(0.0)
        m2_a = np.float64(0.0)
        for g in range(groups):
            n0, n1 = _chunk_bounds(g, groups, size, n_batch)
            n_b = np.float64((n1 - n0) * n_spatial)
            n_a, mean_a, m2_a = chan_merge(n_a, mean_a, m2_a, n_b, mean[g, c], var[g, c] * n_b)
        merged_mean[c] = mean_a
        merged_m2[c] = m2_a


@njit_parallel
def _train_rows(x, size, weight, bias, eps, y, mean_out, var_out, merged_mean, merged_m2):
    n_batch, n_chan, n_spatial = x.shape
    groups = mean_out.shape[0]
    # Item i owns the pair (g, c): its statistics slot and rows n * C + c of chunk g.
    for i in prange(groups * n_chan):
        g = i // n_chan
        c = i - g * n_chan
        n0, n1 = _chunk_bounds(g, groups, size, n_batch)
        mu, m2 = rows_channel_moments(x[n0:n1], c)
        var = m2 / ((n1 - n0) * n_spatial)
        scale, shift = _affine(c, 1.0 / math.sqrt(var + eps), weight, bias)
        for n in range(n0, n1):
            row = x[n, c]
            out = y[n, c]
            for s in range(row.shape[0]):
                # Centre first, then scale (see normalize._normalize_rows).
                out[s] = (row[s] - mu) * scale + shift
        mean_out[g, c] = mu
        var_out[g, c] = var
    _merge_chunks(n_batch, n_spatial, size, mean_out, var_out, merged_mean, merged_m2)


@njit_parallel
def _train_cols(x, size, weight, bias, eps, y, mean_out, var_out, merged_mean, merged_m2):
    n_rows, n_chan = x.shape
    groups = mean_out.shape[0]
    scratch = np.empty((groups, 4, n_chan))
    # Item g owns chunk g: its rows of y, row g of the statistics and of the scratch.
    for g in prange(groups):
        n0, n1 = _chunk_bounds(g, groups, size, n_rows)
        chunk = x[n0:n1]
        block_rows, n_blocks, _ = nhwc_plan(n1 - n0, n_chan)
        pivot = channel_pivots(chunk[0])
        m2 = scratch[g, 3]
        mean = mean_out[g]
        cols_group_moments(chunk, 0, n_blocks, block_rows, pivot, mean, m2, scratch[g, :3])
        scale = scratch[g, 0]
        shift = scratch[g, 1]
        for c in range(n_chan):
            mean[c] = pivot[c] + mean[c]
            var_out[g, c] = m2[c] / (n1 - n0)
            scale[c], shift[c] = _affine(c, 1.0 / math.sqrt(var_out[g, c] + eps), weight, bias)
        for r in range(n0, n1):
            row = x[r]
            out = y[r]
            for c in range(n_chan):
                out[c] = (row[c] - mean[c]) * scale[c] + shift[c]
    _merge_chunks(n_rows, 1, size, mean_out, var_out, merged_mean, merged_m2)


@njit_kernel
def _sum_chunks(part_dw, part_db, dweight_out, dbias_out):
    """Parameter gradients: the chunks' float64 partials summed per channel in chunk order."""
    groups, n_chan = part_dw.shape
    for c in range(n_chan):
        total_dw = np.float64(0.0)
        total_db = np.float64(0.0)
        for g in range(groups):
            total_dw += part_dw[g, c]
            total_db += part_db[g, c]
        dweight_out[c] = total_dw
        dbias_out[c] = total_db


@njit_kernel
def _chunk_coefficients(c, sum_dy, sum_dy_xmu, invstd, weight, inv_count):
    """:func:`.serial._backward_coefficients` in training, given ``1 / count``."""
    k_dy = invstd * (np.float64(weight[c]) if weight.shape[0] > 0 else np.float64(1.0))
    return k_dy, -k_dy * invstd * invstd * sum_dy_xmu * inv_count, -k_dy * sum_dy * inv_count


@njit_parallel
def _backward_rows(dy, x, size, mean, var, weight, eps, dx, dweight_out, dbias_out):
    n_batch, n_chan, n_spatial = x.shape
    groups = mean.shape[0]
    part_dw = np.empty((groups, n_chan))
    part_db = np.empty((groups, n_chan))
    # Item i owns the pair (g, c): its partial slots and rows n * C + c of chunk g of dx.
    for i in prange(groups * n_chan):
        g = i // n_chan
        c = i - g * n_chan
        n0, n1 = _chunk_bounds(g, groups, size, n_batch)
        # SPEEDTIP: the reciprocal of the count before the loops. A division between the two
        # loops of this prange body made the whole item run at half speed ((16, 16, 1024)
        # float32, one thread: 0.86 -> 0.43 ns per value; serial code does not show it).
        inv_count = 1.0 / ((n1 - n0) * n_spatial)
        mu = mean[g, c]
        sum_dy = np.float64(0.0)
        sum_dy_xmu = np.float64(0.0)
        for n in range(n0, n1):
            d_row = dy[n, c]
            row = x[n, c]
            for s in range(row.shape[0]):
                d = np.float64(d_row[s])
                sum_dy += d
                sum_dy_xmu += d * (row[s] - mu)
        invstd = 1.0 / math.sqrt(var[g, c] + eps)
        k_dy, k_xmu, k_const = _chunk_coefficients(c, sum_dy, sum_dy_xmu, invstd, weight, inv_count)
        for n in range(n0, n1):
            d_row = dy[n, c]
            row = x[n, c]
            out = dx[n, c]
            for s in range(row.shape[0]):
                out[s] = k_dy * np.float64(d_row[s]) + k_xmu * (row[s] - mu) + k_const
        part_dw[g, c] = sum_dy_xmu * invstd
        part_db[g, c] = sum_dy
    _sum_chunks(part_dw, part_db, dweight_out, dbias_out)


@njit_parallel
def _backward_cols(dy, x, size, mean, var, weight, eps, dx, dweight_out, dbias_out):
    n_rows, n_chan = x.shape
    groups = mean.shape[0]
    part_dw = np.zeros((groups, n_chan))
    part_db = np.zeros((groups, n_chan))
    scratch = np.empty((groups, 5, n_chan))
    # Item g owns chunk g: its rows of dx, row g of the partials and of the scratch.
    for g in prange(groups):
        n0, n1 = _chunk_bounds(g, groups, size, n_rows)
        block_rows = nhwc_plan(n1 - n0, n_chan)[0]
        mu = mean[g]
        sum_dy = part_db[g]
        sum_dy_xmu = scratch[g, 4]
        for c in range(n_chan):
            sum_dy_xmu[c] = 0.0
        cols_group_sums(
            dy, x, mu, n0, n1, block_rows, sum_dy, sum_dy_xmu, scratch[g, 0], scratch[g, 1]
        )
        k_dy = scratch[g, 0]
        k_xmu = scratch[g, 1]
        k_const = scratch[g, 2]
        for c in range(n_chan):
            invstd = 1.0 / math.sqrt(var[g, c] + eps)
            k_dy[c], k_xmu[c], k_const[c] = _backward_coefficients(
                c, sum_dy[c], sum_dy_xmu[c], invstd, weight, n1 - n0, True
            )
            part_dw[g, c] = sum_dy_xmu[c] * invstd
        for r in range(n0, n1):
            d_row = dy[r]
            row = x[r]
            out = dx[r]
            for c in range(n_chan):
                out[c] = k_dy[c] * np.float64(d_row[c]) + k_xmu[c] * (row[c] - mu[c]) + k_const[c]
    _sum_chunks(part_dw, part_db, dweight_out, dbias_out)


def ghost_train_nchw(x, size, weight, bias, eps, y, mean_out, var_out, merged_mean, merged_m2):
    r"""Training forward of ghost batch norm on a contiguous ``(N, C, S)`` array.

    Args:
        x: C-contiguous float32 or float64 array of shape ``(N, C, S)``.
        size: Samples per chunk; chunk ``g`` is samples ``g * size`` up to ``(g + 1) * size``,
            the last chunk (``g = G - 1``) runs to ``N``. Every chunk needs 2 or more values per
            channel (``(n1 - n0) * S >= 2``).
        weight: ``(C,)`` scale in ``x``'s dtype, or length 0 (none).
        bias: ``(C,)`` shift in ``x``'s dtype, or length 0 (none).
        eps: Added to the variance before the square root.
        y: Output, shape and dtype of ``x``, C-contiguous; overwritten.
        mean_out: float64 ``(G, C)``; receives the chunks' means (``G`` is read from it).
        var_out: float64 ``(G, C)``; receives the chunks' biased variances.
        merged_mean: float64 ``(C,)``; receives the mean of the whole batch.
        merged_m2: float64 ``(C,)``; receives the whole batch's sum of squared deviations.

    Returns:
        None. Computed in float64 whatever the dtype of ``x``.

    Raises:
        ValueError: If an array argument of the data's shape is not C-contiguous.
    """
    kernel, shape = nchw_variant(x.shape, _train_rows, _train_cols)
    kernel(
        contiguous_view(x, shape), size, weight, bias, eps, contiguous_view(y, shape),
        mean_out, var_out, merged_mean, merged_m2,
    )  # fmt: skip


def ghost_backward_nchw(dy, x, size, mean, var, weight, eps, dx, dweight_out, dbias_out):
    r"""Gradients of :func:`ghost_train_nchw`: batch norm's training backward per chunk.

    Args:
        dy: C-contiguous gradient of the output, shape and dtype of ``x``.
        x: The forward's ``(N, C, S)`` input.
        size: The forward's chunk size.
        mean: float64 ``(G, C)``, the chunks' means from the forward.
        var: float64 ``(G, C)``, the chunks' biased variances from the forward.
        weight: ``(C,)`` or length 0.
        eps: The forward's epsilon.
        dx: Output, shape and dtype of ``x``, C-contiguous; overwritten.
        dweight_out: ``(C,)`` in ``x``'s dtype; receives :math:`d\gamma`, summed over chunks
            in float64 and rounded once.
        dbias_out: ``(C,)``, like ``dweight_out``; receives :math:`d\beta`.

    Returns:
        None.

    Raises:
        ValueError: If an array argument of the data's shape is not C-contiguous.
    """
    kernel, shape = nchw_variant(x.shape, _backward_rows, _backward_cols)
    kernel(
        contiguous_view(dy, shape), contiguous_view(x, shape), size, mean, var, weight, eps,
        contiguous_view(dx, shape), dweight_out, dbias_out,
    )  # fmt: skip
