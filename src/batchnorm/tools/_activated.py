"""Activated layers (BatchNorm + activation) for the tools that work on plain BatchNorm layers.

An activated layer (``batchnorm.BatchNormAct2d``; any class registered with
:func:`batchnorm.families.add_activated`) is its family's BatchNorm followed by an activation,
with the BatchNorm's state. A tool that needs a plain BatchNorm (conversion to torch.nn's class
or to SyncBatchNorm, freezing) *splits* it: the layer becomes its family's plain class in place
(the same module, Parameter and buffer objects) and takes a ``torch.nn.Sequential(layer,
activation)`` slot in the model, which computes the same values. The Sequential remembers the
activated class, and the reverse tool (``convert`` back to ours, ``revert_sync_batchnorm``,
``unfreeze``) *joins* it back into one activated layer, the plain layer switched back in place.

Hooks: the forward and backward hooks of a split layer move to the Sequential, which sees the
same input and output (their ``module`` argument is then the Sequential), and back on joining.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

from ..activations import activation_from_module, activation_module, get_activation
from ..families import Family, activated_family_of, known_family

if TYPE_CHECKING:
    from ..activated import BatchNormActBase

__all__ = [
    "UNFUSED",
    "activated_family",
    "apply_activation",
    "has_call_hooks",
    "join_all",
    "make_activated",
    "replace_modules",
    "split",
    "wrap",
]

#: Instance attribute of a Sequential made by :func:`split` or :func:`wrap`:
#: ``(activated class, activation name, activation_param)``, what :func:`join_all` rebuilds.
UNFUSED = "_batchnorm_unfused"

#: The per-module hook dicts that run when the module is called (forward and backward), with
#: the attributes torch keeps beside them. Moved together, so a hook's RemovableHandle (which
#: holds the dicts themselves) still removes it.
_CALL_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
)


def activated_family(module: torch.nn.Module) -> Family | None:
    """The family of which ``module`` is an activated layer (by exact class), or ``None``."""
    return activated_family_of(type(module))


def has_call_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own (pre-hooks included)."""
    return any(
        getattr(module, name, None) for name in _CALL_HOOKS if name != "_is_full_backward_hook"
    )


def apply_activation(layer: BatchNormActBase, output: torch.Tensor) -> torch.Tensor:
    """``layer``'s activation applied to ``output`` (out of place, in torch ops)."""
    spec = get_activation(type(layer).__name__, layer.activation)
    return spec.forward(output, layer.activation_param)


def make_activated(
    layer: torch.nn.Module, cls: type, activation: str, param: float | None
) -> torch.nn.Module:
    """Switch a plain BatchNorm ``layer`` to the activated class ``cls``, in place."""
    layer.__class__ = cls
    activated = cast("BatchNormActBase", layer)  # what it is now that its class is set
    activated.activation = activation
    activated.activation_param = param
    return activated


def _swap_call_hooks(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for name in _CALL_HOOKS:
        if name in a.__dict__ and name in b.__dict__:
            a.__dict__[name], b.__dict__[name] = b.__dict__[name], a.__dict__[name]


def wrap(inner: torch.nn.Module, activated: BatchNormActBase) -> torch.nn.Sequential:
    """``Sequential(inner, activation)`` standing for the activated layer ``activated``,
    marked for :func:`join_all`, in ``activated``'s training mode."""
    act = activation_module(activated.activation, activated.activation_param)
    sequential = torch.nn.Sequential(inner, act)
    sequential.__dict__[UNFUSED] = (
        type(activated),
        activated.activation,
        activated.activation_param,
    )
    sequential.training = act.training = activated.training
    return sequential


def split(layer: BatchNormActBase) -> torch.nn.Sequential:
    """Turn the activated ``layer`` into its family's plain class in place, and return the
    ``Sequential(layer, activation)`` to put in its slot (its hooks moved there)."""
    family = known_family(type(layer))
    sequential = wrap(layer, layer)
    layer.__dict__.pop("activation", None)
    layer.__dict__.pop("activation_param", None)
    plain: torch.nn.Module = layer
    plain.__class__ = family.ours
    _swap_call_hooks(layer, sequential)
    return sequential


def _joined(sequential: torch.nn.Module) -> tuple[torch.nn.Module, tuple] | None:
    """``(plain layer, marker)`` when ``sequential`` is a marked Sequential that joins back
    exactly: its plain layer of the activated class's family, without hooks of its own, then
    the recorded activation as a torch.nn module without hooks; else ``None``."""
    marker = sequential.__dict__.get(UNFUSED)
    if marker is None or type(sequential) is not torch.nn.Sequential:
        return None
    cls, name, param = marker
    family = activated_family_of(cls)
    children = list(sequential._modules.values())
    if family is None or len(children) != 2:
        return None
    layer, act = children
    if type(layer) is not family.ours or has_call_hooks(layer) or has_call_hooks(act):
        return None
    if activation_from_module(act) != (name, param):
        return None
    return layer, marker


def join_all(model: torch.nn.Module) -> torch.nn.Module:
    """Join every marked Sequential of ``model`` that joins exactly (see :func:`_joined`) back
    into its activated layer, in place; return the new root (``model`` unless it was one)."""
    new_for = {}
    for module in model.modules():
        joined = _joined(module)
        if joined is None:
            continue
        (layer, (cls, name, param)) = joined
        make_activated(layer, cls, name, param)
        _swap_call_hooks(layer, module)
        new_for[id(module)] = layer
    return replace_modules(model, new_for)


def replace_modules(model: torch.nn.Module, new_for: dict[int, torch.nn.Module]) -> torch.nn.Module:
    """Put ``new_for[id(old)]`` wherever ``old`` is a child, and return the new root.

    Every (parent, name) slot is visited, so a module registered under two names (shared)
    becomes one new module registered under both, as before.
    """
    if not new_for:
        return model
    slots = [
        (parent, name, new_for[id(child)])
        for parent in model.modules()
        # _modules, not named_children(), which reports a child registered twice only once.
        for name, child in list(parent._modules.items())
        if child is not None and id(child) in new_for
    ]
    for parent, name, new in slots:
        setattr(parent, name, new)
    return new_for.get(id(model), model)
