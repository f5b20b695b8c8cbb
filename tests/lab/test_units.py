"""_units: a seed as named units, checkpointed after each, resumed to the same result."""

from __future__ import annotations

import pytest

from batchnorm.lab._units import (
    Unit,
    check_units_checkpoint,
    check_units_result,
    run_units,
    unit_seed,
    units_metric_rows,
)

PLAN = [Unit("a", 2, {"lr": 0.1}), Unit("b", 3, {"lr": 0.3}), Unit("c", 1, {"lr": 1.0})]


def _run_unit(unit, advance):
    advance(unit.steps)
    return {"value": unit.params["lr"] * 10, "curve": {"steps": [0, 1], "loss": [2.0, 1.0]}}


def _check_unit(unit, value, where):
    if not isinstance(value, dict) or value.get("value") != unit.params["lr"] * 10:
        raise ValueError(
            f"expected {where}['value'] to be {unit.params['lr'] * 10}, got {value!r}."
        )


def test_runs_every_unit_in_order_checkpointing_between_and_counting_steps():
    saved, advanced = [], []
    result = run_units(
        PLAN,
        _run_unit,
        seed=3,
        checkpoint=None,
        save_checkpoint=saved.append,
        advance=advanced.append,
    )
    assert list(result["units"]) == ["a", "b", "c"] and result["seed"] == 3
    assert [s["step"] for s in saved] == [2, 5]  # none after the last unit
    assert [list(s["units"]) for s in saved] == [["a"], ["a", "b"]]
    assert sum(advanced) == 6
    check_units_result(PLAN, 3, result, _check_unit)
    for state in saved:
        check_units_checkpoint(PLAN, state, _check_unit)


def test_resume_from_each_checkpoint_runs_only_the_missing_units_and_gives_the_same_units():
    saved = []
    whole = run_units(
        PLAN, _run_unit, seed=0, checkpoint=None, save_checkpoint=saved.append, advance=None
    )
    for state in saved:
        ran = []

        def counting(unit, advance, ran=ran):
            ran.append(unit.name)
            return _run_unit(unit, advance)

        resumed = run_units(
            PLAN, counting, seed=0, checkpoint=state, save_checkpoint=None, advance=None
        )
        assert resumed["units"] == whole["units"]
        assert ran == [u.name for u in PLAN if u.name not in state["units"]]


def test_unit_seed_depends_on_seed_and_name_only():
    assert unit_seed(0, "a") == unit_seed(0, "a")
    assert len({unit_seed(s, n) for s in (0, 1) for n in ("a", "b")}) == 4


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda r: r.update(seed=1), r"result\['seed'\]"),
        (lambda r: r["units"].pop("b"), "every unit"),
        (lambda r: r["units"].update(z={}), "unknown"),
        (lambda r: r["units"]["a"].update(value=0), r"units\['a'\]"),
        (lambda r: r.pop("seconds"), "seconds"),
    ],
)
def test_check_result_names_what_is_wrong(damage, match):
    result = run_units(PLAN, _run_unit, seed=0, checkpoint=None, save_checkpoint=None, advance=None)
    damage(result)
    with pytest.raises(ValueError, match=match):
        check_units_result(PLAN, 0, result, _check_unit)


def test_check_checkpoint_refuses_a_step_that_does_not_match_its_units():
    saved = []
    run_units(PLAN, _run_unit, seed=0, checkpoint=None, save_checkpoint=saved.append, advance=None)
    state = dict(saved[0], step=4)
    with pytest.raises(ValueError, match="step"):
        check_units_checkpoint(PLAN, state, _check_unit)


def test_metric_rows_flatten_curves():
    result = run_units(PLAN, _run_unit, seed=2, checkpoint=None, save_checkpoint=None, advance=None)
    rows = units_metric_rows(result, ["loss"])
    assert len(rows) == 6
    assert rows[0] == {"seed": 2, "unit": "a", "step": 0, "loss": 2.0}
