"""The one-value-per-channel policy of the layers: ``single_value="raise"`` or ``"use_running"``.

``"raise"`` (the default) refuses a training batch with fewer than 2 values per channel as
torch does (``ValueError``, torch's words), changing nothing. ``"use_running"`` normalizes it
with the running statistics, as ``torch.nn.functional.batch_norm(training=False)`` does, and
leaves the running statistics and ``num_batches_tracked`` alone.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import batchnorm
from conftest import (
    TOL,
    assert_state_unchanged,
    bn_classes,
    randomize_bn_state,
    shape_id,
    snapshot_state,
)

EPS = 1e-5
TORCH_WORDS = "Expected more than 1 value per channel when training"
ONE_VALUE_SHAPES = [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)]


def _layer(shape, gen, **kwargs):
    ours_cls, _ = bn_classes(len(shape))
    layer = ours_cls(shape[1], dtype=torch.float64, **kwargs)
    randomize_bn_state(layer, gen)
    with torch.no_grad():
        layer.num_batches_tracked.fill_(4)
    return layer


@pytest.mark.parametrize("shape", ONE_VALUE_SHAPES, ids=shape_id)
def test_single_value_raise_refuses_like_torch_without_touching_state(shape, gen):
    layer = _layer(shape, gen)
    assert layer.single_value == "raise"
    before = snapshot_state(layer)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    _, torch_cls = bn_classes(len(shape))
    with pytest.raises(ValueError, match=TORCH_WORDS):  # torch's class and words
        torch_cls(shape[1], dtype=torch.float64)(x)
    with pytest.raises(ValueError, match=TORCH_WORDS):
        layer(x)
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize("real", [0, 1], ids=["no-real-value", "one-real-value"])
def test_single_value_raise_refuses_a_mask_with_fewer_than_two_real_values(real, gen):
    shape = (4, 3, 2)
    layer = _layer(shape, gen)
    before = snapshot_state(layer)
    mask = torch.zeros(4, 2, dtype=torch.bool)
    mask.view(-1)[:real] = True
    with pytest.raises(ValueError, match=rf"got {real} value\(s\) per channel .*{TORCH_WORDS}"):
        layer(torch.randn(shape, generator=gen, dtype=torch.float64), mask=mask)
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize("momentum", [0.1, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("shape", ONE_VALUE_SHAPES, ids=shape_id)
def test_single_value_use_running_normalizes_with_running_statistics(shape, momentum, gen):
    layer = _layer(shape, gen, momentum=momentum, single_value="use_running")
    before = snapshot_state(layer)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = layer(x)
    y.backward(grad)

    x_ref = x.detach().clone().requires_grad_(True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    want = F.batch_norm(
        x_ref, layer.running_mean, layer.running_var, weight, layer.bias.detach(), False, 0.1, EPS
    )
    want.backward(grad)
    tol = TOL[torch.float64]
    torch.testing.assert_close(y.detach(), want.detach(), **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(layer.weight.grad, weight.grad, **tol)
    assert_state_unchanged(layer, before)  # running statistics and counter included


@pytest.mark.parametrize("real", [0, 1], ids=["no-real-value", "one-real-value"])
def test_single_value_use_running_with_a_mask_of_fewer_than_two_real_values(real, gen):
    shape = (3, 2, 2)
    layer = _layer(shape, gen, single_value="use_running")
    before = snapshot_state(layer)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.zeros(3, 2, dtype=torch.bool)
    mask.view(-1)[:real] = True
    x.movedim(1, -1)[~mask] = float("nan")
    y = layer(x, mask=mask)
    real_values = x.movedim(1, -1)[mask]
    want = F.batch_norm(
        real_values, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.1
    )
    torch.testing.assert_close(y.movedim(1, -1)[mask], want, **TOL[torch.float64])
    assert not y.movedim(1, -1)[~mask].any()
    assert_state_unchanged(layer, before)


def test_single_value_use_running_leaves_ordinary_batches_alone(gen):
    shape = (5, 3)
    policy = _layer(shape, gen, single_value="use_running")
    default = _layer(shape, gen)
    default.load_state_dict(policy.state_dict())
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    assert torch.equal(policy(x), default(x))
    for key, value in default.state_dict().items():
        assert torch.equal(policy.state_dict()[key], value), key
    assert policy.num_batches_tracked.item() == 5


def test_single_value_use_running_in_eval_mode_is_plain_evaluation(gen):
    layer = _layer((1, 3), gen, single_value="use_running").eval()
    x = torch.randn(1, 3, generator=gen, dtype=torch.float64)
    want = F.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.1
    )
    torch.testing.assert_close(layer(x), want, **TOL[torch.float64])


@pytest.mark.parametrize("value", ["skip", "running", None, True])
def test_single_value_rejects_an_unknown_policy(value):
    with pytest.raises(ValueError, match=r"BatchNorm2d\(\): expected single_value to be one of"):
        batchnorm.BatchNorm2d(3, single_value=value)


def test_single_value_use_running_needs_running_statistics():
    with pytest.raises(
        ValueError, match=r"track_running_stats=True with single_value='use_running'"
    ):
        batchnorm.BatchNorm1d(3, track_running_stats=False, single_value="use_running")


@pytest.mark.parametrize(
    "cls", [batchnorm.BatchNorm1d, batchnorm.BatchNorm2d, batchnorm.BatchNorm3d]
)
def test_single_value_is_keyword_only_repr_only_when_set_and_not_in_state_dict(cls):
    parameter = inspect.signature(cls).parameters["single_value"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default == "raise"
    assert "single_value" not in repr(cls(3))
    layer = cls(3, single_value="use_running")
    assert layer.single_value == "use_running"
    assert repr(layer).endswith("single_value='use_running')")
    torch_layer = getattr(torch.nn, cls.__name__)(3)
    assert list(layer.state_dict()) == list(torch_layer.state_dict())
    torch_layer.load_state_dict(layer.state_dict())


def test_single_value_policy_is_not_on_the_scripted_twin():
    layer = batchnorm.BatchNorm1d(3, single_value="use_running")
    twin = layer.__prepare_scriptable__()
    assert "single_value" not in vars(twin)
