"""A full-page screenshot of a run's report.html in a real browser (for the README).

Usage: python scripts/screenshot_report.py RUN_DIR OUT.png [--width 1400]

It drives Debian's Chromium (`apt-get install chromium`, /usr/bin/chromium) through the Python
package `playwright` of the test extra, and never downloads a browser (`playwright install` is
not needed). tests/test_report_browser.py launches the browser with `launch_chromium` below, so
the test and this script see the page the same way. The package itself never imports playwright.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright's own browser builds are not used
# No sandbox: containers and CI runners often lack the user namespaces it needs. No GPU: headless
# machines have none. The rest keep the browser from contacting any server at start-up, so the
# page is seen exactly as it is on a machine without network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# Playwright gives up on a launch or an action after 30 s; a busy machine can take longer than
# that, and nothing here should fail for being slow, so the limit is 10 minutes.
PATIENCE_MS = 600_000


def launch_chromium(playwright):
    """A headless Debian Chromium with a fresh profile, started by a `sync_playwright()` handle."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                                      timeout=PATIENCE_MS)


def new_page(browser, width: int = 1400):
    """A page of `browser` whose actions wait as long as a busy machine needs."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.set_default_timeout(PATIENCE_MS)
    return page


def screenshot(page_file: Path, out: Path, width: int = 1400) -> Path:
    """Open `page_file` from disk and save a full-page PNG screenshot of it to `out`."""
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = new_page(browser, width)
            page.goto(page_file.resolve().as_uri())
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: RUN_DIR OUT.png [--width]; a missing report or browser is one line, exit 2."""
    parser = argparse.ArgumentParser(description="Full-page screenshot of RUN_DIR/report.html.")
    parser.add_argument("run_dir", type=Path, help="a run folder of wsol-bench (holding report.html)")
    parser.add_argument("out", type=Path, help="the PNG file to write")
    parser.add_argument("--width", type=int, default=1400, help="browser window width in pixels")
    args = parser.parse_args(argv)
    page_file = args.run_dir / "report.html"
    if not page_file.is_file():
        parser.error(f"{page_file} not found; `wsol-bench-report {args.run_dir}` writes it")
    if not CHROMIUM.is_file():
        parser.error(f"{CHROMIUM} not found; install Debian's chromium (apt-get install chromium)")
    if args.width < 320:
        parser.error(f"--width {args.width} is too narrow for the page; use 320 pixels or more (1400 is usual)")
    try:
        import playwright  # noqa: F401  (only to refuse its absence in one line)
    except ImportError:
        parser.error("the Python package playwright is missing; pip install 'playwright>=1.40'")
    print(screenshot(page_file, args.out, args.width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
