"""The batch-size experiment's training: a seed's plan of networks (:func:`plan`), one network
trained and measured (:func:`run_unit`), the own-statistics evaluation
(:func:`batch_mode_metrics`), the checks of results and checkpoints, and the tuning score.

The design is explained in :mod:`batchnorm.lab.experiments.batch_size`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .. import _checks as check
from .. import data as lab_data
from .._classify import CURVE_KEYS, check_curve, finite_or_none, train_classifier
from .._training import threads
from .._units import (
    Unit,
    check_units_checkpoint,
    check_units_result,
    run_units,
    unit_seed,
    units_metric_rows,
)
from ..models import make_cnn1d
from ._batch_size_config import ARMS, BatchSizeConfig

__all__ = [
    "TUNING_WIDTH",
    "batch_mode_metrics",
    "build_model",
    "check_checkpoint",
    "check_result",
    "cosine_lr",
    "metric_rows",
    "plan",
    "run_seed",
    "run_unit",
    "test_batches",
    "train_network",
    "tune_arms",
    "tune_score",
    "unit_name",
]

# The tuning score averages this many of the last validation measurements (the last fifth of
# training with the default ten measurements), to damp the step-to-step noise of one.
TUNING_WIDTH = 3
# The floats a unit's result holds besides train_classifier's: test error (%) and loss with the
# test batches normalised by their own statistics.
_BATCH_MODE_KEYS = ("test_error_batch", "test_loss_batch")


def unit_name(arm: str, batch_size: int) -> str:
    """The name of the network of ``arm`` trained at ``batch_size``: ``"batchnorm/b2"``."""
    return f"{arm}/b{batch_size}"


def plan(config: BatchSizeConfig) -> list[Unit]:
    """A seed's networks, one unit each: every arm at every batch size, the largest batch
    first, except ghost BN where it is BatchNorm (:meth:`BatchSizeConfig.is_batchnorm`), whose
    numbers are BatchNorm's network's."""
    units = []
    for b in sorted(config.batch_sizes, reverse=True):
        for arm in ARMS:
            if config.is_batchnorm(arm, b):
                continue
            params = {"arm": arm, "batch_size": b, "lr": config.lr_for(arm, b)}
            units.append(Unit(unit_name(arm, b), config.steps_for(b), params))
    return units


def build_model(config: BatchSizeConfig, data: lab_data.Dataset, arm: str, seed: int, steps: int):
    """The CNN of ``arm`` for a network of ``steps`` steps. The weights are He-initialised from
    a generator seeded by ``seed`` alone, so every arm and batch size of a seed starts from the
    same convolution weights; torch's global generator is left as it was."""
    generator = torch.Generator().manual_seed(unit_seed(seed, "init"))
    with torch.random.fork_rng(devices=[]):  # nn.Conv1d's own default init draws from it
        return make_cnn1d(
            data.n_features,
            data.n_classes,
            channels=config.channels,
            norm=arm,
            init="he",
            generator=generator,
            norm_options=config.norm_options(arm, steps),
        )


def cosine_lr(lr: float, step: int, steps: int) -> float:
    r"""The learning rate of step ``step`` (counted from 0) of ``steps``: cosine decay from
    ``lr`` towards 0 (Loshchilov & Hutter 2017, without restarts),
    :math:`\eta_t = \eta \, (1 + \cos(\pi t / T)) / 2`."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def train_network(
    config: BatchSizeConfig,
    data: lab_data.Dataset,
    arm: str,
    batch_size: int,
    lr: float,
    seed: int,
    advance: Callable[[int], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``arm``'s network at ``batch_size`` from peak learning rate ``lr`` (cosine decay
    to 0 over its steps, SGD with ``config.momentum``); return it with
    :func:`~batchnorm.lab._classify.train_classifier`'s result. The batch order is a function
    of ``seed`` alone: every arm and batch size of a seed sees the training examples in the
    same order."""
    steps = config.steps_for(batch_size)
    model = build_model(config, data, arm, seed, steps)
    run = train_classifier(
        model,
        data,
        lr=lr,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        eval_every=config.eval_every(batch_size),
        momentum=config.momentum,
        advance=advance,
        lr_at=lambda t: cosine_lr(lr, t, steps),
    )
    return model, run


def test_batches(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Indices ``0 .. n - 1`` in one seeded order, cut into batches of ``batch_size``; a last
    batch of a single example joins the one before it (one value per channel has no spread).

    Raises:
        ValueError: If ``batch_size < 2`` or ``n < 2``.
    """
    if batch_size < 2 or n < 2:
        raise ValueError(
            f"test_batches(): expected batch_size >= 2 and n >= 2, got batch_size="
            f"{batch_size!r} and n={n!r}."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def batch_mode_metrics(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int
) -> tuple[float, float | None]:
    """Test error (%) and mean cross-entropy with every batch-normalising layer in training
    mode on test batches of ``batch_size`` (:func:`test_batches`), its running statistics and
    counter frozen: BatchNorm normalises each test batch with the batch's own statistics,
    ghost BN each ghost batch with its own, batch renorm corrects the batch's statistics
    towards the (frozen) running ones. Every other layer is in eval mode, so a network without
    batch-normalising layers computes exactly what eval mode does.

    Works on a deep copy whose buffers are restored after every batch: ``model`` is left as it
    was, and every test batch sees the same running statistics, whatever the order. Runs on
    one thread (torch's and Numba's, restored afterwards): these many small forwards gain
    nothing from a second one.

    Returns:
        ``(error, loss)``; the loss is ``None`` if it is not finite.
    """
    probe = copy.deepcopy(model).eval()
    layers = [m for m in probe.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[t.clone() for t in layer.buffers(recurse=False)] for layer in layers]
    for layer in layers:
        layer.train()
    logits, labels = [], []
    with torch.no_grad(), threads(1):
        for idx in test_batches(len(y), batch_size, seed):
            logits.append(probe(x[idx]).double())
            labels.append(y[idx])
            for layer, buffers in zip(layers, saved, strict=True):
                for t, s in zip(layer.buffers(recurse=False), buffers, strict=True):
                    t.copy_(s)
    out, target = torch.cat(logits), torch.cat(labels)
    loss = nn.functional.cross_entropy(out, target).item()
    error = 100.0 * (out.argmax(dim=1) != target).double().mean().item()
    return error, finite_or_none(loss)


def _has_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def run_unit(
    config: BatchSizeConfig,
    data: lab_data.Dataset,
    seed: int,
    unit: Unit,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train and measure one network (:func:`train_network`): its
    :func:`~batchnorm.lab._classify.train_classifier` result, plus ``test_error`` (%, eval
    mode: the running statistics) and the own-statistics evaluation ``test_error_batch`` /
    ``test_loss_batch`` (:func:`batch_mode_metrics`; for a network without batch-normalising
    layers it is eval mode, copied). The error numbers are ``None`` for a network whose
    training loss became non-finite. The order of the test batches is a function of ``seed``
    and the batch size.
    """
    arm, b, lr = unit.params["arm"], unit.params["batch_size"], unit.params["lr"]
    model, run = train_network(config, data, arm, b, lr, seed, advance)
    out = {"arm": arm, "batch_size": b, "lr": lr, "steps": unit.steps, **run}
    if run["diverged"]:
        out.update(test_error=None, test_error_batch=None, test_loss_batch=None)
        return out
    out["test_error"] = 100.0 * (1.0 - run["test_accuracy"])
    if _has_batch_statistics(model):
        order = unit_seed(seed, f"test-batches/b{b}")
        error, loss = batch_mode_metrics(model, data.x_test, data.y_test, b, order)
    else:
        error, loss = out["test_error"], run["test_loss"]
    out.update(test_error_batch=error, test_loss_batch=loss)
    return out


def run_seed(
    config: BatchSizeConfig,
    data: lab_data.Dataset,
    seed: int,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Train every network of one seed (:func:`plan`), checkpointing after each; a resumed
    seed runs only the networks its checkpoint lacks and gives the uninterrupted result."""
    return run_units(
        plan(config),
        lambda unit, step: run_unit(config, data, seed, unit, step),
        seed=seed,
        checkpoint=checkpoint,
        save_checkpoint=save_checkpoint,
        advance=advance,
    )


# --- checks of what a run reads back ------------------------------------------------------------


def _check_error(value: Any, where: str) -> None:
    if value is None:
        raise ValueError(f"expected {where} to be a number in [0, 100], got None.")
    if check.number(value, where, low=0.0) > 100.0:
        raise ValueError(f"expected {where} to be a number in [0, 100], got {value!r}.")


def _unit_checker(config: BatchSizeConfig) -> Callable[[Unit, Any, str], None]:
    def check_unit(unit: Unit, value: Any, where: str) -> None:
        for key in ("arm", "batch_size", "lr", "steps"):
            want = unit.steps if key == "steps" else unit.params[key]
            check.equal(check.item(value, key, where), want, check.at(where, key))
        check_curve(value, where, config.measured(unit.params["batch_size"]))
        diverged = check.item(value, "diverged", where)
        if not isinstance(diverged, bool):
            raise ValueError(
                f"expected {check.at(where, 'diverged')} to be a bool, got "
                f"{check.describe(diverged)}."
            )
        for key in ("test_error", *_BATCH_MODE_KEYS):
            got = check.item(value, key, where)
            if diverged:
                if got is not None:
                    raise ValueError(
                        f"expected {check.at(where, key)} to be None (the network diverged), "
                        f"got {check.describe(got)}."
                    )
            elif key == "test_loss_batch":
                if got is not None:
                    check.number(got, check.at(where, key), low=0.0)
            else:
                _check_error(got, check.at(where, key))

    return check_unit


def check_result(config: BatchSizeConfig, seed: int, result: Any) -> None:
    """Raise ``ValueError`` naming the entry unless ``result`` is :func:`run_seed`'s complete
    result of this config and seed."""
    check_units_result(plan(config), seed, result, _unit_checker(config))


def check_checkpoint(
    config: BatchSizeConfig, data: Any, seed: int, state: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` naming the entry unless ``state`` is a checkpoint :func:`run_seed`
    saved for this config: networks of its plan, each complete, steps adding up."""
    check_units_checkpoint(plan(config), state, _unit_checker(config))


def metric_rows(result: Mapping[str, Any]) -> list[dict]:
    """One row per network and validation measurement (``train_loss``, ``val_accuracy``,
    ``val_loss`` at each ``step``), then one row per network with its final numbers."""
    rows = units_metric_rows(result, CURVE_KEYS)
    for row in rows:
        unit = result["units"][row["unit"]]
        row["arm"], row["batch_size"] = unit["arm"], unit["batch_size"]
    for name, unit in result["units"].items():
        rows.append(
            {
                "seed": result["seed"],
                "unit": name,
                "arm": unit["arm"],
                "batch_size": unit["batch_size"],
                "lr": unit["lr"],
                "steps": unit["steps"],
                "diverged": unit["diverged"],
                "test_error": unit["test_error"],
                "test_error_batch": unit["test_error_batch"],
            }
        )
    return rows


# --- tuning ---------------------------------------------------------------------------------


def tune_arms(config: BatchSizeConfig) -> list[str]:
    """The arms ``batchnorm lab tune batch-size`` tunes: every arm, at the reference batch."""
    return list(ARMS)


def tune_score(
    config: BatchSizeConfig, data: lab_data.Dataset, arm: str, value: float, seed: int
) -> float:
    """Train ``arm`` at the reference batch size with learning rate ``value`` and return its
    validation accuracy at the end: the mean of the last :data:`TUNING_WIDTH` measurements
    (NaN if the training loss became non-finite). The test set is not looked at."""
    _, run = train_network(config, data, arm, config.reference_batch, value, seed)
    last = run["curve"]["val_accuracy"][-TUNING_WIDTH:]
    if run["diverged"] or any(v is None for v in last):
        return math.nan
    return float(sum(last) / len(last))
