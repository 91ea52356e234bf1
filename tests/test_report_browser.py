"""report.html in a real browser (Debian's Chromium through Playwright): it opens from disk with
no console or page error and no request beyond the file itself, shows the paper table, sorts a
table by a column's values on a click on its header and reverses on a second click, keeps missing
values last, and renders to a full-page screenshot.

Skipped when /usr/bin/chromium (or the playwright package) is missing, unless
WSOL_BENCH_REQUIRE_BROWSER=1 is set (CI sets it): then the test fails saying what to install."""

from __future__ import annotations

import importlib.util
import math
import os
import struct
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from wsol_bench.report.html_report import write_html_report
from wsol_bench.report.run_folder import read_run
from wsol_bench.run.run_tables import run_tables

SCRIPT = Path(__file__).parents[1] / "scripts" / "screenshot_report.py"
REQUIRED = os.environ.get("WSOL_BENCH_REQUIRE_BROWSER") == "1"
# the cells of one column of a table, by the column's header text (pseudo-element arrows excluded)
COLUMN_JS = """(table, name) => {
  const i = Array.from(table.tHead.rows[0].cells).findIndex(h => h.textContent.trim() === name);
  return Array.from(table.tBodies[0].rows, r => r.cells[i].textContent.trim());
}"""
ROWS_JS = "table => Array.from(table.tBodies[0].rows, r => Array.from(r.cells, c => c.textContent.trim()))"


def screenshot_script():
    """scripts/screenshot_report.py as a module: the one place the browser's launch is written."""
    spec = importlib.util.spec_from_file_location("screenshot_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def missing(what: str) -> None:
    """Skip for want of the browser, or fail when WSOL_BENCH_REQUIRE_BROWSER=1 asks for it."""
    if REQUIRED:
        pytest.fail(f"{what}; WSOL_BENCH_REQUIRE_BROWSER=1 needs the browser test: install Debian's chromium "
                    "(apt-get install chromium) and the test extra (pip install -e '.[test]')")
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser():
    """A headless Debian Chromium, launched as scripts/screenshot_report.py launches it."""
    script = screenshot_script()
    if not script.CHROMIUM.is_file():
        missing(f"{script.CHROMIUM} not found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the Python package playwright is not installed")
    with sync_playwright() as playwright:
        launched = script.launch_chromium(playwright)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A real benchmark run: 4 synthetic images, three methods (so the paired comparisons fold
    into a long table), a one-image gallery."""
    from wsol_bench.run.runner import run

    root = tmp_path_factory.mktemp("browser")
    overrides = ["method=[agcam,random,center]", "dataset.params.num_images=4", "batch_size=4",
                 "gallery_images=1", "progress=false", "run_name=test", f"store.root={root / 'cache'}"]
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run(cfg, root / "run")
    return root / "run"


def open_page(browser, page_file: Path):
    """The page opened from disk, with the console errors, page errors and requests it made."""
    page = screenshot_script().new_page(browser)
    seen = {"errors": [], "requests": []}
    page.on("console", lambda message: message.type == "error" and seen["errors"].append(message.text))
    page.on("pageerror", lambda error: seen["errors"].append(str(error)))
    page.on("request", lambda request: seen["requests"].append(request.url))
    page.goto(page_file.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, seen


def column(table, name: str) -> list[str]:
    return table.evaluate(COLUMN_JS, name)


def number(text: str) -> float:
    """The sort key Python gives a cell: "a ± b" is a, "--" is missing (NaN)."""
    core = text.split(" ± ")[0]
    return math.nan if core == "--" else float(core)


def click_sorts(table, name: str, key) -> None:
    """A click on `name`'s header sorts the rows ascending by `key`, a second one descending;
    whole rows move (the same rows, cell for cell, in another order)."""
    rows = sorted(table.evaluate(ROWS_JS))
    header = table.locator(f'th:text-is("{name}")')
    header.click()
    ascending = column(table, name)
    assert ascending == sorted(ascending, key=key), (name, ascending)
    assert header.get_attribute("aria-sort") == "ascending"
    header.click()
    descending = column(table, name)
    assert descending == sorted(descending, key=key, reverse=True), (name, descending)
    assert sorted(table.evaluate(ROWS_JS)) == rows


def test_the_report_works_in_chromium(browser, real_run, tmp_path):
    page, seen = open_page(browser, real_run / "report.html")
    paper = page.locator("table.sortable").first
    assert paper.is_visible()
    assert page.locator("h3").first.inner_text().startswith("box:")
    methods = column(paper, "method")
    assert sorted(methods) == ["agcam", "center", "random"]
    assert all("±" in text for text in column(paper, "IoU"))
    click_sorts(paper, "IoU", number)
    click_sorts(paper, "method", str)
    folded = page.locator("details", has=page.locator('th:text-is("p_holm")'))  # compare.csv, a long table
    assert not folded.locator("table").is_visible()
    folded.locator("summary").click()
    compare = folded.locator("table.sortable")
    click_sorts(compare, "difference", number)  # negative numbers: a sort by text would misplace them
    out = tmp_path / "report.png"
    page.screenshot(path=str(out), full_page=True)
    data = out.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and width == 1400 and height > 2000 and len(data) > 50_000
    assert seen["errors"] == []
    assert all(url.startswith(("file:", "data:")) for url in seen["requests"]), seen["requests"]
    page.close()


def test_missing_values_stay_last_in_both_directions(browser, real_run, tmp_path):
    """One method without an IoU ("--"): the others sort by value, "--" last either way."""
    run = read_run(real_run)
    tables = run_tables(run)
    box = tables["box"]
    box.loc[box["method"] == "agcam", "IoU"] = math.nan
    page, seen = open_page(browser, write_html_report(run, tables, tmp_path))
    paper = page.locator("table.sortable").first
    header = paper.locator('th:text-is("IoU")')
    for direction in (1, -1):
        header.click()
        cells = column(paper, "IoU")
        values = [number(text) for text in cells[:-1]]
        assert cells[-1] == "--" and values == sorted(values, reverse=direction < 0), cells
    assert seen["errors"] == []
    page.close()
