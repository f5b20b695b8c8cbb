"""The verdict of an initialization run: a run as arrays (:class:`ScaleSweep`), the rules'
per-seed effects, the summary and the printed report. See :mod:`.initialization` for the
design."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._classify import diverged
from .._training import mean_std
from ..protocol import judge_rules
from ._initialization_config import CHANCE, CLAIM, RULES, InitializationConfig, spread
from ._learning_rate_nets import NET_LABELS, NETS, accuracy_or_chance, arm_name, measured_steps
from ._learning_rate_summary import claims_lines

__all__ = ["FIGURE_NOTES", "ScaleSweep", "summarize"]

FIGURE_NOTES = {
    "accuracy": (
        "Final test accuracy at each initial weight scale c (every weight times c, learning "
        "rate fixed at its c = 1 value), without (orange) and with BN (green), one thin line "
        "per seed; crosses at chance are diverged runs: the flatter the curve, the less the "
        "scale matters."
    ),
    "curves": (
        "With BN, validation accuracy over training at each scale (mean over seeds; from dark "
        "= small c to light = large c): BN's forward pass ignores c, but its effective step "
        "lr/||W||^2 scales as 1/c^2, so the curves part where the step is too small (or, at "
        "first, too large) to learn well in the budget."
    ),
}


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class ScaleSweep:
    """All seeds of a run as arrays (what the figures take).

    Attributes:
        config: The run's settings.
        seeds: The seeds, in order.
        scales: float64 ``(K,)``.
        steps: int64 ``(T,)``: the measured steps of a run that did not diverge.
        val, test: Arm -> float64 ``(S, K)``: final validation / test accuracy, chance where
            the run diverged.
        diverged: Arm -> bool ``(S, K)`` (:func:`batchnorm.lab._classify.diverged`).
        curves: Arm -> float64 ``(S, K, T)``: validation accuracy at each measured step (NaN
            after a run stopped).
        norms_start, norms_end: Arm -> float64 ``(S, K, depth)``: hidden weight norms at the
            start and the last measurement.
        summary: :func:`summarize`'s dict, if given.
    """

    config: InitializationConfig
    seeds: tuple[int, ...]
    scales: np.ndarray
    steps: np.ndarray
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    diverged: dict[str, np.ndarray]
    curves: dict[str, np.ndarray]
    norms_start: dict[str, np.ndarray]
    norms_end: dict[str, np.ndarray]
    summary: dict = field(default_factory=dict)

    @classmethod
    def from_seed_results(
        cls,
        config: InitializationConfig,
        results: Mapping[int, dict],
        summary: Mapping[str, Any] | None = None,
    ) -> ScaleSweep:
        """Build from seed -> :func:`~.initialization.run_seed` result.

        Raises:
            ValueError: If ``results`` is empty.
        """
        if not results:
            raise ValueError("ScaleSweep.from_seed_results(): expected results, got none.")
        seeds = tuple(sorted(results))
        steps = measured_steps(config.steps, config.eval_every)
        keys = ("val", "test", "div", "curve", "n0", "n1")
        arrays: dict[str, dict[str, np.ndarray]] = {k: {} for k in keys}
        for arm in config.arms:
            runs = [[results[s]["units"][f"{arm}/c={c:g}"] for c in config.scales] for s in seeds]
            arrays["val"][arm] = np.array(
                [[accuracy_or_chance(r, "val_accuracy", CHANCE) for r in row] for row in runs]
            )
            arrays["test"][arm] = np.array(
                [[accuracy_or_chance(r, "test_accuracy", CHANCE) for r in row] for row in runs]
            )
            arrays["div"][arm] = np.array([[diverged(r) for r in row] for row in runs], dtype=bool)
            curve = np.full((len(seeds), len(config.scales), len(steps)), np.nan)
            for i, row in enumerate(runs):
                for k, r in enumerate(row):
                    values = [_nan(v) for v in r["curve"]["val_accuracy"]]
                    curve[i, k, : len(values)] = values
            arrays["curve"][arm] = curve
            for key, at in (("n0", 0), ("n1", -1)):
                arrays[key][arm] = np.array(
                    [[[_nan(v) for v in r["weight_norms"][at]] for r in row] for row in runs],
                    dtype=np.float64,
                )
        return cls(
            config=config,
            seeds=seeds,
            scales=np.asarray(config.scales, dtype=np.float64),
            steps=np.asarray(steps, dtype=np.int64),
            val=arrays["val"],
            test=arrays["test"],
            diverged=arrays["div"],
            curves=arrays["curve"],
            norms_start=arrays["n0"],
            norms_end=arrays["n1"],
            summary=dict(summary or {}),
        )

    def effective_rate(self, arm: str, at: str) -> np.ndarray:
        """``(S, K)``: the arm's lr / ||W||^2 at ``"start"`` or ``"end"``, geometric mean over
        the hidden layers."""
        assert self.config.lrs is not None  # filled in by __post_init__
        norms = self.norms_start[arm] if at == "start" else self.norms_end[arm]
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.config.lrs[arm] / np.exp(np.log(norms**2).mean(axis=2))


def _geo_mean(values: np.ndarray) -> list[float | None]:
    out = []
    for column in values.T:
        keep = column[np.isfinite(column) & (column > 0)]
        out.append(float(np.exp(np.log(keep).mean())) if len(keep) else None)
    return out


def summarize(config: InitializationConfig, results: Mapping[int, dict]) -> dict:
    """Judge :data:`~.initialization.RULES` on a run's results.

    Returns:
        A JSON-serialisable dict: ``experiment``, ``claim``, ``seeds``, ``seconds``;
        ``scales``, ``lrs``; per arm (``arms``) ``spread`` (per seed, mean, std; pp),
        ``test_mean`` and ``diverged`` (count of seeds) per scale, ``effective_start`` and
        ``effective_end`` per scale (geometric means over seeds); ``claims`` (one verdict row
        per rule); ``report`` (lines); ``figure_notes``.
    """
    sweep = ScaleSweep.from_seed_results(config, results)
    arms: dict[str, dict[str, Any]] = {}
    for arm in config.arms:
        with np.errstate(invalid="ignore"):
            end = np.where(sweep.diverged[arm], np.nan, sweep.effective_rate(arm, "end"))
        arms[arm] = {
            "spread": mean_std([spread(row) for row in sweep.test[arm]]),
            "test_mean": sweep.test[arm].mean(axis=0).tolist(),
            "diverged": sweep.diverged[arm].sum(axis=0).astype(int).tolist(),
            "effective_start": _geo_mean(sweep.effective_rate(arm, "start")),
            "effective_end": _geo_mean(end),
        }
    effects: dict[str, list[float]] = {}
    measured: dict[str, str] = {}
    for net in NETS:
        none = arms[arm_name(net, "none")]["spread"]
        bn = arms[arm_name(net, "bn")]["spread"]
        effects[f"spread_{net}"] = [
            a - b for a, b in zip(none["per_seed"], bn["per_seed"], strict=True)
        ]
        effects[f"flat_{net}"] = [-b for b in bn["per_seed"]]
        measured[f"spread_{net}"] = (
            f"spread over c: without BN {none['mean']:.1f} pp, with BN {bn['mean']:.1f} pp"
        )
        measured[f"flat_{net}"] = f"spread over c with BN {bn['mean']:.1f} ± {bn['std']:.1f} pp"
    claims = judge_rules(RULES, effects, measured)
    assert config.lrs is not None  # filled in by __post_init__
    summary: dict[str, Any] = {
        "experiment": "initialization",
        "claim": CLAIM,
        "seeds": list(sweep.seeds),
        "seconds": float(sum(r["seconds"] for r in results.values())),
        "dataset": config.dataset,
        "scales": list(config.scales),
        "lrs": dict(config.lrs),
        "arms": arms,
        "claims": claims,
        "figure_notes": FIGURE_NOTES,
    }
    summary["report"] = _report(config, summary)
    return summary


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def _report(config: InitializationConfig, s: Mapping[str, Any]) -> list[str]:
    n = len(s["seeds"])
    lines = [
        f"Initial weight scale on {s['dataset']}: every weight times c in "
        f"{', '.join(f'{c:g}' for c in config.scales)}; {config.steps} SGD steps of "
        f"{config.batch_size} per run at the arm's c = 1 learning rate; {n} seed"
        f"{'s' if n != 1 else ''}; final test accuracy, chance ({CHANCE:g}) for a diverged run "
        "(non-finite or not-decreasing training loss); spread = max - min over c.",
        "learning rates (tuned per arm at c = 1): "
        + ", ".join(f"{arm} {s['lrs'][arm]:g}" for arm in config.arms),
    ]
    for net in NETS:
        none, bn = s["arms"][arm_name(net, "none")], s["arms"][arm_name(net, "bn")]
        lines += [
            "",
            f"{net}: {NET_LABELS[net]}, {NETS[net][0]}x{config.hidden}",
            f"  {'c':>6}  {'no BN: test acc (div)':>22}  {'BN: test acc (div)':>20}  "
            f"{'BN: lr/||W||^2 start -> end':>28}",
        ]
        for k, c in enumerate(config.scales):
            eff = f"{_g(bn['effective_start'][k])} -> {_g(bn['effective_end'][k])}"
            lines.append(
                f"  {c:>6g}  {none['test_mean'][k]:>14.3f} ({none['diverged'][k]}/{n})"
                f"  {bn['test_mean'][k]:>12.3f} ({bn['diverged'][k]}/{n})  {eff:>28}"
            )
        lines.append(
            f"  spread over c (pp): without BN {_stats(none['spread'])}, with BN "
            f"{_stats(bn['spread'])}"
        )
    lines.append("")
    lines += claims_lines(s["claims"])
    return lines


def _stats(stats: Mapping[str, Any]) -> str:
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}"
