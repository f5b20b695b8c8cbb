"""Moving test data between the ``(N, C, *)`` layout of the reference and the kernels' views."""

from __future__ import annotations

import numpy as np


def to_kernel_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """``(N, C, *)`` -> C-contiguous ``(N, C, S)`` for nchw or ``(N * S, C)`` for nhwc."""
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    if layout == "nchw":
        return np.ascontiguousarray(x3)
    return np.ascontiguousarray(x3.transpose(0, 2, 1)).reshape(-1, c)


def from_kernel_layout(y: np.ndarray, shape: tuple[int, ...], layout: str) -> np.ndarray:
    """Inverse of :func:`to_kernel_layout`."""
    n, c = shape[:2]
    if layout == "nchw":
        return y.reshape(shape)
    return y.reshape(n, -1, c).transpose(0, 2, 1).reshape(shape)
