"""Run the lab's experiments: seeds, run directories, checkpoints, resume, summaries, figures.

A run of experiment ``name`` lives in ``<out>/<name>/<YYYYmmdd-HHMMSS>/``::

    config.json        what was run: experiment, preset, the full config, versions, machine
    checkpoints/       seed-<k>.pt while seed k is in progress (removed when it completes)
    seeds/             seed-<k>.json, everything seed k measured (written when it completes)
    metrics.jsonl      one JSON object per seed, network and measured step
    summary.json       the claims, whether each held, the numbers behind them
    summary.md         the same as the printed report
    figures/*.png      regenerated from config.json and seeds/ alone by ``batchnorm lab plot``

Every file is written atomically (to a temporary name in the same directory, then renamed), so
an interrupted run leaves whole files or none. The directory is made only once the run has
started (its config checked, its dataset loaded), so a run that fails to start leaves nothing
behind. :func:`resume_run` continues an interrupted run: completed seeds are read back, a seed
in progress restarts from its last checkpoint, and the result is the same as an uninterrupted
run's. Before any seed trains, every file the run will use is checked (``config.json``, each
finished seed's result, each checkpoint: that it belongs to this run's experiment, seed and
config, and holds what ``run_seed`` saves); a file that fails raises :class:`RunFileError`,
naming it. A seed's checkpoint is deleted only after its result has been checked, written and
read back. This module and :mod:`batchnorm.cli` are the only ones that print.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ._atomic import atomic_path, write_text
from ._parallel import worth_parallel
from ._run_files import (
    CONFIG_FILE,
    RunFileError,
    checkpoint_record,
    load_checkpoint,
    read_result,
    read_spec,
    read_summary,
    verify_written_result,
)
from .registry import Experiment, get_experiment

__all__ = [
    "LoadedRun",
    "RunFileError",
    "find_resumable",
    "load_run",
    "make_config",
    "plot_run",
    "resume_run",
    "run_experiment",
]

SUMMARY_FILE = "summary.json"
REPORT_FILE = "summary.md"
METRICS_FILE = "metrics.jsonl"


# --- atomic files ---------------------------------------------------------------------------------


def _write_json(path: Path, data: Any, compact: bool = False) -> None:
    # allow_nan=False: a NaN would make the file invalid JSON for other readers. Compact for
    # the bulky per-seed results (traces of every unit), indented for files people read.
    if compact:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    else:
        text = json.dumps(data, indent=1, allow_nan=False)
    write_text(path, text + "\n")


def _save_torch(path: Path, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _save_figure(path: Path, figure: Any) -> None:
    # The lab's figures are matplotlib.figure.Figure objects outside pyplot: nothing to close.
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip("."), dpi=figure.dpi)


# --- configs ----------------------------------------------------------------------------------


def make_config(
    experiment: Experiment,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """The configuration of a preset with some fields replaced.

    Args:
        experiment: From :func:`batchnorm.lab.registry.get_experiment`.
        preset: A name in ``experiment.presets``; ``None`` means the default preset.
        overrides: Field name -> value; ``None`` values are ignored (an option not given).

    Raises:
        ValueError: If the preset or a field name is unknown, or a value is out of range.
    """
    preset = experiment.default_preset if preset is None else preset
    if preset not in experiment.presets:
        raise ValueError(
            f"unknown preset {preset!r} of experiment {experiment.cli_name!r}; choose one of: "
            f"{', '.join(experiment.presets)}."
        )
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    names = {f.name for f in fields(experiment.config_type)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(
            f"{experiment.config_type.__name__}: expected fields among {sorted(names)}, got "
            f"unknown {unknown}."
        )
    return replace(experiment.presets[preset], **given)


def _environment() -> dict[str, Any]:
    import numba
    import numpy
    import torch

    return {
        "batchnorm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # numba.config sets its settings at run time, so numba's inline types miss them.
        "numba_threads": numba.config.NUMBA_NUM_THREADS,  # type: ignore[attr-defined]
    }


# --- progress ---------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar over all steps of a run; silent when stdout is not a terminal, under CI, or
    without tqdm (the ``lab`` extra)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool | None) -> None:
        if enabled is None:
            enabled = sys.stdout.isatty() and not os.environ.get("CI")
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ModuleNotFoundError:
                return
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --- running ----------------------------------------------------------------------------------


def _new_run_dir(out: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = out / name
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        candidate = parent / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RuntimeError(f"run_experiment(): expected a free run directory in {parent}, got none.")


def run_experiment(
    name: str,
    *,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path = "runs",
    progress: bool | None = None,
    verbose: bool = True,
    workers: int | None = None,
) -> Path:
    """Run an experiment for all its seeds in a new run directory; print the report.

    Args:
        name: The experiment's command-line name (see ``batchnorm lab list``).
        preset: A preset of the experiment; ``None`` means its default.
        overrides: Config fields to replace, e.g. ``{"seeds": 5, "dataset": "digits"}``;
            ``None`` values are ignored.
        out: The directory runs go under (``<out>/<name>/<timestamp>/``).
        progress: Show a progress bar; ``None``: only on a terminal and not under ``CI``.
        verbose: Print the header, report and list of files.
        workers: Seeds trained at once, each in its own process; ``None`` decides by the
            size of the run (parallel when it pays: see :mod:`batchnorm.lab._parallel`).

    Returns:
        The run directory.

    Raises:
        ValueError: If the experiment, preset or a config value is invalid.
        ModuleNotFoundError, FileNotFoundError: If the dataset's package or files are missing.
            These are raised before the run directory is made: a run that fails to start
            leaves nothing that ``--resume`` could pick.
        KeyboardInterrupt: If interrupted; the run directory can then be resumed.
    """
    experiment = get_experiment(name)
    config = make_config(experiment, preset, overrides)
    # Whatever can fail at the start fails before the run directory exists: a failed start
    # must leave nothing that --resume would take for an interrupted run.
    data = experiment.prepare(config)
    spec = {
        "experiment": experiment.name,
        "preset": experiment.default_preset if preset is None else preset,
        "config": asdict(config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": _environment(),
    }
    run_dir = _new_run_dir(Path(out), experiment.name)
    try:
        _write_json(run_dir / CONFIG_FILE, spec)
    except BaseException:
        with contextlib.suppress(OSError):
            run_dir.rmdir()
        raise
    return _execute(
        run_dir,
        experiment,
        config,
        data,
        {},
        {},
        progress=progress,
        verbose=verbose,
        workers=workers,
    )


def _run_order(run_dir: Path) -> tuple[str, int]:
    """Sort key of run directories, oldest first: ``<stamp>``, ``<stamp>-2``, ... ``<stamp>-10``."""
    numbered = re.fullmatch(r"(\d{8}-\d{6})-(\d+)", run_dir.name)
    return (numbered.group(1), int(numbered.group(2))) if numbered else (run_dir.name, 1)


def find_resumable(out: str | Path, name: str, *, verbose: bool = False) -> Path:
    """The newest run directory of experiment ``name`` under ``out`` that can be resumed: not
    complete, with a ``config.json`` of this experiment that passes its checks.

    Args:
        out: The directory runs go under.
        name: The experiment's command-line name.
        verbose: Print which run was picked, and why any newer one was passed over.

    Raises:
        ValueError: If the experiment is unknown.
        FileNotFoundError: If there is no run that can be resumed.
    """
    experiment = get_experiment(name)
    parent = Path(out) / experiment.name
    candidates = sorted((d for d in parent.glob("*") if d.is_dir()), key=_run_order, reverse=True)
    complete, passed_over = 0, []
    for run_dir in candidates:
        if (run_dir / SUMMARY_FILE).is_file():
            complete += 1
            continue
        if not (run_dir / CONFIG_FILE).is_file():
            continue  # never started
        try:
            spec = read_spec(run_dir)
        except RunFileError as err:
            passed_over.append(str(err))
            continue
        if spec.experiment.name != experiment.name:
            passed_over.append(
                f"{run_dir / CONFIG_FILE}: expected a run of {experiment.cli_name!r}, got one of "
                f"{spec.experiment.cli_name!r}."
            )
            continue
        if verbose:
            print(
                f"resuming {run_dir}, the newest incomplete run of {experiment.cli_name!r} "
                f"under {str(parent)!r}"
            )
            for reason in passed_over:
                print(f"  passed over a newer run that cannot be resumed: {reason}")
        return run_dir
    if passed_over:
        got = f"only runs that cannot be resumed, the newest: {passed_over[0]}"
    else:
        got = f"{'only complete ones' if complete else 'none'}."
    raise FileNotFoundError(
        f"resume: expected an incomplete run of {experiment.cli_name!r} under {str(parent)!r}, "
        f"got {got} Pass the run directory explicitly, or start a new run without --resume."
    )


def resume_run(
    run_dir: str | Path,
    *,
    progress: bool | None = None,
    verbose: bool = True,
    workers: int | None = None,
) -> Path:
    """Continue an interrupted run with the configuration saved in its ``config.json``.

    Completed seeds are read back; a seed in progress continues from its last checkpoint (a
    seed without one starts over). The finished run is the same as an uninterrupted one. Every
    file the run uses is checked before any seed trains.

    Raises:
        FileNotFoundError: If ``run_dir`` has no ``config.json``.
        RunFileError: If ``config.json``, a seed's result or a checkpoint is damaged or belongs
            to another run; the message names the file. Nothing is trained or deleted then.
        ValueError: If the run is already complete.
    """
    run_dir = Path(run_dir)
    spec = read_spec(run_dir)
    if (run_dir / SUMMARY_FILE).is_file():
        raise ValueError(
            f"resume: expected an incomplete run, got {str(run_dir)!r}, which is complete. "
            f"Regenerate its figures with: batchnorm lab plot {run_dir}"
        )
    experiment, config = spec.experiment, spec.config
    data = experiment.prepare(config)
    results: dict[int, dict] = {}
    checkpoints: dict[int, dict] = {}
    for seed in range(config.seeds):
        result_path, checkpoint_path = _seed_paths(run_dir, seed)
        if result_path.is_file():
            results[seed] = read_result(result_path, experiment, config, seed)
        elif checkpoint_path.is_file():
            checkpoints[seed] = load_checkpoint(checkpoint_path, experiment, config, seed, data)
    return _execute(
        run_dir,
        experiment,
        config,
        data,
        results,
        checkpoints,
        progress=progress,
        verbose=verbose,
        workers=workers,
    )


def _seed_paths(run_dir: Path, seed: int) -> tuple[Path, Path]:
    return run_dir / "seeds" / f"seed-{seed}.json", run_dir / "checkpoints" / f"seed-{seed}.pt"


def _keep_result(path: Path, result: dict, experiment: Experiment, config: Any, seed: int) -> dict:
    """Check a seed's fresh result, write it atomically and read it back; return what was read.

    Raises:
        ValueError: If the result fails its experiment's check (then nothing is written).
        RunFileError: If the file read back is not the result written.
    """
    try:
        experiment.check_result(config, seed, result)
    except ValueError as err:
        raise ValueError(
            f"{experiment.name}.run_seed(seed={seed}): {err} Not written; the seed's checkpoint "
            "(if any) is kept."
        ) from err
    _write_json(path, result, compact=True)
    return verify_written_result(path, result, experiment, config, seed)


def _execute(
    run_dir: Path,
    experiment: Experiment,
    config: Any,
    data: Any,
    results: dict[int, dict],
    checkpoints: Mapping[int, dict],
    *,
    progress: bool | None,
    verbose: bool,
    workers: int | None = None,
) -> Path:
    """Train the seeds not in ``results`` (those in ``checkpoints`` from there), then write the
    run's summary, metrics, report and figures. ``results`` and ``checkpoints`` have been
    checked already."""
    start = time.perf_counter()
    seeds = list(range(config.seeds))
    steps = experiment.steps_per_seed(config)
    if verbose:
        print(
            f"{experiment.cli_name}: {experiment.title}\n"
            f"  dataset {getattr(config, 'dataset', '-')}, {len(seeds)} seeds x {steps} steps"
            f" -> {run_dir}"
        )
    done_steps = steps * len(results) + sum(int(c["step"]) for c in checkpoints.values())
    if verbose and (results or checkpoints):
        print(
            f"  resuming: {len(results)} seed(s) complete, "
            f"{len(checkpoints)} continuing from a checkpoint"
        )

    bar = _Progress(len(seeds) * steps, done_steps, experiment.cli_name, progress)
    todo = [seed for seed in seeds if seed not in results]
    for seed in seeds:
        if seed in results:
            # Left by an interruption between writing the result and deleting it; the
            # result has been checked, so the checkpoint is no longer needed.
            _seed_paths(run_dir, seed)[1].unlink(missing_ok=True)
    remaining = sum(steps - int(checkpoints.get(s, {}).get("step", 0)) for s in todo)
    if workers is None:
        workers = worth_parallel(remaining, len(todo))
    if verbose and workers > 1 and len(todo) > 1:
        print(f"  {min(workers, len(todo))} seeds at a time, one process each")
    try:
        if workers > 1 and len(todo) > 1:
            _train_in_processes(
                run_dir, experiment, config, todo, checkpoints, results, bar, workers
            )
        else:
            for seed in todo:
                result_path, checkpoint_path = _seed_paths(run_dir, seed)

                def save(state: dict, path: Path = checkpoint_path, seed: int = seed) -> None:
                    _save_torch(path, checkpoint_record(experiment, config, seed, state))

                result = experiment.run_seed(
                    config,
                    data,
                    seed,
                    checkpoint=checkpoints.get(seed),
                    save_checkpoint=save,
                    advance=bar.advance,
                )
                results[seed] = _keep_result(result_path, result, experiment, config, seed)
                checkpoint_path.unlink(missing_ok=True)  # only now: the result is on disk
    except KeyboardInterrupt:
        bar.close()
        print(
            f"interrupted; continue with: batchnorm lab run {experiment.cli_name} "
            f"--resume {run_dir}",
            file=sys.stderr,
        )
        raise
    bar.close()
    with contextlib.suppress(OSError):
        (run_dir / "checkpoints").rmdir()

    summary = experiment.summarize(config, results)
    summary["wall_seconds"] = time.perf_counter() - start
    rows = [row for seed in seeds for row in experiment.metric_rows(results[seed])]
    with atomic_path(run_dir / METRICS_FILE) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, allow_nan=False) + "\n")
    figures = _write_figures(run_dir, experiment, config, results, summary)
    write_text(run_dir / REPORT_FILE, "\n".join(summary["report"]) + "\n")
    # Last: its presence marks the run complete.
    _write_json(run_dir / SUMMARY_FILE, summary)
    if verbose:
        print()
        print("\n".join(summary["report"]))
        print()
        files = [CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, REPORT_FILE, "seeds/"]
        files += [str(p.relative_to(run_dir)) for p in figures]
        print(f"wrote {run_dir}/: {', '.join(files)}")
        print(f"wall time {time.perf_counter() - start:.1f} s")
    return run_dir


# Steps a worker accumulates before reporting them to the progress bar (a queue put per step
# would cost more than a small network's step).
_ADVANCE_BATCH = 50


def _seed_job(
    name: str,
    config: Any,
    seed: int,
    run_dir: str,
    checkpoint: dict | None,
    queue: Any,
) -> dict:
    """One seed in a worker process: its checkpoints are written by the worker, its result is
    returned to the parent, which checks and writes it."""
    experiment = get_experiment(name)
    data = experiment.prepare(config)
    checkpoint_path = _seed_paths(Path(run_dir), seed)[1]
    pending = 0

    def save(state: dict) -> None:
        _save_torch(checkpoint_path, checkpoint_record(experiment, config, seed, state))

    def advance(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= _ADVANCE_BATCH:
            queue.put(pending)
            pending = 0

    result = experiment.run_seed(
        config, data, seed, checkpoint=checkpoint, save_checkpoint=save, advance=advance
    )
    if pending:
        queue.put(pending)
    return result


def _train_in_processes(
    run_dir: Path,
    experiment: Experiment,
    config: Any,
    todo: list[int],
    checkpoints: Mapping[int, dict],
    results: dict[int, dict],
    bar: _Progress,
    workers: int,
) -> None:
    """Train the seeds ``todo`` in spawned worker processes (see :mod:`._parallel`), keeping
    each result as it arrives, in the same way as the serial loop does."""
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        queue = manager.Queue()

        def relay() -> None:
            while (n := queue.get()) is not None:
                bar.advance(n)

        relay_thread = threading.Thread(target=relay, daemon=True)
        relay_thread.start()
        try:
            with ProcessPoolExecutor(
                max_workers=min(workers, len(todo)), mp_context=context
            ) as pool:
                futures = {
                    pool.submit(
                        _seed_job,
                        experiment.cli_name,
                        config,
                        seed,
                        str(run_dir),
                        checkpoints.get(seed),
                        queue,
                    ): seed
                    for seed in todo
                }
                for future in as_completed(futures):
                    seed = futures[future]
                    result_path, checkpoint_path = _seed_paths(run_dir, seed)
                    result = future.result()
                    results[seed] = _keep_result(result_path, result, experiment, config, seed)
                    checkpoint_path.unlink(missing_ok=True)
        finally:
            queue.put(None)
            relay_thread.join(timeout=5)


def _write_figures(
    run_dir: Path, experiment: Experiment, config: Any, results: Mapping[int, dict], summary: dict
) -> list[Path]:
    paths = []
    for name, figure in experiment.plot(config, results, summary).items():
        path = run_dir / "figures" / f"{name}.png"
        _save_figure(path, figure)
        paths.append(path)
    return paths


# --- reading runs back ------------------------------------------------------------------------


class LoadedRun:
    """A run directory read back: its experiment, config, completed seeds and summary.

    Attributes:
        run_dir: The directory.
        experiment: The :class:`~batchnorm.lab.registry.Experiment`.
        config: The configuration it ran with.
        preset: The preset it started from.
        results: Seed -> result, for the completed seeds.
        summary: ``summary.json`` if the run is complete, else ``None``.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        spec = read_spec(run_dir)
        self.experiment = spec.experiment
        self.config = spec.config
        self.preset = spec.preset
        self.results = {}
        for seed in range(self.config.seeds):
            path = _seed_paths(run_dir, seed)[0]
            if path.is_file():
                self.results[seed] = read_result(path, self.experiment, self.config, seed)
        self.summary = read_summary(run_dir / SUMMARY_FILE)

    @property
    def complete(self) -> bool:
        """Whether every seed finished and the summary was written."""
        return self.summary is not None


def load_run(run_dir: str | Path) -> LoadedRun:
    """Read a run directory back (complete or not), checking each file it reads.

    Raises:
        FileNotFoundError: If ``run_dir`` has no ``config.json``.
        RunFileError: If ``config.json``, a seed's result or ``summary.json`` is damaged; the
            message names the file.
    """
    return LoadedRun(Path(run_dir))


def plot_run(run_dir: str | Path, *, verbose: bool = True) -> list[Path]:
    """Regenerate a run's figures from its saved results alone (no training).

    An incomplete run is plotted from its completed seeds.

    Returns:
        The paths of the figures written.

    Raises:
        FileNotFoundError: If ``run_dir`` has no ``config.json``.
        RunFileError: If a file of the run is damaged; the message names it.
        ValueError: If no seed of the run has completed.
    """
    run = load_run(run_dir)
    if not run.results:
        raise ValueError(
            f"lab plot: expected at least one completed seed in {str(run.run_dir)!r}, got none "
            f"yet. Continue the run with: batchnorm lab run {run.experiment.cli_name} "
            f"--resume {run.run_dir}"
        )
    summary = run.summary
    if summary is None or sorted(run.results) != summary.get("seeds"):
        summary = run.experiment.summarize(run.config, run.results)
    paths = _write_figures(run.run_dir, run.experiment, run.config, run.results, summary)
    if verbose:
        seeds = len(run.results)
        note = "" if run.complete else f" (incomplete run: {seeds} of {run.config.seeds} seeds)"
        for path in paths:
            print(f"wrote {path}{note}")
    return paths
