"""regularization: the gap and the verdicts on hand-made results, the arms' models (dropout
placement, ghost batches, shared weights), determinism and resume, the checks of results and
checkpoints, the settings, tuning and the figures.

The experiment runs its ``tiny`` preset (scikit-learn's digits, 30 steps per arm): these tests
check structure, determinism and the measures' arithmetic, not the paper's claim.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json

import matplotlib
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab import plots_regularization, protocol, registry, runner
from batchnorm.lab.experiments import regularization

matplotlib.use("Agg")

TINY = regularization.PRESETS["tiny"]
ONE_SEED = dataclasses.replace(TINY, seeds=1)
FIVE_SEEDS = dataclasses.replace(TINY, seeds=5)


@pytest.fixture(scope="module")
def tiny_data():
    return regularization.prepare(TINY)


@pytest.fixture(scope="module")
def one_seed_run(tiny_data):
    saved = []
    result = regularization.run_seed(
        ONE_SEED, tiny_data, 0, save_checkpoint=lambda s: saved.append(copy.deepcopy(s))
    )
    return result, saved


def without_seconds(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


def through_torch_save(state: dict) -> dict:
    """``state`` as the runner stores and reads a checkpoint (torch.load with weights_only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- the measures on hand-made results --------------------------------------------------------


def test_gap_is_train_minus_test_accuracy_in_points():
    run = {"diverged": False, "train_accuracy": 0.99, "test_accuracy": 0.705}
    assert regularization.gap_pp(run) == pytest.approx(28.5)  # 100 * (0.99 - 0.705)
    assert regularization.gap_pp({**run, "test_accuracy": 0.995}) == pytest.approx(-0.5)
    assert regularization.gap_pp({**run, "diverged": True}) is None


def fake_run(config, train, test, lr, diverged=False):
    """A train_classifier-shaped result with the given final accuracies, as check_arm accepts."""
    steps = config.measured_steps()
    return {
        "lr": lr,
        "curve": {
            "steps": steps,
            "train_loss": [None] + [1.0] * (len(steps) - 1),
            "val_accuracy": [test] * len(steps),
            "val_loss": [1.0] * len(steps),
        },
        "diverged": diverged,
        "diverged_at": None,
        "first_loss": 2.3,
        "test_accuracy": None if diverged else test,
        "test_loss": None if diverged else 1.0,
        "train_accuracy": None if diverged else train,
        "train_eval_loss": None if diverged else 0.1,
    }


# Final (train, test) accuracy per arm. none: gap 40 pp; bn: gap 25 pp, +10 pp test; dropout:
# +2 pp over none; bn+dropout: 0.5 pp over bn (less than 1 pp: dropout not needed); ghost:
# +1 pp over bn.
NUMBERS = {
    "none": (1.0, 0.60),
    "dropout": (0.9, 0.62),
    "bn": (0.95, 0.70),
    "bn+dropout": (0.9, 0.705),
    "ghost": (0.94, 0.71),
}


def hand_made(config, numbers):
    units = {
        arm: fake_run(config, *numbers[arm], lr=config.lrs[arm]) for arm in regularization.ARMS
    }
    return {
        seed: {"seed": seed, "seconds": 2.0, "units": copy.deepcopy(units)}
        for seed in range(config.seeds)
    }


def test_summary_follows_the_arithmetic():
    results = hand_made(FIVE_SEEDS, NUMBERS)
    for seed, result in results.items():
        regularization.check_result(FIVE_SEEDS, seed, result)  # a valid result
    summary = regularization.summarize(FIVE_SEEDS, results)
    by_key = {c["key"]: c for c in summary["claims"]}
    expected = {
        "gap": 15.0,  # 40 - 25
        "accuracy": 10.0,  # 70 - 60
        "dropout_helps": 2.0,  # 62 - 60
        "dropout_unneeded": -0.5,  # 70 - 70.5
        "ghost": 1.0,  # 71 - 70
    }
    for key, value in expected.items():
        assert by_key[key]["per_seed"] == pytest.approx([value] * 5), key
        assert by_key[key]["verdict"] == "held", key
    assert summary["arms"]["none"]["gap"]["mean"] == pytest.approx(40.0)
    assert summary["arms"]["bn"]["test_accuracy"]["mean"] == pytest.approx(0.70)
    assert "Every claim held." in summary["report"]
    json.dumps(summary, allow_nan=False)


def test_summary_verdicts_flip_when_the_arms_are_swapped():
    swapped = dict(NUMBERS)
    swapped["none"], swapped["bn"] = NUMBERS["bn"], NUMBERS["none"]
    swapped["bn+dropout"] = (0.9, 0.62)  # dropout now adds 2 pp on top of BN (60 -> 62)
    swapped["ghost"] = (0.94, 0.59)
    summary = regularization.summarize(FIVE_SEEDS, hand_made(FIVE_SEEDS, swapped))
    verdicts = {c["key"]: c["verdict"] for c in summary["claims"]}
    # gap: 25 - 40 = -15; accuracy -10; dropout over none 62 - 70 = -8; BN - (BN+dropout)
    # = 60 - 62 = -2 <= -1: dropout still helps; ghost 59 - 60 = -1.
    assert verdicts == dict.fromkeys(verdicts, "not held")
    assert set(verdicts) == {r.key for r in regularization.RULES}
    assert any("Dropout on top of BN: not held" in line for line in summary["report"])


def test_a_diverged_arm_is_left_out_of_the_gap_and_counts_as_chance_for_accuracy():
    results = hand_made(FIVE_SEEDS, NUMBERS)
    for result in results.values():
        result["units"]["bn"] = fake_run(FIVE_SEEDS, 0, 0, FIVE_SEEDS.lrs["bn"], diverged=True)
    summary = regularization.summarize(FIVE_SEEDS, results)
    keys = [c["key"] for c in summary["claims"]]
    assert "gap" not in keys  # no seed has BN's gap: not measured
    by_key = {c["key"]: c for c in summary["claims"]}
    assert by_key["accuracy"]["per_seed"] == pytest.approx([-50.0] * 5)  # 10 % - 60 %
    assert summary["arms"]["bn"]["diverged"] == [0, 1, 2, 3, 4]
    assert summary["arms"]["bn"]["gap"] is None


# --- the arms' models -------------------------------------------------------------------------


def dropouts(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_children() if isinstance(m, nn.Dropout)]


def test_bn_plus_dropout_has_one_dropout_right_before_the_output_layer(tiny_data):
    model = regularization.build_model(TINY, tiny_data, "bn+dropout", 0)
    names = [name for name, _ in model.named_children()]
    assert dropouts(model) == ["drop3"]
    assert names[-2:] == ["drop3", "out"]
    # ... and after the last BN layer and its activation.
    assert names.index("bn3") < names.index("act3") < names.index("drop3")
    assert model.drop3.p == TINY.dropout == 0.5


def test_dropout_arm_drops_after_every_hidden_layer_and_bn_arms_not_at_all(tiny_data):
    model = regularization.build_model(TINY, tiny_data, "dropout", 0)
    names = [name for name, _ in model.named_children()]
    assert dropouts(model) == ["drop1", "drop2", "drop3"]
    assert all(names[names.index(f"act{i}") + 1] == f"drop{i}" for i in (1, 2, 3))
    for arm in ("none", "bn", "ghost"):
        assert dropouts(regularization.build_model(TINY, tiny_data, arm, 0)) == [], arm


def test_ghost_arm_normalises_ghost_batches_and_every_arm_starts_from_the_same_weights(tiny_data):
    models = {
        arm: regularization.build_model(TINY, tiny_data, arm, 2) for arm in regularization.ARMS
    }
    ghost = models["ghost"].bn1
    assert isinstance(ghost, batchnorm.GhostBatchNorm1d) and ghost.virtual_batch_size == 16
    assert type(models["bn"].bn1) is batchnorm.BatchNorm1d
    for arm, model in models.items():
        assert torch.equal(model.fc2.weight, models["none"].fc2.weight), arm
        assert torch.equal(model.out.weight, models["none"].out.weight), arm
    other = regularization.build_model(TINY, tiny_data, "none", 3)
    assert not torch.equal(other.fc2.weight, models["none"].fc2.weight)


# --- end to end -------------------------------------------------------------------------------


def test_tiny_preset_runs_through_the_runner_and_replots(tmp_path):
    run_dir = batchnorm.lab.run_experiment(
        "regularization", preset="tiny", out=tmp_path, verbose=False
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = sorted(p.stem for p in (run_dir / "figures").glob("*.png"))
    assert figures == sorted(summary["figure_notes"]) == ["accuracy", "curves", "gap"]
    assert summary["experiment"] == "regularization" and summary["seeds"] == [0, 1]
    assert [c["key"] for c in summary["claims"]] == [r.key for r in regularization.RULES]
    assert all(c["for_record"] is False for c in summary["claims"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 5 * 4  # seeds x arms x measurements (steps 0, 10, 20, 30)
    assert runner.plot_run(run_dir, verbose=False)
    path = run_dir / "seeds" / "seed-0.json"
    result = json.loads(path.read_text())
    result["units"]["ghost"]["train_accuracy"] = "high"
    path.write_text(json.dumps(result))
    with pytest.raises(runner.RunFileError, match=r"seed-0.json.*\['ghost'\]\['train_accuracy'\]"):
        runner.load_run(run_dir)


def test_run_seed_is_deterministic_with_dropout_and_leaves_the_global_rng_alone(
    tiny_data, one_seed_run
):
    before = torch.get_rng_state()
    again = regularization.run_seed(ONE_SEED, tiny_data, 0)
    assert torch.equal(torch.get_rng_state(), before)
    assert without_seconds(again) == without_seconds(one_seed_run[0])
    assert list(again["units"]) == list(regularization.ARMS)


def test_resumed_seed_equals_the_uninterrupted_one(tiny_data, one_seed_run):
    whole, saved = one_seed_run
    assert [s["step"] for s in saved] == [30, 60, 90, 120]
    for state in (saved[0], saved[2]):
        state = through_torch_save(state)
        regularization.check_checkpoint(ONE_SEED, tiny_data, 0, state)
        resumed = regularization.run_seed(ONE_SEED, tiny_data, 0, checkpoint=state)
        assert without_seconds(resumed) == without_seconds(whole)


# --- checks of results and checkpoints ----------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["units"].pop("ghost"), r"expected units to hold every unit.*'ghost'"),
        (lambda r: r["units"]["bn"].update(lr=-1.0), r"units\['bn'\]\['lr'\]"),
        (
            lambda r: r["units"]["dropout"].update(test_accuracy=1.2),
            r"units\['dropout'\]\['test_accuracy'\] to be a fraction",
        ),
        (
            lambda r: r["units"]["none"]["curve"].pop("val_loss"),
            r"units\['none'\]\['curve'\] to have the key 'val_loss'",
        ),
        (lambda r: r.pop("seconds"), r"result to have the key 'seconds'"),
    ],
)
def test_check_result_names_the_damaged_entry(one_seed_run, edit, message):
    result = copy.deepcopy(one_seed_run[0])
    regularization.check_result(ONE_SEED, 0, result)
    edit(result)
    with pytest.raises(ValueError, match=message):
        regularization.check_result(ONE_SEED, 0, result)


def test_check_checkpoint_names_the_damaged_entry(tiny_data, one_seed_run):
    state = copy.deepcopy(one_seed_run[1][0])  # after the first arm
    state["units"]["none"]["diverged"] = "no"
    with pytest.raises(ValueError, match=r"units\['none'\]\['diverged'\] to be a bool"):
        regularization.check_checkpoint(ONE_SEED, tiny_data, 0, state)
    state = copy.deepcopy(one_seed_run[1][0])
    state["step"] = 60
    with pytest.raises(ValueError, match=r"state\['step'\] \(the steps of its units\) to be 30"):
        regularization.check_checkpoint(ONE_SEED, tiny_data, 0, state)
    longer = dataclasses.replace(ONE_SEED, arm_steps=40)
    with pytest.raises(ValueError, match=r"units\['none'\]\['curve'\]\['steps'\]"):
        regularization.check_checkpoint(longer, tiny_data, 0, one_seed_run[1][0])


# --- settings, tuning, registry, figures ------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dataset", "mnist1d-large", r"expected dataset one of \['mnist1d', 'digits'\]"),
        ("arm_steps", 35, r"expected arm_steps a positive multiple of eval_every, got 35"),
        ("dropout", 1.0, r"expected dropout a number in \(0, 1\), got 1.0"),
        ("virtual_batch_size", 64, r"expected virtual_batch_size an int >= 2 below batch_size"),
        ("virtual_batch_size", 12, r"expected virtual_batch_size .* that divides it, got 12"),
        ("momentum", -0.1, r"expected momentum a number in \[0, 1\)"),
        ("lrs", {"bn": 0.1}, r"expected lrs a learning rate > 0 for each of"),
        ("seeds", 0, r"expected seeds an int >= 1"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **{field: value})


def test_config_reads_each_arms_learning_rate_from_the_tuned_file(tmp_path, monkeypatch):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"regularization": {"arms": {"ghost": {"lr": 0.2}}}}))
    monkeypatch.setattr(protocol, "TUNED_FILE", tuned)
    config = regularization.RegularizationConfig()
    assert config.lrs["ghost"] == 0.2
    assert config.lrs["bn+dropout"] == regularization.UNTUNED_LR


def test_presets_and_the_registry_entry():
    assert set(regularization.PRESETS) == {"tiny", "quick", "full"}
    for name in ("quick", "full"):
        config = regularization.PRESETS[name]
        assert config.seeds == 5 and config.dataset == "mnist1d" and config.n_val == 500
        assert (config.hidden, config.depth, config.batch_size) == (256, 3, 64)
        assert (config.dropout, config.virtual_batch_size) == (0.5, 16)
    entry = registry.EXPERIMENTS["regularization"]
    assert entry.rules is regularization.RULES
    assert [(r.key, r.threshold) for r in entry.rules] == [
        ("gap", 2.0),
        ("accuracy", 1.0),
        ("dropout_helps", 1.0),
        ("dropout_unneeded", -1.0),
        ("ghost", 0.0),
    ]
    assert entry.tuning.arms(TINY) == list(regularization.ARMS)


def test_tune_score_is_the_final_validation_accuracy(tiny_data):
    score = regularization.tune_score(TINY, tiny_data, "bn+dropout", 0.05, seed=0)
    run = regularization.train_arm(TINY, tiny_data, 0, "bn+dropout", 0.05)
    values = run["curve"]["val_accuracy"]
    assert score == pytest.approx((values[-1] + values[-2]) / 2)  # smooth = 2


def test_plot_functions_return_figures_with_or_without_axes():
    from matplotlib.figure import Figure

    results = hand_made(FIVE_SEEDS, NUMBERS)
    summary = regularization.summarize(FIVE_SEEDS, results)
    figures = regularization.plot(FIVE_SEEDS, results, summary)
    assert set(figures) == set(summary["figure_notes"])
    assert all(isinstance(f, Figure) for f in figures.values())
    result = regularization.RegularizationResult.from_seed_results(FIVE_SEEDS, results)
    for draw in (
        plots_regularization.plot_accuracy,
        plots_regularization.plot_gap,
        plots_regularization.plot_curves,
    ):
        ax = Figure().add_subplot()
        assert draw(result, ax=ax) is ax.figure
