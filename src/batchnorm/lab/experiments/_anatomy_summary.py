"""The anatomy experiment's verdicts and report: per-seed effects of each rule (by its key,
:data:`EFFECTS`), the per-layer numbers, a step-by-step walk through one unit, and the printed
report. The rules themselves are declared in :mod:`batchnorm.lab.experiments.anatomy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._classify import best_smoothed
from .._training import mean_std
from ..protocol import Rule, judge_rules, verdict_line
from ._anatomy_config import ACTIVATIONS, CLAIM, GAUSSIAN_SHARE, AnatomyConfig
from ._anatomy_measure import SHARE_TOLERANCE, SKEW_TOLERANCE

__all__ = ["DIGITS_CAP", "EFFECTS", "FIGURE_NOTES", "summarize"]

# A deviation of exactly 0 (possible when float64 arithmetic happens to be exact) would give
# an infinite -log10; the effects are capped at float64's resolution instead.
DIGITS_CAP = 16.0


def _values(result: Mapping[str, Any], key: str, layer: str | None = None) -> np.ndarray:
    """Every unit's ``key`` over both networks (and every layer, or ``layer``), NaN for None."""
    values = []
    for name in ACTIVATIONS:
        layers = result["units"][name]["layers"]
        for k in [layer] if layer is not None else sorted(layers, key=int):
            values += [math.nan if v is None else float(v) for v in layers[k][key]]
    return np.asarray(values, dtype=np.float64)


def _digits(deviations: np.ndarray) -> float | None:
    finite = deviations[np.isfinite(deviations)]
    if not finite.size:
        return None
    return min(DIGITS_CAP, -math.log10(max(float(finite.max()), 10.0**-DIGITS_CAP)))


def _standardizes(config: AnatomyConfig, result: Mapping[str, Any]) -> float | None:
    return _digits(_values(result, "standardize_deviation"))


def _shape_kept(config: AnatomyConfig, result: Mapping[str, Any]) -> float | None:
    return _digits(_values(result, "shape_deviation"))


def _gaussian(config: AnatomyConfig, result: Mapping[str, Any]) -> float:
    flags = []
    for name in ACTIVATIONS:
        flags += result["units"][name]["layers"][str(config.layer)]["gaussian"]
    return float(np.mean(flags))


# Rule key -> effect(config, one seed's result): larger favours the claim.
EFFECTS: dict[str, Callable[[AnatomyConfig, Mapping[str, Any]], float | None]] = {
    "standardizes": _standardizes,
    "shape_kept": _shape_kept,
    "gaussian": _gaussian,
}

# Figure name -> what to see in it (plot() draws exactly these).
FIGURE_NOTES = {
    "histograms": (
        "One seed's measured batch, a few units of the chosen layer from least to most "
        "skewed: the raw input, x_hat and the output each with the Gaussian of the same mean "
        "and variance; x_hat and the output have exactly the input's shape, only the axis "
        "changes, so a skewed input stays skewed."
    ),
    "shape": (
        "Every unit of the chosen layer, every seed: the share of x_hat within +-1 against its "
        "skewness; the box is what the 'looks Gaussian' test accepts around a standard "
        "normal's (68.3 %, 0). Points outside it are units BN standardized but did not make "
        "Gaussian."
    ),
    "affine": (
        "The learned scale gamma and shift beta of every unit of every hidden layer, every "
        "seed: where the training moved them from their start at (1, 0)."
    ),
}


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """:func:`mean_std` of the finite values, ``None`` for the others (a layer none of whose
    units could be measured, e.g. after a diverged training)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"per_seed": [None] * len(values), "mean": None, "std": None}
    stats = mean_std(finite)
    stats["per_seed"] = [v if math.isfinite(v) else None for v in values]
    return stats


def _per_layer(config: AnatomyConfig, results: Mapping[int, dict]) -> dict[str, dict[str, Any]]:
    """Network -> layer -> the numbers the report's table prints (per-seed lists and means)."""
    table: dict[str, dict[str, Any]] = {}
    for name in ACTIVATIONS:
        table[name] = {}
        for layer in (str(k) for k in range(1, config.depth + 1)):
            rows: dict[str, list[float]] = {
                "gaussian_share": [],
                "input_gaussian_share": [],
                "mean_share_within_1": [],
                "median_abs_skew": [],
                "median_kurt": [],
                "gamma_mean": [],
                "gamma_std": [],
                "beta_mean": [],
                "beta_std": [],
            }
            for seed in sorted(results):
                m = results[seed]["units"][name]["layers"][layer]

                def arr(key: str, m: Mapping[str, Any] = m) -> np.ndarray:
                    return np.asarray(
                        [math.nan if v is None else v for v in m[key]], dtype=np.float64
                    )

                rows["gaussian_share"].append(float(np.mean(m["gaussian"])))
                rows["input_gaussian_share"].append(float(np.mean(m["input_gaussian"])))
                rows["mean_share_within_1"].append(float(np.nanmean(arr("share"))))
                rows["median_abs_skew"].append(float(np.nanmedian(np.abs(arr("skew")))))
                rows["median_kurt"].append(float(np.nanmedian(arr("kurt"))))
                rows["gamma_mean"].append(float(np.nanmean(arr("gamma"))))
                rows["gamma_std"].append(float(np.nanstd(arr("gamma"))))
                rows["beta_mean"].append(float(np.nanmean(arr("beta"))))
                rows["beta_std"].append(float(np.nanstd(arr("beta"))))
            table[name][layer] = {key: _stats(values) for key, values in rows.items()}
    return table


def _walk_through(config: AnatomyConfig, result: Mapping[str, Any]) -> list[str]:
    """The textbook's steps for the most skewed shown unit of the first network and seed."""
    name = ACTIVATIONS[0]
    unit = result["units"][name]
    layer = str(config.layer)
    m = unit["layers"][layer]
    k = unit["shown"]["units"][-1]

    def value(key: str) -> float:
        v = m[key][k]
        return math.nan if v is None else float(v)

    batch = unit["batch"]
    return [
        f"Step by step, seed {result['seed']}, {name} network, hidden layer {layer}, unit {k} "
        f"(the most skewed of the units shown), one batch of m = {batch} training examples:",
        f"  1. batch statistics: mu_B = {value('mean'):.5g}, sigma_B^2 = {value('var'):.5g} "
        f"(biased, divide by m); the layer's own: {value('layer_mean'):.5g}, "
        f"{value('layer_var'):.5g}.",
        f"  2. x_hat = (x - mu_B) / sqrt(sigma_B^2 + eps): mean {value('xhat_mean'):.2e}, "
        f"variance {value('xhat_var'):.8f} (sigma^2/(sigma^2+eps) = "
        f"{value('xhat_var_expected'):.8f}); within +-1: {100 * value('share'):.1f} % "
        f"(a standard normal: {100 * GAUSSIAN_SHARE:.1f} %); skewness {value('skew'):+.3f}, "
        f"excess kurtosis {value('kurt'):+.3f} (the input's: {value('input_skew'):+.3f}, "
        f"{value('input_kurt'):+.3f}).",
        f"  3. y = gamma x_hat + beta with gamma = {value('gamma'):.4f}, beta = "
        f"{value('beta'):+.4f}: mean {value('out_mean'):+.4f}, standard deviation "
        f"{value('out_std'):.4f}.",
    ]


def _percent(stats: Mapping[str, Any]) -> str:
    return "n/a" if stats["mean"] is None else f"{100 * stats['mean']:.0f} %"


def summarize(
    config: AnatomyConfig, results: Mapping[int, dict], rules: Sequence[Rule]
) -> dict[str, Any]:
    """Judge the rules on a run's results; numbers, verdicts and a printable report.

    Returns:
        A JSON-serialisable dict: ``experiment``, ``claim``, ``seeds``, ``dataset``,
        ``steps``, ``lrs``, ``layer``, ``effects`` (rule key -> per-seed effects),
        ``per_layer`` (network -> layer -> measure -> ``per_seed``/``mean``/``std``),
        ``val_accuracy`` (network -> best smoothed validation accuracy per seed),
        ``claims`` (one :meth:`~batchnorm.lab.protocol.Verdict.to_dict` row per rule),
        ``figure_notes``, ``seconds`` (the seeds' sum) and ``report`` (lines).

    Raises:
        ValueError: If ``results`` is empty or a rule's key has no effect here.
    """
    if not results:
        raise ValueError("anatomy summarize(): expected results of at least one seed, got none.")
    unknown = [rule.key for rule in rules if rule.key not in EFFECTS]
    if unknown:
        raise ValueError(
            f"anatomy summarize(): expected rules with keys among {list(EFFECTS)}, got {unknown}."
        )
    seeds = sorted(results)
    effects = {rule.key: [EFFECTS[rule.key](config, results[s]) for s in seeds] for rule in rules}
    per_layer = _per_layer(config, results)
    accuracy = {
        name: [
            best_smoothed(results[s]["units"][name]["run"]["curve"]["val_accuracy"], config.smooth)
            for s in seeds
        ]
        for name in ACTIVATIONS
    }
    layer = str(config.layer)
    measured = {
        "standardizes": "worst deviation 10^-(effect) over "
        f"{2 * config.depth * config.hidden} units per seed",
        "shape_kept": "worst relative change of skewness or kurtosis 10^-(effect) over "
        f"{2 * config.depth * config.hidden} units per seed",
        "gaussian": ", ".join(
            f"{name} {_percent(per_layer[name][layer]['gaussian_share'])} of units"
            for name in ACTIVATIONS
        )
        + f" look Gaussian after BN (layer {layer}, mean over seeds); before BN: "
        + ", ".join(
            f"{name} {_percent(per_layer[name][layer]['input_gaussian_share'])}"
            for name in ACTIVATIONS
        ),
    }
    claims = judge_rules(rules, effects, measured)
    assert config.lrs is not None  # filled in by __post_init__
    summary: dict[str, Any] = {
        "experiment": "anatomy",
        "claim": CLAIM,
        "seeds": seeds,
        "dataset": config.dataset,
        "steps": config.steps,
        "lrs": dict(config.lrs),
        "layer": config.layer,
        "effects": effects,
        "per_layer": per_layer,
        "val_accuracy": {
            name: [v if math.isfinite(v) else None for v in values]
            for name, values in accuracy.items()
        },
        "claims": claims,
        "figure_notes": dict(FIGURE_NOTES),
        "seconds": float(sum(results[s]["seconds"] for s in seeds)),
    }
    summary["report"] = _report(config, results, summary)
    return summary


def _report(config: AnatomyConfig, results: Mapping[int, dict], s: Mapping[str, Any]) -> list[str]:
    seeds = s["seeds"]
    n = len(seeds)
    assert config.lrs is not None  # filled in by __post_init__
    nets = ", ".join(
        f"{name} (lr {config.lrs[name]:g}; best smoothed validation accuracy "
        f"{100 * np.nanmean([np.nan if v is None else v for v in s['val_accuracy'][name]]):.1f} %)"
        for name in ACTIVATIONS
    )
    lines = [
        f"Anatomy of BN on {config.dataset}: {config.depth}x{config.hidden} MLPs with BN, "
        f"{config.steps} SGD steps of {config.batch_size}: {nets}; then one batch of "
        f"{config.measure_batch} training examples through each in training mode; "
        f"{n} seed{'s' if n != 1 else ''}, mean ± std over seeds.",
        "",
        *_walk_through(config, results[seeds[0]]),
        "",
        f"Per layer: share of units that look Gaussian (within +-1 within {SHARE_TOLERANCE:g} "
        f"of {100 * GAUSSIAN_SHARE:.1f} % and |skew| < {SKEW_TOLERANCE:g}) after BN (x_hat) "
        "and before it (the input, by its own standard deviation: BN cannot change this "
        "test's outcome, only move and rescale), the mean share within +-1, the median "
        "|skew| and excess kurtosis of x_hat, and gamma and beta (mean and spread over the "
        "layer's units)",
        f"{'network':>8}{'layer':>6}{'Gaussian':>14}{'before BN':>14}{'within 1':>14}"
        f"{'|skew|':>13}{'kurtosis':>13}{'gamma':>17}{'beta':>17}",
    ]
    for name in ACTIVATIONS:
        for layer, row in s["per_layer"][name].items():

            def cell(key: str, scale: float = 1.0, row: Mapping[str, Any] = row) -> str:
                if row[key]["mean"] is None:
                    return "n/a"
                return f"{scale * row[key]['mean']:.2f}±{scale * row[key]['std']:.2f}"

            def spread(key: str, row: Mapping[str, Any] = row) -> str:
                mean, sd = row[f"{key}_mean"]["mean"], row[f"{key}_std"]["mean"]
                return "n/a" if mean is None else f"{mean:+.2f} (sd {sd:.2f})"

            gamma, beta = spread("gamma"), spread("beta")
            lines.append(
                f"{name:>8}{layer:>6}{cell('gaussian_share', 100) + ' %':>14}"
                f"{cell('input_gaussian_share', 100) + ' %':>14}"
                f"{cell('mean_share_within_1', 100) + ' %':>14}{cell('median_abs_skew'):>13}"
                f"{cell('median_kurt'):>13}{gamma:>17}{beta:>17}"
            )
    lines += [
        "",
        "Claims (rules declared in batchnorm.lab.experiments.anatomy before any result; 'held' "
        "needs the stated share of seeds above the threshold):",
    ]
    lines += [verdict_line(claim) for claim in s["claims"]]
    failed = [c["key"] for c in s["claims"] if c["verdict"] != "held"]
    if failed:
        lines.append(
            "Did not hold: "
            + "; ".join(f"{c['key']} ({c['verdict']})" for c in s["claims"] if c["key"] in failed)
            + "."
        )
    else:
        lines.append("Every claim held.")
    return lines
