"""Freeze the BatchNorm layers of a model into fixed affine maps, and unfreeze them again.

:func:`freeze` replaces every BatchNorm layer by the frozen layer of the same rank
(:mod:`batchnorm.frozen`), which computes the layer's evaluation-mode output in every mode and
never updates its statistics; :func:`unfreeze` turns frozen layers back into the BatchNorm class
they came from. Unlike :func:`batchnorm.convert`, which only changes a layer's class, these
build new modules, because the frozen layers have different parameters (none, by default).
Both check the whole model before changing anything: a refused model is left as it was.

What a new module does not inherit from the one it replaces: hooks (forward, backward and
state_dict hooks registered on that layer), parametrizations, and references held outside the
model tree (an optimizer's parameter list, a plain Python list of layers, a closure). Register
hooks again, and build the optimizer again, after converting.

Activated layers (``batchnorm.BatchNormAct*d`` and the family table's other activated classes)
keep their activation: a frozen one is ``torch.nn.Sequential(frozen layer, activation module)``
in the layer's slot (``state_dict`` keys ``bn.weight`` become ``bn.0.weight``), which
:func:`unfreeze` turns back into one activated layer.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..activated import BatchNormActBase
from ..families import activated_family_of, families, family_of, is_batchnorm_like, known_family
from ..frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, FrozenOrigin
from ..modules import BatchNormBase
from ..variants import BatchRenormBase, GhostBatchNormBase
from ._activated import activated_family, join_all, replace_modules, wrap

__all__ = ["freeze", "unfreeze"]


def _frozen_classes() -> tuple[type[torch.nn.Module], ...]:
    return tuple(family.frozen for family in families() if family.frozen is not None)


def _frozen_twin(cls: type) -> type | None:
    """The frozen class ``cls`` freezes into: a family's own, torch.nn's, a variant's or an
    activated class."""
    family = family_of(cls)
    if family is None:
        family = activated_family_of(cls)
        return None if family is None else family.frozen
    if family.frozen is None:
        return None
    if cls not in (family.ours, family.torch, *family.variants):
        return None
    return family.frozen


_KNOWN_BN = "torch.nn.BatchNorm1d/2d/3d or batchnorm.BatchNorm1d/2d/3d"


def _path_text(path: str) -> str:
    return repr(path) if path else "the root module"


def _type_text(module: torch.nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_freezable(path: str, module: torch.nn.Module) -> None:
    # Families whose layers take inputs of any rank (SyncBatchNorm): no frozen class fits them.
    any_rank = [family for family in families() if family.ranks is None]
    if any(isinstance(module, family.ours) for family in any_rank):
        raise TypeError(
            f"freeze(): expected {_KNOWN_BN} layers, got {_path_text(path)} of type "
            f"{_type_text(module)}, whose input rank is not fixed. Call "
            "batchnorm.revert_sync_batchnorm(model) first (a frozen layer needs no "
            "synchronisation: it uses no batch statistics)."
        )
    if any(isinstance(module, family.torch) for family in any_rank):
        # SyncBatchNorm accepts inputs of any rank >= 2, so which frozen class (which rank
        # check) it should become is unknown until it has seen an input; guessing would give a
        # layer that rejects the model's real inputs.
        raise TypeError(
            f"freeze(): expected {_KNOWN_BN} layers, got {_path_text(path)} of type "
            f"{_type_text(module)}, whose input rank is not fixed. Replace it with the "
            "BatchNorm1d/2d/3d of its input's rank first (a frozen layer needs no "
            "synchronisation: it uses no batch statistics)."
        )
    if _frozen_twin(type(module)) is None:
        raise TypeError(
            f"freeze(): expected {_KNOWN_BN} layers, got {_path_text(path)} of type "
            f"{_type_text(module)}. Freezing a subclass would drop its behaviour; replace it "
            "yourself or freeze its base class."
        )
    if not module.track_running_stats or module.running_mean is None or module.running_var is None:
        raise ValueError(
            f"freeze(): expected BatchNorm layers with running statistics, got "
            f"{_path_text(path)} ({type(module).__name__}) with "
            f"track_running_stats={module.track_running_stats}, running_mean "
            f"{'None' if module.running_mean is None else 'present'}. It normalizes with "
            "batch statistics in every mode, so there are no statistics to freeze; give it "
            "running statistics (e.g. with batchnorm's population tools) or leave it out."
        )


def _frozen_from(module: _BatchNorm, trainable_affine: bool) -> torch.nn.Module:
    """A frozen layer with ``module``'s values, dtypes, devices and training flag."""
    reference, running_var = module.running_mean, module.running_var
    twin = _frozen_twin(type(module))
    # _check_freezable ran first: a frozen twin and both statistics exist.
    assert twin is not None and reference is not None and running_var is not None
    frozen = twin(
        module.num_features,
        module.eps,
        module.affine,
        # A layer without affine parameters has nothing to train: it freezes as affine=False.
        trainable_affine=trainable_affine and module.affine,
        bias=module.bias is not None,
        device=reference.device,
        dtype=reference.dtype,
    )
    assert isinstance(frozen, (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d))
    # Fresh copies of the tensors, never the originals: a reference to the old layer kept
    # elsewhere (a stale optimizer holding its parameters, say) must not be able to write into
    # the frozen statistics.
    frozen.running_mean = reference.detach().clone()
    frozen.running_var = running_var.detach().clone()
    if module.num_batches_tracked is not None:
        frozen.num_batches_tracked = module.num_batches_tracked.detach().clone()
    for name in ("weight", "bias"):
        value = getattr(module, name)
        if value is None:
            continue
        if frozen.trainable_affine:
            # Still trained: the very same Parameter, so an optimizer built before freeze()
            # keeps updating it (and keeps its per-parameter state, e.g. momentum).
            setattr(frozen, name, value)
        else:
            setattr(frozen, name, value.detach().clone())
    # Our layers' non-finite policy (torch's have none); back to the class default if unset.
    # A variant (batchnorm.variants) is rebuilt with its own extra arguments; an activated
    # layer as its family's plain class, in a Sequential with its activation module.
    origin: Callable[..., torch.nn.Module] = type(module)
    if activated_family(module) is not None:
        origin = known_family(type(module)).ours
    elif type(module) in known_family(type(module)).variants:
        assert isinstance(module, (GhostBatchNormBase, BatchRenormBase))
        origin = functools.partial(type(module), **module.variant_arguments())
    frozen.frozen_from = FrozenOrigin(origin, module.momentum, getattr(module, "nonfinite", None))
    frozen.training = module.training
    if activated_family(module) is not None:
        assert isinstance(module, BatchNormActBase)
        return wrap(frozen, module)
    return frozen


def _unfrozen_from(
    frozen: FrozenBatchNorm1d | FrozenBatchNorm2d | FrozenBatchNorm3d,
) -> torch.nn.Module:
    """The BatchNorm layer ``frozen`` came from, with its current values."""
    reference = frozen.running_mean
    # A frozen layer built directly becomes this package's BatchNorm of its rank.
    origin = frozen.frozen_from or FrozenOrigin(known_family(type(frozen)).ours, 0.1, None)
    module = origin.cls(
        frozen.num_features,
        eps=frozen.eps,
        momentum=origin.momentum,
        affine=frozen.affine,
        track_running_stats=True,
        device=reference.device,
        dtype=reference.dtype,
        bias=frozen.bias is not None,
    )
    assert isinstance(module, _BatchNorm)  # origin.cls is a BatchNorm class (or one bound)
    nonfinite = origin.nonfinite
    # Only this package's layers have the policy (never None there); torch.nn's have none.
    if (
        nonfinite is not None
        and isinstance(module, BatchNormBase)
        and module.nonfinite != nonfinite
    ):
        module.nonfinite = nonfinite
    module.running_mean = frozen.running_mean.detach().clone()
    module.running_var = frozen.running_var.detach().clone()
    counter = frozen.num_batches_tracked
    module.num_batches_tracked = None if counter is None else counter.detach().clone()
    for name in ("weight", "bias"):
        value = getattr(frozen, name)
        if value is None:
            continue
        if isinstance(value, torch.nn.Parameter):
            setattr(module, name, value)  # trained while frozen: keep the optimizer's object
        else:
            setattr(module, name, torch.nn.Parameter(value.detach().clone()))
    module.training = frozen.training
    return module


def _check_model(where: str, model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}: expected a torch.nn.Module, got {type(model).__name__}.")


def freeze(model: torch.nn.Module, *, trainable_affine: bool = False) -> torch.nn.Module:
    r"""Replace every BatchNorm layer of ``model`` by its frozen counterpart, in place.

    Each ``torch.nn.BatchNorm{1,2,3}d`` and ``batchnorm.BatchNorm{1,2,3}d`` becomes
    :class:`~batchnorm.frozen.FrozenBatchNorm1d`/``2d``/``3d``, which computes, in training and
    evaluation mode alike, the layer's evaluation-mode output

    .. math::
        y = x \cdot \mathrm{scale} + \mathrm{shift}, \qquad
        \mathrm{scale} = \frac{\mathrm{weight}}{\sqrt{\mathrm{running\_var} + \epsilon}},
        \quad \mathrm{shift} = \mathrm{bias} - \mathrm{running\_mean} \cdot \mathrm{scale}

    and never changes ``running_mean``, ``running_var`` or ``num_batches_tracked``. Copied
    from each layer: ``eps``, ``affine`` (and whether it has a ``bias``), the values of
    ``running_mean``, ``running_var``, ``num_batches_tracked``, ``weight`` and ``bias``, their
    devices and dtypes, and the training flag. Its class and ``momentum`` are remembered on the
    frozen layer for :func:`unfreeze`. Frozen layers already in the model are left as they are
    (also with another ``trainable_affine``). An activated layer (``batchnorm.BatchNormAct2d``)
    becomes ``torch.nn.Sequential(FrozenBatchNorm2d, activation module)``, which applies the
    activation after the frozen map (see the module docstring).

    With ``trainable_affine=False`` ``weight`` and ``bias`` become buffers (copies): the model
    loses those parameters. With ``trainable_affine=True`` they stay the same Parameter
    objects, so an optimizer built before the call keeps training them, while the statistics
    stay fixed whatever ``.train()``/``.eval()`` is called on the model (see
    :mod:`batchnorm.frozen` for why ``bn.eval()`` alone does not last). Layers with
    ``affine=False`` have nothing to train and are frozen as such.

    Not carried over to the new layers: hooks registered on the old ones, and references to
    them held outside the model (see the module docstring).

    Args:
        model: Any module; the root may itself be a BatchNorm layer.
        trainable_affine: Keep ``weight`` and ``bias`` trainable Parameters.

    Returns:
        The model. It is ``model`` itself, converted in place, unless ``model`` is a BatchNorm
        layer: a module cannot replace itself in place, so then the new frozen layer is
        returned. Always use the return value: ``model = freeze(model)``.

    Raises:
        TypeError: ``model`` is not a module, or holds a BatchNorm-like layer whose class is
            not one of the six above (a user subclass, ``torch.nn.SyncBatchNorm``, whose input
            rank is not fixed, an uninitialized lazy layer).
        ValueError: A BatchNorm layer has no running statistics (``track_running_stats=False``);
            the message names its path. The whole model is checked before anything changes:
            after either error nothing was converted.

    Warns:
        UserWarning: ``model`` has no BatchNorm layer (and no frozen one); it is returned
            unchanged.

    Example:
        >>> import torch
        >>> from batchnorm.tools.freeze import freeze, unfreeze
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> net = freeze(net)
        >>> net[1]
        FrozenBatchNorm2d(4, eps=1e-05, affine=True, bias=True, trainable_affine=False)
        >>> [name for name, _ in net.named_parameters()]
        ['0.weight', '0.bias']
        >>> type(unfreeze(net)[1]) is torch.nn.BatchNorm2d
        True
        >>> bn = freeze(torch.nn.BatchNorm1d(3), trainable_affine=True)  # a root is replaced
        >>> type(bn).__name__, [name for name, _ in bn.named_parameters()]
        ('FrozenBatchNorm1d', ['weight', 'bias'])
    """
    _check_model("freeze()", model)
    if not isinstance(trainable_affine, bool):
        raise TypeError(
            f"freeze(): expected trainable_affine to be a bool, got {trainable_affine!r}."
        )
    layers = []
    already_frozen = False
    for path, module in model.named_modules():
        if isinstance(module, _frozen_classes()):
            already_frozen = True
        elif is_batchnorm_like(module):
            _check_freezable(path, module)
            layers.append(module)
    if not layers:
        if not already_frozen:
            warnings.warn(
                f"freeze(): expected a model with BatchNorm layers, got {_type_text(model)} "
                "with none; it is returned unchanged.",
                UserWarning,
                stacklevel=2,
            )
        return model
    # Every new layer is built before the first one goes in, so that an error while building
    # (there should be none after the checks) cannot leave the model half converted.
    new_for = {id(module): _frozen_from(module, trainable_affine) for module in layers}
    return replace_modules(model, new_for)


def unfreeze(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every frozen layer of ``model`` back into a trainable BatchNorm layer, in place.

    Each :class:`~batchnorm.frozen.FrozenBatchNorm1d`/``2d``/``3d`` becomes the class it was
    frozen from by :func:`freeze` (``torch.nn.BatchNorm2d`` stays torch's,
    ``batchnorm.BatchNorm2d`` stays ours) with the ``momentum`` it had; a frozen layer built
    directly becomes ``batchnorm.BatchNorm{1,2,3}d`` with ``momentum=0.1``. The new layer has
    ``track_running_stats=True``, the frozen layer's ``eps``, ``affine``/``bias``, the values,
    devices and dtypes of its statistics, ``num_batches_tracked``, ``weight`` and ``bias``, and
    its training flag; in training mode it normalizes with batch statistics and updates the
    running ones again.

    A ``Sequential(frozen layer, activation module)`` made by :func:`freeze` from an activated
    layer becomes that activated layer again (if it still holds exactly those two modules).

    ``weight`` and ``bias`` become Parameters again. If the frozen layer had
    ``trainable_affine=True`` they are the very same Parameter objects (an optimizer keeps
    working); otherwise they are new Parameters, and an optimizer must be built (again) to
    train them. Hooks registered on the frozen layers are not carried over.

    Args:
        model: Any module; the root may itself be a frozen layer.

    Returns:
        The model: ``model`` itself, converted in place, unless ``model`` is a frozen layer,
        in which case the new BatchNorm layer is returned. Use the return value.

    Raises:
        TypeError: ``model`` is not a module, or holds a subclass of a frozen class (turning it
            back would drop its behaviour). Nothing is converted then.

    Warns:
        UserWarning: ``model`` has no frozen layer; it is returned unchanged.

    Example:
        >>> import torch
        >>> from batchnorm.tools.freeze import freeze, unfreeze
        >>> bn = torch.nn.BatchNorm1d(3, momentum=0.01)
        >>> bn = unfreeze(freeze(bn))
        >>> type(bn) is torch.nn.BatchNorm1d, bn.momentum, bn.weight.requires_grad
        (True, 0.01, True)
    """
    _check_model("unfreeze()", model)
    layers = []
    for path, module in model.named_modules():
        if type(module) in _frozen_classes():
            layers.append(module)
        elif isinstance(module, _frozen_classes()):
            raise TypeError(
                f"unfreeze(): expected batchnorm.frozen.FrozenBatchNorm1d/2d/3d layers, got "
                f"{_path_text(path)} of type {_type_text(module)}. Unfreezing a subclass "
                "would drop its behaviour; replace it yourself."
            )
    if not layers:
        warnings.warn(
            f"unfreeze(): expected a model with frozen BatchNorm layers, got "
            f"{_type_text(model)} with none; it is returned unchanged.",
            UserWarning,
            stacklevel=2,
        )
        return model
    new_for = {id(module): _unfrozen_from(module) for module in layers}
    # A frozen activated layer is a Sequential(frozen layer, activation): now plain again, the
    # pair becomes one activated layer.
    return join_all(replace_modules(model, new_for))
