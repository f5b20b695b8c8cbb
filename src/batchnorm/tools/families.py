"""The one table of BatchNorm families: each kind of layer, its input ranks and its twins.

A *family* is one kind of BatchNorm layer in its several implementations: this package's class,
torch.nn's, the frozen one (:mod:`batchnorm.frozen`), the synchronized one
(:class:`batchnorm.SyncBatchNorm`) and a lazy one (torch.nn's ``LazyBatchNorm*d``; ours is a
slot for now). Every tool that changes or recognizes layers (:func:`batchnorm.convert`,
:func:`batchnorm.convert_sync_batchnorm`, :func:`batchnorm.freeze`, :func:`batchnorm.fold`,
:func:`batchnorm.recompute_statistics`) reads this table, so a new variant is added here once.

Lookups are by exact class: a user's subclass of a BatchNorm class is not a member (converting
it would drop its behaviour) and the tools refuse it by name.

Example:
    >>> import torch
    >>> from batchnorm.tools.families import family_of
    >>> family = family_of(torch.nn.BatchNorm2d)
    >>> family.name, family.ranks, family.ours.__module__, family.frozen.__name__
    ('BatchNorm2d', (4,), 'batchnorm.modules', 'FrozenBatchNorm2d')
"""

from __future__ import annotations

import dataclasses

import torch

from ..distributed import SyncBatchNorm
from ..frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from ..modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "FAMILIES",
    "Family",
    "family_for_rank",
    "family_of",
    "is_batchnorm_like",
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
    """

    name: str
    ranks: tuple[int, ...] | None
    ours: type[torch.nn.Module]
    torch: type[torch.nn.Module]
    frozen: type[torch.nn.Module] | None
    sync: type[torch.nn.Module] | None
    torch_lazy: type[torch.nn.Module] | None = None
    lazy: type[torch.nn.Module] | None = None

    def members(self) -> tuple[type[torch.nn.Module], ...]:
        """Every class of the family, ``None`` slots left out."""
        classes = (self.ours, self.torch, self.frozen, self.torch_lazy, self.lazy)
        return tuple(cls for cls in classes if cls is not None)


FAMILIES: tuple[Family, ...] = (
    Family(
        "BatchNorm1d",
        BatchNorm1d.input_ranks,
        BatchNorm1d,
        torch.nn.BatchNorm1d,
        FrozenBatchNorm1d,
        SyncBatchNorm,
        torch.nn.LazyBatchNorm1d,
    ),
    Family(
        "BatchNorm2d",
        BatchNorm2d.input_ranks,
        BatchNorm2d,
        torch.nn.BatchNorm2d,
        FrozenBatchNorm2d,
        SyncBatchNorm,
        torch.nn.LazyBatchNorm2d,
    ),
    Family(
        "BatchNorm3d",
        BatchNorm3d.input_ranks,
        BatchNorm3d,
        torch.nn.BatchNorm3d,
        FrozenBatchNorm3d,
        SyncBatchNorm,
        torch.nn.LazyBatchNorm3d,
    ),
    Family(
        "SyncBatchNorm",
        SyncBatchNorm.input_ranks,
        SyncBatchNorm,
        torch.nn.SyncBatchNorm,
        None,
        SyncBatchNorm,
    ),
)

_BY_CLASS = {cls: family for family in FAMILIES for cls in family.members()}
# Ranks 2 and 3 are both BatchNorm1d's (a 3-D input is (N, C, L)).
_BY_RANK = {rank: family for family in FAMILIES if family.ranks for rank in family.ranks}


def family_of(cls: type) -> Family | None:
    """The family ``cls`` belongs to (exact class, not a subclass), or ``None``."""
    return _BY_CLASS.get(cls)


def family_for_rank(rank: int) -> Family | None:
    """The fixed-rank family whose layers take inputs of this rank (2 to 5), or ``None``."""
    return _BY_RANK.get(rank)


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
    classes = {cls for family in FAMILIES for cls in family.members()}
    return frozenset(
        {torch.nn.modules.batchnorm._BatchNorm.forward} | {cls.forward for cls in classes}
    )
