"""A seed's work as a list of named, independent *units* (one short training run each): the
claims experiments' shared runner plumbing.

Most claims are tested by many short runs per seed (an arm at one learning rate, one weight
scale, one batch size) rather than one long run. A unit is the grain of checkpointing: a seed's
checkpoint is the results of the units done so far, so a resumed seed runs only the units that
are missing and gives the result an uninterrupted seed would (each unit seeds its own
generators from the seed and its name, never from what ran before it).

A seed's result is ``{"seed", "seconds", "units": {name: unit result}}``; a checkpoint's state
is ``{"step", "seconds", "units"}``, ``step`` being the progress steps of the units done.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _checks as check

__all__ = [
    "Unit",
    "check_units_checkpoint",
    "check_units_result",
    "run_units",
    "unit_seed",
    "units_metric_rows",
]


@dataclass(frozen=True)
class Unit:
    """One independent piece of a seed's work.

    Attributes:
        name: Unique within the experiment's plan (``"bn/lr=0.1"``); the key of its result.
        steps: Progress steps it takes (its SGD steps; at least 1 for a measurement).
        params: What the unit runs with (arm, learning rate, ...), JSON-serialisable.
    """

    name: str
    steps: int
    params: Mapping[str, Any]


def unit_seed(seed: int, name: str) -> int:
    """A generator seed for one unit of one seed: a pure function of both (CRC-32 of the name),
    so a unit draws the same numbers whichever units ran before it."""
    return (1_000_003 * (seed + 1) + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def run_units(
    units: Sequence[Unit],
    run_unit: Callable[[Unit, Callable[[int], None]], dict],
    *,
    seed: int,
    checkpoint: Mapping[str, Any] | None,
    save_checkpoint: Callable[[dict], None] | None,
    advance: Callable[[int], None] | None,
) -> dict:
    """Run the units a checkpoint does not hold yet, checkpointing after each but the last.

    Args:
        units: The seed's plan, in order.
        run_unit: ``run_unit(unit, advance) -> dict`` (JSON-serialisable); it calls
            ``advance(n)`` as it goes, ``unit.steps`` in all.
        seed: The seed (stored in the result).
        checkpoint: A state this function saved before, or ``None``.
        save_checkpoint: Called with the state after each unit except the last.
        advance: The progress bar's callback, or ``None``.
    """
    done = dict(checkpoint["units"]) if checkpoint else {}
    seconds = float(checkpoint["seconds"]) if checkpoint else 0.0
    advance = advance or (lambda n: None)
    todo = [u for u in units if u.name not in done]
    for k, unit in enumerate(todo):
        start = time.perf_counter()
        done[unit.name] = run_unit(unit, advance)
        seconds += time.perf_counter() - start
        if save_checkpoint is not None and k < len(todo) - 1:
            steps = sum(u.steps for u in units if u.name in done)
            save_checkpoint({"step": steps, "seconds": seconds, "units": dict(done)})
    return {"seed": seed, "seconds": seconds, "units": {u.name: done[u.name] for u in units}}


def check_units_result(
    units: Sequence[Unit],
    seed: int,
    result: Any,
    check_unit: Callable[[Unit, Any, str], None],
) -> None:
    """Raise ``ValueError`` unless ``result`` is :func:`run_units`' result of this plan and seed.

    ``check_unit(unit, value, where)`` checks one unit's result (raising likewise).
    """
    where = "result"
    check.equal(check.item(result, "seed", where), seed, check.at(where, "seed"))
    check.number(check.item(result, "seconds", where), check.at(where, "seconds"), low=0.0)
    _check_units(units, check.item(result, "units", where), check_unit, complete=True)


def check_units_checkpoint(
    units: Sequence[Unit],
    state: Mapping[str, Any],
    check_unit: Callable[[Unit, Any, str], None],
) -> None:
    """Raise ``ValueError`` unless ``state`` is a checkpoint :func:`run_units` saved for this
    plan: known, complete units whose steps add up to the state's ``step``."""
    held = check.item(state, "units", "state")
    _check_units(units, held, check_unit, complete=False)
    steps = sum(u.steps for u in units if u.name in held)
    check.equal(state["step"], steps, "state['step'] (the steps of its units)")


def _check_units(
    units: Sequence[Unit], held: Any, check_unit: Callable[[Unit, Any, str], None], complete: bool
) -> None:
    where = "units"
    if not isinstance(held, Mapping):
        raise ValueError(f"expected {where} to be a dict, got {check.describe(held)}.")
    names = [u.name for u in units]
    unknown = sorted(set(held) - set(names))
    if unknown:
        raise ValueError(
            f"expected {where} to hold units of this configuration, got unknown {unknown[:3]}."
        )
    if complete:
        missing = [n for n in names if n not in held]
        if missing:
            raise ValueError(f"expected {where} to hold every unit, got {missing[:3]} missing.")
    for unit in units:
        if unit.name in held:
            check_unit(unit, held[unit.name], check.at(where, unit.name))


def units_metric_rows(
    result: Mapping[str, Any], curve_keys: Sequence[str], step_key: str = "steps"
) -> list[dict]:
    """Flat rows for ``metrics.jsonl``: per unit with a curve, one row per measured step with
    the seed, the unit's name and the values of ``curve_keys`` there (an experiment adds what
    its unit names stand for, such as the arm, itself)."""
    rows = []
    for name, unit in result["units"].items():
        curve = unit.get("curve") if isinstance(unit, Mapping) else None
        if not isinstance(curve, Mapping) or step_key not in curve:
            continue
        for i, step in enumerate(curve[step_key]):
            row = {"seed": result["seed"], "unit": name, "step": step}
            row.update({k: curve[k][i] for k in curve_keys if k in curve})
            rows.append(row)
    return rows
