"""The report over several runs: the claims table, summary.md and the self-contained HTML.

Runs are synthetic directories written here (config.json, summary.json, figures/*.png), so
the tests check the report's reading and writing, not any experiment. One claim row is made by
the protocol itself (:meth:`Rule.judge`), one is in the format written before the protocol.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from batchnorm.lab import protocol, registry
from batchnorm.lab.report import claims_table_markdown, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ESCAPE_CLAIM = "BN <b>& friends</b> train faster"

RULE = protocol.Rule(
    key="speed",
    claim=ESCAPE_CLAIM,
    anchor="Ioffe & Szegedy 2015, Fig. 1(a)",
    measure="steps without BN / steps with BN - 1",
    unit="x",
    threshold=0.5,
)
OLD_ROW = {
    "claim": "BN's sigmoid inputs are more stable",
    "measure": "mean percentile range over seeds",
    "baseline": 4.6,
    "bn": 3.2,
    "held": False,
    "seeds_held": 1,
    "seeds": 3,
}


MEASURED = "steps to target: without BN 4,200, with BN 1,100 (means)"


def new_row(effects=(2.8, 3.1, 2.5)) -> dict:
    return RULE.judge(list(effects)).to_dict(measured=MEASURED)


def save_png(path: Path, label: str) -> None:
    figure = Figure(figsize=(2.0, 1.5), dpi=50)
    ax = figure.add_subplot()
    ax.plot([0, 1, 2], [0, 1, 4])
    ax.set_title(label)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")


def make_run_dir(
    out: Path,
    name: str,
    claims: list[dict],
    figures: dict[str, str | None],
    *,
    stamp: str = "20260101-120000",
    title: str | None = None,
    epochs: float | None = 1.5,
    complete: bool = True,
) -> Path:
    """Write a synthetic run of ``name`` under ``out``; ``figures``: name -> note (or None)."""
    run_dir = out / name / stamp
    run_dir.mkdir(parents=True)
    seeds = max((row.get("seeds", 1) for row in claims), default=1)
    config = {
        "experiment": name,
        "preset": "tiny",
        "config": {"seeds": seeds, "steps": 40},
        "created": "2026-01-01T12:00:00+0000",
        "environment": {"batchnorm": "0.1.0", "torch": "2.13.0+cpu", "python": "3.11.7"},
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    for figure in figures:
        save_png(run_dir / "figures" / f"{figure}.png", figure)
    if complete:
        summary = {
            "experiment": name,
            "claims": claims,
            "report": [f"{name} report", "  without BN 4,200 ± 300  with BN 1,100 ± 90"],
            "figure_notes": {k: v for k, v in figures.items() if v is not None},
            "wall_seconds": 12.5,
        }
        if title is not None:
            summary["title"] = title
        if epochs is not None:
            summary["epochs"] = epochs
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, list[Path]]:
    out = tmp_path / "lab"
    runs = [
        make_run_dir(
            out,
            "figure1",
            [new_row(), OLD_ROW],
            {"figure1": "Left: test accuracy; BN's curve rises first.", "stability": None},
        ),
        make_run_dir(
            out,
            "population",
            [new_row((0.7, 0.2, 0.9, 0.8, 0.6))],
            {"population": "The exact statistics sit on the dashed line."},
            title="Population statistics at inference",
            epochs=None,
        ),
    ]
    return out, runs


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_claims_table_markdown_has_one_row_per_claim_with_bold_verdicts():
    rows = [{**new_row(), "experiment": "figure1"}, {**OLD_ROW, "experiment": "figure1"}]
    lines = claims_table_markdown(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| experiment | claim | published anchor | what was measured |")
    assert set(lines[1]) <= {"|", "-"}
    first = lines[2]
    assert lines[3].startswith("| figure1 | BN's sigmoid inputs are more stable |")
    # 3 of 3 seeds above 0.5, but 3 < MIN_SEEDS_FOR_RECORD seeds.
    assert "**held** (3 seeds: not for the record) |" in first
    assert "Ioffe & Szegedy 2015, Fig. 1(a)" in first
    assert MEASURED in first
    assert "2.8 ± 0.3 x vs > 0.5" in first
    assert "3 of 3 above (3 needed); sign-test p = 0.25" in first


def test_claims_table_markdown_reads_old_rows_without_verdict():
    line = claims_table_markdown([{**OLD_ROW, "experiment": "figure1"}]).splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split(" | ")]
    assert cells[0] == "figure1"
    assert cells[2] == "—"  # no anchor
    assert cells[3] == "mean percentile range over seeds"  # the measure stands in
    assert cells[4] == "—"  # no effect
    assert cells[5] == "1 of 3 above (— needed); sign-test p = —"
    assert cells[6] == "**not held** (3 seeds: not for the record)"
    assert "**—**" in claims_table_markdown([{"experiment": "x"}])


def test_claims_table_markdown_marks_no_note_for_a_record_verdict():
    row = {**new_row((0.7, 0.9, 0.8, 0.6, 1.0)), "experiment": "population"}
    assert row["for_record"]
    assert claims_table_markdown([row]).splitlines()[2].endswith("| **held** |")


def test_claims_table_markdown_escapes_pipes_and_tags():
    row = {**new_row(), "experiment": "figure1", "claim": "a | b <i>"}
    line = claims_table_markdown([row]).splitlines()[2]
    assert "a \\| b \\<i>" in line
    assert line.count(" | ") == 6  # seven cells, no extra column


def test_write_report_md_starts_with_the_claims_table(two_runs):
    out, runs = two_runs
    html_path, md_path = write_report(out, runs, preset="tiny", seconds={"figure1": 75.0})
    assert (html_path, md_path) == (out / "report.html", out / "summary.md")
    lines = md_path.read_text().splitlines()
    assert lines[0].startswith("# ")
    assert "`tiny`" in lines[2]
    assert lines[4].startswith("| experiment |")  # the first thing after title and preset
    assert len(table_lines(md_path.read_text())) == 2 + 3
    assert "## figure1: " + registry.get_experiment("figure1").title in lines
    assert "## population: Population statistics at inference" in lines
    text = md_path.read_text()
    facts = "preset tiny · 3 seeds · 1.5 epochs of training data per network · wall time 1 min 15 s"
    assert facts in text
    assert "5 seeds · wall time 12.5 s" in text  # no epochs stated: none printed
    assert "```text\nfigure1 report\n" in text


def test_write_report_md_links_figures_relative_with_their_notes(two_runs):
    out, runs = two_runs
    _, md_path = write_report(out, runs, preset="tiny")
    lines = md_path.read_text().splitlines()
    links = [re.fullmatch(r"!\[(.*)\]\((.*)\)", line) for line in lines]
    links = [m.group(2) for m in links if m]
    assert links == [
        "figure1/20260101-120000/figures/figure1.png",
        "figure1/20260101-120000/figures/stability.png",
        "population/20260101-120000/figures/population.png",
    ]
    assert all((out / link).is_file() for link in links)
    at = lines.index(f"![figure1]({links[0]})")
    assert lines[at + 2] == "Left: test accuracy; BN's curve rises first."
    at = lines.index(f"![stability]({links[1]})")  # no note: the next section follows
    assert lines[at + 1 : at + 3] == ["", "## population: Population statistics at inference"]


def test_write_report_html_is_self_contained(two_runs):
    out, runs = two_runs
    html_path, _ = write_report(out, runs, preset="tiny")
    page = html_path.read_text()
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower() and "url(" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 == page.count('src="')
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    figure_files = [p for run in runs for p in sorted((run / "figures").glob("*.png"))]
    embedded = [base64.b64decode(s.split(",", 1)[1]) for s in sources]
    assert embedded == [p.read_bytes() for p in figure_files]
    assert all(data.startswith(PNG_SIGNATURE) for data in embedded)
    assert "<figcaption>Left: test accuracy; BN&#x27;s curve rises first.</figcaption>" in page
    assert page.count("<figcaption>") == 2  # the figure without a note has no sentence


def test_write_report_html_colours_verdicts(two_runs):
    out, runs = two_runs
    page = write_report(out, runs, preset="tiny")[0].read_text()
    cells = [(c, v.strip()) for c, v in re.findall(r'<td class="verdict ([a-z-]+)">([^<]*)', page)]
    # figure1: 3 seeds, all above -> held; the old row held False; population: 4 of 5 above.
    assert cells == [("held", "held"), ("not-held", "not held"), ("held", "held")]
    assert page.count("<tr>") == 1 + 3
    assert ".held {" in page and ".not-held {" in page and ".inconclusive {" in page


def test_write_report_escapes_text(two_runs):
    out, runs = two_runs
    html_path, md_path = write_report(out, runs, preset="<tiny>")
    page = html_path.read_text()
    assert "<b>" not in page and "& friends" not in page
    assert html.escape(ESCAPE_CLAIM) in page
    assert "&lt;tiny&gt;" in page
    assert "BN \\<b>& friends\\</b> train faster" in md_path.read_text()


def test_write_report_leaves_no_temporary_files(two_runs):
    out, runs = two_runs
    write_report(out, runs, preset="tiny")
    write_report(out, runs, preset="tiny")  # over the first report
    assert sorted(p.name for p in out.iterdir()) == [
        "figure1",
        "population",
        "report.html",
        "summary.md",
    ]


def test_write_report_rejects_an_incomplete_run_before_writing(tmp_path, two_runs):
    out, runs = two_runs
    incomplete = make_run_dir(
        out, "figure1", [new_row()], {}, stamp="20260102-090000", complete=False
    )
    expected = r"^write_report\(\): expected a complete run directory \(with summary.json\), got "
    with pytest.raises(ValueError, match=expected + r".*20260102-090000"):
        write_report(out, [*runs, incomplete], preset="tiny")
    assert not (out / "report.html").exists() and not (out / "summary.md").exists()


def test_write_report_rejects_no_runs(tmp_path):
    with pytest.raises(ValueError, match=r"expected at least one run directory, got none\."):
        write_report(tmp_path, [], preset="tiny")
