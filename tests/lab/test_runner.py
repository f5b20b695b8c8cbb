"""The runner: run directories, atomic files, resume equals an uninterrupted run, lab plot.

Everything runs the ``tiny`` preset of figure1 (2 seeds x 40 steps on scikit-learn's digits,
a few seconds); these tests check structure and determinism, not the paper's claim.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct

import pytest

from batchnorm.lab import registry, runner
from batchnorm.lab.experiments import figure1

TINY = figure1.PRESETS["tiny"]


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; asserts the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def no_temporary_files(run_dir) -> bool:
    return not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def seed_files(run_dir) -> dict[str, dict]:
    out = {}
    for path in sorted((run_dir / "seeds").glob("seed-*.json")):
        result = json.loads(path.read_text())
        result.pop("seconds")  # wall time: the only field allowed to differ
        out[path.name] = result
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return runner.run_experiment("figure1", preset="tiny", out=out, progress=False, verbose=False)


def test_run_writes_every_file(tiny_run):
    assert tiny_run.parent.name == "figure1"
    for name in ("config.json", "metrics.jsonl", "summary.json", "summary.md"):
        assert (tiny_run / name).is_file(), name
    assert sorted(p.name for p in (tiny_run / "seeds").iterdir()) == ["seed-0.json", "seed-1.json"]
    assert not (tiny_run / "checkpoints").exists()
    assert no_temporary_files(tiny_run)
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["experiment"] == "figure1" and config["preset"] == "tiny"
    assert config["config"] == dataclasses.asdict(TINY) | {"quantiles": list(TINY.quantiles)}
    assert {"torch", "numba", "numpy", "batchnorm"} <= set(config["environment"])


def test_run_metrics_have_one_row_per_seed_network_and_measurement(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    measured = TINY.steps // TINY.eval_every + 1  # step 0 included
    assert len(rows) == TINY.seeds * len(figure1.NETWORKS) * measured
    first = rows[0]
    assert {"seed", "network", "step", "test_accuracy", "p15", "p50", "p85", "saturated"} <= set(
        first
    )
    assert first["train_loss"] is None and first["step"] == 0
    assert {r["step"] for r in rows} == set(range(0, TINY.steps + 1, TINY.eval_every))


def test_run_summary_states_claims_and_report(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert [type(c["held"]) for c in summary["claims"]] == [bool, bool]
    assert summary["seeds"] == [0, 1]
    report = (tiny_run / "summary.md").read_text()
    assert report.splitlines() == summary["report"]
    assert report.count("HELD:") == 2  # "HELD:" or "DID NOT HOLD:" for each claim
    assert "percentile range" in report


def test_run_figure_is_a_real_png_of_plausible_size(tiny_run):
    path = tiny_run / "figures" / "figure1.png"
    width, height = png_size(path)
    assert 800 <= width <= 2000 and 300 <= height <= 1000
    assert 20_000 < path.stat().st_size < 600_000


def test_plot_run_regenerates_figures_from_json_alone(tiny_run, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("lab plot must not train")

    experiment = registry.EXPERIMENTS["figure1"]
    monkeypatch.setitem(
        registry.EXPERIMENTS, "figure1", dataclasses.replace(experiment, run_seed=no_training)
    )
    figure = tiny_run / "figures" / "figure1.png"
    figure.unlink()
    assert runner.plot_run(tiny_run, verbose=False) == [figure]
    png_size(figure)


def interrupting(experiment, seed_to_stop: int, after_steps: int):
    """The experiment with run_seed raising KeyboardInterrupt mid-way through one seed."""

    def run_seed(config, data, seed, *, checkpoint, save_checkpoint, advance):
        done = 0

        def counting(n):
            nonlocal done
            done += n
            advance(n)
            if seed == seed_to_stop and done >= after_steps:
                raise KeyboardInterrupt

        return experiment.run_seed(
            config,
            data,
            seed,
            checkpoint=checkpoint,
            save_checkpoint=save_checkpoint,
            advance=counting,
        )

    return dataclasses.replace(experiment, run_seed=run_seed)


def test_resume_after_interrupt_equals_uninterrupted_run(tiny_run, tmp_path, monkeypatch):
    experiment = registry.EXPERIMENTS["figure1"]
    # Seed 1 stops at step 30; its last checkpoint is at step 20 (checkpoint_every=20).
    with monkeypatch.context() as patch:
        patch.setitem(registry.EXPERIMENTS, "figure1", interrupting(experiment, 1, 30))
        with pytest.raises(KeyboardInterrupt):
            runner.run_experiment("figure1", preset="tiny", out=tmp_path, verbose=False)
    (run_dir,) = (tmp_path / "figure1").iterdir()
    assert (run_dir / "seeds" / "seed-0.json").is_file()
    assert not (run_dir / "seeds" / "seed-1.json").exists()
    assert (run_dir / "checkpoints" / "seed-1.pt").is_file()
    assert not (run_dir / "summary.json").exists()
    assert no_temporary_files(run_dir)

    assert runner.find_resumable(tmp_path, "figure1") == run_dir
    assert runner.resume_run(run_dir, progress=False, verbose=False) == run_dir
    assert (run_dir / "summary.json").is_file()
    assert not (run_dir / "checkpoints").exists()
    assert seed_files(run_dir) == seed_files(tiny_run)
    assert (run_dir / "metrics.jsonl").read_text() == (tiny_run / "metrics.jsonl").read_text()


def test_resume_of_a_complete_run_is_refused(tiny_run):
    with pytest.raises(ValueError, match="complete.*batchnorm lab plot"):
        runner.resume_run(tiny_run)


def test_find_resumable_without_incomplete_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected an incomplete run of 'figure1'"):
        runner.find_resumable(tmp_path, "figure1")


def test_load_run_of_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runner.load_run(tmp_path / "nope")


def test_make_config_overrides_and_errors():
    experiment = registry.get_experiment("figure1")
    config = runner.make_config(experiment, "tiny", {"seeds": 5, "dataset": None})
    assert config.seeds == 5 and config.dataset == TINY.dataset
    assert runner.make_config(experiment).steps == figure1.PRESETS["quick"].steps
    with pytest.raises(ValueError, match=r"unknown preset 'fast'.*tiny, quick, paper"):
        runner.make_config(experiment, "fast")
    with pytest.raises(ValueError, match=r"unknown \['epochs'\]"):
        runner.make_config(experiment, "tiny", {"epochs": 3})
    with pytest.raises(ValueError, match="expected seeds an int >= 1, got 0"):
        runner.make_config(experiment, "tiny", {"seeds": 0})


def test_get_experiment_suggests_the_nearest_name():
    names = ", ".join(sorted(e.cli_name for e in registry.EXPERIMENTS.values()))
    assert names.startswith("figure1, ")
    with pytest.raises(
        ValueError,
        match=re.escape(f"unknown experiment 'figure-1'; choose one of: {names}.")
        + r" Did you mean 'figure1'\?",
    ):
        registry.get_experiment("figure-1")
