"""``batchnorm.convert``: swapping torch.nn BatchNorm layers for ours (and back) in place."""

from __future__ import annotations

import copy

import pytest
import torch

import batchnorm
from conftest import (
    TOL,
    assert_state_unchanged,
    labelled,
    make_input,
    randomize_bn_state,
    snapshot_state,
)

TORCH_TO_OURS = {
    torch.nn.BatchNorm1d: batchnorm.BatchNorm1d,
    torch.nn.BatchNorm2d: batchnorm.BatchNorm2d,
    torch.nn.BatchNorm3d: batchnorm.BatchNorm3d,
}


class _Net(torch.nn.Module):
    """BN1d, BN2d and BN3d at different depths, one of them inside a nested Sequential."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
        )
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Sequential(torch.nn.Linear(4 * 4 * 4, 6), torch.nn.BatchNorm1d(6)),
        )
        self.volume = torch.nn.BatchNorm3d(2, momentum=None)

    def forward(self, image, volume):
        return self.head(self.features(image)), self.volume(volume)


def _inputs(gen, dtype=torch.float32):
    return (
        make_input((5, 3, 6, 6), dtype, "contiguous", gen),
        make_input((3, 2, 2, 3, 2), dtype, "channels_last", gen),
    )


def _bn_layers(model):
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }


def _prepared_net(gen, dtype=torch.float32):
    """A _Net with random BN state, a few training steps behind it, and mixed train/eval modes."""
    net = _Net().to(dtype)
    for bn in _bn_layers(net).values():
        randomize_bn_state(bn, gen)
    for _ in range(2):
        net(*_inputs(gen, dtype))
    net.head.eval()  # a sub-tree in eval while the rest trains
    return net


def test_convert_swaps_every_batchnorm_and_keeps_state_and_identity(gen):
    net = _prepared_net(gen)
    reference_net = copy.deepcopy(net)
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    state = snapshot_state(net)
    modes = {name: m.training for name, m in net.named_modules()}
    torch_types = {name: type(m) for name, m in _bn_layers(net).items()}

    assert batchnorm.convert(net) is net

    for name, m in _bn_layers(net).items():
        assert type(m) is TORCH_TO_OURS[torch_types[name]], name
    assert all(p is params[n] for n, p in net.named_parameters())
    assert all(b is buffers[n] for n, b in net.named_buffers())
    assert_state_unchanged(net, state)
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert type(net.features[0]) is torch.nn.Conv2d

    # Same outputs and same state updates as the untouched torch model.
    image, volume = _inputs(gen)
    for got, want in zip(net(image, volume), reference_net(image, volume), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    for key, want in snapshot_state(reference_net).items():
        torch.testing.assert_close(
            net.state_dict()[key], want, **TOL[torch.float32], msg=labelled(key)
        )


def test_convert_keeps_forward_hooks_and_optimizer(gen):
    net = _prepared_net(gen)
    calls = []
    net.features[1].register_forward_hook(lambda mod, inp, out: calls.append(type(mod)))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)

    batchnorm.convert(net)
    image, volume = _inputs(gen)
    out, _ = net(image, volume)
    assert calls == [batchnorm.BatchNorm2d]

    weight_before = net.features[1].weight.detach().clone()
    out.square().sum().backward()
    optimizer.step()
    # The optimizer built before the conversion holds the same Parameter objects, so it moved
    # the converted layer's weight.
    assert not torch.equal(net.features[1].weight, weight_before)
    torch.testing.assert_close(
        net.features[1].weight.detach(),
        weight_before - 0.5 * net.features[1].weight.grad,
        **TOL[torch.float32],
    )


@pytest.mark.parametrize("torch_cls", list(TORCH_TO_OURS), ids=lambda c: c.__name__)
def test_convert_root_batchnorm(eval_routing, torch_cls, gen):
    bn = torch_cls(3).eval()
    randomize_bn_state(bn, gen)
    state = snapshot_state(bn)
    assert batchnorm.convert(bn) is bn
    assert type(bn) is TORCH_TO_OURS[torch_cls]
    assert not bn.training
    assert_state_unchanged(bn, state)
    assert batchnorm.convert(bn, to="torch") is bn
    assert type(bn) is torch_cls
    assert_state_unchanged(bn, state)


def test_convert_back_to_torch_gives_exact_torch_types(gen):
    net = _prepared_net(gen)
    torch_types = {name: type(m) for name, m in _bn_layers(net).items()}
    state = snapshot_state(net)
    batchnorm.convert(net)
    assert batchnorm.convert(net, to="torch") is net
    assert {name: type(m) for name, m in _bn_layers(net).items()} == torch_types
    assert_state_unchanged(net, state)


def test_convert_keeps_dtype(gen):
    net = _prepared_net(gen, dtype=torch.float64)
    reference_net = copy.deepcopy(net)
    batchnorm.convert(net)
    assert all(p.dtype == torch.float64 for p in net.parameters())
    image, volume = _inputs(gen, torch.float64)
    for got, want in zip(net(image, volume), reference_net(image, volume), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_convert_leaves_already_converted_layers_alone():
    net = torch.nn.Sequential(batchnorm.BatchNorm1d(3), torch.nn.BatchNorm1d(3))
    batchnorm.convert(net)
    assert [type(m) for m in net] == [batchnorm.BatchNorm1d, batchnorm.BatchNorm1d]
    net = torch.nn.Sequential(batchnorm.BatchNorm1d(3), torch.nn.BatchNorm1d(3))
    batchnorm.convert(net, to="torch")
    assert [type(m) for m in net] == [torch.nn.BatchNorm1d, torch.nn.BatchNorm1d]


class MyBN(torch.nn.BatchNorm2d):
    """A user subclass: converting it would silently drop its behaviour."""

    def forward(self, input):
        return super().forward(input) * 2


class _MyLazy(torch.nn.LazyBatchNorm2d):
    """A user subclass of a lazy layer: refused like any other subclass."""


@pytest.mark.parametrize(
    ("make_odd", "type_name"),
    [
        (lambda: MyBN(4), "MyBN"),
        (lambda: _MyLazy(), "_MyLazy"),
    ],
    ids=["user_subclass", "lazy_subclass"],
)
@pytest.mark.parametrize("to", ["batchnorm", "torch"])
def test_convert_rejects_unknown_batchnorm_subclass_without_partial_conversion(
    make_odd, type_name, to
):
    # A convertible layer comes before the unknown one in traversal order, and one after.
    net = torch.nn.Sequential(
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.Identity(), make_odd()),
        batchnorm.BatchNorm1d(4),
    )
    types = [type(m) for m in net.modules()]
    with pytest.raises(TypeError, match=rf"1\.1.*{type_name}"):
        batchnorm.convert(net, to=to)
    assert [type(m) for m in net.modules()] == types


@pytest.mark.parametrize("to", ["Torch", "numba", "", None])
def test_convert_rejects_unknown_target(to):
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match=r"to="):
        batchnorm.convert(net, to=to)
    assert type(net[0]) is torch.nn.BatchNorm1d


def test_convert_switches_sync_batchnorm_both_ways_and_keeps_state_and_group(gen):
    # torch.nn.SyncBatchNorm has a twin here (the family table), so it converts like the
    # BatchNorm*d layers: the same module, parameters, buffers and process group.
    group = object()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), torch.nn.SyncBatchNorm(4, process_group=group)
    )
    randomize_bn_state(model[1], gen)
    snapshot = snapshot_state(model)
    layer, weight = model[1], model[1].weight
    batchnorm.convert(model)
    assert type(model[1]) is batchnorm.SyncBatchNorm and model[1] is layer
    assert model[1].weight is weight and model[1].process_group is group
    assert_state_unchanged(model, snapshot)
    batchnorm.convert(model, to="torch")
    assert type(model[1]) is torch.nn.SyncBatchNorm and model[1].process_group is group
    assert_state_unchanged(model, snapshot)


def test_convert_sync_batchnorm_runs_like_torch_without_a_process_group(gen):
    # Without torch.distributed, both SyncBatchNorms are plain BatchNorm over any rank >= 2.
    ours = batchnorm.convert(torch.nn.Sequential(torch.nn.SyncBatchNorm(3)))[0]
    theirs = torch.nn.SyncBatchNorm(3)
    x = make_input((4, 3, 5), torch.float64, "contiguous", gen)
    torch.testing.assert_close(ours.double()(x), theirs.double()(x), **TOL[torch.float64])


@pytest.mark.parametrize("rank", [2, 4, 5])
def test_convert_switches_lazy_layers_both_ways_and_ours_become_ours(rank, gen):
    kind = {2: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[rank]
    model = torch.nn.Sequential(getattr(torch.nn, f"Lazy{kind}")(momentum=0.3))
    batchnorm.convert(model)
    assert type(model[0]) is getattr(batchnorm, f"Lazy{kind}")
    x = make_input((4, 3, *(5,) * (rank - 2)), torch.float32, "contiguous", gen, scale=2.0)
    y = model(x)
    assert type(model[0]) is getattr(batchnorm, kind) and model[0].momentum == 0.3
    theirs = getattr(torch.nn, f"Lazy{kind}")(momentum=0.3)
    torch.testing.assert_close(y, theirs(x), **TOL[torch.float32])
    for key, want in theirs.state_dict().items():
        torch.testing.assert_close(model[0].state_dict()[key], want, **TOL[torch.float32])
    lazy = torch.nn.Sequential(getattr(batchnorm, f"Lazy{kind}")())
    batchnorm.convert(lazy, to="torch")
    assert type(lazy[0]) is getattr(torch.nn, f"Lazy{kind}")


@pytest.mark.parametrize(
    "variant", [batchnorm.GhostBatchNorm2d(4, 2), batchnorm.BatchRenorm2d(4)], ids=type
)
def test_convert_sync_batchnorm_refuses_a_variant_saying_what_to_do(variant):
    # A fused layer beside it must not be split before the refusal: nothing changes.
    model = torch.nn.Sequential(batchnorm.BatchNormAct2d(4), variant)
    children = list(model.children())
    with pytest.raises(TypeError, match="has no synchronized form") as info:
        batchnorm.convert_sync_batchnorm(model)
    assert "convert(model, to='torch')" in str(info.value) and "'1'" in str(info.value)
    assert list(model.children()) == children
    assert type(model[0]) is batchnorm.BatchNormAct2d
