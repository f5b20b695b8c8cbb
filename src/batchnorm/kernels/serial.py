r"""Serial, fused kernels for small inputs: one call does a whole forward or backward pass.

Below a few tens of thousands of values, starting threads and calling several kernels costs more
than the arithmetic (a parallel region alone is several microseconds, torch's whole BatchNorm1d
on (60, 100) about 30). These kernels do everything one pass needs in one serial call: the
training forward computes the statistics, normalizes and updates the running averages; the
backward computes both reductions and applies them. The data of such an input fits in L1/L2,
so the repeated passes below cost cache reads, not DRAM traffic.

Parallel decomposition:
    None: one thread. The torch layer routes an input here only below a size threshold
    (``RoutingPolicy.serial_max_elements``, :mod:`batchnorm.routing`) measured by the size
    sweep in ``benchmarks/``.

Numerics:
    Accumulation and arithmetic are float64 for float32 and float64 input; outputs are rounded
    to their dtype once, at the store. A large mean cannot cancel a small variance: the
    kernels use the parallel kernels' shifted one-pass blocks with their exact second look
    (:func:`.moments.rows_channel_moments`, :func:`.moments.cols_group_moments`), in the same
    merge order, so serial and parallel statistics are bit-identical.

Race freedom and determinism:
    Serial; the result depends only on the input.

Memory passes:
    Training forward 2 reads of ``x`` (the shifted sums, normalize; a block with too much
    cancellation is read once more, from cache) and 1 write of ``y``;
    evaluation 1 read, 1 write; backward 2 reads of ``dy`` and ``x`` each and 1 write of ``dx``.
    All but the first read of each array hit the cache at the sizes these kernels serve.

Optional arguments are zero-length arrays: ``weight``/``bias`` of length 0 mean 1 and 0;
``running_mean``/``running_var`` of length 0 mean "no running statistics to update".
"""

from __future__ import annotations

import math

import numpy as np

from ._config import nhwc_plan, njit_kernel
from .backward import cols_group_sums
from .moments import channel_pivots, cols_group_moments, rows_channel_moments

__all__ = [
    "backward_serial_nchw",
    "backward_serial_nhwc",
    "eval_serial_nchw",
    "eval_serial_nhwc",
    "train_serial_nchw",
    "train_serial_nhwc",
    "update_running",
]


@njit_kernel
def update_running(running_mean, running_var, mean, var, count, factor, limit):
    r"""torch's running-average update, in place, unless the batch's statistics are not finite.

    .. math::
        \hat{\mu} \leftarrow (1 - \alpha)\hat{\mu} + \alpha\mu_B, \qquad
        \hat{\sigma}^2 \leftarrow (1 - \alpha)\hat{\sigma}^2 + \alpha\,\tfrac{m}{m-1}\sigma_B^2

    A batch whose mean or unbiased variance is NaN, infinite, or beyond ``limit`` (so that it
    would become infinite when stored) in any channel is left out entirely: nothing is written
    and ``False`` is returned. One NaN folded into a running average would stay there forever.
    With :math:`\alpha = 1` the batch's statistics replace the running ones, whatever those
    held (the population pass sets statistics this way).

    Args:
        running_mean: ``(C,)`` array, updated in place (nothing happens if it has length 0).
        running_var: ``(C,)`` array, updated in place with the *unbiased* batch variance.
        mean: Batch means, ``(C,)``.
        var: Biased batch variances, ``(C,)``.
        count: Values per channel ``m`` (> 1).
        factor: :math:`\alpha`, torch's ``momentum`` (or ``1 / num_batches_tracked``).
        limit: The largest finite value of the running buffers' dtype.

    Returns:
        ``True`` if the buffers were updated (always, when they have length 0).
    """
    bessel = count / (count - 1.0)
    for c in range(running_mean.shape[0]):
        # Written so that NaN fails the comparison.
        if not (abs(mean[c]) <= limit and bessel * var[c] <= limit):
            return False
    keep = 1.0 - factor
    if keep == 0.0:
        # A batch of weight 1 replaces the running values: the old ones take no part, so a
        # non-finite value there is not carried on as 0 * Inf = NaN (torch keeps it).
        for c in range(running_mean.shape[0]):
            running_mean[c] = factor * mean[c]
            running_var[c] = factor * bessel * var[c]
        return True
    for c in range(running_mean.shape[0]):
        running_mean[c] = keep * running_mean[c] + factor * mean[c]
        running_var[c] = keep * running_var[c] + factor * bessel * var[c]
    return True


@njit_kernel
def _affine(c, invstd, weight, bias):
    # Explicit float64: under NUMBA_DISABLE_JIT, float * float32 would round to float32.
    scale = invstd * np.float64(weight[c]) if weight.shape[0] > 0 else invstd
    shift = np.float64(bias[c]) if bias.shape[0] > 0 else np.float64(0.0)
    return scale, shift


@njit_kernel
def train_serial_nchw(
    x, weight, bias, eps, y, mean_out, var_out, running_mean, running_var, factor, limit
):
    """Training forward of an ``(N, C, S)`` array: statistics, normalize, running update.

    Args:
        x: C-contiguous ``(N, C, S)`` float32/float64 data, ``N * S >= 2``.
        weight: ``(C,)`` scale or length 0.
        bias: ``(C,)`` shift or length 0.
        eps: Added to the variance.
        y: Output, shape and dtype of ``x``; overwritten.
        mean_out: float64 ``(C,)``; receives the batch means.
        var_out: float64 ``(C,)``; receives the biased batch variances.
        running_mean: ``(C,)`` or length 0; updated in place with ``factor``.
        running_var: ``(C,)`` or length 0; updated in place (unbiased variance).
        factor: Weight of this batch in the running averages.
        limit: Largest finite value of the running buffers' dtype (see :func:`update_running`).

    Returns:
        ``False`` if running statistics were given but left unchanged because the batch's
        statistics are not finite; ``True`` otherwise.
    """
    n_batch, n_chan, n_spatial = x.shape
    count = n_batch * n_spatial
    for c in range(n_chan):
        # The parallel kernel's blocks and merge order, serially: the same bits either way.
        mu, dev = rows_channel_moments(x, c)
        var = dev / count
        scale, shift = _affine(c, 1.0 / math.sqrt(var + eps), weight, bias)
        for n in range(n_batch):
            row = x[n, c]
            out = y[n, c]
            for s in range(n_spatial):
                out[s] = (row[s] - mu) * scale + shift
        mean_out[c] = mu
        var_out[c] = var
    return update_running(running_mean, running_var, mean_out, var_out, count, factor, limit)


@njit_kernel
def train_serial_nhwc(
    x, weight, bias, eps, y, mean_out, var_out, running_mean, running_var, factor, limit
):
    """Training forward of a channels-last ``(M, C)`` array; arguments as for the nchw twin."""
    n_rows, n_chan = x.shape
    # The statistics as in the parallel kernel (moments.cols_group_moments: one read, four rows
    # per update of the per-channel sums), with every block in one group. Measured against
    # the sum and squared-deviation passes of one row per update it replaced (float32, one
    # process, interleaved): (60, 100) 5.2 -> 4.4 us, (256, 256) 36.9 -> 27.2, (1024, 256)
    # 139 -> 109, (2048, 64) 72 -> 59.
    block_rows, n_blocks, _ = nhwc_plan(n_rows, n_chan)
    pivot = channel_pivots(x[0])
    m2 = np.empty(n_chan)
    scratch = np.empty((3, n_chan))
    cols_group_moments(x, 0, n_blocks, block_rows, pivot, mean_out, m2, scratch)
    scale = np.empty(n_chan)
    shift = np.empty(n_chan)
    for c in range(n_chan):
        mean_out[c] = pivot[c] + mean_out[c]
        var_out[c] = m2[c] / n_rows
        scale[c], shift[c] = _affine(c, 1.0 / math.sqrt(var_out[c] + eps), weight, bias)
    for i in range(n_rows):
        for c in range(n_chan):
            y[i, c] = (x[i, c] - mean_out[c]) * scale[c] + shift[c]
    return update_running(running_mean, running_var, mean_out, var_out, n_rows, factor, limit)


@njit_kernel
def eval_serial_nchw(x, running_mean, running_var, weight, bias, eps, y):
    """Inference forward of an ``(N, C, S)`` array with the given population statistics."""
    n_batch, n_chan, n_spatial = x.shape
    for c in range(n_chan):
        mu = np.float64(running_mean[c])
        scale, shift = _affine(c, 1.0 / math.sqrt(running_var[c] + eps), weight, bias)
        for n in range(n_batch):
            row = x[n, c]
            out = y[n, c]
            for s in range(n_spatial):
                out[s] = (row[s] - mu) * scale + shift


@njit_kernel
def eval_serial_nhwc(x, running_mean, running_var, weight, bias, eps, y):
    """Inference forward of a channels-last ``(M, C)`` array."""
    n_rows, n_chan = x.shape
    mu = running_mean.astype(np.float64)
    scale = mu.copy()
    shift = mu.copy()
    for c in range(n_chan):
        scale[c], shift[c] = _affine(c, 1.0 / math.sqrt(running_var[c] + eps), weight, bias)
    for i in range(n_rows):
        for c in range(n_chan):
            y[i, c] = (x[i, c] - mu[c]) * scale[c] + shift[c]


@njit_kernel
def _backward_coefficients(c, sum_dy, sum_dy_xmu, invstd, weight, count, training):
    r"""``dx = k_dy * dy + k_xmu * (x - mean) + k_const`` (see ``reference``'s backward)."""
    w = np.float64(weight[c]) if weight.shape[0] > 0 else np.float64(1.0)
    k_dy = w * invstd
    if training:
        return k_dy, -k_dy * invstd * invstd * sum_dy_xmu / count, -k_dy * sum_dy / count
    return k_dy, 0.0, 0.0


@njit_kernel
def backward_serial_nchw(dy, x, mean, var, weight, eps, training, dx, dweight_out, dbias_out):
    r"""Gradients of either forward for an ``(N, C, S)`` array.

    With :math:`S_1 = \sum\delta` and :math:`S_2 = \sum\delta(x - \mu)`:
    :math:`d\beta = S_1`, :math:`d\gamma = \sigma^{-1}S_2`, and ``dx`` as in
    ``functional._backward`` (training) or :math:`\gamma\sigma^{-1}\delta` (evaluation).

    Args:
        dy: Gradient of the output, C-contiguous, shape of ``x``.
        x: The forward input.
        mean: ``(C,)`` means the forward subtracted (batch or running).
        var: ``(C,)`` variances it divided by (biased batch variance, or running variance).
        weight: ``(C,)`` or length 0.
        eps: The forward's epsilon.
        training: Whether the statistics came from this batch (they then depend on ``x``).
        dx: Output, shape and dtype of ``x``; overwritten.
        dweight_out: ``(C,)`` float32 or float64 (normally ``x``'s dtype); receives
            :math:`d\gamma`, accumulated in float64 and rounded once at the store.
        dbias_out: ``(C,)``, like ``dweight_out``; receives :math:`d\beta`.
    """
    n_batch, n_chan, n_spatial = x.shape
    count = n_batch * n_spatial
    for c in range(n_chan):
        mu = np.float64(mean[c])
        sum_dy = np.float64(0.0)
        sum_dy_xmu = np.float64(0.0)
        for n in range(n_batch):
            g = dy[n, c]
            row = x[n, c]
            for s in range(n_spatial):
                sum_dy += g[s]
                sum_dy_xmu += g[s] * (row[s] - mu)
        invstd = 1.0 / math.sqrt(var[c] + eps)
        k_dy, k_xmu, k_const = _backward_coefficients(
            c, sum_dy, sum_dy_xmu, invstd, weight, count, training
        )
        for n in range(n_batch):
            g = dy[n, c]
            row = x[n, c]
            out = dx[n, c]
            for s in range(n_spatial):
                out[s] = k_dy * g[s] + k_xmu * (row[s] - mu) + k_const
        dweight_out[c] = sum_dy_xmu * invstd
        dbias_out[c] = sum_dy


@njit_kernel
def backward_serial_nhwc(dy, x, mean, var, weight, eps, training, dx, dweight_out, dbias_out):
    """Gradients of either forward for a channels-last ``(M, C)`` array."""
    n_rows, n_chan = x.shape
    mu = mean.astype(np.float64)
    # float64 accumulators: the outputs may be float32 (the layer passes x's dtype). The sums
    # as in the parallel kernel (backward.cols_group_sums, two rows per update of them), every
    # row in one group; the apply pass dominates, so this gains little: (256, 256) float32
    # 41.9 -> 38.4 us, (1024, 256) and (60, 100) unchanged.
    block_rows = nhwc_plan(n_rows, n_chan)[0]
    sum_dy = np.zeros(n_chan)
    sum_dy_xmu = np.zeros(n_chan)
    scratch = np.empty((2, n_chan))
    cols_group_sums(dy, x, mu, 0, n_rows, block_rows, sum_dy, sum_dy_xmu, scratch[0], scratch[1])
    k_dy = mu.copy()
    k_xmu = mu.copy()
    k_const = mu.copy()
    for c in range(n_chan):
        invstd = 1.0 / math.sqrt(var[c] + eps)
        k_dy[c], k_xmu[c], k_const[c] = _backward_coefficients(
            c, sum_dy[c], sum_dy_xmu[c], invstd, weight, n_rows, training
        )
        dweight_out[c] = sum_dy_xmu[c] * invstd
        dbias_out[c] = sum_dy[c]
    for i in range(n_rows):
        for c in range(n_chan):
            dx[i, c] = k_dy[c] * dy[i, c] + k_xmu[c] * (x[i, c] - mu[c]) + k_const[c]
