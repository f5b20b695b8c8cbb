"""One seed of the gradients experiment: its units, the checks of its results and checkpoints,
its metric rows and the tuning score.

A seed's units (:func:`plan`), each independent of the others:

- ``init/<activation>/<norm>/d<depth>/b<batch>`` (one progress step): a freshly initialized
  network, one forward and backward pass in float64 on the seed's batch of that size. Result:
  ``{"norms"`` (per hidden layer), ``"ratio"``, ``"growth"``, ``"loss"}``. The networks of a
  depth and activation share their ``nn.Linear`` weights (with and without BN, every batch
  size), and the batch of size ``b`` is the first ``b`` examples of one seeded permutation,
  so the smaller batches are part of the larger ones.
- ``train/<activation>/<norm>`` (``train_steps`` progress steps): the network of
  ``train_depth`` x ``train_width`` trained at the arm's learning rate; result
  ``{"lr", "run"`` (:func:`batchnorm.lab._classify.train_classifier`'s), ``"updates"``,
  ``"norms"}``: per recorded update, the per-layer norms of the training batch's gradient.
  Both norms of an activation start from the same weights; every arm sees the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import _checks as check
from .. import data as lab_data
from .._classify import best_smoothed, check_curve, diverged, train_classifier
from .._training import denormals_flushed, threads
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
from ._gradients_config import ACTIVATIONS, ARMS, INIT_FOR, NORMS, GradientsConfig, arm_name
from ._gradients_measure import first_last_ratio, gradient_norms, growth_rate, layer_gradient_norms

__all__ = [
    "check_checkpoint",
    "check_result",
    "init_unit_name",
    "metric_rows",
    "plan",
    "run_seed",
    "train_unit_name",
    "tune_arms",
    "tune_score",
]


def init_unit_name(activation: str, norm: str, depth: int, batch: int) -> str:
    """``"init/relu/batchnorm/d50/b256"``."""
    return f"init/{arm_name(activation, norm)}/d{depth}/b{batch}"


def train_unit_name(activation: str, norm: str) -> str:
    """``"train/relu/batchnorm"``."""
    return f"train/{arm_name(activation, norm)}"


def plan(config: GradientsConfig) -> list[Unit]:
    """A seed's units: every measurement at initialization, then every training arm."""
    units = [
        Unit(
            name=init_unit_name(a, n, d, b),
            steps=1,
            params={"activation": a, "norm": n, "depth": d, "batch": b},
        )
        for d in config.depths
        for a in ACTIVATIONS
        for n in NORMS
        for b in config.batch_sizes
    ]
    assert config.lrs is not None  # filled in by __post_init__
    units += [
        Unit(
            name=train_unit_name(a, n),
            steps=config.train_steps,
            params={"activation": a, "norm": n, "lr": config.lrs[arm_name(a, n)]},
        )
        for a in ACTIVATIONS
        for n in NORMS
    ]
    return units


def _model(
    data: lab_data.Dataset, activation: str, norm: str, depth: int, width: int, seed: int
) -> torch.nn.Module:
    return make_mlp(
        data.n_features,
        data.n_classes,
        hidden=width,
        depth=depth,
        activation=activation,
        norm=norm,
        init=INIT_FOR[activation],
        generator=torch.Generator().manual_seed(seed),
    )


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _init_unit(config: GradientsConfig, data: lab_data.Dataset, seed: int, unit: Unit) -> dict:
    p = unit.params
    weights_seed = unit_seed(seed, f"init/{p['activation']}/d{p['depth']}")
    model = _model(data, p["activation"], p["norm"], p["depth"], config.width, weights_seed)
    # float64: a deep sigmoid network's first-layer gradient can be ~1e-30, below what float32
    # holds as a normal number.
    model = model.double()
    generator = torch.Generator().manual_seed(unit_seed(seed, "batch"))
    index = torch.randperm(len(data.y_train), generator=generator)[: p["batch"]]
    x, y = data.x_train[index].double(), data.y_train[index]
    with threads(config.threads), denormals_flushed(False):
        norms = layer_gradient_norms(model, x, y)
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(x), y).item()
    clean = [_finite(v) for v in norms]
    return {
        "norms": clean,
        "ratio": first_last_ratio(clean),
        "growth": growth_rate(clean),
        "loss": _finite(loss),
    }


def _train(
    config: GradientsConfig,
    data: lab_data.Dataset,
    seed: int,
    activation: str,
    norm: str,
    lr: float,
    advance: Callable[[int], None] | None = None,
) -> dict:
    model = _model(
        data,
        activation,
        norm,
        config.train_depth,
        config.train_width,
        unit_seed(seed, f"train/{activation}"),
    )
    wanted = set(config.record_updates())
    updates: list[int] = []
    norms: list[list[float | None]] = []

    def record(step: int, model: torch.nn.Module) -> None:
        # Called after the optimizer's step; .grad still holds the gradient that step used,
        # taken at the weights after step - 1 updates.
        if step - 1 in wanted:
            updates.append(step - 1)
            norms.append([_finite(v) for v in gradient_norms(model)])

    run = train_classifier(
        model,
        data,
        lr=lr,
        steps=config.train_steps,
        batch_size=config.train_batch,
        seed=unit_seed(seed, "train-batches"),
        eval_every=config.eval_every,
        advance=advance,
        after_step=record,
        n_threads=config.threads,
    )
    return {"lr": lr, "run": run, "updates": updates, "norms": norms}


def _run_unit(
    config: GradientsConfig,
    data: lab_data.Dataset,
    seed: int,
    unit: Unit,
    advance: Callable[[int], None],
) -> dict:
    if unit.name.startswith("init/"):
        result = _init_unit(config, data, seed, unit)
        advance(1)
        return result
    p = unit.params
    return _train(config, data, seed, p["activation"], p["norm"], p["lr"], advance)


def run_seed(
    config: GradientsConfig,
    data: lab_data.Dataset,
    seed: int,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Every unit of one seed (see the module docstring), checkpointing after each; a resumed
    seed gives the result an uninterrupted one would."""
    return run_units(
        plan(config),
        lambda unit, adv: _run_unit(config, data, seed, unit, adv),
        seed=seed,
        checkpoint=checkpoint,
        save_checkpoint=save_checkpoint,
        advance=advance,
    )


# --- tuning -----------------------------------------------------------------------------------


def tune_arms(config: GradientsConfig) -> list[str]:
    """The training arms ``batchnorm lab tune gradients`` tunes, each on its own."""
    return list(ARMS)


def tune_score(
    config: GradientsConfig,
    data: lab_data.Dataset,
    arm: str,
    lr: float,
    seed: int = TUNING_SEED,
) -> float:
    """Training arm ``arm`` alone at learning rate ``lr``: its best smoothed validation
    accuracy (NaN if the run diverged: non-finite or not-decreasing loss)."""
    activation, norm = arm.split("/")
    run = _train(config, data, seed, activation, norm, float(lr))["run"]
    if diverged(run):
        return math.nan
    return best_smoothed(run["curve"]["val_accuracy"], config.smooth)


# --- checks of what a run reads back ----------------------------------------------------------


def _n_measured(config: GradientsConfig) -> int:
    steps, every = config.train_steps, config.eval_every
    return len(range(0, steps + 1, every)) + bool(steps % every)


def _optional_numbers(value: Any, where: str, length: int) -> None:
    expected = f"a list of {length} finite numbers or None"
    if not isinstance(value, list) or len(value) != length:
        raise ValueError(f"expected {where} to be {expected}, got {check.describe(value)}.")
    for k, v in enumerate(value):
        if not (v is None or (_is_number(v) and math.isfinite(v))):
            raise ValueError(f"expected {where} to be {expected}, got {check.describe(v)} at {k}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_number(value: Any, where: str, low: float = -math.inf) -> None:
    if value is not None:
        check.number(value, where, low=low)


def _check_unit(config: GradientsConfig, unit: Unit, value: Any, where: str) -> None:
    p = unit.params
    if unit.name.startswith("init/"):
        _optional_numbers(check.item(value, "norms", where), check.at(where, "norms"), p["depth"])
        _optional_number(check.item(value, "ratio", where), check.at(where, "ratio"), 0.0)
        _optional_number(check.item(value, "growth", where), check.at(where, "growth"), 0.0)
        _optional_number(check.item(value, "loss", where), check.at(where, "loss"))
        return
    check.equal(check.item(value, "lr", where), p["lr"], check.at(where, "lr"))
    run = check.item(value, "run", where)
    check_curve(run, check.at(where, "run"), _n_measured(config))
    updates = check.item(value, "updates", where)
    wanted = config.record_updates()
    complete = not check.item(run, "diverged", check.at(where, "run"))
    if not (isinstance(updates, list) and updates == wanted[: len(updates)]) or (
        complete and len(updates) != len(wanted)
    ):
        raise ValueError(
            f"expected {check.at(where, 'updates')} to be the recorded updates "
            f"{wanted[:3] + ['...']} ({len(wanted)} of them for a run that did not diverge), "
            f"got {check.describe(updates)}."
        )
    norms = check.item(value, "norms", where)
    if not isinstance(norms, list) or len(norms) != len(updates):
        raise ValueError(
            f"expected {check.at(where, 'norms')} to be a list of {len(updates)} lists (one per "
            f"recorded update), got {check.describe(norms)}."
        )
    for k, row in enumerate(norms):
        _optional_numbers(row, check.at(check.at(where, "norms"), k), config.train_depth)


def check_result(config: GradientsConfig, seed: int, result: Mapping[str, Any]) -> None:
    """Check that ``result`` is a complete :func:`run_seed` result of ``config`` and ``seed``.

    Raises:
        ValueError: ``"expected <entry> to be <what>, got <what>."``, naming the entry by its
            path, e.g. ``units['init/relu/batchnorm/d50/b256']['norms']``.
    """
    check_units_result(plan(config), seed, result, lambda u, v, w: _check_unit(config, u, v, w))


def check_checkpoint(
    config: GradientsConfig, data: lab_data.Dataset, seed: int, state: Mapping[str, Any]
) -> None:
    """Check that ``state`` (saved by :func:`run_seed`) can continue seed ``seed`` of
    ``config``: known, complete units whose steps add up to its ``step``.

    Raises:
        ValueError: Likewise, naming the entry.
    """
    check_units_checkpoint(plan(config), state, lambda u, v, w: _check_unit(config, u, v, w))


def metric_rows(result: Mapping[str, Any]) -> list[dict]:
    """One seed's result as flat rows: per measurement at initialization and hidden layer
    (``unit``, ``layer``, ``grad_norm``); per training arm and measured step (``unit``,
    ``step``, ``train_loss``, ``val_accuracy``, ``val_loss``); per training arm, recorded
    update and hidden layer (``unit``, ``update``, ``layer``, ``grad_norm``)."""
    seed = result["seed"]
    rows: list[dict] = []
    trained: dict[str, Any] = {}
    for name, unit in result["units"].items():
        if name.startswith("init/"):
            rows += [
                {"seed": seed, "unit": name, "layer": k + 1, "grad_norm": v}
                for k, v in enumerate(unit["norms"])
            ]
        else:
            trained[name] = unit
    rows += units_metric_rows(
        {"seed": seed, "units": {n: u["run"] for n, u in trained.items()}},
        ("train_loss", "val_accuracy", "val_loss"),
    )
    for name, unit in trained.items():
        for update, norms in zip(unit["updates"], unit["norms"], strict=True):
            rows += [
                {"seed": seed, "unit": name, "update": update, "layer": k + 1, "grad_norm": v}
                for k, v in enumerate(norms)
            ]
    return rows
