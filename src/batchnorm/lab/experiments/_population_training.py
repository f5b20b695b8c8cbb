"""Training one seed of the population experiment: :func:`run_seed` trains one network per batch
size, measures each early and at the end, checkpoints and continues from a checkpoint;
:func:`check_checkpoint` and :func:`check_result` check a checkpoint and a result read back
before the runner trusts them; :func:`metric_rows` flattens a result into the rows of
``metrics.jsonl``; :func:`tune_arms` and :func:`tune_score` are what ``batchnorm lab tune``
calls.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ... import NonFiniteStatisticsWarning
from .. import _checks as check
from .. import data as lab_data
from .._training import batch_indices, denormals_flushed, threads
from ..models import make_mlp
from ._population_config import PopulationConfig
from ._population_ema import RunningAverages, bn_layers
from ._population_measure import evaluate, exact_statistics, measure
from ._population_spec import NATIVE_MOMENTUM, PHASES, SPLITS, methods

__all__ = [
    "check_checkpoint",
    "check_result",
    "metric_rows",
    "run_seed",
    "tune_arms",
    "tune_score",
]


class _Diverged(Exception):
    """A training loss that is not finite: the learning rate is too large for this network."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(step, loss)
        self.step, self.loss = step, loss


def _make_model(config: PopulationConfig, data: lab_data.Dataset, seed: int) -> nn.Module:
    # torch's default initialisation draws from the global generator: fork it (CPU only) and
    # seed the fork, so the weights are a function of the seed (the same for every batch size
    # of a seed, which pairs the networks) and the caller's RNG is untouched.
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
        layer.momentum = NATIVE_MOMENTUM
    return model


def _layer_names(config: PopulationConfig) -> list[str]:
    return [f"bn{i}" for i in range(1, config.depth + 1)]


class _Network:
    """One network of a seed: the model, its SGD, its running averages and its batch order."""

    def __init__(
        self,
        config: PopulationConfig,
        data: lab_data.Dataset,
        seed: int,
        batch_size: int,
        lr: float,
    ) -> None:
        self.data, self.seed, self.batch_size = data, seed, batch_size
        self.model = _make_model(config, data, seed)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.averages = RunningAverages(bn_layers(self.model), config.momenta)
        self.step = 0
        self._order: dict = {}

    def train_step(self) -> None:
        """One SGD step on the step's mini-batch (:func:`batch_indices`: a pure function of
        the seed and the step, so a resumed network draws what it would have drawn).

        Raises:
            _Diverged: If the mini-batch loss is not finite.
        """
        n_train = len(self.data.y_train)
        idx = batch_indices(self.seed, self.step, n_train, self.batch_size, self._order)
        loss = nn.functional.cross_entropy(
            self.model(self.data.x_train[idx]), self.data.y_train[idx]
        )
        if not torch.isfinite(loss):
            raise _Diverged(self.step + 1, loss.item())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1

    def state(self) -> dict[str, Any]:
        # Copies, not the live tensors a state_dict holds: a checkpoint kept in memory must not
        # follow the training that continues after it.
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "averages": self.averages.state_dict(),
            }
        )

    def load(self, state: Mapping[str, Any], step: int) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.averages.load_state_dict(state["averages"])
        self.step = step


def run_seed(
    config: PopulationConfig,
    data: lab_data.Dataset,
    seed: int,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Train one BN network per batch size for a seed, measuring each early and at the end.

    The networks train one after the other, in the order of ``config.batch_sizes``, from the
    same initial weights; the running averages of every momentum in ``config.momenta`` follow
    each one (:class:`~._population_ema.RunningAverages`). After ``config.early_step(b)`` and
    ``config.steps_for(b)`` steps of the network with batch size ``b``,
    :func:`~._population_measure.measure` tests it on the validation and test sets.

    Args:
        config: The settings.
        data: The dataset from :func:`prepare` (with its validation split).
        seed: Seeds the initial weights, the batch order and the order of the batches of the
            one-pass estimators and the control.
        checkpoint: A dict previously passed to ``save_checkpoint`` by a run with the same
            config and seed, to continue from; the result is then the same as without the
            interruption.
        save_checkpoint: Called with a dict of tensors and plain values every
            ``config.checkpoint_every`` steps, counted over all of the seed's networks (not
            after the last step).
        advance: Called as ``advance(n)`` when ``n`` more steps are done.

    Returns:
        A JSON-serialisable dict: ``seed``; ``seconds`` (earlier interrupted parts included);
        ``layers`` (the BN layers' names); ``batch_sizes``, ``momenta`` and ``methods`` (the
        sources of statistics, :func:`~._population_spec.methods`); ``lr`` and ``steps``
        (batch size as a string -> the network's learning rate and SGD steps); ``n_train``,
        ``n_val``, ``n_test``; ``measurements``: batch size -> ``"early"``/``"end"`` ->
        ``{"step", "train_loss", "val", "test"}``, each split ``{"loss", "accuracy"}`` ->
        method -> float (see :func:`~._population_measure.measure`).

    Raises:
        ValueError: If ``data`` has no validation split, or a network's training loss stops
            being finite (the learning rate is too large).
    """
    if data.x_val is None:
        raise ValueError(
            f"population.run_seed(): expected a dataset with a validation split (prepare()), "
            f"got {data.name!r} without one."
        )
    start = time.perf_counter()
    step, elapsed_before = 0, 0.0
    measurements: dict[str, dict] = {str(b): {} for b in config.batch_sizes}
    if checkpoint is not None:
        step = int(checkpoint["step"])
        elapsed_before = float(checkpoint["seconds"])
        measurements = copy.deepcopy(dict(checkpoint["measurements"]))
    network: _Network | None = None

    def state() -> dict:
        assert network is not None, "a checkpoint is saved only while a network trains"
        return {
            "step": step,
            "seconds": elapsed_before + time.perf_counter() - start,
            "network": network.state(),
            "measurements": copy.deepcopy(measurements),
        }

    with contextlib.ExitStack() as stack:
        stack.enter_context(denormals_flushed(config.flush_denormals))
        stack.enter_context(threads(config.threads))
        for b, offset in zip(config.batch_sizes, config.offsets(), strict=True):
            n_steps, early = config.steps_for(b), config.early_step(b)
            if step >= offset + n_steps:
                continue  # trained and measured before the checkpoint
            network = _Network(config, data, seed, b, config.lr_for(b))
            if step > offset:
                assert checkpoint is not None, "step > 0 only when resuming from a checkpoint"
                network.load(checkpoint["network"], step - offset)
            with network.averages.attached():
                while network.step < n_steps:
                    try:
                        network.train_step()
                    except _Diverged as err:
                        raise ValueError(
                            f"population.run_seed(seed={seed}): expected a finite training loss, "
                            f"got {err.loss!r} at step {err.step} of batch size {b} with lr "
                            f"{config.lr_for(b)!r}. Lower the learning rate."
                        ) from err
                    step += 1
                    if network.step in (early, n_steps):
                        phase = PHASES[0] if network.step == early else PHASES[1]
                        found = measure(network.model, network.averages, data, b, seed)
                        measurements[str(b)][phase] = {"step": network.step, **found}
                    if save_checkpoint is not None and step % config.checkpoint_every == 0:
                        if step < config.steps:
                            save_checkpoint(state())
                    if advance is not None:
                        advance(1)

    return {
        "seed": seed,
        "seconds": elapsed_before + time.perf_counter() - start,
        "layers": _layer_names(config),
        "batch_sizes": list(config.batch_sizes),
        "momenta": list(config.momenta),
        "methods": methods(config.momenta),
        "lr": {str(b): config.lr_for(b) for b in config.batch_sizes},
        "steps": {str(b): config.steps_for(b) for b in config.batch_sizes},
        "n_train": len(data.y_train),
        "n_val": len(data.validation()[1]),
        "n_test": len(data.y_test),
        "measurements": measurements,
    }


# --- checks -----------------------------------------------------------------------------------


def _check_measurement(value: Any, where: str, step: int, names: list[str]) -> None:
    check.equal(check.item(value, "step", where), step, check.at(where, "step"))
    check.number(check.item(value, "train_loss", where), check.at(where, "train_loss"), low=0)
    for split in SPLITS:
        by_split = check.item(value, split, where)
        where_split = check.at(where, split)
        for key in ("loss", "accuracy"):
            by_method = check.item(by_split, key, where_split)
            where_key = check.at(where_split, key)
            if isinstance(by_method, Mapping) and set(by_method) != set(names):
                raise ValueError(
                    f"expected {where_key} to hold the methods {names}, got {list(by_method)}."
                )
            for name in names:
                got = check.number(
                    check.item(by_method, name, where_key), check.at(where_key, name), low=0
                )
                if key == "accuracy" and got > 1:
                    raise ValueError(
                        f"expected {check.at(where_key, name)} to be a fraction in [0, 1], got "
                        f"{got!r}."
                    )


def _check_measurements(
    value: Any, config: PopulationConfig, until: int | None, where: str
) -> None:
    """``value`` must hold every measurement taken up to the seed's step ``until`` (``None``:
    the end), and no other."""
    sizes = [str(b) for b in config.batch_sizes]
    if isinstance(value, Mapping) and set(value) != set(sizes):
        raise ValueError(f"expected {where} to hold the batch sizes {sizes}, got {list(value)}.")
    names = methods(config.momenta)
    for b, offset in zip(config.batch_sizes, config.offsets(), strict=True):
        by_phase = check.item(value, str(b), where)
        where_b = check.at(where, str(b))
        phase_steps = dict(zip(PHASES, (config.early_step(b), config.steps_for(b)), strict=True))
        taken = [p for p, s in phase_steps.items() if until is None or offset + s <= until]
        if not isinstance(by_phase, Mapping) or sorted(by_phase) != sorted(taken):
            got = list(by_phase) if isinstance(by_phase, Mapping) else check.describe(by_phase)
            raise ValueError(f"expected {where_b} to hold the measurements {taken}, got {got}.")
        for phase in taken:
            _check_measurement(by_phase[phase], check.at(where_b, phase), phase_steps[phase], names)


def check_result(config: PopulationConfig, seed: int, result: Mapping[str, Any]) -> None:
    """Check that ``result`` is a complete :func:`run_seed` result of ``config`` and ``seed``:
    every key, every source of statistics measured on both splits at both steps of every
    batch size, and the learning rates the config gives.

    Raises:
        ValueError: ``"expected <entry> to be <what>, got <what>."``, naming the entry by its
            path, e.g. ``result['measurements']['60']['end']['test']['loss']['ema0.1']``.
    """
    check.equal(check.item(result, "seed", "result"), seed, "result['seed']")
    check.equal(check.item(result, "layers", "result"), _layer_names(config), "result['layers']")
    for key, want in (
        ("batch_sizes", list(config.batch_sizes)),
        ("momenta", list(config.momenta)),
        ("methods", methods(config.momenta)),
        ("lr", {str(b): config.lr_for(b) for b in config.batch_sizes}),
        ("steps", {str(b): config.steps_for(b) for b in config.batch_sizes}),
        ("n_train", config.n_train),
        ("n_val", config.n_val),
    ):
        check.equal(check.item(result, key, "result"), want, check.at("result", key))
    n_test = check.item(result, "n_test", "result")
    check.integer(n_test, "result['n_test']", range(2, 2**31), "an int >= 2")
    measured = check.item(result, "measurements", "result")
    _check_measurements(measured, config, None, "result['measurements']")


def _network_at(config: PopulationConfig, step: int) -> int:
    """The batch size whose network a checkpoint at the seed's ``step`` holds: the one whose
    steps ``(offset, offset + steps]`` contain it."""
    for b, offset in zip(config.batch_sizes, config.offsets(), strict=True):
        if offset < step <= offset + config.steps_for(b):
            return b
    raise ValueError(f"expected a step in [1, {config.steps}], got {step}.")


def check_checkpoint(
    config: PopulationConfig, data: lab_data.Dataset, seed: int, state: Mapping[str, Any]
) -> None:
    """Check that ``state`` (a dict :func:`run_seed` saved, whose ``step`` the runner has
    checked) can continue seed ``seed`` of ``config``: the weights and buffers of the
    configured network, its SGD state with that network's learning rate, its running averages,
    and every measurement taken so far.

    Raises:
        ValueError: ``"expected <entry> to be <what>, got <what>."``, naming the entry by its
            path, e.g. ``state['network']['model']['bn2.running_var']``.
    """
    step = int(state["step"])
    b = _network_at(config, step)
    fresh = _Network(config, data, seed, b, config.lr_for(b))
    network = check.item(state, "network", "state")
    where = "state['network']"
    model = check.item(network, "model", where)
    check.tensors(model, fresh.model.state_dict(), check.at(where, "model"))
    optimizer = check.item(network, "optimizer", where)
    n_params = len(list(fresh.model.parameters()))
    check.sgd_state(optimizer, n_params, config.lr_for(b), check.at(where, "optimizer"))
    averages = check.item(network, "averages", where)
    check.tensors(averages, fresh.averages.state_dict(), check.at(where, "averages"))
    measured = check.item(state, "measurements", "state")
    _check_measurements(measured, config, step, "state['measurements']")


def metric_rows(result: Mapping[str, Any]) -> list[dict]:
    """One seed's result as flat rows, one per batch size, phase, split and source of statistics.

    Each row: ``seed``, ``batch_size``, ``phase`` (``"early"``/``"end"``), ``step`` (of that
    network), ``split`` (``"val"``/``"test"``), ``statistics`` (e.g. ``"ema0.1"``,
    ``"sequential"``, ``"batch"``), ``loss``, ``accuracy``, and ``train_loss`` (the whole
    training set with the exact statistics, the same in every row of a measurement).
    """
    rows = []
    for b in result["batch_sizes"]:
        for phase in PHASES:
            found = result["measurements"][str(b)][phase]
            for split in SPLITS:
                for method in result["methods"]:
                    rows.append(
                        {
                            "seed": result["seed"],
                            "batch_size": b,
                            "phase": phase,
                            "step": found["step"],
                            "split": split,
                            "statistics": method,
                            "loss": found[split]["loss"][method],
                            "accuracy": found[split]["accuracy"][method],
                            "train_loss": found["train_loss"],
                        }
                    )
    return rows


# --- tuning -----------------------------------------------------------------------------------


def tune_arms(config: PopulationConfig) -> list[str]:
    """The arms ``batchnorm lab tune`` tunes separately: one per batch size, ``"b<size>"``."""
    return [f"b{b}" for b in config.batch_sizes]


def tune_score(
    config: PopulationConfig, data: lab_data.Dataset, arm: str, lr: float, seed: int
) -> float:
    """Train arm ``arm``'s network with learning rate ``lr`` for the config's epochs; score it.

    The score is minus the mean of two validation losses at the end: with the running
    averages of torch's default momentum (0.1) and with the exact population statistics.
    It is neutral between the two methods the experiment compares: a learning rate that
    suited one of them only would not be preferred for it.

    Args:
        config: The settings (the tuning preset's).
        data: The dataset from :func:`prepare`, with its validation split.
        arm: ``"b<batch size>"`` (:func:`tune_arms`).
        lr: The learning rate to try.
        seed: The seed (the tuner's :data:`~batchnorm.lab.protocol.TUNING_SEED`).

    Returns:
        The score, higher is better; NaN if training diverged.

    Raises:
        ValueError: If ``arm`` is not ``"b<int>"`` with a batch size the training set can
            fill, or ``data`` has no validation split.
    """
    match = re.fullmatch(r"b(\d+)", arm)
    if match is None or not 2 <= int(match.group(1)) <= config.n_train:
        raise ValueError(
            f"population.tune_score(): expected arm 'b<batch size>' with a batch size in "
            f"[2, {config.n_train}], got {arm!r}."
        )
    if data.x_val is None:
        raise ValueError(
            f"population.tune_score(): expected a dataset with a validation split, got "
            f"{data.name!r} without one."
        )
    b = int(match.group(1))
    network = _Network(config, data, seed, b, lr)
    with contextlib.ExitStack() as stack:
        stack.enter_context(denormals_flushed(config.flush_denormals))
        stack.enter_context(threads(config.threads))
        stack.enter_context(network.averages.attached())
        # A learning rate too large for the network is an expected outcome of a grid: the
        # layers' warnings as their statistics overflow say nothing the NaN score does not.
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", NonFiniteStatisticsWarning)
        try:
            while network.step < config.steps_for(b):
                network.train_step()
        except _Diverged:
            return math.nan
        probe = copy.deepcopy(network.model).eval()
        network.averages.load_into(probe, NATIVE_MOMENTUM)
        ema_loss = evaluate(probe, *data.validation())[0]
        exact_statistics(probe, data.x_train)
        exact_loss = evaluate(probe, *data.validation())[0]
    score = -(ema_loss + exact_loss) / 2
    return score if math.isfinite(score) else math.nan
