"""``batchnorm lab run all``: every experiment at one preset into one directory, then one report.

``OUT/<experiment>/<stamp>/`` holds each experiment's run (as ``batchnorm lab run`` writes it);
``OUT/report.html`` (one self-contained file) and ``OUT/summary.md`` (the claims table first)
are written by :func:`batchnorm.lab.report.write_report`. Running the same command again with
the same ``OUT`` continues: a complete run of the preset is kept, an interrupted one resumed
from its checkpoints, a missing one started.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._run_files import RunFileError, read_spec
from .registry import EXPERIMENTS
from .runner import SUMMARY_FILE, resume_run, run_experiment

__all__ = ["SuiteResult", "run_all"]


@dataclass(frozen=True)
class SuiteResult:
    """What :func:`run_all` wrote: the report, its Markdown twin, the runs and the claims."""

    html: Path
    markdown: Path
    run_dirs: dict[str, Path]
    seconds: dict[str, float]
    claims: list[dict]


def _existing(out: Path, name: str, preset: str) -> tuple[Path | None, bool]:
    """The newest run of ``name`` at ``preset`` under ``out``, and whether it is complete."""
    parent = out / name
    if not parent.is_dir():
        return None, False
    for run_dir in sorted((d for d in parent.iterdir() if d.is_dir()), reverse=True):
        try:
            spec = read_spec(run_dir)
        except (RunFileError, FileNotFoundError):
            continue
        if spec.preset == preset:
            return run_dir, (run_dir / SUMMARY_FILE).is_file()
    return None, False


def run_all(
    preset: str,
    out: str | Path,
    *,
    workers: int | None = None,
    progress: bool | None = None,
    verbose: bool = True,
    log: Callable[[str], None] | None = None,
) -> SuiteResult:
    """Run (or continue) every experiment at ``preset`` under ``out``; write the report.

    ``verbose`` lets the runner print each run's report; ``log`` receives a line for each
    complete run that is kept.

    Raises:
        ValueError: If an experiment has no such preset.
    """
    from .report import write_report

    out = Path(out)
    missing = [e.cli_name for e in EXPERIMENTS.values() if preset not in e.presets]
    if missing:
        raise ValueError(
            f"lab run all: expected a preset every experiment has, got {preset!r}, which "
            f"{', '.join(missing)} lacks."
        )
    run_dirs, seconds, claims = {}, {}, []
    for experiment in EXPERIMENTS.values():
        start = time.perf_counter()
        found, complete = _existing(out, experiment.name, preset)
        if found is not None and complete:
            if log is not None:
                log(f"{experiment.cli_name}: complete run kept: {found}")
            run_dir = found
        elif found is not None:
            run_dir = resume_run(found, progress=progress, verbose=verbose, workers=workers)
        else:
            run_dir = run_experiment(
                experiment.cli_name,
                preset=preset,
                out=out,
                progress=progress,
                verbose=verbose,
                workers=workers,
            )
        run_dirs[experiment.name] = run_dir
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        seconds[experiment.name] = float(summary.get("wall_seconds", time.perf_counter() - start))
        claims += [{"experiment": experiment.name, **row} for row in summary.get("claims", [])]
    html, markdown = write_report(out, list(run_dirs.values()), preset=preset, seconds=seconds)
    return SuiteResult(html, markdown, run_dirs, seconds, claims)
