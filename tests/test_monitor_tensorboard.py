"""``ActivationMonitor(log_dir=...)`` writes TensorBoard events that TensorBoard itself can read.

The events are read back with TensorBoard's own reader (``EventAccumulator``, the loader behind
the TensorBoard UI), not by looking for a file: every record must come back as one histogram of
the layer's values and one scalar per summary (unit-averaged quantiles, mean, std and, for a
sigmoid or tanh, the saturated fraction), under the tags and at the steps the monitor documents.
Needs the ``tensorboard`` extra, which the test environment installs (``scripts/setup.sh``); an
environment without it fails here on purpose instead of skipping.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn

from batchnorm.monitor import ActivationMonitor

LEVELS = (0.15, 0.5, 0.85)
SUMMARIES = ("q15", "q50", "q85", "mean", "std")


def _read(log_dir) -> ea.EventAccumulator:
    # 0 = keep every event; the defaults sample histograms down to 1 per tag.
    guidance = {ea.HISTOGRAMS: 0, ea.SCALARS: 0}
    events = ea.EventAccumulator(str(log_dir), size_guidance=guidance)
    events.Reload()
    return events


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))


def test_tensorboard_events_hold_a_histogram_and_scalars_per_record(tmp_path):
    net = _net()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    monitor = ActivationMonitor(
        net, (nn.Sigmoid, nn.Linear), where="input", every=2, quantiles=LEVELS, log_dir=tmp_path
    )
    with monitor:
        for _ in range(5):  # steps 0..4: the schedule records 0, 2 and 4
            net(x)
            monitor.step()
        with monitor.capture(step=10):
            net(x)
            net(x)
    assert list(tmp_path.glob("events.out.tfevents.*")), "no event file written"

    events = _read(tmp_path)
    tags = events.Tags()
    layers = {"0": False, "1": True, "2": False}  # name -> is a saturating activation
    expected_histograms = {f"{name}/input" for name in layers}
    expected_scalars = {f"{name}/input/{s}" for name in layers for s in SUMMARIES}
    expected_scalars |= {f"{name}/input/saturated" for name, sat in layers.items() if sat}
    assert set(tags["histograms"]) == expected_histograms
    assert set(tags["scalars"]) == expected_scalars

    steps = [0, 2, 4, 10]
    for name in layers:
        records = [r for r in monitor.records if r.layer == name]
        assert [r.step for r in records] == steps
        tag = f"{name}/input"
        histograms = events.Histograms(tag)
        assert [h.step for h in histograms] == steps
        for hist, record in zip(histograms, records, strict=True):
            value = hist.histogram_value
            # every value of the record's distribution is in the histogram (2 passes pooled at 10)
            assert value.num == record.count * record.mean.size
            # the histogram's mean is the mean of the per-unit means (equal counts per unit)
            assert value.sum / value.num == pytest.approx(record.mean.mean(), rel=1e-5, abs=1e-6)
        for summary in SUMMARIES + (("saturated",) if layers[name] else ()):
            scalars = events.Scalars(f"{tag}/{summary}")
            assert [s.step for s in scalars] == steps
            if summary.startswith("q"):
                column = LEVELS.index(float(summary[1:]) / 100)
                want = [r.quantiles[:, column].mean() for r in records]
            else:
                want = [getattr(r, summary).mean() for r in records]
            # TensorBoard stores scalars as float32
            np.testing.assert_allclose([s.value for s in scalars], want, rtol=1e-6, atol=1e-7)

    # the capture pooled two identical passes: twice the values of a scheduled record
    assert monitor.records[-1].count == 2 * monitor.records[0].count


def test_tensorboard_tag_of_the_root_module_is_model(tmp_path):
    layer = nn.Tanh()
    with ActivationMonitor(layer, nn.Tanh, where="output", every=1, log_dir=tmp_path) as monitor:
        layer(torch.linspace(-4, 4, 50).reshape(10, 5))
        monitor.step()
        layer(torch.linspace(-4, 4, 50).reshape(10, 5))
    tags = _read(tmp_path).Tags()
    assert tags["histograms"] == ["model/output"]
    assert set(tags["scalars"]) == {f"model/output/{s}" for s in (*SUMMARIES, "saturated")}
    saturated = _read(tmp_path).Scalars("model/output/saturated")
    assert [s.step for s in saturated] == [0, 1]
    assert saturated[0].value == pytest.approx(float(monitor.records[0].saturated.mean()))
