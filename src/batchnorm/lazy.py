"""``LazyBatchNorm1d/2d/3d``: this package's layers, ``num_features`` from the first input.

As torch.nn's lazy layers do, each starts with uninitialized parameters and buffers, takes
``num_features`` from the channel axis of its first input, and becomes the plain layer on that
call: ``batchnorm.LazyBatchNorm2d`` becomes :class:`batchnorm.BatchNorm2d` (torch's becomes
``torch.nn.BatchNorm2d``). Every call, the first included, runs this package's forward: checks
before any state changes, the Numba kernels, the non-finite policy. A subclass of torch.nn's
lazy class, so ``isinstance(layer, torch.nn.LazyBatchNorm2d)`` holds before the first call and
:func:`batchnorm.convert` switches between the two in either direction.

Example:
    >>> import torch
    >>> from batchnorm.lazy import LazyBatchNorm2d
    >>> layer = LazyBatchNorm2d()
    >>> _ = layer(torch.randn(4, 3, 5, 5))
    >>> type(layer).__name__, layer.num_features, type(layer).__module__
    ('BatchNorm2d', 3, 'batchnorm.modules')
"""

from __future__ import annotations

from typing import cast

import torch
from torch.nn.modules.batchnorm import _LazyNormBase

from ._validate import check_constructor_args, check_nonfinite_policy
from .families import add_twin
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase

__all__ = ["LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"]


class _LazyBatchNormBase(BatchNormBase):
    """The constructor of the three lazy layers: torch.nn's arguments plus ``nonfinite``."""

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        nonfinite: str = "skip",
    ) -> None:
        name = type(self).__name__
        check_constructor_args(name, None, eps, momentum)
        check_nonfinite_policy(f"{name}()", nonfinite)
        # torch.nn's lazy constructor (skipping BatchNormBase's, which needs num_features).
        # Every concrete class here is also a torch lazy layer, so self is one.
        _LazyNormBase.__init__(
            cast(_LazyNormBase, self), eps, momentum, affine, track_running_stats, device, dtype
        )
        if nonfinite != type(self).nonfinite:
            self.nonfinite = nonfinite


class LazyBatchNorm1d(_LazyBatchNormBase, torch.nn.LazyBatchNorm1d):
    """:class:`batchnorm.BatchNorm1d` with ``num_features`` from the first input's axis 1."""

    cls_to_become = BatchNorm1d
    input_ranks = BatchNorm1d.input_ranks
    input_shape = BatchNorm1d.input_shape


class LazyBatchNorm2d(_LazyBatchNormBase, torch.nn.LazyBatchNorm2d):
    """:class:`batchnorm.BatchNorm2d` with ``num_features`` from the first input's axis 1."""

    cls_to_become = BatchNorm2d
    input_ranks = BatchNorm2d.input_ranks
    input_shape = BatchNorm2d.input_shape


class LazyBatchNorm3d(_LazyBatchNormBase, torch.nn.LazyBatchNorm3d):
    """:class:`batchnorm.BatchNorm3d` with ``num_features`` from the first input's axis 1."""

    cls_to_become = BatchNorm3d
    input_ranks = BatchNorm3d.input_ranks
    input_shape = BatchNorm3d.input_shape


# The lazy twins of the fixed-rank families (batchnorm.families).
for _lazy in (LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d):
    add_twin(_lazy.cls_to_become.__name__, lazy=_lazy)
