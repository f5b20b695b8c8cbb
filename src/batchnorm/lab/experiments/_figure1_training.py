"""Training and measuring one seed of the Figure 1 experiment (every arm in lockstep), the
tuning score, and the checks of what a run reads back (results, checkpoints).
See :mod:`batchnorm.lab.experiments.figure1` for the design.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ...monitor import ActivationMonitor, ActivationTrace
from .. import _checks as check
from .. import data as lab_data
from .._training import (
    batch_indices,
    denormals_flushed,
    end_of_step,
    measured_steps,
    threads,
    trailing_mean,
)
from ..models import make_mlp
from ..protocol import TUNING_SEED
from ._figure1_config import Figure1Config

__all__ = [
    "check_checkpoint",
    "check_result",
    "metric_rows",
    "run_seed",
    "shift",
    "tune_arms",
    "tune_score",
]

# --- measuring --------------------------------------------------------------------------------


def _probe_forward(model: nn.Module, x: torch.Tensor) -> None:
    """A training-mode forward pass over ``x`` that leaves the model's buffers as they were."""
    saved = [b.detach().clone() for b in model.buffers()]
    with torch.no_grad():
        model(x)
        for buffer, value in zip(model.buffers(), saved, strict=True):
            buffer.copy_(value)


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y).item()
            accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    finally:
        model.train()
    return accuracy, loss


def _pre_activation(model: nn.Module, layer: int, h: torch.Tensor) -> torch.Tensor:
    """Hidden layer ``layer``'s sigmoid input for its input ``h``, with its current parameters;
    BN normalises ``h``'s batch with its own statistics, as in training, and updates nothing."""
    z = model.get_submodule(f"fc{layer}")(h)
    bn = getattr(model, f"bn{layer}", None)
    if bn is not None:
        z = nn.functional.batch_norm(z, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return z


def _layer_inputs(model: nn.Module, x: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """The inputs of hidden layers ``2 .. depth`` for the batch ``x`` (training-mode BN)."""
    inputs, h = [], x
    with torch.no_grad():
        for layer in range(1, depth + 1):
            if layer >= 2:
                inputs.append(h)
            h = model.get_submodule(f"act{layer}")(_pre_activation(model, layer, h))
    return inputs


def shift(model: nn.Module, before: Sequence[torch.Tensor], now: Sequence[torch.Tensor]) -> list:
    """The shift measure of hidden layers ``2 .. depth`` between two measurements.

    Args:
        model: The network, with the parameters of the later measurement.
        before: The layers' inputs (from :func:`_layer_inputs`) at the earlier measurement.
        now: The same at the later one.

    Returns:
        One float per layer: the mean over units of the 1-Wasserstein distance between the
        unit's sigmoid-input distributions from ``before`` and from ``now`` (the layer's own
        parameters fixed at ``now``), over their pooled standard deviation.
    """
    values = []
    with torch.no_grad():
        for layer, (h0, h1) in enumerate(zip(before, now, strict=True), start=2):
            z0 = _pre_activation(model, layer, h0).double()
            z1 = _pre_activation(model, layer, h1).double()
            distance = (z0.sort(dim=0).values - z1.sort(dim=0).values).abs().mean(dim=0)
            spread = ((z0.var(dim=0) + z1.var(dim=0)) / 2).sqrt()
            values.append(float((distance / (spread + 1e-6)).mean()))
    return values


# --- training ---------------------------------------------------------------------------------


def _make_models(
    config: Figure1Config, data: lab_data.Dataset, seed: int, arms: Sequence[str]
) -> dict[str, nn.Module]:
    models: dict[str, nn.Module] = {}
    for arm in arms:
        net, init = arm.split("/")
        # One generator state per pair: its two networks' nn.Linear weights start equal.
        models[arm] = make_mlp(
            data.n_features,
            data.n_classes,
            hidden=config.hidden,
            depth=config.depth,
            activation="sigmoid",
            norm="none" if net == "baseline" else "batchnorm",
            init_std=config.init_std if init == "paper" else None,
            init="glorot" if init == "glorot" else None,
            generator=torch.Generator().manual_seed(seed),
        )
    return models


def _empty_history(depth: int) -> dict[str, list]:
    keys = ("steps", "val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_loss")
    history: dict[str, list] = {key: [] for key in keys}
    history["shift"] = [[] for _ in range(2, depth + 1)]
    return history


def _train(
    config: Figure1Config,
    data: lab_data.Dataset,
    seed: int,
    arms: Sequence[str],
    *,
    light: bool = False,
    checkpoint: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Train ``arms`` in lockstep on one seed's batches; with ``light``, measure only the
    validation accuracy and loss (for tuning)."""
    start = time.perf_counter()
    layer = f"act{config.depth}"
    n_train = len(data.y_train)
    probe = data.x_train[: config.probe_size]
    models = _make_models(config, data, seed, arms)
    assert config.lrs is not None  # filled in by __post_init__
    optimizers = {
        arm: torch.optim.SGD(model.parameters(), lr=config.lrs[arm])
        for arm, model in models.items()
    }
    monitors = {}
    if not light:
        monitors = {
            arm: ActivationMonitor(
                model, layer, where="input", per="unit", every=None, quantiles=config.quantiles
            )
            for arm, model in models.items()
        }
    history = {arm: _empty_history(config.depth) for arm in arms}
    inputs: dict[str, list[torch.Tensor]] = {}
    step, elapsed_before = 0, 0.0
    if checkpoint is not None:
        step = int(checkpoint["step"])
        elapsed_before = float(checkpoint["seconds"])
        for arm in arms:
            models[arm].load_state_dict(checkpoint["models"][arm])
            optimizers[arm].load_state_dict(checkpoint["optimizers"][arm])
            saved = checkpoint["history"][arm]
            history[arm] = {
                k: [list(s) for s in v] if k == "shift" else list(v) for k, v in saved.items()
            }
            if not light:
                trace = ActivationTrace.from_dict(checkpoint["traces"][arm])
                monitors[arm].records.extend(trace.records())
                inputs[arm] = [t.clone() for t in checkpoint["inputs"][arm]]
    loss_sums = dict.fromkeys(arms, 0.0)
    loss_count = 0

    def measure() -> None:
        nonlocal loss_count
        for arm, model in models.items():
            row = history[arm]
            row["steps"].append(step)
            val = _evaluate(model, *data.validation())
            row["val_accuracy"].append(val[0])
            row["val_loss"].append(val[1])
            row["train_loss"].append(loss_sums[arm] / loss_count if loss_count else None)
            loss_sums[arm] = 0.0
            if light:
                continue
            test = _evaluate(model, data.x_test, data.y_test)
            row["test_accuracy"].append(test[0])
            row["test_loss"].append(test[1])
            with monitors[arm].capture(step=step):
                _probe_forward(model, probe)
            now = _layer_inputs(model, probe, config.depth)
            values = shift(model, inputs[arm], now) if arm in inputs else [None] * len(now)
            for per_layer, value in zip(row["shift"], values, strict=True):
                per_layer.append(value)
            inputs[arm] = now
        loss_count = 0

    def state() -> dict:
        return {
            "step": step,
            "seconds": elapsed_before + time.perf_counter() - start,
            "models": {a: m.state_dict() for a, m in models.items()},
            "optimizers": {a: o.state_dict() for a, o in optimizers.items()},
            # Copies: the lists grow after the checkpoint is taken.
            "history": copy.deepcopy(history),
            "traces": {a: monitors[a].trace(layer).to_dict() for a in arms},
            "inputs": dict(inputs),
        }

    batches: dict = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(denormals_flushed(config.flush_denormals))
        stack.enter_context(threads(config.threads))
        for monitor in monitors.values():
            stack.enter_context(monitor)
        if step == 0:
            measure()
        while step < config.steps:
            idx = batch_indices(seed, step, n_train, config.batch_size, batches)
            xb, yb = data.x_train[idx], data.y_train[idx]
            for arm, model in models.items():
                loss = nn.functional.cross_entropy(model(xb), yb)
                optimizers[arm].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[arm].step()
                loss_sums[arm] += loss.item()
            loss_count += 1
            step += 1
            end_of_step(step, config, measure, save_checkpoint, state, advance)

    result: dict[str, Any] = {
        "seed": seed,
        "unit": config.unit,
        "n_train": n_train,
        "seconds": elapsed_before + time.perf_counter() - start,
        "arms": {},
    }
    for arm in arms:
        result["arms"][arm] = dict(history[arm])
        if not light:
            result["arms"][arm]["trace"] = monitors[arm].trace(layer).to_dict(decimals=5)
    return result


def run_seed(
    config: Figure1Config,
    data: lab_data.Dataset,
    seed: int,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Train every arm (``config.arms``) for one seed; return their measurements.

    Args:
        config: The settings.
        data: The dataset from :func:`prepare` (with its validation split).
        seed: Seeds the initial weights (shared within a pair) and the batch order.
        checkpoint: A dict previously passed to ``save_checkpoint`` by a run with the same
            config and seed, to continue from; the result is then the same as without the
            interruption.
        save_checkpoint: Called with a dict of tensors and plain values every
            ``config.checkpoint_every`` steps (not after the last step).
        advance: Called as ``advance(n)`` when ``n`` more steps are done.

    Returns:
        A JSON-serialisable dict with keys ``seed``, ``unit`` (the plotted unit), ``seconds``
        (training time, earlier interrupted parts included) and ``arms``, which maps each arm
        to lists ``steps``, ``val_accuracy``, ``val_loss``, ``test_accuracy``, ``test_loss``,
        ``train_loss`` (the mean mini-batch loss since the previous measurement, ``None`` at
        step 0), ``shift`` (one list per hidden layer 2..depth, ``None`` at step 0) and
        ``trace``, the last hidden layer's :meth:`ActivationTrace.to_dict` (5 decimals).
    """
    return _train(
        config,
        data,
        seed,
        config.arms,
        checkpoint=checkpoint,
        save_checkpoint=save_checkpoint,
        advance=advance,
    )


# --- tuning -----------------------------------------------------------------------------------


def tune_arms(config: Figure1Config) -> list[str]:
    """The arms ``batchnorm lab tune figure1`` tunes, each on its own."""
    return list(config.arms)


def tune_score(
    config: Figure1Config, data: lab_data.Dataset, arm: str, lr: float, seed: int = TUNING_SEED
) -> float:
    """One arm trained alone at learning rate ``lr``: its best smoothed validation accuracy
    (the quantity the speed target is built from; NaN if the loss diverged)."""
    assert config.lrs is not None  # filled in by __post_init__
    trial = dataclasses.replace(config, lrs={**config.lrs, arm: float(lr)})
    result = _train(trial, data, seed, [arm], light=True)
    history = result["arms"][arm]
    if not all(math.isfinite(v) for v in history["val_loss"]):
        return math.nan
    return float(trailing_mean(history["val_accuracy"], config.smooth).max())


# --- checks of what a run reads back -------------------------------------------------------


def _check_history(history: Any, config: Figure1Config, steps: list[int], where: str) -> None:
    check.equal(check.item(history, "steps", where), steps, check.at(where, "steps"))
    for key in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_loss"):
        values = check.item(history, key, where)
        check.numbers(values, check.at(where, key), len(steps), none_first=key == "train_loss")
    shifts = check.item(history, "shift", where)
    if not isinstance(shifts, list) or len(shifts) != config.depth - 1:
        raise ValueError(
            f"expected {check.at(where, 'shift')} to be a list of {config.depth - 1} lists, got "
            f"{check.describe(shifts)}."
        )
    for k, values in enumerate(shifts):
        check.numbers(values, check.at(check.at(where, "shift"), k), len(steps), none_first=True)


def _check_trace(trace: Any, config: Figure1Config, steps: list[int], where: str) -> None:
    expected = {"layer": f"act{config.depth}", "where": "input", "per": "unit"}
    for key, want in expected.items():
        check.equal(check.item(trace, key, where), want, check.at(where, key))
    levels = check.item(trace, "quantile_levels", where)
    check.equal(levels, list(config.quantiles), check.at(where, "quantile_levels"))
    check.equal(check.item(trace, "steps", where), steps, check.at(where, "steps"))
    n, units = len(steps), config.hidden
    shapes = {
        "count": (n,),
        "quantiles": (n, units, len(config.quantiles)),
        "mean": (n, units),
        "std": (n, units),
        "saturated": (n, units),
    }
    for key, shape in shapes.items():
        check.array(check.item(trace, key, where), check.at(where, key), shape)


def check_result(config: Figure1Config, seed: int, result: Mapping[str, Any]) -> None:
    """Check that ``result`` is a complete :func:`run_seed` result of ``config`` and ``seed``:
    every key, every arm measured at every step, traces of the configured shape.

    Raises:
        ValueError: ``"expected <entry> to be <what>, got <what>."``, naming the entry by its
            path, e.g. ``result['arms']['bn/paper']['steps']``.
    """
    check.equal(check.item(result, "seed", "result"), seed, "result['seed']")
    check.equal(check.item(result, "unit", "result"), config.unit, "result['unit']")
    check.number(check.item(result, "n_train", "result"), "result['n_train']", low=1)
    arms = check.item(result, "arms", "result")
    steps = measured_steps(config)
    for arm in config.arms:
        where = check.at("result['arms']", arm)
        history = check.item(arms, arm, "result['arms']")
        _check_history(history, config, steps, where)
        _check_trace(check.item(history, "trace", where), config, steps, check.at(where, "trace"))


def check_checkpoint(
    config: Figure1Config, data: lab_data.Dataset, seed: int, state: Mapping[str, Any]
) -> None:
    """Check that ``state`` (a dict :func:`run_seed` saved, whose ``step`` the runner has
    checked) can continue seed ``seed`` of ``config``: every arm's weights of the configured
    shapes, its SGD state, history, trace and the probe's layer inputs.

    Raises:
        ValueError: ``"expected <entry> to be <what>, got <what>."``, naming the entry by its
            path, e.g. ``state['models']['bn/paper']['fc1.weight']``.
    """
    models = _make_models(config, data, seed, config.arms)
    steps = measured_steps(config, state["step"])
    keys = ("models", "optimizers", "history", "traces", "inputs")
    parts = {key: check.item(state, key, "state") for key in keys}
    probe = min(config.probe_size, len(data.y_train))
    assert config.lrs is not None  # filled in by __post_init__
    for arm, model in models.items():
        found = {key: check.item(part, arm, f"state[{key!r}]") for key, part in parts.items()}
        where = {key: check.at(f"state[{key!r}]", arm) for key in parts}
        check.tensors(found["models"], model.state_dict(), where["models"])
        n_params = len(list(model.parameters()))
        check.sgd_state(found["optimizers"], n_params, config.lrs[arm], where["optimizers"])
        _check_history(found["history"], config, steps, where["history"])
        _check_trace(found["traces"], config, steps, where["traces"])
        reference = {str(k): torch.empty(probe, config.hidden) for k in range(config.depth - 1)}
        inputs = found["inputs"]
        if not isinstance(inputs, list):
            raise ValueError(
                f"expected {where['inputs']} to be a list of tensors, got {check.describe(inputs)}."
            )
        check.tensors({str(k): v for k, v in enumerate(inputs)}, reference, where["inputs"])


def metric_rows(result: Mapping[str, Any]) -> list[dict]:
    """One seed's result as flat rows, one per arm and measured step.

    Each row: ``seed``, ``arm``, ``step``, the validation and test accuracy and loss,
    ``train_loss``, ``shift`` (mean over layers, ``None`` at step 0), the plotted unit's
    percentiles as ``p15``/``p50``/``p85`` and ``saturated`` (mean over units).
    """
    rows = []
    for arm, net in result["arms"].items():
        trace = ActivationTrace.from_dict(net["trace"])
        unit = result.get("unit", 0)
        for t, step in enumerate(net["steps"]):
            layer_shifts = [s[t] for s in net["shift"] if s[t] is not None]
            row = {"seed": result["seed"], "arm": arm, "step": step}
            for key in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_loss"):
                row[key] = net[key][t]
            row["shift"] = float(np.mean(layer_shifts)) if layer_shifts else None
            for level, value in zip(trace.quantile_levels, trace.quantiles[t, unit], strict=True):
                row[f"p{100 * level:g}"] = float(value)
            if trace.saturated is not None:
                row["saturated"] = float(trace.saturated[t].mean())
            rows.append(row)
    return rows
