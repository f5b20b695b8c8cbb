"""Training one seed of the mechanism experiment: one unit per arm (:mod:`batchnorm.lab._units`),
each a :func:`~batchnorm.lab._classify.train_classifier` run measured every ``measure_every``
steps by :mod:`._mechanism_measure`; the checks of its results and checkpoints, its metric rows,
and the tuning score.

Every arm of a seed starts from the same ``nn.Linear`` weights (one generator seeded from the
seed alone) and sees the same mini-batches in the same order; the probe batch the measurements
use is a fixed draw of ``batch_size`` training examples, the same for every arm. Measuring works
on deep copies only (see :mod:`._mechanism_measure`), so it cannot change the trajectory: the
tests train with and without it and compare.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .. import _checks as check
from .._classify import (
    CURVE_KEYS,
    best_smoothed,
    check_curve,
    diverged,
    finite_or_none,
    train_classifier,
)
from .._training import denormals_flushed, measured_steps, threads
from .._units import (
    Unit,
    check_units_checkpoint,
    check_units_result,
    run_units,
    unit_seed,
    units_metric_rows,
)
from ..models import make_mlp
from ._mechanism_config import ARMS, NORM_OF_ARM, MechanismConfig, probe_steps
from ._mechanism_measure import gradient_shift, landscape, model_loss, reseed_noise

__all__ = [
    "SHIFT_KEYS",
    "build_model",
    "check_checkpoint",
    "check_result",
    "layer_names",
    "measure",
    "metric_rows",
    "probe_batch",
    "run_seed",
    "train_arm",
    "tune_arms",
    "tune_score",
    "units",
]

# What gradient_shift returns per layer, as stored.
SHIFT_KEYS = ("l2", "relative", "cos")


def units(config: MechanismConfig) -> list[Unit]:
    """A seed's plan: one unit per arm, at the arm's learning rate."""
    assert config.lrs is not None  # filled in by __post_init__
    return [
        Unit(name=arm, steps=config.steps, params={"arm": arm, "lr": config.lrs[arm]})
        for arm in ARMS
    ]


def layer_names(config: MechanismConfig) -> list[str]:
    """The measured layers: ``fc1 .. fc<depth>``, then ``out``."""
    return [f"fc{i}" for i in range(1, config.depth + 1)] + ["out"]


def build_model(config: MechanismConfig, data: Any, arm: str, seed: int) -> nn.Sequential:
    """The arm's network at its initialisation: the weights depend on the seed only (every arm
    of a seed starts from the same ``nn.Linear`` weights); the noisy arm's noise generators are
    seeded from the seed too. torch's global generator is left as it was."""
    options = {"strength": config.strength} if arm == "noisy" else None
    weights = unit_seed(seed, "weights")
    # fork_rng: with init=None torch's default init draws from the global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weights)
        model = make_mlp(
            data.n_features,
            data.n_classes,
            hidden=config.hidden,
            depth=config.depth,
            activation=config.activation,
            norm=NORM_OF_ARM[arm],
            init=config.init,
            generator=torch.Generator().manual_seed(weights),
            norm_options=options,
        )
    # make_mlp gives every noisy layer the same seed: reseed them apart (layer k: seed + k).
    reseed_noise(model, unit_seed(seed, "noise"))
    return model


def probe_batch(config: MechanismConfig, data: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's fixed probe batch: ``batch_size`` training examples (the same for every arm)."""
    generator = torch.Generator().manual_seed(unit_seed(seed, "probe"))
    index = torch.randperm(len(data.y_train), generator=generator)[: config.batch_size]
    return data.x_train[index], data.y_train[index]


def measure(
    config: MechanismConfig,
    model: nn.Sequential,
    probe: tuple[torch.Tensor, torch.Tensor],
    lr: float,
    noise_seed: int,
) -> dict[str, Any]:
    """One measurement of ``model`` (never changed): the shift with the common step
    ``shift_lr`` and with the arm's own ``lr``, and the landscape along the gradient."""
    x, y = probe
    shift = gradient_shift(model, x, y, lr=config.shift_lr, noise_seed=noise_seed)
    own = shift
    if lr != config.shift_lr:
        own = gradient_shift(model, x, y, lr=lr, noise_seed=noise_seed)
    work = copy.deepcopy(model).train()
    land = landscape(list(work.parameters()), model_loss(work, x, y, noise_seed), config.etas)
    return {"shift": shift, "shift_own": own, **land}


def _empty_probe(config: MechanismConfig) -> dict[str, Any]:
    return {
        "steps": [],
        "layers": layer_names(config),
        "etas": list(config.etas),
        "shift": {k: [] for k in SHIFT_KEYS},
        "shift_own": {k: [] for k in SHIFT_KEYS},
        "loss0": [],
        "loss": [],
        "grad_change": [],
        "grad_norm": [],
    }


def _append(probe: dict[str, Any], step: int, found: Mapping[str, Any]) -> None:
    probe["steps"].append(step)
    for kind in ("shift", "shift_own"):
        for key in SHIFT_KEYS:
            probe[kind][key].append([finite_or_none(v) for v in found[kind][key]])
    probe["loss0"].append(finite_or_none(found["loss0"]))
    probe["loss"].append([finite_or_none(v) for v in found["loss"]])
    probe["grad_change"].append([finite_or_none(v) for v in found["grad_change"]])
    probe["grad_norm"].append(finite_or_none(found["grad_norm"]))


def train_arm(
    config: MechanismConfig,
    data: Any,
    arm: str,
    seed: int,
    lr: float,
    *,
    measured: bool = True,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train one arm of one seed; with ``measured``, measure it at :func:`probe_steps`.

    Returns:
        :func:`~batchnorm.lab._classify.train_classifier`'s result, plus ``lr`` and (with
        ``measured``) ``probe``: the measured ``steps``, ``layers``, ``etas``; ``shift`` and
        ``shift_own`` (each ``l2``, ``relative``, ``cos``: one list per step of one value per
        layer); ``loss0`` and ``grad_norm`` (one per step); ``loss`` and ``grad_change`` (one
        list per step of one value per eta). Non-finite values are ``None``.
    """
    model = build_model(config, data, arm, seed)
    probe = probe_batch(config, data, seed)
    found = _empty_probe(config)

    def record(step: int, network: nn.Sequential) -> None:
        noise = unit_seed(seed, f"probe-noise/{step}")
        _append(found, step, measure(config, network, probe, lr, noise))

    def after_step(step: int, network: nn.Module) -> None:
        if step % config.measure_every == 0:
            assert isinstance(network, nn.Sequential), "make_mlp builds an nn.Sequential"
            record(step, network)

    if measured:
        with threads(1), denormals_flushed(True):
            record(0, model)
    run = train_classifier(
        model,
        data,
        lr=lr,
        steps=config.steps,
        batch_size=config.batch_size,
        seed=seed,
        eval_every=config.eval_every,
        advance=advance,
        after_step=after_step if measured else None,
    )
    run["lr"] = lr
    if measured:
        run["probe"] = found
    return run


def run_seed(
    config: MechanismConfig,
    data: Any,
    seed: int,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Train and measure every arm of one seed (checkpointed after each arm).

    Returns:
        ``{"seed", "seconds", "units"}``, ``units`` mapping each arm to its ``train_arm`` result.
    """

    def run_unit(unit: Unit, step: Callable[[int], None]) -> dict:
        return train_arm(config, data, unit.params["arm"], seed, unit.params["lr"], advance=step)

    return run_units(
        units(config),
        run_unit,
        seed=seed,
        checkpoint=checkpoint,
        save_checkpoint=save_checkpoint,
        advance=advance,
    )


# --- checks -----------------------------------------------------------------------------------


def _grid(value: Any, where: str, rows: int, cols: int) -> None:
    """Require ``rows`` lists of ``cols`` entries, each a finite number or None."""
    expected = f"a list of {rows} lists of {cols} finite numbers or None"
    if not isinstance(value, list) or len(value) != rows:
        raise ValueError(f"expected {where} to be {expected}, got {check.describe(value)}.")
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != cols:
            raise ValueError(
                f"expected {where} to be {expected}, got {check.describe(row)} at {i}."
            )
        for v in row:
            _maybe_number(v, f"{where}[{i}]")


def _row(value: Any, where: str, n: int) -> None:
    """Require a list of ``n`` entries, each a finite number or None."""
    if not isinstance(value, list) or len(value) != n:
        raise ValueError(
            f"expected {where} to be a list of {n} finite numbers or None, got "
            f"{check.describe(value)}."
        )
    for i, v in enumerate(value):
        _maybe_number(v, f"{where}[{i}]")


def _maybe_number(value: Any, where: str) -> None:
    if value is not None:
        check.number(value, where)


def _check_unit(config: MechanismConfig, unit: Unit, value: Any, where: str) -> None:
    check_curve(value, where, len(measured_steps(config)))
    check.equal(check.item(value, "lr", where), unit.params["lr"], check.at(where, "lr"))
    stopped = value["diverged_at"] if value["diverged"] else None
    probe = check.item(value, "probe", where)
    here = check.at(where, "probe")
    steps = check.item(probe, "steps", here)
    want = [s for s in probe_steps(config) if stopped is None or s < stopped]
    check.equal(steps, want, check.at(here, "steps"))
    check.equal(check.item(probe, "layers", here), layer_names(config), check.at(here, "layers"))
    check.equal(check.item(probe, "etas", here), list(config.etas), check.at(here, "etas"))
    n, n_layers, n_etas = len(want), config.depth + 1, len(config.etas)
    for kind in ("shift", "shift_own"):
        found = check.item(probe, kind, here)
        for key in SHIFT_KEYS:
            at = check.at(check.at(here, kind), key)
            _grid(check.item(found, key, check.at(here, kind)), at, n, n_layers)
    for key, cols in (("loss", n_etas), ("grad_change", n_etas)):
        _grid(check.item(probe, key, here), check.at(here, key), n, cols)
    for key in ("loss0", "grad_norm"):
        _row(check.item(probe, key, here), check.at(here, key), n)


def check_result(config: MechanismConfig, seed: int, result: Any) -> None:
    """Raise ``ValueError`` naming the entry unless ``result`` is a complete :func:`run_seed`
    result of this config and seed."""
    check_units_result(units(config), seed, result, lambda u, v, w: _check_unit(config, u, v, w))


def check_checkpoint(config: MechanismConfig, data: Any, seed: int, state: Any) -> None:
    """Raise ``ValueError`` naming the entry unless ``state`` is a checkpoint :func:`run_seed`
    saved for this config (its finished arms, each complete)."""
    check_units_checkpoint(units(config), state, lambda u, v, w: _check_unit(config, u, v, w))


# --- metrics and tuning -----------------------------------------------------------------------


def metric_rows(result: Mapping[str, Any]) -> list[dict]:
    """Flat rows for ``metrics.jsonl``: per arm, one row per validation measurement
    (``train_loss``, ``val_accuracy``, ``val_loss``) and one per probe measurement (per layer
    ``<layer>.relative_shift`` and ``<layer>.cos``, ``loss_range``, ``max_grad_change``,
    ``grad_norm``)."""
    rows = units_metric_rows(result, CURVE_KEYS)
    for arm, unit in result["units"].items():
        probe = unit["probe"]
        for i, step in enumerate(probe["steps"]):
            row: dict[str, Any] = {"seed": result["seed"], "unit": arm, "step": step, "probe": True}
            for j, layer in enumerate(probe["layers"]):
                row[f"{layer}.relative_shift"] = probe["shift"]["relative"][i][j]
                row[f"{layer}.cos"] = probe["shift"]["cos"][i][j]
            losses = probe["loss"][i]
            clean = None if any(v is None for v in losses) else max(losses) - min(losses)
            changes = probe["grad_change"][i]
            row["loss_range"] = clean
            row["max_grad_change"] = None if any(v is None for v in changes) else max(changes)
            row["grad_norm"] = probe["grad_norm"][i]
            rows.append(row)
    return rows


def tune_arms(config: MechanismConfig) -> list[str]:
    """The arms ``batchnorm lab tune mechanism`` tunes, each on its own."""
    return list(ARMS)


def tune_score(config: MechanismConfig, data: Any, arm: str, value: float, seed: int) -> float:
    """Train ``arm`` at learning rate ``value`` on ``seed`` (the run's training, without the
    measurements, which do not change it) and return its best smoothed validation accuracy
    (trailing mean of ``smooth`` measurements); NaN if the run diverged.

    Raises:
        ValueError: If ``arm`` is not one of :data:`ARMS`.
    """
    if arm not in ARMS:
        raise ValueError(f"mechanism.tune_score(): expected arm in {list(ARMS)}, got {arm!r}.")
    run = train_arm(config, data, arm, seed, float(value), measured=False)
    if diverged(run):
        return math.nan
    return best_smoothed(run["curve"]["val_accuracy"], config.smooth)
