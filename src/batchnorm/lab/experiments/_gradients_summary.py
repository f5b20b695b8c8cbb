"""The gradients experiment's verdicts and report: per-seed effects of each rule (by its key,
:data:`EFFECTS`), the tables of ratios and growth rates, and the printed report. The rules
themselves are declared in :mod:`batchnorm.lab.experiments.gradients`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._classify import best_smoothed
from .._training import mean_std
from ..protocol import Rule, judge_rules, verdict_line
from ._gradients_config import ACTIVATIONS, ARMS, CLAIM, NORMS, GradientsConfig, arm_name
from ._gradients_training import init_unit_name, train_unit_name

__all__ = ["EFFECTS", "FIGURE_NOTES", "log10_ratio", "settling", "summarize"]


def log10_ratio(unit: Mapping[str, Any]) -> float | None:
    """log10 of an init unit's first/last ratio (``None`` if it has none)."""
    ratio = unit["ratio"]
    return None if ratio is None else math.log10(ratio)


def _ratio_row(norms: Sequence[float | None]) -> float | None:
    first, last = norms[0], norms[-1]
    if first is None or last is None or not (first > 0 and last > 0):
        return None
    return math.log10(first / last)


def settling(config: GradientsConfig, unit: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """A training unit's ``|log10 first/last|`` at update 0 and the median over its records of
    the second half of training (updates >= ``train_steps / 2``); ``None`` where missing."""
    values = [_ratio_row(n) for n in unit["norms"]]
    start = abs(values[0]) if values and values[0] is not None else None
    late = [
        abs(v)
        for u, v in zip(unit["updates"], values, strict=True)
        if u >= config.train_steps / 2 and v is not None
    ]
    return start, float(np.median(late)) if late else None


def _over_batches(
    config: GradientsConfig,
    result: Mapping[str, Any],
    activation: str,
    norm: str,
    effect: Callable[[float], float],
) -> float | None:
    """The smallest over batch sizes of ``effect(log10 ratio)`` at the deepest depth (``None``
    if any batch size has no ratio: the claim cannot be checked there)."""
    depth = max(config.depths)
    values = []
    for b in config.batch_sizes:
        r = log10_ratio(result["units"][init_unit_name(activation, norm, depth, b)])
        if r is None:
            return None
        values.append(effect(r))
    return min(values)


def _sigmoid_vanishes(config: GradientsConfig, result: Mapping[str, Any]) -> float | None:
    return _over_batches(config, result, "sigmoid", "none", lambda r: -r)


def _bn_removes_vanishing(config: GradientsConfig, result: Mapping[str, Any]) -> float | None:
    return _over_batches(config, result, "sigmoid", "batchnorm", lambda r: r)


def _yang_relu_explodes(config: GradientsConfig, result: Mapping[str, Any]) -> float | None:
    name = init_unit_name("relu", "batchnorm", max(config.depths), max(config.batch_sizes))
    return result["units"][name]["growth"]


def _bn_prevents_explosion(config: GradientsConfig, result: Mapping[str, Any]) -> float | None:
    return _over_batches(config, result, "relu", "batchnorm", lambda r: -r)


def _bn_evens_relu(config: GradientsConfig, result: Mapping[str, Any]) -> float | None:
    depth = max(config.depths)
    values = []
    for b in config.batch_sizes:
        plain = log10_ratio(result["units"][init_unit_name("relu", "none", depth, b)])
        bn = log10_ratio(result["units"][init_unit_name("relu", "batchnorm", depth, b)])
        if plain is None or bn is None:
            return None
        values.append(abs(plain) - abs(bn))
    return min(values)


def _yang_settles(config: GradientsConfig, result: Mapping[str, Any]) -> float | None:
    start, late = settling(config, result["units"][train_unit_name("relu", "batchnorm")])
    return None if start is None or late is None else start - late


# Rule key -> effect(config, one seed's result): larger favours the claim; None: not measured.
EFFECTS: dict[str, Callable[[GradientsConfig, Mapping[str, Any]], float | None]] = {
    "sigmoid_vanishes": _sigmoid_vanishes,
    "bn_removes_vanishing": _bn_removes_vanishing,
    "yang_relu_explodes": _yang_relu_explodes,
    "bn_prevents_explosion": _bn_prevents_explosion,
    "bn_evens_relu": _bn_evens_relu,
    "yang_settles": _yang_settles,
}

# Figure name -> what to see in it (plot() draws exactly these).
FIGURE_NOTES = {
    "profile": (
        "Each hidden layer's weight-gradient norm at initialization relative to the last "
        "hidden layer's, deepest network, largest batch, every seed: a line falling towards "
        "the input (left) is a vanishing gradient, a rising one an exploding gradient; the "
        "dotted line is Yang et al.'s 1.21 per layer."
    ),
    "growth": (
        "The fitted growth per layer towards the input at initialization against the batch "
        "size, per depth (line style) and norm (colour), every seed a dot: 1 is an even "
        "spread, Yang et al. predict 1.21 for ReLU + BN at large batches."
    ),
    "training": (
        "log10 of the first over the last hidden layer's gradient norm while training, every "
        "seed a thin line and the mean a thick one: how far the per-layer gradients are "
        "apart at each update (0: even)."
    ),
}


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"per_seed": list(values), "mean": None, "std": None}
    stats = mean_std(finite)
    stats["per_seed"] = [v if v is not None and math.isfinite(v) else None for v in values]
    return stats


def summarize(
    config: GradientsConfig, results: Mapping[int, dict], rules: Sequence[Rule]
) -> dict[str, Any]:
    """Judge the rules on a run's results; numbers, verdicts and a printable report.

    Returns:
        A JSON-serialisable dict: ``experiment``, ``claim``, ``seeds``, ``dataset``,
        ``depths``, ``batch_sizes``, ``width``, ``train`` (depth, width, steps, ``lrs``),
        ``effects`` (rule key -> per-seed effects), ``init`` (arm -> depth -> batch size ->
        ``log10_ratio`` and ``growth``, each ``per_seed``/``mean``/``std``), ``training``
        (arm -> ``val_accuracy``, ``start`` and ``late`` ``|log10 first/last|``), ``claims``
        (one :meth:`~batchnorm.lab.protocol.Verdict.to_dict` row per rule),
        ``figure_notes``, ``seconds`` (the seeds' sum) and ``report`` (lines).

    Raises:
        ValueError: If ``results`` is empty or a rule's key has no effect here.
    """
    if not results:
        raise ValueError("gradients summarize(): expected results of at least one seed, got none.")
    unknown = [rule.key for rule in rules if rule.key not in EFFECTS]
    if unknown:
        raise ValueError(
            f"gradients summarize(): expected rules with keys among {list(EFFECTS)}, got {unknown}."
        )
    seeds = sorted(results)
    effects = {rule.key: [EFFECTS[rule.key](config, results[s]) for s in seeds] for rule in rules}
    init: dict[str, Any] = {}
    for a in ACTIVATIONS:
        for n in NORMS:
            init[arm_name(a, n)] = {
                str(d): {
                    str(b): {
                        "log10_ratio": _stats(
                            [
                                log10_ratio(results[s]["units"][init_unit_name(a, n, d, b)])
                                for s in seeds
                            ]
                        ),
                        "growth": _stats(
                            [
                                results[s]["units"][init_unit_name(a, n, d, b)]["growth"]
                                for s in seeds
                            ]
                        ),
                    }
                    for b in config.batch_sizes
                }
                for d in config.depths
            }
    training: dict[str, Any] = {}
    for arm in ARMS:
        a, n = arm.split("/")
        units = [results[s]["units"][train_unit_name(a, n)] for s in seeds]
        pairs = [settling(config, u) for u in units]
        accuracy = [best_smoothed(u["run"]["curve"]["val_accuracy"], config.smooth) for u in units]
        training[arm] = {
            "val_accuracy": _stats(accuracy),
            "diverged": [bool(u["run"]["diverged"]) for u in units],
            "start": _stats([p[0] for p in pairs]),
            "late": _stats([p[1] for p in pairs]),
        }
    deepest, largest = str(max(config.depths)), str(max(config.batch_sizes))

    def mean_of(arm: str, key: str, batch: str = largest) -> str:
        value = init[arm][deepest][batch][key]["mean"]
        return "n/a" if value is None else f"{value:.3g}"

    def by_batch(arm: str) -> str:
        return ", ".join(f"b{b} {mean_of(arm, 'log10_ratio', str(b))}" for b in config.batch_sizes)

    where = f"log10 first/last at depth {deepest} (mean over seeds)"
    measured = {
        "sigmoid_vanishes": f"{where}: {by_batch('sigmoid/none')}",
        "bn_removes_vanishing": f"{where}: with BN {by_batch('sigmoid/batchnorm')}; without "
        f"{by_batch('sigmoid/none')}",
        "yang_relu_explodes": f"growth per layer {mean_of('relu/batchnorm', 'growth')} "
        f"(Yang: 1.21) at depth {deepest}, batch {largest} (mean over seeds)",
        "bn_prevents_explosion": f"{where}: {by_batch('relu/batchnorm')}",
        "bn_evens_relu": f"{where}: without BN {by_batch('relu/none')}; with "
        f"{by_batch('relu/batchnorm')}",
        "yang_settles": "|log10 first/last| at update 0 vs late in training: "
        + _pair(training["relu/batchnorm"]),
    }
    claims = judge_rules(rules, effects, measured)
    assert config.lrs is not None  # filled in by __post_init__
    summary: dict[str, Any] = {
        "experiment": "gradients",
        "claim": CLAIM,
        "seeds": seeds,
        "dataset": config.dataset,
        "depths": list(config.depths),
        "batch_sizes": list(config.batch_sizes),
        "width": config.width,
        "train": {
            "depth": config.train_depth,
            "width": config.train_width,
            "steps": config.train_steps,
            "batch": config.train_batch,
            "lrs": dict(config.lrs),
        },
        "effects": effects,
        "init": init,
        "training": training,
        "claims": claims,
        "figure_notes": dict(FIGURE_NOTES),
        "seconds": float(sum(results[s]["seconds"] for s in seeds)),
    }
    summary["report"] = _report(config, summary)
    return summary


def _pair(row: Mapping[str, Any]) -> str:
    start, late = row["start"]["mean"], row["late"]["mean"]
    if start is None or late is None:
        return "n/a"
    return f"{start:.3g} -> {late:.3g} (means over seeds)"


def _cell(stats: Mapping[str, Any], digits: int = 2, sign: str = "+") -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:{sign}.{digits}f}±{stats['std']:.{digits}f}"


def _report(config: GradientsConfig, s: Mapping[str, Any]) -> list[str]:
    n = len(s["seeds"])
    lines = [
        f"Per-layer gradient norms on {config.dataset}: MLPs of width {config.width}, depths "
        f"{', '.join(map(str, config.depths))}, sigmoid (Glorot init) and ReLU (He init), "
        "without and with BN, at initialization (one real batch of each size "
        f"{', '.join(map(str, config.batch_sizes))}, float64); and {config.train_depth}x"
        f"{config.train_width} networks trained {config.train_steps} SGD steps of "
        f"{config.train_batch}; {n} seed{'s' if n != 1 else ''}, mean ± std over seeds.",
        "",
        "At initialization: log10 of |dL/dW_1| / |dL/dW_D| (below 0: vanishing towards the "
        "input, above: exploding) | growth per layer towards the input (1: even; Yang et al.: "
        "1.21 for ReLU + BN)",
    ]
    header = f"{'arm':>18}{'depth':>6}" + "".join(f"{'b' + str(b):>26}" for b in config.batch_sizes)
    lines.append(header)
    for arm in ARMS:
        for d in config.depths:
            cells = ""
            for b in config.batch_sizes:
                row = s["init"][arm][str(d)][str(b)]
                text = f"{_cell(row['log10_ratio'])} | {_cell(row['growth'], 3, sign='')}"
                cells += f"{text:>26}"
            lines.append(f"{arm:>18}{d:>6}{cells}")
    lines += [
        "",
        f"Training ({config.train_depth}x{config.train_width}): learning rate, best smoothed "
        "validation accuracy, |log10 first/last| of the training gradient at update 0 and "
        "late in training (median over the second half's records)",
    ]
    for arm in ARMS:
        row = s["training"][arm]
        accuracy = row["val_accuracy"]
        acc = (
            "n/a"
            if accuracy["mean"] is None
            else (f"{100 * accuracy['mean']:.1f}±{100 * accuracy['std']:.1f} %")
        )
        diverged = sum(row["diverged"])
        assert config.lrs is not None  # filled in by __post_init__
        lines.append(
            f"{arm:>18}  lr {config.lrs[arm]:<7g} accuracy {acc:>14}   |log10 first/last| "
            f"{_pair(row)}" + (f"; {diverged} seed(s) diverged" if diverged else "")
        )
    lines += [
        "",
        "Claims (rules declared in batchnorm.lab.experiments.gradients before any result; "
        "'held' needs the stated share of seeds above the threshold):",
    ]
    lines += [verdict_line(claim) for claim in s["claims"]]
    failed = [c for c in s["claims"] if c["verdict"] != "held"]
    if failed:
        lines.append(
            "Did not hold: " + "; ".join(f"{c['key']} ({c['verdict']})" for c in failed) + "."
        )
    else:
        lines.append("Every claim held.")
    return lines
