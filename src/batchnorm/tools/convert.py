"""Switch the BatchNorm layers of a model between torch.nn's classes and this package's.

The switch is done in place by changing each layer's class. Our classes subclass torch.nn's and
add no instance state, so this keeps everything a layer owns: the very same Parameter objects
(an optimizer built before the switch keeps working), buffers, hooks, training mode, device and
dtype. A BatchNorm subclass this module does not know is refused, never converted: turning a
user's subclass into ours would silently strip its overrides.
"""

from __future__ import annotations

import torch

from ..distributed import SyncBatchNorm
from ..modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["convert"]

_TO_OURS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_OURS.items()}
_TARGETS = {"batchnorm": _TO_OURS, "torch": _TO_TORCH}


def convert(model: torch.nn.Module, to: str = "batchnorm") -> torch.nn.Module:
    """Make every BatchNorm layer of ``model`` use the given implementation, in place.

    Args:
        model: Any module; the root may itself be a BatchNorm layer.
        to: ``"batchnorm"`` turns ``torch.nn.BatchNorm1d/2d/3d`` into
            ``batchnorm.BatchNorm1d/2d/3d``; ``"torch"`` turns them back.

    Returns:
        ``model`` itself (converted in place), for chaining.

    Raises:
        ValueError: ``to`` is not ``"batchnorm"`` or ``"torch"``.
        TypeError: ``model`` holds a BatchNorm-like layer whose class is neither of the exact
            classes above (a user subclass, ``torch.nn.SyncBatchNorm``, an uninitialized lazy
            layer). The whole tree is checked first, so nothing is converted then.

    Example:
        >>> import torch, batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> type(batchnorm.convert(net)[1]).__module__
        'batchnorm.modules'
        >>> type(batchnorm.convert(net, to="torch")[1]) is torch.nn.BatchNorm1d
        True
    """
    if to not in _TARGETS:
        raise ValueError(f"convert(): expected to='batchnorm' or to='torch', got {to!r}.")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert(): expected a torch.nn.Module, got {type(model).__name__}.")
    mapping = _TARGETS[to]
    known = set(_TO_OURS) | set(_TO_TORCH)
    swaps = []
    for path, module in model.named_modules():
        cls = type(module)
        if cls in mapping:
            swaps.append((module, mapping[cls]))
        elif cls is SyncBatchNorm:
            if to == "torch":
                # torch's own SyncBatchNorm refuses CPU input and DDP refuses it on CPU models,
                # so there is no faithful torch counterpart to switch to in place.
                raise TypeError(
                    f"convert(): cannot convert {path or 'the root module'!r} of type "
                    "batchnorm.SyncBatchNorm to torch: call "
                    "batchnorm.revert_sync_batchnorm(model) first, or "
                    "torch.nn.SyncBatchNorm.convert_sync_batchnorm on the result for GPUs."
                )
            # to="batchnorm": it already runs on this package's kernels.
        elif (
            cls not in known
            and isinstance(module, torch.nn.modules.batchnorm._NormBase)
            and not (isinstance(module, torch.nn.modules.instancenorm._InstanceNorm))
        ):
            raise TypeError(
                f"convert(): cannot convert {path or 'the root module'!r} of type "
                f"{cls.__module__}.{cls.__qualname__}: only torch.nn.BatchNorm1d/2d/3d and "
                "batchnorm.BatchNorm1d/2d/3d are converted, and converting a subclass would "
                "drop its behaviour. Replace it yourself or convert its base class."
            )
    for module, target in swaps:
        module.__class__ = target
    return model
