"""``batchnorm lab tune NAME``: tune each arm of an experiment on its own, on the validation
split and a seed no preset reports, and write the chosen values to the tuned file.

For every arm the experiment's :class:`~batchnorm.lab.registry.Tuning` names, the score (higher
is better, e.g. the best smoothed validation accuracy) is measured over a geometric grid; while
the best value sits at an edge of the grid, the grid is extended past that edge (at most
``max_extensions`` times a side), so the chosen value is bracketed by worse ones whenever that
is possible. The record keeps every value tried with its score, whether the optimum was
bracketed, the preset and seed, so a reader can see what the choice was made from. Grid points
run in parallel processes (one thread each) when ``workers > 1``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ._parallel import parallel_map
from .protocol import TUNING_SEED, bracketing_grid, write_tuned
from .registry import get_experiment
from .runner import make_config

__all__ = ["tune_experiment"]


def _score(name: str, preset: str, arm: str, value: float, seed: int) -> float:
    """One grid point, in whichever process runs it (the dataset is cached on disk)."""
    experiment = get_experiment(name)
    config = make_config(experiment, preset)
    data = experiment.prepare(config)
    tuning = experiment.tuning
    assert tuning is not None, "tune_experiment() runs only experiments with a tuning grid"
    score = tuning.score(config, data, arm, value, seed)
    return float(score) if math.isfinite(score) else math.nan


def tune_experiment(
    name: str,
    *,
    preset: str | None = None,
    workers: int = 1,
    path: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tune every arm of experiment ``name``; write and return its record.

    Args:
        name: The experiment's command-line name.
        preset: The preset whose configuration tuning runs with; ``None`` means the
            experiment's ``Tuning.preset``.
        workers: Processes that score grid points at once.
        path: The tuned file; ``None`` means the package's
            (:data:`batchnorm.lab.protocol.TUNED_FILE`).
        log: Called with a line per grid point and per arm's choice (the CLI prints them).

    Returns:
        The record written: ``preset``, ``seed``, ``metric``, ``hyper_parameter``, ``arms``
        (arm -> a dict of the chosen value under the hyper-parameter's own name, e.g.
        ``"lr"``, the ``grid`` tried, its ``scores`` and whether the choice was
        ``bracketed``), ``seconds``, ``version``.

    Raises:
        ValueError: If the experiment has no tuning, or the preset is unknown.
    """
    experiment = get_experiment(name)
    tuning = experiment.tuning
    if tuning is None:
        raise ValueError(f"lab tune: expected an experiment with a tuning grid, got {name!r}.")
    preset = tuning.preset if preset is None else preset
    config = make_config(experiment, preset)
    experiment.prepare(config)  # fails early (and fills the dataset cache) before any worker
    log = log or (lambda line: None)
    start = time.perf_counter()
    arms = tuning.arms(config)
    grids = {arm: sorted(tuning.grid) for arm in arms}
    scores: dict[str, dict[float, float]] = {arm: {} for arm in arms}
    extensions = {arm: {"low": 0, "high": 0} for arm in arms}
    pending = [(arm, value) for arm in arms for value in grids[arm]]
    while pending:
        args = [(experiment.cli_name, preset, arm, value, TUNING_SEED) for arm, value in pending]
        for (arm, value), score in zip(pending, parallel_map(_score, args, workers), strict=True):
            scores[arm][value] = score
            log(f"  {arm}: {tuning.hyper_parameter} {value:g} -> {score:.4f}")
        pending = []
        for arm in arms:
            grid = sorted(scores[arm])
            nxt = bracketing_grid(grid, [scores[arm][v] for v in grid], tuning.factor)
            if nxt is None:
                continue
            side = "low" if nxt < grid[0] else "high"
            if extensions[arm][side] < tuning.max_extensions:
                extensions[arm][side] += 1
                pending.append((arm, float(f"{nxt:.3g}")))
    record_arms = {}
    for arm in arms:
        grid = sorted(scores[arm])
        values = [scores[arm][v] for v in grid]
        clean = [s if math.isfinite(s) else -math.inf for s in values]
        best = grid[clean.index(max(clean))]
        bracketed = bracketing_grid(grid, values, tuning.factor) is None
        record_arms[arm] = {
            tuning.hyper_parameter: best,
            "grid": grid,
            "scores": [None if not math.isfinite(s) else round(s, 6) for s in values],
            "bracketed": bracketed,
        }
        log(
            f"{arm}: {tuning.hyper_parameter} = {best:g}"
            + ("" if bracketed else " (at the edge of the grid after every extension)")
        )
    record = {
        "preset": preset,
        "seed": TUNING_SEED,
        "metric": tuning.metric,
        "hyper_parameter": tuning.hyper_parameter,
        "arms": record_arms,
        "seconds": round(time.perf_counter() - start, 1),
        "version": __version__,
    }
    written = write_tuned(experiment.name, record, path)
    log(f"wrote {written}")
    return record
