"""The verdict of a learning-rate sweep: a run as arrays (:class:`Sweep`), the rules' per-seed
effects, the summary and the printed report. See :mod:`.learning_rate` for the design."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._classify import diverged
from .._training import mean_std
from ..protocol import judge_rules, verdict_line
from ._learning_rate_config import (
    CHANCE,
    CLAIM,
    LEARNED_MARGIN,
    RULES,
    LearningRateConfig,
    autotune_factor,
    best_index,
    good_range,
    largest_learning_rate,
    largest_stable_rate,
    stable_gap,
)
from ._learning_rate_nets import NET_LABELS, NETS, accuracy_or_chance, arm_name

__all__ = ["FIGURE_NOTES", "Sweep", "claims_lines", "summarize"]

FIGURE_NOTES = {
    "accuracy": (
        "Final test accuracy at each learning rate, without (orange) and with BN (green), one "
        "thin line per seed; crosses at chance are diverged runs and the dotted verticals each "
        "arm's largest stable rate (median over seeds): compare how far right each arm's "
        "curve stays up."
    ),
    "effective_rate": (
        "BN's effective rate lr/||W||^2 (geometric mean over hidden layers) at the start "
        "(hollow) and at the end (filled) of training, per nominal rate: the further the end "
        "falls below the start, the more the weights' growth has lowered the step by itself."
    ),
}


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class Sweep:
    """All seeds of a run as arrays (what the figures take).

    Attributes:
        config: The run's settings.
        seeds: The seeds, in order.
        lrs: float64 ``(L,)``.
        val, test: Arm -> float64 ``(S, L)``: final validation / test accuracy, chance where
            the run diverged.
        diverged: Arm -> bool ``(S, L)`` (:func:`batchnorm.lab._classify.diverged`).
        norms_start, norms_end: Arm -> float64 ``(S, L, depth)``: each hidden layer's weight
            norm at step 0 and at the last measurement (NaN where not finite).
        summary: :func:`summarize`'s dict, if given.
    """

    config: LearningRateConfig
    seeds: tuple[int, ...]
    lrs: np.ndarray
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    diverged: dict[str, np.ndarray]
    norms_start: dict[str, np.ndarray]
    norms_end: dict[str, np.ndarray]
    summary: dict = field(default_factory=dict)

    @classmethod
    def from_seed_results(
        cls,
        config: LearningRateConfig,
        results: Mapping[int, dict],
        summary: Mapping[str, Any] | None = None,
    ) -> Sweep:
        """Build from seed -> :func:`~.learning_rate.run_seed` result.

        Raises:
            ValueError: If ``results`` is empty.
        """
        if not results:
            raise ValueError("Sweep.from_seed_results(): expected results, got none.")
        seeds = tuple(sorted(results))
        arrays: dict[str, dict[str, np.ndarray]] = {
            k: {} for k in ("val", "test", "div", "n0", "n1")
        }
        for arm in config.arms:
            runs = [[results[s]["units"][f"{arm}/lr={lr:g}"] for lr in config.lrs] for s in seeds]
            arrays["val"][arm] = np.array(
                [[accuracy_or_chance(r, "val_accuracy", CHANCE) for r in row] for row in runs]
            )
            arrays["test"][arm] = np.array(
                [[accuracy_or_chance(r, "test_accuracy", CHANCE) for r in row] for row in runs]
            )
            arrays["div"][arm] = np.array(
                [[diverged(r) for r in row] for row in runs],
                dtype=bool,
            )
            for key, at in (("n0", 0), ("n1", -1)):
                arrays[key][arm] = np.array(
                    [[[_nan(v) for v in r["weight_norms"][at]] for r in row] for row in runs],
                    dtype=np.float64,
                )
        return cls(
            config=config,
            seeds=seeds,
            lrs=np.asarray(config.lrs, dtype=np.float64),
            val=arrays["val"],
            test=arrays["test"],
            diverged=arrays["div"],
            norms_start=arrays["n0"],
            norms_end=arrays["n1"],
            summary=dict(summary or {}),
        )

    def effective_rate(self, arm: str, at: str) -> np.ndarray:
        """``(S, L)``: lr / ||W||^2 at ``"start"`` or ``"end"``, geometric mean over layers."""
        norms = self.norms_start[arm] if at == "start" else self.norms_end[arm]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_sq = np.log(norms**2).mean(axis=2)
            return self.lrs[None, :] / np.exp(log_sq)


def _per_seed_arm(sweep: Sweep, arm: str) -> dict[str, Any]:
    """One arm's per-seed numbers: largest stable rate, best rate and accuracies, good range."""
    config = sweep.config
    keys = ("largest_stable", "largest_learned", "best_lr", "best_val", "best_test")
    out: dict[str, list] = {k: [] for k in keys}
    out.update(good_range=[], width=[], autotune=[])
    for i, _ in enumerate(sweep.seeds):
        stable = largest_stable_rate(config.lrs, sweep.diverged[arm][i].tolist())
        best = best_index(sweep.val[arm][i])
        rates = good_range(sweep.val[arm][i], config.within, sweep.diverged[arm][i])
        out["largest_stable"].append(stable)
        out["largest_learned"].append(
            largest_learning_rate(config.lrs, sweep.val[arm][i].tolist(), sweep.diverged[arm][i])
        )
        out["best_lr"].append(config.lrs[best])
        out["best_val"].append(float(sweep.val[arm][i, best]))
        out["best_test"].append(float(sweep.test[arm][i, best]))
        out["good_range"].append([config.lrs[k] for k in rates])
        out["width"].append(len(rates) * config.step_half_decades)
        factor = None
        if stable is not None:
            k = config.lrs.index(stable)
            start, end = sweep.norms_start[arm][i, k], sweep.norms_end[arm][i, k]
            factor = autotune_factor(
                [None if math.isnan(v) else v for v in start],
                [None if math.isnan(v) else v for v in end],
            )
        out["autotune"].append(factor)
    return out


def _by_rate(sweep: Sweep, arm: str) -> dict[str, list]:
    with np.errstate(invalid="ignore"):
        return {
            "test_mean": sweep.test[arm].mean(axis=0).tolist(),
            "diverged": sweep.diverged[arm].sum(axis=0).astype(int).tolist(),
            "effective_start": _geo_mean(sweep.effective_rate(arm, "start")),
            "effective_end": _geo_mean(
                np.where(sweep.diverged[arm], np.nan, sweep.effective_rate(arm, "end"))
            ),
        }


def _geo_mean(values: np.ndarray) -> list[float | None]:
    """Per column, the geometric mean of the finite positive values (``None`` if none)."""
    out = []
    for column in values.T:
        keep = column[np.isfinite(column) & (column > 0)]
        out.append(float(np.exp(np.log(keep).mean())) if len(keep) else None)
    return out


def _stats(values: Sequence[float | None]) -> dict[str, Any] | None:
    clean = [v for v in values if v is not None and math.isfinite(v)]
    return mean_std(clean) if clean else None


def summarize(config: LearningRateConfig, results: Mapping[int, dict]) -> dict:
    """Judge :data:`~.learning_rate.RULES` on a run's results.

    Returns:
        A JSON-serialisable dict: ``experiment``, ``claim``, ``seeds``, ``seconds``; ``lrs``;
        per arm (``arms``) the per-seed ``largest_stable``, ``largest_learned``, ``best_lr``,
        ``best_val``, ``best_test``, ``good_range``, ``width`` (half-decades) and ``autotune``
        (the rule reads the BN arms'; also computed without BN, for comparison), and per rate
        ``test_mean``, ``diverged`` (count of seeds), ``effective_start``/``effective_end``
        (geometric means over seeds); ``claims`` (one verdict row per rule); ``report``
        (lines); ``figure_notes``.
    """
    sweep = Sweep.from_seed_results(config, results)
    arms = {arm: {**_per_seed_arm(sweep, arm), **_by_rate(sweep, arm)} for arm in config.arms}
    effects: dict[str, list[float | None]] = {}
    measured: dict[str, str] = {}
    for net in NETS:
        bn, none = arms[arm_name(net, "bn")], arms[arm_name(net, "none")]
        effects[f"stable_{net}"] = [
            stable_gap(a, b, config.lrs)
            for a, b in zip(bn["largest_stable"], none["largest_stable"], strict=True)
        ]
        effects[f"best_{net}"] = [
            100 * (a - b) for a, b in zip(bn["best_test"], none["best_test"], strict=True)
        ]
        effects[f"range_{net}"] = [a - b for a, b in zip(bn["width"], none["width"], strict=True)]
        measured[f"stable_{net}"] = (
            "largest stable rate per seed: without BN {}, with BN {}".format(
                _rates(none["largest_stable"]), _rates(bn["largest_stable"])
            )
        )
        measured[f"best_{net}"] = "best test accuracy: without BN {:.3f}, with BN {:.3f}".format(
            np.mean(none["best_test"]), np.mean(bn["best_test"])
        )
        measured[f"range_{net}"] = (
            "good range: without BN {:.2g}, with BN {:.2g} half-decades (means)".format(
                np.mean(none["width"]), np.mean(bn["width"])
            )
        )
    factors = [arms[arm_name(net, "bn")]["autotune"] for net in NETS]
    effects["autotune"] = [
        None if any(f is None for f in per_net) else min(per_net)
        for per_net in zip(*factors, strict=True)
    ]
    measured["autotune"] = "factor with BN: " + ", ".join(
        f"{net} {_fmt_mean(arms[arm_name(net, 'bn')]['autotune'], '.3g')}" for net in NETS
    )
    claims = judge_rules(RULES, effects, measured)
    summary: dict[str, Any] = {
        "experiment": "learning_rate",
        "claim": CLAIM,
        "seeds": list(sweep.seeds),
        "seconds": float(sum(r["seconds"] for r in results.values())),
        "dataset": config.dataset,
        "lrs": list(config.lrs),
        "arms": arms,
        "claims": claims,
        "figure_notes": FIGURE_NOTES,
    }
    summary["report"] = _report(config, summary)
    return summary


def _rates(values: Sequence[float | None]) -> str:
    return "[" + ", ".join("none" if v is None else f"{v:g}" for v in values) + "]"


def _fmt_mean(values: Sequence[float | None], spec: str) -> str:
    stats = _stats(values)
    if stats is None:
        return "-"
    return f"{stats['mean']:{spec}} ± {stats['std']:{spec}}"


def claims_lines(claims: Sequence[Mapping[str, Any]]) -> list[str]:
    """The verdict lines, then one plain line naming the claims that did not hold (and the
    inconclusive ones)."""
    lines = [verdict_line(c) for c in claims]
    failed = [c["key"] for c in claims if c["verdict"] == "not held"]
    unclear = [c["key"] for c in claims if c["verdict"] == "inconclusive"]
    if failed:
        lines.append("Did not hold: " + ", ".join(failed) + ".")
    if unclear:
        lines.append(
            "Inconclusive (the seeds disagree or too few ran): " + ", ".join(unclear) + "."
        )
    if claims and not failed and not unclear:
        lines.append("Every claim held.")
    return lines


def _report(config: LearningRateConfig, s: Mapping[str, Any]) -> list[str]:
    n = len(s["seeds"])
    lrs = config.lrs
    lines = [
        f"Learning-rate sweep on {s['dataset']}: {config.steps} SGD steps of {config.batch_size} "
        f"per run, {len(lrs)} rates {lrs[0]:g} .. {lrs[-1]:g} "
        f"({config.step_half_decades:.3g} half-decades apart), {n} seed{'s' if n != 1 else ''}; "
        f"final accuracy = last measurement, chance ({CHANCE:g}) for a diverged run "
        "(non-finite or not-decreasing training loss).",
    ]
    for net in NETS:
        none, bn = s["arms"][arm_name(net, "none")], s["arms"][arm_name(net, "bn")]
        lines += [
            "",
            f"{net}: {NET_LABELS[net]}, {NETS[net][0]}x{config.hidden}",
            f"  {'rate':>9}  {'no BN: test acc (div)':>22}  {'BN: test acc (div)':>20}  "
            f"{'BN: lr/||W||^2 start -> end':>28}",
        ]
        for k, lr in enumerate(lrs):
            start, end = bn["effective_start"][k], bn["effective_end"][k]
            eff = f"{_g(start)} -> {_g(end)}"
            lines.append(
                f"  {lr:>9g}  {none['test_mean'][k]:>14.3f} ({none['diverged'][k]}/{n})"
                f"  {bn['test_mean'][k]:>12.3f} ({bn['diverged'][k]}/{n})  {eff:>28}"
            )
        lines += [
            f"  largest stable rate per seed: without BN {_rates(none['largest_stable'])}, "
            f"with BN {_rates(bn['largest_stable'])}",
            f"  largest rate that learned (stable, validation >= chance + "
            f"{100 * LEARNED_MARGIN:g} pp; described, not judged): without BN "
            f"{_rates(none['largest_learned'])}, with BN {_rates(bn['largest_learned'])}",
            f"  best rate by validation per seed: without BN {_rates(none['best_lr'])}, with BN "
            f"{_rates(bn['best_lr'])}; test accuracy there: without BN "
            f"{_fmt_mean(none['best_test'], '.3f')}, with BN {_fmt_mean(bn['best_test'], '.3f')}",
            f"  rates within {100 * config.within:g} pp of the best validation accuracy "
            f"(half-decades): without BN {_fmt_mean(none['width'], '.2g')}, with BN "
            f"{_fmt_mean(bn['width'], '.2g')}",
            f"  auto-tuning factor (effective rate start / end) at the largest stable rate: "
            f"with BN {_fmt_mean(bn['autotune'], '.3g')}, without BN (no scale invariance; for "
            f"comparison) "
            f"{_fmt_mean(none['autotune'], '.3g')}",
        ]
    lines.append("")
    lines += claims_lines(s["claims"])
    return lines


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"
