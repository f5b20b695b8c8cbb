"""The verdict of a batch-size run: :class:`BatchSizeResult` (a run's results as arrays),
:func:`summarize` (each rule's per-seed effect, judged, and the printable report).

The rules themselves, with their thresholds, are declared in
:mod:`batchnorm.lab.experiments.batch_size`; this module only knows how to measure each one,
by its key (:data:`EFFECTS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._training import mean_std
from ..protocol import Rule, judge_rules, verdict_line
from ._batch_size_config import (
    ARM_LABELS,
    ARMS,
    CLAIM,
    RENORM_BATCH,
    SMALL_BATCH,
    BatchSizeConfig,
)
from ._batch_size_run import unit_name

__all__ = ["EFFECTS", "FIGURE_NOTES", "BatchSizeResult", "summarize"]


@dataclass(frozen=True)
class BatchSizeResult:
    """A run's test errors as arrays (what the rules and the figures read).

    Attributes:
        config: The run's settings.
        seeds: The seeds, ascending.
        batch_sizes: The batch sizes, ascending.
        error: Arm -> ``(S, B)`` test error in % with the running statistics (eval mode); a
            diverged network counts at chance level (``config.chance_error``).
        error_own: Arm -> ``(S, B)`` the same with test batches normalised by their own
            statistics.
        diverged: Arm -> ``(S, B)`` bool, the networks whose training loss became non-finite.
        shared: Arm -> ``(B,)`` bool, the batch sizes where the arm's numbers are BatchNorm's
            network's (ghost BN on batches of one ghost batch).
        lr: Arm -> ``(B,)`` the learning rates used (the same in every seed).
        steps: ``(B,)`` SGD steps per network.
    """

    config: BatchSizeConfig
    seeds: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    error: dict[str, np.ndarray]
    error_own: dict[str, np.ndarray]
    diverged: dict[str, np.ndarray]
    shared: dict[str, np.ndarray]
    lr: dict[str, np.ndarray]
    steps: np.ndarray

    @classmethod
    def from_seed_results(
        cls, config: BatchSizeConfig, results: Mapping[int, dict]
    ) -> BatchSizeResult:
        """Gather seed -> ``run_seed`` result into arrays.

        Raises:
            ValueError: If ``results`` is empty.
        """
        if not results:
            raise ValueError("batch_size: expected the results of at least one seed, got none.")
        seeds = tuple(sorted(results))
        sizes = tuple(config.batch_sizes)
        shape = (len(seeds), len(sizes))
        error, error_own, diverged, shared, lr = {}, {}, {}, {}, {}
        for arm in ARMS:
            error[arm], error_own[arm] = np.empty(shape), np.empty(shape)
            diverged[arm] = np.zeros(shape, dtype=bool)
            shared[arm] = np.array([config.is_batchnorm(arm, b) for b in sizes])
            lr[arm] = np.empty(len(sizes))
            for j, b in enumerate(sizes):
                source = "batchnorm" if shared[arm][j] else arm
                for i, seed in enumerate(seeds):
                    unit = results[seed]["units"][unit_name(source, b)]
                    diverged[arm][i, j] = unit["diverged"]
                    for key, target in (("test_error", error), ("test_error_batch", error_own)):
                        value = unit[key]
                        target[arm][i, j] = config.chance_error if value is None else value
                    lr[arm][j] = unit["lr"]
        steps = np.array([config.steps_for(b) for b in sizes])
        return cls(config, seeds, sizes, error, error_own, diverged, shared, lr, steps)

    def column(self, batch_size: int) -> int:
        """The index of ``batch_size`` in :attr:`batch_sizes`."""
        return self.batch_sizes.index(batch_size)

    def rise(self, arm: str) -> np.ndarray:
        """``(S,)``: the arm's test error at batch 2 minus at the reference batch (pp)."""
        small, ref = self.column(SMALL_BATCH), self.column(self.config.reference_batch)
        return self.error[arm][:, small] - self.error[arm][:, ref]


def _mean(values: np.ndarray) -> str:
    return f"{float(np.mean(values)):.2f}"


def _at(result: BatchSizeResult, arm: str, b: int, own: bool = False) -> np.ndarray:
    table = result.error_own if own else result.error
    return table[arm][:, result.column(b)]


def _bn_small_batch(result: BatchSizeResult) -> tuple[np.ndarray, str]:
    ref = result.config.reference_batch
    words = (
        f"BN test error (%, mean over seeds) {_mean(_at(result, 'batchnorm', ref))} at batch "
        f"{ref} -> {_mean(_at(result, 'batchnorm', SMALL_BATCH))} at batch {SMALL_BATCH}"
    )
    return result.rise("batchnorm"), words


def _gn_flatter(result: BatchSizeResult) -> tuple[np.ndarray, str]:
    ref = result.config.reference_batch
    words = (
        f"rise from batch {ref} to {SMALL_BATCH} (pp, mean over seeds): BN "
        f"{_mean(result.rise('batchnorm'))}, GN {_mean(result.rise('groupnorm'))} (GN's error "
        f"{_mean(_at(result, 'groupnorm', ref))} -> "
        f"{_mean(_at(result, 'groupnorm', SMALL_BATCH))} %)"
    )
    return result.rise("batchnorm") - result.rise("groupnorm"), words


def _renorm_beats_bn(result: BatchSizeResult) -> tuple[np.ndarray, str]:
    if RENORM_BATCH not in result.batch_sizes:
        return np.array([]), ""
    bn, renorm = _at(result, "batchnorm", RENORM_BATCH), _at(result, "renorm", RENORM_BATCH)
    words = (
        f"test error at batch {RENORM_BATCH} (%, mean over seeds): BN {_mean(bn)}, renorm "
        f"{_mean(renorm)}"
    )
    return bn - renorm, words


def _own_statistics_worse(result: BatchSizeResult) -> tuple[np.ndarray, str]:
    running = _at(result, "batchnorm", SMALL_BATCH)
    own = _at(result, "batchnorm", SMALL_BATCH, own=True)
    words = (
        f"BN trained at batch {SMALL_BATCH}, test error (%, mean over seeds): running "
        f"statistics {_mean(running)}, test batches of {SMALL_BATCH} with their own statistics "
        f"{_mean(own)}"
    )
    return own - running, words


# Rule key -> effect(result) -> (per-seed effects in pp, the measured numbers in words). An
# empty array: not measured in this configuration (the rule is left out of the table).
EFFECTS: dict[str, Callable[[BatchSizeResult], tuple[np.ndarray, str]]] = {
    "bn_small_batch": _bn_small_batch,
    "gn_flatter": _gn_flatter,
    "renorm_beats_bn": _renorm_beats_bn,
    "own_statistics_worse": _own_statistics_worse,
}

# Figure name -> what to see in it (plot() draws exactly these).
FIGURE_NOTES = {
    "test_error": (
        "Test error (running statistics) against the training batch size, learning rate "
        "scaled with it, one colour per arm (dots: seeds, line: mean): BatchNorm's curve "
        "should climb towards batch 2 while GroupNorm's stays level; compare batch renorm with "
        "BatchNorm at batch 4."
    ),
    "test_error_own": (
        "The same networks tested on batches of their training batch size normalised by their "
        "own statistics (GroupNorm and no normalisation are unchanged by construction): "
        "compare BatchNorm's points with the first figure's, above all at batch 2."
    ),
}


def summarize(
    config: BatchSizeConfig, results: Mapping[int, dict], rules: Sequence[Rule]
) -> dict[str, Any]:
    """Judge the rules on a run's results; numbers, verdicts and a printable report.

    Args:
        config: The run's settings.
        results: Seed -> ``run_seed`` result.
        rules: The declared rules; each key must be in :data:`EFFECTS`.

    Returns:
        A JSON-serialisable dict: ``experiment``, ``claim``, ``seeds``, ``dataset``,
        ``epochs``, ``batch_sizes``, ``reference_batch``, ``arms``, ``steps`` and ``lr``
        (arm -> batch size -> value), ``test_error`` and ``test_error_own`` (arm -> batch size
        -> ``per_seed``, ``mean``, ``std``, in %), ``rise`` (arm -> the same for the rise from
        the reference batch to batch 2, pp), ``diverged`` (arm -> batch size -> networks),
        ``claims`` (:func:`~batchnorm.lab.protocol.judge_rules` rows), ``figure_notes``,
        ``seconds`` and ``report`` (lines of text).

    Raises:
        ValueError: If ``results`` is empty or a rule's key has no effect here.
    """
    unknown = [rule.key for rule in rules if rule.key not in EFFECTS]
    if unknown:
        raise ValueError(
            f"batch_size summarize(): expected rules with keys among {list(EFFECTS)}, got "
            f"{unknown}."
        )
    result = BatchSizeResult.from_seed_results(config, results)
    sizes = [str(b) for b in result.batch_sizes]
    effects, measured = {}, {}
    for rule in rules:
        values, words = EFFECTS[rule.key](result)
        effects[rule.key] = [float(v) for v in values]
        measured[rule.key] = words
    claims = judge_rules(rules, effects, measured)

    def table(errors: dict[str, np.ndarray]) -> dict:
        return {arm: {b: mean_std(errors[arm][:, j]) for j, b in enumerate(sizes)} for arm in ARMS}

    summary: dict[str, Any] = {
        "experiment": "batch_size",
        "claim": CLAIM,
        "seeds": list(result.seeds),
        "dataset": config.dataset,
        "epochs": config.epochs,
        "batch_sizes": list(result.batch_sizes),
        "reference_batch": config.reference_batch,
        "arms": list(ARMS),
        "steps": dict(zip(sizes, result.steps.tolist(), strict=True)),
        "lr": {arm: dict(zip(sizes, result.lr[arm].tolist(), strict=True)) for arm in ARMS},
        "test_error": table(result.error),
        "test_error_own": table(result.error_own),
        "rise": {arm: mean_std(result.rise(arm)) for arm in ARMS},
        "diverged": {
            arm: {b: int(result.diverged[arm][:, j].sum()) for j, b in enumerate(sizes)}
            for arm in ARMS
        },
        "claims": claims,
        "figure_notes": dict(FIGURE_NOTES),
        "seconds": float(sum(r["seconds"] for r in results.values())),
    }
    summary["report"] = _report(config, result, summary, rules)
    return summary


def _cell(stats: Mapping[str, Any]) -> str:
    return f"{stats['mean']:.2f}±{stats['std']:.2f}"


def _report(
    config: BatchSizeConfig,
    result: BatchSizeResult,
    s: Mapping[str, Any],
    rules: Sequence[Rule],
) -> list[str]:
    n = len(result.seeds)
    sizes = [str(b) for b in result.batch_sizes]
    ref = config.reference_batch
    lr_source = (
        "fixed by the config"
        if config.lr is not None
        else "each arm's own, tuned at the reference batch (batchnorm lab tune; untuned: "
        "the default)"
    )
    lrs = ", ".join(f"{arm} {s['lr'][arm][str(ref)]:g}" for arm in ARMS)
    steps = ", ".join(f"b{b} {s['steps'][b]}" for b in sizes)
    lines = [
        f"Test error vs batch size on {config.dataset} ({config.n_train} train / "
        f"{config.n_val} val): a 1-D CNN with channels {list(config.channels)}, {config.epochs:g} "
        f"epoch(s) per network (the same examples at every batch size: {steps} steps), SGD "
        f"momentum {config.momentum:g}; learning rate at batch {ref}: {lrs} ({lr_source}), "
        f"scaled by b/{ref} at batch b. {n} seed{'s' if n != 1 else ''}; mean±std over seeds, "
        f"test error in %. Ghost BN uses ghost batches of {config.virtual_batch_size}; at "
        f"batch <= {config.virtual_batch_size + 1} it is BatchNorm and its numbers are "
        "BatchNorm's network's (marked *). A diverged network counts at chance level "
        f"({config.chance_error:g} %).",
    ]
    width = 14
    header = f"{'arm':<12}" + "".join(f"{'b' + b:>{width}}" for b in sizes)
    for key, title in (
        ("test_error", "Test error (%), running statistics (eval mode)"),
        (
            "test_error_own",
            "Test error (%), test batches of the training batch size normalised by their own "
            "statistics (GroupNorm and none: eval mode by construction)",
        ),
    ):
        lines += ["", title, header]
        for arm in ARMS:
            cells = []
            for j, b in enumerate(sizes):
                mark = "*" if result.shared[arm][j] else ""
                mark += f" ({s['diverged'][arm][b]} div)" if s["diverged"][arm][b] else ""
                cells.append(f"{_cell(s[key][arm][b]) + mark:>{width}}")
            lines.append(f"{arm:<12}" + "".join(cells))
    lines += [
        "",
        f"Rise of the test error from batch {ref} to batch {SMALL_BATCH} (pp, running statistics; "
        "'none' shows what the batch size does to SGD itself under the linear scaling rule):",
        "  " + "; ".join(f"{ARM_LABELS[arm]} {_cell(s['rise'][arm])}" for arm in ARMS),
    ]
    error_ref = s["test_error"]["batchnorm"][str(ref)]["mean"]
    lines += [
        "",
        f"How far training got: BatchNorm's test error at batch {ref} is {error_ref:.1f} % "
        f"(chance {config.chance_error:g} %) after {config.epochs:g} epoch(s); the anchors "
        "trained to convergence (~100 epochs of ImageNet).",
        "",
        "Claims (rules declared in batchnorm.lab.experiments.batch_size before any result; "
        "'held' needs the stated share of seeds above the threshold):",
    ]
    by_key = {c["key"]: c for c in s["claims"]}
    for rule in rules:
        claim = by_key.get(rule.key)
        if claim is None:
            lines.append(f"NOT MEASURED: {rule.claim} (this configuration lacks its batch size).")
            continue
        lines.append(f"{verdict_line(claim)} Measured: {claim['measured']}.")
    not_held = [c["claim"] for c in s["claims"] if c["verdict"] == "not held"]
    unsettled = [c["claim"] for c in s["claims"] if c["verdict"] == "inconclusive"]
    if not_held:
        lines.append("Did not hold: " + "; ".join(not_held) + ".")
    if unsettled:
        lines.append("Inconclusive (the seeds disagree, or too few): " + "; ".join(unsettled) + ".")
    if not not_held and not unsettled and s["claims"]:
        lines.append("Every claim measured here held.")
    return lines
