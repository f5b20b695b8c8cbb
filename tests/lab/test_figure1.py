"""figure1: determinism, the stability number and the honesty of the summary, the plots.

The summary tests use hand-made results whose numbers are worked out in comments, so the
verdicts are checked against arithmetic, not against the code's own output.
"""

from __future__ import annotations

import dataclasses

import matplotlib
import numpy as np
import pytest

from batchnorm.lab import plots
from batchnorm.lab.experiments import figure1
from batchnorm.monitor import ActivationTrace

matplotlib.use("Agg")

TINY = dataclasses.replace(figure1.PRESETS["tiny"], seeds=1, steps=20)


@pytest.fixture(scope="module")
def tiny_data():
    return figure1.prepare(TINY)


def test_run_seed_is_deterministic_for_a_seed(tiny_data):
    first = figure1.run_seed(TINY, tiny_data, 3)
    second = figure1.run_seed(TINY, tiny_data, 3)
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    other = figure1.run_seed(TINY, tiny_data, 4)
    assert other["networks"]["bn"]["test_accuracy"] != first["networks"]["bn"]["test_accuracy"]


def test_run_seed_measures_at_step_0_every_eval_and_the_end(tiny_data):
    config = dataclasses.replace(TINY, steps=25, eval_every=10, checkpoint_every=10)
    saved, advanced = [], []
    result = figure1.run_seed(
        config, tiny_data, 0, save_checkpoint=saved.append, advance=advanced.append
    )
    for name in figure1.NETWORKS:
        net = result["networks"][name]
        assert net["steps"] == [0, 10, 20, 25]
        assert net["trace"]["steps"] == [0, 10, 20, 25]
        assert np.asarray(net["trace"]["quantiles"]).shape == (4, config.hidden, 3)
        assert net["train_loss"][0] is None and all(v > 0 for v in net["train_loss"][1:])
    assert [c["step"] for c in saved] == [10, 20]
    assert sum(advanced) == 25


def test_run_seed_pins_and_restores_threads(tiny_data):
    import numba
    import torch

    before = torch.get_num_threads(), numba.get_num_threads()
    seen = []
    figure1.run_seed(
        dataclasses.replace(TINY, threads=1),
        tiny_data,
        0,
        advance=lambda n: seen.append((torch.get_num_threads(), numba.get_num_threads())),
    )
    assert set(seen) == {(1, 1)}  # also after the probe passes, which launch Numba kernels
    assert (torch.get_num_threads(), numba.get_num_threads()) == before


def test_probe_forward_leaves_bn_buffers_untouched():
    import torch

    from batchnorm.lab.models import make_mlp

    model = make_mlp(4, 2, hidden=3, depth=2, norm="batchnorm")
    model(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))  # non-trivial buffers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    figure1._probe_forward(model, torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def hand_result(seed, acc_base, acc_bn, q_base, q_bn):
    """A run_seed-shaped result at steps 0, 10, 20 with 2 units and 3 levels.

    q_* is a list of 3 values per step; every unit and level gets that value.
    """

    def trace(values):
        quantiles = np.repeat(np.asarray(values, float)[:, None, None], 2, 1).repeat(3, 2)
        t = ActivationTrace(
            layer="act3",
            where="input",
            per="unit",
            quantile_levels=(0.15, 0.5, 0.85),
            steps=np.array([0, 10, 20]),
            count=np.array([50, 50, 50]),
            quantiles=quantiles,
            mean=quantiles[..., 1],
            std=np.ones((3, 2)),
            saturated=np.zeros((3, 2)),
        )
        return t.to_dict()

    def net(acc, q):
        return {
            "steps": [0, 10, 20],
            "test_accuracy": acc,
            "test_loss": [2.3, 2.0, 1.9],
            "train_loss": [None, 2.1, 1.9],
            "trace": trace(q),
        }

    return {
        "seed": seed,
        "unit": 0,
        "seconds": 1.0,
        "networks": {"baseline": net(acc_base, q_base), "bn": net(acc_bn, q_bn)},
    }


CONFIG = dataclasses.replace(TINY, seeds=2, steps=20, eval_every=10, checkpoint_every=20, hidden=2)


def test_summary_says_claims_did_not_hold_when_bn_is_worse():
    # Final accuracies: baseline 0.8, 0.7 (mean 0.75); bn 0.5, 0.6 (mean 0.55): BN lower.
    # Percentile ranges: baseline constant (range 0); bn 0 -> 2 -> 1 (range 2): BN less stable.
    results = {
        0: hand_result(0, [0.1, 0.5, 0.8], [0.1, 0.3, 0.5], [0, 0, 0], [0, 2, 1]),
        1: hand_result(1, [0.1, 0.5, 0.7], [0.1, 0.3, 0.6], [1, 1, 1], [0, 2, 1]),
    }
    summary = figure1.summarize(CONFIG, results)
    accuracy, stability = summary["claims"]
    assert accuracy["held"] is False and accuracy["seeds_held"] == 0
    assert accuracy["baseline"] == pytest.approx(0.75) and accuracy["bn"] == pytest.approx(0.55)
    assert stability["held"] is False and stability["seeds_held"] == 0
    assert stability["baseline"] == 0.0 and stability["bn"] == 2.0
    # Baseline final 0.8 / 0.7 is never reached by bn (max 0.5 / 0.6).
    assert summary["steps_to_match"] == [None, None]
    report = "\n".join(summary["report"])
    assert report.count("DID NOT HOLD:") == 2
    assert "reached the baseline's final accuracy in 0 of 2 seeds." in report


def test_summary_says_claims_held_when_bn_is_better_and_counts_seeds():
    # Seed 0: bn better on both; seed 1: bn's accuracy lower (0.4 < 0.5) but still stabler.
    # Means: accuracy baseline 0.45 vs bn 0.6 (held, 1 of 2 seeds); range 3 vs 1 (2 of 2).
    # Warm-up is the first 10 % of 20 steps = 2, so the late range uses steps 10 and 20:
    # baseline |3 - 0| = 3, bn |1 - 0| = 1 (seed 0 and 1 alike).
    results = {
        0: hand_result(0, [0.1, 0.2, 0.4], [0.1, 0.5, 0.8], [0, 3, 0], [0, 1, 0]),
        1: hand_result(1, [0.1, 0.2, 0.5], [0.1, 0.5, 0.4], [0, 3, 0], [0, 1, 0]),
    }
    summary = figure1.summarize(CONFIG, results)
    accuracy, stability = summary["claims"]
    assert accuracy["held"] is True and accuracy["seeds_held"] == 1
    assert stability["held"] is True and stability["seeds_held"] == 2
    assert summary["percentile_range_after_warmup"]["baseline"]["mean"] == 3.0
    assert summary["percentile_range_after_warmup"]["bn"]["mean"] == 1.0
    # bn reaches 0.4 at step 10 (0.5 >= 0.4) and 0.5 at step 10 (0.5 >= 0.5).
    assert summary["steps_to_match"] == [10, 10]
    assert "\n".join(summary["report"]).count("HELD:") == 2
    assert "DID NOT HOLD" not in "\n".join(summary["report"])


def test_percentile_range_is_max_minus_min_per_unit_and_level():
    trace = ActivationTrace.from_dict(
        hand_result(0, [0] * 3, [0] * 3, [0, 0, 0], [1, -2, 0.5])["networks"]["bn"]["trace"]
    )
    np.testing.assert_array_equal(figure1.percentile_range(trace), np.full((2, 3), 3.0))
    np.testing.assert_array_equal(figure1.percentile_range(trace, 10), np.full((2, 3), 2.5))


def test_metric_rows_flatten_steps_and_percentiles():
    rows = figure1.metric_rows(hand_result(0, [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0, 1, 2], [0] * 3))
    assert len(rows) == 6
    assert rows[2] == {
        "seed": 0,
        "network": "baseline",
        "step": 20,
        "test_accuracy": 0.3,
        "test_loss": 1.9,
        "train_loss": 1.9,
        "p15": 2.0,
        "p50": 2.0,
        "p85": 2.0,
        "saturated": 0.0,
    }


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of eval_every"):
        figure1.Figure1Config(eval_every=30, checkpoint_every=100)
    with pytest.raises(ValueError, match=r"expected dataset one of .*got 'cifar'"):
        figure1.Figure1Config(dataset="cifar")
    with pytest.raises(ValueError, match=r"expected unit an int in \[0, 100\), got 100"):
        figure1.Figure1Config(unit=100)


def test_prepare_rejects_probe_larger_than_training_set():
    with pytest.raises(ValueError, match=r"expected probe_size <= 1438"):
        figure1.prepare(dataclasses.replace(TINY, probe_size=5000))


def test_paper_preset_is_the_papers_setup():
    paper = figure1.PRESETS["paper"]
    assert (paper.steps, paper.batch_size, paper.hidden, paper.depth) == (50_000, 60, 100, 3)
    assert paper.quantiles == (0.15, 0.5, 0.85)
    quick = figure1.PRESETS["quick"]
    assert (
        dataclasses.replace(
            quick,
            steps=paper.steps,
            eval_every=paper.eval_every,
            checkpoint_every=paper.checkpoint_every,
        )
        == paper
    )


@pytest.fixture(scope="module")
def hand_made():
    results = {
        0: hand_result(0, [0.1, 0.2, 0.4], [0.1, 0.5, 0.8], [0, 3, 0], [0, 1, 0]),
        1: hand_result(1, [0.1, 0.2, 0.5], [0.1, 0.5, 0.4], [0, 3, 0], [0, 1, 0]),
    }
    summary = figure1.summarize(CONFIG, results)
    return figure1.Figure1Result.from_seed_results(CONFIG, results, summary)


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
    assert "Claim: BN trains faster" in figure._suptitle.get_text()
    colors = {line.get_color() for line in c.get_lines()}
    assert colors == {plots.COLORS["bn"]}


def test_plot_percentiles_rejects_unknown_network(hand_made):
    with pytest.raises(ValueError, match=r"expected network in \['baseline', 'bn'\]"):
        plots.plot_percentiles(hand_made, "relu")
