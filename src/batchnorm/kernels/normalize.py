r"""The per-channel affine map of batch norm, for training and inference alike.

.. math::
    y_{i,c} = (x_{i,c} - \mathrm{mean}_c)\,\mathrm{scale}_c + \mathrm{shift}_c

Training passes the batch mean, ``scale = weight * invstd`` and ``shift = bias``; inference passes
the running mean, ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias``.

Parallel decomposition:
    * ``nchw`` (``(N, C, S)``): the ``prange`` runs over the ``N * C`` contiguous rows, each row
      cut into ``ceil(S / BLOCK_ELEMS)`` slices, so a single huge channel (``N = C = 1``) is
      still split across the cores.
    * ``nhwc`` (``(M, C)``): the ``prange`` runs over the ``M`` rows; the inner loop runs along
      the contiguous channel axis and vectorises.

    As in :mod:`.moments`, the public kernels are plain Python functions that hand ``C == 1``
    channels-last data and ``S == 1`` ``nchw`` data to the compiled twin whose inner loop is the
    long contiguous one.

Numerics:
    Arithmetic is float64 for float32 and float64 input; the result is rounded to ``y``'s dtype
    once, at the store.

Race freedom and determinism:
    Each iteration writes a disjoint range of ``y`` and reads only ``x`` and the per-channel
    vectors; there is no reduction, so the output is the same for any thread count.

Memory passes:
    1 read of ``x`` and 1 write of ``y``. Roofline: ``x.nbytes + y.nbytes`` bytes moved.
"""

from __future__ import annotations

from numba import prange

from ._config import BLOCK_ELEMS, contiguous_view, nchw_variant, nhwc_variant, njit_parallel

__all__ = ["normalize_nchw", "normalize_nhwc"]


@njit_parallel
def _normalize_rows(x, mean, scale, shift, y):
    """Normalise an ``(N, C, S)`` array row slice by row slice."""
    n_batch, n_chan, n_spatial = x.shape
    chunks = (n_spatial + BLOCK_ELEMS - 1) // BLOCK_ELEMS
    xr = x.reshape((n_batch * n_chan, n_spatial))
    yr = y.reshape((n_batch * n_chan, n_spatial))
    # Item i writes only yr[r, s0:s1]: disjoint slices, race-free.
    for i in prange(n_batch * n_chan * chunks):
        r = i // chunks
        k = i - r * chunks
        c = r % n_chan
        s0 = k * n_spatial // chunks
        s1 = (k + 1) * n_spatial // chunks
        mu = mean[c]
        a = scale[c]
        b = shift[c]
        # Sliced rows, loop from 0: vectorises (see the SPEEDTIP in moments._moments_rows).
        x_row = xr[r, s0:s1]
        y_row = yr[r, s0:s1]
        for s in range(x_row.shape[0]):
            # Centre first, then scale. For a channel with mean 1e4 and std 1e-2 the folded form
            # x * a + b (a = 1e2, b = -1e6) cancels two ~1e6 terms: in float32 that leaves an
            # error of ~0.06 on an O(1) output, and even in float64 ~1e-10. Here x - mu is exact
            # (Sterbenz: x within a factor 2 of mu) and small, so only the final rounding to
            # y's dtype remains.
            y_row[s] = (x_row[s] - mu) * a + b


@njit_parallel
def _normalize_cols(x, mean, scale, shift, y):
    """Normalise an ``(M, C)`` channels-last array row by row."""
    n_rows, n_chan = x.shape
    # Row r writes only y[r]: race-free.
    for r in prange(n_rows):
        x_row = x[r]
        y_row = y[r]
        for c in range(n_chan):
            # Centre before scaling (see _normalize_rows for why this order keeps accuracy).
            y_row[c] = (x_row[c] - mean[c]) * scale[c] + shift[c]


def normalize_nchw(x, mean, scale, shift, y):
    r"""Normalise an ``(N, C, S)`` array with per-channel mean, scale and shift.

    .. math::
        y_{n,c,s} = (x_{n,c,s} - \mathrm{mean}_c)\,\mathrm{scale}_c + \mathrm{shift}_c

    Args:
        x: C-contiguous float32 or float64 array of shape ``(N, C, S)``.
        mean: float64 array of shape ``(C,)``, subtracted first.
        scale: float64 array of shape ``(C,)``, e.g. ``weight * invstd``.
        shift: float64 array of shape ``(C,)``, e.g. ``bias``.
        y: C-contiguous array of the shape of ``x`` (normally its dtype too); overwritten.
            May be ``x`` itself (in-place).

    Returns:
        None. The arithmetic is float64; ``y`` receives the result rounded to its dtype.

    Raises:
        ValueError: If an array argument of the data's shape is not C-contiguous.
    """
    kernel, shape = nchw_variant(x.shape, _normalize_rows, _normalize_cols)
    kernel(contiguous_view(x, shape), mean, scale, shift, contiguous_view(y, shape))


def normalize_nhwc(x, mean, scale, shift, y):
    r"""Normalise a channels-last ``(M, C)`` array with per-channel mean, scale and shift.

    .. math::
        y_{i,c} = (x_{i,c} - \mathrm{mean}_c)\,\mathrm{scale}_c + \mathrm{shift}_c

    Args:
        x: C-contiguous float32 or float64 channels-last array of shape ``(M, C)``.
        mean: float64 array of shape ``(C,)``, subtracted first.
        scale: float64 array of shape ``(C,)``.
        shift: float64 array of shape ``(C,)``.
        y: C-contiguous array of the shape of ``x``; overwritten. May be ``x`` itself.

    Returns:
        None. The arithmetic is float64; ``y`` receives the result rounded to its dtype.

    Raises:
        ValueError: If an array argument of the data's shape is not C-contiguous.
    """
    kernel, shape = nhwc_variant(x.shape, _normalize_rows, _normalize_cols)
    kernel(contiguous_view(x, shape), mean, scale, shift, contiguous_view(y, shape))
