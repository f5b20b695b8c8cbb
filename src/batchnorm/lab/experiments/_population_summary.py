"""The verdict of a population run: :func:`summarize` computes each rule's per-seed effect,
judges it (:meth:`batchnorm.lab.protocol.Rule.judge`), and writes the numbers and the printable
report of ``summary.json`` and ``summary.md``.

The rules themselves, with their thresholds and margin, are declared in
:mod:`batchnorm.lab.experiments.population`; this module only knows how to measure each one,
by its key (:data:`EFFECTS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._training import mean_std
from ..protocol import Rule, Verdict
from ._population_config import PopulationConfig
from ._population_result import PopulationResult
from ._population_spec import (
    CLAIM,
    CONTROL,
    EXACT,
    LAG_BATCH_SIZE,
    NATIVE_MOMENTUM,
    PHASES,
    SPLITS,
    ema_method,
)

__all__ = ["EFFECTS", "FIGURE_NOTES", "summarize"]

_EMA = ema_method(NATIVE_MOMENTUM)


def _difference(result: PopulationResult, phase: str, method: str) -> np.ndarray:
    """``(S, B)``: test loss with ``method`` minus test loss with the exact statistics."""
    test = result.loss["test"][phase]
    return test[method] - test[EXACT]


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def _exact_no_worse(result: PopulationResult, margin: float) -> tuple[np.ndarray, str]:
    effect = _difference(result, "end", _EMA).min(axis=1) + margin
    test = result.loss["test"]["end"]
    pairs = ", ".join(
        f"batch {b} {_mean(test[_EMA][:, j]):.4f} vs {_mean(test[EXACT][:, j]):.4f}"
        for j, b in enumerate(result.batch_sizes)
    )
    words = (
        f"end-of-training test loss, mean over seeds, EMA({NATIVE_MOMENTUM:g}) vs exact: {pairs}; "
        f"effect = min over batch sizes of the difference + {margin:g}"
    )
    return effect, words


def _early_lag(result: PopulationResult, margin: float) -> tuple[np.ndarray, str]:
    j = result.column(LAG_BATCH_SIZE)
    effect = _difference(result, "early", _EMA)[:, j]
    test = result.loss["test"]["early"]
    words = (
        f"test loss at the early checkpoint (step {int(result.steps['early'][j])} of "
        f"{int(result.steps['end'][j])}), batch {LAG_BATCH_SIZE}, mean over seeds: "
        f"EMA({NATIVE_MOMENTUM:g}) {_mean(test[_EMA][:, j]):.4f} vs exact "
        f"{_mean(test[EXACT][:, j]):.4f}"
    )
    return effect, words


def _control(result: PopulationResult, margin: float) -> tuple[np.ndarray, str]:
    j = result.column(min(result.batch_sizes))
    effect = _difference(result, "end", CONTROL)[:, j]
    test = result.loss["test"]["end"]
    words = (
        f"end-of-training test loss, batch {result.batch_sizes[j]}, mean over seeds: test "
        f"batches normalised with their own statistics {_mean(test[CONTROL][:, j]):.4f} vs exact "
        f"{_mean(test[EXACT][:, j]):.4f}"
    )
    return effect, words


# Rule key -> effect(result, margin) -> (per-seed effects, the measured numbers in words).
EFFECTS: dict[str, Callable[[PopulationResult, float], tuple[np.ndarray, str]]] = {
    "exact_no_worse": _exact_no_worse,
    "early_lag": _early_lag,
    "control_batch": _control,
}

# Figure name -> what to see in it (plot() draws exactly these).
FIGURE_NOTES = {
    "end_loss": (
        "End-of-training test loss per batch size with each source of inference statistics "
        "(dots: seeds, bars: means): compare each running average and the batch-own control "
        "with the exact statistics in the same group."
    ),
    "lag": (
        "Test loss with the running averages minus with the exact statistics, per momentum, "
        "at the early checkpoint and at the end: above zero the running averages are worse, "
        "and the early points show how far they lag."
    ),
    "fit": (
        "Training vs validation loss with the exact statistics, early and at the end: a "
        "training loss far below the validation loss would mean the network memorises."
    ),
}


def summarize(
    config: PopulationConfig,
    results: Mapping[int, dict],
    rules: Sequence[Rule],
    margin: float,
) -> dict:
    """Judge the rules on a run's results; numbers, verdicts and a printable report.

    Args:
        config: The run's settings.
        results: Seed -> ``run_seed`` result.
        rules: The declared rules; each key must be in :data:`EFFECTS`.
        margin: The non-inferiority margin (nats) the ``"exact_no_worse"`` effect adds.

    Returns:
        A JSON-serialisable dict: ``experiment``, ``claim``, ``seeds``, ``dataset``,
        ``epochs`` (per network), ``batch_sizes``, ``momenta``, ``methods``, ``lr`` and
        ``steps`` (batch size -> value), ``early_steps`` (batch size -> the early
        checkpoint's step), ``n_val``, ``n_test``; ``loss`` and ``accuracy``
        (split -> phase -> batch size -> method -> ``per_seed``, ``mean``, ``std``);
        ``train_loss`` (phase -> batch size -> likewise); ``claims`` (one
        :meth:`~batchnorm.lab.protocol.Verdict.to_dict` row per rule, with ``measured``);
        ``figure_notes``; ``seconds``; ``report`` (lines of text).

    Raises:
        ValueError: If ``results`` is empty or inconsistent, or a rule has no effect here.
    """
    unknown = [rule.key for rule in rules if rule.key not in EFFECTS]
    if unknown:
        raise ValueError(
            f"population summarize(): expected rules with keys among {list(EFFECTS)}, got "
            f"{unknown}."
        )
    result = PopulationResult.from_seed_results(config, results)
    sizes = [str(b) for b in result.batch_sizes]

    def table(values: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict:
        return {
            s: {
                p: {
                    b: {m: mean_std(values[s][p][m][:, j]) for m in result.methods}
                    for j, b in enumerate(sizes)
                }
                for p in PHASES
            }
            for s in SPLITS
        }

    claims, verdicts = [], []
    for rule in rules:
        effect, words = EFFECTS[rule.key](result, margin)
        verdict = rule.judge([float(v) for v in effect])
        verdicts.append(verdict)
        claims.append(verdict.to_dict(measured=words))
    summary: dict[str, Any] = {
        "experiment": "population",
        "claim": CLAIM,
        "seeds": list(result.seeds),
        "dataset": config.dataset,
        "epochs": config.epochs,
        "batch_sizes": list(result.batch_sizes),
        "momenta": list(result.momenta),
        "methods": list(result.methods),
        "lr": dict(zip(sizes, result.lr.tolist(), strict=True)),
        "steps": {b: int(result.steps["end"][j]) for j, b in enumerate(sizes)},
        "early_steps": {b: int(result.steps["early"][j]) for j, b in enumerate(sizes)},
        "n_val": result.n_val,
        "n_test": result.n_test,
        "loss": table(result.loss),
        "accuracy": table(result.accuracy),
        "train_loss": {
            p: {b: mean_std(result.train_loss[p][:, j]) for j, b in enumerate(sizes)}
            for p in PHASES
        },
        "claims": claims,
        "figure_notes": dict(FIGURE_NOTES),
        "seconds": float(sum(r["seconds"] for r in results.values())),
    }
    summary["report"] = _report(config, result, summary, verdicts)
    return summary


# Column headers of the report's tables, by source of statistics.
def _header(method: str) -> str:
    if method.startswith("ema"):
        return f"EMA {method[3:]}"
    return {EXACT: "exact", CONTROL: "batch-own"}.get(method, method)


def _cell(stats: Mapping[str, Any], digits: int = 4, scale: float = 1.0) -> str:
    return f"{scale * stats['mean']:.{digits}f}±{scale * stats['std']:.{digits}f}"


def _report(
    config: PopulationConfig,
    result: PopulationResult,
    s: Mapping[str, Any],
    verdicts: Sequence[Verdict],
) -> list[str]:
    n = len(result.seeds)
    width = 16
    sizes = [str(b) for b in result.batch_sizes]
    lrs = ", ".join(f"b{b} {s['lr'][b]:g}" for b in sizes)
    lr_source = (
        "fixed by the config"
        if config.lr is not None
        else "tuned per batch size (batchnorm lab tune; untuned: the default)"
    )
    lines = [
        f"Population statistics on {s['dataset']} ({config.n_train} train / {s['n_val']} val / "
        f"{s['n_test']} test): {config.depth}x{config.hidden} {config.activation} MLP with BN, "
        f"{config.epochs:g} epochs of plain SGD per batch size; lr {lrs} ({lr_source}); "
        f"{n} seed{'s' if n != 1 else ''}; mean±std over seeds. exact = the inference network's "
        "own population statistics (sequential pass); pooled, paper = one training-mode pass "
        "(Alg. 2 as written for paper); batch-own = test batches normalised with their own "
        "statistics (the control).",
    ]
    header = f"{'batch':>6}{'step':>8}" + "".join(f"{_header(m):>{width}}" for m in result.methods)
    for phase, title in (
        ("end", "End of training: test loss (nats)"),
        ("early", f"Early checkpoint ({config.early_fraction:g} of training): test loss (nats)"),
    ):
        lines += ["", title, header]
        for j, b in enumerate(sizes):
            by_method = s["loss"]["test"][phase][b]
            cells = "".join(f"{_cell(by_method[m]):>{width}}" for m in result.methods)
            lines.append(f"{b:>6}{int(result.steps[phase][j]):>8}{cells}")
    lines += [
        "",
        f"End of training: test accuracy (%; {s['n_test']} test examples, one is "
        f"{100 / s['n_test']:.3g} %)",
        header,
    ]
    for j, b in enumerate(sizes):
        cells = "".join(
            f"{_cell(s['accuracy']['test']['end'][b][m], 2, 100.0):>{width}}"
            for m in result.methods
        )
        lines.append(f"{b:>6}{int(result.steps['end'][j]):>8}{cells}")
    lines += [
        "",
        "Fit (exact statistics): training-set loss vs validation loss (nats); a training loss "
        "far below the validation loss would mean memorisation",
        f"{'batch':>6}{'phase':>8}{'train':>{width}}{'val':>{width}}{'val - train':>{width}}",
    ]
    for j, b in enumerate(sizes):
        for phase in PHASES:
            train = result.train_loss[phase][:, j]
            val = result.loss["val"][phase][EXACT][:, j]
            lines.append(
                f"{b:>6}{phase:>8}{_cell(mean_std(train)):>{width}}{_cell(mean_std(val)):>{width}}"
                f"{_cell(mean_std(val - train)):>{width}}"
            )
    lines += [
        "",
        "Claims (rules declared in batchnorm.lab.experiments.population before any result; "
        "'held' needs the stated share of seeds above the threshold):",
    ]
    for verdict, claim in zip(verdicts, s["claims"], strict=True):
        rule = verdict.rule
        record = "" if verdict.for_record else f" [{verdict.seeds} seeds: not for the record]"
        lines.append(
            f"{verdict.verdict.upper()}: {rule.claim} ({rule.anchor}). Effect "
            f"{verdict.mean:+.4f} ± {verdict.std:.4f} {rule.unit} ({rule.measure}); above "
            f"{rule.threshold:g} in {verdict.above} of {verdict.seeds} seeds, {verdict.needed} "
            f"needed; sign-test p = {verdict.p_sign:.3g}.{record} Measured: {claim['measured']}."
        )
    return lines
