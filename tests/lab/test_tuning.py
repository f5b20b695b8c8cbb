"""``batchnorm lab tune``: each arm on its own, the grid extended until it brackets the best."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from batchnorm.lab import registry, tuning
from batchnorm.lab.protocol import TUNING_SEED


def _peaked(config, data, arm, value, seed):
    """A score with its peak at 0.3 for arm "a" and at 30 for arm "b" (a log-parabola)."""
    assert seed == TUNING_SEED  # tuning never runs on an evaluation seed
    peak = {"a": 0.3, "b": 30.0}[arm]
    return -((math.log(value) - math.log(peak)) ** 2)


@pytest.fixture
def fake(monkeypatch):
    experiment = registry.EXPERIMENTS["figure1"]
    fake = dataclasses.replace(
        experiment,
        prepare=lambda config: None,
        tuning=registry.Tuning(
            arms=lambda config: ["a", "b"],
            score=_peaked,
            grid=(0.1, 0.3, 1.0),
            factor=3.0,
            metric="test score",
            preset="tiny",
            max_extensions=2,
        ),
    )
    monkeypatch.setitem(registry.EXPERIMENTS, "figure1", fake)
    return fake


def test_each_arm_gets_its_own_best_value_and_the_grid_is_extended(fake, tmp_path):
    path = tmp_path / "tuned.json"
    lines = []
    record = tuning.tune_experiment("figure1", workers=1, path=path, log=lines.append)
    a, b = record["arms"]["a"], record["arms"]["b"]
    assert a["lr"] == 0.3 and a["bracketed"] and a["grid"] == [0.1, 0.3, 1.0]
    # b's peak (30) is far above the grid: two extensions (3, 9) and still at the edge.
    assert b["grid"] == [0.1, 0.3, 1.0, 3.0, 9.0] and b["lr"] == 9.0 and not b["bracketed"]
    assert record["seed"] == TUNING_SEED and record["preset"] == "tiny"
    assert json.loads(path.read_text())["figure1"] == record
    assert any("at the edge of the grid" in line for line in lines)


def test_an_experiment_without_tuning_is_refused(fake, monkeypatch):
    monkeypatch.setitem(registry.EXPERIMENTS, "figure1", dataclasses.replace(fake, tuning=None))
    with pytest.raises(ValueError, match="expected an experiment with a tuning grid"):
        tuning.tune_experiment("figure1")


def test_the_committed_tuned_file_brackets_or_says_it_does_not():
    from batchnorm.lab.protocol import read_tuned

    for name, record in read_tuned().items():
        experiment = registry.EXPERIMENTS[name]
        assert record["seed"] == TUNING_SEED
        for arm, entry in record["arms"].items():
            scores = [s if s is not None else -math.inf for s in entry["scores"]]
            best = entry["grid"][scores.index(max(scores))]
            assert entry[experiment.tuning.hyper_parameter] == best, (name, arm)
            inside = 0 < scores.index(max(scores)) < len(scores) - 1
            assert entry["bracketed"] == inside, (name, arm)
