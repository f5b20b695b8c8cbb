"""The lab's experiments, by name: ``EXPERIMENTS`` is the whole list, written out by hand.

Each experiment is a module in :mod:`batchnorm.lab.experiments` that provides the pieces an
:class:`Experiment` bundles; the runner (:mod:`batchnorm.lab.runner`) drives them. An experiment
has exactly one name: its module's name, ``snake_case``; the command line spells it in
kebab-case (``small_batch`` -> ``batchnorm lab run small-batch``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .experiments import (
    anatomy,
    batch_size,
    convergence,
    figure1,
    gradients,
    initialization,
    learning_rate,
    mechanism,
    population,
    regularization,
)
from .protocol import Rule

__all__ = ["EXPERIMENTS", "Experiment", "get_experiment"]


@dataclass(frozen=True)
class Experiment:
    """One reproducible claim: its configurations and the functions that run and report it.

    Attributes:
        name: The module's name, ``snake_case``; the key in :data:`EXPERIMENTS`.
        title: One line for ``batchnorm lab list``.
        claim: The claim being tested, as the figures and the summary state it.
        config_type: A frozen dataclass; it must have an int field ``seeds`` (seeds
            ``0 .. seeds - 1`` are run) and build itself from ``asdict`` output.
        presets: Preset name -> configuration; ``tiny`` (seconds, for tests), ``quick`` and
            the experiment's own.
        default_preset: The preset used when none is named.
        prepare: ``prepare(config) -> data``: what every seed shares (the dataset), loaded once.
        steps_per_seed: ``steps_per_seed(config) -> int``, for the progress bar.
        run_seed: ``run_seed(config, data, seed, *, checkpoint, save_checkpoint, advance)``
            trains one seed and returns a JSON-serialisable dict. ``checkpoint`` is the last
            dict given to ``save_checkpoint`` (or ``None``), to continue from; ``advance(n)``
            reports ``n`` more steps done.
        metric_rows: ``metric_rows(result) -> list of dicts``: one seed's result as flat
            per-step rows (JSON-serialisable) for ``metrics.jsonl``.
        summarize: ``summarize(config, results) -> dict`` (``results``: seed -> result),
            JSON-serialisable, with a
            ``"claims"`` list (each with a boolean ``"held"``) and a ``"report"`` list of lines.
        plot: ``plot(config, results, summary)`` -> dict of figure name -> matplotlib Figure.
        check_result: ``check_result(config, seed, result)`` raises ``ValueError`` ("expected
            <entry> to be <what>, got <what>.") unless ``result`` is a complete ``run_seed``
            result of this config and seed; the runner checks every result before writing it
            and after reading it back.
        check_checkpoint: ``check_checkpoint(config, data, seed, state)`` raises
            ``ValueError`` likewise unless ``state``, a dict ``run_seed`` gave
            ``save_checkpoint`` (its ``step`` and ``seconds`` already checked), can continue
            this seed of this config; the runner calls it for every checkpoint before any seed
            trains.
        rules: The claims' pass rules (:class:`~batchnorm.lab.protocol.Rule`), declared in the
            experiment's module before its first results; ``summarize`` judges each one.
        tuning: How ``batchnorm lab tune`` tunes the experiment (:class:`Tuning`), or ``None``.
    """

    name: str
    title: str
    claim: str
    config_type: type
    presets: Mapping[str, Any]
    default_preset: str
    prepare: Callable[[Any], Any]
    steps_per_seed: Callable[[Any], int]
    run_seed: Callable[..., dict]
    metric_rows: Callable[[dict], list[dict]]
    summarize: Callable[[Any, Mapping[int, dict]], dict]
    plot: Callable[[Any, Mapping[int, dict], dict], dict]
    check_result: Callable[[Any, int, Mapping[str, Any]], None]
    check_checkpoint: Callable[[Any, Any, int, Mapping[str, Any]], None]
    rules: tuple[Rule, ...] = ()
    tuning: Tuning | None = None

    @property
    def cli_name(self) -> str:
        """The name on the command line: the module name in kebab-case."""
        return self.name.replace("_", "-")


@dataclass(frozen=True)
class Tuning:
    """What ``batchnorm lab tune`` needs from an experiment: each arm is tuned on its own.

    Attributes:
        arms: ``arms(config) -> list of arm names``.
        score: ``score(config, data, arm, value, seed) -> float``: train one arm with the
            hyper-parameter at ``value`` on ``seed`` and score it on the validation split,
            higher is better (NaN for a diverged run).
        grid: The starting grid, ascending; it is extended by ``factor`` until the best value
            is inside it (at most ``max_extensions`` times per side).
        factor: The grid's ratio.
        hyper_parameter: The tuned field's name (``"lr"``).
        metric: The score in words, for the tuned file.
        preset: The preset whose configuration (length, data) tuning runs with.
    """

    arms: Callable[[Any], list[str]]
    score: Callable[..., float]
    grid: tuple[float, ...]
    factor: float
    hyper_parameter: str = "lr"
    metric: str = ""
    preset: str = "quick"
    max_extensions: int = field(default=3)


def _from_module(module: ModuleType) -> Experiment:
    """The experiment a claims module describes with its module-level names: ``TITLE``,
    ``CLAIM``, ``CONFIG_TYPE``, ``PRESETS``, ``RULES``, ``TUNING`` (the keyword arguments of
    :class:`Tuning`, or ``None``), and the functions :class:`Experiment` lists."""
    name = module.__name__.rsplit(".", 1)[-1]
    tuning = getattr(module, "TUNING", None)
    return Experiment(
        name=name,
        title=module.TITLE,
        claim=module.CLAIM,
        config_type=module.CONFIG_TYPE,
        presets=module.PRESETS,
        default_preset=getattr(module, "DEFAULT_PRESET", "quick"),
        prepare=module.prepare,
        steps_per_seed=module.steps_per_seed,
        run_seed=module.run_seed,
        metric_rows=module.metric_rows,
        summarize=module.summarize,
        plot=module.plot,
        check_result=module.check_result,
        check_checkpoint=module.check_checkpoint,
        rules=module.RULES,
        tuning=None if tuning is None else Tuning(**tuning),
    )


# The claims experiments, in the order the report lists them (after figure1 and population).
_CLAIMS = (
    anatomy,
    convergence,
    learning_rate,
    initialization,
    regularization,
    batch_size,
    gradients,
    mechanism,
)

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in map(_from_module, (figure1, population, *_CLAIMS))
}


def get_experiment(name: str) -> Experiment:
    """Look an experiment up by its command-line (kebab-case) name.

    Raises:
        ValueError: If there is no such experiment; the message lists the valid names and the
            nearest one.
    """
    by_cli_name = {e.cli_name: e for e in EXPERIMENTS.values()}
    if name in by_cli_name:
        return by_cli_name[name]
    close = difflib.get_close_matches(name, list(by_cli_name), n=1)
    raise ValueError(
        f"unknown experiment {name!r}; choose one of: {', '.join(sorted(by_cli_name))}."
        + (f" Did you mean {close[0]!r}?" if close else "")
    )
