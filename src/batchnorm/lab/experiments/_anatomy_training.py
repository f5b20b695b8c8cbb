"""One seed of the anatomy experiment: its units (one per network: train it, then measure its
BN layers on one batch), the checks of its results and checkpoints, its metric rows and the
tuning score.

A seed's result is :func:`batchnorm.lab._units.run_units`' ``{"seed", "seconds", "units"}``;
each network's unit result is ``{"activation", "lr", "run", "batch", "layers", "shown"}``:
``run`` is :func:`batchnorm.lab._classify.train_classifier`'s result, ``batch`` the measured
batch's size, ``layers`` maps ``"1" .. "depth"`` to :func:`~._anatomy_measure.measure_layer`'s
per-unit lists, and ``shown`` holds the raw input and output values of the histograms' units
of hidden layer ``layer``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .. import _checks as check
from .. import data as lab_data
from .._classify import best_smoothed, check_curve, diverged, train_classifier
from .._training import threads
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
from ._anatomy_config import ACTIVATIONS, INIT_FOR, AnatomyConfig
from ._anatomy_measure import measure_layer

__all__ = [
    "LAYER_KEYS",
    "bn_inputs_outputs",
    "check_checkpoint",
    "check_result",
    "measure_network",
    "measured_batch",
    "metric_rows",
    "plan",
    "run_seed",
    "shown_units",
    "tune_arms",
    "tune_score",
]

# The per-unit lists of a measured layer (measure_layer's keys), and which are booleans.
LAYER_KEYS = (
    "mean",
    "var",
    "layer_mean",
    "layer_var",
    "xhat_mean",
    "xhat_var",
    "xhat_var_expected",
    "share",
    "skew",
    "kurt",
    "input_skew",
    "input_kurt",
    "input_share",
    "gaussian",
    "input_gaussian",
    "gamma",
    "beta",
    "out_mean",
    "out_std",
    "standardize_deviation",
    "shape_deviation",
)
_BOOLEAN_KEYS = ("gaussian", "input_gaussian")


def plan(config: AnatomyConfig) -> list[Unit]:
    """A seed's units: one per network (activation), in report order."""
    assert config.lrs is not None  # filled in by __post_init__
    return [
        Unit(name=a, steps=config.steps, params={"activation": a, "lr": config.lrs[a]})
        for a in ACTIVATIONS
    ]


def _model(config: AnatomyConfig, data: lab_data.Dataset, seed: int, activation: str) -> Any:
    generator = torch.Generator().manual_seed(unit_seed(seed, f"init/{activation}"))
    return make_mlp(
        data.n_features,
        data.n_classes,
        hidden=config.hidden,
        depth=config.depth,
        activation=activation,
        norm="batchnorm",
        init=INIT_FOR[activation],
        generator=generator,
    )


def _train(
    config: AnatomyConfig,
    data: lab_data.Dataset,
    seed: int,
    activation: str,
    lr: float,
    advance: Callable[[int], None] | None = None,
) -> tuple[Any, dict]:
    model = _model(config, data, seed, activation)
    run = train_classifier(
        model,
        data,
        lr=lr,
        steps=config.steps,
        batch_size=config.batch_size,
        seed=unit_seed(seed, "batches"),
        eval_every=config.eval_every,
        advance=advance,
        n_threads=config.threads,
    )
    return model, run


def measured_batch(config: AnatomyConfig, data: lab_data.Dataset, seed: int) -> torch.Tensor:
    """The seed's measured batch: ``measure_batch`` training inputs drawn without replacement
    (the same for both networks of the seed)."""
    generator = torch.Generator().manual_seed(unit_seed(seed, "measure"))
    index = torch.randperm(len(data.y_train), generator=generator)[: config.measure_batch]
    return data.x_train[index]


def bn_inputs_outputs(
    model: torch.nn.Module, x: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each BN layer's ``(input, output)`` on the batch ``x``, by layer number (``"1"``, ...).

    A copy of the model runs one training-mode forward (each BN layer normalises with the
    batch's own statistics); forward hooks keep each layer's input and output. The model
    itself, its running statistics included, is not touched.
    """
    probe = copy.deepcopy(model)
    probe.train()
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, module in probe.named_children():
        if name.startswith("bn"):

            def keep(module: Any, args: Any, output: Any, name: str = name) -> None:
                seen[name[2:]] = (args[0].detach().clone(), output.detach().clone())

            handles.append(module.register_forward_hook(keep))
    try:
        with torch.no_grad():
            probe(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def measure_network(model: torch.nn.Module, x: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Every BN layer of ``model`` on the batch ``x``: ``{"1": measure_layer(...), ...}``
    (the model is not touched)."""
    return _measure_all(model, bn_inputs_outputs(model, x))


def _measure_all(
    model: torch.nn.Module, seen: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, dict[str, Any]]:
    return {k: measure_layer(_bn_layer(model, k), *seen[k]) for k in sorted(seen, key=int)}


def _bn_layer(model: torch.nn.Module, k: str) -> torch.nn.modules.batchnorm._BatchNorm:
    layer = model.get_submodule(f"bn{k}")
    if not isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
        raise TypeError(
            f"anatomy: expected bn{k} to be a BatchNorm layer, got {type(layer).__name__}."
        )
    return layer


def shown_units(skew: list[float | None], n: int) -> list[int]:
    """``n`` units spread evenly over the units ranked by ``|skew|``, least skewed first (an
    unmeasured unit ranks last)."""
    key = [math.inf if s is None else abs(s) for s in skew]
    ranked = sorted(range(len(key)), key=lambda k: (key[k], k))
    picks = np.round(np.linspace(0, len(ranked) - 1, n)).astype(int)
    return [ranked[p] for p in picks]


def _finite(values: torch.Tensor) -> list[list[float | None]]:
    return [[float(v) if math.isfinite(v) else None for v in row] for row in values.tolist()]


def _run_unit(
    config: AnatomyConfig, data: lab_data.Dataset, seed: int, unit: Unit, advance: Any
) -> dict:
    activation, lr = unit.params["activation"], unit.params["lr"]
    model, run = _train(config, data, seed, activation, lr, advance)
    x = measured_batch(config, data, seed)
    with threads(config.threads):
        seen = bn_inputs_outputs(model, x)
        layers = _measure_all(model, seen)
    units = shown_units(layers[str(config.layer)]["skew"], config.show_units)
    x_layer, y_layer = seen[str(config.layer)]
    return {
        "activation": activation,
        "lr": lr,
        "run": run,
        "batch": int(x.shape[0]),
        "layers": layers,
        "shown": {
            "units": units,
            "x": _finite(x_layer[:, units].T),
            "y": _finite(y_layer[:, units].T),
        },
    }


def run_seed(
    config: AnatomyConfig,
    data: lab_data.Dataset,
    seed: int,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Train and measure both networks of one seed (see the module docstring for the result);
    a checkpoint is taken after the first network, and a resumed seed gives the result an
    uninterrupted one would."""
    return run_units(
        plan(config),
        lambda unit, adv: _run_unit(config, data, seed, unit, adv),
        seed=seed,
        checkpoint=checkpoint,
        save_checkpoint=save_checkpoint,
        advance=advance,
    )


# --- tuning -----------------------------------------------------------------------------------


def tune_arms(config: AnatomyConfig) -> list[str]:
    """The networks ``batchnorm lab tune anatomy`` tunes, each on its own."""
    return list(ACTIVATIONS)


def tune_score(
    config: AnatomyConfig,
    data: lab_data.Dataset,
    arm: str,
    lr: float,
    seed: int = TUNING_SEED,
) -> float:
    """Network ``arm`` trained alone at learning rate ``lr``: its best smoothed validation
    accuracy (NaN if the run diverged: non-finite or not-decreasing loss)."""
    _, run = _train(config, data, seed, arm, float(lr))
    if diverged(run):
        return math.nan
    return best_smoothed(run["curve"]["val_accuracy"], config.smooth)


# --- checks of what a run reads back ----------------------------------------------------------


def _n_measured(config: AnatomyConfig) -> int:
    return len(range(0, config.steps + 1, config.eval_every)) + bool(
        config.steps % config.eval_every
    )


def _optional_numbers(value: Any, where: str, length: int) -> None:
    expected = f"a list of {length} finite numbers or None"
    if not isinstance(value, list) or len(value) != length:
        raise ValueError(f"expected {where} to be {expected}, got {check.describe(value)}.")
    for k, v in enumerate(value):
        ok = v is None or (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        )
        if not ok:
            raise ValueError(f"expected {where} to be {expected}, got {check.describe(v)} at {k}.")


def _check_layer(layer: Any, config: AnatomyConfig, where: str) -> None:
    for key in LAYER_KEYS:
        values = check.item(layer, key, where)
        at = check.at(where, key)
        if key in _BOOLEAN_KEYS:
            if not (
                isinstance(values, list)
                and len(values) == config.hidden
                and all(isinstance(v, bool) for v in values)
            ):
                raise ValueError(
                    f"expected {at} to be a list of {config.hidden} booleans, got "
                    f"{check.describe(values)}."
                )
        else:
            _optional_numbers(values, at, config.hidden)


def _check_unit(config: AnatomyConfig, unit: Unit, value: Any, where: str) -> None:
    check.equal(
        check.item(value, "activation", where),
        unit.params["activation"],
        check.at(where, "activation"),
    )
    check.equal(check.item(value, "lr", where), unit.params["lr"], check.at(where, "lr"))
    check_curve(check.item(value, "run", where), check.at(where, "run"), _n_measured(config))
    check.equal(check.item(value, "batch", where), config.measure_batch, check.at(where, "batch"))
    layers = check.item(value, "layers", where)
    names = [str(i) for i in range(1, config.depth + 1)]
    if not isinstance(layers, Mapping) or sorted(layers) != sorted(names):
        raise ValueError(
            f"expected {check.at(where, 'layers')} to hold the layers {names}, got "
            f"{check.describe(layers)}."
        )
    for name in names:
        _check_layer(layers[name], config, check.at(check.at(where, "layers"), name))
    shown = check.item(value, "shown", where)
    at = check.at(where, "shown")
    units = check.item(shown, "units", at)
    if not (
        isinstance(units, list)
        and len(units) == config.show_units
        and all(
            isinstance(u, int) and not isinstance(u, bool) and 0 <= u < config.hidden for u in units
        )
    ):
        raise ValueError(
            f"expected {check.at(at, 'units')} to be a list of {config.show_units} unit indices "
            f"in [0, {config.hidden}), got {check.describe(units)}."
        )
    for key in ("x", "y"):
        rows = check.item(shown, key, at)
        if not isinstance(rows, list) or len(rows) != config.show_units:
            raise ValueError(
                f"expected {check.at(at, key)} to be a list of {config.show_units} lists, got "
                f"{check.describe(rows)}."
            )
        for k, row in enumerate(rows):
            _optional_numbers(row, check.at(check.at(at, key), k), config.measure_batch)


def check_result(config: AnatomyConfig, seed: int, result: Mapping[str, Any]) -> None:
    """Check that ``result`` is a complete :func:`run_seed` result of ``config`` and ``seed``.

    Raises:
        ValueError: ``"expected <entry> to be <what>, got <what>."``, naming the entry by its
            path, e.g. ``units['relu']['layers']['2']['skew']``.
    """
    check_units_result(plan(config), seed, result, lambda u, v, w: _check_unit(config, u, v, w))


def check_checkpoint(
    config: AnatomyConfig, data: lab_data.Dataset, seed: int, state: Mapping[str, Any]
) -> None:
    """Check that ``state`` (saved by :func:`run_seed`) can continue seed ``seed`` of
    ``config``: known, complete units whose steps add up to its ``step``.

    Raises:
        ValueError: Likewise, naming the entry.
    """
    check_units_checkpoint(plan(config), state, lambda u, v, w: _check_unit(config, u, v, w))


def metric_rows(result: Mapping[str, Any]) -> list[dict]:
    """One seed's result as flat rows: per network and measured training step (``unit``,
    ``step``, ``train_loss``, ``val_accuracy``, ``val_loss``), then per network, layer and
    hidden unit (``unit``, ``layer``, ``neuron`` and the per-unit measures)."""
    rows = units_metric_rows(
        {"seed": result["seed"], "units": {n: u["run"] for n, u in result["units"].items()}},
        ("train_loss", "val_accuracy", "val_loss"),
    )
    for name, unit in result["units"].items():
        for layer, measured in unit["layers"].items():
            for k in range(len(measured["mean"])):
                row = {"seed": result["seed"], "unit": name, "layer": int(layer), "neuron": k}
                row.update({key: measured[key][k] for key in LAYER_KEYS})
                rows.append(row)
    return rows
