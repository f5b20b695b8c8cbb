"""learning_rate: the sweep's measures on known answers, BN's scale invariance and the norm
growth behind the effective rate, determinism and resume, the checks of results and
checkpoints, and verdicts that flip when the arms' data are swapped.

The ``tiny`` preset (scikit-learn's digits, 3 rates, 20 steps) checks structure, not the claim.
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
from batchnorm.lab._classify import diverged
from batchnorm.lab.experiments import _learning_rate_nets as nets
from batchnorm.lab.experiments import learning_rate as lr_exp

matplotlib.use("Agg")

TINY = lr_exp.PRESETS["tiny"]
ONE_SEED = dataclasses.replace(TINY, seeds=1)


@pytest.fixture(scope="module")
def tiny_data():
    return lr_exp.prepare(TINY)


@pytest.fixture(scope="module")
def one_seed_run(tiny_data):
    saved = []
    result = lr_exp.run_seed(ONE_SEED, tiny_data, 0, save_checkpoint=saved.append)
    return result, saved


def without_seconds(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


def through_torch_save(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- settings ---------------------------------------------------------------------------------


def test_presets_sweep_half_decades_over_four_and_a_half_orders_with_five_seeds():
    grid = lr_exp.HALF_DECADES
    assert grid[0] == 0.00316 and grid[-1] == 100.0 and len(grid) == 10
    assert all(abs(b / a - 10**0.5) < 0.01 for a, b in zip(grid, grid[1:], strict=False))
    for name in ("quick", "full"):
        config = lr_exp.PRESETS[name]
        assert config.lrs == grid and config.seeds == 5 and config.dataset == "mnist1d-large"
        assert config.step_half_decades == pytest.approx(1.0, abs=0.01)
    assert lr_exp.steps_per_seed(TINY) == 4 * 3 * 20
    entry = registry.EXPERIMENTS["learning_rate"]
    assert entry.tuning is None and entry.rules is lr_exp.RULES
    assert [r.key for r in entry.rules] == [
        "stable_relu6",
        "best_relu6",
        "range_relu6",
        "stable_sigmoid3",
        "best_sigmoid3",
        "range_sigmoid3",
        "autotune",
    ]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lrs", (0.1, 1.0, 3.0), r"expected lrs an ascending geometric grid"),
        ("lrs", (1.0, 0.1), r"expected lrs an ascending geometric grid"),
        ("lrs", (0.1,), r"expected lrs an ascending geometric grid"),
        ("lrs", (-1.0, 1.0), r"expected lrs an ascending geometric grid"),
        ("steps", 0, r"expected steps an int >= 1"),
        ("within", 1.5, r"expected within a fraction in \[0, 1\)"),
        ("dataset", "cifar", r"expected dataset one of"),
        ("hidden", 0, r"expected hidden an int >= 1"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=r"LearningRateConfig\(\): " + message):
        dataclasses.replace(TINY, **{field: value})


# --- the measures on known answers ------------------------------------------------------------


def test_largest_stable_rate_is_the_largest_rate_that_did_not_diverge():
    lrs = [0.01, 0.1, 1.0, 10.0]
    assert lr_exp.largest_stable_rate(lrs, [False, False, True, True]) == 0.1
    # A rate that diverged between two stable ones does not cap the largest stable rate.
    assert lr_exp.largest_stable_rate(lrs, [True, False, True, False]) == 10.0
    assert lr_exp.largest_stable_rate(lrs, [True] * 4) is None
    # 10 vs 0.1: two decades, 4 half-decades; "no stable rate" counts as 0.001 (a grid step
    # below 0.01), so 0.01 vs none is 2 half-decades and none vs 0.1 is -4.
    assert lr_exp.stable_gap(10.0, 0.1, lrs) == pytest.approx(4.0)
    assert lr_exp.stable_gap(0.01, None, lrs) == pytest.approx(2.0)
    assert lr_exp.stable_gap(None, 0.1, lrs) == pytest.approx(-4.0)
    assert lr_exp.stable_gap(None, None, lrs) == 0.0
    # Described, not judged: the largest stable rate that also learned (>= chance + 5 pp).
    val = [0.40, 0.50, 0.12, 0.30]
    assert lr_exp.largest_learning_rate(lrs, val, [False, False, False, True]) == 0.1
    assert lr_exp.largest_learning_rate(lrs, [0.1] * 4, [False] * 4) is None


def test_best_index_and_good_range_on_synthetic_accuracies():
    val = [0.30, 0.71, 0.72, 0.705, 0.60]
    assert lr_exp.best_index(val) == 2
    assert lr_exp.best_index([0.5, 0.7, 0.7]) == 1  # a tie goes to the smaller rate
    # Within 2 pp of 0.72: 0.71, 0.72 and 0.705 (0.015 below), not 0.60.
    assert lr_exp.good_range(val, 0.02) == [1, 2, 3]
    assert lr_exp.good_range(val, 0.02, [False, False, False, True, False]) == [1, 2]
    assert lr_exp.good_range(val, 0.0) == [2]


def test_autotune_factor_is_the_geometric_mean_of_the_squared_norm_growth():
    # Layer 1 grows 2x (squared: 4x), layer 2 4x (16x): geometric mean sqrt(4 * 16) = 8.
    assert lr_exp.autotune_factor([1.0, 3.0], [2.0, 12.0]) == pytest.approx(8.0)
    assert lr_exp.autotune_factor([1.0, 1.0], [1.0, 1.0]) == pytest.approx(1.0)
    assert lr_exp.autotune_factor([1.0, None], [2.0, 2.0]) is None
    assert nets.effective_rates(0.5, [2.0, 0.5]) == [0.125, 2.0]


def test_a_run_at_a_huge_rate_is_marked_diverged_and_counts_as_chance(tiny_data):
    def run(lr):
        model = nets.make_net(
            "relu6",
            "none",
            n_in=64,
            n_out=10,
            hidden=16,
            generator=torch.Generator().manual_seed(0),
        )
        return nets.train_unit(
            model, tiny_data, lr=lr, steps=20, batch_size=60, seed=0, eval_every=10
        )

    blown = run(1e4)
    assert blown["diverged"] and blown["diverged_at"] is not None and diverged(blown)
    assert blown["test_accuracy"] is None
    assert nets.accuracy_or_chance(blown, "test_accuracy", 0.1) == 0.1
    assert nets.accuracy_or_chance(blown, "val_accuracy", 0.1) == 0.1
    # One norm row per measurement the run made before it stopped.
    assert len(blown["weight_norms"]) == len(blown["curve"]["steps"])
    sane = run(0.1)
    assert not diverged(sane)
    assert nets.accuracy_or_chance(sane, "test_accuracy", 0.1) == sane["test_accuracy"]


def test_diverged_also_marks_a_run_whose_loss_did_not_decrease():
    def record(first, losses):
        curve = {"steps": [0, 10, 20], "train_loss": [None, *losses]}
        return {"diverged": False, "first_loss": first, "curve": curve}

    assert not diverged(record(2.3, [2.0, 1.5]))
    assert not diverged(record(2.3, [2.4, 2.2]))  # only the last measurement counts
    assert diverged(record(2.3, [2.0, 2.4]))  # ended above where it started
    assert diverged(record(2.3, [1.0, 2.3]))  # ... or level with it
    assert diverged(record(None, []))  # no finite step at all


# --- scale invariance and the effective rate --------------------------------------------------


# An eps small enough that BN's scale invariance is exact in float64 (eps must be > 0 to train).
TINY_EPS = 1e-30


def _bn_layer(weight: torch.Tensor, eps: float) -> torch.nn.Sequential:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(weight)
    return torch.nn.Sequential(linear, batchnorm.BatchNorm1d(weight.shape[0], eps=eps).double())


@pytest.mark.parametrize("c", [0.1, 7.0])
def test_bn_layer_output_is_scale_invariant_and_its_gradient_scales_as_one_over_c(c):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    target = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    eps = 1e-5

    def output_and_grad(w, layer_eps):
        layer = _bn_layer(w, layer_eps)
        out = layer(x)
        (out * target).sum().backward()
        return out.detach(), layer[0].weight.grad

    out_1, grad_1 = output_and_grad(weight, eps)
    # With eps scaled by c^2 the invariance is exact: BN((cW)x) = BN(Wx) (float64 rounding).
    out_c, grad_c = output_and_grad(c * weight, eps * c**2)
    torch.testing.assert_close(out_c, out_1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_c, grad_1 / c, rtol=1e-9, atol=1e-12)
    # The gradient is orthogonal to W (so SGD only grows ||W||), exactly so as eps -> 0 (it
    # must be positive in training): d/dc L(cW) = <g, W> = 0 when L ignores the scale.
    _, grad_0 = output_and_grad(weight, TINY_EPS)
    assert abs((grad_0 * weight).sum().item()) < 1e-12 * grad_0.norm().item() * weight.norm().item()
    # With the fixed eps the outputs differ by about (eps / 2 var) |y|: the smallest unit
    # variance here is 0.024 at c = 0.1 (2e-4 relative), 119 at c = 7; the largest difference
    # measured is 5.6e-4 at c = 0.1 and 5.6e-6 at c = 7.
    out_fixed, _ = output_and_grad(c * weight, eps)
    assert (out_fixed - out_1).abs().max().item() < 1e-3
    # The relative step lr ||g|| / ||W|| therefore scales as 1 / c^2: the effective rate.
    ratio = (grad_c.norm() / (c * weight).norm()) / (grad_1.norm() / weight.norm())
    assert ratio.item() == pytest.approx(1 / c**2, rel=1e-9)


def test_without_bn_the_layer_output_scales_with_the_weights():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    assert not torch.allclose(x @ (3 * weight).T, x @ weight.T)


def test_one_sgd_step_grows_each_bn_layers_squared_norm_by_lr2_times_the_squared_gradient():
    # Arora et al.'s arithmetic: g is orthogonal to W, so ||W - lr g||^2 = ||W||^2 + lr^2 ||g||^2.
    gen = torch.Generator().manual_seed(2)
    model = nets.make_net("relu6", "bn", n_in=8, n_out=3, hidden=12, generator=gen).double()
    for layer in model.modules():
        if isinstance(layer, batchnorm.BatchNorm1d):
            layer.eps = TINY_EPS  # the invariance, hence the orthogonality, exact
    x = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    before = nets.weight_norms(model)
    grads = nets.hidden_gradients(model, x, y)
    lr = 0.7
    with torch.no_grad():
        for w, g in zip(nets.hidden_weights(model), grads, strict=True):
            w.sub_(lr * g)
    after = nets.weight_norms(model)
    for b, a, g in zip(before, after, grads, strict=True):
        assert a**2 == pytest.approx(b**2 + lr**2 * g.norm().item() ** 2, rel=1e-9)
        assert a > b


# --- one seed, the runner ---------------------------------------------------------------------


def test_run_seed_runs_every_unit_and_resumes_to_the_uninterrupted_result(tiny_data, one_seed_run):
    full, saved = one_seed_run
    names = [u.name for u in lr_exp.plan(ONE_SEED)]
    assert list(full["units"]) == names and len(names) == 12
    assert names[0] == "relu6/none/lr=0.01" and names[-1] == "sigmoid3/bn/lr=100"
    assert [s["step"] for s in saved] == [20 * k for k in range(1, 12)]
    lr_exp.check_result(ONE_SEED, 0, full)
    json.dumps(full, allow_nan=False)
    for state in (saved[0], saved[6]):
        lr_exp.check_checkpoint(ONE_SEED, tiny_data, 0, state)
        resumed = lr_exp.run_seed(ONE_SEED, tiny_data, 0, checkpoint=through_torch_save(state))
        assert without_seconds(resumed) == without_seconds(full)
    # Every unit of a net starts from the same weights, whatever the norm and rate.
    first = {n: full["units"][n]["weight_norms"][0] for n in names if n.startswith("relu6/")}
    assert len({tuple(v) for v in first.values()}) == 1


def test_tiny_preset_runs_through_the_runner_and_replots(tmp_path):
    run_dir = batchnorm.lab.run_experiment(
        "learning-rate", preset="tiny", out=tmp_path, verbose=False
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = sorted(p.stem for p in (run_dir / "figures").glob("*.png"))
    assert figures == sorted(summary["figure_notes"]) == ["accuracy", "effective_rate"]
    assert [c["key"] for c in summary["claims"]] == [r.key for r in lr_exp.RULES]
    for claim in summary["claims"]:
        assert claim["verdict"] in protocol.VERDICTS and claim["seeds"] == 2
        assert not claim["for_record"] and claim["measured"]
    assert summary["experiment"] == "learning_rate" and summary["seeds"] == [0, 1]
    assert summary["seconds"] > 0 and summary["claim"] == lr_exp.CLAIM
    report = (run_dir / "summary.md").read_text()
    assert "largest stable rate per seed" in report and "not for the record" in report
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {row["unit"] for row in rows} == {u.name for u in lr_exp.plan(TINY)}
    assert sorted(p.stem for p in runner.plot_run(run_dir, verbose=False)) == figures
    path = run_dir / "seeds" / "seed-1.json"
    result = json.loads(path.read_text())
    del result["units"]["relu6/bn/lr=1"]["weight_norms"]
    path.write_text(json.dumps(result))
    with pytest.raises(runner.RunFileError, match=r"seed-1.json.*'relu6/bn/lr=1'.*weight_norms"):
        runner.load_run(run_dir)


def _damaged(value: dict, edit) -> dict:
    copied = copy.deepcopy(value)
    edit(copied)
    return copied


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(seed=3), r"result\['seed'\] to be 0"),
        (lambda r: r["units"].pop("sigmoid3/bn/lr=1"), r"every unit.*sigmoid3/bn/lr=1"),
        (
            lambda r: r["units"]["relu6/none/lr=1"]["weight_norms"].pop(),
            r"\['relu6/none/lr=1'\]\['weight_norms'\] to be a list of 3 lists of 6",
        ),
        (
            lambda r: r["units"]["sigmoid3/none/lr=0.01"]["curve"]["val_accuracy"].pop(),
            r"\['sigmoid3/none/lr=0.01'\]\['curve'\]\['val_accuracy'\]",
        ),
        (
            lambda r: r["units"]["relu6/bn/lr=1"].update(test_accuracy=None),
            r"\['relu6/bn/lr=1'\]\['test_accuracy'\] to be a number in \[0, 1\]",
        ),
        (lambda r: r["units"].update({"relu6/bn/lr=3": {}}), r"unknown \['relu6/bn/lr=3'\]"),
    ],
)
def test_check_result_refuses_a_damaged_result_naming_the_entry(one_seed_run, edit, message):
    full, _ = one_seed_run
    with pytest.raises(ValueError, match=message):
        lr_exp.check_result(ONE_SEED, 0, _damaged(full, edit))


def test_check_checkpoint_refuses_a_damaged_or_foreign_checkpoint(tiny_data, one_seed_run):
    _, saved = one_seed_run
    state = saved[2]
    with pytest.raises(ValueError, match=r"state\['step'\] \(the steps of its units\) to be 60"):
        lr_exp.check_checkpoint(
            ONE_SEED, tiny_data, 0, _damaged(state, lambda s: s.update(step=50))
        )
    longer = dataclasses.replace(ONE_SEED, steps=30)
    with pytest.raises(ValueError, match=r"\['relu6/none/lr=0.01'\]\['curve'\]\['steps'\]"):
        lr_exp.check_checkpoint(longer, tiny_data, 0, state)
    other_grid = dataclasses.replace(ONE_SEED, lrs=(0.1, 1.0, 10.0))
    with pytest.raises(ValueError, match=r"unknown \['relu6/none/lr=0.01'"):
        lr_exp.check_checkpoint(other_grid, tiny_data, 0, state)


# --- verdicts on hand-made sweeps -------------------------------------------------------------

GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
FIVE = dataclasses.replace(TINY, seeds=5, lrs=GRID, steps=20, eval_every=10)


def _fake_run(val: float, test: float, bad: bool, depth: int, growth: float) -> dict:
    """A unit result with final validation/test accuracy, divergence and norm growth given."""
    steps = [0, 10, 20]
    return {
        "curve": {
            "steps": steps,
            "train_loss": [None, 2.0, 3.0 if bad else 1.0],
            "val_accuracy": [0.1, 0.5 * val, val],
            "val_loss": [2.3, 2.0, 1.0],
        },
        "diverged": False,
        "diverged_at": None,
        "first_loss": 2.3,
        "test_accuracy": test,
        "test_loss": 1.0,
        "train_accuracy": test,
        "train_eval_loss": 1.0,
        "weight_norms": [[1.0] * depth, [1.0] * depth, [growth] * depth],
    }


# Per rate of GRID: final validation accuracy, or None for a run whose loss rose (diverged).
_SWEEPS = {
    # No BN: best at 0.1, stable up to 1; nothing makes its norms grow.
    "none": ([0.50, 0.70, 0.60, None, None], 1.0),
    # BN: best at 1, stable up to 10, three rates within 2 pp; norms grow 3x (factor 9).
    "bn": ([0.55, 0.70, 0.74, 0.73, None], 3.0),
}


def _fake_results(swap: bool = False) -> dict[int, dict]:
    results = {}
    for seed in range(5):
        units = {}
        for unit in lr_exp.plan(FIVE):
            net, norm, lr = unit.params["net"], unit.params["norm"], unit.params["lr"]
            source = {"none": "bn", "bn": "none"}[norm] if swap else norm
            vals, growth = _SWEEPS[source]
            val = vals[GRID.index(lr)]
            units[unit.name] = _fake_run(
                0.1 if val is None else val + 0.001 * seed,
                0.1 if val is None else val - 0.01,
                val is None,
                nets.NETS[net][0],
                growth,
            )
        results[seed] = {"seed": seed, "seconds": 1.0, "units": units}
    return results


def test_summary_holds_each_claim_on_its_arithmetic_and_flips_when_the_arms_are_swapped():
    results = _fake_results()
    for seed, result in results.items():
        lr_exp.check_result(FIVE, seed, result)
    summary = lr_exp.summarize(FIVE, results)
    claims = {c["key"]: c for c in summary["claims"]}
    for net in nets.NETS:
        # Largest stable: 10 with BN vs 1 without = 2 half-decades.
        assert claims[f"stable_{net}"]["per_seed"] == pytest.approx([2.0] * 5)
        # Best (by validation): BN at 1 (test 0.73 + ...), no BN at 0.1 (test 0.69): 4 pp.
        assert claims[f"best_{net}"]["per_seed"] == pytest.approx([4.0] * 5)
        # Within 2 pp: BN 1, 10 (0.73 vs 0.74; 0.70 is 4 pp below) -> 2; no BN only 0.1 -> 1.
        # Each rate counts as its grid step, 2 half-decades here: (2 - 1) x 2.
        assert claims[f"range_{net}"]["per_seed"] == pytest.approx([2.0] * 5)
        arm = summary["arms"][f"{net}/bn"]
        assert arm["largest_stable"] == [10.0] * 5 and arm["best_lr"] == [1.0] * 5
    assert claims["autotune"]["per_seed"] == pytest.approx([9.0] * 5)
    assert all(c["verdict"] == "held" and c["for_record"] for c in summary["claims"])
    assert "Every claim held." in summary["report"]
    json.dumps(summary, allow_nan=False)

    swapped = lr_exp.summarize(FIVE, _fake_results(swap=True))
    assert all(c["verdict"] == "not held" for c in swapped["claims"])
    assert any(line.startswith("Did not hold: stable_relu6") for line in swapped["report"])


def test_plot_draws_both_figures_from_hand_made_results():
    results = _fake_results()
    summary = lr_exp.summarize(FIVE, results)
    figures = lr_exp.plot(FIVE, results, summary)
    assert sorted(figures) == sorted(summary["figure_notes"])
    for figure in figures.values():
        assert figure._suptitle is not None and len(figure.axes) == 2
        assert all(ax.get_xscale() == "log" for ax in figure.axes)
    assert math.isfinite(summary["arms"]["relu6/bn"]["effective_end"][0])
