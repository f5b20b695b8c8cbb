"""The family table: each row consistent with its classes, and the tools following it."""

from __future__ import annotations

import pytest
import torch

import batchnorm
import batchnorm.tools  # noqa: F401  (imports every layer module: the table is complete)
from batchnorm.families import (
    Family,
    add_twin,
    add_variant,
    families,
    family_for_rank,
    family_of,
    is_batchnorm_like,
    register,
    stock_forwards,
)

FAMILIES = families()
FIXED_RANK = [f for f in FAMILIES if f.ranks is not None]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_rows_agree_with_their_classes(family):
    assert family.torch.__name__ == family.name and family.ours.__name__ == family.name
    assert family.ours.__module__.startswith("batchnorm.")
    assert family.ranks == family.ours.input_ranks
    if family.frozen is not None:
        assert family.frozen.input_ranks == family.ranks
        assert family.frozen.input_shape == family.ours.input_shape
    for cls in family.members():
        assert family_of(cls) is family


@pytest.mark.parametrize("family", FIXED_RANK, ids=lambda f: f.name)
def test_fixed_rank_families_are_torch_subclasses_with_the_same_state(family):
    # isinstance(layer, torch.nn.BatchNorm2d) holds for ours; checkpoints move both ways.
    assert issubclass(family.ours, family.torch)
    ours, theirs, frozen = family.ours(3), family.torch(3), family.frozen(3)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == frozen.state_dict().keys()
    assert family.torch_lazy is not None and family.lazy.__name__ == f"Lazy{family.name}"
    assert issubclass(family.lazy, family.torch_lazy) and family.lazy.cls_to_become is family.ours
    assert family.sync is batchnorm.SyncBatchNorm


def test_sync_family_is_any_rank_and_not_torchs_subclass():
    family = family_of(batchnorm.SyncBatchNorm)
    assert family.ranks is None and family.frozen is None and family.sync is family.ours
    # DDP refuses CPU models holding torch's class (see batchnorm.distributed).
    assert not issubclass(family.ours, torch.nn.SyncBatchNorm)
    assert family_of(torch.nn.SyncBatchNorm) is family


def test_lookups_are_by_exact_class():
    class MyBN(torch.nn.BatchNorm2d):
        pass

    assert family_of(MyBN) is None and family_of(torch.nn.InstanceNorm2d) is None
    assert family_for_rank(2) is family_for_rank(3) is family_of(torch.nn.BatchNorm1d)
    assert family_for_rank(4).name == "BatchNorm2d" and family_for_rank(5).name == "BatchNorm3d"
    assert family_for_rank(1) is None and family_for_rank(6) is None


def test_batchnorm_like_excludes_instance_norms_and_includes_lazy_layers():
    assert is_batchnorm_like(torch.nn.LazyBatchNorm2d())
    assert is_batchnorm_like(batchnorm.SyncBatchNorm(3))
    assert not is_batchnorm_like(torch.nn.InstanceNorm2d(3, track_running_stats=True))
    assert not is_batchnorm_like(batchnorm.FrozenBatchNorm2d(3))


def test_stock_forwards_are_those_of_the_members():
    forwards = stock_forwards()
    for family in FAMILIES:
        for cls in family.members():
            assert cls.forward in forwards

    class Activated(torch.nn.BatchNorm2d):
        def forward(self, input):
            return torch.relu(super().forward(input))

    assert Activated.forward not in forwards


@pytest.mark.parametrize("family", FIXED_RANK, ids=lambda f: f.name)
def test_tools_take_each_fixed_rank_family_through_its_twins(family):
    model = torch.nn.Sequential(family.torch(3))
    batchnorm.convert(model)
    assert type(model[0]) is family.ours
    batchnorm.convert_sync_batchnorm(model)
    assert type(model[0]) is family.sync
    batchnorm.revert_sync_batchnorm(model)
    assert type(model[0]) is family.ours
    model = batchnorm.freeze(model)
    assert type(model[0]) is family.frozen
    model = batchnorm.unfreeze(model)
    assert type(model[0]) is family.ours


def test_the_table_holds_every_family_once():
    assert [f.name for f in FAMILIES] == [
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
    ]


def test_registration_refuses_a_second_family_or_class_and_unknown_twins():
    with pytest.raises(ValueError, match=r"expected a new family, got 'BatchNorm2d' again"):
        register(Family("BatchNorm2d", (4,), batchnorm.BatchNorm2d, torch.nn.BatchNorm2d))
    with pytest.raises(ValueError, match=r"no other family, got \['batchnorm.modules.BatchNorm2d'"):
        register(Family("Other", (4,), batchnorm.BatchNorm2d, torch.nn.BatchNorm2d))
    with pytest.raises(ValueError, match=r"expected a registered family, got 'Nope'"):
        add_twin("Nope", frozen=batchnorm.FrozenBatchNorm2d)
    with pytest.raises(ValueError, match=r"slots among .* got \['ghost'\]"):
        add_twin("BatchNorm2d", ghost=batchnorm.BatchNorm2d)
    with pytest.raises(ValueError, match=r"'BatchNorm2d' has a frozen twin already"):
        add_twin("BatchNorm2d", frozen=batchnorm.FrozenBatchNorm1d)
    assert families() == FAMILIES


def test_variants_belong_to_the_fixed_rank_family_of_their_rank():
    for family in FIXED_RANK:
        suffix = family.name.removeprefix("BatchNorm")
        names = sorted(cls.__name__ for cls in family.variants)
        assert names == [f"BatchRenorm{suffix}", f"GhostBatchNorm{suffix}"]
        for cls in family.variants:
            assert issubclass(cls, family.torch) and family_of(cls) is family
            assert cls.input_ranks == family.ranks and cls.forward in stock_forwards()
    assert family_of(batchnorm.SyncBatchNorm).variants == ()


def test_add_variant_refuses_unknown_families_and_classes_of_a_family():
    with pytest.raises(ValueError, match=r"expected a registered family, got 'Nope'"):
        add_variant("Nope", batchnorm.GhostBatchNorm2d)
    with pytest.raises(ValueError, match=r"no family, got batchnorm.variants.GhostBatchNorm2d of"):
        add_variant("BatchNorm1d", batchnorm.GhostBatchNorm2d)
    assert families() == FAMILIES
