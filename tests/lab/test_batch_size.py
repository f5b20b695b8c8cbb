"""batch_size: the settings and learning-rate scaling, the own-statistics evaluation (known
answers), ghost BN's shared networks, determinism and resume, the checks of results and
checkpoints, the rules' verdicts on hand-made results, the runner end to end.

The experiment runs its ``tiny`` preset (scikit-learn's digits, a twentieth of an epoch per
network): these tests check structure, determinism and the measures, not the claims.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import warnings

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab import _classify, protocol, registry, runner
from batchnorm.lab._training import threads
from batchnorm.lab.experiments import batch_size

matplotlib.use("Agg")

TINY = batch_size.PRESETS["tiny"]
ONE_SEED = dataclasses.replace(TINY, seeds=1)
# The tiny preset: 1238 training examples after the 200 held out; 0.05 epoch is 61.9
# examples, so round(61.9 / b) steps: b2 round(30.95) = 31, b4 round(15.475) = 15, b16
# round(3.87) = 4. Ghost BN (8 per ghost batch) is BatchNorm at b2 and b4, so it trains only
# at b16: 4 arms x (31 + 15 + 4) + 4 = 204 steps per seed, in 13 networks.
TINY_STEPS = {2: 31, 4: 15, 16: 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tests' own forwards (oracles, eval mode) on one thread, as the experiment's: two
    # spinning OpenMP threads collapse when another process holds a core.
    with threads(1):
        yield


@pytest.fixture(scope="module")
def tiny_data():
    return batch_size.prepare(TINY)


def without_seconds(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


def through_torch_save(state: dict) -> dict:
    """``state`` as the runner stores and reads a checkpoint (torch.load with weights_only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def trained(arm: str, data, steps: int = 20, batch: int = 4):
    """A tiny-preset network of ``arm`` after ``steps`` SGD steps (its BN buffers moved)."""
    model = batch_size.build_model(TINY, data, arm, 0, steps)
    _classify.train_classifier(
        model, data, lr=0.05, steps=steps, batch_size=batch, seed=0, eval_every=steps
    )
    return model.eval()


# --- settings ---------------------------------------------------------------------------------


def test_tiny_config_counts_steps_and_plans_every_network():
    assert TINY.n_train == 1438 - 200
    assert {b: TINY.steps_for(b) for b in TINY.batch_sizes} == TINY_STEPS
    names = [u.name for u in batch_size.plan(TINY)]
    assert names == [
        *(f"{arm}/b16" for arm in batch_size.ARMS),
        *(f"{arm}/b4" for arm in ("none", "batchnorm", "groupnorm", "renorm")),
        *(f"{arm}/b2" for arm in ("none", "batchnorm", "groupnorm", "renorm")),
    ]
    assert batch_size.steps_per_seed(TINY) == 4 * (31 + 15 + 4) + 4 == 204
    assert sum(u.steps for u in batch_size.plan(TINY)) == 204


def test_learning_rate_scales_linearly_with_the_batch_size():
    # lr(b) = lr_ref * b / b_ref, with TINY's fixed lr_ref = 0.05 at b_ref = 16.
    lrs = {u.name: u.params["lr"] for u in batch_size.plan(TINY)}
    assert lrs["batchnorm/b16"] == 0.05
    assert lrs["renorm/b4"] == pytest.approx(0.0125)
    assert lrs["none/b2"] == pytest.approx(0.00625)
    full = batch_size.PRESETS["full"]
    assert full.lr_for("ghost", 64) == pytest.approx(2 * full.reference_lr("ghost"))
    assert full.lr_for("groupnorm", 2) == pytest.approx(full.reference_lr("groupnorm") / 16)


def test_each_arm_takes_its_reference_rate_from_the_tuned_file(tmp_path, monkeypatch):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"batch_size": {"arms": {"renorm": {"lr": 0.2}}}}))
    monkeypatch.setattr(protocol, "TUNED_FILE", tuned)
    config = dataclasses.replace(TINY, lr=None)
    assert config.reference_lr("renorm") == 0.2
    assert config.lr_for("renorm", 4) == pytest.approx(0.2 * 4 / 16)
    assert config.reference_lr("batchnorm") == batch_size.DEFAULT_LR  # never tuned
    assert TINY.reference_lr("renorm") == 0.05  # a fixed lr wins over the file


def test_presets_run_five_seeds_of_mnist1d_from_batch_2_to_64():
    assert set(batch_size.PRESETS) == {"tiny", "quick", "full"}
    for name in ("quick", "full"):
        config = batch_size.PRESETS[name]
        assert config.dataset == "mnist1d" and config.seeds == 5 and config.lr is None
        assert config.batch_sizes == (2, 4, 8, 16, 32, 64) and config.reference_batch == 32
    # Every batch size sees the same examples: b * steps(b) equal up to rounding to a step.
    full = batch_size.PRESETS["full"]
    seen = [b * full.steps_for(b) for b in full.batch_sizes]
    assert max(seen) - min(seen) <= 64 and full.steps_for(64) == 137  # the docstring's 137


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_sizes", (4, 16), r"expected batch_sizes to include 2"),
        ("batch_sizes", (2, 16, 4), r"expected batch_sizes at least 2 distinct ints >= 2"),
        ("batch_sizes", (1, 2, 16), r"expected batch_sizes at least 2 distinct ints >= 2"),
        ("reference_batch", 8, r"expected reference_batch one of batch_sizes"),
        ("epochs", 0.0, r"expected epochs a number > 0"),
        ("epochs", 0.001, r"expected epochs long enough for 1 step"),
        ("lr", -1.0, r"expected lr a number > 0 or None"),
        ("momentum", 1.0, r"expected momentum in \[0, 1\)"),
        ("bn_momentum", 0.0, r"expected bn_momentum in \(0, 1\]"),
        ("virtual_batch_size", 1, r"expected virtual_batch_size an int >= 2"),
        ("groups", 3, r"expected groups an int >= 1 dividing every channel count"),
        ("renorm_warmup", 1.5, r"expected renorm_warmup in \[0, 1\]"),
        ("channels", (), r"expected channels a non-empty tuple"),
        ("evals", 0, r"expected evals an int >= 1"),
        ("dataset", "cifar", r"expected dataset one of"),
        ("n_val", 1430, r"expected every batch size <= 8 "),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=r"BatchSizeConfig\(\): " + message):
        dataclasses.replace(TINY, **{field: value})


def test_cosine_lr_decays_from_the_peak_towards_zero():
    # lr_t = lr (1 + cos(pi t / T)) / 2: with lr 0.4 and T = 4 the steps t = 0, 1, 2, 3 take
    # 0.4, 0.2 (1 + 0.7071) = 0.3414, 0.2 and 0.2 (1 - 0.7071) = 0.0586.
    want = [0.4, 0.2 * (1 + 0.5**0.5), 0.2, 0.2 * (1 - 0.5**0.5)]
    assert [batch_size.cosine_lr(0.4, t, 4) for t in range(4)] == pytest.approx(want)


# --- the own-statistics evaluation: known answers -----------------------------------------------


@pytest.mark.parametrize("arm", ["groupnorm", "none"])
def test_own_statistics_evaluation_equals_eval_mode_without_batch_norm(arm, tiny_data):
    model = trained(arm, tiny_data)
    x, y = tiny_data.x_test, tiny_data.y_test
    accuracy, loss = _classify.evaluate(model, x, y)
    for b in (2, 16):
        error, own_loss = batch_size.batch_mode_metrics(model, x, y, b, seed=3)
        assert error == pytest.approx(100 * (1 - accuracy), abs=1e-9)
        # float32 logits computed in batches of b instead of all at once: rounding only.
        assert own_loss == pytest.approx(loss, rel=1e-5)


def test_own_statistics_evaluation_of_batchnorm_uses_each_test_batchs_statistics(tiny_data):
    # Oracle: the same network with each BN layer replaced by torch's BatchNorm1d without
    # running statistics (which always normalises with the batch's own mean and biased
    # variance), run on the same test batches.
    model = trained("batchnorm", tiny_data)
    oracle = copy.deepcopy(model)
    for name, layer in list(oracle.named_children()):
        if isinstance(layer, nn.BatchNorm1d):
            twin = nn.BatchNorm1d(layer.num_features, eps=layer.eps, track_running_stats=False)
            twin.load_state_dict({"weight": layer.weight, "bias": layer.bias})
            setattr(oracle, name, twin)
    x, y = tiny_data.x_test, tiny_data.y_test
    with torch.no_grad():
        logits = torch.cat([oracle(x[i]) for i in batch_size.test_batches(len(y), 4, 5)])
        labels = torch.cat([y[i] for i in batch_size.test_batches(len(y), 4, 5)])
    want = 100 * (logits.argmax(1) != labels).double().mean().item()
    error, loss = batch_size.batch_mode_metrics(model, x, y, 4, seed=5)
    assert error == pytest.approx(want, abs=1e-9)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    # ... and it is not eval mode: the running statistics give another error.
    accuracy, _ = _classify.evaluate(model, x, y)
    assert error != pytest.approx(100 * (1 - accuracy), abs=1e-9)


@pytest.mark.parametrize("arm", ["batchnorm", "renorm", "ghost"])
def test_own_statistics_evaluation_changes_nothing_in_the_model(arm, tiny_data):
    model = trained(arm, tiny_data, batch=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert int(model.bn1.num_batches_tracked) == 20
    batch_size.batch_mode_metrics(model, tiny_data.x_test, tiny_data.y_test, 16, seed=0)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # running stats, num_batches_tracked, ...
    assert not any(m.training for m in model.modules())


def test_own_statistics_evaluation_sees_the_same_running_statistics_in_every_batch(tiny_data):
    # Batch renorm's training transform reads the running statistics (r, d); each test batch
    # must see the trained ones, not ones moved by the test batches before it. With r and d
    # inside their limits (rmax 3, dmax 5, past the warm-up) renorm's training transform is
    # the running-statistics transform: (x - mu_B) / sigma_B * sigma_B / sigma + (mu_B - mu) /
    # sigma = (x - mu) / sigma, so the own-statistics evaluation must give eval mode's numbers.
    model = trained("renorm", tiny_data, steps=40, batch=16)
    assert model.bn1.limits() == (3.0, 5.0)
    x, y = tiny_data.x_test, tiny_data.y_test
    accuracy, loss = _classify.evaluate(model, x, y)
    error, own_loss = batch_size.batch_mode_metrics(model, x, y, 16, seed=1)
    assert error == pytest.approx(100 * (1 - accuracy), abs=1e-9)
    assert own_loss == pytest.approx(loss, rel=1e-4)


def test_test_batches_use_every_example_once_and_never_a_batch_of_one():
    batches = batch_size.test_batches(33, 4, seed=0)
    assert [len(b) for b in batches] == [4] * 7 + [5]  # 33 = 8 x 4 + 1: the 1 joins the last
    assert sorted(torch.cat(batches).tolist()) == list(range(33))
    assert [len(b) for b in batch_size.test_batches(10, 4, seed=0)] == [4, 4, 2]
    with pytest.raises(ValueError, match=r"expected batch_size >= 2"):
        batch_size.test_batches(10, 1, seed=0)


def test_ghost_bn_on_one_ghost_batch_is_batchnorm_so_its_networks_are_shared():
    # The plan leaves out ghost BN's networks at batches <= 9 (8 per ghost batch): on such a
    # batch the layer must compute BatchNorm's outputs, gradients and running statistics.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, 6, generator=gen)
    ghost, bn = batchnorm.GhostBatchNorm1d(4, virtual_batch_size=8), batchnorm.BatchNorm1d(4)
    outputs = []
    for layer in (ghost, bn):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        outputs.append((out, xi.grad, layer.weight.grad, layer.running_var))
    for a, b in zip(*outputs, strict=True):
        assert torch.equal(a, b)
    assert TINY.is_batchnorm("ghost", 9) and not TINY.is_batchnorm("ghost", 10)
    assert not TINY.is_batchnorm("batchnorm", 2)


# --- one seed: determinism, resume, checks --------------------------------------------------------


@pytest.fixture(scope="module")
def one_seed_run(tiny_data):
    """Seed 0 of ONE_SEED: its result and its checkpoints, as the runner reads them back."""
    saved = []
    result = batch_size.run_seed(ONE_SEED, tiny_data, 0, save_checkpoint=saved.append)
    return json.loads(json.dumps(result, allow_nan=False)), [through_torch_save(s) for s in saved]


def test_run_seed_measures_every_network_and_leaves_the_global_rng_alone(tiny_data, one_seed_run):
    result, states = one_seed_run
    assert [s["step"] for s in states][:3] == [4, 8, 12]  # after each network but the last
    assert len(states) == len(batch_size.plan(TINY)) - 1
    units = result["units"]
    assert list(units) == [u.name for u in batch_size.plan(TINY)]
    for name, unit in units.items():
        assert unit["steps"] == TINY_STEPS[unit["batch_size"]]
        assert 0 <= unit["test_error"] <= 100 and 0 <= unit["test_error_batch"] <= 100
        if unit["arm"] in ("none", "groupnorm"):
            assert unit["test_error_batch"] == unit["test_error"], name
    rng = torch.get_rng_state()
    again = batch_size.run_unit(ONE_SEED, tiny_data, 0, batch_size.plan(TINY)[1])
    assert torch.equal(torch.get_rng_state(), rng)
    assert json.loads(json.dumps(again)) == units["batchnorm/b16"]  # deterministic


def test_run_seed_resumed_from_a_checkpoint_equals_an_uninterrupted_run(tiny_data, one_seed_run):
    full, states = one_seed_run
    for state in (states[4], states[-1]):  # after the b16 networks; before the last network
        resumed = batch_size.run_seed(ONE_SEED, tiny_data, 0, checkpoint=state)
        assert without_seconds(json.loads(json.dumps(resumed))) == without_seconds(full)


def damaged(data, edit):
    copy_ = copy.deepcopy(data)
    edit(copy_)
    return copy_


def test_check_result_names_what_is_wrong_with_a_damaged_result(one_seed_run):
    result, _ = one_seed_run
    batch_size.check_result(ONE_SEED, 0, result)
    cases = [
        (lambda r: r["units"].pop("renorm/b2"), r"expected units to hold every unit, got \["),
        (
            lambda r: r["units"]["batchnorm/b2"].__setitem__("test_error", 130.0),
            r"units\['batchnorm/b2'\]\['test_error'\] to be a number in \[0, 100\], got 130",
        ),
        (
            lambda r: r["units"]["renorm/b4"].__setitem__("test_error_batch", None),
            r"units\['renorm/b4'\]\['test_error_batch'\] to be a number in \[0, 100\], got None",
        ),
        (
            lambda r: r["units"]["none/b2"].__setitem__("lr", 0.1),
            r"units\['none/b2'\]\['lr'\] to be 0.00625, got 0.1",
        ),
        (
            lambda r: r["units"]["ghost/b16"]["curve"]["val_accuracy"].pop(),
            r"units\['ghost/b16'\]\['curve'\]\['val_accuracy'\] to be a list of 3 values",
        ),
        (
            lambda r: r["units"]["groupnorm/b16"].__setitem__("diverged", 1),
            r"units\['groupnorm/b16'\]\['diverged'\] to be a bool",
        ),
        (
            lambda r: r["units"]["groupnorm/b16"].__setitem__("diverged", True),
            r"units\['groupnorm/b16'\]\['test_error'\] to be None \(the network diverged\)",
        ),
        (lambda r: r.pop("seconds"), r"expected result to have the key 'seconds'"),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            batch_size.check_result(ONE_SEED, 0, damaged(result, edit))
    with pytest.raises(ValueError, match=r"result\['seed'\] to be 1, got 0"):
        batch_size.check_result(ONE_SEED, 1, result)
    longer = dataclasses.replace(ONE_SEED, epochs=0.1)  # other steps: another run's result
    with pytest.raises(ValueError, match=r"units\['none/b16'\]\['steps'\] to be 8, got 4"):
        batch_size.check_result(longer, 0, result)


def test_check_checkpoint_names_what_is_wrong_with_a_damaged_checkpoint(tiny_data, one_seed_run):
    _, states = one_seed_run
    for state in (states[0], states[-1]):
        batch_size.check_checkpoint(ONE_SEED, tiny_data, 0, state)
    state = states[5]
    cases = [
        (
            lambda s: s.__setitem__("step", 7),
            r"expected state\['step'\] \(the steps of its units\)",
        ),
        (
            lambda s: s["units"].__setitem__("layernorm/b2", {}),
            r"expected units to hold units of this configuration, got unknown \['layernorm/b2'\]",
        ),
        (
            lambda s: s["units"]["batchnorm/b16"].pop("test_error"),
            r"units\['batchnorm/b16'\] to have the key 'test_error'",
        ),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            batch_size.check_checkpoint(ONE_SEED, tiny_data, 0, damaged(state, edit))


def test_a_diverged_network_counts_at_chance_and_scores_nan_in_tuning(tiny_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers' warnings as their statistics overflow
        score = batch_size.tune_score(TINY, tiny_data, "none", 1e30, seed=protocol.TUNING_SEED)
        huge = dataclasses.replace(ONE_SEED, lr=1e30)
        unit = batch_size.run_unit(huge, tiny_data, 0, batch_size.plan(huge)[0])
    assert math.isnan(score)
    assert unit["diverged"] and unit["test_error"] is None and unit["test_error_batch"] is None
    assert math.isfinite(batch_size.tune_score(TINY, tiny_data, "none", 0.05, seed=0))


# --- the verdicts, on hand-made results -----------------------------------------------------------


def hand_made(errors: dict, own: dict | None = None, seeds: int = 5) -> dict:
    """Results of ``seeds`` seeds of the tiny config whose test errors are ``errors[arm][b]``
    (one value per seed, or one for all), ``own`` likewise for the own-statistics errors
    (default: the same)."""
    own = own or errors
    results = {}
    for seed in range(seeds):
        units = {}
        for unit in batch_size.plan(TINY):
            arm, b = unit.params["arm"], unit.params["batch_size"]

            def pick(table, arm=arm, b=b, seed=seed):
                value = table.get(arm, {}).get(b, 30.0)
                return value[seed] if isinstance(value, list) else value

            units[unit.name] = {
                "arm": arm,
                "batch_size": b,
                "lr": unit.params["lr"],
                "diverged": False,
                "test_error": pick(errors),
                "test_error_batch": pick(own),
            }
        results[seed] = {"seed": seed, "seconds": 1.0, "units": units}
    return results


def verdicts(results: dict) -> dict:
    summary = batch_size.summarize(TINY, results)
    json.dumps(summary, allow_nan=False)
    return {c["key"]: c["verdict"] for c in summary["claims"]}


def test_each_verdict_flips_when_the_arms_data_are_swapped():
    # BN rises 40 -> 45 % from b16 (TINY's reference) to b2, GN stays at 40 %; renorm beats BN
    # at b4 by 5 pp; BN's own-statistics error at b2 is 55 % vs 45 % with running statistics.
    # Effects: 5 > 2, 5 - 0 > 2, 5 > 1, 10 > 1: every rule held in 5 of 5 seeds.
    bn = {16: 40.0, 4: 42.0, 2: 45.0}
    gn = {16: 40.0, 4: 40.0, 2: 40.0}
    renorm = {16: 40.0, 4: 37.0, 2: 41.0}
    errors = {"batchnorm": bn, "groupnorm": gn, "renorm": renorm}
    own = {**errors, "batchnorm": {**bn, 2: 55.0}}
    assert set(verdicts(hand_made(errors, own)).values()) == {"held"}
    # Swapped: BN's and GN's numbers (GN rises, BN is flat): the first two flip.
    swapped = {**errors, "batchnorm": gn, "groupnorm": bn}
    got = verdicts(hand_made(swapped, {**swapped, "batchnorm": {**gn, 2: 50.0}}))
    assert got["bn_small_batch"] == got["gn_flatter"] == "not held"
    # Swapped: BN's and renorm's numbers at b4.
    swapped = {**errors, "batchnorm": {**bn, 4: 37.0}, "renorm": {**renorm, 4: 42.0}}
    assert verdicts(hand_made(swapped, own))["renorm_beats_bn"] == "not held"
    # Swapped: the own-statistics and running-statistics errors of BN at b2.
    flipped = {**errors, "batchnorm": {**bn, 2: 55.0}}
    assert verdicts(hand_made(flipped, {**flipped, "batchnorm": bn}))["own_statistics_worse"] == (
        "not held"
    )


def test_verdicts_need_four_of_five_seeds_and_a_diverged_network_counts_at_chance():
    # BN's rise per seed: 5, 5, 5, 1, 1 pp -> 3 of 5 above 2: neither 4 held nor 4 not held.
    bn = {16: 40.0, 2: [45.0, 45.0, 45.0, 41.0, 41.0]}
    assert verdicts(hand_made({"batchnorm": bn}))["bn_small_batch"] == "inconclusive"
    results = hand_made({"batchnorm": {16: 40.0, 2: 40.0}})
    for seed in results:  # BN at b2 diverges in every seed: 90 % - 40 % = 50 pp
        results[seed]["units"]["batchnorm/b2"].update(
            diverged=True, test_error=None, test_error_batch=None
        )
    summary = batch_size.summarize(TINY, results)
    assert summary["test_error"]["batchnorm"]["2"]["mean"] == 90.0
    assert summary["test_error"]["ghost"]["2"]["mean"] == 90.0  # ghost at b2 is BN's network
    assert summary["diverged"]["batchnorm"]["2"] == 5
    rise = next(c for c in summary["claims"] if c["key"] == "bn_small_batch")
    assert rise["mean"] == 50.0 and rise["verdict"] == "held"


# --- end to end -------------------------------------------------------------------------------


def test_registry_entry_declares_the_rules_and_the_tuning():
    entry = registry.EXPERIMENTS["batch_size"]
    assert entry.cli_name == "batch-size" and entry.rules is batch_size.RULES
    keys = ["bn_small_batch", "gn_flatter", "renorm_beats_bn", "own_statistics_worse"]
    assert [r.key for r in entry.rules] == keys
    assert [r.threshold for r in entry.rules] == [2.0, 2.0, 1.0, 1.0]
    assert all(r.agree == 0.8 for r in entry.rules)
    assert entry.tuning.arms(batch_size.PRESETS["full"]) == list(batch_size.ARMS)
    assert entry.tuning.grid == (0.01, 0.03, 0.1, 0.3) and entry.tuning.preset == "full"


def test_tiny_preset_runs_through_the_runner(tmp_path):
    run_dir = batchnorm.lab.run_experiment("batch-size", preset="tiny", out=tmp_path, verbose=False)
    for name in ("config.json", "metrics.jsonl", "summary.json", "summary.md"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = sorted(p.stem for p in (run_dir / "figures").glob("*.png"))
    assert figures == sorted(summary["figure_notes"]) == ["test_error", "test_error_own"]
    assert all((run_dir / "figures" / f"{f}.png").stat().st_size > 10_000 for f in figures)
    assert summary["seeds"] == [0, 1] and summary["experiment"] == "batch_size"
    assert summary["steps"] == {str(b): n for b, n in TINY_STEPS.items()}
    assert [c["key"] for c in summary["claims"]] == [r.key for r in batch_size.RULES]
    for claim in summary["claims"]:
        assert claim["verdict"] in protocol.VERDICTS and claim["seeds"] == 2
        assert claim["for_record"] is False and claim["measured"]
    report = (run_dir / "summary.md").read_text()
    assert "Test error (%), running statistics" in report
    assert report.count("not for the record") == len(batch_size.RULES)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finals = [r for r in rows if "test_error" in r]
    assert len(finals) == 2 * 13 and {r["arm"] for r in finals} == set(batch_size.ARMS)
    # The same figures again from the saved JSON alone.
    replotted = sorted(p.stem for p in runner.plot_run(run_dir, verbose=False))
    assert replotted == figures
    # A seed's result damaged on disk is refused when the run is read back, naming the file.
    path = run_dir / "seeds" / "seed-1.json"
    result = json.loads(path.read_text())
    del result["units"]["renorm/b4"]["test_error_batch"]
    path.write_text(json.dumps(result))
    with pytest.raises(runner.RunFileError, match=r"seed-1.json.*\['renorm/b4'\]"):
        runner.load_run(run_dir)


def test_summary_tables_are_finite_numbers(one_seed_run):
    result, _ = one_seed_run
    summary = batch_size.summarize(ONE_SEED, {0: result})
    for arm in batch_size.ARMS:
        for b in TINY.batch_sizes:
            assert np.isfinite(summary["test_error"][arm][str(b)]["mean"])
    assert summary["lr"]["batchnorm"]["2"] == pytest.approx(0.00625)
