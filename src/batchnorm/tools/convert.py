"""Switch the BatchNorm layers of a model between implementations, in place.

:func:`convert` switches between torch.nn's classes and this package's;
:func:`convert_sync_batchnorm` and :func:`revert_sync_batchnorm` between per-process layers and
:class:`batchnorm.SyncBatchNorm`.
All three change each layer's class and nothing else. Our classes subclass torch.nn's and add
no instance state, so this keeps everything a layer owns: the very same Parameter objects (an
optimizer built before the switch keeps working), buffers, hooks, training mode, device and
dtype. Which class becomes which is the family table's (:mod:`batchnorm.families`). A
BatchNorm subclass the table does not know is refused, never converted: turning a user's
subclass into ours would silently strip its overrides. The whole tree is checked before any
layer changes, so a refused model is left as it was.

Activated layers (``batchnorm.BatchNormAct2d`` and the table's other activated classes) have no
torch.nn or synchronized twin. Converting one to torch.nn's class or to SyncBatchNorm *splits*
it, so that its activation is never dropped: the layer itself (the same module, Parameter and
buffer objects) changes class and takes the first slot of a new ``torch.nn.Sequential(layer,
activation module)`` that replaces it in its parent and computes the same values. Its
``state_dict`` keys gain the Sequential's index (``bn.weight`` becomes ``bn.0.weight``), and
its forward and backward hooks move to the Sequential (same input and output). The Sequential
remembers the activated class: converting back (``convert(model)``,
:func:`revert_sync_batchnorm`) joins it into one activated layer again, as long as it still
holds that family's layer and the same activation, neither with hooks of its own.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from ..activated import BatchNormActBase
from ..distributed import ORIGINAL_CLASS, SyncBatchNorm, forget_sync_state, last_input_rank
from ..families import family_for_rank, family_of, is_batchnorm_like, known_family
from ._activated import activated_family, join_all, replace_modules, split

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


__all__ = ["convert", "convert_sync_batchnorm", "revert_sync_batchnorm"]

_TARGETS = ("batchnorm", "torch")


def _path_text(path: str) -> str:
    return repr(path) if path else "the root module"


def _type_text(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_model(where: str, model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}: expected a torch.nn.Module, got {type(model).__name__}.")


def _convert_target(cls: type, to: str) -> type | None:
    """The class ``cls`` becomes under ``convert(to=...)``, or ``None`` if it has no twin."""
    family = family_of(cls)
    if family is None:
        return None
    if cls in family.variants:  # already ours; torch.nn's twin is the family's class
        return family.torch if to == "torch" else cls
    for theirs, ours in ((family.torch, family.ours), (family.torch_lazy, family.lazy)):
        if theirs is not None and ours is not None and cls in (theirs, ours):
            return ours if to == "batchnorm" else theirs
    return None


def convert(model: torch.nn.Module, to: str = "batchnorm") -> torch.nn.Module:
    """Make every BatchNorm layer of ``model`` use the given implementation, in place.

    Args:
        model: Any module; the root may itself be a BatchNorm layer.
        to: ``"batchnorm"`` turns ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``
            and (uninitialized) ``torch.nn.LazyBatchNorm1d/2d/3d`` into this package's twins
            (:mod:`batchnorm.families`); ``"torch"`` turns them back, and turns this package's
            variants (:mod:`batchnorm.variants`: ghost batches, batch renormalization) into
            the torch.nn class of their rank, with a warning. Layers already of the target
            kind are left alone. Activated layers (``batchnorm.BatchNormAct*d``): ``"torch"``
            splits each into ``torch.nn.Sequential(torch.nn.BatchNorm*d, activation module)``
            (same outputs; see the module docstring); ``"batchnorm"`` leaves them alone, and
            joins the Sequentials that ``"torch"`` made back into the activated layer.

    Returns:
        ``model`` itself (converted in place), for chaining; when ``model`` itself is an
        activated layer converted to torch.nn, the new Sequential (and, back, the layer).

    Raises:
        ValueError: ``to`` is not ``"batchnorm"`` or ``"torch"``.
        TypeError: ``model`` holds a BatchNorm-like layer whose class is none of the exact
            classes above (a user subclass). The whole tree is checked first, so nothing is
            converted then.

    Warns:
        UserWarning: ``to="torch"`` converts variant layers: their evaluation is identical,
            but in training they will normalize with the whole batch's statistics.

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
    _check_model("convert()", model)
    swaps = []
    variants = []
    activated = []
    for path, module in model.named_modules():
        cls = type(module)
        target = _convert_target(cls, to)
        if target is not None:
            if cls is not target:
                swaps.append((module, target))
                if cls in known_family(cls).variants:
                    variants.append(f"{_path_text(path)} ({cls.__name__})")
        elif activated_family(module) is not None:
            if to == "torch":  # split first (the layer becomes ours), then switched to torch's
                activated.append(module)
                swaps.append((module, known_family(type(module)).torch))
        elif is_batchnorm_like(module):
            raise TypeError(
                f"convert(): cannot convert {_path_text(path)} of type {_type_text(cls)}: only "
                "torch.nn.BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm, torch.nn.LazyBatchNorm1d/"
                "2d/3d and their batchnorm twins are converted, and converting a subclass would "
                "drop its behaviour. Replace it yourself or convert its base class."
            )
    model = replace_modules(model, {id(module): split(module) for module in activated})
    for module, target in swaps:
        if type(module) is SyncBatchNorm:
            # Leaving this package: what our SyncBatchNorm remembered has no meaning there.
            forget_sync_state(module)
            module.__dict__.pop(ORIGINAL_CLASS, None)
        module.__class__ = target
    if to == "batchnorm":
        model = join_all(model)
    if variants:
        warnings.warn(
            f"convert(): {', '.join(variants)} became torch.nn BatchNorm layers; evaluation is "
            "identical, but training now normalizes with the whole batch's statistics (no ghost "
            "batches, no renormalization).",
            UserWarning,
            stacklevel=2,
        )
    return model


def convert_sync_batchnorm(
    model: torch.nn.Module, process_group: ProcessGroup | None = None
) -> torch.nn.Module:
    """Make every BatchNorm layer of ``model`` a :class:`batchnorm.SyncBatchNorm`, in place.

    ``torch.nn.BatchNorm1d/2d/3d``, ``batchnorm.BatchNorm1d/2d/3d`` and
    ``torch.nn.SyncBatchNorm`` layers change class: the very same module objects, with the same
    Parameter objects (an optimizer built before keeps working), buffers, hooks, training
    mode, device and dtype, and for this package's layers their ``nonfinite`` policy. Each
    remembers its original class for :func:`revert_sync_batchnorm`. Every converted layer, and
    every layer that already was a :class:`batchnorm.SyncBatchNorm`, synchronizes over
    ``process_group`` afterwards (a ``torch.nn.SyncBatchNorm``'s own group is replaced too).
    Frozen layers (:mod:`batchnorm.frozen`) and instance norms are not BatchNorm layers and are
    left alone. An activated layer (``batchnorm.BatchNormAct*d``) keeps its activation: it is
    split into ``torch.nn.Sequential(layer, activation module)`` (see the module docstring),
    and its layer, now of its family's plain class, is converted as above;
    :func:`revert_sync_batchnorm` joins it back.

    Args:
        model: Any module; the root may itself be a BatchNorm layer.
        process_group: The group to synchronize over; ``None`` for the default (world) group.

    Returns:
        ``model`` itself, converted in place (the root too), for chaining; the new Sequential
        when ``model`` itself is an activated layer.

    Raises:
        TypeError: ``model`` is not a module, or holds a BatchNorm-like layer of another class
            (a user subclass, an uninitialized lazy layer): converting it would drop its
            behaviour. The whole tree is checked first, so then nothing is converted.

    Example:
        >>> import torch
        >>> from batchnorm.tools.convert import convert_sync_batchnorm, revert_sync_batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> weight = net[1].weight
        >>> type(convert_sync_batchnorm(net)[1]).__name__, net[1].weight is weight
        ('SyncBatchNorm', True)
        >>> type(revert_sync_batchnorm(net)[1]) is torch.nn.BatchNorm2d
        True
    """
    _check_model("convert_sync_batchnorm()", model)
    # Every refusal before anything changes, with what to do about each kind of layer.
    _check_sync_convertible(model)
    # (An activated family's layer is always a BatchNormActBase: the isinstance only narrows.)
    activated = [
        module
        for module in model.modules()
        if activated_family(module) is not None and isinstance(module, BatchNormActBase)
    ]
    if activated:
        # The class's own conversion refuses activated layers (it would drop the activation):
        # split them first.
        model = replace_modules(model, {id(module): split(module) for module in activated})
    # The conversion is the class's own, under torch's classmethod name.
    return SyncBatchNorm.convert_sync_batchnorm(model, process_group)


def _check_sync_convertible(model: torch.nn.Module) -> None:
    """Raise the TypeError :meth:`SyncBatchNorm.convert_sync_batchnorm` would raise for a layer
    it refuses, before anything changes (activated layers pass: they are split first)."""
    for path, module in model.named_modules():
        cls = type(module)
        family = family_of(cls)
        if cls is SyncBatchNorm or activated_family(module) is not None:
            continue
        if family is not None and family.sync is not None and cls in (family.ours, family.torch):
            continue
        if family is not None and cls in family.variants:
            raise TypeError(
                f"convert_sync_batchnorm(): cannot convert {_path_text(path)} of type "
                f"{_type_text(cls)}: it normalizes otherwise in training (ghost batches or "
                "batch renormalization) and has no synchronized form. Keep it per process, or "
                "make it a plain BatchNorm first with batchnorm.convert(model, to='torch') "
                "(training then uses whole-batch statistics)."
            )
        if is_batchnorm_like(module):
            raise TypeError(
                f"convert_sync_batchnorm(): cannot convert {_path_text(path)} of type "
                f"{_type_text(cls)}: only torch.nn.BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm, "
                "batchnorm.BatchNorm1d/2d/3d and activated layers (BatchNormAct*d, "
                "InPlaceABN*d) are converted, and converting a subclass would drop its "
                "behaviour. Replace it yourself or convert its base class."
            )


def revert_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every :class:`batchnorm.SyncBatchNorm` of ``model`` back into a per-process layer.

    A layer converted by :func:`convert_sync_batchnorm` gets its original class back (same
    module and Parameter objects, as for the conversion). A layer *built* as
    :class:`batchnorm.SyncBatchNorm` has no original class; it becomes the
    ``batchnorm.BatchNorm1d``, ``2d`` or ``3d`` that accepts the rank of the last input it
    processed (2-D or 3-D input: ``BatchNorm1d``). Turned into one of torch's classes, a layer
    loses this package's ``nonfinite`` policy and skip counter; turned into anything but
    ``torch.nn.SyncBatchNorm``, it loses ``process_group``. The ``torch.nn.Sequential`` that
    :func:`convert_sync_batchnorm` made of an activated layer becomes that activated layer
    again (the same module object; see the module docstring).

    Args:
        model: Any module; the root may itself be a :class:`batchnorm.SyncBatchNorm`.

    Returns:
        ``model`` itself, reverted in place, for chaining; the activated layer when ``model``
        itself is such a Sequential.

    Raises:
        TypeError: ``model`` is not a module; or it holds a SyncBatchNorm built as such that
            has not processed an input yet (or only inputs of rank 6 or more), so its
            BatchNorm class is unknown (run one forward pass, or replace it yourself); or a
            subclass of :class:`batchnorm.SyncBatchNorm`. The whole tree is checked first, so
            then nothing is reverted.
    """
    _check_model("revert_sync_batchnorm()", model)
    plan: list[tuple[torch.nn.Module, type[torch.nn.Module]]] = []
    for path, module in model.named_modules():
        if not isinstance(module, SyncBatchNorm):
            continue
        if type(module) is not SyncBatchNorm:
            raise TypeError(
                f"revert_sync_batchnorm(): cannot revert {_path_text(path)} of type "
                f"{_type_text(type(module))}, a subclass of SyncBatchNorm: reverting it would "
                "drop its behaviour. Replace it yourself."
            )
        target = module.__dict__.get(ORIGINAL_CLASS)
        rank = last_input_rank(module)
        by_rank = None if rank is None else family_for_rank(rank)
        if target is None and by_rank is not None:
            target = by_rank.ours
        if target is None:
            raise TypeError(
                f"revert_sync_batchnorm(): cannot revert {_path_text(path)}, a SyncBatchNorm "
                "built as such: expected it to have processed an input of rank 2 to 5, which "
                "decides between BatchNorm1d, 2d and 3d, got "
                + (
                    "no input yet. Run one forward pass first, or replace it yourself."
                    if rank is None
                    else f"{rank}-D input. Replace it yourself."
                )
            )
        plan.append((module, target))
    for module, target in plan:
        module.__dict__.pop(ORIGINAL_CLASS, None)
        forget_sync_state(module)
        if target is not torch.nn.SyncBatchNorm:
            module.__dict__.pop("process_group", None)
        if (family := family_of(target)) is None or target is not family.ours:
            module.__dict__.pop("nonfinite", None)
            module.__dict__.pop("nonfinite_batches_skipped", None)
        module.__class__ = target
    return join_all(model)
