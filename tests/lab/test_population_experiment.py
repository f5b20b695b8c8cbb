"""population: the multi-momentum running averages, the measurement, determinism and resume,
the checks of results and checkpoints, the rules' verdicts, tuning, the figures.

The experiment runs its ``tiny`` preset (scikit-learn's digits, half an epoch per batch size):
these tests check structure, determinism and that measuring never changes training, not the
paper's claim. The running averages are checked against torch's own BatchNorm1d, the exact
statistics and the control against independent computations, and the verdicts on hand-made
results whose effects are worked out in comments.
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

import batchnorm
from batchnorm.lab import plots_population, protocol, registry, runner
from batchnorm.lab.experiments import population
from batchnorm.lab.models import make_mlp

matplotlib.use("Agg")

TINY = population.PRESETS["tiny"]
ONE_SEED = dataclasses.replace(TINY, seeds=1)
# The tiny preset's networks: 1238 training examples after the 200 held out; half an epoch of
# 1238 // b drop-last batches, rounded half to even: b16 round(38.5) = 38, b60 round(10.0) =
# 10, b256 round(2.0) = 2, so 50 steps per seed, and checkpoints (every 20) at seed steps 20
# (step 20 of b16) and 40 (step 2 of b60, which starts after b16's 38).
TINY_STEPS = {16: 38, 60: 10, 256: 2}


@pytest.fixture(scope="module")
def tiny_data():
    return population.prepare(TINY)


def without_seconds(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


def through_torch_save(state: dict) -> dict:
    """``state`` as the runner stores and reads a checkpoint (torch.load with weights_only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- settings ---------------------------------------------------------------------------------


def test_tiny_config_counts_steps_per_batch_size_and_over_the_seed():
    assert TINY.n_train == 1438 - 200
    assert {b: TINY.steps_for(b) for b in TINY.batch_sizes} == TINY_STEPS
    assert TINY.offsets() == [0, 38, 48]
    assert TINY.steps == population.steps_per_seed(TINY) == 50
    # 0.1 of 38 steps rounds to 4; of 10 to 1; of 2 to 0, raised to the minimum of 1.
    assert [TINY.early_step(b) for b in TINY.batch_sizes] == [4, 1, 1]


def test_prepare_holds_out_the_validation_split(tiny_data):
    assert len(tiny_data.y_train) == TINY.n_train
    assert len(tiny_data.y_val) == TINY.n_val == 200
    assert len(tiny_data.y_test) == 359


def test_presets_train_on_the_large_dataset_with_a_validation_split_and_five_seeds():
    assert set(population.PRESETS) == {"tiny", "quick", "full"}
    for name in ("quick", "full"):
        config = population.PRESETS[name]
        assert config.dataset == "mnist1d-large" and config.n_val == 5000
        assert config.seeds == 5 and config.lr is None
        assert config.batch_sizes == (16, 60, 256) and config.momenta == (0.01, 0.1, 0.5)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_sizes", (16, 256), r"expected batch_sizes to include 60"),
        ("batch_sizes", (60, 60), r"expected batch_sizes distinct ints >= 2"),
        ("momenta", (0.01, 0.5), r"expected momenta to include 0.1"),
        ("momenta", (0.1, 1.5), r"expected momenta distinct numbers in \(0, 1\]"),
        ("epochs", 0.0, r"expected epochs a number > 0"),
        ("epochs", 0.1, r"expected epochs long enough for 2 steps"),
        ("early_fraction", 1.0, r"expected early_fraction in \(0, 1\)"),
        ("lr", -1.0, r"expected lr a number > 0 or None"),
        ("dataset", "cifar", r"expected dataset one of"),
        ("n_val", 1300, r"expected every batch size <= 138"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **{field: value})


def test_config_takes_each_batch_sizes_learning_rate_from_the_tuned_file(tmp_path, monkeypatch):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"population": {"arms": {"b60": {"lr": 0.7}}}}))
    monkeypatch.setattr(protocol, "TUNED_FILE", tuned)
    config = dataclasses.replace(TINY, lr=None)
    assert config.lr_for(60) == 0.7
    assert config.lr_for(16) == population.DEFAULT_LR  # never tuned
    assert TINY.lr_for(60) == TINY.lr == 0.3  # a fixed lr wins over the file


# --- the running averages of several momenta --------------------------------------------------


@pytest.mark.parametrize("shape", [(None, 5), (None, 4, 3)], ids=["NxC", "NxCxL"])
def test_running_averages_equal_torch_batchnorm1d_with_each_momentum(shape):
    momenta = (0.01, 0.1, 0.5, 1.0)
    channels = shape[1]
    layer = batchnorm.BatchNorm1d(channels)  # the tracked layer: ours, momentum 0.1
    averages = population.RunningAverages([("bn", layer)], momenta)
    oracles = {m: torch.nn.BatchNorm1d(channels, momentum=m) for m in momenta}
    gen = torch.Generator().manual_seed(3)
    with averages.attached():
        for k, n in enumerate((7, 16, 2, 33, 5, 60)):
            x = torch.randn(n, *shape[1:], generator=gen) * (1 + k) + 0.5 * k
            layer(x)
            for oracle in oracles.values():
                oracle(x)
        # Eval-mode forwards leave torch's buffers alone, and the averages too.
        layer.eval()
        layer(torch.randn(9, *shape[1:], generator=gen) + 100.0)
    layer(torch.randn(9, *shape[1:], generator=gen) + 100.0)  # detached: not followed
    for m, oracle in oracles.items():
        # float64 averages against torch's float32 update of the same formula: the largest
        # difference measured is ~5e-7 at values up to ~30 (float32 rounding).
        torch.testing.assert_close(
            averages.mean("bn", m).float(), oracle.running_mean, rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(
            averages.var("bn", m).float(), oracle.running_var, rtol=1e-6, atol=1e-6
        )


def test_running_averages_are_not_fed_by_a_deep_copy_of_the_model():
    # A measurement's probe is a deep copy that carries the hooks along; its training-mode
    # passes (the exact statistics, the control) must not count.
    layer = batchnorm.BatchNorm1d(3)
    averages = population.RunningAverages([("bn", layer)], (0.1,))
    with averages.attached():
        copy.deepcopy(layer)(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(averages.mean("bn", 0.1), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(averages.var("bn", 0.1), torch.ones(3, dtype=torch.float64))


def test_running_averages_state_round_trip_and_load_into_a_copy():
    layer = batchnorm.BatchNorm1d(3)
    averages = population.RunningAverages([("bn", layer)], (0.1, 0.5))
    averages.update("bn", torch.randn(8, 3, generator=torch.Generator().manual_seed(1)))
    again = population.RunningAverages([("bn", layer)], (0.1, 0.5))
    again.load_state_dict(averages.state_dict())
    assert torch.equal(again.mean("bn", 0.5), averages.mean("bn", 0.5))
    target = torch.nn.Sequential()
    target.add_module("bn", torch.nn.BatchNorm1d(3))
    again.load_into(target, 0.5)
    assert torch.equal(target.bn.running_var, averages.var("bn", 0.5).float())
    with pytest.raises(ValueError, match=r"expected a momentum among \[0.1, 0.5\], got 0.2"):
        again.load_into(target, 0.2)


# --- end to end -------------------------------------------------------------------------------


def test_tiny_preset_runs_through_the_runner(tmp_path):
    run_dir = batchnorm.lab.run_experiment("population", preset="tiny", out=tmp_path, verbose=False)
    for name in ("config.json", "metrics.jsonl", "summary.json", "summary.md"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = sorted(p.stem for p in (run_dir / "figures").glob("*.png"))
    assert figures == sorted(summary["figure_notes"]) == ["end_loss", "fit", "lag"]
    assert all((run_dir / "figures" / f"{f}.png").stat().st_size > 10_000 for f in figures)
    methods = ["ema0.01", "ema0.1", "ema0.5", "sequential", "pooled", "paper", "batch"]
    for seed in (0, 1):
        result = json.loads((run_dir / "seeds" / f"seed-{seed}.json").read_text())
        assert result["methods"] == population.methods(TINY.momenta) == methods
        assert result["steps"] == {str(b): n for b, n in TINY_STEPS.items()}
        assert result["n_val"] == 200 and result["n_test"] == 359
        for b in TINY.batch_sizes:
            early, end = (result["measurements"][str(b)][p] for p in ("early", "end"))
            assert (early["step"], end["step"]) == (TINY.early_step(b), TINY_STEPS[b])
            for split in ("val", "test"):
                assert list(end[split]["loss"]) == methods
                assert all(0 <= a <= 1 for a in end[split]["accuracy"].values())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2 * 2 * len(methods)  # seeds x batch sizes x phases x splits
    assert summary["epochs"] == 0.5
    assert [c["key"] for c in summary["claims"]] == [r.key for r in population.RULES]
    for claim in summary["claims"]:
        assert claim["verdict"] in protocol.VERDICTS and claim["seeds"] == 2
        assert claim["for_record"] is False and claim["measured"]
    report = (run_dir / "summary.md").read_text()
    assert "End of training: test loss (nats)" in report and "memorisation" in report
    assert report.count("not for the record") == len(population.RULES)
    # The same figures again from the saved JSON alone.
    replotted = sorted(p.stem for p in runner.plot_run(run_dir, verbose=False))
    assert replotted == figures
    # A seed's result damaged on disk is refused when the run is read back, naming the file.
    path = run_dir / "seeds" / "seed-1.json"
    result = json.loads(path.read_text())
    del result["measurements"]["256"]["end"]["test"]["loss"]["sequential"]
    path.write_text(json.dumps(result))
    with pytest.raises(runner.RunFileError, match=r"seed-1.json.*\['256'\]\['end'\]\['test'\]"):
        runner.load_run(run_dir)


def test_registry_entry_declares_the_rules_and_the_tuning():
    entry = registry.EXPERIMENTS["population"]
    assert entry.rules is population.RULES
    assert [r.key for r in entry.rules] == ["exact_no_worse", "early_lag", "control_batch"]
    assert [r.threshold for r in entry.rules] == [0.0, 0.0, 0.0]
    assert population.NONINFERIORITY_MARGIN == 0.005
    assert entry.tuning.arms(population.PRESETS["quick"]) == ["b16", "b60", "b256"]
    assert entry.tuning.grid == (0.03, 0.1, 0.3, 1.0) and entry.tuning.preset == "quick"


def test_run_seed_resumed_from_each_checkpoint_equals_an_uninterrupted_run(tiny_data):
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
    assert [c["step"] for c in saved] == [20, 40]
    assert sum(advanced) == TINY.steps
    assert threads == {(1, 1)}  # pinned, also after the exact passes' Numba kernels ...
    assert (torch.get_num_threads(), numba.get_num_threads()) == threads_before  # ... restored
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is never drawn from
    # Step 20 is inside batch 16's network (only its early measurement taken); step 40 inside
    # batch 60's, after batch 16's end and batch 60's early measurement (step 1 of it).
    assert list(saved[0]["measurements"]["16"]) == ["early"]
    assert list(saved[1]["measurements"]["60"]) == ["early"]
    for state in saved:
        resumed = population.run_seed(ONE_SEED, tiny_data, 0, checkpoint=through_torch_save(state))
        assert without_seconds(resumed) == without_seconds(full)
    json.dumps(full, allow_nan=False)  # JSON-serialisable, no NaN


def test_tracked_momentum_0_1_equals_the_layers_own_running_buffers(tiny_data):
    # The network's BN layers keep torch's running averages with momentum 0.1 themselves; the
    # hooks' copy of the same momentum (row 1 of momenta (0.01, 0.1, 0.5)) must agree.
    saved = []
    population.run_seed(ONE_SEED, tiny_data, 0, save_checkpoint=saved.append)
    network = saved[0]["network"]
    row = TINY.momenta.index(0.1)
    for name in ("bn1", "bn2", "bn3"):
        for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
            torch.testing.assert_close(
                network["averages"][f"{name}.{ours}"][row].float(),
                network["model"][f"{name}.{theirs}"],
                rtol=1e-6,
                atol=1e-6,
            )


def test_measuring_does_not_change_training(tiny_data):
    # Early measurements at other steps must leave the end of every network as it was.
    later = dataclasses.replace(ONE_SEED, early_fraction=0.5)
    often = population.run_seed(ONE_SEED, tiny_data, 1)
    other = population.run_seed(later, tiny_data, 1)
    for b in TINY.batch_sizes:
        assert other["measurements"][str(b)]["early"]["step"] != 1 or b == 256
        assert other["measurements"][str(b)]["end"] == often["measurements"][str(b)]["end"]


def test_run_seed_refuses_data_without_a_validation_split_and_a_diverging_lr(tiny_data):
    bare = dataclasses.replace(tiny_data, x_val=None, y_val=None)
    with pytest.raises(ValueError, match=r"expected a dataset with a validation split"):
        population.run_seed(ONE_SEED, bare, 0)
    huge = dataclasses.replace(ONE_SEED, lr=1e38)
    # The layers' own guard warns as the statistics overflow, before the loss turns NaN.
    with pytest.warns(batchnorm.NonFiniteStatisticsWarning):
        with pytest.raises(ValueError, match=r"expected a finite training loss, got .* Lower the"):
            population.run_seed(huge, tiny_data, 0)


# --- checks of checkpoints and results read back -----------------------------------------------


@pytest.fixture(scope="module")
def one_seed_run(tiny_data):
    """Seed 0 of ONE_SEED: its result and its two checkpoints (steps 20, 40), as read back."""
    saved = []
    result = population.run_seed(ONE_SEED, tiny_data, 0, save_checkpoint=saved.append)
    return json.loads(json.dumps(result)), [through_torch_save(s) for s in saved]


def damaged(data, edit):
    copy_ = copy.deepcopy(data)
    edit(copy_)
    return copy_


def test_check_result_accepts_a_result_and_names_what_is_wrong_with_a_damaged_one(one_seed_run):
    result, _ = one_seed_run
    population.check_result(ONE_SEED, 0, result)
    end60 = ["measurements", "60", "end"]

    def at(r, path):
        for key in path:
            r = r[key]
        return r

    cases = [
        (lambda r: r.pop("measurements"), r"expected result to have the key 'measurements'"),
        (
            lambda r: at(r, end60)["test"]["loss"].pop("sequential"),
            r"\['60'\]\['end'\]\['test'\]\['loss'\] to hold the methods",
        ),
        (
            lambda r: at(r, end60)["val"]["loss"].__setitem__("ema0.1", None),
            r"\['val'\]\['loss'\]\['ema0.1'\] to be a finite number >= 0, got None",
        ),
        (
            lambda r: at(r, end60)["test"]["accuracy"].__setitem__("batch", 1.5),
            r"\['test'\]\['accuracy'\]\['batch'\] to be a fraction in \[0, 1\], got 1.5",
        ),
        (
            lambda r: at(r, end60).__setitem__("step", 9),
            r"result\['measurements'\]\['60'\]\['end'\]\['step'\] to be 10",
        ),
        (
            lambda r: r["measurements"]["256"].pop("early"),
            r"\['256'\] to hold the measurements \['early', 'end'\], got \['end'\]",
        ),
        (lambda r: r["lr"].__setitem__("60", 0.1), r"result\['lr'\] to be \{'16': 0.3"),
        (lambda r: r.__setitem__("momenta", [0.1]), r"result\['momenta'\] to be \[0.01, 0.1"),
        (lambda r: r.__setitem__("layers", ["bn1"]), r"result\['layers'\] to be \['bn1', 'bn2'"),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            population.check_result(ONE_SEED, 0, damaged(result, edit))
    with pytest.raises(ValueError, match=r"result\['seed'\] to be 1, got 0"):
        population.check_result(ONE_SEED, 1, result)
    # A result of another config: other momenta, other length.
    other = dataclasses.replace(ONE_SEED, momenta=(0.1, 0.2))
    with pytest.raises(ValueError, match=r"result\['momenta'\] to be \[0.1, 0.2\]"):
        population.check_result(other, 0, result)
    longer = dataclasses.replace(ONE_SEED, epochs=1.0)
    with pytest.raises(ValueError, match=r"result\['steps'\] to be \{'16': 77"):
        population.check_result(longer, 0, result)


def test_check_checkpoint_accepts_a_checkpoint_and_names_what_is_wrong_with_a_damaged_one(
    one_seed_run, tiny_data
):
    _, states = one_seed_run
    for state in states:
        population.check_checkpoint(ONE_SEED, tiny_data, 0, state)
    state = states[1]  # step 40: batch 60's network, two steps in
    cases = [
        (lambda s: s.pop("network"), r"expected state to have the key 'network'"),
        (
            lambda s: s["network"]["model"].__setitem__("bn2.running_var", torch.ones(7)),
            r"state\['network'\]\['model'\]\['bn2.running_var'\] to be a tensor of shape \(100,\)",
        ),
        (
            lambda s: s["network"]["averages"].__setitem__("bn1.mean", torch.zeros(3, 100)),
            r"state\['network'\]\['averages'\]\['bn1.mean'\] to be a tensor of shape \(3, 100\) "
            r"and dtype torch.float64",
        ),
        (
            lambda s: s["network"]["optimizer"]["param_groups"][0].__setitem__("lr", 0.1),
            r"\['optimizer'\]\['param_groups'\]\[0\]\['lr'\] to be 0.3, got 0.1",
        ),
        (
            lambda s: s["measurements"]["60"].pop("early"),
            r"state\['measurements'\]\['60'\] to hold the measurements \['early'\], got \[\]",
        ),
        (
            lambda s: s["measurements"]["256"].__setitem__("early", {}),
            r"state\['measurements'\]\['256'\] to hold the measurements \[\]",
        ),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            population.check_checkpoint(ONE_SEED, tiny_data, 0, damaged(state, edit))
    wider = dataclasses.replace(ONE_SEED, hidden=50)
    with pytest.raises(ValueError, match=r"\['model'\]\['fc1.weight'\] to be a tensor of"):
        population.check_checkpoint(wider, tiny_data, 0, state)


def test_runner_resumes_a_population_run_to_the_uninterrupted_result(tmp_path, monkeypatch):
    experiment = registry.EXPERIMENTS["population"]

    def stopping(config, data, seed, *, advance, **kwargs):
        def counting(n):
            advance(n)
            counting.done += n
            if counting.done >= 45:  # after the checkpoint at step 40
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


def test_metric_rows_have_one_row_per_batch_size_phase_split_and_statistics(one_seed_run):
    result, _ = one_seed_run
    rows = population.metric_rows(result)
    assert len(rows) == 3 * 2 * 2 * 7
    row = next(
        r
        for r in rows
        if (r["batch_size"], r["phase"], r["split"], r["statistics"])
        == (60, "end", "test", "batch")
    )
    end = result["measurements"]["60"]["end"]
    assert row["loss"] == end["test"]["loss"]["batch"] and row["step"] == 10
    assert row["train_loss"] == end["train_loss"] and row["seed"] == 0


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
    x_test = torch.randn(23, 4, generator=gen) * 2 + 1
    y_test = torch.randint(0, 3, (23,), generator=gen)
    return model.eval(), x_test, y_test


def test_exact_statistics_of_the_first_layer_are_the_training_sets_mean_and_unbiased_variance(
    trained_model,
):
    model, x, _ = trained_model
    x_train = torch.randn(2500, 4, generator=torch.Generator().manual_seed(5)) * 3 - 1
    probe = copy.deepcopy(model)
    population.exact_statistics(probe, x_train)  # batches of 1000, 1000, 500
    with torch.no_grad():
        features = model.fc1(x_train).double()  # bn1's input involves no normalisation
    torch.testing.assert_close(
        probe.bn1.running_mean.double(), features.mean(0), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        probe.bn1.running_var.double(), features.var(0), rtol=1e-5, atol=1e-6
    )


def test_batch_own_metrics_normalise_each_batch_by_itself_and_leave_the_model_alone(
    trained_model,
):
    model, x, y = trained_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, accuracy = population.batch_own_metrics(model, x, y, 6, 0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not model.training
    # Independently: the layers written out by hand, each batch normalised with its own mean
    # and biased variance (23 examples in batches of 6, 6, 6, 5 in the seeded order).
    batches = population.batch_slices(len(y), 6, 0)
    assert [len(b) for b in batches] == [6, 6, 6, 5]
    logits = []
    with torch.no_grad():
        for idx in batches:
            h = x[idx].double()
            for i in (1, 2):
                h = h @ getattr(model, f"fc{i}").weight.double().T
                bn = getattr(model, f"bn{i}")
                mean, var = h.mean(0), h.var(0, unbiased=False)
                h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight.double() + bn.bias.double()
                h = torch.relu(h)
            logits.append(h @ model.out.weight.double().T + model.out.bias.double())
    logits = torch.cat(logits)
    labels = torch.cat([y[idx] for idx in batches])
    want = torch.nn.functional.cross_entropy(logits, labels).item()
    assert math.isclose(loss, want, rel_tol=1e-5)
    assert accuracy == (logits.argmax(1) == labels).double().mean().item()


@pytest.mark.parametrize(
    "n, batch_size, sizes",
    [(23, 6, [6, 6, 6, 5]), (13, 6, [6, 7]), (12, 6, [6, 6]), (5, 8, [5])],
    ids=["remainder", "single-example-joins-previous", "exact", "one-short-batch"],
)
def test_batch_slices_use_every_example_once(n, batch_size, sizes):
    batches = population.batch_slices(n, batch_size, seed=3)
    assert [len(b) for b in batches] == sizes
    assert sorted(torch.cat(batches).tolist()) == list(range(n))
    with pytest.raises(ValueError, match=r"expected batch_size >= 2"):
        population.batch_slices(n, 1, seed=3)


# --- the verdicts -----------------------------------------------------------------------------


def hand_results(template: dict, deltas: list[tuple[float, float, float]]) -> dict[int, dict]:
    """Seeds built from ``template`` with every loss 1.0 except, per seed ``s`` with
    ``deltas[s] = (d_end, d_early, d_control)``: the EMA(0.1) test loss at the end is
    ``1 + d_end`` at every batch size, at the early checkpoint of batch 60 ``1 + d_early``, and
    the control's test loss at the end of batch 16 ``1 + d_control``."""
    results = {}
    for seed, (d_end, d_early, d_control) in enumerate(deltas):
        r = copy.deepcopy(template)
        r["seed"] = seed
        for b, by_phase in r["measurements"].items():
            for phase, found in by_phase.items():
                for split in ("val", "test"):
                    for method in found[split]["loss"]:
                        found[split]["loss"][method] = 1.0
                test = found["test"]["loss"]
                if phase == "end":
                    test["ema0.1"] = 1.0 + d_end
                    if b == "16":
                        test["batch"] = 1.0 + d_control
                elif b == "60":
                    test["ema0.1"] = 1.0 + d_early
        results[seed] = r
    return results


def verdicts(summary: dict) -> dict[str, str]:
    return {c["key"]: c["verdict"] for c in summary["claims"]}


def test_summary_judges_each_rule_on_its_declared_effect(one_seed_run):
    template, _ = one_seed_run
    config = dataclasses.replace(ONE_SEED, seeds=5)
    # exact_no_worse: effect = d_end + 0.005. d_end = -0.004 in seeds 0-3 (effect +0.001) and
    # -0.010 in seed 4 (-0.005): 4 of 5 above 0 -> held, though EMA wins in every seed.
    # early_lag: d_early > 0 in all 5 -> held. control_batch: d_control < 0 in 3 of 5, > 0 in 2
    # -> neither 4 above nor 4 at or below -> inconclusive.
    deltas = [
        (-0.004, 0.02, -0.1),
        (-0.004, 0.03, -0.2),
        (-0.004, 0.01, 0.1),
        (-0.004, 0.02, 0.2),
        (-0.010, 0.05, -0.3),
    ]
    summary = population.summarize(config, hand_results(template, deltas))
    assert verdicts(summary) == {
        "exact_no_worse": "held",
        "early_lag": "held",
        "control_batch": "inconclusive",
    }
    rows = {c["key"]: c for c in summary["claims"]}
    np.testing.assert_allclose(rows["exact_no_worse"]["per_seed"], [0.001] * 4 + [-0.005])
    assert rows["exact_no_worse"]["above"] == 4 and rows["exact_no_worse"]["needed"] == 4
    assert rows["early_lag"]["p_sign"] == pytest.approx(0.0625)  # 5 of 5: 2 / 2**5
    assert rows["control_batch"]["for_record"] is True
    # The EMA's mean end loss: 1 + (4 * -0.004 - 0.010) / 5 = 0.9948 at every batch size.
    assert "batch 60 0.9948 vs 1.0000" in rows["exact_no_worse"]["measured"]
    report = "\n".join(summary["report"])
    assert "HELD: Exact population statistics are no worse" in report
    assert "INCONCLUSIVE: Normalising test examples" in report
    assert "above 0 in 4 of 5 seeds, 4 needed" in report
    # The same effects two steps the other way: beyond the margin, no lag, the control worse.
    deltas = [(-0.006, -0.01, 0.1)] * 4 + [(0.0, 0.01, 0.1)]
    summary = population.summarize(config, hand_results(template, deltas))
    assert verdicts(summary) == {
        "exact_no_worse": "not held",
        "early_lag": "not held",
        "control_batch": "held",
    }


# --- tuning -----------------------------------------------------------------------------------


def test_tune_score_is_minus_the_mean_validation_loss_of_ema_and_exact(tiny_data):
    assert population.tune_arms(TINY) == ["b16", "b60", "b256"]
    score = population.tune_score(TINY, tiny_data, "b60", 0.3, protocol.TUNING_SEED)
    assert math.isfinite(score) and score < 0
    # The same training as run_seed's network of batch 60 when the seed and lr agree.
    result = population.run_seed(ONE_SEED, tiny_data, 0)
    end = result["measurements"]["60"]["end"]["val"]["loss"]
    want = -(end["ema0.1"] + end["sequential"]) / 2
    assert population.tune_score(TINY, tiny_data, "b60", TINY.lr, 0) == pytest.approx(want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # divergence is a NaN score, not a warning
        assert math.isnan(population.tune_score(TINY, tiny_data, "b60", 1e38, 0))
    with pytest.raises(ValueError, match=r"expected arm 'b<batch size>'"):
        population.tune_score(TINY, tiny_data, "60", 0.3, 0)


# --- figures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hand_made(one_seed_run):
    template, _ = one_seed_run
    config = dataclasses.replace(ONE_SEED, seeds=3)
    results = hand_results(template, [(0.01, 0.05, 0.2), (0.02, 0.04, 0.1), (0.0, 0.06, 0.3)])
    summary = population.summarize(config, results)
    return population.PopulationResult.from_seed_results(config, results, summary)


@pytest.mark.parametrize(
    "draw",
    [plots_population.plot_end_loss, plots_population.plot_lag, plots_population.plot_fit],
    ids=["end_loss", "lag", "fit"],
)
def test_plot_functions_return_a_titled_figure_with_or_without_axes(hand_made, draw):
    from matplotlib.figure import Figure

    figure = draw(hand_made)
    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    assert ax.get_title() and ax.get_xlabel() and "nats" in ax.get_ylabel()
    assert ax.get_legend() is not None
    host = Figure()
    axes = host.subplots(1, 2)
    assert draw(hand_made, ax=axes[1]) is host


def test_plot_returns_the_figures_the_summary_describes(hand_made, one_seed_run):
    template, _ = one_seed_run
    figures = population.plot(hand_made.config, {0: template}, hand_made.summary)
    assert sorted(figures) == sorted(hand_made.summary["figure_notes"])
