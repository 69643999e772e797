"""Screenshot a `cases.html` (from `trl-ltc diagnose`) with headless Chromium, to check that it renders.

    python scripts/render_cases.py OUTPUT_DIR/cases.html [--out cases.png] [--width 1280] [--height 2400]

Needs a Chromium or Chrome binary (`chromium`, `chromium-browser`, `google-chrome`, or `--browser PATH`); on Debian:
`apt-get install chromium`. The page is opened from disk with networking features off and a fresh profile, so the
screenshot also proves the page needs no external asset.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The first Chromium-family browser on PATH, or None."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def screenshot(html_path, png_path, width: int = 1280, height: int = 2400, browser: str | None = None,
               timeout: float = 120) -> Path:  # fmt: skip
    """Render ``html_path`` headless into ``png_path`` (``width`` x ``height`` pixels) and return its path."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"No Chromium-family browser found (looked for {', '.join(BROWSERS)}).")
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    with tempfile.TemporaryDirectory(prefix="render-cases-") as profile:
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png_path}",
            f"--window-size={width},{height}",
            html_path.as_uri(),
        ]
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    if not png_path.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", help="Path of cases.html.")
    parser.add_argument("--out", default=None, help="PNG to write (default: next to the page, cases.png).")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--browser", default=None, help=f"Browser binary (default: first of {', '.join(BROWSERS)}).")
    args = parser.parse_args(argv)
    out = args.out or str(Path(args.html).with_suffix(".png"))
    print(screenshot(args.html, out, args.width, args.height, args.browser))
    return 0


if __name__ == "__main__":
    sys.exit(main())
