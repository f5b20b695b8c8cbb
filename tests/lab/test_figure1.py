"""figure1: determinism, the speed target, the shift measure, the verdicts, the plots.

The summary tests use hand-made results whose numbers are worked out in comments, so the
verdicts are checked against arithmetic, not against the code's own output.
"""

from __future__ import annotations

import copy
import dataclasses

import matplotlib
import numpy as np
import pytest
import torch

from batchnorm.lab import plots
from batchnorm.lab._training import trailing_mean
from batchnorm.lab.experiments import _figure1_training as training
from batchnorm.lab.experiments import figure1
from batchnorm.lab.models import make_mlp
from batchnorm.monitor import ActivationTrace

matplotlib.use("Agg")

TINY = dataclasses.replace(figure1.PRESETS["tiny"], seeds=1, steps=20)
ARMS = ("baseline/paper", "bn/paper", "baseline/glorot", "bn/glorot")


@pytest.fixture(scope="module")
def tiny_data():
    return figure1.prepare(TINY)


def test_run_seed_is_deterministic_for_a_seed(tiny_data):
    first = figure1.run_seed(TINY, tiny_data, 3)
    second = figure1.run_seed(TINY, tiny_data, 3)
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    other = figure1.run_seed(TINY, tiny_data, 4)
    assert other["arms"]["bn/paper"]["val_accuracy"] != first["arms"]["bn/paper"]["val_accuracy"]


def test_run_seed_measures_every_arm_at_step_0_every_eval_and_the_end(tiny_data):
    config = dataclasses.replace(TINY, steps=25, eval_every=10, checkpoint_every=10)
    saved, advanced = [], []
    result = figure1.run_seed(
        config, tiny_data, 0, save_checkpoint=saved.append, advance=advanced.append
    )
    assert tuple(result["arms"]) == ARMS == config.arms
    for arm in ARMS:
        net = result["arms"][arm]
        assert net["steps"] == [0, 10, 20, 25]
        assert net["trace"]["steps"] == [0, 10, 20, 25]
        assert np.asarray(net["trace"]["quantiles"]).shape == (4, config.hidden, 3)
        assert net["train_loss"][0] is None and all(v > 0 for v in net["train_loss"][1:])
        # One shift series per hidden layer 2..depth, none at step 0.
        assert len(net["shift"]) == config.depth - 1
        assert all(s[0] is None and all(v >= 0 for v in s[1:]) for s in net["shift"])
    assert [c["step"] for c in saved] == [10, 20]
    assert sum(advanced) == 25
    assert result["n_train"] == len(tiny_data.y_train)


def test_a_pair_starts_from_the_same_weights_and_inits_differ():
    data = figure1.prepare(TINY)
    models = training._make_models(TINY, data, 0, ARMS)
    assert torch.equal(models["baseline/paper"].fc2.weight, models["bn/paper"].fc2.weight)
    assert torch.equal(models["baseline/glorot"].fc2.weight, models["bn/glorot"].fc2.weight)
    # Paper: N(0, 0.01^2); Glorot for 100 -> 100: N(0, 0.1^2).
    assert models["bn/paper"].fc2.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert models["bn/glorot"].fc2.weight.std().item() == pytest.approx(0.1, rel=0.05)


def test_resumed_run_seed_equals_the_uninterrupted_one(tiny_data):
    config = dataclasses.replace(TINY, steps=30, eval_every=10, checkpoint_every=10)
    whole = figure1.run_seed(config, tiny_data, 1)
    saved = []
    # A snapshot, as the runner's torch.save takes: the state holds the live tensors.
    figure1.run_seed(config, tiny_data, 1, save_checkpoint=lambda s: saved.append(copy.deepcopy(s)))
    figure1.check_checkpoint(config, tiny_data, 1, saved[0])
    resumed = figure1.run_seed(config, tiny_data, 1, checkpoint=saved[0])
    whole.pop("seconds"), resumed.pop("seconds")
    assert resumed == whole


def test_probe_forward_leaves_bn_buffers_untouched():
    model = make_mlp(4, 2, hidden=3, depth=2, norm="batchnorm")
    model(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))  # non-trivial buffers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training._probe_forward(model, torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_shift_is_zero_without_change_and_scale_free():
    torch.manual_seed(0)
    model = make_mlp(5, 3, hidden=8, depth=3, norm="none")
    x = torch.randn(64, 5)
    inputs = training._layer_inputs(model, x, 3)
    assert figure1.shift(model, inputs, inputs) == [0.0, 0.0]
    # Moving layer 2's input by a constant moves its pre-activation by W @ c; the measure is
    # the mean over units of |W c|_u / spread_u.
    moved = [inputs[0] + 0.5, inputs[1]]
    z = model.fc2(inputs[0])
    expected = ((model.fc2.weight @ torch.full((8,), 0.5)).abs() / z.std(dim=0)).mean()
    got = figure1.shift(model, inputs, moved)
    assert got[0] == pytest.approx(expected.item(), rel=1e-3)
    assert got[1] == 0.0


def test_shift_with_bn_ignores_a_change_of_mean_and_scale():
    torch.manual_seed(1)
    model = make_mlp(5, 3, hidden=8, depth=2, norm="batchnorm")
    x = torch.randn(64, 5)
    (h,) = training._layer_inputs(model, x, 2)
    # BN normalises the layer's pre-activation with the probe's own statistics: a shift of
    # every unit's input by a constant and a common rescaling leave the sigmoid input as it was
    # (up to eps, made negligible here).
    model.bn2.eps = 1e-12
    (value,) = figure1.shift(model, [h], [3.0 * h + 1.0])
    assert value < 1e-5
    # Without BN the same change moves the pre-activation by many spreads.
    plain = make_mlp(5, 3, hidden=8, depth=2, norm="none")
    (h,) = training._layer_inputs(plain, x, 2)
    assert figure1.shift(plain, [h], [3.0 * h + 1.0])[0] > 1.0


def test_steps_to_target_uses_the_weaker_arm_and_a_lower_bound_for_one_that_never_learned():
    steps = np.array([0, 10, 20, 30, 40])
    # width 1 (no smoothing). Chance 0.1; best: a 0.6, b 0.9 -> target 0.1 + 0.9 * 0.5 = 0.55.
    target, reached = figure1.steps_to_target(
        steps,
        {"a": np.array([0.1, 0.2, 0.3, 0.56, 0.6]), "b": np.array([0.1, 0.6, 0.9, 0.9, 0.9])},
        chance=0.1,
        fraction=0.9,
        width=1,
        total_steps=40,
        eval_every=10,
    )
    assert target == pytest.approx(0.55)
    assert reached == {"a": 30, "b": 10}
    # "a" never learns (best 0.12 < chance + 0.05): the target is b's; a counts as 40 + 10.
    target, reached = figure1.steps_to_target(
        steps,
        {"a": np.full(5, 0.12), "b": np.array([0.1, 0.6, 0.9, 0.9, 0.9])},
        chance=0.1,
        fraction=0.9,
        width=1,
        total_steps=40,
        eval_every=10,
    )
    assert target == pytest.approx(0.1 + 0.9 * 0.8)
    assert reached == {"a": 50, "b": 20}
    assert figure1.steps_to_target(
        steps,
        {"a": np.full(5, 0.1), "b": np.full(5, 0.1)},
        chance=0.1,
        fraction=0.9,
        width=1,
        total_steps=40,
        eval_every=10,
    ) == (None, {})


def test_trailing_mean_averages_the_last_values():
    np.testing.assert_allclose(trailing_mean([1, 3, 5, 7], 2), [1, 2, 4, 6])


def hand_result(seed, acc, q, shift):
    """A run_seed-shaped result at steps 0, 10, 20 with 2 units, 3 levels, depth 2.

    ``acc``, ``q`` and ``shift`` map each arm to 3 values per step: its validation (= test)
    accuracy, the value of every unit's every percentile, and the one layer's shift.
    """

    def trace(values):
        quantiles = np.repeat(np.asarray(values, float)[:, None, None], 2, 1).repeat(3, 2)
        return ActivationTrace(
            layer="act2",
            where="input",
            per="unit",
            quantile_levels=(0.15, 0.5, 0.85),
            steps=np.array([0, 10, 20]),
            count=np.array([50, 50, 50]),
            quantiles=quantiles,
            mean=quantiles[..., 1],
            std=np.ones((3, 2)),
            saturated=np.zeros((3, 2)),
        ).to_dict()

    def arm(name):
        return {
            "steps": [0, 10, 20],
            "val_accuracy": acc[name],
            "val_loss": [2.3, 2.0, 1.9],
            "test_accuracy": acc[name],
            "test_loss": [2.3, 2.0, 1.9],
            "train_loss": [None, 2.1, 1.9],
            "shift": [[None, *shift[name]]],
            "trace": trace(q[name]),
        }

    return {
        "seed": seed,
        "unit": 0,
        "n_train": 100,
        "seconds": 1.0,
        "arms": {name: arm(name) for name in acc},
    }


CONFIG = dataclasses.replace(
    TINY,
    seeds=5,
    steps=20,
    eval_every=10,
    checkpoint_every=20,
    hidden=2,
    depth=2,
    inits=("paper",),
    lrs={"baseline/paper": 0.5, "bn/paper": 0.5},
    smooth=1,
    target_fraction=1.0,
)


def five_seeds(acc_base, acc_bn, q_base, q_bn, shift_base, shift_bn):
    return {
        s: hand_result(
            s,
            {"baseline/paper": acc_base, "bn/paper": acc_bn},
            {"baseline/paper": q_base, "bn/paper": q_bn},
            {"baseline/paper": shift_base, "bn/paper": shift_bn},
        )
        for s in range(5)
    }


def claims_by_key(summary):
    return {c["key"]: c for c in summary["claims"]}


def test_summary_holds_what_the_arithmetic_says_when_bn_is_better():
    # Validation accuracy: baseline 0.1 -> 0.3 -> 0.6, bn 0.1 -> 0.7 -> 0.8. Best 0.6 / 0.8;
    # target (fraction 1) = 0.6: bn at step 10, baseline at step 20 -> speed-up 2.0 > 1.25.
    # Final accuracy (smooth 1): 0.8 - 0.6 = 20 pp > 0.5. Shift after warm-up (step >= 2:
    # steps 10 and 20): baseline mean(0.4, 0.2) = 0.3, bn 0.1 -> ratio 3 > 1.25.
    # Percentile range after warm-up: baseline |3 - 0| = 3, bn |1 - 0| = 1 -> 3 > 1.25.
    results = five_seeds(
        [0.1, 0.3, 0.6], [0.1, 0.7, 0.8], [0, 3, 0], [0, 1, 0], [0.4, 0.2], [0.1, 0.1]
    )
    summary = figure1.summarize(CONFIG, results)
    claims = claims_by_key(summary)
    assert set(claims) == {"speed", "accuracy", "shift", "percentiles"}  # no Glorot pair
    assert claims["speed"]["mean"] == pytest.approx(2.0)
    assert claims["accuracy"]["mean"] == pytest.approx(20.0)
    assert claims["shift"]["mean"] == pytest.approx(3.0)
    assert claims["percentiles"]["mean"] == pytest.approx(3.0)
    for claim in claims.values():
        assert claim["verdict"] == "held" and claim["above"] == 5 and claim["needed"] == 4
        assert claim["p_sign"] == pytest.approx(0.0625) and claim["for_record"]
    assert summary["epochs"] == pytest.approx(20 * 60 / 100)
    report = "\n".join(summary["report"])
    assert report.count("HELD:") == 4 and "NOT HELD" not in report


def test_summary_says_not_held_when_bn_is_no_better():
    # Same curves for both arms: speed-up 1.0, accuracy difference 0, ratios 1.0: every effect
    # is at or below its threshold in all 5 seeds.
    same = ([0.1, 0.3, 0.6], [0, 1, 0], [0.2, 0.2])
    results = five_seeds(same[0], same[0], same[1], same[1], same[2], same[2])
    claims = claims_by_key(figure1.summarize(CONFIG, results))
    assert {c["verdict"] for c in claims.values()} == {"not held"}
    assert claims["speed"]["mean"] == pytest.approx(1.0)
    assert claims["accuracy"]["mean"] == pytest.approx(0.0)


def test_percentile_range_is_max_minus_min_per_unit_and_level():
    result = hand_result(0, {"a": [0] * 3}, {"a": [1, -2, 0.5]}, {"a": [0, 0]})
    trace = ActivationTrace.from_dict(result["arms"]["a"]["trace"])
    np.testing.assert_array_equal(figure1.percentile_range(trace), np.full((2, 3), 3.0))
    np.testing.assert_array_equal(figure1.percentile_range(trace, 10), np.full((2, 3), 2.5))


def test_metric_rows_flatten_steps_and_percentiles():
    result = hand_result(
        0, {"bn/paper": [0.1, 0.2, 0.3]}, {"bn/paper": [0, 1, 2]}, {"bn/paper": [0.5, 0.25]}
    )
    rows = figure1.metric_rows(result)
    assert len(rows) == 3
    assert rows[2] == {
        "seed": 0,
        "arm": "bn/paper",
        "step": 20,
        "val_accuracy": 0.3,
        "val_loss": 1.9,
        "test_accuracy": 0.3,
        "test_loss": 1.9,
        "train_loss": 1.9,
        "shift": 0.25,
        "p15": 2.0,
        "p50": 2.0,
        "p85": 2.0,
        "saturated": 0.0,
    }
    assert rows[0]["shift"] is None


def test_check_result_names_a_missing_arm(tiny_data):
    result = figure1.run_seed(TINY, tiny_data, 0)
    del result["arms"]["bn/glorot"]
    with pytest.raises(ValueError, match=r"result\['arms'\] to have the key 'bn/glorot'"):
        figure1.check_result(TINY, 0, result)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of eval_every"):
        figure1.Figure1Config(eval_every=30, checkpoint_every=100)
    with pytest.raises(ValueError, match=r"expected dataset one of .*got 'cifar'"):
        figure1.Figure1Config(dataset="cifar")
    with pytest.raises(ValueError, match=r"expected unit an int in \[0, 100\), got 100"):
        figure1.Figure1Config(unit=100)
    with pytest.raises(ValueError, match=r"expected inits distinct names .*including 'paper'"):
        figure1.Figure1Config(inits=("glorot",))
    with pytest.raises(ValueError, match=r"expected lrs a learning rate > 0 for each of"):
        figure1.Figure1Config(lrs={"bn/paper": 1.0})


def test_learning_rates_come_from_the_tuned_file(monkeypatch):
    from batchnorm.lab import protocol

    monkeypatch.setattr(
        protocol,
        "read_tuned",
        lambda path=None: {"figure1": {"arms": {"bn/paper": {"lr": 7.0}}}},
    )
    config = figure1.Figure1Config()
    assert config.lrs["bn/paper"] == 7.0
    assert config.lrs["baseline/paper"] == figure1.UNTUNED_LR


def test_prepare_holds_out_the_validation_split_and_checks_sizes():
    data = figure1.prepare(TINY)
    assert len(data.y_val) == TINY.n_val == 200 and len(data.y_train) == 1438 - 200
    with pytest.raises(ValueError, match=r"expected probe_size <= 1238"):
        figure1.prepare(dataclasses.replace(TINY, probe_size=5000))


def test_full_preset_is_the_papers_setup_and_paper_is_its_alias():
    full = figure1.PRESETS["full"]
    assert figure1.PRESETS["paper"] is full
    assert (full.steps, full.batch_size, full.hidden, full.depth) == (50_000, 60, 100, 3)
    assert full.quantiles == (0.15, 0.5, 0.85) and full.init_std == 0.01
    assert full.dataset == "mnist1d-large" and full.seeds >= 5
    quick = figure1.PRESETS["quick"]
    assert quick.seeds >= 5 and quick.dataset == full.dataset


def test_rules_are_declared_with_thresholds():
    keys = [rule.key for rule in figure1.RULES]
    assert keys == ["speed", "speed_glorot", "accuracy", "shift", "percentiles"]
    assert all(rule.agree == 0.8 for rule in figure1.RULES)


def test_tune_score_is_the_best_smoothed_validation_accuracy(tiny_data):
    score = figure1.tune_score(TINY, tiny_data, "bn/glorot", 1.0, seed=0)
    trial = dataclasses.replace(TINY, lrs={**TINY.lrs, "bn/glorot": 1.0})
    history = training._train(trial, tiny_data, 0, ["bn/glorot"], light=True)["arms"]["bn/glorot"]
    assert score == pytest.approx(trailing_mean(history["val_accuracy"], TINY.smooth).max())
    assert 0.0 <= score <= 1.0


@pytest.fixture(scope="module")
def hand_made():
    config = dataclasses.replace(CONFIG, inits=("paper", "glorot"), lrs=None)
    results = {
        s: hand_result(
            s,
            {arm: [0.1, 0.3 + 0.1 * k, 0.6 + 0.05 * k] for k, arm in enumerate(ARMS)},
            {arm: [0, 3 - k, 0] for k, arm in enumerate(ARMS)},
            {arm: [0.4 - 0.1 * k, 0.2] for k, arm in enumerate(ARMS)},
        )
        for s in range(2)
    }
    config = dataclasses.replace(config, seeds=2)
    summary = figure1.summarize(config, results)
    return figure1.Figure1Result.from_seed_results(config, results, summary)


@pytest.mark.parametrize(
    "draw",
    [
        plots.plot_accuracy,
        lambda r, ax=None: plots.plot_percentiles(r, "baseline", ax=ax),
        lambda r, ax=None: plots.plot_percentiles(r, "bn", ax=ax),
    ],
    ids=["accuracy", "percentiles-baseline", "percentiles-bn"],
)
def test_plot_functions_return_a_figure_with_or_without_axes(hand_made, draw):
    from matplotlib.figure import Figure

    figure = draw(hand_made)
    assert isinstance(figure, Figure) and len(figure.axes) == 1
    host = Figure()
    ax = host.add_subplot()
    assert draw(hand_made, ax=ax) is host
    assert ax.get_title()


def test_plot_figure1_has_three_panels_sharing_percentile_limits(hand_made):
    figure = plots.plot_figure1(hand_made)
    a, b, c = figure.axes
    assert a.get_title().startswith("(a)") and b.get_title().startswith("(b)")
    assert c.get_title().startswith("(c) With BN")
    assert b.get_ylim() == c.get_ylim()
    assert "Without vs with BN" in figure._suptitle.get_text()
    colors = {line.get_color() for line in c.get_lines()}
    assert colors == {plots.COLORS["bn"]}


def test_speed_and_shift_figures_draw_every_arm_with_labelled_axes(hand_made):
    speed = plots.plot_speed(hand_made)
    loss, accuracy = speed.axes
    assert len(loss.get_lines()) == 4 and loss.get_yscale() == "log"
    assert "nats" in loss.get_ylabel() and "validation accuracy" in accuracy.get_ylabel()
    shift = plots.plot_shift(hand_made)
    (ax,) = shift.axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == [
        "without BN, paper's init",
        "with BN, paper's init",
        "without BN, Glorot init",
        "with BN, Glorot init",
    ]
    assert ax.get_xlabel() and ax.get_ylabel()


def test_plot_percentiles_rejects_unknown_network(hand_made):
    with pytest.raises(ValueError, match=r"expected network in \['baseline', 'bn'\]"):
        plots.plot_percentiles(hand_made, "relu")
