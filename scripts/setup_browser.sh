#!/usr/bin/env bash
# Install the headless browser the report's browser test opens: Debian's chromium and
# chromium-driver (chromedriver). They come from apt, not from Selenium Manager, because
# Selenium Manager downloads browser builds from hosts that this machine and CI cannot reach;
# the test passes both paths to Selenium so that it never tries.
#
# A machine keeps nothing installed by hand, so scripts/test.sh runs this on every run: when
# both commands are already on PATH it only checks that and exits (about 0.1 s). Needs
# apt-get, and root or sudo.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "setup_browser.sh: chromium and chromedriver are installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_browser.sh: expected apt-get (Debian or Ubuntu) to install chromium and" \
        "chromium-driver, got none on PATH. Install Chromium and its chromedriver with your" \
        "system's package manager and put both on PATH." >&2
    exit 1
fi

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "setup_browser.sh: expected to run as root or with sudo to install chromium and" \
            "chromium-driver, got user $(id -un) without sudo. Run this script as root." >&2
        exit 1
    fi
}

echo "setup_browser.sh: installing chromium and chromium-driver with apt-get"
as_root apt-get update -qq
# env: sudo would drop a variable set in front of it.
as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends chromium chromium-driver

for cmd in chromium chromedriver; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "setup_browser.sh: expected $cmd on PATH after installing chromium and" \
            "chromium-driver, got none." >&2
        exit 1
    fi
done
echo "setup_browser.sh: done ($(chromium --version 2>/dev/null | head -n1);" \
    "$(chromedriver --version 2>/dev/null | head -n1))"
