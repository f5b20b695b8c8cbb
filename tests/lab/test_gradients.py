"""gradients: the measures on networks with known answers (Yang et al.'s 1.21 per layer in a wide
random ReLU + BN network, a deep sigmoid network's vanishing gradient, a linear network with
orthogonal weights), the tiny preset through the runner, resume, the checks of results and
checkpoints, the config's errors and the verdicts' direction.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import matplotlib
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab import protocol, registry, runner
from batchnorm.lab._classify import best_smoothed
from batchnorm.lab.experiments import _gradients_training as training
from batchnorm.lab.experiments import gradients
from batchnorm.lab.experiments._gradients_summary import settling
from batchnorm.lab.models import make_mlp

matplotlib.use("Agg")

TINY = gradients.PRESETS["tiny"]
ONE_SEED = dataclasses.replace(TINY, seeds=1)


@pytest.fixture(scope="module")
def tiny_data():
    return gradients.prepare(TINY)


@pytest.fixture(scope="module")
def tiny_results(tiny_data):
    return {s: gradients.run_seed(TINY, tiny_data, s) for s in range(TINY.seeds)}


def without_seconds(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


def random_batch(n: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=gen), torch.randint(0, 10, (n,), generator=gen)


# --- the measures, on networks with known answers ---------------------------------------------


def test_yang_growth_of_1_21_per_layer_appears_in_a_wide_random_relu_bn_network():
    # Yang et al. 2019: sqrt(pi / (pi - 1)) = 1.2112 per layer in the limit of large width and
    # batch. At width and batch 512 and 16 layers the fit lands within 0.02 of it (measured
    # 1.205 and 1.210 on two seeds at 20 layers); the tolerance is 0.03.
    assert gradients.YANG_RATE == pytest.approx(1.2112, abs=1e-4)
    net = make_mlp(
        64,
        10,
        hidden=512,
        depth=16,
        activation="relu",
        norm="batchnorm",
        init="he",
        generator=torch.Generator().manual_seed(0),
    )
    norms = gradients.layer_gradient_norms(net, *random_batch(512, 64, 0))
    assert len(norms) == 16
    assert gradients.growth_rate(norms) == pytest.approx(gradients.YANG_RATE, abs=0.03)
    assert gradients.first_last_ratio(norms) > 5.0  # grows towards the input


def test_deep_sigmoid_network_without_bn_has_shrinking_gradients():
    net = make_mlp(
        40,
        10,
        hidden=64,
        depth=12,
        activation="sigmoid",
        init="glorot",
        generator=torch.Generator().manual_seed(1),
    ).double()
    norms = gradients.layer_gradient_norms(net, *random_batch(128, 40, 1))
    # sigmoid' <= 1/4, ~0.24 at these pre-activations: a factor ~4 lost per layer.
    assert all(a < b for a, b in zip(norms[1:-1], norms[2:], strict=False))
    assert gradients.growth_rate(norms) < 0.3
    assert gradients.first_last_ratio(norms) < 1e-5


def test_linear_network_with_orthogonal_weights_has_growth_one():
    # dL/dW_l = Q_{l+1}^T (dL/dW_{l+1}) Q_l^T between square orthogonal layers: equal norms.
    width, depth = 32, 8
    net = make_mlp(width, 10, hidden=width, depth=depth, activation="relu").double()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i in range(1, depth + 1):
            setattr(net, f"act{i}", nn.Identity())
            q, _ = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))
            net.get_submodule(f"fc{i}").weight.copy_(q)
            net.get_submodule(f"fc{i}").bias.zero_()
    net = net.double()
    norms = gradients.layer_gradient_norms(net, *random_batch(64, width, 2))
    assert gradients.growth_rate(norms) == pytest.approx(1.0, abs=1e-9)
    assert gradients.first_last_ratio(norms) == pytest.approx(1.0, abs=1e-9)


def test_growth_rate_recovers_a_geometric_profile_and_ignores_the_boundary_layers():
    depth, rate = 10, 1.3
    norms = [rate ** (depth - layer) for layer in range(1, depth + 1)]
    norms[0], norms[-1] = 1e-3, 1e3  # boundary layers do not enter the fit
    assert gradients.growth_rate(norms) == pytest.approx(rate, rel=1e-12)
    assert gradients.first_last_ratio(norms) == pytest.approx(1e-6)
    assert gradients.growth_rate([1.0, 2.0, 3.0]) is None  # one interior layer
    assert gradients.growth_rate([1.0, 2.0, 0.0, 3.0]) is None
    assert gradients.growth_rate([1.0, 2.0, None, 3.0]) is None
    assert gradients.first_last_ratio([0.0, 1.0]) is None
    assert gradients.first_last_ratio([1.0, None]) is None


def test_layer_gradient_norms_are_the_hidden_weights_gradient_norms():
    net = make_mlp(40, 10, hidden=8, depth=4, activation="relu", norm="batchnorm", init="he")
    x, y = random_batch(16, 40, 3)
    norms = gradients.layer_gradient_norms(net, x, y)
    twin = copy.deepcopy(net)
    twin.zero_grad()
    nn.functional.cross_entropy(twin(x), y).backward()
    want = [twin.get_submodule(f"fc{i}").weight.grad.norm().item() for i in range(1, 5)]
    assert norms == pytest.approx(want, rel=1e-6)


# --- the experiment end to end ----------------------------------------------------------------


def test_tiny_preset_runs_through_the_runner_and_replots(tmp_path):
    run_dir = batchnorm.lab.run_experiment("gradients", preset="tiny", out=tmp_path, verbose=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = sorted(p.stem for p in (run_dir / "figures").glob("*.png"))
    assert figures == sorted(summary["figure_notes"]) == ["growth", "profile", "training"]
    assert [c["key"] for c in summary["claims"]] == [r.key for r in gradients.RULES]
    assert summary["experiment"] == "gradients" and summary["seeds"] == [0, 1]
    report = (run_dir / "summary.md").read_text()
    assert "At initialization" in report and "not for the record" in report
    assert ("Did not hold" in report) != ("Every claim held" in report)
    replotted = sorted(p.stem for p in runner.plot_run(run_dir, verbose=False))
    assert replotted == figures
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    init_rows = [r for r in rows if r["unit"].startswith("init/") and "grad_norm" in r]
    per_seed = sum(len(TINY.batch_sizes) * 4 * d for d in TINY.depths)
    assert len(init_rows) == 2 * per_seed


def test_plan_and_result_hold_every_measurement_and_training_arm(tiny_results):
    names = [u.name for u in gradients.plan(TINY)]
    assert names[0] == "init/sigmoid/none/d4/b8"
    assert names[-4:] == [f"train/{arm}" for arm in gradients.ARMS]
    assert len(names) == 2 * 2 * 2 * 2 + 4
    result = tiny_results[0]
    unit = result["units"]["init/relu/batchnorm/d6/b32"]
    assert len(unit["norms"]) == 6 and unit["growth"] > 0
    trained = result["units"]["train/relu/batchnorm"]
    assert trained["updates"] == TINY.record_updates() == [0, 5, 10, 15, 19]
    assert len(trained["norms"]) == 5 and len(trained["norms"][0]) == TINY.train_depth
    gradients.check_result(TINY, 0, result)


def test_networks_with_and_without_bn_start_from_the_same_weights(tiny_data):
    plain = training._model(tiny_data, "relu", "none", 4, 16, 9)
    bn = training._model(tiny_data, "relu", "batchnorm", 4, 16, 9)
    for i in range(1, 5):
        assert torch.equal(plain.get_submodule(f"fc{i}").weight, bn.get_submodule(f"fc{i}").weight)


def test_run_seed_resumed_from_a_checkpoint_equals_an_uninterrupted_run(tiny_data):
    saved = []
    full = gradients.run_seed(ONE_SEED, tiny_data, 0, save_checkpoint=saved.append)
    assert len(saved) == len(gradients.plan(TINY)) - 1
    middle = saved[16]  # every measurement at init and the first training arm done
    assert middle["step"] == 16 + TINY.train_steps
    gradients.check_checkpoint(ONE_SEED, tiny_data, 0, middle)
    resumed = gradients.run_seed(ONE_SEED, tiny_data, 0, checkpoint=middle)
    assert without_seconds(resumed) == without_seconds(full)


def test_check_result_and_checkpoint_refuse_damage_naming_the_entry(tiny_data, tiny_results):
    result = copy.deepcopy(tiny_results[1])
    result["units"]["init/relu/batchnorm/d6/b32"]["norms"].pop()
    with pytest.raises(ValueError, match=r"units\['init/relu/batchnorm/d6/b32'\]\['norms'\]"):
        gradients.check_result(TINY, 1, result)
    result = copy.deepcopy(tiny_results[1])
    result["units"]["train/sigmoid/none"]["updates"] = [0, 5]
    with pytest.raises(ValueError, match=r"units\['train/sigmoid/none'\]\['updates'\]"):
        gradients.check_result(TINY, 1, result)
    result = copy.deepcopy(tiny_results[1])
    result["units"]["train/relu/none"]["lr"] = 9.0
    with pytest.raises(ValueError, match=r"units\['train/relu/none'\]\['lr'\] to be"):
        gradients.check_result(TINY, 1, result)
    result = copy.deepcopy(tiny_results[1])
    del result["units"]["init/sigmoid/none/d4/b8"]
    with pytest.raises(ValueError, match=r"to hold every unit, got \['init/sigmoid/none/d4/b8'\]"):
        gradients.check_result(TINY, 1, result)
    state = {"step": 1, "seconds": 0.1, "units": {"init/tanh/none/d4/b8": {}}}
    with pytest.raises(ValueError, match=r"got unknown \['init/tanh/none/d4/b8'\]"):
        gradients.check_checkpoint(TINY, tiny_data, 0, state)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("depths", (6, 4), r"GradientsConfig\(\): expected depths distinct ints >= 4 in ascending"),
        ("depths", (3, 6), r"expected depths distinct ints >= 4"),
        ("batch_sizes", (8, 8), r"expected batch_sizes distinct ints >= 2"),
        ("train_steps", 1, r"expected train_steps an int >= 2"),
        ("width", 1, r"expected width an int >= 2"),
        ("dataset", "cifar", r"expected dataset one of"),
        ("lrs", {"relu/none": 0.1}, r"expected lrs a learning rate > 0 for each of"),
        ("record_every", 0.5, r"expected record_every an int"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **{field: value})


def test_config_reads_lists_back_as_tuples_and_learning_rates_from_the_tuned_file(
    tmp_path, monkeypatch
):
    again = gradients.GradientsConfig(**{**dataclasses.asdict(TINY), "depths": [4, 6]})
    assert again == TINY
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"gradients": {"arms": {"relu/batchnorm": {"lr": 0.7}}}}))
    monkeypatch.setattr(protocol, "TUNED_FILE", tuned)
    config = dataclasses.replace(TINY, lrs=None)
    assert config.lrs["relu/batchnorm"] == 0.7 and config.lrs["relu/none"] == gradients.DEFAULT_LR


def test_prepare_refuses_a_batch_larger_than_the_training_set():
    with pytest.raises(ValueError, match=r"expected batch_sizes <= 1238"):
        gradients.prepare(dataclasses.replace(TINY, batch_sizes=(8, 5000)))


# --- verdicts ---------------------------------------------------------------------------------


def _geometric(results: dict, profiles: dict[str, float], seeds: int = 5) -> dict:
    """Five seeds copied from the tiny results, the init norms of each arm in ``profiles``
    replaced by an exact ``rate ** (D - l)`` profile (ratio and growth recomputed)."""
    out = {}
    for s in range(seeds):
        result = copy.deepcopy(results[s % len(results)])
        result["seed"] = s
        for name, unit in result["units"].items():
            parts = name.split("/")
            if parts[0] != "init" or f"{parts[1]}/{parts[2]}" not in profiles:
                continue
            rate, depth = profiles[f"{parts[1]}/{parts[2]}"], int(parts[3][1:])
            unit["norms"] = [rate ** (depth - layer) for layer in range(1, depth + 1)]
            unit["ratio"] = gradients.first_last_ratio(unit["norms"])
            unit["growth"] = gradients.growth_rate(unit["norms"])
        out[s] = result
    return out


def test_summarize_verdicts_flip_when_the_arms_data_are_swapped(tiny_results):
    config = dataclasses.replace(TINY, seeds=5)
    # Depth 6: a rate of 2 per layer is 2^5 = 32 between the first and last layer (1.5 decades).
    as_yang = _geometric(tiny_results, {"relu/none": 1.0, "relu/batchnorm": 2.0})
    swapped = _geometric(tiny_results, {"relu/none": 2.0, "relu/batchnorm": 1.0})
    first = {c["key"]: c for c in gradients.summarize(config, as_yang)["claims"]}
    second = {c["key"]: c for c in gradients.summarize(config, swapped)["claims"]}
    assert first["yang_relu_explodes"]["verdict"] == "held"
    assert first["yang_relu_explodes"]["mean"] == pytest.approx(2.0)
    assert second["yang_relu_explodes"]["verdict"] == "not held"
    assert first["bn_prevents_explosion"]["verdict"] == "not held"
    assert second["bn_prevents_explosion"]["verdict"] == "held"
    assert first["bn_evens_relu"]["mean"] == pytest.approx(-math.log10(32))
    assert (first["bn_evens_relu"]["verdict"], second["bn_evens_relu"]["verdict"]) == (
        "not held",
        "held",
    )
    # The sigmoid rules likewise: vanishing without BN, none with it, and swapped.
    sig = _geometric(tiny_results, {"sigmoid/none": 0.25, "sigmoid/batchnorm": 1.0})
    sig_swapped = _geometric(tiny_results, {"sigmoid/none": 1.0, "sigmoid/batchnorm": 0.25})
    a = {c["key"]: c["verdict"] for c in gradients.summarize(config, sig)["claims"]}
    b = {c["key"]: c["verdict"] for c in gradients.summarize(config, sig_swapped)["claims"]}
    assert (a["sigmoid_vanishes"], a["bn_removes_vanishing"]) == ("held", "held")
    assert (b["sigmoid_vanishes"], b["bn_removes_vanishing"]) == ("not held", "not held")
    report = "\n".join(gradients.summarize(config, as_yang)["report"])
    assert "Did not hold:" in report and "bn_prevents_explosion (not held)" in report
    json.dumps(gradients.summarize(config, swapped), allow_nan=False)


def test_settling_compares_update_0_with_the_second_half_of_training():
    config = dataclasses.replace(TINY, train_steps=20, record_every=5)
    unit = {"updates": [0, 5, 10, 15, 19], "norms": [[100.0, 1.0], [10, 1], [1, 1], [3, 1], [1, 2]]}
    start, late = settling(config, unit)
    assert start == pytest.approx(2.0)
    # updates >= 10: |log10| of 1, 3 and 1/2 -> median log10(2)
    assert late == pytest.approx(math.log10(2.0))


def test_registry_entry_declares_the_rules_and_the_tuning(tiny_data):
    entry = registry.EXPERIMENTS["gradients"]
    assert entry.rules is gradients.RULES
    assert [(r.key, r.threshold) for r in entry.rules] == [
        ("sigmoid_vanishes", 2.0),
        ("bn_removes_vanishing", -1.0),
        ("yang_relu_explodes", 1.1),
        ("bn_prevents_explosion", -1.0),
        ("bn_evens_relu", 0.5),
        ("yang_settles", 0.5),
    ]
    assert all(r.agree == 0.8 for r in entry.rules)
    assert entry.tuning.arms(TINY) == [
        "sigmoid/none",
        "sigmoid/batchnorm",
        "relu/none",
        "relu/batchnorm",
    ]
    for name in ("quick", "full"):
        assert gradients.PRESETS[name].seeds == 5 and gradients.PRESETS[name].depths == (10, 30, 50)
    score = gradients.tune_score(TINY, tiny_data, "relu/batchnorm", 0.1, seed=0)
    run = training._train(TINY, tiny_data, 0, "relu", "batchnorm", 0.1)["run"]
    assert score == best_smoothed(run["curve"]["val_accuracy"], TINY.smooth)
