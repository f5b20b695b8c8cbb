"""The tools on activated layers (BatchNormAct*d, any activated class of the family table):
nothing drops the activation.

The oracle is a composite computed here from the layer's state with torch.nn.functional:
``F.batch_norm`` on clones of the running buffers, then torch's own activation function. It
never goes through the layer, the activation table or the tool under test.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from batchnorm import families as families_module
from batchnorm.families import (
    activated_family_of,
    add_activated,
    families,
    family_of,
    stock_forwards,
)
from batchnorm.tools.convert import convert, convert_sync_batchnorm, revert_sync_batchnorm
from batchnorm.tools.fold import check_fold, fold
from batchnorm.tools.freeze import freeze, unfreeze
from batchnorm.tools.population import recompute_statistics
from conftest import TOL, randomize_bn_state

try:  # the in-place activated layers, where they exist and register themselves
    import batchnorm.inplace  # noqa: F401
except ImportError:
    pass

DT = torch.float64

# torch's own activation functions, the oracle: name -> f(z, param)
ORACLE = {
    "identity": lambda z, p: z,
    "relu": lambda z, p: F.relu(z),
    "leaky_relu": lambda z, p: F.leaky_relu(z, p),
    "elu": lambda z, p: F.elu(z, p),
    "silu": lambda z, p: F.silu(z),
    "gelu": lambda z, p: F.gelu(z),
}
# name -> (param, the torch.nn module class the activation must come back as)
ACTIVATIONS = {
    "identity": (None, nn.Identity),
    "relu": (None, nn.ReLU),
    "leaky_relu": (0.2, nn.LeakyReLU),
    "elu": (0.5, nn.ELU),
    "silu": (None, nn.SiLU),
    "gelu": (None, nn.GELU),
}
# input shapes by the rank of the family
SHAPES = {"BatchNorm1d": (8, 3), "BatchNorm2d": (4, 3, 3, 5), "BatchNorm3d": (3, 3, 2, 3, 4)}
BEFORE = {
    "BatchNorm1d": lambda: nn.Linear(4, 3),
    "BatchNorm2d": lambda: nn.Conv2d(2, 3, 1),
    "BatchNorm3d": lambda: nn.Conv3d(2, 3, 1),
}
AFTER = {
    "BatchNorm1d": lambda: nn.Linear(3, 3),
    "BatchNorm2d": lambda: nn.Conv2d(3, 3, 1),
    "BatchNorm3d": lambda: nn.Conv3d(3, 3, 1),
}
BEFORE_SHAPES = {"BatchNorm1d": (8, 4), "BatchNorm2d": (4, 2, 3, 5), "BatchNorm3d": (3, 2, 2, 3, 4)}


def _constructible(cls, name) -> bool:
    try:
        cls(3, activation=name, activation_param=ACTIVATIONS[name][0])
    except ValueError:  # an in-place class takes only the invertible activations
        return False
    return True


# Every activated class of the table with every activation it takes: BatchNormAct*d, and
# whatever else registered itself (the in-place layers).
CASES = [
    (cls, name)
    for family in families()
    for cls in family.activated
    for name in ACTIVATIONS
    if _constructible(cls, name)
]
CASE_IDS = [f"{cls.__name__}-{name}" for cls, name in CASES]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(cls, name, seed: int = 0):
    layer = cls(3, activation=name, activation_param=ACTIVATIONS[name][0], dtype=DT)
    randomize_bn_state(layer, _gen(seed))
    return layer


def _input(family_name: str, seed: int = 1, before: bool = False) -> torch.Tensor:
    shape = (BEFORE_SHAPES if before else SHAPES)[family_name]
    return torch.randn(shape, generator=_gen(seed), dtype=DT) * 2.0 + 0.5


def composite(state: dict, x: torch.Tensor, training: bool, name: str, param):
    """The activated layer's output and running buffers after the call, from its state."""
    mean, var = state["running_mean"].clone(), state["running_var"].clone()
    z = F.batch_norm(x, mean, var, state["weight"], state["bias"], training, 0.1, 1e-5)
    return ORACLE[name](z, param), mean, var


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_computes_the_layer(
    module: nn.Module, layer: nn.Module, family_name: str, name: str, training: bool
) -> None:
    """``module`` (the layer, or what a tool made of it) computes the composite of ``layer``'s
    state at the call: output, and the running buffers ``layer`` holds afterwards."""
    state = _state(layer)
    x = _input(family_name)
    module.train(training)
    with torch.no_grad():
        got = module(x.clone())  # a clone: an in-place layer overwrites its input
    want, mean, var = composite(state, x, training, name, ACTIVATIONS[name][0])
    torch.testing.assert_close(got, want, **TOL[DT])
    torch.testing.assert_close(layer.running_mean, mean, **TOL[DT])
    torch.testing.assert_close(layer.running_var, var, **TOL[DT])


def _family(cls):
    return activated_family_of(cls)


# --------------------------------------------------------------------------- the table


def test_activated_classes_are_registered_but_not_members():
    for cls, name in ((BatchNormAct1d, "1d"), (BatchNormAct2d, "2d"), (BatchNormAct3d, "3d")):
        family = activated_family_of(cls)
        assert family.name == f"BatchNorm{name}" and cls in family.activated
        assert family_of(cls) is None and cls not in family.members()
        assert issubclass(cls, family.ours)
    # fold trusts the stock forwards to be plain BatchNorm: an activated one must not be there.
    assert not {cls.forward for cls, _ in CASES} & stock_forwards()


def test_add_activated_refuses_unknown_families_non_subclasses_and_known_classes():
    class Other(batchnorm.BatchNorm2d):
        pass

    with pytest.raises(ValueError, match=r"expected a registered family, got 'Nope'"):
        add_activated("Nope", Other)
    with pytest.raises(ValueError, match=r"expected a subclass of BatchNorm1d, got .*Other"):
        add_activated("BatchNorm1d", Other)
    with pytest.raises(ValueError, match=r"of no family, got .*BatchNormAct2d of 'BatchNorm2d'"):
        add_activated("BatchNorm2d", BatchNormAct2d)
    with pytest.raises(ValueError, match=r"of no family, got .*BatchNorm2d of 'BatchNorm2d'"):
        add_activated("BatchNorm2d", batchnorm.BatchNorm2d)
    assert activated_family_of(Other) is None


# --------------------------------------------------------------------------- convert


@pytest.mark.parametrize("cls, name", CASES, ids=CASE_IDS)
def test_convert_to_torch_splits_and_back_joins_keeping_outputs(cls, name):
    family = _family(cls)
    layer = _layer(cls, name)
    model = nn.Sequential(BEFORE[family.name]().to(DT), layer)
    params = [id(p) for p in model.parameters()]
    assert convert(model, to="torch") is model
    split = model[1]
    assert type(split) is nn.Sequential and split[0] is layer and type(layer) is family.torch
    assert type(split[1]) is ACTIVATIONS[name][1] and [id(p) for p in model.parameters()] == params
    assert "activation" not in layer.__dict__  # a plain torch.nn layer again
    assert model.state_dict().keys() == {f"1.0.{k}" for k in layer.state_dict()} | {
        "0.weight",
        "0.bias",
    }
    for training in (False, True):
        assert_computes_the_layer(split, layer, family.name, name, training)
    assert convert(model) is model
    assert model[1] is layer and type(layer) is cls
    assert (layer.activation, layer.activation_param) == (name, ACTIVATIONS[name][0])
    for training in (False, True):
        assert_computes_the_layer(layer, layer, family.name, name, training)


def test_convert_root_activated_layer_returns_the_sequential_and_back():
    layer = _layer(BatchNormAct2d, "silu")
    split = convert(layer, to="torch")
    assert type(split) is nn.Sequential and split[0] is layer and type(layer) is nn.BatchNorm2d
    assert convert(split) is layer and type(layer) is BatchNormAct2d and layer.activation == "silu"


def test_convert_to_ours_leaves_activated_layers_alone():
    model = nn.Sequential(BatchNormAct2d(3, activation="gelu"), nn.BatchNorm2d(3))
    convert(model)
    assert type(model[0]) is BatchNormAct2d and model[0].activation == "gelu"
    assert type(model[1]) is batchnorm.BatchNorm2d


def test_convert_moves_hooks_with_the_activation_and_back():
    layer = _layer(BatchNormAct2d, "leaky_relu").eval()
    seen = []
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    model = nn.Sequential(layer)
    x = _input("BatchNorm2d")
    want = layer(x)
    convert(model, to="torch")
    model(x)
    torch.testing.assert_close(seen[-1], want, **TOL[DT])  # still the activated output
    convert(model)
    assert model[0] is layer and len(layer._forward_hooks) == 1
    handle.remove()
    assert len(layer._forward_hooks) == 0


def test_convert_does_not_join_a_changed_sequential():
    model = nn.Sequential(_layer(BatchNormAct2d, "leaky_relu"))
    convert(model, to="torch")
    model[0][1].negative_slope = 0.3  # no longer the recorded activation
    convert(model)
    assert type(model[0]) is nn.Sequential and type(model[0][0]) is batchnorm.BatchNorm2d


# --------------------------------------------------------------------------- SyncBatchNorm


@pytest.mark.parametrize("cls, name", CASES, ids=CASE_IDS)
def test_convert_sync_keeps_the_activation_and_revert_restores_the_layer(cls, name):
    family = _family(cls)
    layer = _layer(cls, name)
    model = nn.Sequential(layer)
    params = [id(p) for p in model.parameters()]
    assert convert_sync_batchnorm(model) is model
    assert type(model[0]) is nn.Sequential and model[0][0] is layer
    assert type(layer) is batchnorm.SyncBatchNorm and type(model[0][1]) is ACTIVATIONS[name][1]
    # Without a process group SyncBatchNorm is BatchNorm, in training too.
    assert not torch.distributed.is_initialized()
    for training in (False, True):
        assert_computes_the_layer(model, layer, family.name, name, training)
    assert revert_sync_batchnorm(model) is model
    assert model[0] is layer and type(layer) is cls and layer.activation == name
    assert [id(p) for p in model.parameters()] == params
    assert_computes_the_layer(model, layer, family.name, name, training=True)


def test_convert_sync_root_activated_layer_and_revert():
    layer = _layer(BatchNormAct1d, "elu")
    synced = convert_sync_batchnorm(layer, process_group=None)
    assert type(synced) is nn.Sequential and synced[0] is layer
    assert revert_sync_batchnorm(synced) is layer and type(layer) is BatchNormAct1d


def test_sync_classmethod_refuses_activated_layers_rather_than_dropping_the_activation():
    model = nn.Sequential(BatchNormAct2d(3, activation="relu"))
    with pytest.raises(TypeError, match=r"cannot convert '0' of type .*BatchNormAct2d"):
        batchnorm.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[0]) is BatchNormAct2d


def test_convert_sync_refuses_unknown_layers_before_splitting_anything():
    class MyBatchNorm2d(nn.BatchNorm2d):
        pass

    model = nn.Sequential(BatchNormAct2d(3), MyBatchNorm2d(3))
    with pytest.raises(TypeError, match=r"cannot convert '1' of type .*MyBatchNorm2d"):
        convert_sync_batchnorm(model)
    assert type(model[0]) is BatchNormAct2d and type(model[1]) is MyBatchNorm2d


# --------------------------------------------------------------------------- fold


@pytest.mark.parametrize("cls, name", CASES, ids=CASE_IDS)
def test_fold_leaves_the_activation_after_the_folded_layer(cls, name):
    family = _family(cls)
    before = BEFORE[family.name]().to(DT)
    layer = _layer(cls, name)
    model = nn.Sequential(before, layer).eval()
    x = _input(family.name, before=True)
    with torch.no_grad():
        # The oracle: the layer before, then the composite of the layer's state.
        want, _, _ = composite(_state(layer), before(x), False, name, ACTIVATIONS[name][0])
    folded = fold(model)
    assert type(folded[1]) is ACTIVATIONS[name][1]
    if name in ("leaky_relu", "elu"):
        got_param = getattr(folded[1], "negative_slope", getattr(folded[1], "alpha", None))
        assert got_param == ACTIVATIONS[name][0]
    with torch.no_grad():
        torch.testing.assert_close(folded(x.clone()), want, **TOL[DT])
    assert check_fold(model, folded, x) < 1e-12


# --------------------------------------------------------------------------- freeze


@pytest.mark.parametrize("cls, name", CASES, ids=CASE_IDS)
def test_freeze_applies_the_activation_after_the_frozen_map_and_unfreeze_restores(cls, name):
    family = _family(cls)
    layer = _layer(cls, name)
    state = _state(layer)
    model = freeze(nn.Sequential(layer))
    frozen = model[0]
    assert type(frozen) is nn.Sequential and type(frozen[0]) is family.frozen
    assert type(frozen[1]) is ACTIVATIONS[name][1]
    x = _input(family.name)
    want, _, _ = composite(state, x, False, name, ACTIVATIONS[name][0])
    with torch.no_grad():
        got = model.train()(x.clone())  # training mode: still the evaluation map
    torch.testing.assert_close(got, want, **TOL[DT])
    assert torch.equal(frozen[0].running_mean, state["running_mean"])
    model = unfreeze(model)
    back = model[0]
    assert type(back) is cls and (back.activation, back.activation_param) == (
        name,
        ACTIVATIONS[name][0],
    )
    assert_computes_the_layer(back, back, family.name, name, training=True)  # trains again


def test_freeze_trainable_affine_keeps_parameters_through_the_round_trip():
    layer = _layer(BatchNormAct2d, "gelu")
    weight, bias = layer.weight, layer.bias
    model = freeze(layer, trainable_affine=True)  # the root: a new Sequential
    assert type(model) is nn.Sequential and model[0].weight is weight
    back = unfreeze(model)
    assert type(back) is BatchNormAct2d and back.weight is weight and back.bias is bias


# --------------------------------------------------------------------------- statistics


def _unfused_twin(model: nn.Sequential) -> nn.Sequential:
    """The same model with each activated layer as torch.nn BatchNorm + torch's activation."""
    children = []
    for module in model:
        family = activated_family_of(type(module))
        if family is None:
            children.append(copy.deepcopy(module))
            continue
        bn = family.torch(module.num_features, dtype=DT)
        bn.load_state_dict(module.state_dict())
        param = module.activation_param
        act = {
            "relu": nn.ReLU(),
            "leaky_relu": nn.LeakyReLU(param or 0.01),
            "elu": nn.ELU(param or 1.0),
            "silu": nn.SiLU(),
            "gelu": nn.GELU(),
            "identity": nn.Identity(),
        }[module.activation]
        children += [bn, act]
    return nn.Sequential(*children)


@pytest.mark.parametrize("cls, name", CASES, ids=CASE_IDS)
def test_recompute_statistics_updates_activated_layers_as_the_unfused_model(cls, name):
    family = _family(cls)
    model = nn.Sequential(
        BEFORE[family.name]().to(DT),
        _layer(cls, name),
        AFTER[family.name]().to(DT),
        family.torch(3, dtype=DT),
    )
    reference = _unfused_twin(model)
    data = [_input(family.name, seed=s, before=True) for s in range(3)]
    recompute_statistics(model, data, progress=False)
    recompute_statistics(reference, data, progress=False)
    # The first layer's input is known without any BatchNorm: its exact statistics.
    with torch.no_grad():
        first = torch.cat([model[0](x) for x in data]).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(model[1].running_mean, first.mean(1), **TOL[DT])
    torch.testing.assert_close(model[1].running_var, first.var(1), **TOL[DT])
    # The layer after it sees the activated output: as in the unfused model.
    torch.testing.assert_close(model[3].running_mean, reference[4].running_mean, **TOL[DT])
    torch.testing.assert_close(model[3].running_var, reference[4].running_var, **TOL[DT])


def test_accumulate_statistics_gives_activated_layers_one_update():
    layer = _layer(BatchNormAct2d, "relu")
    whole = _layer(BatchNormAct2d, "relu")
    x = torch.randn(8, 3, 2, 2, generator=_gen(3), dtype=DT)
    with batchnorm.accumulate_statistics(layer):
        for part in x.chunk(4):
            layer(part)
    whole(x)
    assert int(layer.num_batches_tracked) == 1
    torch.testing.assert_close(layer.running_mean, whole.running_mean, **TOL[DT])
    torch.testing.assert_close(layer.running_var, whole.running_var, **TOL[DT])


class _Overwriting(BatchNormAct2d):
    """A test-only activated class that writes its output over its input (as InPlaceABN)."""

    def forward(self, input, mask=None):
        output = super().forward(input, mask)
        with torch.no_grad():
            input.copy_(output)
        return input


@pytest.fixture
def overwriting(monkeypatch):
    """:class:`_Overwriting` registered in the table for one test (the table is restored)."""
    family = family_of(batchnorm.BatchNorm2d)
    changed = dataclasses.replace(family, activated=(*family.activated, _Overwriting))
    monkeypatch.setitem(families_module._TABLE, family.name, changed)
    return _Overwriting


def test_accumulate_statistics_reads_an_overwriting_layers_input_before_it(overwriting):
    layer = overwriting(3, activation="leaky_relu", activation_param=0.1, dtype=DT)
    x = torch.randn(8, 3, 2, 2, generator=_gen(4), dtype=DT) + 2.0
    with batchnorm.accumulate_statistics(layer), torch.no_grad():
        for part in x.clone().chunk(2):
            layer(part.clone())
    flat = x.transpose(0, 1).reshape(3, -1)
    # One momentum-0.1 update from (0, 1): 0.1 * the statistics of the input.
    torch.testing.assert_close(layer.running_mean, 0.1 * flat.mean(1), **TOL[DT])
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * flat.var(1), **TOL[DT])


# --------------------------------------------------------------------------- monitor


@pytest.mark.parametrize("where", ["input", "output"])
def test_monitor_watches_activated_layers_as_batchnorm(where):
    layer = _layer(BatchNormAct2d, "leaky_relu").eval()
    model = nn.Sequential(nn.Identity(), layer, nn.BatchNorm2d(3).to(DT))
    x = _input("BatchNorm2d")
    with batchnorm.ActivationMonitor(model, nn.BatchNorm2d, where=where) as monitor:
        model(x)
    assert monitor.layer_names == ("1", "2")
    want = x if where == "input" else composite(_state(layer), x, False, "leaky_relu", 0.2)[0]
    record = monitor.trace("1")
    torch.testing.assert_close(
        torch.from_numpy(record.mean[0]), want.transpose(0, 1).reshape(3, -1).mean(1)
    )


def test_monitor_reads_an_overwriting_layers_input_before_it(overwriting):
    layer = overwriting(3, activation="leaky_relu", activation_param=0.1, dtype=DT).eval()
    x = _input("BatchNorm2d") - 3.0
    with batchnorm.ActivationMonitor(nn.Sequential(layer), nn.BatchNorm2d) as monitor:
        with torch.no_grad():
            layer(x.clone())
    record = monitor.trace("0")
    torch.testing.assert_close(
        torch.from_numpy(record.mean[0]), x.transpose(0, 1).reshape(3, -1).mean(1)
    )
