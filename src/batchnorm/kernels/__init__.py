"""Numba CPU kernels for batch norm and the explicit registry that dispatches to them.

This package imports NumPy and Numba only, never torch (a test checks it in a fresh
interpreter), and compiles nothing at import: each kernel is compiled on its first call and the
machine code is cached on disk. :func:`warmup` triggers those compilations ahead of time.

Two memory layouts are covered, each for float32 and float64 data:

* ``"nchw"``: a C-contiguous ``(N, C, S)`` view, ``S`` the product of the spatial dims (may be 1);
* ``"nhwc"``: a C-contiguous channels-last ``(M, C)`` view, ``M = N * S`` (also plain
  ``(N, C)`` input).

Every per-channel argument is a float64 ``(C,)`` array; every kernel writes into
caller-allocated outputs and returns None. Computation is float64 throughout.

The registered kernels are plain Python functions (about 1 us of overhead) that choose between
two compiled, ``prange``-parallel variants and call them; they are not meant to be called from
other jitted code (see the NOTE in :mod:`._config`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numba
import numpy as np

from . import activated
from .backward import (
    backward_apply_nchw,
    backward_apply_nhwc,
    backward_reduce_nchw,
    backward_reduce_nhwc,
)
from .fused import (
    backward_parallel_nchw,
    backward_parallel_nhwc,
    train_parallel_nchw,
    train_parallel_nhwc,
)
from .grouped import ghost_backward_nchw, ghost_train_nchw
from .moments import merge_moments_into, moments_nchw, moments_nhwc, moments_serial
from .normalize import normalize_nchw, normalize_nhwc
from .serial import (
    backward_serial_nchw,
    backward_serial_nhwc,
    eval_serial_nchw,
    eval_serial_nhwc,
    train_serial_nchw,
    train_serial_nhwc,
    update_running,
)

__all__ = [
    "ACTIVATED_CODES",
    "KERNELS",
    "LAYOUTS",
    "OPS",
    "backward_apply_nchw",
    "backward_apply_nhwc",
    "backward_parallel_nchw",
    "backward_parallel_nhwc",
    "backward_reduce_nchw",
    "backward_reduce_nhwc",
    "backward_serial_nchw",
    "backward_serial_nhwc",
    "eval_serial_nchw",
    "eval_serial_nhwc",
    "GROUPED_KERNELS",
    "GROUPED_OPS",
    "ghost_backward_nchw",
    "ghost_train_nchw",
    "moments_nchw",
    "moments_nhwc",
    "normalize_nchw",
    "normalize_nhwc",
    "select_kernel",
    "train_parallel_nchw",
    "train_parallel_nhwc",
    "train_serial_nchw",
    "train_serial_nhwc",
    "set_threads",
    "update_running",
    "warmup",
]

OPS = (
    "moments",
    "normalize",
    "backward_reduce",
    "backward_apply",
    "train_serial",
    "eval_serial",
    "backward_serial",
    "train_parallel",
    "backward_parallel",
)
# Kernels over chunks of the batch (ghost batch norm, see grouped.py): nchw only, since a chunk
# of a contiguous (N, C, S) array is one contiguous block. Kept apart from KERNELS, whose ops
# every layout covers.
GROUPED_OPS = ("ghost_train", "ghost_backward")
LAYOUTS = ("nchw", "nhwc")
DTYPE_NAMES = ("float32", "float64")
# The activations with kernels of their own (identity is batch norm's kernels); see activated.py.
ACTIVATED_CODES = (1, 2, 3, 4, 5)

# One Python function serves both dtypes: Numba compiles a specialisation per argument type.
KERNELS: dict[tuple[str, str, str], Callable] = {
    ("moments", "nchw", "float32"): moments_nchw,
    ("moments", "nchw", "float64"): moments_nchw,
    ("moments", "nhwc", "float32"): moments_nhwc,
    ("moments", "nhwc", "float64"): moments_nhwc,
    ("normalize", "nchw", "float32"): normalize_nchw,
    ("normalize", "nchw", "float64"): normalize_nchw,
    ("normalize", "nhwc", "float32"): normalize_nhwc,
    ("normalize", "nhwc", "float64"): normalize_nhwc,
    ("backward_reduce", "nchw", "float32"): backward_reduce_nchw,
    ("backward_reduce", "nchw", "float64"): backward_reduce_nchw,
    ("backward_reduce", "nhwc", "float32"): backward_reduce_nhwc,
    ("backward_reduce", "nhwc", "float64"): backward_reduce_nhwc,
    ("backward_apply", "nchw", "float32"): backward_apply_nchw,
    ("backward_apply", "nchw", "float64"): backward_apply_nchw,
    ("backward_apply", "nhwc", "float32"): backward_apply_nhwc,
    ("backward_apply", "nhwc", "float64"): backward_apply_nhwc,
    # Serial fused kernels for small inputs (see serial.py).
    ("train_serial", "nchw", "float32"): train_serial_nchw,
    ("train_serial", "nchw", "float64"): train_serial_nchw,
    ("train_serial", "nhwc", "float32"): train_serial_nhwc,
    ("train_serial", "nhwc", "float64"): train_serial_nhwc,
    ("eval_serial", "nchw", "float32"): eval_serial_nchw,
    ("eval_serial", "nchw", "float64"): eval_serial_nchw,
    ("eval_serial", "nhwc", "float32"): eval_serial_nhwc,
    ("eval_serial", "nhwc", "float64"): eval_serial_nhwc,
    ("backward_serial", "nchw", "float32"): backward_serial_nchw,
    ("backward_serial", "nchw", "float64"): backward_serial_nchw,
    ("backward_serial", "nhwc", "float32"): backward_serial_nhwc,
    ("backward_serial", "nhwc", "float64"): backward_serial_nhwc,
    # Whole parallel passes in one call, with the serial kernels' signatures (see fused.py).
    ("train_parallel", "nchw", "float32"): train_parallel_nchw,
    ("train_parallel", "nchw", "float64"): train_parallel_nchw,
    ("train_parallel", "nhwc", "float32"): train_parallel_nhwc,
    ("train_parallel", "nhwc", "float64"): train_parallel_nhwc,
    ("backward_parallel", "nchw", "float32"): backward_parallel_nchw,
    ("backward_parallel", "nchw", "float64"): backward_parallel_nchw,
    ("backward_parallel", "nhwc", "float32"): backward_parallel_nhwc,
    ("backward_parallel", "nhwc", "float64"): backward_parallel_nhwc,
}

GROUPED_KERNELS: dict[tuple[str, str, str], Callable] = {
    ("ghost_train", "nchw", "float32"): ghost_train_nchw,
    ("ghost_train", "nchw", "float64"): ghost_train_nchw,
    ("ghost_backward", "nchw", "float32"): ghost_backward_nchw,
    ("ghost_backward", "nchw", "float64"): ghost_backward_nchw,
}


def _dtype_name(dtype) -> str | None:
    try:
        return np.dtype(dtype).name
    except TypeError:
        return None


def select_kernel(op: str, layout: str, dtype) -> Callable | None:
    """Return the kernel for ``(op, layout, dtype)``, or None when no kernel covers it.

    Args:
        op: One of :data:`OPS`: the parallel building blocks ``"moments"``, ``"normalize"``,
            ``"backward_reduce"``, ``"backward_apply"``, the serial fused passes for small
            inputs ``"train_serial"``, ``"eval_serial"``, ``"backward_serial"``, or the whole
            parallel passes ``"train_parallel"``, ``"backward_parallel"``; or one of
            :data:`GROUPED_OPS`, the ghost batch norm passes ``"ghost_train"``,
            ``"ghost_backward"`` (``"nchw"`` only).
        layout: ``"nchw"`` or ``"nhwc"``; any other value is "not covered".
        dtype: A NumPy dtype, NumPy scalar type or dtype name (``np.float32``,
            ``np.dtype("float64")``, ``"float32"``). Anything NumPy cannot interpret (for example
            ``"bfloat16"``) or any dtype other than float32/float64 is "not covered".

    Returns:
        The kernel function, or None; the caller then falls back to torch's native op.

    Raises:
        ValueError: If ``op`` is not one of the operations listed above.

    Example:
        >>> select_kernel("moments", "nchw", np.float32) is moments_nchw
        True
        >>> select_kernel("moments", "nchw", "float16") is None
        True
    """
    name = _dtype_name(dtype)
    if op in GROUPED_OPS:
        return None if name is None else GROUPED_KERNELS.get((op, layout, name))
    if op not in OPS:
        raise ValueError(f"select_kernel(): expected op in {OPS + GROUPED_OPS!r}, got {op!r}.")
    return None if name is None else KERNELS.get((op, layout, name))


def set_threads(n: int) -> int:
    """Let the parallel kernels use ``n`` threads (capped at Numba's pool size); return the count.

    Numba's thread count is per calling thread and only read when a parallel kernel starts.
    """
    # numba.config sets its attributes at run time from the environment: no hints for them.
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    numba.set_num_threads(n)
    return n


def warmup(dtypes: Iterable[str] = DTYPE_NAMES, jobs: int = 1) -> None:
    """Compile (or load from the on-disk cache) every kernel for ``dtypes`` by calling it once.

    The calls use tiny arrays of exactly the argument types the torch layer passes
    (C-contiguous data of the given dtype, float64 per-channel vectors), with shapes that reach
    both compiled variants behind each public kernel (the general one and the ``C == 1`` /
    ``S == 1`` one). The activated kernels (:mod:`.activated`, one set per activation) are
    included.

    Args:
        dtypes: Dtype names (or anything :func:`numpy.dtype` accepts) among float32/float64.
        jobs: Processes that compile at the same time (spawned; each fills the on-disk cache
            with its share, then this process loads everything from it). Compilation is
            single-threaded, so more jobs than cores gains nothing.

    Raises:
        ValueError: If a dtype has no kernels, or ``jobs`` < 1.
    """
    names = []
    for dtype in dtypes:
        name = _dtype_name(dtype)
        if name not in DTYPE_NAMES:
            raise ValueError(f"warmup(): expected dtypes among {DTYPE_NAMES!r}, got {dtype!r}.")
        names.append(name)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"warmup(): expected jobs to be an int >= 1, got {jobs!r}.")
    tasks: list[tuple[int | str, str]] = [("core", name) for name in names]
    tasks += [(code, name) for code in ACTIVATED_CODES for name in names]
    if jobs > 1:
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            list(pool.map(_warmup_task, tasks))
    for task in tasks:  # compiled or loaded from the cache the jobs just filled
        _warmup_task(task)
    # The merge and the serial moments of stats (float64 data and per-channel vectors).
    ones = np.ones(2)
    moments_serial(np.ones((2, 2, 3)), ones.copy(), ones.copy())
    merge_moments_into(ones, ones, ones, ones, ones, ones, ones.copy(), ones.copy(), ones.copy())


def _warmup_task(task: tuple) -> None:
    """One share of :func:`warmup`: ``("core", dtype)`` or ``(activation code, dtype)``."""
    what, name = task
    shape: tuple[int, ...]
    if what == "core":
        for shape in ((2, 2, 3), (3, 2, 1)):
            _run_all(np.ones(shape, dtype=name), layout="nchw")
        for shape in ((3, 2), (3, 1)):
            _run_all(np.ones(shape, dtype=name), layout="nhwc")
        for shape in ((4, 2, 3), (4, 2, 1)):  # both variants of the ghost kernels
            _run_grouped(np.ones(shape, dtype=name))
        return
    for shape in ((2, 2, 3), (3, 2)):  # the rows and the cols variant
        _run_activated(what, np.ones(shape, dtype=name))


def _run_activated(code: int, x: np.ndarray) -> None:
    n_chan = x.shape[1]
    own = np.ones(n_chan, dtype=x.dtype)
    stats = [np.ones(n_chan) for _ in range(4)]
    out = np.empty_like(x)
    grads = (np.empty(n_chan, dtype=x.dtype), np.empty(n_chan, dtype=x.dtype))
    layer_kernels = activated.kernels_for(code)
    rows = x.ndim == 3
    train = layer_kernels.train_rows if rows else layer_kernels.train_cols
    evaluate = layer_kernels.eval_rows if rows else layer_kernels.eval_cols
    backward = layer_kernels.backward_rows if rows else layer_kernels.backward_cols
    train(x, own, own, 1e-5, 0.1, out, *stats[:2], own.copy(), own.copy(), 0.1, 1e38)
    evaluate(x, *stats[:3], 0.1, out)
    backward(x, x, *stats, own, 0.1, True, out, *grads)


def _run_all(x: np.ndarray, layout: str) -> None:
    dy = x.copy()
    n_chan = x.shape[1]
    a, b, c, d = (np.zeros(n_chan) for _ in range(4))
    out = np.empty_like(x)
    name = x.dtype.name
    KERNELS["moments", layout, name](x, a, b)
    KERNELS["normalize", layout, name](x, a, b, c, out)
    KERNELS["backward_reduce", layout, name](dy, x, a, c, d)
    KERNELS["backward_apply", layout, name](dy, x, a, b, c, d, out)
    # The serial kernels take per-channel tensors in the data's dtype (weight, bias, running
    # statistics; zero-length when absent) and float64 batch statistics, as the torch layer
    # passes them; each combination is a separate compiled specialisation.
    own = np.ones(n_chan, dtype=x.dtype)
    absent = np.empty(0, dtype=x.dtype)
    # The layer receives the parameter gradients in the data's dtype.
    grads = (np.empty(n_chan, dtype=x.dtype), np.empty(n_chan, dtype=x.dtype))
    for params, running in ((own, own.copy()), (absent, absent)):
        for mode in ("serial", "parallel"):
            KERNELS[f"train_{mode}", layout, name](
                x, params, params, 1e-5, out, a, b, running, running.copy(), 0.1, 1e38
            )
            for mean, var, training in ((a, b, True), (own, own, False)):
                KERNELS[f"backward_{mode}", layout, name](
                    dy, x, mean, var, params, 1e-5, training, out, *grads
                )
        KERNELS["eval_serial", layout, name](x, own, own, params, params, 1e-5, out)
    for factor in (0.1, 1.0):
        update_running(own.copy(), own.copy(), a, b, 2, factor, 1e38)


def _run_grouped(x: np.ndarray) -> None:
    n_chan = x.shape[1]
    stats = (np.zeros((2, n_chan)), np.zeros((2, n_chan)))
    merged = [np.zeros(n_chan) for _ in range(2)]
    params = np.ones(n_chan, dtype=x.dtype)
    out = np.empty_like(x)
    grads = (np.empty(n_chan, dtype=x.dtype), np.empty(n_chan, dtype=x.dtype))
    ghost_train_nchw(x, 2, params, params, 1e-5, out, *stats, *merged)
    ghost_backward_nchw(x, x, 2, *stats, params, 1e-5, out, *grads)
