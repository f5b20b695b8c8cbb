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

import numpy as np

from .backward import (
    backward_apply_nchw,
    backward_apply_nhwc,
    backward_reduce_nchw,
    backward_reduce_nhwc,
)
from .moments import moments_nchw, moments_nhwc
from .normalize import normalize_nchw, normalize_nhwc

__all__ = [
    "KERNELS",
    "LAYOUTS",
    "OPS",
    "backward_apply_nchw",
    "backward_apply_nhwc",
    "backward_reduce_nchw",
    "backward_reduce_nhwc",
    "moments_nchw",
    "moments_nhwc",
    "normalize_nchw",
    "normalize_nhwc",
    "select_kernel",
    "warmup",
]

OPS = ("moments", "normalize", "backward_reduce", "backward_apply")
LAYOUTS = ("nchw", "nhwc")
DTYPE_NAMES = ("float32", "float64")

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
}


def _dtype_name(dtype) -> str | None:
    try:
        return np.dtype(dtype).name
    except TypeError:
        return None


def select_kernel(op: str, layout: str, dtype) -> Callable | None:
    """Return the kernel for ``(op, layout, dtype)``, or None when no kernel covers it.

    Args:
        op: One of ``"moments"``, ``"normalize"``, ``"backward_reduce"``, ``"backward_apply"``.
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
    if op not in OPS:
        raise ValueError(f"select_kernel(): expected op in {OPS!r}, got {op!r}.")
    return KERNELS.get((op, layout, _dtype_name(dtype)))


def warmup(dtypes: Iterable[str] = DTYPE_NAMES) -> None:
    """Compile (or load from the on-disk cache) every kernel for ``dtypes`` by calling it once.

    The calls use tiny arrays of exactly the argument types the torch layer passes
    (C-contiguous data of the given dtype, float64 per-channel vectors), with shapes that reach
    both compiled variants behind each public kernel (the general one and the ``C == 1`` /
    ``S == 1`` one).

    Args:
        dtypes: Dtype names (or anything :func:`numpy.dtype` accepts) among float32/float64.

    Raises:
        ValueError: If a dtype has no kernels.
    """
    for dtype in dtypes:
        name = _dtype_name(dtype)
        if name not in DTYPE_NAMES:
            raise ValueError(f"warmup(): expected dtypes among {DTYPE_NAMES!r}, got {dtype!r}.")
        for shape in ((2, 2, 3), (3, 2, 1)):
            _run_all(np.ones(shape, dtype=name), layout="nchw")
        for shape in ((3, 2), (3, 1)):
            _run_all(np.ones(shape, dtype=name), layout="nhwc")


def _run_all(x: np.ndarray, layout: str) -> None:
    dy = x.copy()
    n_chan = x.shape[1]
    a, b, c, d = (np.zeros(n_chan) for _ in range(4))
    out = np.empty_like(x)
    KERNELS["moments", layout, x.dtype.name](x, a, b)
    KERNELS["normalize", layout, x.dtype.name](x, a, b, c, out)
    KERNELS["backward_reduce", layout, x.dtype.name](dy, x, a, c, d)
    KERNELS["backward_apply", layout, x.dtype.name](dy, x, a, b, c, d, out)
