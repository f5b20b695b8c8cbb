r"""The lab's protocol: what makes a measured difference a verdict, declared before any result.

Every experiment states its claims as :class:`Rule` objects in its own module (``RULES``),
committed before the commit with the experiment's first results, so that nobody, including us,
can pick the bar after seeing where the numbers fell. A rule names

- the claim in words and its published anchor (where the claim was made);
- the measured number, one per seed: an *effect* signed so that larger favours the claim
  (e.g. ``steps_without_bn / steps_with_bn - 1``, or ``loss_ema - loss_exact + margin``);
- a threshold the effect must pass, and the share of seeds that must agree.

:meth:`Rule.judge` turns the per-seed effects into a :class:`Verdict`:

- **held** if at least :math:`k = \lceil \text{agree} \cdot n \rceil` of the :math:`n` seeds
  have an effect above the threshold;
- **not held** if at least :math:`k` seeds have an effect at or below it;
- **inconclusive** otherwise (the seeds disagree), and always when fewer than
  :data:`MIN_SEEDS_FOR_RECORD` seeds ran *and* the seeds do not all agree. A verdict of fewer
  seeds than that is printed with the number of seeds, so a tiny or quick run is never read as
  the record.

The sign test's two-sided p-value of "the effect is above the threshold as often as below it"
is reported next to each verdict: with 5 seeds, 5 of 5 gives p = 0.0625, the smallest there is,
which is why the rules ask for agreement rather than a p-value below 0.05.

Seeds. Evaluation seeds are ``0 .. seeds - 1``; tuning uses :data:`TUNING_SEED`, which no
preset reports. Hyper-parameters chosen by ``batchnorm lab tune`` are read from
:data:`TUNED_FILE` (committed with the code) by the presets; the presets never tune.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MIN_SEEDS_FOR_RECORD",
    "TUNED_FILE",
    "TUNING_SEED",
    "VERDICTS",
    "Rule",
    "Verdict",
    "bracketing_grid",
    "judge_rules",
    "read_tuned",
    "sign_test_p",
    "tuned_value",
    "verdict_line",
    "write_tuned",
]

# The seed tuning runs on. Evaluation seeds count up from 0, so this one is never reported.
TUNING_SEED = 10_007
# A verdict for the record needs at least this many seeds (the brief: >= 5).
MIN_SEEDS_FOR_RECORD = 5
VERDICTS = ("held", "not held", "inconclusive")
# Hyper-parameters chosen by `batchnorm lab tune`, committed with the code.
TUNED_FILE = Path(__file__).with_name("tuned.json")


def sign_test_p(above: int, below: int) -> float:
    """Two-sided sign-test p-value of ``above`` successes in ``above + below`` fair coin flips
    (ties are left out, as the sign test does)."""
    n = above + below
    if n == 0:
        return 1.0
    k = min(above, below)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class Rule:
    """One claim's pass rule.

    Args:
        key: A short identifier, unique within the experiment (``"speed"``).
        claim: The claim in words, as the claims table prints it.
        anchor: Where it was published (paper, section or figure).
        measure: What one seed's effect is, in words, with its sign convention.
        unit: The effect's unit, for the table (``"x"``, ``"pp"``, ``"nats"``, ...).
        threshold: The effect must be above this in a seed for that seed to count for the
            claim.
        agree: The share of seeds that must agree (0.8: 4 of 5).
    """

    key: str
    claim: str
    anchor: str
    measure: str
    unit: str
    threshold: float
    agree: float = 0.8

    def __post_init__(self) -> None:
        if not 0.5 < self.agree <= 1.0:
            raise ValueError(f"Rule({self.key!r}): expected agree in (0.5, 1], got {self.agree!r}.")
        if not math.isfinite(self.threshold):
            raise ValueError(
                f"Rule({self.key!r}): expected a finite threshold, got {self.threshold!r}."
            )

    def needed(self, n_seeds: int) -> int:
        """Seeds that must agree out of ``n_seeds``."""
        return max(1, math.ceil(self.agree * n_seeds - 1e-9))

    def judge(self, effects: Sequence[float | None]) -> Verdict:
        """The verdict on per-seed effects (larger favours the claim).

        A ``None`` or non-finite effect (e.g. a target never reached) counts against the
        claim only if the experiment maps it to a number; here it is left out and reported.

        Raises:
            ValueError: If no seed has a finite effect.
        """
        values = [float(e) for e in effects if e is not None and math.isfinite(e)]
        if not values:
            raise ValueError(f"Rule({self.key!r}).judge(): expected finite effects, got none.")
        n = len(values)
        above = sum(v > self.threshold for v in values)
        below = n - above
        k = self.needed(n)
        if above >= k:
            verdict = "held"
        elif below >= k:
            verdict = "not held"
        else:
            verdict = "inconclusive"
        if n < MIN_SEEDS_FOR_RECORD and verdict != "inconclusive" and min(above, below) > 0:
            verdict = "inconclusive"
        a = np.asarray(values)
        return Verdict(
            rule=self,
            per_seed=values,
            missing=len(effects) - n,
            mean=float(a.mean()),
            std=float(a.std(ddof=1)) if n > 1 else 0.0,
            above=int(above),
            needed=int(k),
            p_sign=sign_test_p(int(above), int(below)),
            verdict=verdict,
        )


@dataclass(frozen=True)
class Verdict:
    """What :meth:`Rule.judge` found: the effects, the agreement and the verdict."""

    rule: Rule
    per_seed: list[float]
    missing: int
    mean: float
    std: float
    above: int
    needed: int
    p_sign: float
    verdict: str

    @property
    def seeds(self) -> int:
        return len(self.per_seed)

    @property
    def for_record(self) -> bool:
        """Whether enough seeds ran for this verdict to be quoted (:data:`MIN_SEEDS_FOR_RECORD`)."""
        return self.seeds >= MIN_SEEDS_FOR_RECORD

    def to_dict(self, measured: str = "") -> dict[str, Any]:
        """A JSON-serialisable row of the claims table. ``measured`` says in words what the
        numbers were (e.g. the two arms' means); the table prints it next to the effect."""
        return {
            **asdict(self.rule),
            "measured": measured,
            "per_seed": self.per_seed,
            "missing": self.missing,
            "mean": self.mean,
            "std": self.std,
            "seeds": self.seeds,
            "above": self.above,
            "needed": self.needed,
            "p_sign": self.p_sign,
            "verdict": self.verdict,
            "held": self.verdict == "held",
            "for_record": self.for_record,
        }


def judge_rules(
    rules: Sequence[Rule],
    effects: Mapping[str, Sequence[float | None]],
    measured: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Judge each rule on its per-seed effects; the claims table's rows, in the rules' order.

    A rule with no effects in ``effects`` (or only ``None``/non-finite ones) is left out: it was
    not measured in this configuration (e.g. a tiny preset without the arm it needs).
    """
    measured = measured or {}
    rows = []
    for rule in rules:
        values = list(effects.get(rule.key, ()))
        if not any(v is not None and math.isfinite(v) for v in values):
            continue
        rows.append(rule.judge(values).to_dict(measured=measured.get(rule.key, "")))
    return rows


def verdict_line(claim: Mapping[str, Any]) -> str:
    """One claim's verdict (a :meth:`Verdict.to_dict` row) as a line of a printed report."""
    note = "" if claim["for_record"] else f"; {claim['seeds']} seeds: not for the record"
    return (
        f"{claim['verdict'].upper()}: {claim['claim']} — {claim['measure']}: "
        f"{claim['mean']:.3g} ± {claim['std']:.2g} {claim['unit']} (threshold "
        f"{claim['threshold']:g}; above it in {claim['above']} of {claim['seeds']} seeds, "
        f"{claim['needed']} needed; sign test p = {claim['p_sign']:.3f}{note})."
    )


# --- tuned hyper-parameters -------------------------------------------------------------------


def read_tuned(path: str | Path | None = None) -> dict[str, Any]:
    """The tuned hyper-parameters: experiment -> arm -> record (``{}`` if none were tuned).

    Raises:
        ValueError: If the file is not a JSON object.
    """
    path = TUNED_FILE if path is None else Path(path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def tuned_value(experiment: str, arm: str, key: str, default: float) -> float:
    """A tuned value from :data:`TUNED_FILE`, or ``default`` if that arm was never tuned."""
    record = read_tuned().get(experiment, {}).get("arms", {}).get(arm)
    if not isinstance(record, Mapping) or key not in record:
        return default
    return float(record[key])


def write_tuned(experiment: str, record: Mapping[str, Any], path: str | Path | None = None) -> Path:
    """Replace one experiment's entry in the tuned file (the others are kept)."""
    path = TUNED_FILE if path is None else Path(path)
    data = read_tuned(path)
    data[experiment] = dict(record)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def bracketing_grid(grid: Sequence[float], scores: Sequence[float], factor: float) -> float | None:
    """The next value to try so that the best score is not at the edge of ``grid``.

    Args:
        grid: Values tried, ascending.
        scores: Their scores, higher is better (NaN for a diverged run).
        factor: The grid's ratio; the next value is ``grid[0] / factor`` or ``grid[-1] * factor``.

    Returns:
        The value to add, or ``None`` if the best is inside the grid (bracketed).
    """
    clean = [s if math.isfinite(s) else -math.inf for s in scores]
    best = int(np.argmax(clean))
    if best == 0:
        return grid[0] / factor
    if best == len(grid) - 1:
        return grid[-1] * factor
    return None
