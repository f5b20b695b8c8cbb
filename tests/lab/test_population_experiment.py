"""population: the measurement, the gap metric, determinism and resume, the summary, the plots.

The experiment runs its ``tiny`` preset (scikit-learn's digits, a few dozen steps): these tests
check structure, determinism and that measuring never changes the trained model, not the
paper's claim. The summary tests use hand-made results whose verdicts are worked out in
comments, and the statistics are checked against independent computations, not against the
code's own output.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import re

import matplotlib
import numpy as np
import pytest
import torch

from batchnorm.lab import plots_population, registry, runner
from batchnorm.lab.experiments import population
from batchnorm.lab.models import make_mlp

matplotlib.use("Agg")

TINY = population.PRESETS["tiny"]
ONE_SEED = dataclasses.replace(TINY, seeds=1)


@pytest.fixture(scope="module")
def tiny_data():
    return population.prepare(TINY)


def without_seconds(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


# --- end to end -------------------------------------------------------------------------------


def test_tiny_preset_runs_through_the_runner(tmp_path):
    run_dir = runner.run_experiment(
        "population", preset="tiny", out=tmp_path, progress=False, verbose=False
    )
    for name in ("config.json", "metrics.jsonl", "summary.json", "summary.md"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "figures" / "population.png").stat().st_size > 10_000
    seeds = [json.loads((run_dir / "seeds" / f"seed-{k}.json").read_text()) for k in (0, 1)]
    measured = TINY.steps // TINY.eval_every + 1  # step 0 included
    assert population.METHODS == ("ema", "pooled", "paper", "sequential")
    for result in seeds:
        assert result["steps"] == list(range(0, TINY.steps + 1, TINY.eval_every))
        assert result["layers"] == ["bn1", "bn2", "bn3"]
        assert result["reference"] == "sequential"
        for method in population.METHODS:
            assert len(result["test_accuracy"][method]) == measured
            assert all(0.0 <= a <= 1.0 for a in result["test_accuracy"][method])
            assert len(result["final_statistics"]["bn3"][method]["var"]) == TINY.hidden
        assert result["final_statistics"]["bn3"]["eps"] == 1e-5
        # Gaps to sequential: pooled's is exactly 0 in bn1 at every step (the same pass) and
        # positive past it after step 0; the EMA's is positive everywhere once it has moved.
        pooled = result["gap"]["pooled"]["log_var_ratio"]
        assert set(result["gap"]) == {"ema", "pooled", "paper"}
        assert pooled["bn1"] == [0.0] * measured
        assert all(v > 0 for name in ("bn2", "bn3") for v in pooled[name])
        assert all(v > 0 for v in result["gap"]["ema"]["mean_shift"]["bn1"])
    # Seeds differ (weights and batch order), so their measurements do.
    assert seeds[0]["test_loss"]["ema"] != seeds[1]["test_loss"]["ema"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == TINY.seeds * 4 * measured  # 4 sources of statistics
    assert "log_var_ratio_vs_sequential_bn2" in rows[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [type(c["held"]) for c in summary["claims"]] == [bool] * 8
    assert summary["reference"] == "sequential"
    assert set(summary["variance_bias"]["pooled"]) == {"bn1", "bn2", "bn3"}
    report = (run_dir / "summary.md").read_text()
    verdicts = re.findall(r"^(HELD|DID NOT HOLD): ", report, flags=re.MULTILINE)
    assert len(verdicts) == 8  # one verdict line per claim
    assert "sequential (eval)" in report and "Gap to the sequential statistics" in report
    # The same figure again from the saved JSON alone.
    assert [p.name for p in runner.plot_run(run_dir, verbose=False)] == ["population.png"]


def test_run_seed_resumed_from_a_checkpoint_equals_an_uninterrupted_run(tiny_data):
    import numba

    rng_before = torch.get_rng_state()
    threads_before = torch.get_num_threads(), numba.get_num_threads()
    saved, advanced, threads = [], [], set()

    def advance(n):
        advanced.append(n)
        threads.add((torch.get_num_threads(), numba.get_num_threads()))

    full = population.run_seed(
        ONE_SEED, tiny_data, 0, save_checkpoint=saved.append, advance=advance
    )
    assert [c["step"] for c in saved] == [20]  # checkpoint_every=20, none after the last step
    assert sum(advanced) == TINY.steps
    assert threads == {(1, 1)}  # pinned, also after the exact passes' Numba kernels ...
    assert (torch.get_num_threads(), numba.get_num_threads()) == threads_before  # ... restored
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is never drawn from
    # Through torch.save/torch.load(weights_only=True), as the runner stores checkpoints.
    buffer = io.BytesIO()
    torch.save(saved[0], buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = population.run_seed(ONE_SEED, tiny_data, 0, checkpoint=checkpoint)
    assert without_seconds(resumed) == without_seconds(full)
    assert len(resumed["test_loss"]["sequential"]) == len(full["steps"])
    json.dumps(full, allow_nan=False)  # JSON-serialisable, no NaN
    # A checkpoint of the earlier version (no sequential, gaps of EMA and paper to pooled) is
    # refused rather than continued into a history with two meanings of the gap.
    old = copy.deepcopy(checkpoint)
    for key in ("test_accuracy", "test_loss"):
        del old["history"][key]["sequential"]
    del old["history"]["gap"]["pooled"]
    with pytest.raises(ValueError, match=r"run_seed\(\): expected a checkpoint measuring"):
        population.run_seed(ONE_SEED, tiny_data, 0, checkpoint=old)


def test_measuring_does_not_change_training(tiny_data):
    # The same seed measured every 10 steps or only at 0 and 40 must end with the same network:
    # the final measurement (accuracies and per-channel statistics) agrees exactly.
    config = dataclasses.replace(ONE_SEED, eval_every=40, checkpoint_every=40)
    often = population.run_seed(ONE_SEED, tiny_data, 1)
    rarely = population.run_seed(config, tiny_data, 1)
    assert rarely["steps"] == [0, 40] and often["steps"][-1] == 40
    for method in population.METHODS:
        assert often["test_accuracy"][method][-1] == rarely["test_accuracy"][method][-1]
        assert often["test_loss"][method][-1] == rarely["test_loss"][method][-1]
    assert often["final_statistics"] == rarely["final_statistics"]


# --- checks of checkpoints and results read back -----------------------------------------------


@pytest.fixture(scope="module")
def one_seed_run(tiny_data):
    """Seed 0 of ONE_SEED: its result and its one checkpoint (step 20), through torch.save."""
    saved = []
    result = population.run_seed(ONE_SEED, tiny_data, 0, save_checkpoint=saved.append)
    buffer = io.BytesIO()
    torch.save(saved[0], buffer)
    buffer.seek(0)
    return result, torch.load(buffer, weights_only=True)


def damaged(data, edit):
    copy_ = copy.deepcopy(data)
    edit(copy_)
    return copy_


def test_check_result_accepts_a_result_and_names_what_is_wrong_with_a_damaged_one(one_seed_run):
    result, _ = one_seed_run
    population.check_result(ONE_SEED, 0, json.loads(json.dumps(result)))  # as read back
    cases = [
        (lambda r: r.pop("gap"), r"expected result to have the key 'gap'"),
        (lambda r: r["test_loss"]["sequential"].pop(), r"result\['test_loss'\]\['sequential'\]"),
        (
            lambda r: r["gap"]["ema"]["mean_shift"]["bn2"].__setitem__(1, None),
            r"result\['gap'\]\['ema'\]\['mean_shift'\]\['bn2'\] to be a list of 5 finite",
        ),
        (
            lambda r: r["final_statistics"]["bn3"]["paper"]["var"].pop(),
            r"\['bn3'\]\['paper'\]\['var'\] to be a list of 100 finite numbers",
        ),
        (lambda r: r.__setitem__("layers", ["bn1"]), r"result\['layers'\] to be \['bn1', 'bn2'"),
        (lambda r: r.pop("reference"), r"expected result to have the key 'reference'"),
        (
            lambda r: r.__setitem__("reference", "pooled"),
            r"got 'pooled', from an earlier version of this experiment",
        ),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            population.check_result(ONE_SEED, 0, damaged(result, edit))
    with pytest.raises(ValueError, match=r"result\['seed'\] to be 1, got 0"):
        population.check_result(ONE_SEED, 1, result)
    # A result of another config: measured at other steps.
    other = dataclasses.replace(ONE_SEED, eval_every=20)
    with pytest.raises(ValueError, match=r"result\['steps'\] to be \[0, 20, 40\]"):
        population.check_result(other, 0, result)


def test_check_checkpoint_accepts_a_checkpoint_and_names_what_is_wrong_with_a_damaged_one(
    one_seed_run, tiny_data
):
    _, state = one_seed_run
    population.check_checkpoint(ONE_SEED, tiny_data, 0, state)
    cases = [
        (lambda s: s.pop("optimizer"), r"expected state to have the key 'optimizer'"),
        (
            lambda s: s["model"].__setitem__("bn2.running_var", torch.ones(7)),
            r"state\['model'\]\['bn2.running_var'\] to be a tensor of shape \(100,\)",
        ),
        (lambda s: s["model"].pop("fc1.weight"), r"without \['fc1.weight'\]"),
        (
            lambda s: s["optimizer"]["param_groups"][0].__setitem__("lr", 0.1),
            r"state\['optimizer'\]\['param_groups'\]\[0\]\['lr'\] to be 0.5, got 0.1",
        ),
        (
            lambda s: s["history"]["train_loss"].append(1.0),
            r"state\['history'\]\['train_loss'\] to be a list of 3 finite numbers",
        ),
        (
            lambda s: s["history"]["gap"].pop("pooled"),
            r"to measure \['ema', 'pooled', 'paper', 'sequential'\] with gaps of .*earlier version",
        ),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            population.check_checkpoint(ONE_SEED, tiny_data, 0, damaged(state, edit))
    wider = dataclasses.replace(ONE_SEED, hidden=50)
    with pytest.raises(ValueError, match=r"state\['model'\]\['fc1.weight'\] to be a tensor of"):
        population.check_checkpoint(wider, tiny_data, 0, state)


def test_runner_resumes_a_population_run_to_the_uninterrupted_result(tmp_path, monkeypatch):
    experiment = registry.EXPERIMENTS["population"]

    def stopping(config, data, seed, *, advance, **kwargs):
        def counting(n):
            advance(n)
            counting.done += n
            if counting.done >= 30:  # after the checkpoint at step 20
                raise KeyboardInterrupt

        counting.done = 0
        return experiment.run_seed(config, data, seed, advance=counting, **kwargs)

    options = dict(preset="tiny", overrides={"seeds": 1}, progress=False, verbose=False)
    whole = runner.run_experiment("population", out=tmp_path / "whole", **options)
    with monkeypatch.context() as patch:
        patch.setitem(
            registry.EXPERIMENTS, "population", dataclasses.replace(experiment, run_seed=stopping)
        )
        with pytest.raises(KeyboardInterrupt):
            runner.run_experiment("population", out=tmp_path / "cut", **options)
    run_dir = runner.find_resumable(tmp_path / "cut", "population")
    assert (run_dir / "checkpoints" / "seed-0.pt").is_file()
    runner.resume_run(run_dir, progress=False, verbose=False)
    assert not (run_dir / "checkpoints").exists()
    read = [json.loads((d / "seeds" / "seed-0.json").read_text()) for d in (whole, run_dir)]
    assert without_seconds(read[0]) == without_seconds(read[1])


# --- the measurement --------------------------------------------------------------------------


@pytest.fixture
def trained_model():
    """A small BN MLP after a few SGD steps, so that its running statistics are non-trivial."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make_mlp(4, 3, hidden=5, depth=2, activation="relu", norm="batchnorm")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(16, 4, generator=gen) * 2 + 1
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    data = torch.randn(23, 4, generator=gen) * 2 + 1
    x_test = torch.randn(10, 4, generator=gen)
    y_test = torch.randint(0, 3, (10,), generator=gen)
    return model, data, x_test, y_test


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_measure_statistics_leaves_the_model_exactly_as_it_was(trained_model, training):
    model, data, x_test, y_test = trained_model
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    found = population.measure_statistics(
        model, population.statistics_batches(data, 6, 0), x_test, y_test
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [m.training for m in model.modules()] == modes
    # The EMA statistics reported are the buffers as they were.
    np.testing.assert_array_equal(found["statistics"]["bn1"]["ema"][0], before["bn1.running_mean"])
    np.testing.assert_array_equal(found["statistics"]["bn2"]["ema"][1], before["bn2.running_var"])


def test_measure_statistics_first_layer_matches_an_independent_computation(trained_model):
    model, data, x_test, y_test = trained_model
    batches = population.statistics_batches(data, 6, 0)  # 23 rows: batches of 6, 6, 6, 5
    found = population.measure_statistics(model, batches, x_test, y_test)
    with torch.no_grad():
        # bn1's input does not depend on any normalisation: fc1 of the raw inputs.
        features = [model.fc1(b).double() for b in batches]
    pooled = torch.cat(features)
    mean, var = found["statistics"]["bn1"]["pooled"]
    np.testing.assert_allclose(mean, pooled.mean(0).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, pooled.var(0).numpy(), rtol=1e-6, atol=1e-6)  # unbiased
    # Alg. 2: the mean of the batch means and of the batches' unbiased variances.
    paper_mean = torch.stack([f.mean(0) for f in features]).mean(0)
    paper_var = torch.stack([f.var(0) for f in features]).mean(0)
    mean, var = found["statistics"]["bn1"]["paper"]
    np.testing.assert_allclose(mean, paper_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, paper_var.numpy(), rtol=1e-6, atol=1e-6)
    # The EMA accuracy is the model's own eval-mode accuracy.
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).double().mean().item()
    assert found["test_accuracy"]["ema"] == accuracy
    # The reported gaps are statistics_gap of the reported statistics to the sequential ones,
    # with the layer's eps.
    assert population.COMPARED == ("ema", "pooled", "paper")
    for method in population.COMPARED:
        gap = population.statistics_gap(
            *found["statistics"]["bn2"][method], *found["statistics"]["bn2"]["sequential"], 1e-5
        )
        assert found["gap"][method]["mean_shift"]["bn2"] == gap["mean_shift"]
        assert found["gap"][method]["log_var_ratio"]["bn2"] == gap["log_var_ratio"]


def test_measure_statistics_sequential_is_pooled_in_layer_1_and_the_eval_network_past_it(
    trained_model,
):
    model, data, x_test, y_test = trained_model
    batches = population.statistics_batches(data, 6, 0)  # 23 rows: batches of 6, 6, 6, 5
    found = population.measure_statistics(model, batches, x_test, y_test)
    stats = found["statistics"]
    # Layer 1: sequential's first pass is pooled's pass, so the two agree bit for bit and the
    # gap is exactly 0.
    for got, want in zip(stats["bn1"]["sequential"], stats["bn1"]["pooled"], strict=True):
        np.testing.assert_array_equal(got, want)
    assert found["gap"]["pooled"]["mean_shift"]["bn1"] == 0.0
    assert found["gap"]["pooled"]["log_var_ratio"]["bn1"] == 0.0
    # Layer 2, independently in float64: the input bn2 has at inference, with bn1 normalising
    # every row with bn1's population statistics (mean and unbiased variance of fc1's output
    # over all 23 rows), then its mean and unbiased variance over the 23 rows.
    bn1 = model.bn1
    with torch.no_grad():
        h1 = data.double() @ model.fc1.weight.double().T
        x1 = (h1 - h1.mean(0)) / torch.sqrt(h1.var(0) + bn1.eps)
        a1 = torch.relu(x1 * bn1.weight.double() + bn1.bias.double())
        h2 = a1 @ model.fc2.weight.double().T
    mean, var = stats["bn2"]["sequential"]
    # float32 model against a float64 recomputation: measured difference below 1e-6.
    np.testing.assert_allclose(mean, h2.mean(0).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, h2.var(0).numpy(), rtol=1e-5, atol=1e-5)
    # Pooled normalised bn1 per batch of 5-6 rows, which shrinks bn2's spread: its variances
    # differ from sequential's by far more than that tolerance, and so the gap is positive.
    assert not np.allclose(stats["bn2"]["pooled"][1], var, rtol=1e-2, atol=0)
    assert found["gap"]["pooled"]["log_var_ratio"]["bn2"] > 0.01
    # The sequential accuracy and loss are those of the model with these statistics in eval
    # mode (the model itself is left as it was, so a copy gets them).
    probe = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name in found["layers"]:
            layer = getattr(probe, name)
            layer.running_mean.copy_(torch.from_numpy(stats[name]["sequential"][0]))
            layer.running_var.copy_(torch.from_numpy(stats[name]["sequential"][1]))
        logits = probe(x_test)
    assert found["test_loss"]["sequential"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y_test).item(), rel=1e-6
    )


def test_measure_statistics_rejects_a_model_without_batchnorm():
    with pytest.raises(ValueError, match=r"measure_statistics\(\): expected a model with Batch"):
        population.measure_statistics(
            torch.nn.Linear(2, 2), [torch.zeros(3, 2)], torch.zeros(2, 2), torch.zeros(2).long()
        )


def test_statistics_gap_matches_hand_computation():
    mean, var = np.array([1.0, 0.0]), np.array([4.0, 1.0])
    ref_mean, ref_var = np.array([0.0, 0.0]), np.array([1.0, 4.0])
    # eps = 0: shifts |1 - 0| / sqrt(1) = 1 and 0 / sqrt(4) = 0 -> mean 0.5;
    # |log(4 / 1)| = |log(1 / 4)| = log 4 -> mean log 4.
    gap = population.statistics_gap(mean, var, ref_mean, ref_var)
    assert gap["mean_shift"] == pytest.approx(0.5, rel=1e-15)
    assert gap["log_var_ratio"] == pytest.approx(math.log(4.0), rel=1e-15)
    # eps = 1: reference variances become 2 and 5, variances 5 and 2:
    # shifts 1 / sqrt(2) and 0 -> mean 1 / (2 sqrt 2); |log(5/2)| = |log(2/5)| -> log 2.5.
    gap = population.statistics_gap(mean, var, ref_mean, ref_var, eps=1.0)
    assert gap["mean_shift"] == pytest.approx(1 / (2 * math.sqrt(2)), rel=1e-15)
    assert gap["log_var_ratio"] == pytest.approx(math.log(2.5), rel=1e-15)
    # Identical statistics: no gap at all.
    assert population.statistics_gap(mean, var, mean, var) == {
        "mean_shift": 0.0,
        "log_var_ratio": 0.0,
    }


def test_statistics_gap_rejects_mismatched_shapes_and_zero_variance():
    with pytest.raises(ValueError, match=r"expected mean, var, ref_mean, ref_var of one shape"):
        population.statistics_gap(np.zeros(2), np.ones(2), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match=r"variance \+ eps to be > 0, got a minimum of 0.0"):
        population.statistics_gap(np.zeros(2), np.ones(2), np.zeros(2), np.array([1.0, 0.0]))


@pytest.mark.parametrize(
    ("n", "batch_size", "sizes"),
    [(8, 3, [3, 3, 2]), (7, 3, [3, 4]), (6, 3, [3, 3]), (5, 10, [5])],
    ids=["remainder-2", "remainder-1-joins", "exact", "one-batch"],
)
def test_statistics_batches_use_every_example_once(n, batch_size, sizes):
    x = torch.arange(n, dtype=torch.float32)[:, None]
    batches = population.statistics_batches(x, batch_size, seed=3)
    assert [len(b) for b in batches] == sizes
    assert sorted(torch.cat(batches)[:, 0].tolist()) == list(range(n))
    again = population.statistics_batches(x, batch_size, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


# --- summary and report -----------------------------------------------------------------------

CONFIG = dataclasses.replace(TINY, seeds=2, steps=20, eval_every=10, checkpoint_every=20, depth=1)


def hand_result(seed, acc, loss, shift, pooled_gap=0.0):
    """A run_seed-shaped result at steps 0, 10, 20 with one layer ``bn1`` of 2 channels.

    ``acc`` and ``loss``: method -> 3 values; ``shift``: the EMA's mean shift to sequential at
    the 3 steps (its log variance ratio is twice that); pooled's gaps are constant
    ``pooled_gap`` (0, as in a real first layer, by default), paper's constant 0.001.

    Final variances, with ``eps = 0`` so that the ratios are exact: sequential (1, 2); pooled
    2 % below it, (0.98, 1.96); paper (1.01, 2 / 1.01), whose geometric mean ratio is 1; the
    EMA twice sequential, (2, 4).
    """
    final = {
        "eps": 0.0,
        "sequential": {"mean": [0.0, 1.0], "var": [1.0, 2.0]},
        "pooled": {"mean": [0.0, 1.0], "var": [0.98, 1.96]},
        "paper": {"mean": [0.0, 1.0], "var": [1.01, 2.0 / 1.01]},
        "ema": {"mean": [0.0, 1.0], "var": [2.0, 4.0]},
    }
    return {
        "seed": seed,
        "seconds": 1.0,
        "layers": ["bn1"],
        "reference": "sequential",
        "steps": [0, 10, 20],
        "train_loss": [None, 2.0, 1.5],
        "test_accuracy": acc,
        "test_loss": loss,
        "gap": {
            "ema": {"mean_shift": {"bn1": shift}, "log_var_ratio": {"bn1": [2 * v for v in shift]}},
            "pooled": {g: {"bn1": [pooled_gap] * 3} for g in population.GAPS},
            "paper": {g: {"bn1": [0.001] * 3} for g in population.GAPS},
        },
        "final_statistics": {"bn1": final},
    }


def test_summary_says_claims_did_not_hold_when_the_ema_is_better():
    # Final accuracies: EMA 0.8, 0.7 (mean 0.75); pooled 0.7, 0.7 (0.70); paper 0.8, 0.6
    # (0.70); sequential 0.7, 0.6 (0.65, below the EMA in both seeds).
    # Final losses: EMA 1.0, 1.0; pooled 1.2, 0.9 (mean 1.05 > 1.0; seed 1 alone holds);
    # paper 1.0, 1.1 (mean 1.05; seed 0 ties, which holds); sequential 1.3, 1.0 (mean 1.15;
    # seed 1 ties the EMA), and against pooled +0.1 in both seeds.
    # EMA mean shift: early = step 10 only (10 % of 20 steps is 2, below the first measured
    # step); 0.1 early vs 0.3 final in both seeds: no lag.
    results = {
        0: hand_result(
            0,
            {
                "ema": [0.1, 0.5, 0.8],
                "pooled": [0.1, 0.5, 0.7],
                "paper": [0.1, 0.5, 0.8],
                "sequential": [0.1, 0.5, 0.7],
            },
            {
                "ema": [2.0, 1.5, 1.0],
                "pooled": [2.0, 1.4, 1.2],
                "paper": [2.0, 1.5, 1.0],
                "sequential": [2.0, 1.6, 1.3],
            },
            [1.0, 0.1, 0.3],
        ),
        1: hand_result(
            1,
            {
                "ema": [0.1, 0.5, 0.7],
                "pooled": [0.1, 0.5, 0.7],
                "paper": [0.1, 0.5, 0.6],
                "sequential": [0.1, 0.5, 0.6],
            },
            {
                "ema": [2.0, 1.5, 1.0],
                "pooled": [2.0, 1.6, 0.9],
                "paper": [2.0, 1.5, 1.1],
                "sequential": [2.0, 1.4, 1.0],
            },
            [1.0, 0.1, 0.3],
        ),
    }
    summary = population.summarize(CONFIG, results)
    claims = summary["claims"]
    assert len(claims) == 8
    accuracy, paper, sequential, loss, paper_loss, sequential_loss, vs_pooled, lag = claims
    assert accuracy["held"] is False and accuracy["seeds_held"] == 1  # seed 1: 0.7 >= 0.7
    assert accuracy["values"] == {"ema": pytest.approx(0.75), "pooled": pytest.approx(0.70)}
    assert paper["held"] is False and paper["seeds_held"] == 1  # seed 0: 0.8 >= 0.8
    assert sequential["held"] is False and sequential["seeds_held"] == 0
    assert (
        "(sequential)" in sequential["claim"] and "the EMA's test accuracy" in sequential["claim"]
    )
    assert loss["held"] is False and loss["seeds_held"] == 1
    assert loss["values"]["pooled"] == pytest.approx(1.05)
    assert loss["difference"]["per_seed"] == pytest.approx([0.2, -0.1])
    assert paper_loss["held"] is False and paper_loss["seeds_held"] == 1
    assert sequential_loss["held"] is False and sequential_loss["seeds_held"] == 1
    assert sequential_loss["difference"]["per_seed"] == pytest.approx([0.3, 0.0])
    assert vs_pooled["claim"].endswith("at most pooled's test loss")
    assert vs_pooled["held"] is False and vs_pooled["seeds_held"] == 0
    assert vs_pooled["values"] == {"pooled": pytest.approx(1.05), "sequential": pytest.approx(1.15)}
    assert vs_pooled["difference"]["per_seed"] == pytest.approx([0.1, 0.1])
    assert lag["held"] is False and lag["seeds_held"] == 0
    assert lag["values"] == {"early": pytest.approx(0.1), "final": pytest.approx(0.3)}
    assert summary["early_steps"] == [10]
    # Loss below the EMA's at steps 10 and 20: pooled, seed 0 at step 10 only (1.4 < 1.5, 1.2 >
    # 1.0) -> 0.5, seed 1 at step 20 only -> 0.5; sequential, seed 0 never, seed 1 at step 10
    # only (1.4 < 1.5; 1.0 ties at step 20, not below) -> 0.5.
    assert summary["loss_wins"]["pooled"] == [0.5, 0.5]
    assert summary["loss_wins"]["sequential"] == [0.0, 0.5]
    assert summary["accuracy_difference"]["pooled"]["per_seed"] == pytest.approx([-0.1, 0.0])
    assert summary["accuracy_difference"]["sequential"]["per_seed"] == pytest.approx([-0.1, -0.1])
    report = "\n".join(summary["report"])
    assert report.count("DID NOT HOLD:") == 8
    json.dumps(summary, allow_nan=False)


def test_summary_says_claims_held_when_the_exact_statistics_are_better():
    # Every exact pass beats the EMA in both seeds and sequential beats pooled (0.85 < 0.9); the
    # EMA's mean shift falls from 0.4 (step 10) to 0.05 (step 20).
    acc = {
        "ema": [0.1, 0.5, 0.7],
        "pooled": [0.1, 0.6, 0.75],
        "paper": [0.1, 0.6, 0.72],
        "sequential": [0.1, 0.6, 0.76],
    }
    loss = {
        "ema": [2.0, 1.5, 1.0],
        "pooled": [2.0, 1.4, 0.9],
        "paper": [2.0, 1.4, 0.95],
        "sequential": [2.0, 1.4, 0.85],
    }
    results = {s: hand_result(s, acc, loss, [1.0, 0.4, 0.05], pooled_gap=0.02) for s in (0, 1)}
    summary = population.summarize(CONFIG, results)
    assert [c["held"] for c in summary["claims"]] == [True] * 8
    assert [c["seeds_held"] for c in summary["claims"]] == [2] * 8
    assert summary["final_gap"]["ema"]["log_var_ratio"]["bn1"]["mean"] == pytest.approx(0.1)
    assert summary["final_gap"]["pooled"]["mean_shift"]["bn1"]["mean"] == pytest.approx(0.02)
    assert summary["early_gap"]["mean_shift"]["bn1"]["mean"] == pytest.approx(0.4)
    assert summary["loss_wins"] == {m: [1.0, 1.0] for m in ("pooled", "paper", "sequential")}
    # hand_result's final variances: pooled 0.98 and 0.98 of sequential -> -2 %; paper 1.01
    # and 1 / 1.01 -> geometric mean 1, 0 %; the EMA twice -> +100 %.
    bias = summary["variance_bias"]
    assert bias["pooled"]["bn1"]["mean"] == pytest.approx(-0.02, rel=1e-12)
    assert bias["paper"]["bn1"]["mean"] == pytest.approx(0.0, abs=1e-15)
    assert bias["ema"]["bn1"]["mean"] == pytest.approx(1.0, rel=1e-12)
    report = "\n".join(summary["report"])
    assert report.count("HELD:") == 8 and "DID NOT HOLD" not in report
    assert "-2.00 ± 0.00" in report and "+100.00 ± 0.00" in report


def test_variance_ratios_use_the_layers_eps_and_skip_seeds_without_final_statistics():
    r0 = hand_result(0, {m: [0.5] * 3 for m in population.METHODS}, {}, [1.0] * 3)
    r1 = copy.deepcopy(r0)
    r1["seed"] = 1
    r0["final_statistics"]["bn1"]["eps"] = 1.0
    r0["final_statistics"]["bn1"]["pooled"]["var"] = [0.0, 3.0]
    r0["final_statistics"]["bn1"]["sequential"]["var"] = [1.0, 3.0]
    del r1["final_statistics"]["bn1"]["sequential"]
    r0["test_loss"] = r1["test_loss"] = {m: [1.0] * 3 for m in population.METHODS}
    result = population.PopulationResult.from_seed_results(CONFIG, {0: r0, 1: r1})
    # Seed 0 only (seed 1 has no sequential statistics): (0 + 1) / (1 + 1), (3 + 1) / (3 + 1).
    np.testing.assert_array_equal(result.variance_ratios("pooled", "bn1"), [[0.5, 1.0]])
    np.testing.assert_array_equal(result.variance_ratios("sequential", "bn1"), [[1.0, 1.0]])
    with pytest.raises(ValueError, match=r"expected method in .*got 'median' and 'bn1'"):
        result.variance_ratios("median", "bn1")


def test_results_of_the_earlier_version_are_refused_with_a_clear_error():
    # Before the sequential estimator: three methods, gaps of EMA and paper to pooled, and no
    # "reference" key. Reading them as gaps to sequential would mislabel every number.
    acc = {m: [0.5] * 3 for m in ("ema", "pooled", "paper")}
    old = hand_result(0, acc, acc, [1.0] * 3)
    del old["reference"], old["gap"]["pooled"]
    with pytest.raises(ValueError, match=r"with gaps to 'pooled', from an earlier version"):
        population.PopulationResult.from_seed_results(CONFIG, {0: old})
    with pytest.raises(ValueError, match=r"earlier version of this experiment; re-run it"):
        population.summarize(CONFIG, {0: old})


def test_early_steps_are_the_first_tenth_of_training():
    # 1000 steps measured every 50: early = 50 and 100 (10 % of 1000); step 0 never counts.
    config = dataclasses.replace(CONFIG, steps=1000, eval_every=50, checkpoint_every=50)
    r = hand_result(0, {m: [0.5] * 3 for m in population.METHODS}, {}, [1.0] * 3)
    steps = list(range(0, 1001, 50))
    r = {**r, "steps": steps}
    r["test_accuracy"] = {m: [0.5] * len(steps) for m in population.METHODS}
    r["test_loss"] = {m: [1.0] * len(steps) for m in population.METHODS}
    r["gap"] = {
        m: {g: {"bn1": [0.1] * len(steps)} for g in population.GAPS} for m in population.COMPARED
    }
    result = population.PopulationResult.from_seed_results(config, {0: r})
    assert result.steps[result.early_mask()].tolist() == [50, 100]


def test_metric_rows_have_one_row_per_statistics_and_step():
    r = hand_result(
        3,
        {
            "ema": [0.1, 0.2, 0.3],
            "pooled": [0.1, 0.2, 0.4],
            "paper": [0.1, 0.2, 0.5],
            "sequential": [0.1, 0.2, 0.6],
        },
        {
            "ema": [2.0, 1.5, 1.0],
            "pooled": [2.0, 1.5, 0.9],
            "paper": [2.0, 1.5, 0.8],
            "sequential": [2.0, 1.5, 0.7],
        },
        [1.0, 0.5, 0.25],
        pooled_gap=0.003,
    )
    rows = population.metric_rows(r)
    assert len(rows) == 12  # 4 sources x 3 steps
    assert rows[2] == {
        "seed": 3,
        "statistics": "ema",
        "step": 20,
        "test_accuracy": 0.3,
        "test_loss": 1.0,
        "train_loss": 1.5,
        "mean_shift_vs_sequential_bn1": 0.25,
        "log_var_ratio_vs_sequential_bn1": 0.5,
    }
    assert rows[5]["statistics"] == "pooled" and rows[5]["mean_shift_vs_sequential_bn1"] == 0.003
    assert rows[8]["statistics"] == "paper" and rows[8]["log_var_ratio_vs_sequential_bn1"] == 0.001
    # The reference's gap to itself is 0.
    assert rows[11]["statistics"] == "sequential" and rows[11]["test_loss"] == 0.7
    assert rows[11]["mean_shift_vs_sequential_bn1"] == 0.0
    assert rows[11]["log_var_ratio_vs_sequential_bn1"] == 0.0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of eval_every"):
        population.PopulationConfig(eval_every=30, checkpoint_every=100)
    with pytest.raises(ValueError, match=r"expected momentum a float in \(0, 1\] or None, got 0"):
        population.PopulationConfig(momentum=0)
    with pytest.raises(ValueError, match=r"expected stats_batch_size an int >= 2 or None, got 1"):
        population.PopulationConfig(stats_batch_size=1)
    with pytest.raises(ValueError, match=r"expected activation one of .*got 'gelu'"):
        population.PopulationConfig(activation="gelu")
    assert population.PopulationConfig().pass_batch_size == 60
    assert population.PopulationConfig(stats_batch_size=200).pass_batch_size == 200


def test_prepare_rejects_a_pass_batch_larger_than_the_training_set():
    with pytest.raises(ValueError, match=r"expected stats_batch_size <= 1438"):
        population.prepare(dataclasses.replace(TINY, stats_batch_size=5000))


# --- plots ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hand_made():
    acc = {
        "ema": [0.1, 0.5, 0.7],
        "pooled": [0.1, 0.6, 0.75],
        "paper": [0.1, 0.6, 0.72],
        "sequential": [0.1, 0.6, 0.76],
    }
    loss = {
        "ema": [2.0, 1.5, 1.0],
        "pooled": [2.0, 1.4, 0.9],
        "paper": [2.0, 1.4, 0.95],
        "sequential": [2.0, 1.4, 0.85],
    }
    # pooled_gap=0: pooled equals sequential in this one layer, as in a real first layer.
    results = {s: hand_result(s, acc, loss, [1.0, 0.4, 0.05]) for s in (0, 1)}
    summary = population.summarize(CONFIG, results)
    return population.PopulationResult.from_seed_results(CONFIG, results, summary)


@pytest.mark.parametrize(
    "draw",
    [
        plots_population.plot_inference_accuracy,
        lambda r, ax=None: plots_population.plot_difference_to_ema(r, "test_accuracy", ax=ax),
        lambda r, ax=None: plots_population.plot_difference_to_ema(r, "test_loss", ax=ax),
        lambda r, ax=None: plots_population.plot_statistics_gap(r, "mean_shift", ax=ax),
        lambda r, ax=None: plots_population.plot_statistics_gap(r, "log_var_ratio", ax=ax),
        plots_population.plot_variance_ratio,
    ],
    ids=["accuracy", "accuracy-diff", "loss-diff", "mean-shift", "var-ratio", "variance"],
)
def test_plot_functions_return_a_figure_with_or_without_axes(hand_made, draw):
    from matplotlib.figure import Figure

    figure = draw(hand_made)
    assert isinstance(figure, Figure) and len(figure.axes) == 1
    host = Figure()
    ax = host.add_subplot()
    assert draw(hand_made, ax=ax) is host
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert ax.get_legend() is not None


def test_plot_colors_and_labels_cover_the_four_sources_distinctly():
    assert set(plots_population.COLORS) == set(population.METHODS)
    assert set(plots_population.LABELS) == set(population.METHODS)
    assert len(set(plots_population.COLORS.values())) == len(population.METHODS)


def test_plot_population_has_six_titled_panels_and_states_the_verdict(hand_made):
    from matplotlib.colors import to_hex

    figure = plots_population.plot_population(hand_made)
    titles = [ax.get_title() for ax in figure.axes]
    assert [t[:3] for t in titles] == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]
    assert "held in this run: 8 of 8 parts" in figure._suptitle.get_text()
    assert "sequential = " in figure._suptitle.get_text()
    a, b, _, d, _, f = figure.axes
    assert [line.get_label().split(" ")[0] for line in a.get_lines()] == [
        "EMA",
        "pooled",
        "paper",
        "sequential",
    ]
    # The difference panels leave step 0 out and draw the EMA as the zero line.
    lines = {line.get_label().split(" ")[0]: line for line in b.get_lines()}
    assert lines["pooled"].get_xdata().tolist() == [10, 20]
    assert lines["pooled"].get_ydata().tolist() == pytest.approx([0.1, 0.05])
    assert lines["sequential"].get_ydata().tolist() == pytest.approx([0.1, 0.06])
    # Gap panel: EMA and paper drawn to sequential; pooled's gap is 0 at every step, which a log
    # axis cannot show, so it has a legend entry saying so and no data.
    gaps = {line.get_label(): line for line in d.get_lines()}
    assert gaps["bn1, EMA"].get_ydata().tolist() == pytest.approx([1.0, 0.4, 0.05])
    assert gaps["bn1, paper"].get_ydata().tolist() == pytest.approx([0.001] * 3)
    assert len(gaps["bn1, pooled: 0 (identical)"].get_xdata()) == 0
    assert d.get_yscale() == "log" and "Gap to the sequential statistics" in d.get_title()
    # Variance panel: a bar per source at its geometric-mean ratio to sequential, in %
    # (hand_result: pooled -2 %, paper 0 %, EMA +100 %).
    bars = {to_hex(line.get_color()): line.get_ydata() for line in f.get_lines()[:-1]}
    assert bars[plots_population.COLORS["pooled"]] == pytest.approx([-2.0, -2.0])
    assert bars[plots_population.COLORS["paper"]] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert bars[plots_population.COLORS["ema"]] == pytest.approx([100.0, 100.0])


def test_plot_functions_reject_unknown_names_and_missing_statistics(hand_made):
    with pytest.raises(ValueError, match=r"expected metric in \['test_accuracy', 'test_loss'\]"):
        plots_population.plot_difference_to_ema(hand_made, "accuracy")
    with pytest.raises(ValueError, match=r"expected gap in \['mean_shift', 'log_var_ratio'\]"):
        plots_population.plot_statistics_gap(hand_made, "shift")
    bare = dataclasses.replace(hand_made, final_statistics=[{"bn1": {}}, {"bn1": {}}])
    with pytest.raises(ValueError, match=r"plot_variance_ratio\(\): expected final statistics"):
        plots_population.plot_variance_ratio(bare)
    # The whole figure still draws, without panel (f).
    figure = plots_population.plot_population(bare)
    assert not figure.axes[5].axison
