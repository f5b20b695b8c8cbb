"""Batch Normalization for PyTorch on Numba CPU kernels.

Importing the package compiles nothing: the kernels compile on first use (cached on disk), or
ahead of time with ``batchnorm warmup``.
"""

from .functional import backend_for, batch_norm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .tools.convert import convert

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "backend_for",
    "batch_norm",
    "convert",
    "__version__",
]
