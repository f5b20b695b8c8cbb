r"""Ioffe & Szegedy (2015), Figure 1: BN trains faster and keeps a sigmoid's input distribution put.

The paper's setup (Sec. 4.1): a network of 3 fully connected hidden layers of 100 sigmoid units
and a 10-way linear output, weights drawn from a small Gaussian, trained with plain SGD on
mini-batches of 60 for 50,000 steps of MNIST (about 50 epochs of 60,000 examples), once as is
(*baseline*) and once with BatchNorm between each affine map and its sigmoid (*bn*). Panel (a)
is test accuracy against steps; panels (b, c) follow the 15th, 50th and 85th percentiles of the
input of one sigmoid of the last hidden layer.

How this reproduction measures
------------------------------
- **Data and regime.** MNIST-1D made locally with 75,000 samples (``"mnist1d-large"``): 60,000
  training sequences, of which a fixed 5,000 are held out as the validation split, and 15,000
  test sequences. The ``full`` preset (alias ``paper``) is the paper's 50,000 steps of 60, i.e.
  about 54 epochs of the 55,000 remaining training examples; ``quick`` is 10,000 steps (11
  epochs). Neither memorises the training set (the report prints the final training and
  validation losses side by side).
- **Arms.** Four networks per seed: without and with BN, each at the paper's initialisation
  (every weight from :math:`\mathcal{N}(0, 0.01^2)`, ~10x below the standard scale for 100
  inputs) and at Glorot's (:math:`\mathcal{N}(0, 2/(\text{fan\_in}+\text{fan\_out}))`). The
  second pair separates "BN trains faster" from "BN rescues a bad initialisation". The two
  networks of a pair start from the same ``nn.Linear`` weights; every arm sees the same
  mini-batches in the same order. Each arm's learning rate was tuned on its own by ``batchnorm
  lab tune figure1`` (:mod:`batchnorm.lab.tuning`) on the validation split and a seed that is
  never reported; the presets read the values from the tuned file and never tune.
- **Measured every** ``eval_every`` **steps** (and at step 0): validation and test accuracy and
  loss in eval mode (BN on its running statistics); the mean training loss since the previous
  measurement; the percentiles of the last hidden layer's sigmoid inputs over a fixed probe set
  of training inputs (the paper's panels; training-mode pass, running statistics restored); and
  the **shift measure** below.
- **Speed**: the smoothed validation accuracy (trailing mean of ``smooth`` measurements); per
  seed and initialisation, the *target* is ``chance + target_fraction * (best - chance)``,
  ``best`` being the lower of the two arms' best smoothed validation accuracies, so both arms
  reach it; the speed-up is the baseline's steps to the target over BN's. An arm that never
  gets ``LEARNED_MARGIN`` above chance has not reached the other arm's target by the end: its
  steps count as ``steps + eval_every`` (a lower bound, so the speed-up is then understated).
- **Shift caused by earlier layers** (internal covariate shift, the paper's Sec. 2): for each
  hidden layer :math:`l \ge 2` and consecutive measurements :math:`t-1, t`, the layer's own
  parameters at :math:`t` (its weight, and BN's :math:`\gamma, \beta`, normalising the probe
  with its own statistics as in training) are applied to the layer's *input* at :math:`t-1`
  and at :math:`t`; for each unit, the 1-Wasserstein distance between the two resulting
  distributions of its sigmoid input, divided by their pooled standard deviation. Averaged
  over units, layers and the measurements after the first ``WARMUP_FRACTION`` of training.
  Only the earlier layers' change enters it: the layer's own learning is held fixed. Note the
  number depends on ``eval_every`` (the change over that many steps).
- **The paper's stability number** (percentile range): for each unit of the last hidden layer
  and each recorded percentile, max - min over the measurements after the warm-up, averaged.
  In the sigmoid input's units, so it also counts the layer's own drift (BN's :math:`\gamma`
  and :math:`\beta`); kept because it is the paper's picture.

The claims and their pass rules are :data:`RULES`, declared before the first results (see
:mod:`batchnorm.lab.protocol` for how a verdict is reached).

Where the code lives: every name in ``__all__`` is importable from this module, which the
registry uses. The settings and rules are in ``_figure1_config``, the training and measuring
of one seed (and the checks of its results and checkpoints) in ``_figure1_training``; this
module turns a run into arrays, verdicts, a report and figures (drawn by
:mod:`batchnorm.lab.plots`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...monitor import ActivationTrace
from .._training import mean_std, trailing_mean
from ..protocol import verdict_line
from ._figure1_config import (
    CLAIM,
    INITS,
    LEARNED_MARGIN,
    NETS,
    PRESETS,
    RULES,
    TITLE,
    UNTUNED_LR,
    WARMUP_FRACTION,
    Figure1Config,
    arm_name,
    epochs,
    prepare,
    steps_per_seed,
)
from ._figure1_training import (
    check_checkpoint,
    check_result,
    metric_rows,
    run_seed,
    shift,
    tune_arms,
    tune_score,
)

__all__ = [
    "CONFIG_TYPE",
    "TUNING",
    "CLAIM",
    "INITS",
    "LEARNED_MARGIN",
    "NETS",
    "PRESETS",
    "RULES",
    "TITLE",
    "UNTUNED_LR",
    "WARMUP_FRACTION",
    "Figure1Config",
    "Figure1Result",
    "arm_name",
    "check_checkpoint",
    "check_result",
    "epochs",
    "metric_rows",
    "percentile_range",
    "plot",
    "prepare",
    "run_seed",
    "shift",
    "steps_per_seed",
    "steps_to_target",
    "summarize",
    "tune_arms",
    "tune_score",
    "verdict_line",
]

# What the registry reads (batchnorm.lab.registry._from_module).
CONFIG_TYPE = Figure1Config
TUNING = {
    "arms": tune_arms,
    "score": tune_score,
    "grid": (0.1, 0.3, 1.0, 3.0),
    "factor": 3.0,
    "hyper_parameter": "lr",
    "metric": "best smoothed validation accuracy",
    "preset": "quick",
}


# --- results, summary, report -----------------------------------------------------------------


@dataclass(frozen=True)
class Figure1Result:
    """All seeds of a run as arrays: what the plot functions take.

    Attributes:
        config: The run's settings.
        seeds: The seeds, in order.
        steps: int64 array ``(T,)`` of measured steps (the same for every seed).
        curves: Arm -> measured quantity (``val_accuracy``, ``test_accuracy``,
            ``train_loss``, ``shift``, ...) -> float64 array ``(S, T)`` (NaN where not
            measured; ``shift`` is the mean over layers).
        traces: Arm -> list of one ActivationTrace per seed: the last hidden layer's sigmoid
            inputs on the probe set.
        summary: The dict :func:`summarize` returns (claims, numbers).
    """

    config: Figure1Config
    seeds: tuple[int, ...]
    steps: np.ndarray
    curves: dict[str, dict[str, np.ndarray]]
    traces: dict[str, list[ActivationTrace]]
    summary: dict = field(default_factory=dict)

    @property
    def test_accuracy(self) -> dict[str, np.ndarray]:
        """Arm -> test accuracy ``(S, T)``."""
        return {arm: c["test_accuracy"] for arm, c in self.curves.items()}

    @classmethod
    def from_seed_results(
        cls, config: Figure1Config, results: Mapping[int, dict], summary: dict | None = None
    ) -> Figure1Result:
        """Build from a dict seed -> :func:`run_seed` result (e.g. read back from JSON).

        Raises:
            ValueError: If ``results`` is empty or the seeds were measured at different steps.
        """
        if not results:
            raise ValueError("Figure1Result.from_seed_results(): expected results, got none.")
        seeds = tuple(sorted(results))
        first = results[seeds[0]]["arms"][config.arms[0]]["steps"]
        steps = np.asarray(first, dtype=np.int64)
        curves, traces = {}, {}
        keys = ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_loss")
        for arm in config.arms:
            rows = [results[s]["arms"][arm] for s in seeds]
            if any(list(r["steps"]) != steps.tolist() for r in rows):
                raise ValueError(
                    "Figure1Result.from_seed_results(): expected every seed to be measured at "
                    "the same steps, got different ones."
                )
            curves[arm] = {
                key: np.array(
                    [[np.nan if v is None else v for v in r[key]] for r in rows], dtype=np.float64
                )
                for key in keys
            }
            per_layer = np.array(
                [[[np.nan if v is None else v for v in s] for s in r["shift"]] for r in rows],
                dtype=np.float64,
            ).reshape(len(rows), max(config.depth - 1, 0), len(steps))
            # A measurement has every layer's shift or (step 0) none: a plain mean keeps NaN.
            curves[arm]["shift"] = (
                per_layer.mean(axis=1)
                if config.depth > 1
                else np.full((len(rows), len(steps)), np.nan)
            )
            traces[arm] = [ActivationTrace.from_dict(r["trace"]) for r in rows]
        return cls(config, seeds, steps, curves, traces, dict(summary or {}))


def percentile_range(trace: ActivationTrace, start_step: int = 0) -> np.ndarray:
    """The paper's stability number's ingredients: per unit and level, max - min over steps.

    Args:
        trace: A trace with quantiles of shape ``(T, U, Q)``.
        start_step: Only steps ``>= start_step`` count.

    Returns:
        float64 array ``(U, Q)``.
    """
    keep = trace.steps >= start_step
    q = trace.quantiles[keep]
    return q.max(axis=0) - q.min(axis=0)


def steps_to_target(
    steps: np.ndarray,
    accuracy: Mapping[str, np.ndarray],
    *,
    chance: float,
    fraction: float,
    width: int,
    total_steps: int,
    eval_every: int,
) -> tuple[float | None, dict[str, int]]:
    """One seed's speed target and each arm's steps to it (see the module docstring).

    Args:
        steps: Measured steps ``(T,)``.
        accuracy: Arm -> validation accuracy ``(T,)`` of one pair.
        chance: Accuracy of guessing.
        fraction: ``target_fraction``.
        width: ``smooth``.
        total_steps: The run's length; an arm that never reaches the target gets
            ``total_steps + eval_every``.
        eval_every: The measurement interval.

    Returns:
        ``(target, steps)``, ``steps`` mapping each arm to its steps to the target;
        ``(None, {})`` if no arm learned.
    """
    smoothed = {arm: trailing_mean(a, width) for arm, a in accuracy.items()}
    best = {arm: float(s.max()) for arm, s in smoothed.items()}
    learned = [arm for arm in best if best[arm] - chance >= LEARNED_MARGIN]
    if not learned:
        return None, {}
    target = chance + fraction * (min(best[arm] for arm in learned) - chance)
    reached = {}
    for arm, s in smoothed.items():
        hits = np.nonzero((s >= target) & (steps > 0))[0]
        reached[arm] = int(steps[hits[0]]) if len(hits) else total_steps + eval_every
    return target, reached


def summarize(config: Figure1Config, results: Mapping[int, dict]) -> dict:
    """Judge :data:`RULES` on a run's results; numbers and a printable report.

    Returns:
        A JSON-serialisable dict: per arm ``final_test_accuracy``, ``final_losses`` (train,
        validation, test), ``shift`` and ``percentile_range`` (after warm-up), each with
        ``per_seed``, ``mean``, ``std``; ``speed`` per init (targets and steps per seed);
        ``claims`` (one :meth:`Verdict.to_dict` row per rule); ``figure_notes``; ``epochs``;
        ``seconds``; ``report`` (lines of text).
    """
    result = Figure1Result.from_seed_results(config, results)
    warmup_step = math.ceil(WARMUP_FRACTION * config.steps)
    late = result.steps >= max(warmup_step, 1)
    tail = slice(-config.smooth, None)
    per_arm: dict[str, dict[str, Any]] = {}
    for arm in config.arms:
        c = result.curves[arm]
        per_arm[arm] = {
            "final_test_accuracy": mean_std(c["test_accuracy"][:, tail].mean(axis=1)),
            "final_train_loss": mean_std(np.nanmean(c["train_loss"][:, tail], axis=1)),
            "final_val_loss": mean_std(c["val_loss"][:, tail].mean(axis=1)),
            "final_test_loss": mean_std(c["test_loss"][:, tail].mean(axis=1)),
            "shift": mean_std(np.nanmean(c["shift"][:, late], axis=1))
            if config.depth > 1
            else None,
            "percentile_range": mean_std(
                [percentile_range(t, warmup_step).mean() for t in result.traces[arm]]
            ),
        }
    n_classes = 10
    speed: dict[str, Any] = {}
    for init in config.inits:
        pair = [arm_name(net, init) for net in NETS]
        targets: list[float | None] = []
        reached: dict[str, list[int | None]] = {arm: [] for arm in pair}
        for i, _ in enumerate(result.seeds):
            target, steps = steps_to_target(
                result.steps,
                {arm: result.curves[arm]["val_accuracy"][i] for arm in pair},
                chance=1.0 / n_classes,
                fraction=config.target_fraction,
                width=config.smooth,
                total_steps=config.steps,
                eval_every=config.eval_every,
            )
            targets.append(target)
            for arm in pair:
                reached[arm].append(steps.get(arm))
        speed[init] = {"target": targets, "steps": reached}

    def ratio(init: str) -> list[float | None]:
        s = speed[init]["steps"]
        return [
            None if b is None or a is None else a / max(b, config.eval_every)
            for a, b in zip(s[arm_name("baseline", init)], s[arm_name("bn", init)], strict=True)
        ]

    def per_seed(arm: str, key: str) -> list[float]:
        return per_arm[arm][key]["per_seed"]

    base, bn = arm_name("baseline", "paper"), arm_name("bn", "paper")
    effects: dict[str, list[float | None]] = {
        "speed": ratio("paper"),
        "speed_glorot": ratio("glorot") if "glorot" in config.inits else [],
        "accuracy": [
            100 * (b - a)
            for a, b in zip(
                per_seed(base, "final_test_accuracy"),
                per_seed(bn, "final_test_accuracy"),
                strict=True,
            )
        ],
        "shift": [
            a / b if b > 0 else None
            for a, b in zip(per_seed(base, "shift"), per_seed(bn, "shift"), strict=True)
        ]
        if config.depth > 1
        else [],
        "percentiles": [
            a / b if b > 0 else None
            for a, b in zip(
                per_seed(base, "percentile_range"), per_seed(bn, "percentile_range"), strict=True
            )
        ],
    }

    def mean_of(values: Sequence[float | None]) -> str:
        clean = [v for v in values if v is not None]
        return f"{np.mean(clean):,.0f}" if clean else "-"

    measured = {
        "speed": "steps to target: without BN {}, with BN {} (means)".format(
            mean_of(speed["paper"]["steps"][base]), mean_of(speed["paper"]["steps"][bn])
        ),
        "accuracy": "final test accuracy: without BN {:.3f}, with BN {:.3f}".format(
            per_arm[base]["final_test_accuracy"]["mean"], per_arm[bn]["final_test_accuracy"]["mean"]
        ),
        "percentiles": "percentile range: without BN {:.3f}, with BN {:.3f}".format(
            per_arm[base]["percentile_range"]["mean"], per_arm[bn]["percentile_range"]["mean"]
        ),
    }
    if "glorot" in config.inits:
        gb, gn = arm_name("baseline", "glorot"), arm_name("bn", "glorot")
        measured["speed_glorot"] = "steps to target: without BN {}, with BN {} (means)".format(
            mean_of(speed["glorot"]["steps"][gb]), mean_of(speed["glorot"]["steps"][gn])
        )
    if config.depth > 1:
        measured["shift"] = "shift per {} steps: without BN {:.4f}, with BN {:.4f}".format(
            config.eval_every, per_arm[base]["shift"]["mean"], per_arm[bn]["shift"]["mean"]
        )
    claims = []
    for rule in RULES:
        values = effects[rule.key]
        if not values or all(v is None for v in values):
            continue  # not measured in this configuration (e.g. no Glorot pair)
        claims.append(rule.judge(values).to_dict(measured=measured.get(rule.key, "")))
    assert config.lrs is not None  # filled in by __post_init__
    summary = {
        "experiment": "figure1",
        "claim": CLAIM,
        "seeds": list(result.seeds),
        "steps": config.steps,
        "dataset": config.dataset,
        "lrs": dict(config.lrs),
        "warmup_step": warmup_step,
        "arms": per_arm,
        "speed": speed,
        "claims": claims,
        "epochs": epochs(config, results[result.seeds[0]]["n_train"]),
        "figure_notes": FIGURE_NOTES,
        "seconds": float(sum(r["seconds"] for r in results.values())),
    }
    summary["report"] = _report(config, summary)
    return summary


FIGURE_NOTES = {
    "figure1": (
        "The paper's Figure 1 at its own initialisation: (a) test accuracy over training, "
        "(b, c) the 15th/50th/85th percentiles of one last-layer sigmoid's input without and "
        "with BN; compare how fast (a) rises and how much (b) and (c) drift."
    ),
    "speed": (
        "Training loss and smoothed validation accuracy of all four networks: compare the "
        "gap between the BN and no-BN curves at the paper's init with the gap at Glorot's, "
        "which says how much of BN's speed-up is the rescue of a too-small init."
    ),
    "shift": (
        "How far each unit's input distribution moves between measurements because the "
        "earlier layers changed (the layer's own parameters held fixed), in units of its "
        "spread: lower is less internal covariate shift."
    ),
}


def _fmt(stats: Mapping[str, Any] | None, digits: int = 3) -> str:
    if stats is None:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _report(config: Figure1Config, s: Mapping[str, Any]) -> list[str]:
    n = len(s["seeds"])
    rows = [
        ("final test accuracy", "final_test_accuracy", 3),
        ("final training loss", "final_train_loss", 3),
        ("final validation loss", "final_val_loss", 3),
        (f"shift per {config.eval_every} steps", "shift", 4),
        ("percentile range", "percentile_range", 3),
    ]
    width = max(len(label) for label, _, _ in rows) + 2
    arms = list(config.arms)
    lines = [
        f"Figure 1 on {s['dataset']}: {config.depth}x{config.hidden} sigmoid MLP, "
        f"{config.steps} steps of SGD (batch {config.batch_size}, {s['epochs']:.1f} epochs), "
        f"{n} seed"
        f"{'s' if n != 1 else ''}; mean ± std over seeds; after-warm-up numbers from step "
        f"{s['warmup_step']}",
        "learning rates (tuned per arm): " + ", ".join(f"{arm} {s['lrs'][arm]:g}" for arm in arms),
        "",
        f"{'':<{width}}" + "".join(f"{arm:>20}" for arm in arms),
    ]
    for label, key, digits in rows:
        lines.append(
            f"{label:<{width}}" + "".join(f"{_fmt(s['arms'][a][key], digits):>20}" for a in arms)
        )
    lines.append("")
    for init, speed in s["speed"].items():
        pair = [arm_name(net, init) for net in NETS]
        targets = [f"{t:.3f}" if t is not None else "-" for t in speed["target"]]
        lines.append(
            f"{init} init: validation target per seed {', '.join(targets)}; steps to it "
            + "; ".join(f"{arm} {speed['steps'][arm]}" for arm in pair)
        )
    lines.append("")
    lines += [verdict_line(claim) for claim in s["claims"]]
    return lines


def plot(config: Figure1Config, results: Mapping[int, dict], summary: dict) -> dict[str, Any]:
    """The run's figures: ``"figure1"`` (the paper's three panels), ``"speed"`` and
    ``"shift"``."""
    from ..plots import plot_figure1, plot_shift, plot_speed

    result = Figure1Result.from_seed_results(config, results, summary)
    return {
        "figure1": plot_figure1(result),
        "speed": plot_speed(result),
        "shift": plot_shift(result),
    }
