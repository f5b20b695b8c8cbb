"""The bridge between tensors and the kernels' arrays: views, outputs, threads, kernel lookup.

Everything here is plumbing with no batch-norm arithmetic: zero-copy NumPy views of CPU
tensors in the kernels' ``(N, C, S)`` / ``(M, C)`` shapes, new outputs in an input's memory
layout (from :mod:`batchnorm.outputs`), the thread count of the parallel kernels, and a memoised
lookup in the kernel registry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import kernels, outputs
from .routing import kernel_layout

__all__ = [
    "ABSENT",
    "NUMPY_DTYPE",
    "array",
    "empty_output",
    "float64_or",
    "kernel",
    "kernel_view",
    "limit_of",
    "match_layout",
    "numpy_view",
    "optional_array",
    "run_parallel",
]

NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
# Zero-length arrays stand for an absent weight, bias or running statistic in the kernels.
ABSENT: dict[torch.dtype, np.ndarray] = {
    torch.float32: np.empty(0, np.float32),
    torch.float64: np.empty(0, np.float64),
}
# Largest finite value of each kernel dtype: statistics beyond it would be stored as Inf.
_LIMIT = {np.dtype(t): float(np.finfo(t).max) for t in (np.float32, np.float64)}

_kernel_cache: dict[tuple[str, str, object], Callable[..., Any]] = {}


def kernel(op: str, layout: str, dtype) -> Callable[..., Any]:
    """``kernels.select_kernel``, memoised.

    Resolving a NumPy dtype's name costs ~2 us a call, noticeable next to a ~30 us BatchNorm on
    a small batch (measured: module train forward on (60, 100) went from 55 to 50 us).
    """
    key = (op, layout, dtype)
    found = _kernel_cache.get(key)
    if found is None:
        selected = kernels.select_kernel(op, layout, dtype)
        # Routing sends only inputs the kernels cover here (see routing.choose).
        assert selected is not None, f"no kernel for {key!r}"
        found = _kernel_cache[key] = selected
    return found


def limit_of(dtype) -> float:
    """The largest finite value of a NumPy float dtype (float32 or float64)."""
    return _LIMIT[np.dtype(dtype)]


def kernel_view(a: np.ndarray, layout: str) -> np.ndarray:
    """View an ``(N, C, *)`` array as the kernel's ``(N, C, S)`` (nchw) or ``(M, C)`` (nhwc)."""
    n, c = a.shape[0], a.shape[1]
    if layout == "nchw":
        return a.reshape(n, c, -1)
    if a.ndim == 2:
        return a
    return np.moveaxis(a, 1, -1).reshape(-1, c)


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a CPU tensor (detached: the kernels are outside autograd)."""
    # detach() only where numpy() needs it: 0.8 us instead of 1.2 us a call for buffers.
    return t.detach().numpy() if t.requires_grad else t.numpy()


def array(a: torch.Tensor | np.ndarray) -> np.ndarray:
    """``a`` itself if it is a NumPy array, else its zero-copy view."""
    return a if isinstance(a, np.ndarray) else numpy_view(a)


def optional_array(t: torch.Tensor | None, dtype: torch.dtype) -> np.ndarray:
    """The view of ``t``, or the zero-length array that means "absent" to the kernels."""
    return ABSENT[dtype] if t is None else numpy_view(t)


def float64_or(a: np.ndarray, channels: int, fill: float) -> np.ndarray:
    """``a`` as float64, or ``fill`` repeated when ``a`` is the zero-length "absent" array."""
    return np.full(channels, fill) if a.shape[0] == 0 else a.astype(np.float64)


def empty_output(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, np.ndarray]:
    """A new tensor with ``x``'s shape, dtype and memory layout, and its kernel view.

    The memory comes from NumPy, not torch's allocator, through :mod:`.outputs`: large buffers
    are reused once their tensors are gone, so a training loop does not map and zero fresh pages
    on every call (for a memory-bound op that costs as much as the op itself), and fresh large
    allocations get transparent huge pages, which NumPy asks for and torch's CPU allocator does
    not (unless THP_MEM_ALLOC_ENABLE=1; allocate + fill of 49 MiB, 12.7 ms vs 2.6 ms).
    """
    dtype = NUMPY_DTYPE[x.dtype]
    if layout == "nchw" or x.dim() == 2:
        buffer = outputs.empty(tuple(x.shape), dtype)
        return torch.from_numpy(buffer), kernel_view(buffer, layout)
    channels_last = (x.shape[0], *x.shape[2:], x.shape[1])
    buffer = outputs.empty(channels_last, dtype)
    # The buffer's storage under x's shape and channels-last strides, as a tensor of its own
    # rather than a permute() view: autograd refuses in-place changes to a view made inside a
    # custom Function, and torch.nn's output takes them (BatchNorm2d then ReLU(inplace=True)).
    # The storage keeps the NumPy array alive, as from_numpy's tensor would.
    storage = torch.from_numpy(buffer).untyped_storage()
    strides = _channels_last_strides(x.shape)
    out = torch.empty(0, dtype=x.dtype).set_(storage, 0, tuple(x.shape), strides)
    return out, buffer.reshape(-1, x.shape[1])


def _channels_last_strides(shape) -> tuple[int, ...]:
    """Strides of a dense channels-last tensor of ``shape`` (``(N, C, *spatial)``)."""
    c = shape[1]
    strides = [0] * len(shape)
    step = c
    for axis in range(len(shape) - 1, 1, -1):
        strides[axis] = step
        step *= shape[axis]
    strides[1] = 1
    strides[0] = step
    return tuple(strides)


def match_layout(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy`` in ``x``'s kernel memory layout (a copy only when it is not already).

    A gradient arrives in whatever layout autograd produced (often an expanded view from a
    sum); the kernels need it laid out like the forward's input.
    """
    if x.dim() == 2 or kernel_layout(x) == "nchw":
        return dy.contiguous()
    if dy.stride() != x.stride():
        dy = dy.permute(0, *range(2, dy.dim()), 1).contiguous()
        return dy.permute(0, dy.dim() - 1, *range(1, dy.dim() - 1))
    return dy


# Torch's thread count when this package last set Numba's, per calling thread (Numba's count is
# per thread).
_numba_threads = threading.local()


def run_parallel(kernel, *args):
    """Call a parallel kernel with torch's thread count, and leave torch's count as it was.

    Numba's OpenMP layer runs in the same OpenMP runtime as torch, and starting a parallel
    region sets that runtime's thread count to Numba's: without the check after the call, one
    large BatchNorm would silently undo a user's ``torch.set_num_threads(1)`` (measured: a
    small MLP then ran 50x slower next to a busy core). Numba's count is set only when torch's
    changed since the last call from this thread: ``numba.set_num_threads`` costs ~1 us, and
    the ``with`` block this replaced ~2.3 us, a call of every parallel kernel.
    """
    threads = torch.get_num_threads()
    if getattr(_numba_threads, "torch_count", None) != threads:
        kernels.set_threads(threads)
        _numba_threads.torch_count = threads
    try:
        return kernel(*args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
