r"""Backward pass of batch norm: one reduction, then one per-channel affine map.

With :math:`\delta = \partial\ell/\partial y`, :math:`\hat{x} = (x - \mu)\,\mathrm{invstd}` and
sums over the :math:`m` values of a channel, the training gradient is (``reference.py``,
:func:`batch_norm_train_backward`)

.. math::
    \frac{\partial\ell}{\partial x} = k^{dy}\,\delta + k^{xmu}\,(x - \mu) + k^{const},\qquad
    k^{dy} = \gamma\,\mathrm{invstd},\quad
    k^{xmu} = -\frac{\gamma\,\mathrm{invstd}^3}{m}\sum(\delta\,(x-\mu)),\quad
    k^{const} = -\frac{\gamma\,\mathrm{invstd}}{m}\sum\delta

and :math:`\partial\ell/\partial\beta = \sum\delta`,
:math:`\partial\ell/\partial\gamma = \mathrm{invstd}\sum\delta\,(x-\mu)`. In inference mode
:math:`k^{xmu} = k^{const} = 0`. :func:`backward_reduce_nchw` computes the two sums,
:func:`backward_apply_nchw` the map; the caller forms the coefficients in between.

Parallel decomposition:
    ``backward_reduce`` uses the block plan of :mod:`.moments`: ``nchw`` items are blocks of one
    channel with one partial slot each, merged per channel in block order; ``nhwc`` items are
    contiguous groups of row blocks with private per-channel partial rows, merged serially in
    group order. ``backward_apply`` is split like :mod:`.normalize` (row slices for ``nchw``,
    rows for ``nhwc``). The public kernels are plain Python functions that pick the compiled
    variant (``S == 1`` and ``C == 1`` cases go to the twin layout, as in :mod:`.moments`).

Numerics:
    Accumulation and arithmetic are float64 for float32 and float64 input; ``dx`` is rounded to
    its dtype once, at the store. Each block sums at most ~``BLOCK_ELEMS`` terms before the
    partials are added, which keeps the rounding error of a sum near that of pairwise summation.

Race freedom and determinism:
    Every reduction item writes only its own partial slot or partial row, the apply items write
    disjoint ranges of ``dx``; partials are combined in a fixed order, so results are
    bit-identical for a given shape whatever the thread count.

Memory passes:
    ``backward_reduce``: 1 read of ``dy`` and 1 read of ``x`` (2 array passes).
    ``backward_apply``: 1 read of ``dy``, 1 read of ``x`` and 1 write of ``dx`` (3 array passes).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._config import (
    BLOCK_ELEMS,
    contiguous_view,
    nchw_plan,
    nchw_variant,
    nhwc_plan,
    nhwc_variant,
    njit_kernel,
    njit_parallel,
)

__all__ = [
    "backward_apply_nchw",
    "backward_apply_nhwc",
    "backward_reduce_nchw",
    "backward_reduce_nhwc",
]


@njit_parallel
def _reduce_rows(dy, x, mean, sum_dy_out, sum_dy_xmu_out):
    """Per-channel sums of ``dy`` and ``dy * (x - mean)`` for ``(N, C, S)`` arrays."""
    n_batch, n_chan, n_spatial = x.shape
    rows, groups, chunks = nchw_plan(n_batch, n_spatial)
    per_chan = groups * chunks
    n_items = n_chan * per_chan
    part_dy = np.empty(n_items, dtype=np.float64)
    part_dy_xmu = np.empty(n_items, dtype=np.float64)
    xr = x.reshape((n_batch * n_chan, n_spatial))
    dyr = dy.reshape((n_batch * n_chan, n_spatial))

    # Item i owns one slot of each partial array (i <-> slot is a bijection): no two iterations
    # write the same memory.
    for i in prange(n_items):
        # Items run in memory order (group of samples, then channel, then slice) so that each
        # thread streams through x; their results are stored channel-major for the merge.
        g = i // (n_chan * chunks)
        j = i - g * (n_chan * chunks)
        c = j // chunks
        k = j - c * chunks
        slot = c * per_chan + g * chunks + k
        n0 = g * rows
        n1 = min(n_batch, n0 + rows)
        s0 = k * n_spatial // chunks
        s1 = (k + 1) * n_spatial // chunks
        mu = mean[c]
        acc_dy = np.float64(0.0)
        acc_dy_xmu = np.float64(0.0)
        for n in range(n0, n1):
            # Sliced rows, loop from 0: vectorises (see the SPEEDTIP in moments._moments_rows).
            x_row = xr[n * n_chan + c, s0:s1]
            dy_row = dyr[n * n_chan + c, s0:s1]
            for s in range(x_row.shape[0]):
                g_val = np.float64(dy_row[s])
                acc_dy += g_val
                acc_dy_xmu += g_val * (x_row[s] - mu)
        part_dy[slot] = acc_dy
        part_dy_xmu[slot] = acc_dy_xmu

    # Channel c reads only its own slots, in block order: fixed order, thread-count independent.
    for c in prange(n_chan):
        base = c * per_chan
        total_dy = part_dy[base]
        total_dy_xmu = part_dy_xmu[base]
        for j in range(1, per_chan):
            total_dy += part_dy[base + j]
            total_dy_xmu += part_dy_xmu[base + j]
        sum_dy_out[c] = total_dy
        sum_dy_xmu_out[c] = total_dy_xmu


@njit_kernel
def cols_group_sums(dy, x, mean, r_start, r_stop, block_rows, g_dy, g_dy_xmu, b_dy, b_dy_xmu):
    """Add the per-channel sums of ``dy`` and ``dy * (x - mean)`` over rows ``r_start`` up to
    ``r_stop`` of ``(M, C)`` arrays to ``g_dy`` and ``g_dy_xmu`` (float64), block by block.

    The work of one group in :func:`_reduce_cols`, and the whole of it (one group holding every
    row) in the serial channels-last backward. ``b_dy``/``b_dy_xmu`` are ``(C,)`` scratch.
    """
    n_chan = x.shape[1]
    for r0 in range(r_start, r_stop, block_rows):
        r1 = min(r_stop, r0 + block_rows)
        for c in range(n_chan):
            b_dy[c] = 0.0
            b_dy_xmu[c] = 0.0
        # Inner loops along the contiguous channel axis: they vectorise. SPEEDTIP: two rows
        # per update of the per-channel sums, which otherwise bound the loop by storing them
        # back once per row (see moments.cols_group_moments).
        r = r0
        while r + 2 <= r1:
            x_a = x[r]
            x_b = x[r + 1]
            dy_a = dy[r]
            dy_b = dy[r + 1]
            for c in range(n_chan):
                g_a = np.float64(dy_a[c])
                g_b = np.float64(dy_b[c])
                mu = mean[c]
                b_dy[c] += g_a + g_b
                b_dy_xmu[c] += g_a * (x_a[c] - mu) + g_b * (x_b[c] - mu)
            r += 2
        if r < r1:
            x_row = x[r]
            dy_row = dy[r]
            for c in range(n_chan):
                g_val = np.float64(dy_row[c])
                b_dy[c] += g_val
                b_dy_xmu[c] += g_val * (x_row[c] - mean[c])
        # Block sums are added to the group's running sums: short sums, bounded rounding.
        for c in range(n_chan):
            g_dy[c] += b_dy[c]
            g_dy_xmu[c] += b_dy_xmu[c]


@njit_parallel
def _reduce_cols(dy, x, mean, sum_dy_out, sum_dy_xmu_out):
    """Per-channel sums of ``dy`` and ``dy * (x - mean)`` for ``(M, C)`` arrays."""
    n_rows, n_chan = x.shape
    block_rows, n_blocks, n_groups = nhwc_plan(n_rows, n_chan)
    group_dy = np.zeros((n_groups, n_chan), dtype=np.float64)
    group_dy_xmu = np.zeros((n_groups, n_chan), dtype=np.float64)
    block_dy = np.empty((n_groups, n_chan), dtype=np.float64)
    block_dy_xmu = np.empty((n_groups, n_chan), dtype=np.float64)

    # Group g owns row g of every scratch array: thread-private accumulators, no sharing.
    for g in prange(n_groups):
        r_start = (g * n_blocks // n_groups) * block_rows
        r_stop = min(n_rows, ((g + 1) * n_blocks // n_groups) * block_rows)
        cols_group_sums(
            dy, x, mean, r_start, r_stop, block_rows, group_dy[g], group_dy_xmu[g],
            block_dy[g], block_dy_xmu[g],
        )  # fmt: skip

    # Serial sum in group order: fixed, independent of the thread count.
    for c in range(n_chan):
        sum_dy_out[c] = group_dy[0, c]
        sum_dy_xmu_out[c] = group_dy_xmu[0, c]
    for g in range(1, n_groups):
        for c in range(n_chan):
            sum_dy_out[c] += group_dy[g, c]
            sum_dy_xmu_out[c] += group_dy_xmu[g, c]


@njit_parallel
def _apply_rows(dy, x, mean, k_dy, k_xmu, k_const, dx):
    """``dx = k_dy * dy + k_xmu * (x - mean) + k_const`` for ``(N, C, S)`` arrays."""
    n_batch, n_chan, n_spatial = x.shape
    chunks = (n_spatial + BLOCK_ELEMS - 1) // BLOCK_ELEMS
    xr = x.reshape((n_batch * n_chan, n_spatial))
    dyr = dy.reshape((n_batch * n_chan, n_spatial))
    dxr = dx.reshape((n_batch * n_chan, n_spatial))
    # Item i writes only dxr[r, s0:s1]: disjoint slices, race-free.
    for i in prange(n_batch * n_chan * chunks):
        r = i // chunks
        k = i - r * chunks
        c = r % n_chan
        s0 = k * n_spatial // chunks
        s1 = (k + 1) * n_spatial // chunks
        mu = mean[c]
        a = k_dy[c]
        b = k_xmu[c]
        z = k_const[c]
        # Sliced rows, loop from 0: vectorises (see the SPEEDTIP in moments._moments_rows).
        x_row = xr[r, s0:s1]
        dy_row = dyr[r, s0:s1]
        dx_row = dxr[r, s0:s1]
        for s in range(x_row.shape[0]):
            # x - mu before scaling, as in the forward pass: no cancellation of large terms.
            dx_row[s] = a * np.float64(dy_row[s]) + b * (x_row[s] - mu) + z


@njit_parallel
def _apply_cols(dy, x, mean, k_dy, k_xmu, k_const, dx):
    """``dx = k_dy * dy + k_xmu * (x - mean) + k_const`` for ``(M, C)`` arrays."""
    n_rows, n_chan = x.shape
    # Row r writes only dx[r]: race-free.
    for r in prange(n_rows):
        x_row = x[r]
        dy_row = dy[r]
        dx_row = dx[r]
        for c in range(n_chan):
            dx_row[c] = (
                k_dy[c] * np.float64(dy_row[c]) + k_xmu[c] * (x_row[c] - mean[c]) + k_const[c]
            )


def backward_reduce_nchw(dy, x, mean, sum_dy_out, sum_dy_xmu_out):
    r"""Per-channel :math:`\sum \delta` and :math:`\sum \delta\,(x - \mathrm{mean}_c)`.

    .. math::
        \mathrm{sum\_dy}_c = \sum_{n,s} \delta_{n,c,s}, \qquad
        \mathrm{sum\_dy\_xmu}_c = \sum_{n,s} \delta_{n,c,s}\,(x_{n,c,s} - \mathrm{mean}_c)

    Args:
        dy: C-contiguous float32 or float64 array of shape ``(N, C, S)``, the gradient
            :math:`\delta` with respect to the output.
        x: C-contiguous array of the shape of ``dy``, the forward input.
        mean: float64 array of shape ``(C,)``, the mean used in the forward pass.
        sum_dy_out: float64 array of shape ``(C,)``; overwritten with :math:`\sum\delta`.
        sum_dy_xmu_out: float64 array of shape ``(C,)``; overwritten with
            :math:`\sum\delta\,(x - \mathrm{mean})`.

    Returns:
        None. Accumulated in float64 whatever the input dtype.

    Raises:
        ValueError: If an array argument of the data's shape is not C-contiguous.
    """
    kernel, shape = nchw_variant(x.shape, _reduce_rows, _reduce_cols)
    kernel(contiguous_view(dy, shape), contiguous_view(x, shape), mean, sum_dy_out, sum_dy_xmu_out)


def backward_reduce_nhwc(dy, x, mean, sum_dy_out, sum_dy_xmu_out):
    r"""Channels-last twin of :func:`backward_reduce_nchw` for ``(M, C)`` arrays.

    Args:
        dy: C-contiguous float32 or float64 array of shape ``(M, C)``.
        x: C-contiguous array of the shape of ``dy``.
        mean: float64 array of shape ``(C,)``.
        sum_dy_out: float64 array of shape ``(C,)``; overwritten with :math:`\sum\delta`.
        sum_dy_xmu_out: float64 array of shape ``(C,)``; overwritten with
            :math:`\sum\delta\,(x - \mathrm{mean})`.

    Returns:
        None. Accumulated in float64 whatever the input dtype.

    Raises:
        ValueError: If an array argument of the data's shape is not C-contiguous.
    """
    kernel, shape = nhwc_variant(x.shape, _reduce_rows, _reduce_cols)
    kernel(contiguous_view(dy, shape), contiguous_view(x, shape), mean, sum_dy_out, sum_dy_xmu_out)


def backward_apply_nchw(dy, x, mean, k_dy, k_xmu, k_const, dx):
    r"""Input gradient of batch norm from per-channel coefficients.

    .. math::
        dx_{n,c,s} = k^{dy}_c\,\delta_{n,c,s} + k^{xmu}_c\,(x_{n,c,s} - \mathrm{mean}_c)
            + k^{const}_c

    Args:
        dy: C-contiguous float32 or float64 array of shape ``(N, C, S)``.
        x: C-contiguous array of the shape of ``dy``, the forward input.
        mean: float64 array of shape ``(C,)``, the mean used in the forward pass.
        k_dy: float64 array of shape ``(C,)``; ``weight * invstd``.
        k_xmu: float64 array of shape ``(C,)``; ``-weight * invstd**3 * sum_dy_xmu / m`` in
            training, 0 in inference.
        k_const: float64 array of shape ``(C,)``; ``-weight * invstd * sum_dy / m`` in training,
            0 in inference.
        dx: C-contiguous array of the shape of ``dy``; overwritten. May alias ``dy``.

    Returns:
        None. The arithmetic is float64; ``dx`` receives the result rounded to its dtype.

    Raises:
        ValueError: If an array argument of the data's shape is not C-contiguous.
    """
    kernel, shape = nchw_variant(x.shape, _apply_rows, _apply_cols)
    kernel(
        contiguous_view(dy, shape),
        contiguous_view(x, shape),
        mean,
        k_dy,
        k_xmu,
        k_const,
        contiguous_view(dx, shape),
    )


def backward_apply_nhwc(dy, x, mean, k_dy, k_xmu, k_const, dx):
    r"""Channels-last twin of :func:`backward_apply_nchw` for ``(M, C)`` arrays.

    Args:
        dy: C-contiguous float32 or float64 array of shape ``(M, C)``.
        x: C-contiguous array of the shape of ``dy``.
        mean: float64 array of shape ``(C,)``.
        k_dy: float64 array of shape ``(C,)``.
        k_xmu: float64 array of shape ``(C,)``.
        k_const: float64 array of shape ``(C,)``.
        dx: C-contiguous array of the shape of ``dy``; overwritten. May alias ``dy``.

    Returns:
        None. The arithmetic is float64; ``dx`` receives the result rounded to its dtype.

    Raises:
        ValueError: If an array argument of the data's shape is not C-contiguous.
    """
    kernel, shape = nhwc_variant(x.shape, _apply_rows, _apply_cols)
    kernel(
        contiguous_view(dy, shape),
        contiguous_view(x, shape),
        mean,
        k_dy,
        k_xmu,
        k_const,
        contiguous_view(dx, shape),
    )
