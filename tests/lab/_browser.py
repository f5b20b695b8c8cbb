"""Open an HTML report in headless Chromium and report what a person would see.

Uses Debian's ``chromium`` and ``chromium-driver`` (``bash scripts/setup_browser.sh`` installs
them) through Selenium. Both paths are passed to Selenium explicitly, so Selenium Manager has
nothing to look up and never tries to download a browser or a driver: this machine, CI's
included, reaches no host but the package registries.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

__all__ = ["SETUP_HINT", "browser_paths", "inspect_report"]

SETUP_HINT = "Install them with: bash scripts/setup_browser.sh"
# Headless Chromium caps a screenshot at about 16k pixels a side; a longer page is cut there.
MAX_SCREENSHOT_HEIGHT = 16_000
WINDOW_WIDTH = 1280


def browser_paths() -> tuple[str, str]:
    """``(chromium, chromedriver)`` executables.

    Raises:
        RuntimeError: If either is missing; the message names ``scripts/setup_browser.sh``.
    """
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None
    )
    missing = [
        name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path
    ]
    if missing:
        raise RuntimeError(
            f"browser test: expected chromium and chromedriver on PATH, got no "
            f"{' and no '.join(missing)}. {SETUP_HINT}"
        )
    return chromium, driver


def _driver() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ModuleNotFoundError as err:
        raise RuntimeError(
            "browser test: expected the selenium package (the test extra), got none. "
            "Run: bash scripts/setup.sh"
        ) from err
    chromium, chromedriver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start;
    # --disable-dev-shm-usage: a container's small /dev/shm would crash the renderer.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={WINDOW_WIDTH},900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(60)
    return driver


# Run in the page: every image's state, and each table's body rows and whether it is shown.
_IMAGES_JS = """
return Array.from(document.images).map(
    img => [img.getAttribute('src') || '', img.naturalWidth, img.complete]);
"""
_TABLES_JS = """
return Array.from(document.querySelectorAll('table')).map(t => {
    const box = t.getBoundingClientRect();
    const shown = getComputedStyle(t).visibility !== 'hidden' && box.width > 0 && box.height > 0;
    return [t.querySelectorAll('tbody tr').length, shown];
});
"""


def inspect_report(html_path: Path, screenshot: Path) -> dict[str, Any]:
    """Load ``html_path`` from its ``file://`` URL in headless Chromium and save a screenshot.

    The window is made as tall as the page (up to :data:`MAX_SCREENSHOT_HEIGHT`) before the
    screenshot, so it shows the whole report, not only its first screen.

    Args:
        html_path: The report.
        screenshot: Where the PNG screenshot is written.

    Returns:
        A dict with
        ``"images"``: ``(src_prefix, natural_width, complete)`` per ``<img>``, the prefix being
        the first 30 characters of ``src`` (a ``naturalWidth`` of 0 is an image that did not
        load or decode);
        ``"severe"``: the messages of the browser console's SEVERE entries;
        ``"tables"``: the number of ``<table>`` elements;
        ``"table_rows"`` and ``"tables_shown"``: per table, its body rows and whether it is
        rendered with a non-empty box;
        ``"title"``: the document title; ``"text"``: the page's text as rendered.

    Raises:
        RuntimeError: If Selenium, Chromium or chromedriver is missing; the message says how
            to install them.
    """
    driver = _driver()
    try:
        driver.get(Path(html_path).resolve().as_uri())
        images = [
            (str(src)[:30], int(width), bool(done))
            for src, width, done in driver.execute_script(_IMAGES_JS)
        ]
        tables = driver.execute_script(_TABLES_JS)
        text = driver.execute_script("return document.body.innerText")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(WINDOW_WIDTH, min(int(height) + 200, MAX_SCREENSHOT_HEIGHT))
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(screenshot)):
            raise RuntimeError(f"browser test: expected a screenshot at {screenshot}, got none.")
        severe = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        return {
            "images": images,
            "severe": severe,
            "tables": len(tables),
            "table_rows": [int(rows) for rows, _ in tables],
            "tables_shown": [bool(shown) for _, shown in tables],
            "title": driver.title,
            "text": text,
        }
    finally:
        driver.quit()
