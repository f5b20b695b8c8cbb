"""mechanism: the covariate-shift and landscape measures on known answers, measuring that never
changes training, the tiny preset through the runner, resume, the checks of results and
checkpoints, the config's errors, the verdicts (and their flip when the arms' data swap),
tuning, the figures.

The tiny preset (scikit-learn's digits, 24 steps per arm) checks structure and determinism,
not the claims.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math

import matplotlib
import numpy as np
import pytest
import torch

import batchnorm
from batchnorm.lab import plots_mechanism, protocol, registry, runner
from batchnorm.lab.experiments import mechanism
from batchnorm.lab.models import NoisyBatchNorm1d, make_mlp

matplotlib.use("Agg")

TINY = mechanism.PRESETS["tiny"]
ONE_SEED = dataclasses.replace(TINY, seeds=1)


@pytest.fixture(scope="module")
def tiny_data():
    return mechanism.prepare(TINY)


@pytest.fixture(scope="module")
def one_seed_run(tiny_data):
    """Seed 0 of ONE_SEED: its result and its checkpoints (after the first two arms), as read
    back."""
    saved = []
    result = mechanism.run_seed(ONE_SEED, tiny_data, 0, save_checkpoint=saved.append)
    return json.loads(json.dumps(result, allow_nan=False)), [through_torch_save(s) for s in saved]


def without_seconds(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


def through_torch_save(state: dict) -> dict:
    """``state`` as the runner stores and reads a checkpoint (torch.load with weights_only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def small_model(norm: str, seed: int = 0) -> torch.nn.Sequential:
    """A 3-hidden-layer MLP a few SGD steps into training (non-trivial BN parameters)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_mlp(
            6,
            4,
            hidden=8,
            depth=3,
            activation="relu",
            norm=norm,
            init="he",
            generator=torch.Generator().manual_seed(seed),
        )
    mechanism.reseed_noise(model, 11)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def probe(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(20, 6, generator=gen), torch.randint(0, 4, (20,), generator=gen)


def state_of(model: torch.nn.Module) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, m in enumerate(x for x in model.modules() if isinstance(x, NoisyBatchNorm1d)):
        state[f"generator{i}"] = m.generator.get_state()
    return state


def assert_same_state(model: torch.nn.Module, before: dict) -> None:
    after = state_of(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# --- the covariate-shift measure --------------------------------------------------------------


@pytest.mark.parametrize("norm", ["none", "batchnorm", "noisy"])
def test_gradient_shift_is_zero_when_the_earlier_layers_do_not_move(norm):
    model = small_model(norm)
    before = state_of(model)
    x, y = probe()
    still = mechanism.gradient_shift(model, x, y, lr=0.0, noise_seed=3)
    assert still["layers"] == ["fc1", "fc2", "fc3", "out"]
    assert still["l2"] == [0.0] * 4 and still["relative"] == [0.0] * 4
    assert still["cos"] == pytest.approx([1.0] * 4, abs=1e-12)
    moved = mechanism.gradient_shift(model, x, y, lr=0.5, noise_seed=3)
    # The first layer has no earlier layers: exactly 0 at any step (for the noisy net this
    # also says the noise is the same draw in every pass of one measurement).
    assert moved["l2"][0] == 0.0 and moved["cos"][0] == pytest.approx(1.0, abs=1e-12)
    assert all(v > 1e-4 for v in moved["relative"][1:])
    assert all(c < 1.0 for c in moved["cos"][1:])
    assert_same_state(model, before)  # measured on a copy: nothing of the model moved


def test_gradient_shift_equals_the_gradient_after_a_hand_made_step_of_the_earlier_layers():
    model = small_model("batchnorm")
    x, y = probe()
    lr = 0.3
    found = mechanism.gradient_shift(model, x, y, lr=lr)

    def grad_of(net, name):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        return torch.autograd.grad(loss, [net.get_submodule(name).weight])[0].double()

    # Layer fc3: fc1, bn1, fc2, bn2 take their step, fc3, bn3 and out stay.
    net = copy.deepcopy(model).train()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    earlier = [
        p for n, p in net.named_parameters() if n.split(".")[0] in ("fc1", "bn1", "fc2", "bn2")
    ]
    grads = torch.autograd.grad(loss, earlier)
    g = grad_of(copy.deepcopy(model).train(), "fc3")
    with torch.no_grad():
        for p, d in zip(earlier, grads, strict=True):
            p.sub_(lr * d)
    g_moved = grad_of(net, "fc3")
    l2 = (g - g_moved).norm().item()
    assert found["l2"][2] == pytest.approx(l2, rel=1e-6)
    assert found["relative"][2] == pytest.approx(l2 / g.norm().item(), rel=1e-6)
    cos = (g * g_moved).sum().item() / (g.norm() * g_moved.norm()).item()
    assert found["cos"][2] == pytest.approx(cos, rel=1e-9)


# --- the landscape measure --------------------------------------------------------------------


def test_landscape_of_a_quadratic_equals_the_hessian_product():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    a = m @ m.T + torch.eye(5, dtype=torch.float64)  # the Hessian, symmetric positive definite
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    x = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    start = x.detach().clone()

    def loss():
        return 0.5 * x @ a @ x + b @ x

    etas = (0.01, 0.05, 0.2)
    found = mechanism.landscape([x], loss, etas)
    g = a @ start + b
    ag = a @ g
    value = lambda p: float(0.5 * p @ a @ p + b @ p)  # noqa: E731
    assert found["loss0"] == pytest.approx(value(start))
    assert found["grad_norm"] == pytest.approx(g.norm().item())
    for eta, change, moved in zip(etas, found["grad_change"], found["loss"], strict=True):
        # grad L(x) - grad L(x - eta g) = eta A g, and L along the line is a parabola in eta.
        assert change == pytest.approx(eta * ag.norm().item(), rel=1e-10)
        assert moved == pytest.approx(value(start) - eta * g @ g + 0.5 * eta**2 * g @ ag)
    assert torch.equal(x.detach(), start)  # the parameters are put back


# --- training and measuring -------------------------------------------------------------------


@pytest.mark.parametrize("arm", ["bn", "noisy"])
def test_measuring_does_not_change_the_training_trajectory(tiny_data, arm):
    rng = torch.get_rng_state()
    measured = mechanism.train_arm(TINY, tiny_data, arm, 0, 0.1)
    plain = mechanism.train_arm(TINY, tiny_data, arm, 0, 0.1, measured=False)
    assert measured.pop("probe")["steps"] == [0, 12, 24]
    assert measured == plain
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is never drawn from


def test_arms_of_a_seed_share_the_initial_weights_and_noisy_layers_draw_apart(tiny_data):
    models = {arm: mechanism.build_model(TINY, tiny_data, arm, 0) for arm in mechanism.ARMS}
    for name in ("fc1", "fc2", "fc3", "out"):
        w = [models[arm].get_submodule(name).weight for arm in mechanism.ARMS]
        assert torch.equal(w[0], w[1]) and torch.equal(w[0], w[2])
    other = mechanism.build_model(TINY, tiny_data, "none", 1)
    assert not torch.equal(other.fc1.weight, models["none"].fc1.weight)
    noisy = models["noisy"]
    assert isinstance(noisy.bn1, NoisyBatchNorm1d) and noisy.bn1.strength == TINY.strength
    draws = [torch.rand(4, generator=noisy.get_submodule(f"bn{i}").generator) for i in (1, 2, 3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_tiny_preset_runs_through_the_runner_and_replots(tmp_path):
    run_dir = batchnorm.lab.run_experiment(
        "mechanism", preset="tiny", out=tmp_path, verbose=False, progress=False
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = sorted(p.stem for p in (run_dir / "figures").glob("*.png"))
    assert figures == sorted(summary["figure_notes"])
    assert figures == ["landscape", "shift", "shift_by_layer", "training"]
    assert summary["experiment"] == "mechanism" and summary["seeds"] == [0, 1]
    assert summary["seconds"] > 0 and summary["claim"] == mechanism.CLAIM
    assert [c["key"] for c in summary["claims"]] == [r.key for r in mechanism.RULES]
    for claim in summary["claims"]:
        assert claim["verdict"] in protocol.VERDICTS and claim["for_record"] is False
    report = (run_dir / "summary.md").read_text()
    assert "Claims that did not hold:" in report and "relative shift by layer, bn" in report
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Per seed and arm: 4 validation measurements (0, 8, 16, 24) and 3 probes (0, 12, 24).
    assert len(rows) == 2 * 3 * (4 + 3)
    replotted = sorted(p.stem for p in runner.plot_run(run_dir, verbose=False))
    assert replotted == figures


def test_resumed_seed_equals_the_uninterrupted_one(one_seed_run, tiny_data):
    full, saved = one_seed_run
    assert [s["step"] for s in saved] == [TINY.steps, 2 * TINY.steps]
    assert list(saved[0]["units"]) == ["none"] and list(saved[1]["units"]) == ["none", "bn"]
    for state in saved:
        mechanism.check_checkpoint(ONE_SEED, tiny_data, 0, state)
        resumed = mechanism.run_seed(ONE_SEED, tiny_data, 0, checkpoint=state)
        assert without_seconds(json.loads(json.dumps(resumed))) == without_seconds(full)


# --- checks -----------------------------------------------------------------------------------


def damaged(data: dict, edit) -> dict:
    out = copy.deepcopy(data)
    edit(out)
    return out


def test_check_result_names_what_is_wrong_with_a_damaged_result(one_seed_run):
    result, _ = one_seed_run
    mechanism.check_result(ONE_SEED, 0, result)
    bn = lambda r: r["units"]["bn"]  # noqa: E731
    cases = [
        (lambda r: r["units"].pop("noisy"), r"expected units to hold every unit, got \['noisy'\]"),
        (lambda r: bn(r).pop("probe"), r"units\['bn'\] to have the key 'probe'"),
        (
            lambda r: bn(r)["probe"]["shift"]["relative"][1].pop(),
            r"\['probe'\]\['shift'\]\['relative'\] to be a list of 3 lists of 4",
        ),
        (
            lambda r: bn(r)["probe"]["loss"][0].__setitem__(0, "high"),
            r"\['probe'\]\['loss'\]\[0\] to be a finite number, got 'high'",
        ),
        (
            lambda r: bn(r)["probe"]["steps"].__setitem__(1, 11),
            r"\['probe'\]\['steps'\] to be \[0, 12, 24\]",
        ),
        (lambda r: bn(r).__setitem__("lr", 0.2), r"units\['bn'\]\['lr'\] to be 0.1, got 0.2"),
        (
            lambda r: bn(r)["curve"]["val_accuracy"].pop(),
            r"units\['bn'\]\['curve'\]\['val_accuracy'\] to be a list of 4 values",
        ),
        (lambda r: r.__setitem__("seconds", -1), r"result\['seconds'\] to be a finite number"),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            mechanism.check_result(ONE_SEED, 0, damaged(result, edit))
    with pytest.raises(ValueError, match=r"result\['seed'\] to be 1, got 0"):
        mechanism.check_result(ONE_SEED, 1, result)
    deeper = dataclasses.replace(ONE_SEED, depth=4)
    with pytest.raises(ValueError, match=r"\['layers'\] to be \['fc1', 'fc2', 'fc3', 'fc4'"):
        mechanism.check_result(deeper, 0, result)


def test_check_checkpoint_names_what_is_wrong_with_a_damaged_checkpoint(one_seed_run, tiny_data):
    _, saved = one_seed_run
    state = saved[1]
    cases = [
        (
            lambda s: s.__setitem__("step", 10),
            r"state\['step'\] \(the steps of its units\) to be 48",
        ),
        (lambda s: s["units"].__setitem__("other", {}), r"got unknown \['other'\]"),
        (
            lambda s: s["units"]["none"]["probe"]["grad_norm"].pop(),
            r"units\['none'\]\['probe'\]\['grad_norm'\] to be a list of 3 finite numbers",
        ),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            mechanism.check_checkpoint(ONE_SEED, tiny_data, 0, damaged(state, edit))
    other_lr = dataclasses.replace(ONE_SEED, lrs={"none": 0.3, "bn": 0.1, "noisy": 0.1})
    with pytest.raises(ValueError, match=r"units\['none'\]\['lr'\] to be 0.3, got 0.1"):
        mechanism.check_checkpoint(other_lr, tiny_data, 0, state)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, r"MechanismConfig\(\): expected steps an int >= 1, got 0"),
        ("depth", 1, r"expected depth an int >= 2, got 1"),
        ("etas", (0.4, 0.1), r"expected etas a non-empty ascending tuple"),
        ("etas", (0.0, 0.1), r"expected etas a non-empty ascending tuple"),
        ("lrs", {"none": 0.1, "bn": 0.1}, r"expected lrs a learning rate > 0 for each of"),
        ("lrs", {"none": 0.1, "bn": -1.0, "noisy": 0.1}, r"expected lrs a learning rate > 0"),
        ("shift_lr", 0.0, r"expected shift_lr a number > 0, got 0.0"),
        ("strength", -1.0, r"expected strength a number >= 0, got -1.0"),
        ("dataset", "cifar", r"expected dataset one of"),
        ("activation", "gelu", r"expected activation one of"),
        ("measure_every", 0, r"expected measure_every an int >= 1"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **{field: value})


def test_config_reads_each_arms_learning_rate_from_the_tuned_file(tmp_path, monkeypatch):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"mechanism": {"arms": {"bn": {"lr": 0.7}}}}))
    monkeypatch.setattr(protocol, "TUNED_FILE", tuned)
    config = dataclasses.replace(TINY, lrs=None)
    assert config.lrs == {"none": mechanism.UNTUNED_LR, "bn": 0.7, "noisy": mechanism.UNTUNED_LR}
    # A config read back from JSON (tuples become lists) is the same config.
    again = mechanism.MechanismConfig(**json.loads(json.dumps(dataclasses.asdict(TINY))))
    assert again == TINY


def test_prepare_refuses_a_batch_larger_than_the_training_set():
    with pytest.raises(ValueError, match=r"expected batch_size <= 1238"):
        mechanism.prepare(dataclasses.replace(TINY, batch_size=5000))


# --- verdicts ---------------------------------------------------------------------------------


def hand_results(template: dict, n_seeds: int = 5) -> dict[int, dict]:
    """Seeds built from ``template``: without BN every relative shift is 0.4 (fc1 0), the loss
    along the gradient 1 and 2, the gradient changes 2 and 4 with |g| = 1, test accuracy 0.70;
    with BN 0.1, 1 and 1.1, 1 and 1, accuracy 0.80; noisy BN as BN but accuracy 0.79."""
    numbers = {
        "none": (0.4, [1.0, 2.0], [2.0, 4.0], 0.70),
        "bn": (0.1, [1.0, 1.1], [1.0, 1.0], 0.80),
        "noisy": (0.1, [1.0, 1.1], [1.0, 1.0], 0.79),
    }
    results = {}
    for seed in range(n_seeds):
        r = copy.deepcopy(template)
        r["seed"] = seed
        for arm, (shift, losses, changes, accuracy) in numbers.items():
            unit = r["units"][arm]
            p = unit["probe"]
            n = len(p["steps"])
            p["shift"]["relative"] = [[0.0] + [shift] * (len(p["layers"]) - 1)] * n
            p["loss"], p["grad_change"], p["grad_norm"] = [losses] * n, [changes] * n, [1.0] * n
            unit["test_accuracy"] = accuracy
        results[seed] = r
    return results


def verdicts(summary: dict) -> dict[str, str]:
    return {c["key"]: c["verdict"] for c in summary["claims"]}


def test_summary_judges_each_rule_and_flips_when_the_arms_are_swapped(one_seed_run):
    template, _ = one_seed_run
    config = dataclasses.replace(ONE_SEED, seeds=5)
    results = hand_results(template)
    summary = mechanism.summarize(config, results)
    # Ratios without / with BN: shift 0.4 / 0.1 = 4; loss range 1 / 0.1 = 10; largest
    # change 4 / 1 = 4; beta max(2/0.1, 4/0.4) / max(1/0.1, 1/0.4) = 20 / 10 = 2 (tiny etas
    # 0.1, 0.4). Noisy - BN = -1 pp (+2 margin: 1); noisy - none = 9 pp.
    rows = {c["key"]: c for c in summary["claims"]}
    assert rows["ics_ioffe"]["per_seed"] == pytest.approx([4.0] * 5)
    assert rows["ics_santurkar"]["per_seed"] == pytest.approx([0.25] * 5)
    assert rows["loss_range"]["per_seed"] == pytest.approx([10.0] * 5)
    assert rows["grad_change"]["per_seed"] == pytest.approx([4.0] * 5)
    assert rows["beta"]["per_seed"] == pytest.approx([2.0] * 5)
    assert rows["noisy_as_bn"]["per_seed"] == pytest.approx([1.0] * 5)
    assert rows["noisy_above_none"]["per_seed"] == pytest.approx([9.0] * 5)
    assert verdicts(summary) == {
        "ics_ioffe": "held",
        "ics_santurkar": "not held",
        "loss_range": "held",
        "grad_change": "held",
        "beta": "held",
        "noisy_as_bn": "held",
        "noisy_above_none": "held",
    }
    assert "Claims that did not hold: ics_santurkar." in summary["report"][-1]
    json.dumps(summary, allow_nan=False)
    # The arms' data swapped: BN's numbers under "none" and the reverse.
    for r in results.values():
        r["units"]["none"], r["units"]["bn"] = r["units"]["bn"], r["units"]["none"]
    swapped = verdicts(mechanism.summarize(config, results))
    assert swapped == {
        "ics_ioffe": "not held",
        "ics_santurkar": "held",
        "loss_range": "not held",
        "grad_change": "not held",
        "beta": "not held",
        "noisy_as_bn": "held",  # 0.79 - 0.70 + 2 pp
        "noisy_above_none": "not held",  # 0.79 - 0.80
    }


def test_summary_counts_a_loss_that_blew_up_along_the_gradient_as_infinitely_rough(one_seed_run):
    template, _ = one_seed_run
    config = dataclasses.replace(ONE_SEED, seeds=5)
    results = hand_results(template)
    for r in results.values():
        p = r["units"]["none"]["probe"]
        p["loss"] = [[1.0, None]] * len(p["steps"])  # stored as None: not finite
    result = mechanism.MechanismResult.from_seed_results(config, results)
    assert np.isinf(result.loss_range("none")).all()
    numbers = mechanism.seed_numbers(result)
    assert np.isinf(numbers["none"]["loss_range"]).all()
    # An infinite ratio is not a finite effect: the rule is left out rather than judged on it.
    assert mechanism.effects(numbers)["loss_range"] == [None] * 5


def test_metric_rows_hold_the_curves_and_the_probes(one_seed_run):
    result, _ = one_seed_run
    rows = mechanism.metric_rows(result)
    assert len(rows) == 3 * (4 + 3)
    probe = [r for r in rows if r.get("probe") and r["unit"] == "bn"]
    assert [r["step"] for r in probe] == [0, 12, 24]
    found = result["units"]["bn"]["probe"]
    assert probe[1]["fc2.relative_shift"] == found["shift"]["relative"][1][1]
    assert probe[1]["fc1.relative_shift"] == 0.0
    assert probe[1]["loss_range"] == pytest.approx(max(found["loss"][1]) - min(found["loss"][1]))


# --- tuning, registry, figures ----------------------------------------------------------------


def test_tune_score_is_the_best_smoothed_validation_accuracy(tiny_data, one_seed_run):
    result, _ = one_seed_run
    assert mechanism.tune_arms(TINY) == ["none", "bn", "noisy"]
    score = mechanism.tune_score(TINY, tiny_data, "bn", 0.1, 0)
    accuracy = result["units"]["bn"]["curve"]["val_accuracy"]
    smoothed = [np.mean(accuracy[max(0, i - 1) : i + 1]) for i in range(len(accuracy))]
    assert score == pytest.approx(max(smoothed))
    assert math.isnan(mechanism.tune_score(TINY, tiny_data, "none", 1e6, 0))
    with pytest.raises(ValueError, match=r"expected arm in \['none', 'bn', 'noisy'\]"):
        mechanism.tune_score(TINY, tiny_data, "batchnorm", 0.1, 0)


def test_registry_entry_declares_the_rules_and_the_tuning():
    experiment = registry.get_experiment("mechanism")
    assert experiment.rules == mechanism.RULES
    assert {r.key for r in experiment.rules} == {
        "ics_ioffe",
        "ics_santurkar",
        "loss_range",
        "grad_change",
        "beta",
        "noisy_as_bn",
        "noisy_above_none",
    }
    # The two covariate-shift rules split at the same ratio: one of them counts each seed.
    rules = {r.key: r for r in mechanism.RULES}
    assert rules["ics_santurkar"].threshold == pytest.approx(1 / rules["ics_ioffe"].threshold)
    assert experiment.tuning.arms(TINY) == list(mechanism.ARMS)
    assert experiment.tuning.preset == "quick" and experiment.tuning.hyper_parameter == "lr"
    assert set(mechanism.PRESETS) == {"tiny", "quick", "full"}
    for name in ("quick", "full"):
        assert mechanism.PRESETS[name].seeds == 5
        assert mechanism.PRESETS[name].dataset == "mnist1d-large"


@pytest.fixture(scope="module")
def hand_made(one_seed_run):
    template, _ = one_seed_run
    config = dataclasses.replace(ONE_SEED, seeds=3)
    results = hand_results(template, 3)
    summary = mechanism.summarize(config, results)
    return config, results, summary


def test_plot_returns_titled_figures_the_summary_describes(hand_made):
    from matplotlib.figure import Figure

    config, results, summary = hand_made
    figures = mechanism.plot(config, results, summary)
    assert sorted(figures) == sorted(summary["figure_notes"])
    for figure in figures.values():
        assert isinstance(figure, Figure) and figure.get_suptitle()
        assert all(ax.get_ylabel() for ax in figure.axes[:: len(figure.axes) // 2 or 1])
        assert figure.axes[-1].get_xlabel()
    shift = figures["shift"]
    assert len(shift.axes) == 2 * len(mechanism.ARMS)
    # Every layer but fc1 (whose shift is 0 by construction) is drawn in the relative panels.
    assert len(shift.axes[0].get_lines()) == len(mechanism.layer_names(config)) - 1
    assert plots_mechanism.COLORS["bn"] != plots_mechanism.COLORS["none"]
