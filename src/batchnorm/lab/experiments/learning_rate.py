r"""Higher learning rates with BatchNorm: a sweep of the rate over 4.5 orders of magnitude.

Ioffe & Szegedy (2015), Sec. 3.3 ("Batch Normalization enables higher learning rates"): without
BN a too-high rate makes gradients explode or the model get stuck; with BN the layer's output
does not change with the scale of its weights, so "larger weights lead to smaller gradients, and
Batch Normalization will stabilize the parameter growth". Their Sec. 4.2 trains Inception with
5x and 30x the initial rate (BN-x5, BN-x30). Bjorck et al. (2018, "Understanding batch
normalization") argue that this is *where* BN's benefit comes from: BN lets the network train
at rates that would diverge without it, and those rates generalise better. Arora, Li & Lyu
(2019, "Theoretical analysis of auto rate-tuning by batch normalization") explain the
stability: for a weight followed by BN the loss is scale-invariant, the effective step is
:math:`\eta / \lVert W \rVert^2`, and since the gradient is orthogonal to :math:`W`, plain SGD
grows :math:`\lVert W \rVert` by itself, lowering the effective rate (the arithmetic is in
:mod:`._learning_rate_nets`).

How this reproduction measures
------------------------------
- **Data.** MNIST-1D at MNIST's size (``"mnist1d-large"``: 60,000 training sequences of 40
  values, of which a fixed 5,000 are the validation split, and 15,000 test sequences).
- **Networks and arms.** Two nets (:data:`._learning_rate_nets.NETS`): ``relu6``, 6 hidden
  layers of 100 ReLU units, He init; ``sigmoid3``, the paper's 3 hidden layers of 100 sigmoid
  units, Glorot init. Each without (``none``) and with BN (``bn``): four arms.
- **The sweep.** Every arm is trained at every rate of a half-decade grid (``lrs``, default
  :data:`HALF_DECADES`: :math:`10^{-2.5} \dots 10^{2}`, 10 rates over 4.5 orders of magnitude),
  plain SGD (no momentum, no weight decay), mini-batches of 60, ``steps`` steps. One (arm,
  rate) pair is one unit (:mod:`batchnorm.lab._units`). Within a seed, every unit of a net
  starts from the same ``nn.Linear`` weights and sees the same mini-batches, so the arms and
  rates differ only in BN and the rate. The budget is short: ``quick`` trains 500 steps per
  run (about half an epoch), ``full`` 2,000 (about two); which rate is best depends on it, and
  the verdicts are about these budgets.
- **No tuning.** The learning rate is this experiment's variable, swept over the whole grid for
  every arm: there is no other hyper-parameter to tune, so :data:`TUNING` is ``None``.
- **Measured per unit.** Validation accuracy and loss every ``eval_every`` steps; test
  accuracy at the end; whether the run *diverged* (:func:`batchnorm.lab._classify.diverged`:
  its training loss became non-finite, or its last measured training loss is not below its
  first step's); the Frobenius norm of each hidden layer's weight at every measurement.
- **Per arm and seed**, from those units:

  - the *final accuracy* of a rate: the last validation (or the test) accuracy, chance (0.1)
    if the run diverged;
  - the *largest stable rate* (:func:`largest_stable_rate`): the largest rate whose run did not
    diverge (the issue's definition, which the rules use). A run whose loss ended a hair below
    its first step's is "stable" by it even if it learned nothing, so the report also prints,
    as a description and not a rule, the *largest rate that learned*
    (:func:`largest_learning_rate`): stable and a final validation accuracy at least
    :data:`LEARNED_MARGIN` above chance (added after the one sanity-check seed of the quick
    preset on the tuning seed showed stable runs at chance; the rules were left as declared);
  - the *best* rate: the one with the highest final validation accuracy (the smaller rate on
    a tie), and the *test* accuracy there (:func:`best_index`), so the test set never chooses;
  - the *good range* (:func:`good_range`): the stable rates whose final validation accuracy
    is within ``within`` (2 pp) of the arm's best, counted in half-decades (each rate counts as
    its grid step);
  - the *effective rate* of each hidden layer, :math:`\eta / \lVert W_l \rVert^2`, at the start
    and at the end (:func:`._learning_rate_nets.effective_rates`), and their ratio, the
    *auto-tuning factor* :math:`\prod_l (\lVert W_l^{end} \rVert^2 / \lVert W_l^{0}
    \rVert^2)^{1/L}` (:func:`autotune_factor`, the geometric mean over the :math:`L` hidden
    layers).

The claims and their pass rules are :data:`RULES`, declared before the first results (see
:mod:`batchnorm.lab.protocol` for how a verdict is reached). Every rule is judged per net
except the auto-tuning one, whose effect is the smaller of the two nets' factors (it must hold
in both).

Where the code lives: the networks and one unit's training in ``_learning_rate_nets`` (shared
with :mod:`.initialization`), the verdicts and report in ``_learning_rate_summary``, the
figures in :mod:`batchnorm.lab.plots_learning_rate`.
"""

from __future__ import annotations

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
from ._learning_rate_config import (
    CHANCE,
    CLAIM,
    CONFIG_TYPE,
    HALF_DECADES,
    LEARNED_MARGIN,
    PRESETS,
    RULES,
    TITLE,
    TUNING,
    LearningRateConfig,
    autotune_factor,
    best_index,
    good_range,
    largest_learning_rate,
    largest_stable_rate,
    plan,
    prepare,
    stable_gap,
    steps_per_seed,
)
from ._learning_rate_nets import make_net, train_unit, unit_checker

__all__ = [
    "CHANCE",
    "CLAIM",
    "CONFIG_TYPE",
    "HALF_DECADES",
    "LEARNED_MARGIN",
    "PRESETS",
    "RULES",
    "TITLE",
    "TUNING",
    "LearningRateConfig",
    "autotune_factor",
    "best_index",
    "check_checkpoint",
    "check_result",
    "good_range",
    "largest_learning_rate",
    "largest_stable_rate",
    "metric_rows",
    "plan",
    "plot",
    "prepare",
    "run_seed",
    "stable_gap",
    "steps_per_seed",
    "summarize",
]

# --- one seed ---------------------------------------------------------------------------------


def run_seed(
    config: LearningRateConfig,
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
        net, norm, lr = unit.params["net"], unit.params["norm"], unit.params["lr"]
        # One draw per net and seed: every norm and rate of the net starts from the same
        # weights and sees the same batches.
        shared = unit_seed(seed, net)
        model = make_net(
            net,
            norm,
            n_in=data.n_features,
            n_out=data.n_classes,
            hidden=config.hidden,
            generator=torch.Generator().manual_seed(shared),
        )
        return train_unit(
            model,
            data,
            lr=lr,
            steps=config.steps,
            batch_size=config.batch_size,
            seed=shared,
            eval_every=config.eval_every,
            advance=step,
        )

    return run_units(
        plan(config),
        run_unit,
        seed=seed,
        checkpoint=checkpoint,
        save_checkpoint=save_checkpoint,
        advance=advance,
    )


def check_result(config: LearningRateConfig, seed: int, result: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the entry unless ``result`` is a complete :func:`run_seed`
    result of this config and seed."""
    check_units_result(plan(config), seed, result, unit_checker(config))


def check_checkpoint(
    config: LearningRateConfig, data: Any, seed: int, state: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` naming the entry unless ``state`` can continue this seed."""
    check_units_checkpoint(plan(config), state, unit_checker(config))


def metric_rows(result: Mapping[str, Any]) -> list[dict]:
    """One row per unit and measured step: the curve's values there."""
    return units_metric_rows(result, CURVE_KEYS)


def summarize(config: LearningRateConfig, results: Mapping[int, dict]) -> dict:
    """Judge :data:`RULES` on a run's results: numbers, verdict rows and a printable report.

    See :func:`._learning_rate_summary.summarize` for the keys.
    """
    from . import _learning_rate_summary

    return _learning_rate_summary.summarize(config, results)


def plot(config: LearningRateConfig, results: Mapping[int, dict], summary: dict) -> dict[str, Any]:
    """The run's figures: ``"accuracy"`` (final test accuracy per rate, divergence marked) and
    ``"effective_rate"`` (BN's effective rate at the start and the end, per rate)."""
    from ..plots_learning_rate import plot_accuracy, plot_effective_rate
    from ._learning_rate_summary import Sweep

    sweep = Sweep.from_seed_results(config, results, summary)
    return {"accuracy": plot_accuracy(sweep), "effective_rate": plot_effective_rate(sweep)}
