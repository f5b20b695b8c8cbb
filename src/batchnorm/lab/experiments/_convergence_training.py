"""Training one seed of the convergence experiment (one unit per arm), the tuning score, and
the checks of what a run reads back (results, checkpoints).
See :mod:`batchnorm.lab.experiments.convergence` for the design.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .. import _checks as check
from .. import data as lab_data
from .._classify import best_smoothed, check_curve, train_classifier
from .._units import (
    Unit,
    check_units_checkpoint,
    check_units_result,
    run_units,
    unit_seed,
    units_metric_rows,
)
from ..models import make_cnn1d, make_mlp
from ..protocol import TUNING_SEED
from ._convergence_config import ARMS, ConvergenceConfig, split_arm, units

__all__ = [
    "EVAL_CHUNK",
    "EvalInChunks",
    "build_model",
    "check_arm",
    "check_checkpoint",
    "check_result",
    "metric_rows",
    "run_seed",
    "train_arm",
    "tune_arms",
    "tune_score",
]

# torch.Generator seeds must fit in 64 bits, and batch_indices multiplies its seed by ~1e6.
_BATCH_SEED_RANGE = 2**31
# Examples per forward when a network is evaluated (eval mode, no gradient). The CNN's
# activations for all 55,000 training sequences at once are ~280 MB a layer: measured on this
# machine, the first such evaluation took 6.6 s of CPU and later ones 1.2 s; in chunks of 4,096
# 0.9 s (and the 15,000 test sequences 1.1 -> 0.2 s). Eval-mode BN treats every example on its
# own, so chunking changes no number beyond the float rounding of a different batch size.
EVAL_CHUNK = 4096


class EvalInChunks(nn.Sequential):
    """A :class:`torch.nn.Sequential` that, in eval mode without gradients, runs a large input in
    chunks of :data:`EVAL_CHUNK` examples; training forwards are :class:`~torch.nn.Sequential`'s.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or len(input) <= EVAL_CHUNK:
            return super().forward(input)
        run = super().forward
        return torch.cat([run(part) for part in input.split(EVAL_CHUNK)])


def build_model(
    config: ConvergenceConfig, data: lab_data.Dataset, net: str, norm: str, seed: int
) -> nn.Sequential:
    """One arm's network, its weights drawn from a generator seeded by ``(seed, net)``: the two
    arms of a network start from the same convolution and linear weights. Evaluated in chunks
    (:class:`EvalInChunks`); the layers keep :mod:`batchnorm.lab.models`' names.

    Args:
        config: The settings (sizes).
        data: The dataset (input length and classes).
        net: ``"mlp"`` or ``"cnn"``.
        norm: ``"none"`` or ``"bn"``.
        seed: The evaluation (or tuning) seed.
    """
    generator = torch.Generator().manual_seed(unit_seed(seed, f"{net}/weights"))
    norm = "batchnorm" if norm == "bn" else "none"
    if net == "mlp":
        model = make_mlp(
            data.n_features,
            data.n_classes,
            hidden=config.hidden,
            depth=config.depth,
            activation="sigmoid",
            norm=norm,
            init="glorot",
            generator=generator,
        )
    else:
        model = make_cnn1d(
            data.n_features,
            data.n_classes,
            channels=config.channels,
            activation="relu",
            norm=norm,
            init="he",
            generator=generator,
        )
    return EvalInChunks(OrderedDict(model.named_children()))


def train_arm(
    config: ConvergenceConfig,
    data: lab_data.Dataset,
    seed: int,
    arm: str,
    lr: float,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train one arm from scratch and measure it: the result of its unit.

    Everything it draws comes from generators seeded by ``seed`` and the arm's network, and
    the global RNG (which torch's default layer initialisation draws from before the weights
    are redrawn) is seeded inside and restored afterwards, so an arm's result depends on
    nothing that ran before it.

    Returns:
        ``{"lr", **train_classifier(...)}``: the curve and the final numbers.
    """
    net, norm = split_arm(arm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(unit_seed(seed, arm))
        model = build_model(config, data, net, norm, seed)
        run = train_classifier(
            model,
            data,
            lr=lr,
            steps=config.steps_for(net),
            batch_size=config.batch_size_for(net),
            seed=unit_seed(seed, f"{net}/batches") % _BATCH_SEED_RANGE,
            eval_every=config.eval_every,
            momentum=config.momentum_for(net),
            advance=advance,
        )
    return {"lr": float(lr), **run}


def run_seed(
    config: ConvergenceConfig,
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


def tune_arms(config: ConvergenceConfig) -> list[str]:
    """The arms ``batchnorm lab tune convergence`` tunes, each on its own."""
    return list(ARMS)


def tune_score(
    config: ConvergenceConfig,
    data: lab_data.Dataset,
    arm: str,
    lr: float,
    seed: int = TUNING_SEED,
) -> float:
    """One arm trained alone at ``lr``: its best smoothed validation accuracy (the quantity the
    speed target is built from); NaN if its loss became non-finite."""
    run = train_arm(config, data, seed, arm, lr)
    if run["diverged"]:
        return math.nan
    return best_smoothed(run["curve"]["val_accuracy"], config.smooth)


# --- checks of what a run reads back ----------------------------------------------------------


def _fraction(value: Any, where: str) -> None:
    if not (check.number(value, where, low=0.0) <= 1.0):
        raise ValueError(f"expected {where} to be a fraction in [0, 1], got {value!r}.")


def check_arm(config: ConvergenceConfig, unit: Unit, run: Any, where: str) -> None:
    """Raise ``ValueError`` unless ``run`` is :func:`train_arm`'s result for ``unit``."""
    check.equal(check.item(run, "lr", where), unit.params["lr"], check.at(where, "lr"))
    expected = config.measured_steps(unit.params["net"])
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


def check_result(config: ConvergenceConfig, seed: int, result: Any) -> None:
    """Raise ``ValueError`` ("expected <entry> to be ..., got ...") unless ``result`` is a
    complete :func:`run_seed` result of this config and seed."""
    check_units_result(units(config), seed, result, _arm_check(config))


def check_checkpoint(
    config: ConvergenceConfig, data: lab_data.Dataset, seed: int, state: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` unless ``state`` is a checkpoint :func:`run_seed` saved for this
    config: finished arms of its plan whose steps add up to the state's ``step``."""
    check_units_checkpoint(units(config), state, _arm_check(config))


def _arm_check(config: ConvergenceConfig) -> Callable[[Unit, Any, str], None]:
    return lambda unit, run, where: check_arm(config, unit, run, where)
