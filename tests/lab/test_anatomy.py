"""anatomy: the measures on batches with known answers (a Gaussian batch, an exponential batch,
torch's own batch_norm, a layer that normalises with the wrong variance), the tiny preset
through the runner, resume, the checks of results and checkpoints, the config's errors and the
verdicts' direction.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import matplotlib
import pytest
import torch

import batchnorm
from batchnorm.lab import protocol, registry, runner
from batchnorm.lab.experiments import _anatomy_training as training
from batchnorm.lab.experiments import anatomy

matplotlib.use("Agg")

TINY = anatomy.PRESETS["tiny"]
ONE_SEED = dataclasses.replace(TINY, seeds=1)


@pytest.fixture(scope="module")
def tiny_data():
    return anatomy.prepare(TINY)


@pytest.fixture(scope="module")
def tiny_results(tiny_data):
    return {s: anatomy.run_seed(TINY, tiny_data, s) for s in range(TINY.seeds)}


def without_seconds(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


# --- the measures, on batches with known answers ----------------------------------------------


def test_standardize_equals_torch_functional_batch_norm():
    x = torch.randn(256, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = 3.0 * x + torch.arange(7, dtype=torch.float64)
    for eps in (1e-5, 0.5):
        want = torch.nn.functional.batch_norm(x, None, None, training=True, eps=eps)
        torch.testing.assert_close(anatomy.standardize(x, eps), want, rtol=0, atol=1e-12)


def test_gaussian_batch_has_share_0683_within_one_and_no_skew():
    x = torch.randn(20_000, 6, generator=torch.Generator().manual_seed(1)) * 4.0 + 7.0
    x_hat = anatomy.standardize(x, 1e-5)
    share, skew = anatomy.share_within_one(x_hat), anatomy.skewness(x_hat)
    # Standard errors at n = 20,000: share sqrt(0.683 * 0.317 / n) = 0.0033, skew
    # sqrt(6 / n) = 0.017; the bounds are 3 of them.
    assert torch.all((share - anatomy.GAUSSIAN_SHARE).abs() < 0.01)
    assert torch.all(skew.abs() < 0.05)
    assert torch.all(anatomy.excess_kurtosis(x_hat).abs() < 0.15)
    assert torch.all(anatomy.looks_gaussian(share, skew))
    assert anatomy.GAUSSIAN_SHARE == pytest.approx(0.682689, abs=1e-6)


def test_exponential_batch_is_standardized_but_skewed_and_flagged_not_gaussian():
    gen = torch.Generator().manual_seed(2)
    x = torch.empty(20_000, 6, dtype=torch.float64).exponential_(generator=gen)
    eps = 1e-5
    x_hat = anatomy.standardize(x, eps)
    _, var = anatomy.moments(x)
    # Standardized exactly: mean 0, variance sigma^2 / (sigma^2 + eps) ...
    assert torch.all(x_hat.mean(dim=0).abs() < 1e-12)
    torch.testing.assert_close(x_hat.var(dim=0, unbiased=False), var / (var + eps))
    # ... yet an exponential's shape: skewness 2, excess kurtosis 6, and P(0 <= E <= 2) =
    # 1 - e^-2 = 0.865 within one standard deviation of the mean. The share is noisier than
    # a Gaussian's: its lower edge, mean - std, sits where the density is 1, so each 0.01 of
    # error in the sample mean or std (their standard errors here) moves it by ~0.01.
    skew = anatomy.skewness(x_hat)
    assert torch.all((skew - 2.0).abs() < 0.25)
    assert torch.all((anatomy.excess_kurtosis(x_hat) - 6.0).abs() < 2.0)
    share = anatomy.share_within_one(x_hat)
    assert torch.all((share - (1 - math.exp(-2))).abs() < 0.04)
    assert not torch.any(anatomy.looks_gaussian(share, skew))


def test_gaussian_units_at_batch_256_clear_the_rules_bar_and_exponential_units_do_not():
    # The 'gaussian' rule's threshold (75 % of the units) must be reachable when the claim is
    # true: ~99 % of truly Gaussian units pass the test at a batch of 256 (the share's spread
    # is 0.020 there, the skew's 0.15).
    gen = torch.Generator().manual_seed(3)
    gaussian = anatomy.standardize(torch.randn(256, 400, generator=gen), 1e-5)
    passed = (
        anatomy.looks_gaussian(anatomy.share_within_one(gaussian), anatomy.skewness(gaussian))
        .double()
        .mean()
    )
    assert 0.95 < passed < 1.0
    assert passed > anatomy.GAUSSIAN_UNITS_THRESHOLD
    exponential = anatomy.standardize(torch.empty(256, 400).exponential_(generator=gen), 1e-5)
    flags = anatomy.looks_gaussian(
        anatomy.share_within_one(exponential), anatomy.skewness(exponential)
    )
    assert flags.double().mean() < 0.02


def test_skewness_is_invariant_under_positive_affine_maps_and_flips_sign_under_negation():
    x = torch.empty(500, 3, dtype=torch.float64).exponential_(
        generator=torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(anatomy.skewness(5 * x - 2), anatomy.skewness(x))
    torch.testing.assert_close(anatomy.skewness(-x), -anatomy.skewness(x))
    torch.testing.assert_close(anatomy.excess_kurtosis(-3 * x), anatomy.excess_kurtosis(x))
    constant = torch.ones(10, 2)
    assert torch.isnan(anatomy.skewness(constant)).all()
    assert not anatomy.looks_gaussian(torch.tensor([0.68]), torch.tensor([math.nan])).item()


def _trained_looking_layer(channels: int, seed: int) -> batchnorm.BatchNorm1d:
    layer = batchnorm.BatchNorm1d(channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(0.5 + torch.rand(channels, generator=gen))
        layer.bias.copy_(torch.randn(channels, generator=gen))
    return layer


def test_measure_layer_of_our_batchnorm1d_finds_it_standardizes_and_keeps_the_shape():
    gen = torch.Generator().manual_seed(5)
    layer = _trained_looking_layer(6, 5)
    x = torch.empty(256, 6).exponential_(generator=gen) * 3.0 + 1.0
    before = (layer.running_mean.clone(), layer.running_var.clone())
    y = layer(x)
    m = anatomy.measure_layer(layer, x, y.detach())
    # float32 output: every deviation far below the rules' 1e-4.
    assert max(m["standardize_deviation"]) < 1e-5
    assert max(m["shape_deviation"]) < 1e-5
    mean, var = anatomy.moments(x)
    assert m["mean"] == pytest.approx(mean.tolist(), rel=1e-12)
    assert m["layer_mean"] == pytest.approx(mean.tolist(), rel=1e-5, abs=1e-6)
    assert m["layer_var"] == pytest.approx(var.tolist(), rel=1e-5)
    assert m["gamma"] == pytest.approx(layer.weight.tolist())
    assert m["out_mean"] == pytest.approx(layer.bias.tolist(), abs=1e-5)
    assert m["skew"] == pytest.approx(m["input_skew"], abs=1e-5)
    assert not any(m["gaussian"]) and not any(m["input_gaussian"])  # exponential inputs
    # measuring never touches the layer's buffers beyond the forward above
    layer(x)  # one more training forward moves them ...
    assert not torch.equal(layer.running_mean, before[0])
    probe = copy.deepcopy(layer)
    anatomy.layer_batch_statistics(layer, x)
    assert torch.equal(layer.running_mean, probe.running_mean)  # ... measuring does not
    assert torch.equal(layer.running_var, probe.running_var)


def test_standardize_rule_fails_a_layer_that_normalises_with_the_unbiased_variance():
    gen = torch.Generator().manual_seed(6)
    layer = _trained_looking_layer(4, 6)
    x = torch.randn(256, 4, generator=gen) * 2.0
    mean, var = anatomy.moments(x)
    unbiased = var * 256 / 255
    # The makemore notebooks' normalisation: off by 1/(m - 1) = 3.9e-3 in var(x_hat).
    y = (x.double() - mean) / torch.sqrt(unbiased + layer.eps) * layer.weight.detach().double()
    y = (y + layer.bias.detach().double()).float()
    m = anatomy.measure_layer(layer, x, y)
    worst = max(m["standardize_deviation"])
    assert worst == pytest.approx(1 / 255, rel=0.02)
    assert -math.log10(worst) < anatomy.STANDARDIZE_DIGITS
    # ... and the right variance passes.
    right = anatomy.measure_layer(layer, x, layer(x).detach())
    assert -math.log10(max(right["standardize_deviation"])) > anatomy.STANDARDIZE_DIGITS


def test_shape_rule_fails_a_layer_whose_output_is_not_affine_in_its_input():
    gen = torch.Generator().manual_seed(7)
    layer = _trained_looking_layer(4, 7)
    x = torch.randn(256, 4, generator=gen)
    y = layer(x).detach()
    m = anatomy.measure_layer(layer, x, torch.exp(0.5 * y))  # a squashed output
    assert -math.log10(max(m["shape_deviation"])) < anatomy.STANDARDIZE_DIGITS


def test_shown_units_spread_from_least_to_most_skewed():
    skew = [0.3, -2.0, None, 0.1, 1.0]
    assert training.shown_units(skew, 3) == [3, 4, 2]
    assert training.shown_units(skew, 1) == [3]


# --- the experiment end to end ----------------------------------------------------------------


def test_tiny_preset_runs_through_the_runner_and_replots(tmp_path):
    run_dir = batchnorm.lab.run_experiment("anatomy", preset="tiny", out=tmp_path, verbose=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = sorted(p.stem for p in (run_dir / "figures").glob("*.png"))
    assert figures == sorted(summary["figure_notes"]) == ["affine", "histograms", "shape"]
    assert [c["key"] for c in summary["claims"]] == [r.key for r in anatomy.RULES]
    assert summary["experiment"] == "anatomy" and summary["seeds"] == [0, 1]
    assert summary["seconds"] > 0
    report = (run_dir / "summary.md").read_text()
    assert "Step by step" in report and "not for the record" in report
    assert ("Did not hold" in report) != ("Every claim held" in report)
    replotted = sorted(p.stem for p in runner.plot_run(run_dir, verbose=False))
    assert replotted == figures
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_unit = [r for r in rows if "neuron" in r]
    assert len(per_unit) == 2 * 2 * TINY.depth * TINY.hidden  # seeds x networks x units


def test_run_seed_result_holds_both_networks_and_every_layer(tiny_results):
    result = tiny_results[0]
    assert list(result["units"]) == list(anatomy.ACTIVATIONS)
    for name, unit in result["units"].items():
        assert unit["activation"] == name and unit["batch"] == TINY.measure_batch
        assert sorted(unit["layers"]) == ["1", "2", "3"]
        assert len(unit["shown"]["x"][0]) == TINY.measure_batch
        for layer in unit["layers"].values():
            assert all(len(layer[k]) == TINY.hidden for k in training.LAYER_KEYS)
    anatomy.check_result(TINY, 0, result)


def test_run_seed_resumed_from_its_checkpoint_equals_an_uninterrupted_run(tiny_data):
    saved = []
    full = anatomy.run_seed(ONE_SEED, tiny_data, 0, save_checkpoint=saved.append)
    assert [s["step"] for s in saved] == [TINY.steps]  # after the first network
    anatomy.check_checkpoint(ONE_SEED, tiny_data, 0, saved[0])
    resumed = anatomy.run_seed(ONE_SEED, tiny_data, 0, checkpoint=saved[0])
    assert without_seconds(resumed) == without_seconds(full)


def test_check_result_and_checkpoint_refuse_damage_naming_the_entry(tiny_data, tiny_results):
    result = copy.deepcopy(tiny_results[1])
    del result["units"]["sigmoid"]["layers"]["2"]["skew"]
    with pytest.raises(
        ValueError, match=r"units\['sigmoid'\]\['layers'\]\['2'\] to have the key 'skew'"
    ):
        anatomy.check_result(TINY, 1, result)
    result = copy.deepcopy(tiny_results[1])
    result["units"]["relu"]["layers"]["1"]["gamma"][3] = "x"
    with pytest.raises(ValueError, match=r"units\['relu'\]\['layers'\]\['1'\]\['gamma'\].*at 3"):
        anatomy.check_result(TINY, 1, result)
    with pytest.raises(ValueError, match=r"result\['seed'\] to be 0"):
        anatomy.check_result(TINY, 0, tiny_results[1])
    state = {"step": TINY.steps, "seconds": 1.0, "units": {"tanh": {}}}
    with pytest.raises(ValueError, match=r"units of this configuration, got unknown \['tanh'\]"):
        anatomy.check_checkpoint(TINY, tiny_data, 0, state)
    state = {"step": 1, "seconds": 1.0, "units": {"relu": tiny_results[0]["units"]["relu"]}}
    with pytest.raises(ValueError, match=r"state\['step'\]"):
        anatomy.check_checkpoint(TINY, tiny_data, 0, state)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("layer", 4, r"AnatomyConfig\(\): expected layer an int in \[1, 3\]"),
        ("show_units", 0, r"expected show_units an int in \[1, 16\]"),
        ("measure_batch", 4, r"expected measure_batch an int >= 8"),
        ("steps", 0, r"expected steps an int >= 1"),
        ("dataset", "cifar", r"expected dataset one of"),
        ("lrs", {"relu": 0.1}, r"expected lrs a learning rate > 0 for each of"),
        ("hidden", 2.5, r"expected hidden an int"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **{field: value})


def test_prepare_refuses_a_measured_batch_larger_than_the_training_set():
    with pytest.raises(ValueError, match=r"expected measure_batch <= 1238"):
        anatomy.prepare(dataclasses.replace(TINY, measure_batch=5000))


def test_learning_rates_come_from_the_tuned_file(tmp_path, monkeypatch):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"anatomy": {"arms": {"sigmoid": {"lr": 0.7}}}}))
    monkeypatch.setattr(protocol, "TUNED_FILE", tuned)
    config = dataclasses.replace(TINY, lrs=None)
    assert config.lrs == {"relu": anatomy.DEFAULT_LR, "sigmoid": 0.7}


# --- verdicts ---------------------------------------------------------------------------------


def _with_flags(results: dict, value: bool, seeds: int = 5) -> dict:
    """Five seeds copied from the tiny results, every unit of the judged layer flagged."""
    out = {}
    for s in range(seeds):
        result = copy.deepcopy(results[s % len(results)])
        result["seed"] = s
        for unit in result["units"].values():
            layer = unit["layers"][str(TINY.layer)]
            layer["gaussian"] = [value] * len(layer["gaussian"])
        out[s] = result
    return out


def test_summarize_verdicts_flip_with_the_data(tiny_results):
    config = dataclasses.replace(TINY, seeds=5)
    gaussian = anatomy.summarize(config, _with_flags(tiny_results, True))
    skewed = anatomy.summarize(config, _with_flags(tiny_results, False))
    verdict = {
        s: {c["key"]: c["verdict"] for c in s_["claims"]}
        for s, s_ in (("gaussian", gaussian), ("skewed", skewed))
    }
    assert verdict["gaussian"]["gaussian"] == "held"
    assert verdict["skewed"]["gaussian"] == "not held"
    assert "Did not hold: gaussian (not held)" in "\n".join(skewed["report"])
    # The by-construction rules hold on our layer, and fail when a deviation is put in.
    assert verdict["skewed"]["standardizes"] == "held"
    broken = _with_flags(tiny_results, False)
    for result in broken.values():
        result["units"]["relu"]["layers"]["1"]["standardize_deviation"][0] = 3.9e-3
    rows = {c["key"]: c for c in anatomy.summarize(config, broken)["claims"]}
    assert rows["standardizes"]["verdict"] == "not held"
    assert rows["standardizes"]["mean"] == pytest.approx(-math.log10(3.9e-3))
    json.dumps(anatomy.summarize(config, broken), allow_nan=False)


def test_registry_entry_declares_the_rules_and_the_tuning(tiny_data):
    entry = registry.EXPERIMENTS["anatomy"]
    assert entry.rules is anatomy.RULES
    assert [(r.key, r.threshold, r.agree) for r in entry.rules] == [
        ("standardizes", 4.0, 0.8),
        ("shape_kept", 4.0, 0.8),
        ("gaussian", 0.75, 0.8),
    ]
    assert entry.tuning.arms(TINY) == ["relu", "sigmoid"] and entry.tuning.preset == "quick"
    for name in ("quick", "full"):
        assert anatomy.PRESETS[name].seeds == 5 and anatomy.PRESETS[name].lrs is not None
    score = anatomy.tune_score(TINY, tiny_data, "relu", 0.3, seed=0)
    _, run = training._train(TINY, tiny_data, 0, "relu", 0.3)
    from batchnorm.lab._classify import best_smoothed

    assert score == best_smoothed(run["curve"]["val_accuracy"], TINY.smooth)
    assert 0 <= score <= 1
