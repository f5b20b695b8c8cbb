"""The verdict of a convergence run: the steps-to-target measure (:func:`steps_to_target`,
:func:`speed_per_seed`), a run as arrays (:class:`ConvergenceResult`, what the figures take),
and :func:`summarize`, which judges the rules and writes the printable report.

The rules themselves, with their thresholds, are declared in
:mod:`batchnorm.lab.experiments.convergence`; this module only knows how to measure each one,
by its key (:data:`EFFECTS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._training import mean_std, trailing_mean
from ..protocol import Rule, judge_rules, verdict_line
from ._convergence_config import ARMS, CLAIM, NETS, ConvergenceConfig, arm_name

__all__ = [
    "CHANCE",
    "EFFECTS",
    "FIGURE_NOTES",
    "ConvergenceResult",
    "did_not_hold",
    "speed_per_seed",
    "steps_to_target",
    "summarize",
]

# Accuracy of guessing: every dataset of this experiment has 10 classes. A diverged arm's final
# accuracy counts as this (a network that outputs NaN picks class 0 for every example).
CHANCE = 0.1
# Rule key -> (network, what is compared); summarize() computes each from the per-seed numbers.
EFFECTS = {
    "speed_mlp": ("mlp", "speedup"),
    "speed_cnn": ("cnn", "speedup"),
    "accuracy_mlp": ("mlp", "accuracy"),
    "accuracy_cnn": ("cnn", "accuracy"),
}
NET_LABELS = {"mlp": "3x100 sigmoid MLP", "cnn": "1-D CNN"}

# Figure name -> what to see in it (plot() draws exactly these).
FIGURE_NOTES = {
    "curves_mlp": (
        "Smoothed validation accuracy of the 3x100 sigmoid MLP without and with BN (thin lines: "
        "seeds, bold: their mean); the dotted line is the mean speed target, 98 % of the no-BN "
        "arm's best, and the dots mark where each seed's arm first reaches its own target."
    ),
    "curves_cnn": (
        "The same for the 1-D CNN: smoothed validation accuracy without and with BN, every seed "
        "thin, the mean bold, the mean target dotted and each seed's first arrival marked."
    ),
    "speedup": (
        "No-BN steps over BN steps to the target, per seed (dots; hollow where an arm never "
        "reached it and its steps are a bound) and network, the bar at the mean: above the "
        "dashed 1.25x line a seed counts for the claim, below the grey 1x line BN was slower."
    ),
}


def steps_to_target(
    steps: Sequence[int],
    accuracy: Sequence[float | None],
    *,
    target: float,
    width: int,
    bound: int,
) -> tuple[int, bool]:
    r"""An arm's steps to the target: the first measured step :math:`t > 0` whose smoothed
    accuracy (trailing mean of ``width`` measurements) is at least ``target``.

    Args:
        steps: Measured steps, ascending, starting at 0.
        accuracy: Validation accuracy at those steps; shorter than ``steps`` for a run that
            diverged (its measurements stop there).
        target: The accuracy to reach.
        width: The trailing mean's width.
        bound: What an arm that never reaches the target counts (``steps + eval_every``).

    Returns:
        ``(steps_to_target, reached)``; ``(bound, False)`` if the target is never reached.
    """
    values = np.array([math.nan if v is None else v for v in accuracy], dtype=np.float64)
    if len(values) == 0:
        return bound, False
    smoothed = trailing_mean(values, width)
    at = np.asarray(steps[: len(values)])
    hits = np.nonzero((smoothed >= target) & (at > 0))[0]
    if len(hits) == 0:
        return bound, False
    return int(at[hits[0]]), True


def _final_accuracy(run: Mapping[str, Any]) -> float:
    """The final test accuracy of a run, chance for a diverged one."""
    value = run.get("test_accuracy")
    return CHANCE if run["diverged"] or value is None else float(value)


def speed_per_seed(config: ConvergenceConfig, result: Mapping[str, Any], net: str) -> dict:
    """One seed's speed measure for ``net``.

    Returns:
        ``{"target", "best_none", "steps", "reached", "speedup"}``, ``steps`` and ``reached``
        mapping each arm to its steps to the target and whether it got there; the target
        is ``target_fraction`` times the no-BN arm's best smoothed validation accuracy; the
        speed-up is the no-BN arm's steps over the BN arm's.
    """
    none, bn = arm_name(net, "none"), arm_name(net, "bn")
    runs = {arm: result["units"][arm] for arm in (none, bn)}
    measured = config.measured_steps(net)
    smoothed = trailing_mean(
        [math.nan if v is None else v for v in runs[none]["curve"]["val_accuracy"]],
        config.smooth,
    )
    finite = smoothed[np.isfinite(smoothed)]
    best = float(finite.max()) if len(finite) else CHANCE
    target = config.target_fraction * best
    bound = config.steps_for(net) + config.eval_every
    steps, reached = {}, {}
    for arm, run in runs.items():
        steps[arm], reached[arm] = steps_to_target(
            measured, run["curve"]["val_accuracy"], target=target, width=config.smooth, bound=bound
        )
    return {
        "target": target,
        "best_none": best,
        "steps": steps,
        "reached": reached,
        "speedup": steps[none] / steps[bn],
    }


@dataclass(frozen=True)
class ConvergenceResult:
    """All seeds of a run as arrays: what the plot functions take.

    Attributes:
        config: The run's settings.
        seeds: The seeds, in order.
        steps: Network -> int64 array ``(T,)`` of its measured steps.
        val_accuracy: Arm -> float64 ``(S, T)`` validation accuracy (NaN after a divergence).
        smoothed: Arm -> the same, smoothed by the trailing mean of ``config.smooth``.
        speed: Network -> one :func:`speed_per_seed` dict per seed.
        summary: The dict :func:`summarize` returns (empty while it is being made).
    """

    config: ConvergenceConfig
    seeds: tuple[int, ...]
    steps: dict[str, np.ndarray]
    val_accuracy: dict[str, np.ndarray]
    smoothed: dict[str, np.ndarray]
    speed: dict[str, list[dict]]
    summary: dict = field(default_factory=dict)

    @classmethod
    def from_seed_results(
        cls,
        config: ConvergenceConfig,
        results: Mapping[int, Mapping[str, Any]],
        summary: dict | None = None,
    ) -> ConvergenceResult:
        """Build from a dict seed -> ``run_seed`` result (e.g. read back from JSON).

        Raises:
            ValueError: If ``results`` is empty.
        """
        if not results:
            raise ValueError("ConvergenceResult.from_seed_results(): expected results, got none.")
        seeds = tuple(sorted(results))
        steps = {net: np.asarray(config.measured_steps(net), dtype=np.int64) for net in NETS}
        val, smoothed = {}, {}
        for arm in ARMS:
            n = len(steps[arm.split("/")[0]])
            rows = np.full((len(seeds), n), np.nan)
            for i, seed in enumerate(seeds):
                values = results[seed]["units"][arm]["curve"]["val_accuracy"][:n]
                rows[i, : len(values)] = [np.nan if v is None else v for v in values]
            val[arm] = rows
            smoothed[arm] = np.array([trailing_mean(r, config.smooth) for r in rows])
        speed = {net: [speed_per_seed(config, results[s], net) for s in seeds] for net in NETS}
        return cls(config, seeds, steps, val, smoothed, speed, dict(summary or {}))


def summarize(
    config: ConvergenceConfig, results: Mapping[int, Mapping[str, Any]], rules: Sequence[Rule]
) -> dict:
    """Judge the rules on a run's results; numbers, verdicts and a printable report.

    Args:
        config: The run's settings.
        results: Seed -> ``run_seed`` result.
        rules: The declared rules; each key must be in :data:`EFFECTS`.

    Returns:
        A JSON-serialisable dict: ``experiment``, ``claim``, ``seeds``, ``seconds``,
        ``dataset``, ``lrs`` (arm -> value), ``nets`` (network -> ``steps`` per arm,
        ``target``, ``best_none``, ``steps_to_target`` and ``reached`` (arm -> per seed),
        ``speedup`` and per arm ``final_test_accuracy`` (``per_seed``, ``mean``, ``std``),
        ``diverged`` (arm -> seeds)), ``claims`` (one
        :meth:`~batchnorm.lab.protocol.Verdict.to_dict` row per rule, with ``measured``),
        ``figure_notes``, ``report`` (lines of text).

    Raises:
        ValueError: If ``results`` is empty or a rule has no effect here.
    """
    unknown = [rule.key for rule in rules if rule.key not in EFFECTS]
    if unknown:
        raise ValueError(
            f"convergence summarize(): expected rules with keys among {list(EFFECTS)}, got "
            f"{unknown}."
        )
    result = ConvergenceResult.from_seed_results(config, results)
    seeds = result.seeds
    nets: dict[str, Any] = {}
    effects: dict[str, list[float | None]] = {}
    measured: dict[str, str] = {}
    for net in NETS:
        none, bn = arm_name(net, "none"), arm_name(net, "bn")
        speed = result.speed[net]
        accuracy = {
            arm: [_final_accuracy(results[s]["units"][arm]) for s in seeds] for arm in (none, bn)
        }
        nets[net] = {
            "steps": config.steps_for(net),
            "target": [v["target"] for v in speed],
            "best_none": [v["best_none"] for v in speed],
            "steps_to_target": {arm: [v["steps"][arm] for v in speed] for arm in (none, bn)},
            "reached": {arm: [v["reached"][arm] for v in speed] for arm in (none, bn)},
            "speedup": mean_std([v["speedup"] for v in speed]),
            "final_test_accuracy": {arm: mean_std(accuracy[arm]) for arm in (none, bn)},
            "diverged": {
                arm: [s for s in seeds if results[s]["units"][arm]["diverged"]]
                for arm in (none, bn)
            },
        }
        n = nets[net]
        effects[f"speed_{net}"] = [v["speedup"] for v in speed]
        effects[f"accuracy_{net}"] = [
            100.0 * (b - a) for a, b in zip(accuracy[none], accuracy[bn], strict=True)
        ]
        measured[f"speed_{net}"] = (
            f"steps to the target (mean {np.mean(n['target']):.3f}): without BN "
            f"{np.mean(n['steps_to_target'][none]):,.0f}, with BN "
            f"{np.mean(n['steps_to_target'][bn]):,.0f} (means of {len(seeds)} seeds; "
            f"target missed by BN in {n['reached'][bn].count(False)})"
        )
        measured[f"accuracy_{net}"] = (
            f"final test accuracy: without BN {100 * n['final_test_accuracy'][none]['mean']:.2f} "
            f"%, with BN {100 * n['final_test_accuracy'][bn]['mean']:.2f} %"
        )
    claims = judge_rules(rules, effects, measured)
    assert config.lrs is not None  # filled in by __post_init__
    summary: dict[str, Any] = {
        "experiment": "convergence",
        "claim": CLAIM,
        "seeds": list(seeds),
        "seconds": float(sum(results[s]["seconds"] for s in seeds)),
        "dataset": config.dataset,
        "lrs": dict(config.lrs),
        "nets": nets,
        "claims": claims,
        "figure_notes": dict(FIGURE_NOTES),
    }
    summary["report"] = _report(config, summary)
    return summary


def _pm(stats: Mapping[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def _report(config: ConvergenceConfig, s: Mapping[str, Any]) -> list[str]:
    n = len(s["seeds"])
    lines = [
        f"Convergence on {s['dataset']} ({config.n_val} validation sequences held out of the "
        f"training set; the test set only reported); {n} seed{'s' if n != 1 else ''}; mean ± "
        "std over seeds. Each arm at its own learning rate, tuned on the validation split "
        "(batchnorm lab tune convergence; untuned arms: the stated defaults).",
        f"MLP: {config.depth}x{config.hidden} sigmoid, Glorot init, SGD momentum "
        f"{config.mlp_momentum:g}, batch {config.mlp_batch_size}, {config.mlp_steps} steps. "
        f"CNN: channels {list(config.channels)}, ReLU, He init, SGD momentum "
        f"{config.cnn_momentum:g}, batch {config.cnn_batch_size}, {config.cnn_steps} steps. "
        f"Target: {config.target_fraction:g} x the no-BN arm's best validation accuracy "
        f"(trailing mean of {config.smooth} measurements, every {config.eval_every} steps); "
        f"an arm that never reaches it counts steps + {config.eval_every} (a bound).",
        "",
        f"{'arm':<10}{'lr':>8}{'steps to target':>22}{'missed':>8}{'final test acc %':>20}",
    ]
    for net in NETS:
        block = s["nets"][net]
        for arm in (arm_name(net, "none"), arm_name(net, "bn")):
            steps = mean_std(block["steps_to_target"][arm])
            missed = block["reached"][arm].count(False)
            lines.append(
                f"{arm:<10}{s['lrs'][arm]:>8.3g}{_pm(steps, digits=0):>22}{missed:>8}"
                f"{_pm(block['final_test_accuracy'][arm], 100.0):>20}"
            )
    lines.append("")
    for net in NETS:
        block = s["nets"][net]
        per_seed = ", ".join(f"{v:.2f}" for v in block["speedup"]["per_seed"])
        targets = ", ".join(f"{t:.3f}" for t in block["target"])
        diverged = "; ".join(
            f"{arm} diverged in seeds {seeds}" for arm, seeds in block["diverged"].items() if seeds
        )
        lines.append(
            f"{NET_LABELS[net]}: speed-up (no-BN steps / BN steps) per seed {per_seed}; "
            f"targets {targets}" + (f"; {diverged}" if diverged else "")
        )
    lines.append("")
    lines += [verdict_line(claim) for claim in s["claims"]]
    lines.append(did_not_hold(s["claims"]))
    return lines


def did_not_hold(claims: Sequence[Mapping[str, Any]]) -> str:
    """One line naming the claims that did not hold (not held, or inconclusive)."""
    failed = [f"{c['claim']} ({c['verdict']})" for c in claims if c["verdict"] != "held"]
    if failed:
        return "Claims that did not hold: " + "; ".join(failed) + "."
    return "Every claim held." if claims else "No claim was judged."
