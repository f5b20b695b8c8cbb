"""The one compilation and work-decomposition policy shared by every Numba kernel.

Decorators:
    ``njit_kernel`` compiles a serial helper, ``njit_parallel`` a kernel whose outer loop is a
    ``prange``. Both cache the machine code on disk (``cache=True``) and compile lazily on the
    first call: no signatures are given, so importing :mod:`batchnorm.kernels` compiles nothing.
    ``nogil=True`` lets a caller run kernels from several Python threads.

Floating point:
    ``FASTMATH`` allows reassociation (so that ``s += x[i]`` becomes a vectorised tree of partial
    sums) and contraction (fused multiply-add). It deliberately leaves out ``nnan``/``ninf``
    (and so is never ``fastmath=True``): batch norm must propagate NaN and Inf exactly as torch
    does, and with those flags LLVM may fold ``x - x`` to 0 or drop NaN checks.
    Measured effect (this machine, (64, 64, 3136) float32 with 8 channels of mean 1e4 and std
    1e-2, moments against ``reference.batch_norm_train`` on the same values): max relative error
    of the mean 5.9e-16 and of the variance 2.2e-15 with ``FASTMATH``, 5.9e-16 and 1.2e-14
    without; single-threaded ``moments_nchw`` 7.4 ms with it and 19.4 ms without (the
    channels-last kernels, whose inner loops run across channels, vectorise either way:
    10.0 vs 10.3 ms). So reassociation stays on.

Decomposition:
    Reductions work on *blocks* of at most about ``BLOCK_ELEMS`` values of one channel, small
    enough to stay in the 48 KiB L1 cache of this machine, so a block can be read twice (mean,
    then squared deviations about that mean) while DRAM sees it once. The block plan depends only
    on the array shape, never on the number of threads, and partial results are merged in a fixed
    order: every kernel is bit-for-bit deterministic for a given shape, whatever the thread count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

import numba

__all__ = [
    "BLOCK_ELEMS",
    "FASTMATH",
    "MAX_GROUPS",
    "MIN_BLOCK_ROWS",
    "contiguous_view",
    "nchw_variant",
    "nhwc_variant",
    "njit_kernel",
    "njit_parallel",
    "nchw_plan",
    "nhwc_plan",
]

FASTMATH = {"reassoc", "contract"}

_F = TypeVar("_F", bound=Callable[..., Any])


# Typed as returning the function itself: the Numba dispatcher is called with the function's
# own arguments, which numba's own hints (``njit`` -> ``_JITWrapper``) do not express.
@overload
def njit_kernel(fn: _F, /) -> _F: ...
@overload
def njit_kernel(fn: None = None, /, **options: Any) -> Callable[[_F], _F]: ...
def njit_kernel(fn: Any = None, /, **options: Any) -> Any:
    """``numba.njit`` with the package's policy; ``@njit_kernel`` or ``@njit_kernel(**options)``."""
    return numba.njit(fn, cache=True, nogil=True, fastmath=FASTMATH, **options)


@overload
def njit_parallel(fn: _F, /) -> _F: ...
@overload
def njit_parallel(fn: None = None, /, **options: Any) -> Callable[[_F], _F]: ...
def njit_parallel(fn: Any = None, /, **options: Any) -> Any:
    """:func:`njit_kernel` with ``parallel=True``, for kernels whose outer loop is a ``prange``."""
    return numba.njit(fn, cache=True, nogil=True, fastmath=FASTMATH, parallel=True, **options)


# NOTE: a parallel kernel is only ever called from Python, never from another jitted function.
# A cached serial function that calls a parallel one segfaults when it is loaded from the
# cache in a fresh process (numba issue #8578, open in 0.68; reproduced here), so the public
# kernels are thin Python functions that pick a layout variant and call it directly.
# NOTE: several processes compiling the same parallel kernel at once can leave mismatched
# cache files behind (numba issue #10128); compile once (`warmup()`) before fanning out.

# 4096 values: 16 KiB of float32 or 32 KiB of float64, inside the 48 KiB L1d of this CPU.
BLOCK_ELEMS = 4096
# A channels-last block holds at least this many rows even when C is large, so that merging a
# block into the running statistics (~10 flops per channel) stays cheap next to reading it.
# Measured (moments, float32, 2 threads): (4096, 256) 0.195 ms with 64-row blocks, 0.16 ms with
# 256; (200704, 64) 1.9 vs 1.7 ms; 1024 rows gained nothing more. 256 rows of up to ~2000
# channels stay inside this CPU's 2 MiB L2 for the rare second look (moments._one_pass_m2).
MIN_BLOCK_ROWS = 256
# Channels-last reductions split the row blocks into at most this many contiguous groups, each
# with its own per-channel partials. A fixed number (not the thread count) keeps results
# independent of the thread count; 32 groups still balance well over 2, 4, 8 or 16 threads.
MAX_GROUPS = 32


@njit_kernel
def nchw_plan(n, s):
    """Split the ``n * s`` values of one channel of an ``(N, C, S)`` array into blocks.

    A block is ``rows`` consecutive samples times one of ``chunks`` equal slices of the ``S``
    axis. Long rows (``S >= BLOCK_ELEMS``) are cut into slices; short rows are grouped.

    Args:
        n: Batch size ``N``.
        s: Spatial size ``S``.

    Returns:
        ``(rows, groups, chunks)``: samples per block, blocks along ``N``
        (``ceil(N / rows)``), and slices per row. A channel has ``groups * chunks`` blocks.
    """
    if s >= BLOCK_ELEMS:
        chunks = (s + BLOCK_ELEMS - 1) // BLOCK_ELEMS
        rows = 1
    else:
        chunks = 1
        rows = min(n, max(1, BLOCK_ELEMS // s))
    groups = (n + rows - 1) // rows
    return rows, groups, chunks


@njit_kernel
def nhwc_plan(m, c):
    """Split the ``m`` rows of an ``(M, C)`` channels-last array into blocks and groups.

    Args:
        m: Number of rows ``M``.
        c: Number of channels ``C``.

    Returns:
        ``(block_rows, nblocks, ngroups)``: rows per block, number of blocks, and number of
        contiguous groups of blocks (each group is one parallel work item with its own partials).
    """
    block_rows = min(m, max(MIN_BLOCK_ROWS, BLOCK_ELEMS // c))
    nblocks = (m + block_rows - 1) // block_rows
    ngroups = min(nblocks, MAX_GROUPS)
    return block_rows, nblocks, ngroups


def contiguous_view(array, shape):
    """``array`` reshaped to ``shape`` without copying; the kernels' C-contiguity contract.

    A reshape of a non-contiguous array would silently copy, and a kernel writing into that copy
    would leave the caller's output untouched, so anything but a C-contiguous array is refused.

    Args:
        array: A NumPy array.
        shape: The new shape (same number of elements).

    Returns:
        A view of ``array``.

    Raises:
        ValueError: If ``array`` is not C-contiguous.
    """
    if not array.flags.c_contiguous:
        raise ValueError(
            f"batchnorm.kernels: expected C-contiguous arrays, got shape {array.shape} with "
            f"strides {array.strides}."
        )
    return array.reshape(shape)


def nchw_variant(shape, rows_kernel, cols_kernel):
    """The compiled variant for an ``(N, C, S)`` array, and the shape to view the arrays as.

    ``S == 1`` data with several channels is the same memory as an ``(N, C)`` channels-last
    array, whose variant runs its inner loop along the contiguous channel axis.

    Returns:
        ``(kernel, view_shape)``: ``cols_kernel`` and ``(N, C)``, or ``rows_kernel`` and the
        shape itself.
    """
    n_batch, n_chan, n_spatial = shape
    if n_spatial == 1 and n_chan > 1:
        return cols_kernel, (n_batch, n_chan)
    return rows_kernel, tuple(shape)


def nhwc_variant(shape, rows_kernel, cols_kernel):
    """The compiled variant for a channels-last ``(M, C)`` array, and the shape to view it as.

    ``C == 1`` data is the same memory as one ``(1, 1, M)`` row, whose variant runs along it.

    Returns:
        ``(kernel, view_shape)``: ``rows_kernel`` and ``(1, 1, M)``, or ``cols_kernel`` and the
        shape itself.
    """
    n_rows, n_chan = shape
    if n_chan == 1:
        return rows_kernel, (1, 1, n_rows)
    return cols_kernel, tuple(shape)
