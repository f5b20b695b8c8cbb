"""Every claims experiment through the runner's checkpoint files: each checkpoint a tiny seed
saves is accepted when read back, and a seed resumed from it gives the uninterrupted result."""

from __future__ import annotations

import pytest

from batchnorm.lab import registry, runner
from batchnorm.lab._run_files import checkpoint_record, load_checkpoint

CLAIMS = [name for name in registry.EXPERIMENTS if name not in ("figure1", "population")]


def _without_seconds(value):
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


@pytest.mark.parametrize("name", CLAIMS)
def test_each_checkpoint_loads_through_the_runner_and_resumes_to_the_same_result(name, tmp_path):
    import torch

    experiment = registry.EXPERIMENTS[name]
    config = runner.make_config(experiment, "tiny")
    data = experiment.prepare(config)
    saved = []
    whole = experiment.run_seed(
        config, data, 0, checkpoint=None, save_checkpoint=saved.append, advance=None
    )
    assert saved, f"{name}: the tiny preset saved no checkpoint to resume from"
    path = tmp_path / "seed-0.pt"
    for state in saved[:2]:
        torch.save(checkpoint_record(experiment, config, 0, state), path)
        loaded = load_checkpoint(path, experiment, config, 0, data)
        resumed = experiment.run_seed(
            config, data, 0, checkpoint=loaded, save_checkpoint=None, advance=None
        )
        assert _without_seconds(resumed) == _without_seconds(whole), name
