"""The verdict of a regularization run: the measures (:func:`gap_pp`, the arms' final numbers),
a run as arrays (:class:`RegularizationResult`, what the figures take), and :func:`summarize`,
which judges the rules and writes the printable report.

The rules themselves, with their thresholds, are declared in
:mod:`batchnorm.lab.experiments.regularization`; this module only knows how to measure each
one, by its key (:data:`EFFECTS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._training import mean_std
from ..protocol import Rule, judge_rules, verdict_line
from ._regularization_config import ARMS, CLAIM, RegularizationConfig

__all__ = [
    "CHANCE",
    "EFFECTS",
    "FIGURE_NOTES",
    "RegularizationResult",
    "did_not_hold",
    "gap_pp",
    "summarize",
]

# Accuracy of guessing: both datasets have 10 classes. A diverged arm's test accuracy counts as
# this in the accuracy rules (a network that outputs NaN picks class 0 for every example).
CHANCE = 0.1
# Rule key -> (arm whose measure is subtracted, arm it is subtracted from, measure): the effect
# is measure(second) - measure(first) in pp, except the gap, where smaller favours the claim.
EFFECTS: dict[str, tuple[str, str, str]] = {
    "gap": ("bn", "none", "gap"),
    "accuracy": ("none", "bn", "test_accuracy"),
    "dropout_helps": ("none", "dropout", "test_accuracy"),
    "dropout_unneeded": ("bn+dropout", "bn", "test_accuracy"),
    "ghost": ("bn", "ghost", "test_accuracy"),
}
ARM_LABELS = {
    "none": "none",
    "dropout": "dropout (all layers)",
    "bn": "BN",
    "bn+dropout": "BN + dropout (last layer)",
    "ghost": "ghost BN",
}

# Figure name -> what to see in it (plot() draws exactly these).
FIGURE_NOTES = {
    "accuracy": (
        "Final training (pale) and test (full) accuracy of each arm in eval mode, bars at the "
        "mean and every seed a dot: how close each arm gets to fitting its training set, and "
        "what that is worth on the test set."
    ),
    "gap": (
        "The train/test accuracy gap per arm (every seed a dot, bar at the mean): a regularizer "
        "lowers it; compare BN with none, and BN + dropout with BN."
    ),
    "curves": (
        "Validation accuracy over training for every arm (thin: seeds, bold: mean): whether an "
        "arm is still improving at the end, or peaked early and declined as it over-fitted."
    ),
}


def gap_pp(run: Mapping[str, Any]) -> float | None:
    """A run's train/test gap in percentage points: ``100 * (train_accuracy - test_accuracy)``
    (both in eval mode, at the end of training); ``None`` for a diverged run."""
    if run["diverged"] or run.get("train_accuracy") is None or run.get("test_accuracy") is None:
        return None
    return 100.0 * (float(run["train_accuracy"]) - float(run["test_accuracy"]))


def _accuracy(run: Mapping[str, Any], key: str) -> float:
    value = run.get(key)
    return CHANCE if run["diverged"] or value is None else float(value)


@dataclass(frozen=True)
class RegularizationResult:
    """All seeds of a run as arrays: what the plot functions take.

    Attributes:
        config: The run's settings.
        seeds: The seeds, in order.
        steps: int64 array ``(T,)`` of measured steps.
        val_accuracy: Arm -> float64 ``(S, T)`` validation accuracy (NaN after a divergence).
        train_accuracy, test_accuracy: Arm -> float64 ``(S,)`` final accuracies (chance for a
            diverged arm).
        gap: Arm -> float64 ``(S,)`` gaps in pp (NaN for a diverged arm).
        test_loss: Arm -> float64 ``(S,)`` final test loss (NaN for a diverged arm).
        summary: The dict :func:`summarize` returns (empty while it is being made).
    """

    config: RegularizationConfig
    seeds: tuple[int, ...]
    steps: np.ndarray
    val_accuracy: dict[str, np.ndarray]
    train_accuracy: dict[str, np.ndarray]
    test_accuracy: dict[str, np.ndarray]
    gap: dict[str, np.ndarray]
    test_loss: dict[str, np.ndarray]
    summary: dict = field(default_factory=dict)

    @classmethod
    def from_seed_results(
        cls,
        config: RegularizationConfig,
        results: Mapping[int, Mapping[str, Any]],
        summary: dict | None = None,
    ) -> RegularizationResult:
        """Build from a dict seed -> ``run_seed`` result (e.g. read back from JSON).

        Raises:
            ValueError: If ``results`` is empty.
        """
        if not results:
            raise ValueError(
                "RegularizationResult.from_seed_results(): expected results, got none."
            )
        seeds = tuple(sorted(results))
        steps = np.asarray(config.measured_steps(), dtype=np.int64)
        runs = {arm: [results[s]["units"][arm] for s in seeds] for arm in ARMS}
        val = {}
        for arm in ARMS:
            rows = np.full((len(seeds), len(steps)), np.nan)
            for i, run in enumerate(runs[arm]):
                values = run["curve"]["val_accuracy"][: len(steps)]
                rows[i, : len(values)] = [np.nan if v is None else v for v in values]
            val[arm] = rows

        def per_seed(fn: Any) -> dict[str, np.ndarray]:
            return {arm: np.array([fn(r) for r in runs[arm]], dtype=np.float64) for arm in ARMS}

        def nan_if_none(value: float | None) -> float:
            return np.nan if value is None else float(value)

        return cls(
            config=config,
            seeds=seeds,
            steps=steps,
            val_accuracy=val,
            train_accuracy=per_seed(lambda r: _accuracy(r, "train_accuracy")),
            test_accuracy=per_seed(lambda r: _accuracy(r, "test_accuracy")),
            gap=per_seed(lambda r: nan_if_none(gap_pp(r))),
            test_loss=per_seed(lambda r: nan_if_none(None if r["diverged"] else r["test_loss"])),
            summary=dict(summary or {}),
        )


def _stats(values: np.ndarray, scale: float = 1.0) -> dict[str, Any] | None:
    """``mean_std`` of the finite values (scaled), ``None`` if there are none."""
    finite = values[np.isfinite(values)]
    return mean_std(scale * finite) if len(finite) else None


def summarize(
    config: RegularizationConfig,
    results: Mapping[int, Mapping[str, Any]],
    rules: Sequence[Rule],
) -> dict:
    """Judge the rules on a run's results; numbers, verdicts and a printable report.

    Args:
        config: The run's settings.
        results: Seed -> ``run_seed`` result.
        rules: The declared rules; each key must be in :data:`EFFECTS`.

    Returns:
        A JSON-serialisable dict: ``experiment``, ``claim``, ``seeds``, ``seconds``,
        ``dataset``, ``lrs`` (arm -> value), ``arms`` (arm -> ``train_accuracy``,
        ``test_accuracy``, ``gap`` (pp), ``test_loss``: each ``per_seed``, ``mean``, ``std`` or
        ``None`` if no seed has one; ``diverged``: the seeds that diverged), ``claims`` (one
        :meth:`~batchnorm.lab.protocol.Verdict.to_dict` row per rule, with ``measured``),
        ``figure_notes``, ``report`` (lines of text). Accuracies are fractions, gaps pp.

    Raises:
        ValueError: If ``results`` is empty or a rule has no effect here.
    """
    unknown = [rule.key for rule in rules if rule.key not in EFFECTS]
    if unknown:
        raise ValueError(
            f"regularization summarize(): expected rules with keys among {list(EFFECTS)}, got "
            f"{unknown}."
        )
    result = RegularizationResult.from_seed_results(config, results)
    seeds = result.seeds
    arms = {
        arm: {
            "train_accuracy": _stats(result.train_accuracy[arm]),
            "test_accuracy": _stats(result.test_accuracy[arm]),
            "gap": _stats(result.gap[arm]),
            "test_loss": _stats(result.test_loss[arm]),
            "diverged": [s for s in seeds if results[s]["units"][arm]["diverged"]],
        }
        for arm in ARMS
    }
    effects: dict[str, list[float | None]] = {}
    measured: dict[str, str] = {}
    for key, (first, second, measure) in EFFECTS.items():
        if measure == "gap":
            # Smaller favours the claim: the first arm's (BN's) gap is subtracted from none's.
            a, b = result.gap[first], result.gap[second]
            diff = b - a
            words = "gap (pp)"
            scale = 1.0
        else:
            a, b = result.test_accuracy[first], result.test_accuracy[second]
            diff = 100.0 * (b - a)
            words = "test accuracy (%)"
            scale = 100.0
        effects[key] = [float(v) if np.isfinite(v) else None for v in diff]
        means = [np.nanmean(scale * v) if np.isfinite(v).any() else np.nan for v in (a, b)]
        measured[key] = (
            f"{words}, mean over seeds: {ARM_LABELS[second]} {means[1]:.2f}, "
            f"{ARM_LABELS[first]} {means[0]:.2f}"
        )
    claims = judge_rules(rules, effects, measured)
    assert config.lrs is not None  # filled in by __post_init__
    summary: dict[str, Any] = {
        "experiment": "regularization",
        "claim": CLAIM,
        "seeds": list(seeds),
        "seconds": float(sum(results[s]["seconds"] for s in seeds)),
        "dataset": config.dataset,
        "lrs": dict(config.lrs),
        "arms": arms,
        "claims": claims,
        "figure_notes": dict(FIGURE_NOTES),
    }
    summary["report"] = _report(config, summary)
    return summary


def _pm(stats: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 2) -> str:
    if stats is None:
        return "-"
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def _report(config: RegularizationConfig, s: Mapping[str, Any]) -> list[str]:
    n = len(s["seeds"])
    none_train = s["arms"]["none"]["train_accuracy"]
    lines = [
        f"Regularization on {s['dataset']} ({config.n_val} training examples held out for "
        f"validation; the test set only reported); {config.depth}x{config.hidden} ReLU MLP, He "
        f"init, SGD momentum {config.momentum:g}, batch {config.batch_size}, "
        f"{config.arm_steps} steps per arm; dropout p = {config.dropout:g}; ghost batches of "
        f"{config.virtual_batch_size}; {n} seed{'s' if n != 1 else ''}; mean ± std over seeds. "
        "Each arm at its own learning rate, tuned on the validation split (batchnorm lab tune "
        "regularization; untuned arms: the stated default). Final numbers in eval mode.",
        f"Over-fitting check: the network without regularizer ends at "
        f"{_pm(none_train, 100.0)} % training accuracy.",
        "",
        f"{'arm':<28}{'lr':>8}{'train acc %':>18}{'test acc %':>18}{'gap pp':>18}{'test loss':>18}",
    ]
    for arm in ARMS:
        a = s["arms"][arm]
        diverged = f"  diverged: seeds {a['diverged']}" if a["diverged"] else ""
        lines.append(
            f"{ARM_LABELS[arm]:<28}{s['lrs'][arm]:>8.3g}{_pm(a['train_accuracy'], 100.0):>18}"
            f"{_pm(a['test_accuracy'], 100.0):>18}{_pm(a['gap']):>18}"
            f"{_pm(a['test_loss'], digits=3):>18}{diverged}"
        )
    lines.append("")
    lines += [verdict_line(claim) for claim in s["claims"]]
    by_key = {c["key"]: c for c in s["claims"]}
    if "dropout_unneeded" in by_key:
        verdict = by_key["dropout_unneeded"]["verdict"]
        meaning = {
            "held": "supports Ioffe & Szegedy: with BN, dropout is not needed",
            "not held": "dropout still adds on top of BN (with Li et al.'s placement), against "
            "the paper's 'reduces the need for Dropout'",
            "inconclusive": "the seeds disagree on whether dropout still adds on top of BN",
        }[verdict]
        lines.append(f"Dropout on top of BN: {verdict}, which {meaning}.")
    lines.append(did_not_hold(s["claims"]))
    return lines


def did_not_hold(claims: Sequence[Mapping[str, Any]]) -> str:
    """One line naming the claims that did not hold (not held, or inconclusive)."""
    failed = [f"{c['claim']} ({c['verdict']})" for c in claims if c["verdict"] != "held"]
    if failed:
        return "Claims that did not hold: " + "; ".join(failed) + "."
    return "Every claim held." if claims else "No claim was judged."
