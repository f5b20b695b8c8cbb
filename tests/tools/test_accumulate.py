"""``accumulate_statistics``: k micro-batches, one running update, as for their union.

The oracle is one training call of a torch.nn layer (same starting state) on the concatenation
of the micro-batches each layer saw: running statistics and ``num_batches_tracked`` must match
it; outputs inside the block must be the ordinary per-micro-batch outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import accumulate_statistics
from conftest import TOL, assert_state_unchanged, randomize_bn_state, snapshot_state

SIZES = [3, 5, 2, 6]  # micro-batch sizes, unequal on purpose


def _layer(impl, cls_name, channels, momentum, gen, dtype=torch.float64):
    cls = getattr(batchnorm if impl == "ours" else nn, cls_name)
    layer = cls(channels, momentum=momentum, dtype=dtype)
    randomize_bn_state(layer, gen)
    with torch.no_grad():
        layer.num_batches_tracked.fill_(7)
    return layer


def _micro_batches(tail, gen, dtype=torch.float64):
    return [
        torch.randn(n, *tail, generator=gen, dtype=torch.float64).to(dtype) * 3 + 2 for n in SIZES
    ]


def _oracle(layer, inputs):
    """A torch.nn twin of ``layer`` (same state), after one training call on the union."""
    twin = getattr(nn, type(layer).__name__)(
        layer.num_features, momentum=layer.momentum, dtype=layer.running_mean.dtype
    )
    twin.load_state_dict(layer.state_dict())
    twin(torch.cat(inputs))
    return twin


def _assert_stats_equal(layer, twin):
    tol = TOL[layer.running_mean.dtype]
    torch.testing.assert_close(layer.running_mean, twin.running_mean, **tol)
    torch.testing.assert_close(layer.running_var, twin.running_var, **tol)
    assert layer.num_batches_tracked.item() == twin.num_batches_tracked.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize(
    ("cls_name", "tail"),
    [("BatchNorm1d", (3,)), ("BatchNorm1d", (3, 4)), ("BatchNorm2d", (3, 2, 3))],
    ids=["1d", "1d-length", "2d"],
)
@pytest.mark.parametrize("impl", ["ours", "torch"])
def test_accumulate_statistics_equals_one_update_from_the_union(
    impl, cls_name, tail, momentum, dtype, gen
):
    layer = _layer(impl, cls_name, tail[0], momentum, gen, dtype)
    plain = copy.deepcopy(layer)
    inputs = _micro_batches(tail, gen, dtype)
    want = _oracle(layer, inputs)
    with accumulate_statistics(layer):
        for x in inputs:
            # Each micro-batch is still normalized by its own statistics, as outside the block.
            torch.testing.assert_close(layer(x), plain(x), **TOL[dtype])
    _assert_stats_equal(layer, want)
    assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_accumulate_statistics_updates_each_layer_from_what_it_saw(gen):
    model = nn.Sequential(
        batchnorm.BatchNorm1d(4, dtype=torch.float64),
        nn.Linear(4, 3, dtype=torch.float64),
        nn.BatchNorm1d(3, momentum=None, dtype=torch.float64),
    )
    for module in (model[0], model[2]):
        randomize_bn_state(module, gen)
    inputs = _micro_batches((4,), gen)
    # What the second layer sees: its inputs in an ordinary run of the same micro-batches.
    reference = copy.deepcopy(model)
    seen = []
    reference[2].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    for x in inputs:
        reference(x)
    want = [_oracle(model[0], inputs), _oracle(model[2], seen)]
    with accumulate_statistics(model):
        for x in inputs:
            model(x)
    _assert_stats_equal(model[0], want[0])
    _assert_stats_equal(model[2], want[1])


@pytest.mark.parametrize("impl", ["ours", "torch"])
def test_accumulate_statistics_restores_everything_after_an_exception(impl, gen):
    layer = _layer(impl, "BatchNorm2d", 3, 0.1, gen)
    before = snapshot_state(layer)
    with pytest.raises(RuntimeError, match="stop"):
        with accumulate_statistics(layer):
            for x in _micro_batches((3, 2, 2), gen)[:2]:
                layer(x)
            raise RuntimeError("stop")
    assert_state_unchanged(layer, before)
    assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_accumulate_statistics_restores_the_skip_count_after_an_exception(gen):
    layer = _layer("ours", "BatchNorm1d", 2, 0.1, gen)
    before = snapshot_state(layer)
    bad = torch.full((4, 2), float("nan"), dtype=torch.float64)
    with pytest.raises(KeyError):
        with accumulate_statistics(layer):
            with pytest.warns(batchnorm.NonFiniteStatisticsWarning):
                layer(bad)
            assert layer.nonfinite_batches_skipped == 1
            raise KeyError("stop")
    assert layer.nonfinite_batches_skipped == 0
    assert_state_unchanged(layer, before)


def test_accumulate_statistics_leaves_out_what_the_layer_left_out(gen):
    # A non-finite micro-batch and a one-value micro-batch (single_value="use_running") are not
    # counted by the layer; the block's update is that of the other micro-batches.
    layer = batchnorm.BatchNorm1d(2, dtype=torch.float64, single_value="use_running")
    randomize_bn_state(layer, gen)
    inputs = _micro_batches((2,), gen)
    want = _oracle(layer, inputs)
    with accumulate_statistics(layer):
        layer(inputs[0])
        with pytest.warns(batchnorm.NonFiniteStatisticsWarning):
            layer(torch.full((3, 2), float("nan"), dtype=torch.float64))
        layer(torch.randn(1, 2, generator=gen, dtype=torch.float64))
        for x in inputs[1:]:
            layer(x)
    _assert_stats_equal(layer, want)
    assert layer.nonfinite_batches_skipped == 1


def test_accumulate_statistics_respects_masks(gen):
    layer = _layer("ours", "BatchNorm1d", 3, 0.1, gen)
    inputs = _micro_batches((3, 5), gen)
    masks = [torch.rand(x.shape[0], 5, generator=gen) < 0.6 for x in inputs]
    for mask in masks:
        mask[0, :2] = True
        mask[-1, -1] = False
    real = [x.movedim(1, -1)[mask] for x, mask in zip(inputs, masks, strict=True)]
    want = _oracle(layer, real)
    with accumulate_statistics(layer):
        layer(inputs[0], masks[0])  # positionally
        for x, mask in zip(inputs[1:], masks[1:], strict=True):
            x = x.clone()
            x.movedim(1, -1)[~mask] = float("nan")  # padding never counts
            layer(x, mask=mask)
    _assert_stats_equal(layer, want)


def test_accumulate_statistics_leaves_evaluation_mode_layers_alone(gen):
    model = nn.Sequential(
        _layer("ours", "BatchNorm1d", 3, 0.1, gen), _layer("torch", "BatchNorm1d", 3, 0.1, gen)
    ).eval()
    before = snapshot_state(model)
    with accumulate_statistics(model):
        for x in _micro_batches((3,), gen):
            model(x)
    assert_state_unchanged(model, before)


def test_accumulate_statistics_of_a_lazy_layer(gen):
    layer = nn.LazyBatchNorm1d(dtype=torch.float64)
    inputs = _micro_batches((3,), gen)
    want = nn.BatchNorm1d(3, dtype=torch.float64)
    want(torch.cat(inputs))
    with accumulate_statistics(layer):
        for x in inputs:
            layer(x)
    _assert_stats_equal(layer, want)


def test_accumulate_statistics_rejects_a_non_module_and_warns_without_batchnorm():
    with pytest.raises(TypeError, match=r"accumulate_statistics\(\): expected a torch.nn.Module"):
        with accumulate_statistics([nn.BatchNorm1d(3)]):
            pass
    with pytest.warns(UserWarning, match="expected a model with BatchNorm layers"):
        with accumulate_statistics(nn.Linear(2, 2)):
            pass


def test_accumulate_statistics_is_exported_at_top_level():
    assert batchnorm.accumulate_statistics is accumulate_statistics
    assert "accumulate_statistics" in batchnorm.__all__
