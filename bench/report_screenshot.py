"""Render a ``report.html`` to a PNG with headless Chromium, to see the page as a user's browser
shows it (offline: the page must need nothing from the network). Not a test: it needs a browser.

    python -m bench.report_screenshot OUTPUT_DIR/report.html [--output page.png]
        [--window_size 1280,2000] [--browser chromium]

Debian: ``apt-get install chromium``. Prints where the screenshot was written; exits non-zero with
Chromium's own message when no screenshot was made.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless and offline: nothing from the network, no profile of the user's, no GPU.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--hide-scrollbars")


def find_browser(name: str | None) -> str:
    for candidate in ([name] if name else BROWSERS):
        found = shutil.which(candidate)
        if found:
            return found
    raise SystemExit(f"no Chromium found (tried {', '.join([name] if name else BROWSERS)}); "
                     "install it (Debian: apt-get install chromium) or pass --browser")


def screenshot(report: str, output: str, window_size: str = "1280,2000",
               browser: str | None = None, timeout: float = 120.0) -> str:
    """Render ``report`` (an HTML file) to the PNG ``output`` and return its path."""
    report_url = pathlib.Path(report).resolve().as_uri()
    output = os.path.abspath(output)
    if os.path.exists(output):
        os.remove(output)  # so that an old picture is never taken for a new one
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        command = [find_browser(browser), *FLAGS, f"--user-data-dir={profile}",
                   f"--screenshot={output}", f"--window-size={window_size}", report_url]
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if not os.path.exists(output):
        raise SystemExit(f"{report}: Chromium made no screenshot (exit {run.returncode}): "
                         f"{run.stderr.strip()[-2000:]}")
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="the report.html to render")
    parser.add_argument("--output", help="PNG to write (default: next to the report, .png)")
    parser.add_argument("--window_size", default="1280,2000", help="width,height in CSS pixels")
    parser.add_argument("--browser", help="Chromium executable (default: the first found of "
                        + ", ".join(BROWSERS) + ")")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.report):
        raise SystemExit(f"{args.report}: file not found")
    output = args.output or os.path.splitext(args.report)[0] + ".png"
    print(f"screenshot of {args.report}: "
          f"{screenshot(args.report, output, args.window_size, args.browser)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
