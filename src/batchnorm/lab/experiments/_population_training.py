"""Training one seed of the population experiment: :func:`run_seed` trains the network,
measures it every ``eval_every`` steps, checkpoints it and continues from a checkpoint;
:func:`check_checkpoint` and :func:`check_result` check a checkpoint and a result read back
before the runner trusts them; :func:`metric_rows` flattens a result into the rows of
``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import _checks as check
from .. import data as lab_data
from .._training import batch_indices, denormals_flushed, end_of_step, measured_steps, threads
from ..models import make_mlp
from ._population_config import PopulationConfig
from ._population_measure import bn_layers, measure_statistics, statistics_batches
from ._population_spec import COMPARED, GAPS, METHODS, REFERENCE

__all__ = ["check_checkpoint", "check_result", "metric_rows", "run_seed"]


def _make_model(config: PopulationConfig, data: lab_data.Dataset, seed: int) -> nn.Module:
    # torch's default initialisation draws from the global generator: fork it (CPU only) and
    # seed the fork, so the weights are a function of the seed and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = make_mlp(
            data.n_features,
            data.n_classes,
            hidden=config.hidden,
            depth=config.depth,
            activation=config.activation,
            norm="batchnorm",
        )
    for _, layer in bn_layers(model):
        layer.momentum = config.momentum
    return model


def _empty_history(layers: Sequence[str]) -> dict[str, Any]:
    return {
        "steps": [],
        "train_loss": [],
        "test_accuracy": {m: [] for m in METHODS},
        "test_loss": {m: [] for m in METHODS},
        "gap": {m: {g: {n: [] for n in layers} for g in GAPS} for m in COMPARED},
    }


def _layer_names(config: PopulationConfig) -> list[str]:
    return [f"bn{i}" for i in range(1, config.depth + 1)]


def run_seed(
    config: PopulationConfig,
    data: lab_data.Dataset,
    seed: int,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Train one BN network for a seed, measuring its inference statistics along the way.

    Args:
        config: The settings.
        data: The dataset from :func:`prepare`.
        seed: Seeds the initial weights, the batch order and the order of the exact passes.
        checkpoint: A dict previously passed to ``save_checkpoint`` by a run with the same
            config and seed, to continue from; the result is then the same as without the
            interruption.
        save_checkpoint: Called with a dict of tensors and plain values every
            ``config.checkpoint_every`` steps (not after the last step).
        advance: Called as ``advance(n)`` when ``n`` more steps are done.

    Returns:
        A JSON-serialisable dict: ``seed``; ``seconds`` (earlier interrupted parts included);
        ``layers`` (the BN layers' names); ``steps`` and ``train_loss`` (the mean mini-batch
        loss since the previous measurement, ``None`` at step 0); ``test_accuracy`` and
        ``test_loss`` (each of :data:`METHODS` -> list over steps); ``reference``
        (:data:`REFERENCE`, the statistics the gaps are measured to); ``gap`` (each of
        :data:`COMPARED` -> ``"mean_shift"``/``"log_var_ratio"`` -> layer -> list over steps,
        the gap to the sequential statistics); ``final_statistics`` (layer -> ``eps`` and
        method -> ``mean``, ``var`` lists over channels, at the last step).

    Raises:
        ValueError: If ``checkpoint`` was saved by an earlier version of this experiment that
            did not measure every one of :data:`METHODS`.
    """
    start = time.perf_counter()
    n_train = len(data.y_train)
    model = _make_model(config, data, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    batches = statistics_batches(data.x_train, config.pass_batch_size, seed)
    layers = _layer_names(config)
    history = _empty_history(layers)
    final_statistics: dict[str, Any] = {}
    step, elapsed_before = 0, 0.0
    if checkpoint is not None:
        step = int(checkpoint["step"])
        elapsed_before = float(checkpoint["seconds"])
        history = copy.deepcopy(dict(checkpoint["history"]))
        missing = [m for m in METHODS if m not in history["test_accuracy"]]
        if missing or set(history["gap"]) != set(COMPARED):
            # Continuing would mix two definitions of the gap in one history.
            raise ValueError(
                f"population.run_seed(): expected a checkpoint measuring {list(METHODS)} with "
                f"gaps of {list(COMPARED)} to {REFERENCE!r}, got one measuring "
                f"{list(history['test_accuracy'])} with gaps of {list(history['gap'])}. It was "
                "saved by an earlier version of this experiment; start a new run."
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    loss_sum, loss_count = 0.0, 0

    def measure() -> None:
        nonlocal loss_sum, loss_count
        found = measure_statistics(model, batches, data.x_test, data.y_test)
        history["steps"].append(step)
        history["train_loss"].append(loss_sum / loss_count if loss_count else None)
        loss_sum, loss_count = 0.0, 0
        for method in METHODS:
            history["test_accuracy"][method].append(found["test_accuracy"][method])
            history["test_loss"][method].append(found["test_loss"][method])
        for method in COMPARED:
            for g in GAPS:
                for name in layers:
                    history["gap"][method][g][name].append(found["gap"][method][g][name])
        if step == config.steps:
            final_statistics.update(
                {
                    name: {
                        "eps": found["eps"][name],
                        **{
                            method: {
                                "mean": found["statistics"][name][method][0].tolist(),
                                "var": found["statistics"][name][method][1].tolist(),
                            }
                            for method in METHODS
                        },
                    }
                    for name in layers
                }
            )

    def state() -> dict:
        # Copies, not the live tensors a state_dict holds: a checkpoint kept in memory must not
        # follow the training that continues after it.
        return copy.deepcopy(
            {
                "step": step,
                "seconds": elapsed_before + time.perf_counter() - start,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history,
            }
        )

    order: dict = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(denormals_flushed(config.flush_denormals))
        stack.enter_context(threads(config.threads))
        if step == 0:
            measure()
        while step < config.steps:
            idx = batch_indices(seed, step, n_train, config.batch_size, order)
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            loss_count += 1
            step += 1
            end_of_step(step, config, measure, save_checkpoint, state, advance)

    return {
        "seed": seed,
        "seconds": elapsed_before + time.perf_counter() - start,
        "layers": layers,
        "reference": REFERENCE,
        **history,
        "final_statistics": final_statistics,
    }


def _check_history(history: Any, config: PopulationConfig, steps: list[int], where: str) -> None:
    accuracy = check.item(history, "test_accuracy", where)
    gap = check.item(history, "gap", where)
    if isinstance(accuracy, Mapping) and isinstance(gap, Mapping):
        if any(m not in accuracy for m in METHODS) or set(gap) != set(COMPARED):
            raise ValueError(
                f"expected {where} to measure {list(METHODS)} with gaps of {list(COMPARED)} to "
                f"{REFERENCE!r}, got one measuring {list(accuracy)} with gaps of {list(gap)}, "
                "from an earlier version of this experiment."
            )
    n = len(steps)
    check.equal(check.item(history, "steps", where), steps, check.at(where, "steps"))
    train_loss = check.item(history, "train_loss", where)
    check.numbers(train_loss, check.at(where, "train_loss"), n, none_first=True)
    for key in ("test_accuracy", "test_loss"):
        by_method = check.item(history, key, where)
        for method in METHODS:
            path = check.at(where, key)
            check.numbers(check.item(by_method, method, path), check.at(path, method), n)
    for method in COMPARED:
        where_method = check.at(check.at(where, "gap"), method)
        by_gap = check.item(gap, method, check.at(where, "gap"))
        for g in GAPS:
            where_gap = check.at(where_method, g)
            by_layer = check.item(by_gap, g, where_method)
            for name in _layer_names(config):
                check.numbers(check.item(by_layer, name, where_gap), check.at(where_gap, name), n)


def check_result(config: PopulationConfig, seed: int, result: Mapping[str, Any]) -> None:
    """Check that ``result`` is a complete :func:`run_seed` result of ``config`` and ``seed``:
    every key, every source of statistics measured at every step, the final statistics of
    every layer.

    Raises:
        ValueError: ``"expected <entry> to be <what>, got <what>."``, naming the entry by its
            path, e.g. ``result['test_loss']['ema']``.
    """
    check.equal(check.item(result, "seed", "result"), seed, "result['seed']")
    reference = check.item(result, "reference", "result")
    if reference != REFERENCE:
        raise ValueError(
            f"expected result['reference'] to be {REFERENCE!r}, got {reference!r}, from an "
            "earlier version of this experiment."
        )
    layers = _layer_names(config)
    check.equal(check.item(result, "layers", "result"), layers, "result['layers']")
    _check_history(result, config, measured_steps(config), "result")
    final = check.item(result, "final_statistics", "result")
    for name in layers:
        where = check.at("result['final_statistics']", name)
        recorded = check.item(final, name, "result['final_statistics']")
        for method in METHODS:
            statistics = check.item(recorded, method, where)
            for key in ("mean", "var"):
                values = check.item(statistics, key, check.at(where, method))
                check.numbers(values, check.at(check.at(where, method), key), config.hidden)
        if "eps" in recorded:  # results of earlier versions did not record it
            check.number(recorded["eps"], check.at(where, "eps"), low=0)


def check_checkpoint(
    config: PopulationConfig, data: lab_data.Dataset, seed: int, state: Mapping[str, Any]
) -> None:
    """Check that ``state`` (a dict :func:`run_seed` saved, whose ``step`` the runner has
    checked) can continue seed ``seed`` of ``config``: the weights and buffers of the
    configured network, its SGD state, and a history measured at every step so far.

    Raises:
        ValueError: ``"expected <entry> to be <what>, got <what>."``, naming the entry by its
            path, e.g. ``state['model']['bn1.running_var']``.
    """
    model = _make_model(config, data, seed)
    check.tensors(check.item(state, "model", "state"), model.state_dict(), "state['model']")
    optimizer = check.item(state, "optimizer", "state")
    check.sgd_state(optimizer, len(list(model.parameters())), config.lr, "state['optimizer']")
    history = check.item(state, "history", "state")
    _check_history(history, config, measured_steps(config, state["step"]), "state['history']")


def metric_rows(result: Mapping[str, Any]) -> list[dict]:
    """One seed's result as flat rows, one per source of statistics and measured step.

    Each row: ``seed``, ``statistics`` (one of :data:`METHODS`), ``step``, ``test_accuracy``,
    ``test_loss``, ``train_loss``, and per layer ``mean_shift_vs_sequential_<layer>`` and
    ``log_var_ratio_vs_sequential_<layer>``, the gap of these statistics to the sequential ones
    (0 for sequential). The reference is in the column name so that these columns cannot be
    mistaken for those of earlier runs, which measured the gap to the pooled statistics.
    """
    rows = []
    for method in METHODS:
        for t, step in enumerate(result["steps"]):
            row = {
                "seed": result["seed"],
                "statistics": method,
                "step": step,
                "test_accuracy": result["test_accuracy"][method][t],
                "test_loss": result["test_loss"][method][t],
                "train_loss": result["train_loss"][t],
            }
            for g in GAPS:
                for name in result["layers"]:
                    value = 0.0 if method == REFERENCE else result["gap"][method][g][name][t]
                    row[f"{g}_vs_{REFERENCE}_{name}"] = value
            rows.append(row)
    return rows
