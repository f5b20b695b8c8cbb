"""ActivationMonitor: the right numbers on hand-made tensors, schedules, capture, clean detach.

Oracles are worked out by hand: a unit whose values are 0, 1, ..., 100 has its q-quantile at
exactly 100 q under linear interpolation (the quantile sits on the value with index 100 q), mean
50 and population variance (101**2 - 1) / 12 = 850.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm.monitor import ActivationMonitor, ActivationTrace

LEVELS = (0.15, 0.5, 0.85)


def ramp(units: int = 3) -> torch.Tensor:
    """(101, units): unit u holds 0..100 shifted by 1000 u, rows in a shuffled order."""
    base = torch.arange(101, dtype=torch.float64)
    order = torch.randperm(101, generator=torch.Generator().manual_seed(0))
    return torch.stack([base[order] + 1000 * u for u in range(units)], dim=1)


def sigmoid_net() -> nn.Sequential:
    return nn.Sequential(nn.Identity(), nn.Sigmoid())


def test_monitor_records_hand_computed_quantiles_mean_std_per_unit():
    net = sigmoid_net()
    with ActivationMonitor(net, nn.Sigmoid, quantiles=LEVELS, every=1) as monitor:
        net(ramp())
    (record,) = monitor.records
    assert (record.layer, record.where, record.per, record.step, record.count) == (
        "1",
        "input",
        "unit",
        0,
        101,
    )
    want = np.array([[15.0, 50.0, 85.0]]) + 1000.0 * np.arange(3)[:, None]
    np.testing.assert_allclose(record.quantiles, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(record.mean, 50.0 + 1000.0 * np.arange(3), rtol=1e-15)
    np.testing.assert_allclose(record.std, np.full(3, math.sqrt(850.0)), rtol=1e-14)


def test_monitor_per_layer_pools_every_value():
    net = sigmoid_net()
    x = torch.arange(100, dtype=torch.float32).reshape(25, 4)  # values 0..99
    with ActivationMonitor(net, nn.Sigmoid, per="layer", quantiles=(0.0, 0.5, 1.0)) as monitor:
        net(x)
    (record,) = monitor.records
    # 0..99: median halfway between 49 and 50, min 0, max 99.
    np.testing.assert_allclose(record.quantiles, [[0.0, 49.5, 99.0]])
    assert record.mean.shape == (1,) and record.count == 100


def test_monitor_saturation_of_sigmoid_input_and_output():
    # sigmoid(+-10) is within 5e-5 of an asymptote (saturated); sigmoid(0) and sigmoid(1) not.
    x = torch.tensor([[-10.0], [0.0], [1.0], [10.0]])
    for where in ("input", "output"):
        net = sigmoid_net()
        with ActivationMonitor(net, nn.Sigmoid, where=where) as monitor:
            net(x)
        np.testing.assert_allclose(monitor.records[0].saturated, [0.5])


def test_monitor_saturation_of_tanh_and_none_for_other_layers():
    net = nn.Sequential(nn.Linear(1, 1), nn.Tanh())
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
    x = torch.tensor([[-5.0], [0.1], [0.2], [0.3]])  # tanh(-5) = -0.99991: one in four
    with ActivationMonitor(net, (nn.Linear, nn.Tanh), where="output") as monitor:
        net(x)
    by_layer = {r.layer: r for r in monitor.records}
    np.testing.assert_allclose(by_layer["1"].saturated, [0.25])
    assert by_layer["0"].saturated is None


def test_monitor_output_of_a_layer_is_its_result():
    net = sigmoid_net()
    x = torch.zeros(10, 2)  # sigmoid(0) = 0.5 exactly
    with ActivationMonitor(net, nn.Sigmoid, where="output") as monitor:
        net(x)
    np.testing.assert_array_equal(monitor.records[0].quantiles, np.full((2, 3), 0.5))


def test_monitor_per_unit_of_a_conv_input_is_per_channel():
    x = torch.zeros(2, 3, 4, 5)
    for c in range(3):
        x[:, c] = c  # channel c is constant c over batch and space
    net = nn.Sequential(nn.Conv2d(3, 3, 1))
    with ActivationMonitor(net, nn.Conv2d) as monitor:
        net(x)
    record = monitor.records[0]
    assert record.count == 2 * 4 * 5
    np.testing.assert_array_equal(record.quantiles, np.repeat([[0.0], [1.0], [2.0]], 3, axis=1))
    assert record.saturated is None


def test_monitor_schedule_records_first_forward_of_every_kth_step():
    net = sigmoid_net()
    with ActivationMonitor(net, nn.Sigmoid, every=2) as monitor:
        for step in range(5):
            net(torch.full((4, 1), float(step)))
            net(torch.full((4, 1), 100.0))  # a second pass in the same step: not recorded
            monitor.step()
    assert [r.step for r in monitor.records] == [0, 2, 4]
    assert [r.mean.item() for r in monitor.records] == [0.0, 2.0, 4.0]


def test_monitor_capture_pools_forwards_and_ignores_schedule():
    net = sigmoid_net()
    x = ramp(units=2)
    with ActivationMonitor(net, nn.Sigmoid, every=None) as monitor:
        net(x)  # every=None: nothing recorded outside capture
        assert monitor.records == []
        with monitor.capture(step=7):
            net(x[:40])
            net(x[40:])
    (record,) = monitor.records
    assert record.step == 7 and record.count == 101
    np.testing.assert_allclose(record.quantiles[0], [15.0, 50.0, 85.0], atol=1e-12)


def test_monitor_capture_copies_values_before_in_place_changes():
    net = nn.Sequential(nn.Identity(), nn.Sigmoid())
    x = torch.ones(5, 1)
    with ActivationMonitor(net, nn.Identity, where="output", every=None) as monitor:
        with monitor.capture():
            out = net[0](x)
            out.mul_(100.0)  # changes the captured tensor's storage after the hook ran
    assert monitor.records[0].mean.item() == 1.0


def test_monitor_detach_removes_hooks_and_keeps_outputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2), nn.Sigmoid())
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    before = net(x)
    hooks_before = [dict(m._forward_hooks) for m in net.modules()]
    monitor = ActivationMonitor(net, nn.Sigmoid)
    with monitor:
        assert monitor.attached
        during = net(x)
        assert sum(len(m._forward_hooks) for m in net.modules()) == 2
    assert not monitor.attached
    assert [dict(m._forward_hooks) for m in net.modules()] == hooks_before
    assert torch.equal(before, during) and torch.equal(before, net(x))
    n = len(monitor.records)
    net(x)
    assert len(monitor.records) == n  # detached: nothing more recorded
    monitor.detach()  # a second detach is harmless


def test_monitor_records_are_detached_numpy_arrays():
    net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid())
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    with ActivationMonitor(net, nn.Sigmoid) as monitor:
        net(x).sum().backward()
    record = monitor.records[0]
    for array in (record.quantiles, record.mean, record.std, record.saturated):
        assert isinstance(array, np.ndarray) and array.dtype == np.float64


def test_monitor_selects_layers_by_name_in_model_order():
    net = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 2), nn.Sigmoid())
    monitor = ActivationMonitor(net, ["3", "1"])
    assert monitor.layer_names == ("1", "3")


def test_monitor_rejects_unknown_name_listing_choices_and_nearest():
    net = nn.Sequential()
    net.add_module("act1", nn.Sigmoid())
    with pytest.raises(ValueError, match=r"got \['act2'\]; choose from: '', 'act1'.*Did you mean"):
        ActivationMonitor(net, "act2")


def test_monitor_rejects_type_that_matches_nothing():
    with pytest.raises(ValueError, match=r"expected at least one submodule of type Tanh"):
        ActivationMonitor(nn.Sequential(nn.Linear(2, 2)), nn.Tanh)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"where": "inside"}, "where"),
        ({"per": "channel"}, "per"),
        ({"every": 0}, "every"),
        ({"quantiles": (0.5, 1.5)}, "quantile levels"),
        ({"quantiles": ()}, "quantile levels"),
        ({"saturation_level": 0.4}, "saturation_level"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_monitor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivationMonitor(sigmoid_net(), nn.Sigmoid, **kwargs)


def test_monitor_capture_needs_attached_monitor():
    monitor = ActivationMonitor(sigmoid_net(), nn.Sigmoid)
    with pytest.raises(RuntimeError, match="attached"):
        with monitor.capture():
            pass


def test_trace_stacks_records_and_round_trips_through_json():
    net = sigmoid_net()
    with ActivationMonitor(net, nn.Sigmoid, every=1) as monitor:
        for step in range(3):
            net(ramp(units=2) * (step + 1))
            monitor.step()
    trace = monitor.trace("1")
    assert trace.steps.tolist() == [0, 1, 2]
    assert trace.quantiles.shape == (3, 2, 3) and trace.saturated.shape == (3, 2)
    np.testing.assert_allclose(trace.quantiles[2, 0], [45.0, 150.0, 255.0], atol=1e-12)
    back = ActivationTrace.from_dict(json.loads(json.dumps(trace.to_dict())))
    for field in ("steps", "count", "quantiles", "mean", "std", "saturated"):
        np.testing.assert_array_equal(getattr(back, field), getattr(trace, field))
    again = ActivationTrace.from_records(back.records())
    np.testing.assert_array_equal(again.quantiles, trace.quantiles)


def _tensorboard_available() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _tensorboard_available(), reason="tensorboard is not installed")
def test_monitor_writes_tensorboard_events(tmp_path):
    net = sigmoid_net()
    with ActivationMonitor(net, nn.Sigmoid, log_dir=str(tmp_path)) as monitor:
        net(ramp())
        monitor.step()
    assert list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.skipif(_tensorboard_available(), reason="tensorboard is installed")
def test_monitor_without_tensorboard_says_how_to_install(tmp_path):
    with pytest.raises(ModuleNotFoundError, match=r'pip install "batchnorm\[tensorboard\]"'):
        ActivationMonitor(sigmoid_net(), nn.Sigmoid, log_dir=str(tmp_path))
