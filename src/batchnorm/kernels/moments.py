r"""Per-channel mean and M2 (sum of squared deviations) in one pass over memory.

.. math::
    \mu_c = \frac{1}{m}\sum_{i} x_{i,c}, \qquad
    M2_c = \sum_{i} (x_{i,c} - \mu_c)^2, \qquad
    \sigma_c^2 = M2_c / m \ \text{(biased)}, \qquad m = N \cdot S

Parallel decomposition:
    The values of each channel are cut into blocks of at most ``BLOCK_ELEMS`` values (see
    :mod:`._config`); the block plan depends only on the shape.

    * ``nchw`` (``x`` of shape ``(N, C, S)``): one work item is one block of one channel, i.e.
      ``rows`` consecutive samples times one slice of the contiguous ``S`` axis. The ``prange``
      runs over all ``C * groups * chunks`` items, so even ``C = 1`` or ``N = 1`` keeps every
      core busy once the channel has a few blocks. Each item writes its own ``(count, mean, M2)``
      slot; a second ``prange`` over channels merges a channel's slots in block order.
    * ``nhwc`` (``x`` of shape ``(M, C)``): blocks of ``block_rows`` rows (all channels), grouped
      into at most ``MAX_GROUPS`` contiguous groups. The ``prange`` runs over groups; each group
      keeps private per-channel ``(mean, M2)`` rows, merged serially in group order at the end.

    ``C == 1`` channels-last data is the same memory as one ``nchw`` row and ``S == 1`` ``nchw``
    data the same memory as an ``(N, C)`` channels-last array; each public kernel (a plain Python
    function, see the NOTE in :mod:`._config`) hands those cases to the faster compiled twin.

Numerics:
    Accumulation and all arithmetic are float64, for float32 and float64 input alike. Each
    channel has a pivot, one of its own values (``x[0, c, 0]`` / ``x[0, c]``; 0 if that is not
    finite), and every block mean is kept relative to it: a number of the size of the spread
    rather than of the mean. Within a block the values are shifted by the block's own first
    value ``p_b`` and read once for :math:`\sum d` and :math:`\sum d^2` (``d = x - p_b``);
    :math:`M2_b = \sum d^2 - \bar{d}\sum d` is kept while that subtraction cancels fewer than
    6 bits (relative error <= ~1.4e-14, see ``_one_pass_m2``), which holds whenever the block
    mean lies within ~7.9 block SDs of ``p_b``. Otherwise the block, still in cache, is summed
    again about its own mean (two-pass, so a large mean cannot cancel a small variance).
    Blocks are merged with Chan et al.'s update (Chan, Golub & LeVeque 1979; :func:`chan_merge`,
    the one merge of the package), and the pivot is added back once at the end. Without the
    pivot, the merge would see block means near 1e4 rounded to ~1e-12 and differing by ~1e-4,
    and that rounding, squared into
    :math:`\delta^2 n_a n_b / n`, cost ~1e-12 of relative variance; with it, a channel of mean
    1e4 and standard deviation 1e-2 matches an extended-precision two-pass to ~1e-16 (measured
    on (64, 8, 3136) float32). NaN and Inf propagate: a NaN anywhere in a channel makes that
    channel's mean and M2 NaN, an Inf makes its mean +-Inf and its M2 NaN (as the reference and
    torch do), and no other channel is touched.
    Measured speed of the one-read block (2 threads, float32, interleaved): (64, 64, 3136)
    1.8 -> 1.15 ms, about one read of ``x`` at the machine's bandwidth; the two-pass blocks were
    bound by arithmetic (two float64 passes with conversions), not by memory.

Race freedom and determinism:
    Every work item writes only its own partial slot (``nchw``) or its own group's partial rows
    (``nhwc``); no memory is written by two iterations and there is no shared accumulator. The
    merges run in a fixed order, so the result is bit-identical for a given shape whatever the
    thread count.

Memory passes:
    1 read of ``x`` from DRAM (a block that needs a second look, for M2, is still in cache); the
    outputs and partials are O(C * blocks), negligible. Roofline: ``x.nbytes`` bytes moved.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ._config import (
    contiguous_view,
    nchw_plan,
    nchw_variant,
    nhwc_plan,
    nhwc_variant,
    njit_kernel,
    njit_parallel,
)

__all__ = [
    "chan_merge",
    "merge_moments_into",
    "moments_nchw",
    "moments_nhwc",
    "moments_serial",
    "rows_block_moments",
    "rows_channel_moments",
]


@njit_kernel
def _pivot(value):
    """A shift for a channel or block: ``value`` as float64, or 0 if it is NaN or +-Inf.

    float64 also without the JIT (``NUMBA_DISABLE_JIT``), where a float32 pivot would make
    ``x - pivot`` float32 arithmetic.
    """
    if math.isfinite(value):
        return np.float64(value)
    return np.float64(0.0)


# The one-pass M2 of a block, sum(d^2) - sum(d) * mean(d) with d = x - (the block's first value),
# is kept only while that subtraction cancels fewer than 6 of float64's 53 bits: then its
# relative error is at most ~2 * 64 * 2**-53 = 1.4e-14. With sigma^2 = M2 / n this holds while
# the block mean lies within sqrt(63) ~ 7.9 block SDs of the first value, so ordinary data is
# read once; anything else (a far outlier as first value, a near-constant block with a large
# offset) gets the exact second pass.
_CANCELLATION = 1.0 / 64.0


@njit_kernel
def _one_pass_m2(total, total_sq, mean):
    r"""M2 of a block from its shifted sums, and whether it must be recomputed in two passes.

    .. math::
        M2 = \sum d^2 - \bar{d} \sum d, \qquad d = x - \text{pivot}

    Args:
        total: :math:`\sum d` over the block.
        total_sq: :math:`\sum d^2` over the block.
        mean: ``total / count``.

    Returns:
        ``(m2, redo)``: ``redo`` is True when cancellation would cost more than the bound
        above, or when ``total_sq`` overflowed while ``total`` did not. NaN or Inf data is never
        redone: its M2 is NaN either way.
    """
    m2 = total_sq - total * mean
    redo = m2 < total_sq * _CANCELLATION or (math.isinf(total_sq) and math.isfinite(total))
    return m2, redo


@njit_kernel
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    r"""Count, mean and M2 of the union of two disjoint parts (Chan, Golub & LeVeque 1979).

    .. math::
        n = n_a + n_b, \quad \delta = \bar{x}_b - \bar{x}_a, \quad
        \bar{x} = \bar{x}_a + \delta\,\tfrac{n_b}{n}, \quad
        M2 = M2_a + M2_b + \delta^2\,\tfrac{n_a n_b}{n}

    The one scalar merge of the package: the kernels' block merges and
    :func:`batchnorm.stats.merge_moments` both call it, so a merge gives the same bits
    wherever it happens.

    A part with count 0 is an exact identity (the other part is returned as it is, whatever
    mean and M2 the empty one carries, since ``0 * Inf`` would be NaN); two empty parts give
    ``(0, 0, 0)``. Where the update form of the mean is not finite, the weighted form
    :math:`\tfrac{n_a}{n}\bar{x}_a + \tfrac{n_b}{n}\bar{x}_b` is used: it keeps an infinite
    mean infinite when finite data joins it (``Inf + (x - Inf) * w`` is NaN).

    Args:
        n_a: Count of the first part (float64, >= 0).
        mean_a: Its mean.
        m2_a: Its sum of squared deviations from ``mean_a``.
        n_b: Count of the second part (float64, >= 0).
        mean_b: Its mean.
        m2_b: Its M2.

    Returns:
        ``(n, mean, m2)`` of the union, float64.
    """
    if n_b == 0.0:
        if n_a == 0.0:
            return np.float64(0.0), np.float64(0.0), np.float64(0.0)
        return np.float64(n_a), np.float64(mean_a), np.float64(m2_a)
    if n_a == 0.0:
        return np.float64(n_b), np.float64(mean_b), np.float64(m2_b)
    n = np.float64(n_a + n_b)
    w_a = n_a / n
    w_b = n_b / n
    delta = np.float64(mean_b - mean_a)
    m2 = m2_a + m2_b + delta * delta * (n_a * w_b)
    mean = mean_a + delta * w_b
    if not math.isfinite(mean):
        mean = w_a * mean_a + w_b * mean_b
    return n, np.float64(mean), np.float64(m2)


@njit_kernel
def merge_moments_into(n_a, mean_a, m2_a, n_b, mean_b, m2_b, n_out, mean_out, m2_out):
    """:func:`chan_merge` per channel: ``(n_out, mean_out, m2_out) = merge(a, b)``.

    Args:
        n_a, mean_a, m2_a: ``(C,)`` float64 counts, means and M2 of the first part.
        n_b, mean_b, m2_b: The same for the second part.
        n_out, mean_out, m2_out: ``(C,)`` float64 outputs; may be the arrays of ``a``.
    """
    for c in range(mean_a.shape[0]):
        n_out[c], mean_out[c], m2_out[c] = chan_merge(
            n_a[c], mean_a[c], m2_a[c], n_b[c], mean_b[c], m2_b[c]
        )


@njit_kernel
def _merge_rows_into(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge per-channel statistics ``b`` (one count for all channels) into ``a`` in place.

    Args:
        n_a: Count of ``a`` (float64).
        mean_a: Means of ``a`` (relative to the channel pivots), shape ``(C,)``; overwritten.
        m2_a: M2 of ``a``, shape ``(C,)``; overwritten with the merged M2.
        n_b: Count of ``b`` (float64).
        mean_b: Means of ``b`` (same pivots), shape ``(C,)``.
        m2_b: M2 of ``b``, shape ``(C,)``.

    Returns:
        The merged count ``n_a + n_b``.
    """
    for c in range(mean_a.shape[0]):
        _, mean_a[c], m2_a[c] = chan_merge(n_a, mean_a[c], m2_a[c], n_b, mean_b[c], m2_b[c])
    return n_a + n_b


@njit_kernel
def rows_block_moments(xr, n_chan, c, n0, n1, s0, s1, pivot):
    """Count, mean (relative to ``pivot``) and M2 of one block of channel ``c``.

    The block is samples ``n0..n1-1`` times the slice ``s0..s1-1`` of the spatial axis of an
    ``(N, C, S)`` array viewed as ``xr`` of shape ``(N * C, S)``. One read for the shifted
    sums; a second, from L1, only when :func:`_one_pass_m2` asks for it.

    Returns:
        ``(count, mean - pivot, m2)``, float64.
    """
    # Shift by the block's own first value: its sums then hold numbers of the size of the
    # block's spread, and (pb - pivot) is the block's offset from the channel's pivot.
    pb = _pivot(xr[n0 * n_chan + c, s0])
    total = np.float64(0.0)
    total_sq = np.float64(0.0)
    for n in range(n0, n1):
        # SPEEDTIP: slice first and loop from 0. With `range(s0, s1)` Numba cannot prove
        # the index non-negative, keeps its wraparound check and the loop does not
        # vectorise: 37 ms vs 16.5 ms single-threaded on (64, 64, 3136) float32.
        row = xr[n * n_chan + c, s0:s1]
        for s in range(row.shape[0]):
            d = row[s] - pb
            total += d
            total_sq += d * d
    count = np.float64((n1 - n0) * (s1 - s0))
    mu = total / count
    dev, redo = _one_pass_m2(total, total_sq, mu)
    if redo:
        # Too much cancellation (see _one_pass_m2): sum again, about the block's own mean.
        # The block is <= BLOCK_ELEMS values, so this read comes from L1, not DRAM.
        centre = pb + mu
        dev = np.float64(0.0)
        for n in range(n0, n1):
            row = xr[n * n_chan + c, s0:s1]
            for s in range(row.shape[0]):
                e = row[s] - centre
                dev += e * e
    return count, (pb - pivot) + mu, dev


@njit_kernel
def rows_channel_moments(x, c):
    """Mean and M2 of channel ``c`` of an ``(N, C, S)`` array, on one thread.

    The same blocks, in the same merge order, as :func:`_moments_rows`, so the serial fused
    kernels get the parallel kernel's bits.

    Returns:
        ``(mean, m2)``, float64.
    """
    n_batch, n_chan, n_spatial = x.shape
    rows, groups, chunks = nchw_plan(n_batch, n_spatial)
    xr = x.reshape((n_batch * n_chan, n_spatial))
    pivot = _pivot(xr[c, 0])
    n_a = np.float64(0.0)
    mean_a = np.float64(0.0)
    m2_a = np.float64(0.0)
    for g in range(groups):
        n0 = g * rows
        n1 = min(n_batch, n0 + rows)
        for k in range(chunks):
            s0 = k * n_spatial // chunks
            s1 = (k + 1) * n_spatial // chunks
            n_b, mean_b, m2_b = rows_block_moments(xr, n_chan, c, n0, n1, s0, s1, pivot)
            n_a, mean_a, m2_a = chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    return pivot + mean_a, m2_a


@njit_kernel
def moments_serial(x, mean_out, m2_out):
    """Per-channel mean and M2 of a C-contiguous ``(N, C, S)`` array, on the calling thread.

    The blocks of :func:`moments_nchw`'s rows variant, merged in the same order, without a
    thread pool (safe in a process made by fork; see :mod:`batchnorm.routing`).
    """
    for c in range(x.shape[1]):
        mean_out[c], m2_out[c] = rows_channel_moments(x, c)


@njit_parallel
def _moments_rows(x, mean_out, m2_out):
    """Moments of an ``(N, C, S)`` array; see the module docstring for the plan."""
    n_batch, n_chan, n_spatial = x.shape
    rows, groups, chunks = nchw_plan(n_batch, n_spatial)
    per_chan = groups * chunks
    n_items = n_chan * per_chan
    part_count = np.empty(n_items, dtype=np.float64)
    part_mean = np.empty(n_items, dtype=np.float64)
    part_m2 = np.empty(n_items, dtype=np.float64)
    xr = x.reshape((n_batch * n_chan, n_spatial))
    pivot = np.empty(n_chan, dtype=np.float64)
    for c in range(n_chan):
        pivot[c] = _pivot(xr[c, 0])

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
        count, mu, dev = rows_block_moments(xr, n_chan, c, n0, n1, s0, s1, pivot[c])
        part_count[slot] = count
        part_mean[slot] = mu
        part_m2[slot] = dev

    # Channel c reads only its own slots and writes only mean_out[c], m2_out[c]; the blocks are
    # merged in block order, so the result does not depend on how the items were scheduled.
    for c in prange(n_chan):
        base = c * per_chan
        n_a = part_count[base]
        mean_a = part_mean[base]
        m2_a = part_m2[base]
        for j in range(1, per_chan):
            n_a, mean_a, m2_a = chan_merge(
                n_a, mean_a, m2_a, part_count[base + j], part_mean[base + j], part_m2[base + j]
            )
        mean_out[c] = pivot[c] + mean_a
        m2_out[c] = m2_a


@njit_kernel
def cols_group_moments(x, b_start, b_stop, block_rows, pivot, g_mean, g_m2, scratch):
    """Mean and M2 of the row blocks ``b_start..b_stop-1`` of an ``(M, C)`` array, per channel.

    The work of one group in :func:`_moments_cols`, and the whole of it (one group holding
    every block) in the serial channels-last kernel.

    Args:
        x: ``(M, C)`` array.
        b_start, b_stop: The group's blocks (block ``b`` = rows ``b * block_rows`` up to
            ``min(M, (b + 1) * block_rows)``).
        block_rows: Rows per block.
        pivot: ``(C,)`` float64 channel pivots; the means are stored relative to them.
        g_mean: ``(C,)`` float64; receives the group's means minus ``pivot``.
        g_m2: ``(C,)`` float64; receives the group's M2.
        scratch: ``(3, C)`` float64 work space (block mean, block M2, block pivot).

    Returns:
        The group's row count (float64).
    """
    n_rows, n_chan = x.shape
    # Within a block these hold the shifted sums, then the block's mean and M2.
    b_mean = scratch[0]
    b_m2 = scratch[1]
    b_pivot = scratch[2]
    count = np.float64(0.0)
    for b in range(b_start, b_stop):
        r0 = b * block_rows
        r1 = min(n_rows, r0 + block_rows)
        nb = np.float64(r1 - r0)
        first = x[r0]
        for c in range(n_chan):
            b_pivot[c] = _pivot(first[c])
            b_mean[c] = 0.0
            b_m2[c] = 0.0
        # The inner loops run along the contiguous channel axis and vectorise. SPEEDTIP: four
        # rows per update of the per-channel sums, so the loop is not bound by storing them
        # back once per row: (200704, 64) float32, 2 threads, 2.3 -> 1.7 ms.
        r = r0
        while r + 4 <= r1:
            row_a = x[r]
            row_b = x[r + 1]
            row_c = x[r + 2]
            row_d = x[r + 3]
            for c in range(n_chan):
                p = b_pivot[c]
                d_a = row_a[c] - p
                d_b = row_b[c] - p
                d_c = row_c[c] - p
                d_d = row_d[c] - p
                b_mean[c] += (d_a + d_b) + (d_c + d_d)
                b_m2[c] += (d_a * d_a + d_b * d_b) + (d_c * d_c + d_d * d_d)
            r += 4
        while r < r1:
            row = x[r]
            for c in range(n_chan):
                d = row[c] - b_pivot[c]
                b_mean[c] += d
                b_m2[c] += d * d
            r += 1
        redo = False
        for c in range(n_chan):
            mu = b_mean[c] / nb
            m2, redo_c = _one_pass_m2(b_mean[c], b_m2[c], mu)
            redo = redo or redo_c
            b_mean[c] = mu
            b_m2[c] = m2
        if redo:
            # Too much cancellation in some channel (see _one_pass_m2): sum the block again
            # about its means. Blocks are <= max(MIN_BLOCK_ROWS * C, BLOCK_ELEMS) values,
            # normally still in the core's cache.
            for c in range(n_chan):
                b_m2[c] = 0.0
            for r in range(r0, r1):
                row = x[r]
                for c in range(n_chan):
                    e = (row[c] - b_pivot[c]) - b_mean[c]
                    b_m2[c] += e * e
        for c in range(n_chan):
            b_mean[c] = (b_pivot[c] - pivot[c]) + b_mean[c]
        # The first block merges into the empty summary, which chan_merge takes as the identity
        # whatever g_mean and g_m2 hold.
        count = _merge_rows_into(count, g_mean, g_m2, nb, b_mean, b_m2)
    return count


@njit_kernel
def channel_pivots(first_row):
    """float64 pivots of an ``(M, C)`` array's channels: its first row (0 where not finite)."""
    pivot = np.empty(first_row.shape[0], dtype=np.float64)
    for c in range(first_row.shape[0]):
        pivot[c] = _pivot(first_row[c])
    return pivot


@njit_parallel
def _moments_cols(x, mean_out, m2_out):
    """Moments of an ``(M, C)`` channels-last array; see the module docstring for the plan."""
    n_rows, n_chan = x.shape
    block_rows, n_blocks, n_groups = nhwc_plan(n_rows, n_chan)
    group_count = np.empty(n_groups, dtype=np.float64)
    group_mean = np.empty((n_groups, n_chan), dtype=np.float64)
    group_m2 = np.empty((n_groups, n_chan), dtype=np.float64)
    scratch = np.empty((n_groups, 3, n_chan), dtype=np.float64)
    pivot = channel_pivots(x[0])

    # Group g owns row g of every scratch array: thread-private accumulators, no sharing.
    for g in prange(n_groups):
        b_start = g * n_blocks // n_groups
        b_stop = (g + 1) * n_blocks // n_groups
        group_count[g] = cols_group_moments(
            x, b_start, b_stop, block_rows, pivot, group_mean[g], group_m2[g], scratch[g]
        )

    # Serial merge in group order: fixed, independent of the thread count.
    for c in range(n_chan):
        mean_out[c] = group_mean[0, c]
        m2_out[c] = group_m2[0, c]
    count = group_count[0]
    for g in range(1, n_groups):
        count = _merge_rows_into(
            count, mean_out, m2_out, group_count[g], group_mean[g], group_m2[g]
        )
    for c in range(n_chan):
        mean_out[c] = pivot[c] + mean_out[c]


def moments_nchw(x, mean_out, m2_out):
    r"""Per-channel mean and M2 of a contiguous ``(N, C, S)`` array.

    .. math::
        \mathrm{mean}_c = \frac{1}{m}\sum_{n,s} x_{n,c,s}, \qquad
        \mathrm{m2}_c = \sum_{n,s} (x_{n,c,s} - \mathrm{mean}_c)^2, \qquad m = N S

    The biased variance is ``m2 / m``, the unbiased one ``m2 / (m - 1)``.

    Args:
        x: C-contiguous float32 or float64 array of shape ``(N, C, S)`` with ``N * S >= 1``
            (``S`` is the product of the spatial dims, possibly 1).
        mean_out: float64 array of shape ``(C,)``; overwritten with the means.
        m2_out: float64 array of shape ``(C,)``; overwritten with the sums of squared deviations.

    Returns:
        None. Computed and accumulated in float64 whatever the dtype of ``x``.

    Raises:
        ValueError: If an array argument of the data's shape is not C-contiguous.
    """
    kernel, shape = nchw_variant(x.shape, _moments_rows, _moments_cols)
    kernel(contiguous_view(x, shape), mean_out, m2_out)


def moments_nhwc(x, mean_out, m2_out):
    r"""Per-channel mean and M2 of a contiguous channels-last ``(M, C)`` array.

    .. math::
        \mathrm{mean}_c = \frac{1}{M}\sum_{i} x_{i,c}, \qquad
        \mathrm{m2}_c = \sum_{i} (x_{i,c} - \mathrm{mean}_c)^2

    Args:
        x: C-contiguous float32 or float64 array of shape ``(M, C)``, ``M >= 1``; ``M = N * S``
            for a channels-last ``(N, C, *)`` tensor, or ``N`` for a plain ``(N, C)`` input.
        mean_out: float64 array of shape ``(C,)``; overwritten with the means.
        m2_out: float64 array of shape ``(C,)``; overwritten with the sums of squared deviations.

    Returns:
        None. Computed and accumulated in float64 whatever the dtype of ``x``.

    Raises:
        ValueError: If an array argument of the data's shape is not C-contiguous.
    """
    kernel, shape = nhwc_variant(x.shape, _moments_rows, _moments_cols)
    kernel(contiguous_view(x, shape), mean_out, m2_out)
