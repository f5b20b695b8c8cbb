"""``batchnorm lab run all``: every experiment's tiny preset, one report, seen in a browser.

This is the report CI builds for real (not a synthetic one): the README's main job at its
smallest preset, opened in headless Chromium.
"""

from __future__ import annotations

import json

import pytest

from batchnorm.lab import suite
from batchnorm.lab.registry import EXPERIMENTS

from ._browser import inspect_report


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    return suite.run_all("tiny", out, progress=False, verbose=False)


def test_every_experiment_runs_and_its_claims_reach_the_report(tiny_suite):
    assert set(tiny_suite.run_dirs) == set(EXPERIMENTS)
    rules = [(name, rule.key) for name, e in EXPERIMENTS.items() for rule in e.rules]
    got = [(row["experiment"], row["key"]) for row in tiny_suite.claims]
    # Every declared rule was judged (a rule may be left out only when not measured).
    assert set(got) <= set(rules) and len(got) >= len(EXPERIMENTS)
    markdown = tiny_suite.markdown.read_text()
    table_at = markdown.index("| experiment | claim |")
    assert table_at < markdown.index("![")  # the claims table comes before any figure
    for row in tiny_suite.claims:
        assert row["verdict"] in ("held", "not held", "inconclusive")
    for name, run_dir in tiny_suite.run_dirs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary.get("epochs") is None or summary["epochs"] > 0, name
        assert set(summary["figure_notes"]) <= {p.stem for p in (run_dir / "figures").iterdir()}


def test_the_real_report_renders_in_a_browser(tiny_suite):
    screenshot = tiny_suite.html.with_name("report.png")
    seen = inspect_report(tiny_suite.html, screenshot)
    figures = sum(len(list((d / "figures").glob("*.png"))) for d in tiny_suite.run_dirs.values())
    assert len(seen["images"]) >= figures > 0
    for src, width, complete in seen["images"]:
        assert src.startswith("data:image/png;base64,")
        assert complete and width > 0
    assert seen["severe"] == []
    assert seen["table_rows"][0] == len(tiny_suite.claims)
    assert screenshot.stat().st_size > 10_000
