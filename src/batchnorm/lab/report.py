"""The lab's report over several runs: one self-contained HTML file and its Markdown twin.

``batchnorm lab run all`` runs every experiment into ``<out>/<experiment>/<stamp>/`` and then
calls :func:`write_report`, which reads each run directory back and writes

- ``<out>/summary.md``: the claims table first, then per experiment its report lines and its
  figures as relative image links (GitHub renders it in place);
- ``<out>/report.html``: the same content in one file that needs nothing else: the figures are
  embedded as ``data:image/png;base64`` URIs, the style is inline CSS, there is no JavaScript
  and no URL outside the file, so it reads the same offline, attached to an issue or mailed.

Both are written atomically. Rows of ``summary.json`` written before the protocol of
:mod:`batchnorm.lab.protocol` (no ``"verdict"``) are read as well: ``held`` becomes the
verdict, and what they lack is shown as an em dash.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._atomic import write_text
from ._run_files import CONFIG_FILE, read_json, read_summary
from .protocol import MIN_SEEDS_FOR_RECORD
from .registry import get_experiment

__all__ = ["HTML_FILE", "MARKDOWN_FILE", "claims_table_markdown", "write_report"]

HTML_FILE = "report.html"
MARKDOWN_FILE = "summary.md"

_MISSING = "—"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLUMNS = (
    "experiment",
    "claim",
    "published anchor",
    "what was measured",
    "effect (mean ± std, unit) vs threshold",
    "seeds agreeing",
    "verdict",
)


# --- one claim row, in words --------------------------------------------------------------------


def _real(value: Any) -> float | None:
    """``value`` if it is a finite number (JSON gives int or float; a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _number(value: Any) -> str:
    """A measured number for people: three significant digits, thousands separated."""
    value = _real(value)
    if value is None:
        return _MISSING
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _text(value: Any) -> str:
    """A text field on one line, or the em dash when it is missing or empty."""
    if value is None:
        return _MISSING
    text = " ".join(str(value).split())
    return text or _MISSING


def _verdict(row: Mapping[str, Any]) -> str:
    verdict = row.get("verdict")
    if isinstance(verdict, str) and verdict:
        return verdict
    # Rows written before the protocol carry only the boolean.
    held = row.get("held")
    if isinstance(held, bool):
        return "held" if held else "not held"
    return _MISSING


def _seed_count(row: Mapping[str, Any]) -> int | None:
    seeds = row.get("seeds")
    if isinstance(seeds, list):
        return len(seeds)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return seeds
    return None


def _for_record_note(row: Mapping[str, Any]) -> str:
    """``" (n seeds: not for the record)"`` for a verdict of too few seeds, else ``""``."""
    n = _seed_count(row)
    for_record = row.get("for_record")
    if not isinstance(for_record, bool):
        # Old rows do not say; the rule is the protocol's, so it can be applied to them too.
        if n is None:
            return ""
        for_record = n >= MIN_SEEDS_FOR_RECORD
    if for_record:
        return ""
    return f" ({n if n is not None else _MISSING} seeds: not for the record)"


@dataclass(frozen=True)
class _Cells:
    """One row of the claims table as plain text, before Markdown or HTML escaping."""

    experiment: str
    claim: str
    anchor: str
    measured: str
    effect: str
    agreeing: str
    verdict: str
    note: str

    def columns(self) -> tuple[str, ...]:
        return (
            self.experiment,
            self.claim,
            self.anchor,
            self.measured,
            self.effect,
            self.agreeing,
        )


def _cells(row: Mapping[str, Any]) -> _Cells:
    measured = _text(row.get("measured"))
    if measured == _MISSING:
        # An old row, or a rule whose numbers were not put in words: the measure at least
        # says what the effect is.
        measured = _text(row.get("measure"))
    unit = _text(row.get("unit"))
    mean, std, threshold = row.get("mean"), row.get("std"), row.get("threshold")
    if _number(mean) == _MISSING:
        effect = _MISSING
    else:
        effect = f"{_number(mean)} ± {_number(std)}"
        if unit != _MISSING:
            effect += f" {unit}"
    if _number(threshold) != _MISSING:
        effect += f" vs > {_number(threshold)}"
    # Old rows counted the seeds that held as "seeds_held": the same count as "above".
    above = row.get("above", row.get("seeds_held"))
    n = _seed_count(row)
    agreeing = (
        f"{_number(above)} of {_number(n)} above ({_number(row.get('needed'))} needed); "
        f"sign-test p = {_number(row.get('p_sign'))}"
    )
    return _Cells(
        experiment=_text(row.get("experiment")),
        claim=_text(row.get("claim")),
        anchor=_text(row.get("anchor")),
        measured=measured,
        effect=effect,
        agreeing=agreeing,
        verdict=_verdict(row),
        note=_for_record_note(row),
    )


def _markdown_text(text: str) -> str:
    # GitHub renders inline HTML, so a "<" in a claim would start a tag; a backslash before it
    # (or before a pipe, below) makes it a literal character, so literal backslashes are doubled.
    return text.replace("\\", "\\\\").replace("<", "\\<")


def _markdown_cell(text: str) -> str:
    # A pipe would end the table cell.
    return _markdown_text(text).replace("|", "\\|")


def claims_table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The claims of one or more runs as a GitHub Markdown table, one row per claim.

    Columns: experiment, claim, published anchor, what was measured, the effect (mean ± std
    over seeds, with its unit) against its threshold, how many seeds agreed (seeds above the
    threshold of all seeds, how many were needed, the sign test's p-value), and the verdict in
    bold, followed by ``(n seeds: not for the record)`` when fewer than
    :data:`~batchnorm.lab.protocol.MIN_SEEDS_FOR_RECORD` seeds ran.

    Args:
        rows: ``summary.json`` claim rows (:meth:`~batchnorm.lab.protocol.Verdict.to_dict`),
            each with an added ``"experiment"`` key. A field a row lacks (a row written before
            the protocol) shows as ``—``; such a row's ``held`` stands for its verdict.

    Returns:
        The table, lines joined by ``\\n``, without a trailing newline.
    """
    lines = [
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---" for _ in _COLUMNS) + "|",
    ]
    for row in rows:
        cells = _cells(row)
        columns = [_markdown_cell(c) for c in cells.columns()]
        columns.append(f"**{_markdown_cell(cells.verdict)}**{_markdown_cell(cells.note)}")
        lines.append("| " + " | ".join(columns) + " |")
    return "\n".join(lines)


# --- reading the runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Figure:
    name: str
    path: Path
    data: bytes
    note: str | None


@dataclass(frozen=True)
class _Run:
    """What the report shows of one run directory."""

    run_dir: Path
    name: str
    title: str
    claim: str | None
    preset: str
    seeds: int | None
    epochs: float | None
    seconds: float | None
    environment: Mapping[str, Any]
    rows: list[dict[str, Any]]
    report: list[str]
    figures: list[_Figure]


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _read_run(run_dir: Path, seconds: Mapping[str, float] | None) -> _Run:
    where = "write_report()"
    if not run_dir.is_dir():
        raise ValueError(f"{where}: expected a run directory, got {str(run_dir)!r}.")
    summary = read_summary(run_dir / "summary.json")
    if summary is None:
        raise ValueError(
            f"{where}: expected a complete run directory (with summary.json), got "
            f"{str(run_dir)!r}, which has none: the run is incomplete. Resume it with "
            f"batchnorm lab run <experiment> --resume {run_dir}"
        )
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"{where}: expected a run directory with {CONFIG_FILE}, got {str(run_dir)!r}, "
            "which has none."
        )
    spec = read_json(config_path, "the JSON object batchnorm lab run writes as config.json")
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a JSON object in {config_path}, got {spec!r:.60}.")

    name = str(_first(spec.get("experiment"), summary.get("experiment"), run_dir.parent.name))
    try:
        experiment = get_experiment(name.replace("_", "-"))
    except ValueError:
        experiment = None  # an experiment since renamed or removed: its files still say enough
    title = _first(summary.get("title"), experiment and experiment.title, name)
    claim = _first(summary.get("claim"), experiment and experiment.claim)

    config = spec.get("config")
    if not isinstance(config, dict):
        config = {}
    seeds = config.get("seeds")
    if not isinstance(seeds, int) or isinstance(seeds, bool):
        listed = summary.get("seeds")
        seeds = len(listed) if isinstance(listed, list) else None
    epochs = summary.get("epochs")
    wall = None
    if seconds is not None:
        wall = _first(seconds.get(name), seconds.get(name.replace("_", "-")))
    wall = _first(wall, summary.get("wall_seconds"))

    claims = summary.get("claims")
    claims = claims if isinstance(claims, list) else []
    rows = [{**row, "experiment": name} for row in claims if isinstance(row, dict)]
    report = summary.get("report")
    report = [str(line) for line in report] if isinstance(report, list) else []
    notes = summary.get("figure_notes")
    notes = notes if isinstance(notes, dict) else {}

    figures = []
    for path in sorted((run_dir / "figures").glob("*.png")):
        data = path.read_bytes()
        if not data.startswith(_PNG_SIGNATURE):
            # Embedded as image/png it would show as a broken image: say which file instead.
            raise ValueError(
                f"{where}: expected a PNG image in {path}, got {len(data)} bytes that are not "
                f"one. Regenerate the figures with: batchnorm lab plot {run_dir}"
            )
        note = notes.get(path.stem)
        figures.append(_Figure(path.stem, path, data, str(note) if note else None))

    environment = spec.get("environment")
    return _Run(
        run_dir=run_dir,
        name=name,
        title=str(title),
        claim=None if claim is None else str(claim),
        preset=str(_first(spec.get("preset"), _MISSING)),
        seeds=seeds,
        epochs=_real(epochs),
        seconds=_real(wall),
        environment=environment if isinstance(environment, dict) else {},
        rows=rows,
        report=report,
        figures=figures,
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return _MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _facts(run: _Run) -> str:
    """The line under an experiment's heading: preset, seeds, epochs, wall time, versions."""
    parts = [f"preset {run.preset}", f"{_number(run.seeds)} seeds"]
    if run.epochs is not None:  # a sweep of many short networks states its own lengths
        parts.append(f"{_number(run.epochs)} epochs of training data per network")
    parts.append(f"wall time {_duration(run.seconds)}")
    versions = [f"{k} {run.environment[k]}" for k in ("batchnorm", "torch") if k in run.environment]
    if versions:
        parts.append(", ".join(versions))
    return " · ".join(parts)


# --- writing ------------------------------------------------------------------------------------


def _relative_link(path: Path, out_dir: Path) -> str:
    relative = Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()
    return urllib.parse.quote(relative)


def _markdown(runs: Sequence[_Run], out_dir: Path, preset: str) -> str:
    lines = [
        "# Batch normalization lab: the claims and the evidence",
        "",
        f"Preset: `{preset}` · {len(runs)} experiment{'s' if len(runs) != 1 else ''}",
        "",
        claims_table_markdown([row for run in runs for row in run.rows]),
    ]
    for run in runs:
        title = _markdown_text(f"{run.name}: {_text(run.title)}")
        lines += ["", f"## {title}", "", _markdown_text(_facts(run)), ""]
        if run.claim:
            lines += [f"Claim: {_markdown_text(_text(run.claim))}", ""]
        # A fence longer than any run of backticks in the lines keeps them inside the block.
        longest = max((len(m) for line in run.report for m in re.findall(r"`+", line)), default=0)
        fence = "`" * max(3, longest + 1)
        lines += [fence + "text", *run.report, fence]
        for figure in run.figures:
            alt = figure.name.replace("[", "(").replace("]", ")")
            lines += ["", f"![{alt}]({_relative_link(figure.path, out_dir)})"]
            if figure.note:
                lines += ["", _markdown_text(_text(figure.note))]
    return "\n".join(lines) + "\n"


_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
       max-width: 1200px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; margin-top: 2.2em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 0.35em 0.55em; text-align: left;
         vertical-align: top; }
th { background: #f6f8fa; }
td.verdict { font-weight: bold; white-space: nowrap; }
.held { background: #dafbe1; color: #116329; }
.not-held { background: #ffebe9; color: #a40e26; }
.inconclusive { background: #eaeef2; color: #57606a; }
.note { font-weight: normal; font-size: 0.85em; white-space: normal; }
.facts { color: #57606a; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { margin-top: 0.3em; }
"""


def _verdict_class(verdict: str) -> str:
    return {"held": "held", "not held": "not-held", "inconclusive": "inconclusive"}.get(verdict, "")


def _html(runs: Sequence[_Run], preset: str) -> str:
    e = html.escape
    title = "Batch normalization lab: the claims and the evidence"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)} ({e(preset)})</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="facts">Preset: <code>{e(preset)}</code> · {len(runs)} '
        f"experiment{'s' if len(runs) != 1 else ''}</p>",
        '<table class="claims">',
        "<thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in _COLUMNS) + "</tr></thead>",
        "<tbody>",
    ]
    for index, run in enumerate(runs):
        for row in run.rows:
            cells = _cells(row)
            columns = list(cells.columns())
            tds = [f'<td><a href="#run-{index}">{e(columns[0])}</a></td>']
            tds += [f"<td>{e(c)}</td>" for c in columns[1:]]
            note = f' <span class="note">{e(cells.note.strip())}</span>' if cells.note else ""
            css = " ".join(filter(None, ["verdict", _verdict_class(cells.verdict)]))
            tds.append(f'<td class="{css}">{e(cells.verdict)}{note}</td>')
            parts.append("<tr>" + "".join(tds) + "</tr>")
    parts.append("</tbody></table>")
    for index, run in enumerate(runs):
        parts += [
            f'<section id="run-{index}">',
            f"<h2>{e(run.name)}: {e(_text(run.title))}</h2>",
            f'<p class="facts">{e(_facts(run))}</p>',
        ]
        if run.claim:
            parts.append(f"<p>Claim: {e(_text(run.claim))}</p>")
        parts.append("<pre>" + e("\n".join(run.report)) + "</pre>")
        for figure in run.figures:
            uri = "data:image/png;base64," + base64.b64encode(figure.data).decode("ascii")
            parts.append(f'<figure><img src="{uri}" alt="{e(run.name)}: {e(figure.name)}">')
            if figure.note:
                parts.append(f"<figcaption>{e(_text(figure.note))}</figcaption>")
            parts.append("</figure>")
        parts.append("</section>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_report(
    out_dir: str | Path,
    run_dirs: Sequence[str | Path],
    *,
    preset: str,
    seconds: Mapping[str, float] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``summary.md`` over the runs in ``run_dirs``.

    Every run directory is read and checked before either file is written. Both files carry
    the claims table of all the runs first, then each experiment in the order given: its
    title, a line with preset, seeds, epochs of training data per network (when the experiment
    states them) and wall time, the experiment's printed report, and each figure followed by its
    ``figure_notes`` sentence. ``summary.md`` links the figures relative to ``out_dir``;
    ``report.html`` embeds them, so it is the one file to keep or send.

    Args:
        out_dir: Where both files are written (made if missing); normally the directory the
            runs are under.
        run_dirs: Complete run directories (``<out>/<experiment>/<stamp>/``).
        preset: The preset the runs used, for the title.
        seconds: Optional experiment name -> wall seconds to show; an experiment not in it
            shows its summary's ``wall_seconds``.

    Returns:
        ``(html_path, md_path)``.

    Raises:
        ValueError: If ``run_dirs`` is empty, a run directory has no ``summary.json`` (an
            incomplete run) or no ``config.json``, one of them is not valid JSON (a
            :class:`~batchnorm.lab.RunFileError` naming the file), or a figure is not a PNG.
            Nothing is written then.
    """
    if not run_dirs:
        raise ValueError("write_report(): expected at least one run directory, got none.")
    out_dir = Path(out_dir)
    runs = [_read_run(Path(d), seconds) for d in run_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out_dir / HTML_FILE, out_dir / MARKDOWN_FILE
    write_text(md_path, _markdown(runs, out_dir, preset))
    write_text(html_path, _html(runs, preset))
    return html_path, md_path
