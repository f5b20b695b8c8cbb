"""The one table of BatchNorm families: each kind of layer, its input ranks and its twins.

A *family* is one kind of BatchNorm layer in its several implementations: this package's class,
torch.nn's, the frozen one (:mod:`batchnorm.frozen`), the synchronized one
(:class:`batchnorm.SyncBatchNorm`) and a lazy one (torch.nn's ``LazyBatchNorm*d``; ours is a
slot for now). A family also lists its *variants* (:mod:`batchnorm.variants`: ghost batches,
batch renormalization): layers that train differently but whose evaluation transform, state and
torch.nn twin are the family's, so the tools treat them as the family's layers (``convert``
turns one into the torch.nn class, with a warning). And it lists its *activated* layers
(:mod:`batchnorm.activated`'s ``BatchNormAct*d``, and any other layer that applies an activation
to the family's output): the family's BatchNorm followed by a pointwise activation, with the
family's state. They are kept out of :meth:`Family.members`, so that no tool mistakes one for a
plain BatchNorm and drops its activation; the tools look them up with :func:`activated_family_of`
and keep the activation (see :func:`add_activated`). Every piece of code that changes or
recognizes layers reads this table: :func:`batchnorm.convert`,
:func:`batchnorm.convert_sync_batchnorm` and its reverse, :func:`batchnorm.freeze`,
:func:`batchnorm.fold`, :func:`batchnorm.recompute_statistics`.

The table is filled where the classes are defined: each layer module registers its family
(:func:`register`), its twin of a family (:func:`add_twin`), its variant of a family
(:func:`add_variant`) or its activated class (:func:`add_activated`) once, right after the
class, so a new variant is added in one place and this module imports no layer. It is complete
once :mod:`batchnorm.modules`, :mod:`batchnorm.frozen`, :mod:`batchnorm.distributed`,
:mod:`batchnorm.variants`, :mod:`batchnorm.activated` and :mod:`batchnorm.inplace` are
imported, which every reader of it does (:mod:`batchnorm.tools` imports them); the tools look
activated classes up when they run, so one registered by a module imported later is known to
them too.

Lookups are by exact class: a user's subclass of a BatchNorm class is not a member (converting
it would drop its behaviour) and the tools refuse it by name.

Example:
    >>> import torch
    >>> import batchnorm.tools  # the tools import every layer module
    >>> from batchnorm.families import family_of
    >>> family = family_of(torch.nn.BatchNorm2d)
    >>> family.name, family.ranks, family.ours.__module__, family.frozen.__name__
    ('BatchNorm2d', (4,), 'batchnorm.modules', 'FrozenBatchNorm2d')
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.nn import Module

__all__ = [
    "Family",
    "activated_family_of",
    "add_activated",
    "add_twin",
    "add_variant",
    "families",
    "family_for_rank",
    "family_of",
    "is_batchnorm_like",
    "known_family",
    "register",
    "stock_forwards",
]


@dataclasses.dataclass(frozen=True)
class Family:
    """One kind of BatchNorm layer and its twins.

    Attributes:
        name: The torch.nn class name, e.g. ``"BatchNorm2d"``.
        ranks: The input ranks a layer of the family accepts; ``None`` for any rank >= 2.
        ours: This package's class.
        torch: torch.nn's class.
        frozen: The frozen twin (fixed statistics), or ``None`` where the input rank is not
            fixed (a frozen layer must know its rank).
        sync: The synchronized twin (statistics over a process group), or ``None``.
        torch_lazy: torch.nn's lazy twin (``num_features`` inferred on the first call), or
            ``None``.
        lazy: This package's lazy twin, or ``None`` (a slot: none exists yet).
        variants: This package's classes that normalize otherwise in training (ghost batches,
            batch renormalization) but are the family's layers in evaluation: same evaluation
            transform, parameters, buffers and ``state_dict``; ``()`` if none.
        activated: The classes whose layers compute ``ours`` followed by a pointwise activation
            (:func:`add_activated`); ``()`` if none. Not members: see :meth:`members`.
    """

    name: str
    ranks: tuple[int, ...] | None
    ours: type[Module]
    torch: type[Module]
    frozen: type[Module] | None = None
    sync: type[Module] | None = None
    torch_lazy: type[Module] | None = None
    lazy: type[Module] | None = None
    variants: tuple[type[Module], ...] = ()
    activated: tuple[type[Module], ...] = ()

    def members(self) -> tuple[type[Module], ...]:
        """Every class of the family, ``None`` slots left out, variants included.

        The activated classes are not members: a member is a layer that computes the family's
        BatchNorm and nothing else (:func:`stock_forwards`, :func:`batchnorm.fold` and the
        conversions rely on it), and treating an activated layer so would drop its activation.
        """
        classes = (self.ours, self.torch, self.frozen, self.torch_lazy, self.lazy, *self.variants)
        return tuple(cls for cls in classes if cls is not None)


# name -> family, in registration order; written only by register, add_twin, add_variant and
# add_activated, at import time.
_TABLE: dict[str, Family] = {}
_TWINS = ("frozen", "sync", "lazy")


def register(family: Family) -> None:
    """Add a family to the table (once, where its classes are defined).

    Raises:
        ValueError: A family of that name is registered already, or one of its classes
            belongs to another family.
    """
    if family.name in _TABLE:
        raise ValueError(f"register(): expected a new family, got {family.name!r} again.")
    taken = {cls for other in _TABLE.values() for cls in (*other.members(), *other.activated)}
    classes = (*family.members(), *family.activated)
    clashing = [f"{cls.__module__}.{cls.__qualname__}" for cls in classes if cls in taken]
    if clashing:
        raise ValueError(
            f"register(): expected classes of no other family, got {clashing} in {family.name!r}."
        )
    _TABLE[family.name] = family


def add_twin(name: str, **twins: type[torch.nn.Module]) -> None:
    """Fill twin slots (``frozen``, ``sync``, ``lazy``) of a registered family.

    Raises:
        ValueError: No family ``name``, an unknown slot, or a slot already filled with another
            class.
    """
    if name not in _TABLE:
        raise ValueError(f"add_twin(): expected a registered family, got {name!r}.")
    unknown = sorted(set(twins) - set(_TWINS))
    if unknown:
        raise ValueError(f"add_twin(): expected slots among {_TWINS}, got {unknown}.")
    family = _TABLE[name]
    for slot, cls in twins.items():
        if getattr(family, slot) not in (None, cls):
            raise ValueError(f"add_twin(): {name!r} has a {slot} twin already.")
    slots: dict[str, Any] = dict(twins)  # checked against _TWINS above
    _TABLE[name] = dataclasses.replace(family, **slots)


def add_variant(name: str, cls: type[torch.nn.Module]) -> None:
    """Add a variant class to a registered family (once, where the class is defined).

    Raises:
        ValueError: No family ``name``, or ``cls`` belongs to a family already.
    """
    if name not in _TABLE:
        raise ValueError(f"add_variant(): expected a registered family, got {name!r}.")
    owner = family_of(cls) or activated_family_of(cls)
    if owner is not None:
        raise ValueError(
            f"add_variant(): expected a class of no family, got "
            f"{cls.__module__}.{cls.__qualname__} of {owner.name!r}."
        )
    family = _TABLE[name]
    _TABLE[name] = dataclasses.replace(family, variants=(*family.variants, cls))


def add_activated(name: str, cls: type[torch.nn.Module]) -> None:
    """Add an activated class to a registered family (once, where the class is defined).

    What the tools assume of ``cls`` (they rely on nothing else): it subclasses the family's
    ``ours`` class and adds no instance state but the attributes ``activation`` (a name of
    :data:`batchnorm.activations.ACTIVATIONS`) and ``activation_param``; and a layer of it
    computes, in every mode, exactly what the same layer switched to ``ours`` computes, followed
    by ``activations.activation_module(activation, activation_param)``, updating the running
    statistics as ``ours`` does. That is what lets the tools switch such a layer to ``ours``
    and back in place (``layer.__class__``), with the same Parameter and buffer objects, and
    put the activation module after it where they need a plain BatchNorm
    (:func:`batchnorm.convert` to torch.nn, :func:`batchnorm.convert_sync_batchnorm`,
    :func:`batchnorm.freeze`, :func:`batchnorm.fold`). Whether a layer overwrites its input (an
    in-place layer) does not matter to them: the tools that read a layer's input read it before
    the forward.

    Example:
        One line per class, at the bottom of the module that defines it:
        ``add_activated("BatchNorm2d", BatchNormAct2d)``.

    Raises:
        ValueError: No family ``name``, ``cls`` does not subclass its ``ours`` class, or
            ``cls`` belongs to a family already.
    """
    if name not in _TABLE:
        raise ValueError(f"add_activated(): expected a registered family, got {name!r}.")
    family = _TABLE[name]
    text = f"{cls.__module__}.{cls.__qualname__}"
    if not (isinstance(cls, type) and issubclass(cls, family.ours)):
        raise ValueError(
            f"add_activated(): expected a subclass of {family.ours.__qualname__}, got {text}."
        )
    owner = family_of(cls) or activated_family_of(cls)
    if owner is not None:
        raise ValueError(
            f"add_activated(): expected a class of no family, got {text} of {owner.name!r}."
        )
    _TABLE[name] = dataclasses.replace(family, activated=(*family.activated, cls))


def families() -> tuple[Family, ...]:
    """The registered families, in registration order."""
    return tuple(_TABLE.values())


def family_of(cls: type) -> Family | None:
    """The family ``cls`` belongs to (exact class, not a subclass), or ``None``."""
    for family in _TABLE.values():
        if cls in family.members():
            return family
    return None


def known_family(cls: type) -> Family:
    """The family of a class known to have one: a member (:func:`family_of`) or an activated
    class (:func:`activated_family_of`).

    Raises:
        LookupError: ``cls`` belongs to no registered family.
    """
    family = family_of(cls) or activated_family_of(cls)
    if family is None:
        raise LookupError(f"{cls.__qualname__} belongs to no registered BatchNorm family.")
    return family


def activated_family_of(cls: type) -> Family | None:
    """The family whose activated class ``cls`` is (exact class, not a subclass), or ``None``."""
    for family in _TABLE.values():
        if cls in family.activated:
            return family
    return None


def family_for_rank(rank: int) -> Family | None:
    """The fixed-rank family whose layers take inputs of this rank (2 to 5), or ``None``.

    Ranks 2 and 3 are both BatchNorm1d's (a 3-D input is ``(N, C, L)``).
    """
    for family in _TABLE.values():
        if family.ranks is not None and rank in family.ranks:
            return family
    return None


def is_batchnorm_like(module: torch.nn.Module) -> bool:
    """Whether ``module`` has BatchNorm's running-statistics machinery (and is not an
    instance norm, which shares torch's base class but is a different operation)."""
    return isinstance(module, torch.nn.modules.batchnorm._NormBase) and not isinstance(
        module, torch.nn.modules.instancenorm._InstanceNorm
    )


def stock_forwards() -> frozenset:
    """The ``forward`` functions of every family member and of torch's base class.

    A layer whose class's ``forward`` is one of these computes plain batch norm (training or
    evaluation transform) and nothing else; a subclass with its own ``forward`` may do more
    (timm's BatchNormAct2d applies an activation).
    """
    classes = {cls for family in _TABLE.values() for cls in family.members()}
    return frozenset(
        {torch.nn.modules.batchnorm._BatchNorm.forward} | {cls.forward for cls in classes}
    )
