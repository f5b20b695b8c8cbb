"""The runner: run directories, atomic files, resume equals an uninterrupted run, lab plot.

Everything runs the ``tiny`` preset of figure1 (2 seeds x 40 steps on scikit-learn's digits,
a few seconds); these tests check structure and determinism, not the paper's claim.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct

import pytest
import torch

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
    assert config["config"] == dataclasses.asdict(TINY) | {
        "quantiles": list(TINY.quantiles),
        "inits": list(TINY.inits),
    }
    assert {"torch", "numba", "numpy", "batchnorm"} <= set(config["environment"])


def test_run_metrics_have_one_row_per_seed_arm_and_measurement(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    measured = TINY.steps // TINY.eval_every + 1  # step 0 included
    assert len(rows) == TINY.seeds * len(TINY.arms) * measured
    first = rows[0]
    assert {"seed", "arm", "step", "test_accuracy", "p15", "p50", "p85", "saturated"} <= set(first)
    assert first["train_loss"] is None and first["step"] == 0
    assert {r["step"] for r in rows} == set(range(0, TINY.steps + 1, TINY.eval_every))


def test_run_summary_states_claims_and_report(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert [c["key"] for c in summary["claims"]] == [r.key for r in figure1.RULES]
    assert {c["verdict"] for c in summary["claims"]} <= {"held", "not held", "inconclusive"}
    assert summary["seeds"] == [0, 1]
    report = (tiny_run / "summary.md").read_text()
    assert report.splitlines() == summary["report"]
    verdicts = ("HELD:", "NOT HELD:", "INCONCLUSIVE:")
    assert sum(line.startswith(verdicts) for line in summary["report"]) == len(figure1.RULES)
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
    figures = [tiny_run / "figures" / f"{name}.png" for name in ("figure1", "speed", "shift")]
    for figure in figures:
        figure.unlink()
    assert runner.plot_run(tiny_run, verbose=False) == figures
    for figure in figures:
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
    with pytest.raises(ValueError, match=r"unknown preset 'fast'.*tiny, quick, full, paper"):
        runner.make_config(experiment, "fast")
    with pytest.raises(ValueError, match=r"unknown \['epochs'\]"):
        runner.make_config(experiment, "tiny", {"epochs": 3})
    with pytest.raises(ValueError, match="expected seeds an int >= 1, got 0"):
        runner.make_config(experiment, "tiny", {"seeds": 0})


def test_get_experiment_suggests_the_nearest_name():
    names = ", ".join(sorted(e.cli_name for e in registry.EXPERIMENTS.values()))
    assert "figure1, " in names and names == ", ".join(sorted(names.split(", ")))
    with pytest.raises(
        ValueError,
        match=re.escape(f"unknown experiment 'figure-1'; choose one of: {names}.")
        + r" Did you mean 'figure1'\?",
    ):
        registry.get_experiment("figure-1")


# --- a run's files are checked before they are trusted ----------------------------------------
#
# An interrupted run of the tiny preset, made once: seed 0 complete (seeds/seed-0.json), seed 1
# stopped at step 30 with its checkpoint at step 20 (checkpoints/seed-1.pt). Each test damages a
# copy of it.


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("interrupted")
    experiment = registry.EXPERIMENTS["figure1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry.EXPERIMENTS, "figure1", interrupting(experiment, 1, 30))
        with pytest.raises(KeyboardInterrupt):
            runner.run_experiment("figure1", preset="tiny", out=out, progress=False, verbose=False)
    (run_dir,) = (out / "figure1").iterdir()
    return run_dir


@pytest.fixture
def run_copy(interrupted, tmp_path):
    target = tmp_path / "figure1" / interrupted.name
    shutil.copytree(interrupted, target)
    return target


@pytest.fixture
def trained(monkeypatch):
    """The seeds run_seed is called for; run_seed itself is the real one."""
    experiment = registry.EXPERIMENTS["figure1"]
    calls = []

    def run_seed(config, data, seed, **kwargs):
        calls.append(seed)
        return experiment.run_seed(config, data, seed, **kwargs)

    monkeypatch.setitem(
        registry.EXPERIMENTS, "figure1", dataclasses.replace(experiment, run_seed=run_seed)
    )
    return calls


def edit_checkpoint(path, edit) -> None:
    """Load a checkpoint, apply ``edit`` to the training state in it, save it back."""
    record = torch.load(path, weights_only=True)
    edit(record["state"] if "state" in record else record)
    torch.save(record, path)


def edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_json_like_checkpoint(path, key, value) -> None:
    """Set a key of the record around the training state (what the checkpoint belongs to)."""
    record = torch.load(path, weights_only=True)
    record[key] = value
    torch.save(record, path)


def set_item(key, value):
    return lambda d: d.__setitem__(key, value)


def assert_bad_file_error(err: pytest.ExceptionInfo, path) -> None:
    """One line in the b.4 format that starts with the file, and no advice to load unsafely."""
    message = str(err.value)
    assert type(err.value).__name__ == "RunFileError", f"{type(err.value).__name__}: {message}"
    assert isinstance(err.value, ValueError)
    assert message.startswith(f"{path}: expected "), message
    assert ", got " in message and "\n" not in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message


CHECKPOINT = "checkpoints/seed-1.pt"
SEED_FILE = "seeds/seed-0.json"

DAMAGE = {
    # checkpoints
    "checkpoint-empty": (CHECKPOINT, lambda p: p.write_bytes(b"")),
    "checkpoint-random-bytes": (CHECKPOINT, lambda p: p.write_bytes(bytes(range(7, 250, 3)) * 9)),
    "checkpoint-truncated": (CHECKPOINT, lambda p: p.write_bytes(p.read_bytes()[:500])),
    "checkpoint-empty-dict": (CHECKPOINT, lambda p: torch.save({}, p)),
    "checkpoint-a-list": (CHECKPOINT, lambda p: torch.save([1, 2], p)),
    "checkpoint-step-past-the-end": (
        CHECKPOINT,
        lambda p: edit_checkpoint(p, set_item("step", 1000)),
    ),
    "checkpoint-step-negative": (CHECKPOINT, lambda p: edit_checkpoint(p, set_item("step", -20))),
    "checkpoint-step-at-the-end": (CHECKPOINT, lambda p: edit_checkpoint(p, set_item("step", 40))),
    "checkpoint-step-between-checkpoints": (
        CHECKPOINT,
        lambda p: edit_checkpoint(p, set_item("step", 30)),
    ),
    "checkpoint-step-a-string": (CHECKPOINT, lambda p: edit_checkpoint(p, set_item("step", "20"))),
    "checkpoint-seconds-a-string": (
        CHECKPOINT,
        lambda p: edit_checkpoint(p, set_item("seconds", "x")),
    ),
    "checkpoint-without-models": (
        CHECKPOINT,
        lambda p: edit_checkpoint(p, lambda s: s.pop("models")),
    ),
    "checkpoint-weights-of-another-shape": (
        CHECKPOINT,
        lambda p: edit_checkpoint(
            p, lambda s: s["models"]["bn/paper"].__setitem__("fc1.weight", torch.zeros(3, 64))
        ),
    ),
    "checkpoint-history-cut-short": (
        CHECKPOINT,
        lambda p: edit_checkpoint(p, lambda s: s["history"]["bn/paper"]["test_loss"].pop()),
    ),
    "checkpoint-trace-of-other-steps": (
        CHECKPOINT,
        lambda p: edit_checkpoint(p, lambda s: s["traces"]["bn/paper"]["steps"].pop()),
    ),
    "checkpoint-of-an-earlier-version": (
        CHECKPOINT,
        lambda p: torch.save(torch.load(p, weights_only=True)["state"], p),
    ),
    "checkpoint-of-another-experiment": (
        CHECKPOINT,
        lambda p: edit_json_like_checkpoint(p, "experiment", "population"),
    ),
    # completed seeds
    "seed-empty": (SEED_FILE, lambda p: p.write_bytes(b"")),
    "seed-random-bytes": (SEED_FILE, lambda p: p.write_bytes(bytes(range(7, 250, 3)) * 9)),
    "seed-truncated": (SEED_FILE, lambda p: p.write_bytes(p.read_bytes()[:300])),
    "seed-empty-object": (SEED_FILE, lambda p: p.write_text("{}")),
    "seed-without-arms": (SEED_FILE, lambda p: edit_json(p, lambda d: d.pop("arms"))),
    "seed-of-another-seed": (SEED_FILE, lambda p: edit_json(p, set_item("seed", 1))),
    "seed-steps-cut-short": (
        SEED_FILE,
        lambda p: edit_json(p, lambda d: d["arms"]["bn/paper"]["test_accuracy"].pop()),
    ),
    # config.json
    "config-empty": ("config.json", lambda p: p.write_bytes(b"")),
    "config-random-bytes": ("config.json", lambda p: p.write_bytes(bytes(range(7, 250, 3)) * 9)),
    "config-empty-object": ("config.json", lambda p: p.write_text("{}")),
    "config-without-config": ("config.json", lambda p: edit_json(p, lambda d: d.pop("config"))),
    "config-missing-a-field": (
        "config.json",
        lambda p: edit_json(p, lambda d: d["config"].pop("lrs")),
    ),
    "config-value-of-a-wrong-type": (
        "config.json",
        lambda p: edit_json(p, lambda d: d["config"].__setitem__("seeds", "2")),
    ),
    "config-value-out-of-range": (
        "config.json",
        lambda p: edit_json(p, lambda d: d["config"].__setitem__("eval_every", 7)),
    ),
    "config-of-an-unknown-experiment": (
        "config.json",
        lambda p: edit_json(p, set_item("experiment", "figure9")),
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_reports_a_damaged_file_before_training_and_keeps_it(damage, run_copy, trained):
    name, break_it = DAMAGE[damage]
    path = run_copy / name
    break_it(path)
    before = path.read_bytes()
    with pytest.raises(ValueError) as err:
        runner.resume_run(run_copy, progress=False, verbose=False)
    assert_bad_file_error(err, path)
    assert trained == []  # reported before any seed trained
    assert path.read_bytes() == before  # the evidence is kept
    assert (run_copy / CHECKPOINT).is_file()
    assert not (run_copy / "seeds" / "seed-1.json").exists()
    assert not (run_copy / "summary.json").exists()


def test_resume_checks_every_checkpoint_before_the_first_seed_trains(run_copy, trained):
    # Seed 0 has to start over; seed 1's checkpoint lacks the model weights. Before the fix
    # seed 0 trained in full, then seed 1 ended in a KeyError.
    (run_copy / SEED_FILE).unlink()
    edit_checkpoint(run_copy / CHECKPOINT, lambda s: s.pop("models"))
    with pytest.raises(ValueError) as err:
        runner.resume_run(run_copy, progress=False, verbose=False)
    assert_bad_file_error(err, run_copy / CHECKPOINT)
    assert trained == []
    assert not (run_copy / SEED_FILE).exists()


def test_resume_refuses_a_checkpoint_of_another_seed(run_copy, trained):
    shutil.copy(run_copy / CHECKPOINT, run_copy / "checkpoints" / "seed-0.pt")
    (run_copy / SEED_FILE).unlink()
    with pytest.raises(ValueError, match="seed 0, got one of seed 1") as err:
        runner.resume_run(run_copy, progress=False, verbose=False)
    assert_bad_file_error(err, run_copy / "checkpoints" / "seed-0.pt")
    assert trained == []


def test_resume_refuses_a_checkpoint_of_another_config(run_copy, tmp_path, trained):
    # The same shapes and keys, saved by a run with another learning rate: continuing from it
    # would silently mix two configurations in one result.
    experiment = registry.EXPERIMENTS["figure1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry.EXPERIMENTS, "figure1", interrupting(experiment, 1, 30))
        with pytest.raises(KeyboardInterrupt):
            runner.run_experiment(
                "figure1",
                preset="tiny",
                overrides={"lrs": {**TINY.lrs, "bn/paper": 1.0}},
                out=tmp_path / "other",
                progress=False,
                verbose=False,
            )
    (other,) = (tmp_path / "other" / "figure1").iterdir()
    trained.clear()
    shutil.copy(other / CHECKPOINT, run_copy / CHECKPOINT)
    with pytest.raises(ValueError, match=r"lr") as err:
        runner.resume_run(run_copy, progress=False, verbose=False)
    assert_bad_file_error(err, run_copy / CHECKPOINT)
    assert trained == []


def truncating(experiment):
    """The experiment with run_seed returning a result one measurement short."""

    def run_seed(config, data, seed, **kwargs):
        result = experiment.run_seed(config, data, seed, **kwargs)
        for net in result["arms"].values():
            for key in ("steps", "test_accuracy", "test_loss", "train_loss"):
                net[key].pop()
        return result

    return dataclasses.replace(experiment, run_seed=run_seed)


def test_a_result_that_fails_its_check_is_not_written_and_the_checkpoint_is_kept(
    run_copy, monkeypatch
):
    monkeypatch.setitem(
        registry.EXPERIMENTS, "figure1", truncating(registry.EXPERIMENTS["figure1"])
    )
    checkpoint = (run_copy / CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match=r"^figure1\.run_seed\(seed=1\): expected .*steps") as err:
        runner.resume_run(run_copy, progress=False, verbose=False)
    assert "\n" not in str(err.value)
    assert not (run_copy / "seeds" / "seed-1.json").exists()
    assert (run_copy / CHECKPOINT).read_bytes() == checkpoint


def test_a_result_is_read_back_before_its_checkpoint_is_deleted(run_copy, monkeypatch):
    # A write that does not store what it was given (a full disk, a faulty device) is caught by
    # reading the file back; the checkpoint survives it.
    def faulty_write(path, data, compact=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data)[:200])

    monkeypatch.setattr(runner, "_write_json", faulty_write)
    with pytest.raises(ValueError) as err:
        runner.resume_run(run_copy, progress=False, verbose=False)
    assert_bad_file_error(err, run_copy / "seeds" / "seed-1.json")
    assert (run_copy / CHECKPOINT).is_file()


def test_a_stale_checkpoint_beside_a_verified_result_is_removed(run_copy, tiny_run):
    # An interruption between writing seed 1's result and deleting its checkpoint leaves both.
    shutil.copy(tiny_run / "seeds" / "seed-1.json", run_copy / "seeds" / "seed-1.json")
    assert runner.resume_run(run_copy, progress=False, verbose=False) == run_copy
    assert not (run_copy / "checkpoints").exists()
    assert seed_files(run_copy) == seed_files(tiny_run)


@pytest.mark.parametrize("name", ["seeds/seed-1.json", "summary.json", "config.json"])
def test_lab_plot_reports_a_damaged_file(name, tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / name).write_text('{"seed": 1')
    with pytest.raises(ValueError) as err:
        runner.plot_run(run_dir, verbose=False)
    assert_bad_file_error(err, run_dir / name)


def test_a_run_that_fails_to_start_leaves_no_run_directory(tmp_path):
    with pytest.raises(ValueError, match=r"load_dataset\('mnist'\): expected data_dir"):
        runner.run_experiment(
            "figure1", preset="tiny", overrides={"dataset": "mnist"}, out=tmp_path, verbose=False
        )
    with pytest.raises(ValueError, match=r"expected probe_size <= \d+"):
        runner.run_experiment(
            "figure1", preset="tiny", overrides={"probe_size": 5000}, out=tmp_path, verbose=False
        )
    assert list(tmp_path.rglob("*")) == []


def test_find_resumable_picks_the_newest_run_that_can_be_resumed(run_copy, tiny_run):
    parent = run_copy.parent
    (parent / f"{run_copy.name}-2").mkdir()  # no config.json: a start that failed
    (parent / f"{run_copy.name}-3").mkdir()
    (parent / f"{run_copy.name}-3" / "config.json").write_text("")  # unreadable
    (parent / f"{run_copy.name}-4").mkdir()
    (parent / f"{run_copy.name}-4" / "config.json").write_text('{"experiment": "population"}')
    shutil.copytree(tiny_run, parent / f"{run_copy.name}-5")  # complete
    assert runner.find_resumable(parent.parent, "figure1") == run_copy


def test_find_resumable_orders_runs_of_the_same_second_by_number(run_copy):
    # 20261204-170154-10 is newer than 20261204-170154-9, though it sorts before it as text.
    for k in (9, 10):
        shutil.copytree(run_copy, run_copy.parent / f"{run_copy.name}-{k}")
    assert runner.find_resumable(run_copy.parent.parent, "figure1").name == f"{run_copy.name}-10"
