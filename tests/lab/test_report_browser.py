"""The HTML report as a person sees it: opened from disk in headless Chromium.

Needs Debian's chromium and chromium-driver (``bash scripts/setup_browser.sh``, which
``scripts/test.sh`` runs). Without them this test fails, naming that script, rather than
skipping: a skipped test would let a broken report through CI unseen.
"""

from __future__ import annotations

import struct

from batchnorm.lab.report import write_report

from ._browser import inspect_report
from .test_report import OLD_ROW, PNG_SIGNATURE, make_run_dir, new_row


def test_report_html_renders_every_figure_and_the_claims_table(tmp_path):
    out = tmp_path / "lab"
    runs = [
        make_run_dir(
            out,
            "figure1",
            [new_row(), OLD_ROW],
            {"figure1": "BN's accuracy rises first.", "stability": None},
        ),
        make_run_dir(
            out,
            "population",
            [new_row((0.7, 0.2, 0.9, 0.8, 0.6))],
            {"population": "The exact statistics sit on the dashed line."},
        ),
    ]
    html_path, _ = write_report(out, runs, preset="tiny")
    # Kept with the run: the issue asks for a screenshot beside the report.
    screenshot = html_path.with_name("report.png")

    seen = inspect_report(html_path, screenshot)

    figures = sum(len(list((run / "figures").glob("*.png"))) for run in runs)
    assert len(seen["images"]) >= figures == 3
    for src, width, complete in seen["images"]:
        assert src.startswith("data:image/png;base64,"), src
        assert complete and width > 0, f"image {src}... did not load (naturalWidth {width})"
    assert seen["severe"] == []
    assert seen["tables"] == 1
    assert seen["table_rows"] == [3] and seen["tables_shown"] == [True]
    assert seen["title"].startswith("Batch normalization lab")
    # Escaped text reads as written, not as markup.
    assert "BN <b>& friends</b> train faster" in seen["text"]
    assert "not held" in seen["text"]

    head = screenshot.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 0 and height > 0
    assert screenshot.stat().st_size > 10_000  # a page with three plots, not a blank image
