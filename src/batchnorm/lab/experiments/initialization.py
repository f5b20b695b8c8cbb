r"""Resilience to the initial weight scale: every weight multiplied by :math:`c` from 0.01 to 10.

Ioffe & Szegedy (2015), Sec. 3.3: "Batch Normalization also makes training more resilient to
the parameter scale": for a layer followed by BN, :math:`\mathrm{BN}(W u) = \mathrm{BN}((aW) u)`,
so the scale of the weights does not change the layer's Jacobian, and "larger weights lead to
smaller gradients". The claim as it is usually repeated: with BN, how the weights are
initialised hardly matters.

Two predictions are stated before any result. (1) The paper's: BN narrows the spread of final
accuracy over the weight scale :math:`c` compared with no normalisation, where activations and
gradients scale as powers of :math:`c` through the layers. (2) The arithmetic's
(:mod:`._learning_rate_nets`): BN's forward pass is invariant to :math:`c` (up to
:math:`\epsilon`), but its gradient scales as :math:`1/c` and so its *effective* step
:math:`\eta / \lVert W \rVert^2` as :math:`1/c^2`. At a rate fixed at its :math:`c = 1` value,
a BN net with :math:`c = 10` starts with a 100x smaller effective step, which plain SGD's norm
growth (Arora et al. 2019) does not undo, since it only ever *lowers* the effective rate; with
:math:`c = 0.01` it starts with a 10,000x larger one, which the norm growth lowers by itself.
So a BN net trained for a fixed number of steps may well *not* be insensitive to :math:`c`:
the "flat" rules below are stated as the claim is usually made, and may come out not held.
Nor is the forward pass exactly invariant at the smallest scales: a unit's pre-BN variance is
about :math:`c^2` here, so at :math:`c = 0.01` BatchNorm's :math:`\epsilon = 10^{-5}` is some
10 % of it, and each layer shrinks its output by :math:`\sqrt{\sigma^2 / (\sigma^2 +
\epsilon)}` (the tests measure both the exact invariance with :math:`\epsilon` scaled by
:math:`c^2` and the size of this effect).

How this reproduction measures
------------------------------
- **Data.** MNIST-1D at MNIST's size (``"mnist1d-large"``: 55,000 training sequences, a fixed
  5,000 held out for validation, 15,000 test).
- **Networks and arms.** The learning-rate experiment's two nets
  (:data:`._learning_rate_nets.NETS`): ``relu6`` (6x100 ReLU, He init) and ``sigmoid3`` (3x100
  sigmoid, Glorot init), each without (``none``) and with BN (``bn``).
- **Scales.** Every weight of the net, the output layer's too, is drawn at the standard scale
  and multiplied by :math:`c \in` ``scales`` (default 0.01, 0.03, 0.1, 0.3, 1, 3, 10, about
  half-decades); biases start at zero, BN's :math:`\gamma = 1, \beta = 0`. The output layer is
  not followed by BN, so even the BN net's logits start :math:`c` times larger. Within a seed,
  every unit of a net draws the same weights (times :math:`c`) and sees the same mini-batches.
- **Learning rate.** Fixed per arm at its :math:`c = 1` value: ``batchnorm lab tune
  initialization`` tunes the four arms at :math:`c = 1` on the validation split (score: final
  validation accuracy, seed :data:`~batchnorm.lab.protocol.TUNING_SEED`), and the presets read
  the tuned file (:data:`UNTUNED_LR` for an arm never tuned). Plain SGD, batches of 60.
- **Measured per unit** (one arm at one scale, ``steps`` steps): validation accuracy every
  ``eval_every`` steps, the final test accuracy, divergence (non-finite or not-decreasing
  training loss, :func:`batchnorm.lab._classify.diverged`), the hidden layers' weight norms.
- **Spread** (:func:`spread`): per arm and seed, the largest minus the smallest final test
  accuracy over :math:`c`, a diverged run counting as chance (0.1), in percentage points. An
  arm that learned at no scale would have a spread near 0 too: the report prints each scale's
  accuracy next to the spreads, to be read together.

The claims and their pass rules are :data:`RULES`, declared before the first results (see
:mod:`batchnorm.lab.protocol`). Where the code lives: the networks and one unit's training in
``_learning_rate_nets``, the verdicts and report in ``_initialization_summary``, the figures in
:mod:`batchnorm.lab.plots_initialization`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import data as lab_data
from .._classify import CURVE_KEYS
from .._units import (
    Unit,
    check_units_checkpoint,
    check_units_result,
    run_units,
    unit_seed,
    units_metric_rows,
)
from ._initialization_config import (
    CHANCE,
    CLAIM,
    CONFIG_TYPE,
    PRESETS,
    RULES,
    SCALES,
    TITLE,
    UNTUNED_LR,
    InitializationConfig,
    plan,
    prepare,
    spread,
    steps_per_seed,
)
from ._learning_rate_nets import (
    accuracy_or_chance,
    arm_name,
    make_net,
    train_unit,
    unit_checker,
)

__all__ = [
    "CHANCE",
    "CLAIM",
    "CONFIG_TYPE",
    "PRESETS",
    "RULES",
    "SCALES",
    "TITLE",
    "TUNING",
    "UNTUNED_LR",
    "InitializationConfig",
    "check_checkpoint",
    "check_result",
    "metric_rows",
    "plan",
    "plot",
    "prepare",
    "run_seed",
    "spread",
    "steps_per_seed",
    "summarize",
    "train_at_scale",
    "tune_arms",
    "tune_score",
]

# --- one seed ---------------------------------------------------------------------------------


def train_at_scale(
    config: InitializationConfig,
    data: lab_data.Dataset,
    seed: int,
    arm: str,
    scale: float,
    lr: float,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Train one arm (``"relu6/bn"``) with every weight times ``scale`` at rate ``lr``.

    The weights and the batch order are drawn from :func:`batchnorm.lab._units.unit_seed` of
    ``seed`` and the net alone, so every norm and scale of a net shares them.
    """
    net, norm = arm.split("/")
    shared = unit_seed(seed, net)
    model = make_net(
        net,
        norm,
        n_in=data.n_features,
        n_out=data.n_classes,
        hidden=config.hidden,
        generator=torch.Generator().manual_seed(shared),
        weight_scale=scale,
    )
    return train_unit(
        model,
        data,
        lr=lr,
        steps=config.steps,
        batch_size=config.batch_size,
        seed=shared,
        eval_every=config.eval_every,
        advance=advance,
    )


def run_seed(
    config: InitializationConfig,
    data: lab_data.Dataset,
    seed: int,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Train every unit of :func:`plan` for one seed (resuming from ``checkpoint``).

    Returns:
        ``{"seed", "seconds", "units"}``: unit name -> its
        :func:`._learning_rate_nets.train_unit` result.
    """

    def run_unit(unit: Unit, step: Callable[[int], None]) -> dict:
        arm = arm_name(unit.params["net"], unit.params["norm"])
        assert config.lrs is not None  # filled in by __post_init__
        return train_at_scale(
            config, data, seed, arm, unit.params["scale"], config.lrs[arm], advance=step
        )

    return run_units(
        plan(config),
        run_unit,
        seed=seed,
        checkpoint=checkpoint,
        save_checkpoint=save_checkpoint,
        advance=advance,
    )


def check_result(config: InitializationConfig, seed: int, result: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the entry unless ``result`` is a complete :func:`run_seed`
    result of this config and seed."""
    check_units_result(plan(config), seed, result, unit_checker(config))


def check_checkpoint(
    config: InitializationConfig, data: Any, seed: int, state: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` naming the entry unless ``state`` can continue this seed."""
    check_units_checkpoint(plan(config), state, unit_checker(config))


def metric_rows(result: Mapping[str, Any]) -> list[dict]:
    """One row per unit and measured step: the curve's values there."""
    return units_metric_rows(result, CURVE_KEYS)


# --- tuning -----------------------------------------------------------------------------------


def tune_arms(config: InitializationConfig) -> list[str]:
    """The arms ``batchnorm lab tune initialization`` tunes, each at :math:`c = 1`."""
    return list(config.arms)


def tune_score(
    config: InitializationConfig, data: lab_data.Dataset, arm: str, value: float, seed: int
) -> float:
    """Final validation accuracy of ``arm`` at :math:`c = 1` and rate ``value`` (NaN if the run
    diverged): the quantity the experiment reports, on the validation split."""
    run = train_at_scale(config, data, seed, arm, 1.0, value)
    score = accuracy_or_chance(run, "val_accuracy", math.nan)
    return score


TUNING = {
    "arms": tune_arms,
    "score": tune_score,
    "grid": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "factor": 3.0,
    "hyper_parameter": "lr",
    "metric": "final validation accuracy at weight scale c = 1",
    "preset": "quick",
}


def summarize(config: InitializationConfig, results: Mapping[int, dict]) -> dict:
    """Judge :data:`RULES` on a run's results: numbers, verdict rows and a printable report.

    See :func:`._initialization_summary.summarize` for the keys.
    """
    from . import _initialization_summary

    return _initialization_summary.summarize(config, results)


def plot(
    config: InitializationConfig, results: Mapping[int, dict], summary: dict
) -> dict[str, Any]:
    """The run's figures: ``"accuracy"`` (final test accuracy per scale, every seed) and
    ``"curves"`` (BN's validation accuracy over training at each scale)."""
    from ..plots_initialization import plot_accuracy, plot_curves
    from ._initialization_summary import ScaleSweep

    sweep = ScaleSweep.from_seed_results(config, results, summary)
    return {"accuracy": plot_accuracy(sweep), "curves": plot_curves(sweep)}
