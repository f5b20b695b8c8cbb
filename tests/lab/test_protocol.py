"""The lab's protocol: verdicts from per-seed effects, the sign test, the tuned file."""

from __future__ import annotations

import math

import pytest

from batchnorm.lab import protocol
from batchnorm.lab.protocol import Rule

RULE = Rule(key="k", claim="c", anchor="a", measure="m", unit="x", threshold=1.25)


@pytest.mark.parametrize(
    ("effects", "verdict", "above"),
    [
        ([2.0, 2.0, 2.0, 2.0, 2.0], "held", 5),
        ([2.0, 2.0, 2.0, 2.0, 1.0], "held", 4),  # 4 of 5 is enough
        ([2.0, 2.0, 2.0, 1.0, 1.0], "inconclusive", 3),
        ([1.25, 1.0, 1.0, 1.0, 2.0], "not held", 1),  # at the threshold is not above it
        ([1.0] * 5, "not held", 0),
    ],
)
def test_verdict_follows_the_agreement_rule(effects, verdict, above):
    result = RULE.judge(effects)
    assert result.verdict == verdict and result.above == above and result.needed == 4


def test_fewer_seeds_than_the_record_needs_are_inconclusive_unless_unanimous():
    assert RULE.judge([2.0, 2.0]).verdict == "held"
    assert RULE.judge([2.0, 2.0, 2.0, 1.0]).verdict == "inconclusive"  # 4 seeds, 3 above
    assert RULE.judge([1.0, 1.0, 1.0]).verdict == "not held"
    assert not RULE.judge([2.0, 2.0]).for_record and RULE.judge([2.0] * 5).for_record


def test_missing_effects_are_counted_and_left_out():
    result = RULE.judge([2.0, None, 2.0, math.nan, 2.0, 2.0, 2.0])
    assert result.missing == 2 and result.seeds == 5 and result.verdict == "held"
    with pytest.raises(ValueError, match="expected finite effects, got none"):
        RULE.judge([None, math.nan])


def test_sign_test_p_values_by_hand():
    # 5 of 5: 2 * (1/32) = 0.0625; 4 of 5: 2 * (1 + 5)/32 = 0.375; 0 of 0: 1.
    assert protocol.sign_test_p(5, 0) == pytest.approx(0.0625)
    assert protocol.sign_test_p(4, 1) == pytest.approx(0.375)
    assert protocol.sign_test_p(1, 4) == pytest.approx(0.375)
    assert protocol.sign_test_p(0, 0) == 1.0


def test_verdict_row_carries_the_rule_and_the_numbers():
    row = RULE.judge([2.0, 3.0, 2.0, 2.0, 1.0]).to_dict(measured="words")
    assert row["claim"] == "c" and row["threshold"] == 1.25 and row["measured"] == "words"
    assert row["mean"] == pytest.approx(2.0) and row["verdict"] == "held" and row["held"]
    assert row["per_seed"] == [2.0, 3.0, 2.0, 2.0, 1.0] and row["seeds"] == 5


def test_rule_rejects_a_meaningless_agreement():
    with pytest.raises(ValueError, match=r"expected agree in \(0.5, 1\], got 0.5"):
        Rule(key="k", claim="c", anchor="a", measure="m", unit="x", threshold=0.0, agree=0.5)


def test_bracketing_grid_extends_past_the_edge_with_the_best_score():
    grid = [0.1, 0.3, 1.0]
    assert protocol.bracketing_grid(grid, [0.5, 0.9, 0.7], 3.0) is None
    assert protocol.bracketing_grid(grid, [0.9, 0.5, 0.1], 3.0) == pytest.approx(0.1 / 3)
    assert protocol.bracketing_grid(grid, [0.1, 0.5, 0.9], 3.0) == pytest.approx(3.0)
    # A diverged (NaN) point never wins.
    assert protocol.bracketing_grid(grid, [0.5, 0.9, math.nan], 3.0) is None


def test_tuned_file_round_trip_keeps_other_experiments(tmp_path):
    path = tmp_path / "tuned.json"
    assert protocol.read_tuned(path) == {}
    protocol.write_tuned("a", {"arms": {"x": {"lr": 0.3}}}, path)
    protocol.write_tuned("b", {"arms": {"y": {"lr": 1.0}}}, path)
    assert protocol.read_tuned(path) == {
        "a": {"arms": {"x": {"lr": 0.3}}},
        "b": {"arms": {"y": {"lr": 1.0}}},
    }


def test_tuned_value_reads_the_package_file_or_falls_back(monkeypatch, tmp_path):
    path = tmp_path / "tuned.json"
    protocol.write_tuned("figure1", {"arms": {"bn/paper": {"lr": 0.7}}}, path)
    monkeypatch.setattr(protocol, "TUNED_FILE", path)
    assert protocol.tuned_value("figure1", "bn/paper", "lr", 9.0) == 0.7
    assert protocol.tuned_value("figure1", "bn/glorot", "lr", 9.0) == 9.0
    assert protocol.tuned_value("other", "bn/paper", "lr", 9.0) == 9.0


def test_tuning_seed_is_never_an_evaluation_seed():
    from batchnorm.lab.registry import EXPERIMENTS

    for experiment in EXPERIMENTS.values():
        for config in experiment.presets.values():
            assert protocol.TUNING_SEED >= config.seeds


def test_judge_rules_keeps_the_rules_order_and_leaves_out_what_was_not_measured():
    from batchnorm.lab.protocol import judge_rules, verdict_line

    rules = (
        Rule(key="a", claim="A", anchor="x", measure="m", unit="x", threshold=1.0),
        Rule(key="b", claim="B", anchor="x", measure="m", unit="x", threshold=1.0),
        Rule(key="c", claim="C", anchor="x", measure="m", unit="x", threshold=1.0),
    )
    rows = judge_rules(
        rules, {"c": [2, 2, 2, 2, 2], "a": [0, 0, 0, 0, 0], "b": [None]}, {"a": "said"}
    )
    assert [r["key"] for r in rows] == ["a", "c"]
    assert rows[0]["verdict"] == "not held" and rows[0]["measured"] == "said"
    assert rows[1]["verdict"] == "held"
    assert verdict_line(rows[1]).startswith("HELD: C")
