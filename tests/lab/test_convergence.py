"""convergence: the steps-to-target measure, the verdicts, determinism and resume, the checks of
results and checkpoints, the settings, tuning and the figures.

The experiment runs its ``tiny`` preset (scikit-learn's digits, a few dozen steps): these tests
check structure, determinism and the measure's arithmetic on hand-made curves, not the paper's
claim.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json

import matplotlib
import pytest
import torch

import batchnorm
from batchnorm.lab import plots_convergence, protocol, registry, runner
from batchnorm.lab.experiments import convergence

matplotlib.use("Agg")

TINY = convergence.PRESETS["tiny"]
ONE_SEED = dataclasses.replace(TINY, seeds=1)
FIVE_SEEDS = dataclasses.replace(TINY, seeds=5)


@pytest.fixture(scope="module")
def tiny_data():
    return convergence.prepare(TINY)


@pytest.fixture(scope="module")
def one_seed_run(tiny_data):
    saved = []
    result = convergence.run_seed(
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


# --- the measure on hand-made curves ----------------------------------------------------------


def test_steps_to_target_is_the_first_measured_step_after_0_at_or_above_the_target():
    steps = [0, 10, 20, 30]
    # Step 0 is above the target but never counts (nothing was trained yet); width 1: no
    # smoothing, so the first hit is step 20 (0.5 >= 0.5).
    got = convergence.steps_to_target(steps, [0.9, 0.2, 0.5, 0.6], target=0.5, width=1, bound=40)
    assert got == (20, True)


def test_steps_to_target_smooths_with_a_trailing_mean():
    steps = [0, 10, 20, 30]
    accuracy = [0.0, 1.0, 0.0, 1.0]
    # Unsmoothed, step 10 reaches 0.6; the trailing mean of 2 is 0, .5, .5, .5: never.
    assert convergence.steps_to_target(steps, accuracy, target=0.6, width=1, bound=40) == (
        10,
        True,
    )
    assert convergence.steps_to_target(steps, accuracy, target=0.6, width=2, bound=40) == (
        40,
        False,
    )


def test_steps_to_target_gives_the_bound_to_a_curve_that_never_reaches_it_or_diverged():
    steps = [0, 10, 20, 30]
    assert convergence.steps_to_target(
        steps, [0.1, 0.2, 0.3, 0.4], target=0.5, width=1, bound=40
    ) == (40, False)
    # A diverged run's curve stops early (two measurements here).
    assert convergence.steps_to_target(steps, [0.1, 0.2], target=0.15, width=1, bound=40) == (
        10,
        True,
    )
    assert convergence.steps_to_target(steps, [0.1, 0.2], target=0.5, width=1, bound=40) == (
        40,
        False,
    )


def fake_run(config, net, accuracy, test_accuracy, lr=None, diverged=False):
    """A train_classifier-shaped result with the given validation curve (and a final test
    accuracy), as check_arm accepts."""
    steps = config.measured_steps(net)[: len(accuracy)]
    return {
        "lr": config.lrs[f"{net}/none"] if lr is None else lr,
        "curve": {
            "steps": steps,
            "train_loss": [None] + [1.0] * (len(steps) - 1),
            "val_accuracy": list(accuracy),
            "val_loss": [1.0] * len(steps),
        },
        "diverged": diverged,
        "diverged_at": len(steps) * config.eval_every if diverged else None,
        "first_loss": 2.3,
        "test_accuracy": None if diverged else test_accuracy,
        "test_loss": None if diverged else 1.0,
        "train_accuracy": None if diverged else test_accuracy,
        "train_eval_loss": None if diverged else 1.0,
    }


# The tiny config measures the MLP at steps 0, 10, 20, 30, 40 and the CNN at 0, 10, 20; the
# trailing mean is over 2 measurements.
SLOW = {"mlp": [0.1, 0.3, 0.5, 0.7, 0.7], "cnn": [0.1, 0.4, 0.6]}
FAST = {"mlp": [0.1, 0.6, 0.8, 0.8, 0.8], "cnn": [0.1, 0.7, 0.7]}


def hand_made(config, none_curves, bn_curves, none_test=0.7, bn_test=0.8):
    results = {}
    for seed in range(config.seeds):
        units = {}
        for net in ("mlp", "cnn"):
            units[f"{net}/none"] = fake_run(config, net, none_curves[net], none_test)
            units[f"{net}/bn"] = fake_run(
                config, net, bn_curves[net], bn_test, lr=config.lrs[f"{net}/bn"]
            )
        results[seed] = {"seed": seed, "seconds": 1.5, "units": units}
    return results


def test_speed_per_seed_follows_the_arithmetic():
    results = hand_made(FIVE_SEEDS, SLOW, FAST)
    for seed in range(5):
        convergence.check_result(FIVE_SEEDS, seed, results[seed])  # a valid result
    speed = convergence.speed_per_seed(FIVE_SEEDS, results[0], "mlp")
    # No-BN MLP smoothed: .1, .2, .4, .6, .7 -> best .7, target .98 * .7 = .686, first reached
    # at step 40; BN smoothed: .1, .35, .7, .8, .8 -> step 20. Speed-up 40 / 20 = 2.
    assert speed["best_none"] == pytest.approx(0.7)
    assert speed["target"] == pytest.approx(0.686)
    assert speed["steps"] == {"mlp/none": 40, "mlp/bn": 20}
    assert speed["reached"] == {"mlp/none": True, "mlp/bn": True}
    assert speed["speedup"] == pytest.approx(2.0)
    # CNN: no-BN smoothed .1, .25, .5 -> target .49 at step 20; BN .1, .4, .7 -> step 20: 1x.
    assert convergence.speed_per_seed(FIVE_SEEDS, results[0], "cnn")["speedup"] == 1.0


def test_summary_verdicts_flip_when_the_arms_curves_are_swapped():
    held = convergence.summarize(FIVE_SEEDS, hand_made(FIVE_SEEDS, SLOW, FAST))
    verdicts = {c["key"]: c["verdict"] for c in held["claims"]}
    # MLP 2x > 1.25 in every seed; CNN 1x; BN's test accuracy +10 pp in every seed.
    assert verdicts == {
        "speed_mlp": "held",
        "speed_cnn": "not held",
        "accuracy_mlp": "held",
        "accuracy_cnn": "held",
    }
    swapped = convergence.summarize(
        FIVE_SEEDS, hand_made(FIVE_SEEDS, FAST, SLOW, none_test=0.8, bn_test=0.7)
    )
    by_key = {c["key"]: c for c in swapped["claims"]}
    # Swapped MLP: the no-BN arm (fast curve) has best smoothed .8, target .784 reached at step
    # 30; the BN arm (slow curve) peaks at .7 and never reaches it: bound 40 + 10 = 50, so the
    # speed-up is 30 / 50 = 0.6. Test accuracy -10 pp.
    assert by_key["speed_mlp"]["verdict"] == "not held"
    assert by_key["speed_mlp"]["per_seed"] == pytest.approx([0.6] * 5)
    assert by_key["accuracy_mlp"]["verdict"] == "not held"
    assert by_key["accuracy_cnn"]["per_seed"] == pytest.approx([-10.0] * 5)
    assert swapped["nets"]["mlp"]["reached"]["mlp/bn"] == [False] * 5
    assert any("Claims that did not hold" in line for line in swapped["report"])
    json.dumps(swapped, allow_nan=False)  # JSON-serialisable, no NaN


def test_a_diverged_arm_counts_as_chance_and_never_reaches_the_target():
    results = hand_made(FIVE_SEEDS, SLOW, FAST)
    for seed in results:
        results[seed]["units"]["mlp/bn"] = fake_run(
            FIVE_SEEDS, "mlp", [0.1, 0.1], None, lr=FIVE_SEEDS.lrs["mlp/bn"], diverged=True
        )
        convergence.check_result(FIVE_SEEDS, seed, results[seed])
    summary = convergence.summarize(FIVE_SEEDS, results)
    by_key = {c["key"]: c for c in summary["claims"]}
    # 40 / (40 + 10); BN's accuracy counts as chance: 100 * (0.1 - 0.7) = -60 pp.
    assert by_key["speed_mlp"]["per_seed"] == pytest.approx([0.8] * 5)
    assert by_key["accuracy_mlp"]["per_seed"] == pytest.approx([-60.0] * 5)
    assert summary["nets"]["mlp"]["diverged"]["mlp/bn"] == [0, 1, 2, 3, 4]


# --- end to end -------------------------------------------------------------------------------


def test_tiny_preset_runs_through_the_runner_and_replots(tmp_path):
    run_dir = batchnorm.lab.run_experiment(
        "convergence", preset="tiny", out=tmp_path, verbose=False
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = sorted(p.stem for p in (run_dir / "figures").glob("*.png"))
    assert figures == sorted(summary["figure_notes"]) == ["curves_cnn", "curves_mlp", "speedup"]
    assert summary["experiment"] == "convergence" and summary["seeds"] == [0, 1]
    assert summary["seconds"] > 0
    assert [c["key"] for c in summary["claims"]] == [r.key for r in convergence.RULES]
    assert all(c["for_record"] is False for c in summary["claims"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Per seed: MLP arms 5 measurements each, CNN arms 3.
    assert len(rows) == 2 * (2 * 5 + 2 * 3)
    assert runner.plot_run(run_dir, verbose=False)
    assert sorted(p.stem for p in (run_dir / "figures").glob("*.png")) == figures
    path = run_dir / "seeds" / "seed-1.json"
    result = json.loads(path.read_text())
    result["units"]["cnn/bn"]["curve"]["val_accuracy"][2] = 1.5
    path.write_text(json.dumps(result))
    with pytest.raises(runner.RunFileError, match=r"seed-1.json.*\['cnn/bn'\]\['curve'\]"):
        runner.load_run(run_dir)


def test_run_seed_is_deterministic_and_leaves_the_global_rng_alone(tiny_data, one_seed_run):
    before = torch.get_rng_state()
    again = convergence.run_seed(ONE_SEED, tiny_data, 0)
    assert torch.equal(torch.get_rng_state(), before)
    assert without_seconds(again) == without_seconds(one_seed_run[0])
    assert list(again["units"]) == list(convergence.ARMS)


def test_resumed_seed_equals_the_uninterrupted_one(tiny_data, one_seed_run):
    whole, saved = one_seed_run
    # One checkpoint after each arm but the last: at the units' cumulative steps.
    assert [s["step"] for s in saved] == [40, 80, 100]
    for state in saved:
        state = through_torch_save(state)
        convergence.check_checkpoint(ONE_SEED, tiny_data, 0, state)
        resumed = convergence.run_seed(ONE_SEED, tiny_data, 0, checkpoint=state)
        assert without_seconds(resumed) == without_seconds(whole)


def test_two_arms_of_a_network_start_from_the_same_weights(tiny_data):
    for net, layer in (("mlp", "fc2"), ("cnn", "conv2")):
        none = convergence.build_model(TINY, tiny_data, net, "none", 3)
        bn = convergence.build_model(TINY, tiny_data, net, "bn", 3)
        other = convergence.build_model(TINY, tiny_data, net, "bn", 4)
        weight = bn.get_submodule(layer).weight
        assert torch.equal(none.get_submodule(layer).weight, weight)
        assert not torch.equal(other.get_submodule(layer).weight, weight)
        assert not hasattr(none, "bn1") and isinstance(bn.bn1, batchnorm.BatchNorm1d)


def test_eval_in_chunks_gives_the_unchunked_outputs_and_trains_as_sequential(
    tiny_data, monkeypatch
):
    from batchnorm.lab.experiments import _convergence_training as training

    model = convergence.build_model(TINY, tiny_data, "cnn", "bn", 0)
    assert isinstance(model, training.EvalInChunks)
    model(tiny_data.x_train[:64])  # one training step's forward: running statistics move
    model.eval()
    with torch.no_grad():
        whole = model(tiny_data.x_val)
        monkeypatch.setattr(training, "EVAL_CHUNK", 7)  # 200 = 28 chunks of 7 + one of 4
        chunked = model(tiny_data.x_val)
    # Eval-mode BN and the convolutions treat each example on its own; only the rounding of
    # a different batch size may differ.
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    model.train()
    calls = []
    model.conv1.register_forward_hook(lambda *args: calls.append(len(args[1][0])))
    model(tiny_data.x_train[:64])
    assert calls == [64]  # training forwards are never split


# --- checks of results and checkpoints ----------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["units"].pop("cnn/bn"), r"expected units to hold every unit.*'cnn/bn'"),
        (lambda r: r["units"]["mlp/bn"].update(lr=9.0), r"units\['mlp/bn'\]\['lr'\]"),
        (
            lambda r: r["units"]["mlp/none"]["curve"]["val_accuracy"].pop(),
            r"units\['mlp/none'\]\['curve'\]\['val_accuracy'\] to be a list of 5",
        ),
        (
            lambda r: r["units"]["cnn/none"].update(test_accuracy=None),
            r"units\['cnn/none'\]\['test_accuracy'\]",
        ),
        (lambda r: r.update(seed=7), r"result\['seed'\]"),
    ],
)
def test_check_result_names_the_damaged_entry(one_seed_run, edit, message):
    result = copy.deepcopy(one_seed_run[0])
    convergence.check_result(ONE_SEED, 0, result)
    edit(result)
    with pytest.raises(ValueError, match=message):
        convergence.check_result(ONE_SEED, 0, result)


def test_check_checkpoint_names_the_damaged_entry(tiny_data, one_seed_run):
    state = copy.deepcopy(one_seed_run[1][1])  # after mlp/none and mlp/bn
    state["step"] = 40
    with pytest.raises(ValueError, match=r"state\['step'\] \(the steps of its units\) to be 80"):
        convergence.check_checkpoint(ONE_SEED, tiny_data, 0, state)
    state = copy.deepcopy(one_seed_run[1][1])
    state["units"]["mlp/bn"]["curve"]["steps"][1] = 15
    with pytest.raises(ValueError, match=r"units\['mlp/bn'\]\['curve'\]\['steps'\]"):
        convergence.check_checkpoint(ONE_SEED, tiny_data, 0, state)
    state = copy.deepcopy(one_seed_run[1][1])
    state["units"]["rnn/bn"] = state["units"]["mlp/bn"]
    with pytest.raises(ValueError, match=r"got unknown \['rnn/bn'\]"):
        convergence.check_checkpoint(ONE_SEED, tiny_data, 0, state)


# --- settings, tuning, registry, figures ------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dataset", "mnist", r"expected dataset one of"),
        ("mlp_steps", 45, r"expected mlp_steps a positive multiple of eval_every, got 45"),
        ("cnn_steps", 0, r"expected cnn_steps a positive multiple of eval_every"),
        ("cnn_momentum", 1.0, r"expected cnn_momentum a number in \[0, 1\)"),
        ("target_fraction", 1.5, r"expected target_fraction a number in \(0, 1\]"),
        ("channels", (), r"expected channels a non-empty tuple"),
        ("lrs", {"mlp/bn": 1.0}, r"expected lrs a learning rate > 0 for each of"),
        ("smooth", 0, r"expected smooth an int >= 1"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **{field: value})


def test_config_reads_each_arms_learning_rate_from_the_tuned_file(tmp_path, monkeypatch):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"convergence": {"arms": {"cnn/bn": {"lr": 0.7}}}}))
    monkeypatch.setattr(protocol, "TUNED_FILE", tuned)
    config = convergence.ConvergenceConfig()
    assert config.lrs["cnn/bn"] == 0.7
    assert config.lrs["cnn/none"] == convergence.UNTUNED_LR["cnn"]
    assert config.lrs["mlp/bn"] == convergence.UNTUNED_LR["mlp"]


def test_presets_and_the_registry_entry():
    assert set(convergence.PRESETS) == {"tiny", "quick", "full"}
    for name in ("quick", "full"):
        config = convergence.PRESETS[name]
        assert config.seeds == 5 and config.dataset == "mnist1d-large"
        assert (config.hidden, config.depth, config.mlp_batch_size) == (100, 3, 60)
    entry = registry.EXPERIMENTS["convergence"]
    assert entry.rules is convergence.RULES
    assert [(r.key, r.threshold) for r in entry.rules] == [
        ("speed_mlp", 1.25),
        ("speed_cnn", 1.25),
        ("accuracy_mlp", -0.5),
        ("accuracy_cnn", -0.5),
    ]
    assert entry.tuning.arms(TINY) == list(convergence.ARMS)
    assert entry.tuning.preset == "quick"


def test_tune_score_is_the_best_smoothed_validation_accuracy(tiny_data):
    score = convergence.tune_score(TINY, tiny_data, "mlp/bn", 0.5, seed=0)
    run = convergence.train_arm(TINY, tiny_data, 0, "mlp/bn", 0.5)
    values = run["curve"]["val_accuracy"]
    best = max((a + b) / 2 for a, b in zip([values[0]] + values[:-1], values, strict=True))
    assert score == pytest.approx(best)


def test_plot_functions_return_figures_with_or_without_axes():
    from matplotlib.figure import Figure

    results = hand_made(FIVE_SEEDS, SLOW, FAST)
    summary = convergence.summarize(FIVE_SEEDS, results)
    figures = convergence.plot(FIVE_SEEDS, results, summary)
    assert set(figures) == set(summary["figure_notes"])
    assert all(isinstance(f, Figure) for f in figures.values())
    result = convergence.ConvergenceResult.from_seed_results(FIVE_SEEDS, results, summary)
    ax = Figure().add_subplot()
    assert plots_convergence.plot_curves(result, "cnn", ax=ax) is ax.figure
    assert plots_convergence.plot_speedup(result, ax=ax) is ax.figure
    with pytest.raises(ValueError, match=r"expected net in \['mlp', 'cnn'\], got 'rnn'"):
        plots_convergence.plot_curves(result, "rnn")
