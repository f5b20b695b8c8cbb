"""Frozen BatchNorm layers and ``freeze``/``unfreeze``.

Oracles: an evaluation-mode ``torch.nn.BatchNorm{1,2,3}d`` holding the same state (outputs and
gradients), torch's own ``state_dict`` migration (old checkpoints), finite differences
(gradcheck), and an untouched deep copy of the original model (unfreeze).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import batchnorm
from batchnorm import routing_policy
from batchnorm.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from batchnorm.tools.freeze import freeze, unfreeze
from conftest import (
    DTYPES,
    TOL,
    assert_state_unchanged,
    labelled,
    make_input,
    randomize_bn_state,
    shape_id,
    snapshot_state,
)

# Input rank -> (frozen class, torch.nn class, batchnorm class).
CLASSES = {
    2: (FrozenBatchNorm1d, torch.nn.BatchNorm1d, batchnorm.BatchNorm1d),
    3: (FrozenBatchNorm1d, torch.nn.BatchNorm1d, batchnorm.BatchNorm1d),
    4: (FrozenBatchNorm2d, torch.nn.BatchNorm2d, batchnorm.BatchNorm2d),
    5: (FrozenBatchNorm3d, torch.nn.BatchNorm3d, batchnorm.BatchNorm3d),
}
FROZEN_FOR = {
    bn_cls: frozen_cls for frozen_cls, *bn_classes in CLASSES.values() for bn_cls in bn_classes
}
BN_CLASSES = list(FROZEN_FOR)


def _class_id(cls) -> str:
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def _bn_layers(model):
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }


def _frozen_layers(model):
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d))
    }


def _eval_bn_and_frozen(rank, channels, dtype, gen, trainable_affine=False, **kwargs):
    """An evaluation-mode torch.nn BatchNorm with random state, and a frozen layer holding it."""
    frozen_cls, torch_cls, _ = CLASSES[rank]
    bn = torch_cls(channels, eps=1e-3, dtype=dtype, **kwargs)
    randomize_bn_state(bn, gen)
    bn.eval()
    frozen = frozen_cls(
        channels, eps=1e-3, trainable_affine=trainable_affine, dtype=dtype, **kwargs
    )
    frozen.load_state_dict(bn.state_dict())
    return bn, frozen


# --------------------------------------------------------------------------------------------
# The frozen layers
# --------------------------------------------------------------------------------------------

# A batch of one in training mode (which BatchNorm refuses), each rank, a 1x1 map, and one
# input above routing_policy().serial_max_elements, which runs on the parallel kernels.
FORWARD_SHAPES = [(1, 3), (7, 3), (3, 5, 7), (2, 3, 1, 1), (4, 3, 5, 6), (5, 2, 3, 4, 3)]
LARGE_SHAPE = (4, 8, 48, 48)


def test_large_shape_is_above_the_serial_threshold():
    assert math.prod(LARGE_SHAPE) > routing_policy().serial_max_elements


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [*FORWARD_SHAPES, LARGE_SHAPE], ids=shape_id)
def test_frozen_forward_matches_eval_batchnorm_in_both_modes(
    eval_routing, shape, dtype, affine, gen
):
    bn, frozen = _eval_bn_and_frozen(len(shape), shape[1], dtype, gen, affine=affine)
    state = snapshot_state(frozen)
    x = make_input(shape, dtype, generator=gen, scale=2.0, offset=0.5)
    want = bn(x)
    for training in (True, False):
        got = frozen.train(training)(x)
        torch.testing.assert_close(got, want, **TOL[dtype], msg=labelled(f"{training=}"))
    assert_state_unchanged(frozen, state)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 3, 4, 2)], ids=shape_id)
def test_frozen_forward_matches_eval_batchnorm_any_layout(shape, layout, gen):
    bn, frozen = _eval_bn_and_frozen(len(shape), shape[1], torch.float32, gen)
    x = make_input(shape, torch.float32, layout, gen)
    with warnings.catch_warnings():
        # Strided inputs go to torch's native op with a one-time fallback warning.
        warnings.simplefilter("ignore", RuntimeWarning)
        got = frozen.train()(x)
    torch.testing.assert_close(got, bn(x), **TOL[torch.float32])
    if layout == "channels_last":
        assert got.stride() == x.stride()


def test_frozen_without_bias_matches_eval_batchnorm_without_bias(gen):
    bn, frozen = _eval_bn_and_frozen(4, 3, torch.float64, gen, bias=False)
    assert frozen.bias is None and "bias" not in frozen.state_dict()
    x = make_input((2, 3, 4, 4), torch.float64, generator=gen)
    torch.testing.assert_close(frozen.train()(x), bn(x), **TOL[torch.float64])


def test_frozen_forward_equals_closed_form_scale_and_shift(gen):
    # The documented form y = x * scale + shift, worked out in float64 torch ops.
    _, frozen = _eval_bn_and_frozen(4, 3, torch.float64, gen)
    x = make_input((2, 3, 2, 2), torch.float64, generator=gen)
    scale = frozen.weight / torch.sqrt(frozen.running_var + frozen.eps)
    shift = frozen.bias - frozen.running_mean * scale
    want = x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    torch.testing.assert_close(frozen(x), want, **TOL[torch.float64])


@pytest.mark.parametrize("trainable_affine", [False, True], ids=["fixed", "trainable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 5), (2, 3, 4, 3), (2, 2, 2, 3, 2)], ids=shape_id)
def test_frozen_gradients_equal_eval_batchnorm_gradients(shape, dtype, trainable_affine, gen):
    bn, frozen = _eval_bn_and_frozen(
        len(shape), shape[1], dtype, gen, trainable_affine=trainable_affine
    )
    x = make_input(shape, dtype, generator=gen)
    upstream = make_input(shape, dtype, generator=gen)
    x_bn = x.clone().requires_grad_()
    x_frozen = x.clone().requires_grad_()
    bn(x_bn).backward(upstream)
    frozen.train()(x_frozen).backward(upstream)
    torch.testing.assert_close(x_frozen.grad, x_bn.grad, **TOL[dtype])
    if trainable_affine:
        torch.testing.assert_close(frozen.weight.grad, bn.weight.grad, **TOL[dtype])
        torch.testing.assert_close(frozen.bias.grad, bn.bias.grad, **TOL[dtype])
    else:
        assert frozen.weight.grad is None and frozen.bias.grad is None


def test_frozen_gradcheck_input(gen):
    _, frozen = _eval_bn_and_frozen(4, 3, torch.float64, gen)
    frozen.train()
    x = make_input((2, 3, 2, 2), torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(frozen, (x,))
    assert torch.autograd.gradgradcheck(frozen, (x,))


def test_frozen_gradcheck_input_weight_bias_trainable_affine(gen):
    _, frozen = _eval_bn_and_frozen(3, 2, torch.float64, gen, trainable_affine=True)
    frozen.train()
    x = make_input((3, 2, 4), torch.float64, generator=gen).requires_grad_()
    weight = frozen.weight.detach().clone().requires_grad_()
    bias = frozen.bias.detach().clone().requires_grad_()

    def call(x, weight, bias):
        return torch.func.functional_call(frozen, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(call, (x, weight, bias))
    assert torch.autograd.gradgradcheck(call, (x, weight, bias))


def test_frozen_has_parameters_only_with_trainable_affine():
    fixed = FrozenBatchNorm2d(3)
    assert list(fixed.parameters()) == []
    assert [name for name, _ in fixed.named_buffers()] == [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ]
    trainable = FrozenBatchNorm2d(3, trainable_affine=True)
    assert [name for name, _ in trainable.named_parameters()] == ["weight", "bias"]
    bare = FrozenBatchNorm2d(3, affine=False)
    assert list(bare.parameters()) == []
    assert bare.weight is None and bare.bias is None
    # Never a BatchNorm to code that looks for BatchNorm layers.
    assert not isinstance(fixed, torch.nn.modules.batchnorm._NormBase)


def test_frozen_defaults_and_repr():
    frozen = FrozenBatchNorm3d(2, eps=1e-3, dtype=torch.float64)
    torch.testing.assert_close(frozen.running_mean, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(frozen.running_var, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(frozen.weight, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(frozen.bias, torch.zeros(2, dtype=torch.float64))
    assert frozen.num_batches_tracked.dtype == torch.long
    assert frozen.num_batches_tracked.dim() == 0
    assert repr(frozen) == (
        "FrozenBatchNorm3d(2, eps=0.001, affine=True, bias=True, trainable_affine=False)"
    )


def test_frozen_trainable_affine_trains_weight_and_bias_never_statistics(eval_routing, gen):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    randomize_bn_state(net[1], gen)
    weight_param = net[1].weight
    # Built before freeze(): trainable_affine keeps the very same Parameter objects.
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net = freeze(net, trainable_affine=True)
    assert net[1].weight is weight_param
    statistics = {
        key: value.clone()
        for key, value in net[1].state_dict().items()
        if key in ("running_mean", "running_var", "num_batches_tracked")
    }
    weight_before = net[1].weight.detach().clone()
    bias_before = net[1].bias.detach().clone()
    for _ in range(3):
        net.train()  # what every training loop does, and what undoes a bare bn.eval()
        x = make_input((5, 4), torch.float32, generator=gen)
        net(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    assert not torch.equal(net[1].weight, weight_before)
    assert not torch.equal(net[1].bias, bias_before)
    for key, before in statistics.items():
        assert torch.equal(getattr(net[1], key), before), key
    # Still the evaluation transform in training mode, with the trained weight and bias.
    oracle = torch.nn.BatchNorm1d(3).eval()
    oracle.load_state_dict(net[1].state_dict())
    hidden = net[0](make_input((5, 4), torch.float32, generator=gen)).detach()
    torch.testing.assert_close(net[1](hidden), oracle(hidden), **TOL[torch.float32])


# --------------------------------------------------------------------------------------------
# state_dict compatibility
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainable_affine", [False, True], ids=["fixed", "trainable"])
@pytest.mark.parametrize("bn_cls", BN_CLASSES, ids=_class_id)
def test_frozen_state_dict_round_trip_with_batchnorm(bn_cls, trainable_affine, gen):
    bn = bn_cls(4)
    randomize_bn_state(bn, gen)
    bn.num_batches_tracked.fill_(7)
    frozen = FROZEN_FOR[bn_cls](4, trainable_affine=trainable_affine)
    frozen.load_state_dict(bn.state_dict())  # strict
    assert list(frozen.state_dict()) == list(bn.state_dict())
    assert_state_unchanged(frozen, snapshot_state(bn))
    assert frozen.state_dict()._metadata[""]["version"] == bn.state_dict()._metadata[""]["version"]

    back = bn_cls(4)
    back.load_state_dict(frozen.state_dict())  # strict
    assert_state_unchanged(back, snapshot_state(bn))


@pytest.mark.parametrize(
    "kwargs", [dict(affine=False), dict(bias=False)], ids=["no_affine", "no_bias"]
)
def test_frozen_state_dict_round_trip_without_affine_or_bias(kwargs, gen):
    bn = torch.nn.BatchNorm2d(3, **kwargs)
    randomize_bn_state(bn, gen)
    frozen = FrozenBatchNorm2d(3, **kwargs)
    frozen.load_state_dict(bn.state_dict())
    assert_state_unchanged(frozen, snapshot_state(bn))
    back = torch.nn.BatchNorm2d(3, **kwargs)
    back.load_state_dict(frozen.state_dict())
    assert_state_unchanged(back, snapshot_state(bn))


@pytest.mark.parametrize("count", [0, 5])
@pytest.mark.parametrize("metadata", ["version_1", "none"])
def test_frozen_loads_state_dict_without_num_batches_tracked(metadata, count, gen):
    source = torch.nn.BatchNorm2d(3)
    randomize_bn_state(source, gen)
    state = source.state_dict()
    del state["num_batches_tracked"]
    if metadata == "version_1":
        state._metadata[""]["version"] = 1  # torch < 0.4.1 wrote no num_batches_tracked
    else:
        state = dict(state)  # a hand-made dict: no metadata at all
    # torch's own migration of the same checkpoint is the oracle for the counter.
    oracle = torch.nn.BatchNorm2d(3)
    oracle.num_batches_tracked.fill_(count)
    oracle.load_state_dict(state)
    frozen = FrozenBatchNorm2d(3)
    frozen.num_batches_tracked.fill_(count)
    frozen.load_state_dict(state)
    assert_state_unchanged(frozen, snapshot_state(oracle))
    assert "num_batches_tracked" not in state  # the caller's dict is not edited


def test_frozen_on_meta_device_loads_state_dict_without_num_batches_tracked():
    # The usual way to load a large checkpoint: build on meta, then assign the loaded tensors.
    state = torch.nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    oracle = torch.nn.BatchNorm2d(3, device="meta")
    oracle.load_state_dict(state, assign=True)
    frozen = FrozenBatchNorm2d(3, device="meta")
    frozen.load_state_dict(state, assign=True)
    assert frozen.num_batches_tracked.device == torch.device("cpu")
    assert_state_unchanged(frozen, snapshot_state(oracle))


def test_frozen_refuses_current_state_dict_missing_num_batches_tracked_like_batchnorm():
    state = torch.nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]  # version 2 says it should be there: not migrated
    with pytest.raises(RuntimeError, match="Missing key.*num_batches_tracked"):
        torch.nn.BatchNorm2d(3).load_state_dict(state)
    with pytest.raises(RuntimeError, match="Missing key.*num_batches_tracked"):
        FrozenBatchNorm2d(3).load_state_dict(state)


# --------------------------------------------------------------------------------------------
# freeze / unfreeze on models
# --------------------------------------------------------------------------------------------


class _Block(torch.nn.Module):
    """A custom module with BatchNorm attributes, ours and torch's."""

    def __init__(self):
        super().__init__()
        self.norm = batchnorm.BatchNorm1d(6, eps=1e-3)
        self.volume_norm = torch.nn.BatchNorm3d(2, momentum=None)
        self.volume_out = batchnorm.BatchNorm3d(2, momentum=0.5, bias=False)

    def forward(self, features, volume):
        return self.norm(features), self.volume_out(self.volume_norm(volume))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3),
            torch.nn.BatchNorm2d(4, momentum=0.3),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 4 * 4, 6),
        )
        self.block = _Block()

    def forward(self, image, volume):
        return self.block(self.features(image), volume)


def _inputs(gen, dtype=torch.float32):
    return (
        make_input((5, 3, 6, 6), dtype, "channels_last", gen),
        make_input((3, 2, 2, 3, 2), dtype, "contiguous", gen),
    )


def _prepared_net(gen, dtype=torch.float32):
    """A _Net with random BN state, two training steps behind it, and mixed train/eval modes."""
    net = _Net().to(dtype)
    for bn in _bn_layers(net).values():
        randomize_bn_state(bn, gen)
    for _ in range(2):
        net(*_inputs(gen, dtype))
    net.block.volume_norm.eval()
    return net


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_freeze_nested_model_gives_eval_outputs_in_train_mode(eval_routing, dtype, gen):
    net = _prepared_net(gen, dtype)
    original = copy.deepcopy(net)
    conv = net.features[0]
    bn_types = {name: type(m) for name, m in _bn_layers(net).items()}
    modes = {name: m.training for name, m in net.named_modules()}
    state = snapshot_state(net)

    assert freeze(net) is net

    assert {name: type(m) for name, m in _frozen_layers(net).items()} == {
        name: FROZEN_FOR[cls] for name, cls in bn_types.items()
    }
    assert _bn_layers(net) == {}
    assert net.features[0] is conv
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert_state_unchanged(net, state)
    assert all(t.dtype == dtype for k, t in net.state_dict().items() if "num_batches" not in k)
    # Only the conv and linear parameters are left.
    assert {name for name, _ in net.named_parameters()} == {
        "features.0.weight",
        "features.0.bias",
        "features.4.weight",
        "features.4.bias",
    }
    assert net.block.norm.eps == 1e-3

    net.train()
    original.eval()
    image, volume = _inputs(gen, dtype)
    for got, want in zip(net(image, volume), original(image, volume), strict=True):
        torch.testing.assert_close(got, want, **TOL[dtype])
    assert_state_unchanged(net, state)


def test_unfreeze_restores_classes_momentum_and_training_behaviour(gen):
    net = _prepared_net(gen)
    original = copy.deepcopy(net)
    bn_types = {name: type(m) for name, m in _bn_layers(net).items()}
    momenta = {name: m.momentum for name, m in _bn_layers(net).items()}
    modes = {name: m.training for name, m in net.named_modules()}
    state = snapshot_state(net)

    assert unfreeze(freeze(net)) is net

    assert {name: type(m) for name, m in _bn_layers(net).items()} == bn_types
    assert {name: m.momentum for name, m in _bn_layers(net).items()} == momenta
    assert all(m.track_running_stats for m in _bn_layers(net).values())
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert list(net.state_dict()) == list(original.state_dict())
    assert_state_unchanged(net, state)
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert all(isinstance(p, torch.nn.Parameter) for p in net.parameters())

    # Training again: batch statistics and running updates, exactly like the original.
    net.train()
    original.train()
    image, volume = _inputs(gen)
    for got, want in zip(net(image, volume), original(image, volume), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert not torch.equal(net.features[1].running_mean, state["features.1.running_mean"])
    for key, want in snapshot_state(original).items():
        torch.testing.assert_close(
            net.state_dict()[key], want, **TOL[torch.float32], msg=labelled(key)
        )


@pytest.mark.parametrize("bn_cls", BN_CLASSES, ids=_class_id)
def test_freeze_root_batchnorm_returns_new_layer_and_unfreeze_returns_original_class(
    eval_routing, bn_cls, gen
):
    bn = bn_cls(3, eps=1e-4, momentum=0.05, dtype=torch.float64)
    randomize_bn_state(bn, gen)
    bn.eval()
    state = snapshot_state(bn)

    frozen = freeze(bn)
    assert type(frozen) is FROZEN_FOR[bn_cls]
    assert not frozen.training and frozen.eps == 1e-4
    assert_state_unchanged(frozen, state)
    assert type(bn) is bn_cls  # the old layer is not touched

    back = unfreeze(frozen)
    assert type(back) is bn_cls
    assert not back.training and back.eps == 1e-4 and back.momentum == 0.05
    assert_state_unchanged(back, state)


def test_unfreeze_layer_built_directly_gives_our_batchnorm_with_default_momentum():
    for frozen_cls, _, ours in CLASSES.values():
        back = unfreeze(frozen_cls(2))
        assert type(back) is ours
        assert back.momentum == 0.1 and back.track_running_stats


def test_freeze_trainable_affine_round_trip_keeps_parameter_objects(gen):
    bn = torch.nn.BatchNorm2d(3)
    weight, bias = bn.weight, bn.bias
    frozen = freeze(bn, trainable_affine=True)
    assert frozen.weight is weight and frozen.bias is bias
    back = unfreeze(frozen)
    assert back.weight is weight and back.bias is bias


def test_freeze_fixed_copies_tensors_so_old_layer_cannot_write_into_frozen_one(gen):
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    old = net[0]
    freeze(net)
    frozen_state = snapshot_state(net)
    with torch.no_grad():
        old.weight.add_(1.0)
    old.train()(make_input((4, 3), torch.float32, generator=gen))  # updates old's statistics
    assert_state_unchanged(net, frozen_state)
    # Unfreezing a fixed layer makes new Parameters: an optimizer must be built again.
    back = unfreeze(copy.deepcopy(net))
    assert back[0].weight is not old.weight


def test_freeze_shared_layer_stays_shared():
    shared = torch.nn.BatchNorm1d(3)
    net = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    freeze(net)
    assert type(net[0]) is FrozenBatchNorm1d and net[0] is net[2]
    unfreeze(net)
    assert type(net[0]) is torch.nn.BatchNorm1d and net[0] is net[2]


def test_freeze_leaves_frozen_layers_alone_and_convert_ignores_them():
    already = FrozenBatchNorm1d(3, trainable_affine=True)
    net = torch.nn.Sequential(already, torch.nn.BatchNorm1d(3))
    freeze(net)
    assert net[0] is already
    assert type(net[1]) is FrozenBatchNorm1d and not net[1].trainable_affine
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an all-frozen model is not a model without BN
        assert freeze(net) is net
    assert batchnorm.convert(net) is net
    assert [type(m) for m in net] == [FrozenBatchNorm1d, FrozenBatchNorm1d]


def test_freeze_trainable_affine_on_layer_without_affine(gen):
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3, affine=False), torch.nn.BatchNorm2d(3))
    freeze(net, trainable_affine=True)
    assert not net[0].affine and not net[0].trainable_affine and net[0].weight is None
    assert net[1].trainable_affine
    assert [name for name, _ in net.named_parameters()] == ["1.weight", "1.bias"]


def test_freeze_model_without_batchnorm_warns_and_returns_it_unchanged():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    state = snapshot_state(net)
    with pytest.warns(UserWarning, match=r"freeze\(\): expected a model with BatchNorm layers"):
        assert freeze(net) is net
    assert_state_unchanged(net, state)
    with pytest.warns(UserWarning, match=r"unfreeze\(\): expected a model with frozen"):
        assert unfreeze(net) is net


# --------------------------------------------------------------------------------------------
# Bad input changes nothing
# --------------------------------------------------------------------------------------------


def _model_types(model):
    return [(name, type(m)) for name, m in model.named_modules()]


def test_freeze_rejects_layer_without_running_stats_without_converting_anything(gen):
    net = torch.nn.Sequential(
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(
            torch.nn.Identity(), torch.nn.BatchNorm2d(4, track_running_stats=False)
        ),
        batchnorm.BatchNorm1d(4),
    )
    for bn in _bn_layers(net).values():
        randomize_bn_state(bn, gen)
    types = _model_types(net)
    state = snapshot_state(net)
    with pytest.raises(ValueError, match=r"expected .*running statistics.*'1\.1'"):
        freeze(net)
    assert _model_types(net) == types
    assert_state_unchanged(net, state)


class _MyBN(torch.nn.BatchNorm2d):
    """A user subclass: freezing it would silently drop its behaviour."""

    def forward(self, input):
        return super().forward(input) * 2


@pytest.mark.parametrize(
    ("make_odd", "type_name"),
    [
        (lambda: _MyBN(4), "_MyBN"),
        (lambda: torch.nn.SyncBatchNorm(4), "SyncBatchNorm"),
        (lambda: torch.nn.LazyBatchNorm2d(), "LazyBatchNorm2d"),
    ],
    ids=["user_subclass", "sync_batchnorm", "lazy"],
)
def test_freeze_rejects_unknown_batchnorm_class_without_converting_anything(make_odd, type_name):
    net = torch.nn.Sequential(
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.Identity(), make_odd()),
        batchnorm.BatchNorm1d(4),
    )
    types = _model_types(net)
    # Not the whole state_dict: an uninitialized lazy layer cannot be copied.
    states = {i: snapshot_state(net[i]) for i in (0, 2)}
    with pytest.raises(TypeError, match=rf"freeze\(\): expected .*'1\.1'.*{type_name}"):
        freeze(net)
    assert _model_types(net) == types
    for i, state in states.items():
        assert_state_unchanged(net[i], state)


def test_unfreeze_rejects_frozen_subclass_without_converting_anything():
    class MyFrozen(FrozenBatchNorm2d):
        pass

    net = torch.nn.Sequential(FrozenBatchNorm2d(2), MyFrozen(2))
    types = _model_types(net)
    with pytest.raises(TypeError, match=r"unfreeze\(\): expected .*'1'.*MyFrozen"):
        unfreeze(net)
    assert _model_types(net) == types


@pytest.mark.parametrize("function", [freeze, unfreeze], ids=lambda f: f.__name__)
@pytest.mark.parametrize("argument", [None, "model", [torch.nn.BatchNorm1d(2)]], ids=repr)
def test_freeze_rejects_non_module(function, argument):
    with pytest.raises(TypeError, match=rf"{function.__name__}\(\): expected a torch.nn.Module"):
        function(argument)


def test_freeze_rejects_non_bool_trainable_affine():
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    with pytest.raises(TypeError, match=r"expected trainable_affine to be a bool, got 'yes'"):
        freeze(net, trainable_affine="yes")
    assert type(net[0]) is torch.nn.BatchNorm1d


@pytest.mark.parametrize(
    ("frozen", "shape", "expected"),
    [
        (FrozenBatchNorm1d(3), (4, 2), r"\(N, 3\) or \(N, 3, L\)"),
        (FrozenBatchNorm2d(3), (2, 4, 5, 5), r"\(N, 3, H, W\)"),
        (FrozenBatchNorm2d(3), (2, 3, 5), r"4-D input of shape \(N, 3, H, W\)"),
        (FrozenBatchNorm3d(3), (2, 2, 1, 2, 2), r"\(N, 3, D, H, W\)"),
    ],
    ids=["1d_channels", "2d_channels", "2d_rank", "3d_channels"],
)
def test_frozen_forward_rejects_wrong_shape_without_touching_state(frozen, shape, expected, gen):
    randomize_bn_state(frozen, gen)
    state = snapshot_state(frozen)
    name = type(frozen).__name__
    with pytest.raises(ValueError, match=rf"{name}\(num_features=3\): expected .*{expected}"):
        frozen(torch.zeros(shape))
    assert_state_unchanged(frozen, state)


def test_frozen_forward_rejects_other_dtype():
    with pytest.raises(TypeError, match=r"expected input of the layer's dtype float64"):
        FrozenBatchNorm1d(2, dtype=torch.float64)(torch.zeros(3, 2))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_features=0), ValueError, "num_features"),
        (dict(num_features=2.0), TypeError, "num_features"),
        (dict(num_features=2, eps=-1.0), ValueError, "eps"),
        (dict(num_features=2, affine=False, trainable_affine=True), ValueError, "affine=True"),
    ],
    ids=["zero_features", "float_features", "negative_eps", "trainable_without_affine"],
)
def test_frozen_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=rf"FrozenBatchNorm2d\(\): expected .*{match}"):
        FrozenBatchNorm2d(**kwargs)


def test_unfreeze_restores_the_nonfinite_policy():
    model = torch.nn.Sequential(batchnorm.BatchNorm1d(3, nonfinite="raise"), torch.nn.ReLU())
    model = unfreeze(freeze(model))
    assert type(model[0]) is batchnorm.BatchNorm1d
    assert model[0].nonfinite == "raise"


def test_freeze_refuses_our_sync_batchnorm_pointing_to_revert():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), batchnorm.SyncBatchNorm(3))
    snapshot = snapshot_state(model)
    with pytest.raises(TypeError, match=r"revert_sync_batchnorm"):
        freeze(model)
    assert type(model[1]) is batchnorm.SyncBatchNorm
    assert_state_unchanged(model, snapshot)
