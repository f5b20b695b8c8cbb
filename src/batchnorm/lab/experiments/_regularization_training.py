"""Training one seed of the regularization experiment (one unit per arm), the tuning score, and
the checks of what a run reads back (results, checkpoints).
See :mod:`batchnorm.lab.experiments.regularization` for the design.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _checks as check
from .. import data as lab_data
from .._classify import check_curve, train_classifier
from .._units import (
    Unit,
    check_units_checkpoint,
    check_units_result,
    run_units,
    unit_seed,
    units_metric_rows,
)
from ..models import make_mlp
from ..protocol import TUNING_SEED
from ._regularization_config import ARMS, RegularizationConfig, arm_model_options, units

__all__ = [
    "build_model",
    "check_arm",
    "check_checkpoint",
    "check_result",
    "final_validation_accuracy",
    "metric_rows",
    "run_seed",
    "train_arm",
    "tune_arms",
    "tune_score",
]

# torch.Generator seeds must fit in 64 bits, and batch_indices multiplies its seed by ~1e6.
_BATCH_SEED_RANGE = 2**31


def build_model(
    config: RegularizationConfig, data: lab_data.Dataset, arm: str, seed: int
) -> nn.Sequential:
    """One arm's network; its linear weights are drawn from a generator seeded by ``seed``
    alone, so every arm of a seed starts from the same weights (dropout and BN layers hold
    none of those)."""
    generator = torch.Generator().manual_seed(unit_seed(seed, "weights"))
    return make_mlp(
        data.n_features,
        data.n_classes,
        hidden=config.hidden,
        depth=config.depth,
        activation="relu",
        init="he",
        generator=generator,
        **arm_model_options(config, arm),
    )


def train_arm(
    config: RegularizationConfig,
    data: lab_data.Dataset,
    seed: int,
    arm: str,
    lr: float,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train one arm from scratch and measure it: the result of its unit.

    The mini-batches come from a generator seeded by ``seed`` (the same for every arm); the
    dropout masks from the global RNG, seeded here by ``(seed, arm)`` and restored afterwards,
    so an arm's result depends on nothing that ran before it.

    Returns:
        ``{"lr", **train_classifier(...)}``: the curve and the final numbers.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(unit_seed(seed, arm))
        model = build_model(config, data, arm, seed)
        run = train_classifier(
            model,
            data,
            lr=lr,
            steps=config.arm_steps,
            batch_size=config.batch_size,
            seed=unit_seed(seed, "batches") % _BATCH_SEED_RANGE,
            eval_every=config.eval_every,
            momentum=config.momentum,
            advance=advance,
        )
    return {"lr": float(lr), **run}


def run_seed(
    config: RegularizationConfig,
    data: lab_data.Dataset,
    seed: int,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Train every arm of one seed (checkpointed after each arm); the runner's entry point.

    Returns:
        ``{"seed", "seconds", "units"}``, ``units`` mapping each arm to its ``train_arm`` result.
    """

    def run_unit(unit: Unit, step: Callable[[int], None]) -> dict:
        return train_arm(config, data, seed, unit.name, unit.params["lr"], step)

    return run_units(
        units(config),
        run_unit,
        seed=seed,
        checkpoint=checkpoint,
        save_checkpoint=save_checkpoint,
        advance=advance,
    )


def metric_rows(result: Mapping[str, Any]) -> list[dict]:
    """One row per seed, arm and measured step, for ``metrics.jsonl``."""
    return units_metric_rows(result, ("train_loss", "val_accuracy", "val_loss"))


# --- tuning -----------------------------------------------------------------------------------


def tune_arms(config: RegularizationConfig) -> list[str]:
    """The arms ``batchnorm lab tune regularization`` tunes, each on its own."""
    return list(ARMS)


def final_validation_accuracy(run: Mapping[str, Any], width: int) -> float:
    """The mean of a run's last ``width`` validation accuracies; NaN for a diverged run."""
    if run["diverged"]:
        return math.nan
    values = [math.nan if v is None else v for v in run["curve"]["val_accuracy"][-width:]]
    return float(np.mean(values))


def tune_score(
    config: RegularizationConfig,
    data: lab_data.Dataset,
    arm: str,
    lr: float,
    seed: int = TUNING_SEED,
) -> float:
    """One arm trained alone at ``lr``: its final validation accuracy (mean of the last
    ``smooth`` measurements; the arms are judged at the end of training); NaN if diverged."""
    return final_validation_accuracy(train_arm(config, data, seed, arm, lr), config.smooth)


# --- checks of what a run reads back ----------------------------------------------------------


def _fraction(value: Any, where: str) -> None:
    if not (check.number(value, where, low=0.0) <= 1.0):
        raise ValueError(f"expected {where} to be a fraction in [0, 1], got {value!r}.")


def check_arm(config: RegularizationConfig, unit: Unit, run: Any, where: str) -> None:
    """Raise ``ValueError`` unless ``run`` is :func:`train_arm`'s result for ``unit``."""
    check.equal(check.item(run, "lr", where), unit.params["lr"], check.at(where, "lr"))
    expected = config.measured_steps()
    check_curve(run, where, n_measured=len(expected))
    diverged = run["diverged"]
    if not isinstance(diverged, bool):
        raise ValueError(
            f"expected {check.at(where, 'diverged')} to be a bool, got {check.describe(diverged)}."
        )
    curve_at = check.at(where, "curve")
    steps = run["curve"]["steps"]
    if steps != expected[: len(steps)]:
        raise ValueError(
            f"expected {check.at(curve_at, 'steps')} to be the first measured steps "
            f"{expected[:4]}..., got {check.describe(steps)}."
        )
    for k, value in enumerate(run["curve"]["val_accuracy"]):
        _fraction(value, f"{check.at(curve_at, 'val_accuracy')}[{k}]")
    if not diverged:
        for key in ("test_accuracy", "train_accuracy"):
            _fraction(check.item(run, key, where), check.at(where, key))
        check.number(run["test_loss"], check.at(where, "test_loss"), low=0.0)


def check_result(config: RegularizationConfig, seed: int, result: Any) -> None:
    """Raise ``ValueError`` ("expected <entry> to be ..., got ...") unless ``result`` is a
    complete :func:`run_seed` result of this config and seed."""
    check_units_result(units(config), seed, result, _arm_check(config))


def check_checkpoint(
    config: RegularizationConfig, data: lab_data.Dataset, seed: int, state: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` unless ``state`` is a checkpoint :func:`run_seed` saved for this
    config: finished arms of its plan whose steps add up to the state's ``step``."""
    check_units_checkpoint(units(config), state, _arm_check(config))


def _arm_check(config: RegularizationConfig) -> Callable[[Unit, Any, str], None]:
    return lambda unit, run, where: check_arm(config, unit, run, where)
