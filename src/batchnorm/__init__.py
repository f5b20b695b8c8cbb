"""Batch Normalization for PyTorch on Numba CPU kernels.

The torch-facing names are loaded on first access (PEP 562), so that ``batchnorm.reference``,
``batchnorm.stats`` and ``batchnorm.kernels`` import without torch, as the architecture
requires, and ``import batchnorm`` stays cheap. Importing compiles nothing either: the kernels
compile on first use (cached on disk), or ahead of time with ``batchnorm warmup``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Registers the fork handler, so a child forked after this import is known as one (routing).
from . import _process  # noqa: F401

__version__ = "0.2.0"

# public name -> submodule that defines it
_EXPORTS = {
    "ActivationMonitor": "monitor",
    "BatchNorm1d": "modules",
    "BatchNormAct1d": "activated",
    "BatchNormAct2d": "activated",
    "BatchNormAct3d": "activated",
    "BatchNorm2d": "modules",
    "BatchNorm3d": "modules",
    "BatchRenorm1d": "variants",
    "BatchRenorm2d": "variants",
    "BatchRenorm3d": "variants",
    "InPlaceABN1d": "inplace",
    "InPlaceABN2d": "inplace",
    "InPlaceABN3d": "inplace",
    "FrozenBatchNorm1d": "frozen",
    "FrozenBatchNorm2d": "frozen",
    "FrozenBatchNorm3d": "frozen",
    "GhostBatchNorm1d": "variants",
    "GhostBatchNorm2d": "variants",
    "GhostBatchNorm3d": "variants",
    "RoutingPolicy": "routing",
    "LayerStatistics": "tools.population",
    "LazyBatchNorm1d": "lazy",
    "LazyBatchNorm2d": "lazy",
    "LazyBatchNorm3d": "lazy",
    "OutputCacheInfo": "outputs",
    "MixedDtypeError": "_errors",
    "MomentumTypeError": "_errors",
    "NonFiniteStatisticsError": "_errors",
    "NonFiniteStatisticsWarning": "_errors",
    "NotATensorError": "_errors",
    "RankError": "_errors",
    "ShapeError": "_errors",
    "UnsupportedDtypeError": "_errors",
    "SyncBatchNorm": "distributed",
    "accumulate_statistics": "tools.accumulate",
    "backend_for": "functional",
    "batch_norm": "functional",
    "check_fold": "tools.fold",
    "clear_output_cache": "outputs",
    "convert": "tools.convert",
    "convert_sync_batchnorm": "tools.convert",
    "fold": "tools.fold",
    "fuse_activations": "tools.fuse",
    "freeze": "tools.freeze",
    "output_cache_info": "outputs",
    "recompute_statistics": "tools.population",
    "revert_sync_batchnorm": "tools.convert",
    "routing_policy": "routing",
    "set_output_cache_limit": "outputs",
    "unfreeze": "tools.freeze",
    "use_routing": "routing",
}

__all__ = [
    "ActivationMonitor",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "InPlaceABN1d",
    "InPlaceABN2d",
    "InPlaceABN3d",
    "LayerStatistics",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "MixedDtypeError",
    "MomentumTypeError",
    "NonFiniteStatisticsError",
    "NonFiniteStatisticsWarning",
    "NotATensorError",
    "OutputCacheInfo",
    "RankError",
    "RoutingPolicy",
    "ShapeError",
    "SyncBatchNorm",
    "UnsupportedDtypeError",
    "__version__",
    "accumulate_statistics",
    "backend_for",
    "batch_norm",
    "check_fold",
    "clear_output_cache",
    "convert",
    "convert_sync_batchnorm",
    "fold",
    "freeze",
    "fuse_activations",
    "output_cache_info",
    "recompute_statistics",
    "revert_sync_batchnorm",
    "routing_policy",
    "set_output_cache_limit",
    "unfreeze",
    "use_routing",
]
assert set(__all__) == {*_EXPORTS, "__version__"}, "__all__ and _EXPORTS must list the same names"

if TYPE_CHECKING:
    from ._errors import (
        MixedDtypeError,
        MomentumTypeError,
        NonFiniteStatisticsError,
        NonFiniteStatisticsWarning,
        NotATensorError,
        RankError,
        ShapeError,
        UnsupportedDtypeError,
    )
    from .activated import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
    from .distributed import SyncBatchNorm
    from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
    from .functional import backend_for, batch_norm
    from .inplace import InPlaceABN1d, InPlaceABN2d, InPlaceABN3d
    from .lazy import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
    from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
    from .monitor import ActivationMonitor
    from .outputs import (
        OutputCacheInfo,
        clear_output_cache,
        output_cache_info,
        set_output_cache_limit,
    )
    from .routing import RoutingPolicy, routing_policy, use_routing
    from .tools.accumulate import accumulate_statistics
    from .tools.convert import convert, convert_sync_batchnorm, revert_sync_batchnorm
    from .tools.fold import check_fold, fold
    from .tools.freeze import freeze, unfreeze
    from .tools.fuse import fuse_activations
    from .tools.population import LayerStatistics, recompute_statistics
    from .variants import (
        BatchRenorm1d,
        BatchRenorm2d,
        BatchRenorm3d,
        GhostBatchNorm1d,
        GhostBatchNorm2d,
        GhostBatchNorm3d,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'batchnorm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
