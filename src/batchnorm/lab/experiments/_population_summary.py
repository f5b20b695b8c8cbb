"""The verdict of a population run: :func:`summarize` judges the claims on the results of
every seed and writes the numbers and the printable report of ``summary.json`` and
``summary.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._training import mean_std
from ._population_config import PopulationConfig
from ._population_result import PopulationResult
from ._population_spec import CLAIM, COMPARED, EXACT, GAPS, METHODS, REFERENCE

__all__ = ["summarize"]

# How the claims name each source of statistics: as the subject of "give(s)", and as the owner
# of the value it is compared with.
_SUBJECTS = {
    "pooled": "Exact (pooled) population statistics give",
    "paper": "Algorithm 2 as written (paper) gives",
    "sequential": "The inference network's own (sequential) statistics give",
}
_OWNERS = {"ema": "the EMA's", "pooled": "pooled's"}
# The comparison claims, (metric, candidate, baseline), in the order the report lists them:
# every exact pass against the incumbent on both metrics, then the finding of population's
# module docstring, that the inference network's statistics beat the training-mode pass.
_COMPARISONS = (
    *(("test accuracy", m, "ema") for m in EXACT),
    *(("test loss", m, "ema") for m in EXACT),
    ("test loss", "sequential", "pooled"),
)


def summarize(config: PopulationConfig, results: Mapping[int, dict]) -> dict:
    """Judge the claim on a run's results; numbers and a printable report.

    The claims, each judged on the mean over seeds at the final step (a tie holds, since the
    claim is "at least as good"):

    1-3. the pooled, the paper's (Algorithm 2 as written) and the sequential statistics each
         give at least the EMA's test accuracy;
    4-6. each gives at most the EMA's test loss (a finer measure than accuracy, which moves in
         steps of one test example);
    7.   the sequential statistics give at most pooled's test loss: normalising like the
         inference network beats normalising like the training network;
    8.   the EMA lags: its gap to the sequential statistics (``mean_shift``, mean over layers)
         is larger early in training (:meth:`PopulationResult.early_mask`) than at the end.

    Each comparison claim also carries ``difference`` (candidate minus baseline:
    ``per_seed``, ``mean``, ``std``), so a verdict can be read against the spread over seeds.

    Returns:
        A JSON-serialisable dict: ``reference`` (:data:`REFERENCE`); ``final_accuracy`` and
        ``final_loss`` (each of :data:`METHODS` -> ``per_seed``, ``mean``, ``std``);
        ``accuracy_difference`` and ``loss_difference`` (each of :data:`EXACT` minus
        ``"ema"``, likewise); ``final_gap`` (each of :data:`COMPARED` -> gap name -> layer ->
        likewise, the gap to the sequential statistics); ``early_gap`` (the EMA's, over the
        early steps); ``early_steps``; ``variance_bias`` (each of :data:`COMPARED` -> layer ->
        likewise: per seed, the geometric mean over channels of
        :meth:`PopulationResult.variance_ratios`, minus 1, so ``-0.02`` is 2 % below the
        sequential variances; only layers with final statistics); ``loss_wins`` (each of
        :data:`EXACT` -> per seed, the share of measured steps after 0 at which its test loss
        was below the EMA's); ``claims`` (each with ``held``); ``seconds``; ``report`` (lines
        of text).

    Raises:
        ValueError: If ``results`` is empty, its seeds disagree on steps or layers, come from
            an earlier version of this experiment, or no step after 0 was measured.
    """
    result = PopulationResult.from_seed_results(config, results)
    if not (result.steps > 0).any():
        raise ValueError(
            f"summarize(): expected results measured after step 0, got steps "
            f"{result.steps.tolist()}."
        )
    n = len(result.seeds)
    final_accuracy = {m: mean_std(result.test_accuracy[m][:, -1]) for m in METHODS}
    final_loss = {m: mean_std(result.test_loss[m][:, -1]) for m in METHODS}
    accuracy_difference = {
        m: mean_std(result.test_accuracy[m][:, -1] - result.test_accuracy["ema"][:, -1])
        for m in EXACT
    }
    loss_difference = {
        m: mean_std(result.test_loss[m][:, -1] - result.test_loss["ema"][:, -1]) for m in EXACT
    }
    final_gap = {
        m: {
            g: {name: mean_std(result.gap[m][g][:, i, -1]) for i, name in enumerate(result.layers)}
            for g in GAPS
        }
        for m in COMPARED
    }
    early = result.early_mask()
    early_steps = [int(s) for s in result.steps[early]]
    early_gap = {
        g: {
            name: mean_std(result.gap["ema"][g][:, i, early].mean(axis=1))
            for i, name in enumerate(result.layers)
        }
        for g in GAPS
    }
    variance_bias: dict[str, dict[str, Any]] = {m: {} for m in COMPARED}
    for m in COMPARED:
        for name in result.layers:
            ratios = result.variance_ratios(m, name)
            if len(ratios):
                # The geometric mean: a channel 2 % low and one 2 % high cancel, as they do in
                # statistics_gap's log variance ratio before its absolute value.
                variance_bias[m][name] = mean_std(np.expm1(np.log(ratios).mean(axis=1)))
    # The final step is always measured and is > 0, so neither mask below is empty.
    later = result.steps > 0
    loss_wins = {
        m: [
            float(np.mean(result.test_loss[m][s, later] < result.test_loss["ema"][s, later]))
            for s in range(n)
        ]
        for m in EXACT
    }

    def seeds_where(ok: np.ndarray) -> int:
        return int(np.count_nonzero(ok))

    claims = []
    for metric, candidate, baseline in _COMPARISONS:
        values = result.test_accuracy if metric == "test accuracy" else result.test_loss
        better = "at least" if metric == "test accuracy" else "at most"
        diff = values[candidate][:, -1] - values[baseline][:, -1]
        # A tie counts as held: the claim is "at least as good".
        ok = diff >= 0 if better == "at least" else diff <= 0
        claims.append(
            {
                "claim": f"{_SUBJECTS[candidate]} {better} {_OWNERS[baseline]} {metric}",
                "measure": f"final {metric}, mean over seeds",
                "values": {
                    baseline: float(values[baseline][:, -1].mean()),
                    candidate: float(values[candidate][:, -1].mean()),
                },
                "difference": mean_std(diff),
                "held": bool(diff.mean() >= 0 if better == "at least" else diff.mean() <= 0),
                "seeds_held": seeds_where(ok),
                "seeds": n,
            }
        )
    shift_final = result.gap["ema"]["mean_shift"][:, :, -1].mean(axis=1)
    shift_early = result.gap["ema"]["mean_shift"][:, :, early].mean(axis=(1, 2))
    claims.append(
        {
            "claim": "The EMA lags: its gap to the inference network's statistics is larger "
            "early in training than at the end",
            "measure": f"EMA-vs-sequential mean shift (sequential std, mean over layers), "
            f"{_step_range(early_steps)} vs the final step",
            "values": {"early": float(shift_early.mean()), "final": float(shift_final.mean())},
            "held": float(shift_early.mean()) > float(shift_final.mean()),
            "seeds_held": seeds_where(shift_early > shift_final),
            "seeds": n,
        }
    )
    summary = {
        "experiment": "population",
        "claim": CLAIM,
        "reference": REFERENCE,
        "seeds": list(result.seeds),
        "steps": config.steps,
        "dataset": config.dataset,
        "layers": list(result.layers),
        "final_accuracy": final_accuracy,
        "final_loss": final_loss,
        "accuracy_difference": accuracy_difference,
        "loss_difference": loss_difference,
        "final_gap": final_gap,
        "early_gap": early_gap,
        "early_steps": early_steps,
        "variance_bias": variance_bias,
        "loss_wins": loss_wins,
        "claims": claims,
        "seconds": float(sum(r["seconds"] for r in results.values())),
    }
    summary["report"] = _report(config, summary)
    return summary


def _step_range(steps: Sequence[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _fmt(stats: Mapping[str, Any], digits: int = 3, sign: bool = False) -> str:
    plus = "+" if sign else ""
    return f"{stats['mean']:{plus}.{digits}f} ± {stats['std']:.{digits}f}"


# Column headers of the report, one per source of statistics.
_HEADERS = {
    "ema": "EMA (torch)",
    "pooled": "pooled (exact)",
    "paper": "paper (Alg. 2)",
    "sequential": "sequential (eval)",
}


def _report(config: PopulationConfig, s: Mapping[str, Any]) -> list[str]:
    n = len(s["seeds"])
    momentum = "cumulative" if config.momentum is None else f"{config.momentum:g}"
    width = 19
    lines = [
        f"Population statistics on {s['dataset']}: {config.depth}x{config.hidden} "
        f"{config.activation} MLP with BN (momentum {momentum}), {config.steps} steps of SGD "
        f"(lr {config.lr:g}, batch {config.batch_size}); exact passes over the training set in "
        f"batches of {config.pass_batch_size}; {n} seed{'s' if n != 1 else ''}; mean ± std "
        "over seeds",
        "",
        f"{'':<24}" + "".join(f"{_HEADERS[m]:>{width}}" for m in METHODS),
    ]
    for label, key, digits in (
        ("final test accuracy", "final_accuracy", 3),
        ("final test loss", "final_loss", 4),
    ):
        cells = "".join(f"{_fmt(s[key][m], digits):>{width}}" for m in METHODS)
        lines.append(f"{label:<24}{cells}")
    for label, key, digits in (
        ("  minus EMA's accuracy", "accuracy_difference", 3),
        ("  minus EMA's loss", "loss_difference", 4),
    ):
        cells = "".join(f"{_fmt(s[key][m], digits, sign=True):>{width}}" for m in EXACT)
        lines.append(f"{label:<24}{'':>{width}}{cells}")
    wins = ", ".join(f"{m} {100 * np.mean(s['loss_wins'][m]):.0f} %" for m in EXACT)
    lines.append(
        f"Share of the measured steps after 0 at which the test loss was below the EMA's (mean "
        f"over seeds): {wins}."
    )
    early_label = f"EMA, {_step_range(s['early_steps'])}"
    lines += [
        "",
        "Gap to the sequential statistics (the inference network's), per BN layer, mean over "
        "channels and seeds: mean shift in sequential std | |log variance ratio|",
        f"{'layer':<8}{'EMA, final':>20}{early_label:>26}{'pooled, final':>20}{'paper, final':>20}",
    ]
    for name in s["layers"]:
        cells = []
        for source in (
            s["final_gap"]["ema"],
            s["early_gap"],
            s["final_gap"]["pooled"],
            s["final_gap"]["paper"],
        ):
            shift, ratio = source["mean_shift"][name], source["log_var_ratio"][name]
            cells.append(f"{shift['mean']:.4f} | {ratio['mean']:.4f}")
        lines.append(f"{name:<8}{cells[0]:>20}{cells[1]:>26}{cells[2]:>20}{cells[3]:>20}")
    biased = [name for name in s["layers"] if all(name in s["variance_bias"][m] for m in COMPARED)]
    if biased:
        lines += [
            "",
            "Variance at the final step relative to sequential's, per BN layer (geometric mean "
            "over channels, in %; below 0: the inference input's spread is under-estimated)",
            f"{'layer':<8}" + "".join(f"{_HEADERS[m]:>{width}}" for m in COMPARED),
        ]
        for name in biased:
            cells = "".join(
                f"{_fmt(_percent(s['variance_bias'][m][name]), 2, sign=True):>{width}}"
                for m in COMPARED
            )
            lines.append(f"{name:<8}{cells}")
    lines.append("")
    for claim in s["claims"]:
        verdict = "HELD" if claim["held"] else "DID NOT HOLD"
        values = ", ".join(f"{k} {v:.4f}" for k, v in claim["values"].items())
        if "difference" in claim:
            values += f"; difference {_fmt(claim['difference'], 4, sign=True)}"
        lines.append(
            f"{verdict}: {claim['claim']} ({claim['measure']}: {values}; held in "
            f"{claim['seeds_held']} of {claim['seeds']} seeds)."
        )
    return lines


def _percent(stats: Mapping[str, Any]) -> dict[str, float]:
    return {"mean": 100 * stats["mean"], "std": 100 * stats["std"]}
