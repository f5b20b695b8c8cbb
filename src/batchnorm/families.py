"""The one table of BatchNorm families: each kind of layer, its input ranks and its twins.

A *family* is one kind of BatchNorm layer in its several implementations: this package's class,
torch.nn's, the frozen one (:mod:`batchnorm.frozen`), the synchronized one
(:class:`batchnorm.SyncBatchNorm`) and a lazy one (torch.nn's ``LazyBatchNorm*d``; ours is a
slot for now). A family also lists its *variants* (:mod:`batchnorm.variants`: ghost batches,
batch renormalization): layers that train differently but whose evaluation transform, state and
torch.nn twin are the family's, so the tools treat them as the family's layers (``convert``
turns one into the torch.nn class, with a warning). Every piece of code that changes or
recognizes layers reads this table: :func:`batchnorm.convert`,
:func:`batchnorm.convert_sync_batchnorm` and its reverse, :func:`batchnorm.freeze`,
:func:`batchnorm.fold`, :func:`batchnorm.recompute_statistics`.

The table is filled where the classes are defined: each layer module registers its family
(:func:`register`), its twin of a family (:func:`add_twin`) or its variant of a family
(:func:`add_variant`) once, right after the class, so a new variant is added in one place and
this module imports no layer. It is complete once :mod:`batchnorm.modules`,
:mod:`batchnorm.frozen`, :mod:`batchnorm.distributed` and :mod:`batchnorm.variants` are
imported, which every reader of it does.

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

import torch

__all__ = [
    "Family",
    "add_twin",
    "add_variant",
    "families",
    "family_for_rank",
    "family_of",
    "is_batchnorm_like",
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
    """

    name: str
    ranks: tuple[int, ...] | None
    ours: type[torch.nn.Module]
    torch: type[torch.nn.Module]
    frozen: type[torch.nn.Module] | None = None
    sync: type[torch.nn.Module] | None = None
    torch_lazy: type[torch.nn.Module] | None = None
    lazy: type[torch.nn.Module] | None = None
    variants: tuple[type[torch.nn.Module], ...] = ()

    def members(self) -> tuple[type[torch.nn.Module], ...]:
        """Every class of the family, ``None`` slots left out, variants included."""
        classes = (self.ours, self.torch, self.frozen, self.torch_lazy, self.lazy, *self.variants)
        return tuple(cls for cls in classes if cls is not None)


# name -> family, in registration order; written only by register/add_twin at import time.
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
    taken = {cls for other in _TABLE.values() for cls in other.members()}
    clashing = [f"{cls.__module__}.{cls.__qualname__}" for cls in family.members() if cls in taken]
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
    _TABLE[name] = dataclasses.replace(family, **twins)


def add_variant(name: str, cls: type[torch.nn.Module]) -> None:
    """Add a variant class to a registered family (once, where the class is defined).

    Raises:
        ValueError: No family ``name``, or ``cls`` belongs to a family already.
    """
    if name not in _TABLE:
        raise ValueError(f"add_variant(): expected a registered family, got {name!r}.")
    owner = family_of(cls)
    if owner is not None:
        raise ValueError(
            f"add_variant(): expected a class of no family, got "
            f"{cls.__module__}.{cls.__qualname__} of {owner.name!r}."
        )
    family = _TABLE[name]
    _TABLE[name] = dataclasses.replace(family, variants=(*family.variants, cls))


def families() -> tuple[Family, ...]:
    """The registered families, in registration order."""
    return tuple(_TABLE.values())


def family_of(cls: type) -> Family | None:
    """The family ``cls`` belongs to (exact class, not a subclass), or ``None``."""
    for family in _TABLE.values():
        if cls in family.members():
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
