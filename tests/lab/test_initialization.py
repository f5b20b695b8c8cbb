"""initialization: BN's invariance to the weight scale c (forward) and its 1/c gradient and 1/c^2
effective step, the spread measure on known answers, determinism and resume, the checks of
results and checkpoints, tuning, and verdicts that flip when the arms' data are swapped.

The ``tiny`` preset (scikit-learn's digits, 3 scales, 20 steps) checks structure, not the claim.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math

import matplotlib
import pytest
import torch

import batchnorm
from batchnorm.lab import protocol, registry, runner
from batchnorm.lab.experiments import _learning_rate_nets as nets
from batchnorm.lab.experiments import initialization as init_exp

matplotlib.use("Agg")

TINY = init_exp.PRESETS["tiny"]
ONE_SEED = dataclasses.replace(TINY, seeds=1)
# An eps small enough that BN's scale invariance is exact in float64 (eps must be > 0 to train).
TINY_EPS = 1e-30


@pytest.fixture(scope="module")
def tiny_data():
    return init_exp.prepare(TINY)


@pytest.fixture(scope="module")
def one_seed_run(tiny_data):
    saved = []
    result = init_exp.run_seed(ONE_SEED, tiny_data, 0, save_checkpoint=saved.append)
    return result, saved


def without_seconds(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


def through_torch_save(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- settings ---------------------------------------------------------------------------------


def test_presets_and_registry_entry():
    for name in ("quick", "full"):
        config = init_exp.PRESETS[name]
        assert config.scales == (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
        assert config.seeds == 5 and config.dataset == "mnist1d-large"
        assert set(config.lrs) == set(config.arms)
    assert init_exp.steps_per_seed(TINY) == 4 * 3 * 20
    entry = registry.EXPERIMENTS["initialization"]
    assert entry.rules is init_exp.RULES
    assert [r.key for r in entry.rules] == [
        "spread_relu6",
        "flat_relu6",
        "spread_sigmoid3",
        "flat_sigmoid3",
    ]
    assert [r.threshold for r in entry.rules] == [10.0, -5.0, 10.0, -5.0]
    assert entry.tuning.arms(init_exp.PRESETS["quick"]) == [
        "relu6/none",
        "relu6/bn",
        "sigmoid3/none",
        "sigmoid3/bn",
    ]
    assert entry.tuning.preset == "quick" and entry.tuning.hyper_parameter == "lr"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("scales", (0.1, 10.0), r"expected scales to include 1"),
        ("scales", (1.0, 0.1), r"expected scales distinct numbers > 0, ascending"),
        ("scales", (0.0, 1.0), r"expected scales distinct numbers > 0, ascending"),
        ("lrs", {"relu6/bn": 0.1}, r"expected lrs a learning rate > 0 for each of"),
        ("lrs", dict.fromkeys(TINY.arms, -1.0), r"expected lrs a learning rate > 0"),
        ("steps", 0, r"expected steps an int >= 1"),
        ("batch_size", 1, r"expected batch_size an int >= 2"),
        ("dataset", "cifar", r"expected dataset one of"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=r"InitializationConfig\(\): " + message):
        dataclasses.replace(TINY, **{field: value})


def test_config_takes_each_arms_rate_from_the_tuned_file(tmp_path, monkeypatch):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"initialization": {"arms": {"relu6/bn": {"lr": 0.7}}}}))
    monkeypatch.setattr(protocol, "TUNED_FILE", tuned)
    config = dataclasses.replace(TINY, lrs=None)
    assert config.lrs["relu6/bn"] == 0.7
    assert config.lrs["sigmoid3/none"] == init_exp.UNTUNED_LR  # never tuned
    assert TINY.lrs["relu6/bn"] == 0.3  # a fixed rate wins over the file


# --- the invariance and the effective step ----------------------------------------------------


def _net(norm: str, c: float, eps: float | None = None) -> torch.nn.Sequential:
    """relu6 in float64 with every weight of the c = 1 draw times c, exactly (drawing at scale
    c in float32 rounds differently, ~1e-7 relative)."""
    gen = torch.Generator().manual_seed(5)
    model = nets.make_net("relu6", norm, n_in=8, n_out=4, hidden=10, generator=gen).double()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(c)
    if eps is not None:
        for layer in model.modules():
            if isinstance(layer, batchnorm.BatchNorm1d):
                layer.eps = eps
    return model


def _batch(seed: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(48, 8, generator=gen, dtype=torch.float64), torch.randint(
        0, 4, (48,), generator=gen
    )


@pytest.mark.parametrize("c", [0.01, 0.3, 10.0])
def test_bn_hidden_output_in_training_mode_is_invariant_to_the_weight_scale(c):
    x, _ = _batch()
    reference = _net("bn", 1.0, TINY_EPS)[:-1](x)  # every layer up to the last activation
    torch.testing.assert_close(_net("bn", c, TINY_EPS)[:-1](x), reference, rtol=1e-9, atol=1e-9)
    # make_net draws c times the c = 1 weights (same generator state; float32 rounding).
    drawn = [
        nets.make_net(
            "relu6",
            "bn",
            n_in=8,
            n_out=4,
            hidden=10,
            generator=torch.Generator().manual_seed(5),
            weight_scale=scale,
        )
        for scale in (1.0, c)
    ]
    for a, b in zip(*(nets.hidden_weights(m) for m in drawn), strict=True):
        torch.testing.assert_close(b, c * a)
    # With eps scaled by c^2 the invariance is exact for torch's eps = 1e-5 as well: eps is
    # the only thing that breaks it.
    scaled_eps = _net("bn", c, 1e-5 * c**2)[:-1](x)
    torch.testing.assert_close(scaled_eps, _net("bn", 1.0)[:-1](x), rtol=1e-9, atol=1e-9)


def test_with_a_fixed_eps_bn_is_invariant_only_while_the_batch_variance_dwarfs_eps():
    # A unit's pre-BN variance here is about c^2 (fan-in 8-10, He init), so eps = 1e-5 is
    # ~10 % of it at c = 0.01 and ~1e-4 of it at c = 0.3. Measured largest change of the
    # last hidden activation (values of order 1) against c = 1: 1.15 at c = 0.01 (six
    # layers compound the shrinkage sqrt(var / (var + eps)) unit by unit), 1.1e-3 at c = 0.3,
    # 1.0e-4 at c = 10 (c = 1's own eps effect).
    x, _ = _batch()
    reference = _net("bn", 1.0)[:-1](x)

    def change(c: float) -> float:
        return (_net("bn", c)[:-1](x) - reference).abs().max().item()

    assert change(0.01) > 0.1
    assert 1e-4 < change(0.3) < 1e-2
    assert change(10.0) < 1e-3


def test_without_bn_the_output_is_not_invariant_to_the_weight_scale():
    x, _ = _batch()
    # ReLU is positively homogeneous: 6 hidden layers scale the last activation by c^6.
    low, one = _net("none", 0.5)[:-1](x), _net("none", 1.0)[:-1](x)
    torch.testing.assert_close(low, one * 0.5**6, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(low, one)


@pytest.mark.parametrize("c", [0.1, 10.0])
def test_bn_gradient_scales_as_one_over_c_and_the_relative_step_as_one_over_c_squared(c):
    x, y = _batch()
    one, scaled = _net("bn", 1.0, TINY_EPS), _net("bn", c, TINY_EPS)
    # Only the hidden layers are followed by BN: give both nets the same output layer, so that
    # the loss is the same function of the hidden weights' directions.
    with torch.no_grad():
        scaled.out.weight.copy_(one.out.weight)
    grads_1, grads_c = nets.hidden_gradients(one, x, y), nets.hidden_gradients(scaled, x, y)
    for g1, gc in zip(grads_1, grads_c, strict=True):
        torch.testing.assert_close(gc, g1 / c, rtol=1e-8, atol=1e-14)
    lr = 0.1
    steps_1 = nets.relative_steps(one, x, y, lr)
    steps_c = nets.relative_steps(scaled, x, y, lr)
    for s1, sc in zip(steps_1, steps_c, strict=True):
        assert sc == pytest.approx(s1 / c**2, rel=1e-8)
    # ... and the effective rate lr / ||W||^2 too.
    eff_1 = nets.effective_rates(lr, nets.weight_norms(one))
    eff_c = nets.effective_rates(lr, nets.weight_norms(scaled))
    assert eff_c == pytest.approx([e / c**2 for e in eff_1], rel=1e-6)


def test_spread_is_max_minus_min_in_points_with_diverged_runs_at_chance():
    assert init_exp.spread([0.5, 0.7, 0.62]) == pytest.approx(20.0)
    assert init_exp.spread([0.6]) == 0.0
    blown = {"diverged": True, "first_loss": None, "curve": {"train_loss": [None]}}
    chance = nets.accuracy_or_chance(blown, "test_accuracy", init_exp.CHANCE)
    assert init_exp.spread([0.65, chance, 0.6]) == pytest.approx(55.0)


# --- one seed, tuning, the runner -------------------------------------------------------------


def test_run_seed_shares_draws_across_scales_and_resumes_to_the_uninterrupted_result(
    tiny_data, one_seed_run
):
    full, saved = one_seed_run
    names = [u.name for u in init_exp.plan(ONE_SEED)]
    assert list(full["units"]) == names and names[0] == "relu6/none/c=0.1"
    assert [s["step"] for s in saved] == [20 * k for k in range(1, 12)]
    init_exp.check_result(ONE_SEED, 0, full)
    json.dumps(full, allow_nan=False)
    # Step 0's norms: c times those of c = 1, for both norms of a net (same draws).
    for norm in nets.NORMS:
        base = full["units"][f"sigmoid3/{norm}/c=1"]["weight_norms"][0]
        for c in TINY.scales:
            norms = full["units"][f"sigmoid3/{norm}/c={c:g}"]["weight_norms"][0]
            assert norms == pytest.approx([c * n for n in base], rel=1e-6)
    for state in (saved[1], saved[8]):
        init_exp.check_checkpoint(ONE_SEED, tiny_data, 0, state)
        resumed = init_exp.run_seed(ONE_SEED, tiny_data, 0, checkpoint=through_torch_save(state))
        assert without_seconds(resumed) == without_seconds(full)


def test_tune_score_is_the_final_validation_accuracy_at_c_1_and_nan_if_diverged(
    tiny_data, one_seed_run
):
    full, _ = one_seed_run
    score = init_exp.tune_score(ONE_SEED, tiny_data, "relu6/bn", 0.3, 0)
    assert score == full["units"]["relu6/bn/c=1"]["curve"]["val_accuracy"][-1]
    assert math.isnan(init_exp.tune_score(ONE_SEED, tiny_data, "relu6/none", 1e4, 0))


def test_tiny_preset_runs_through_the_runner_and_replots(tmp_path):
    run_dir = batchnorm.lab.run_experiment(
        "initialization", preset="tiny", out=tmp_path, verbose=False
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = sorted(p.stem for p in (run_dir / "figures").glob("*.png"))
    assert figures == sorted(summary["figure_notes"]) == ["accuracy", "curves"]
    assert [c["key"] for c in summary["claims"]] == [r.key for r in init_exp.RULES]
    for claim in summary["claims"]:
        assert claim["verdict"] in protocol.VERDICTS and claim["seeds"] == 2
        assert not claim["for_record"] and claim["measured"]
    assert summary["experiment"] == "initialization" and summary["seeds"] == [0, 1]
    assert summary["seconds"] > 0 and summary["lrs"] == TINY.lrs
    report = (run_dir / "summary.md").read_text()
    assert "spread over c (pp)" in report and "not for the record" in report
    assert sorted(p.stem for p in runner.plot_run(run_dir, verbose=False)) == figures
    path = run_dir / "seeds" / "seed-0.json"
    result = json.loads(path.read_text())
    result["units"]["sigmoid3/bn/c=10"]["curve"]["steps"] = []
    path.write_text(json.dumps(result))
    with pytest.raises(runner.RunFileError, match=r"seed-0.json.*'sigmoid3/bn/c=10'.*\['steps'\]"):
        runner.load_run(run_dir)


def _damaged(value: dict, edit) -> dict:
    copied = copy.deepcopy(value)
    edit(copied)
    return copied


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.pop("seconds"), r"result to have the key 'seconds'"),
        (lambda r: r["units"].pop("relu6/bn/c=0.1"), r"every unit.*relu6/bn/c=0.1"),
        (
            lambda r: r["units"]["relu6/bn/c=10"]["weight_norms"][0].append(1.0),
            r"\['relu6/bn/c=10'\]\['weight_norms'\] to be a list of 3 lists of 6",
        ),
        (
            lambda r: r["units"]["sigmoid3/none/c=1"]["weight_norms"][1].__setitem__(0, -1.0),
            r"\['sigmoid3/none/c=1'\]\['weight_norms'\]",
        ),
        (
            lambda r: r["units"]["sigmoid3/bn/c=1"].pop("first_loss"),
            r"\['sigmoid3/bn/c=1'\] to have the key 'first_loss'",
        ),
    ],
)
def test_check_result_refuses_a_damaged_result_naming_the_entry(one_seed_run, edit, message):
    full, _ = one_seed_run
    with pytest.raises(ValueError, match=message):
        init_exp.check_result(ONE_SEED, 0, _damaged(full, edit))


def test_check_checkpoint_refuses_a_damaged_or_foreign_checkpoint(tiny_data, one_seed_run):
    _, saved = one_seed_run
    state = saved[3]
    with pytest.raises(ValueError, match=r"state\['step'\] \(the steps of its units\) to be 80"):
        init_exp.check_checkpoint(
            ONE_SEED, tiny_data, 0, _damaged(state, lambda s: s.update(step=0))
        )
    other = dataclasses.replace(ONE_SEED, scales=(0.3, 1.0, 3.0))
    with pytest.raises(ValueError, match=r"unknown \['relu6/bn/c=0.1'"):
        init_exp.check_checkpoint(other, tiny_data, 0, state)


# --- verdicts on hand-made results ------------------------------------------------------------

FIVE = dataclasses.replace(TINY, seeds=5, scales=(0.01, 0.1, 1.0, 10.0))
# Per scale of FIVE: final test accuracy, or None for a run that diverged.
_ACCURACY = {
    "none": [None, 0.40, 0.70, None],  # spread 70 - 10 = 60 pp
    "bn": [0.68, 0.70, 0.71, 0.67],  # spread 4 pp
}


def _fake_run(test: float | None, depth: int) -> dict:
    bad = test is None
    return {
        "curve": {
            "steps": [0, 10, 20],
            "train_loss": [None, 2.0, 3.0 if bad else 1.0],
            "val_accuracy": [0.1, 0.3, 0.1 if bad else test],
            "val_loss": [2.3, 2.0, 1.0],
        },
        "diverged": False,
        "diverged_at": None,
        "first_loss": 2.3,
        "test_accuracy": 0.1 if bad else test,
        "test_loss": 1.0,
        "train_accuracy": 0.5,
        "train_eval_loss": 1.0,
        "weight_norms": [[1.0] * depth] * 3,
    }


def _fake_results(swap: bool = False) -> dict[int, dict]:
    results = {}
    for seed in range(5):
        units = {}
        for unit in init_exp.plan(FIVE):
            net, norm, c = unit.params["net"], unit.params["norm"], unit.params["scale"]
            source = {"none": "bn", "bn": "none"}[norm] if swap else norm
            test = _ACCURACY[source][FIVE.scales.index(c)]
            if test is not None:
                test += 0.002 * seed * (c == 1.0)  # seeds differ a little, spreads with them
            units[unit.name] = _fake_run(test, nets.NETS[net][0])
        results[seed] = {"seed": seed, "seconds": 1.0, "units": units}
    return results


def test_summary_holds_each_claim_on_its_arithmetic_and_flips_when_the_arms_are_swapped():
    results = _fake_results()
    for seed, result in results.items():
        init_exp.check_result(FIVE, seed, result)
    summary = init_exp.summarize(FIVE, results)
    claims = {c["key"]: c for c in summary["claims"]}
    for net in nets.NETS:
        # Seed s: no BN 60 + 0.2 s pp, BN 4 + 0.2 s pp (its best is c = 1 too).
        assert claims[f"spread_{net}"]["per_seed"] == pytest.approx([56.0] * 5)
        assert claims[f"flat_{net}"]["per_seed"] == pytest.approx(
            [-4.0 - 0.2 * s for s in range(5)]
        )
        assert summary["arms"][f"{net}/none"]["diverged"] == [5, 0, 0, 5]
    assert all(c["verdict"] == "held" and c["for_record"] for c in summary["claims"])
    assert "Every claim held." in summary["report"]
    json.dumps(summary, allow_nan=False)

    swapped = init_exp.summarize(FIVE, _fake_results(swap=True))
    assert all(c["verdict"] == "not held" for c in swapped["claims"])
    assert any(line.startswith("Did not hold: spread_relu6") for line in swapped["report"])
    figures = init_exp.plot(FIVE, results, summary)
    assert sorted(figures) == sorted(summary["figure_notes"])
    assert all(f._suptitle is not None and len(f.axes) == 2 for f in figures.values())
