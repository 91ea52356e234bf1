"""report.html and compare.html: written by a real run and by `wsol-bench-report`, holding the
paper tables' values with their intervals, the significance marks and the figures, loading
nothing from the network, well-formed, and sortable by the values the cells carry."""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
from contextlib import redirect_stdout
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from wsol_bench.cli.report import main
from wsol_bench.files import write_json
from wsol_bench.report.comparisons import significance_matrix
from wsol_bench.report.html_report import html_report, html_table
from wsol_bench.report.manifest import MANIFEST, manifest_payload, read_manifest
from wsol_bench.report.run_folder import read_run
from wsol_bench.report.table_format import interval_text
from wsol_bench.run.run_tables import run_tables

# void elements have no end tag (HTML's list of them)
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A real benchmark run: 6 synthetic images, three methods, a gallery, the threshold sweep
    (sweep.png) and ABPC (faithfulness_curves.png)."""
    from wsol_bench.run.runner import run

    root = tmp_path_factory.mktemp("html")
    overrides = ["method=[agcam,random,center]", "dataset.params.num_images=6", "batch_size=6",
                 "gallery_images=2", "progress=false", "run_name=test", f"store.root={root / 'cache'}",
                 "sweep=grid", "sweep.thresholds=[0.3,0.6]", "faithfulness=abpc", "faithfulness.steps=3"]
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    printed = io.StringIO()
    with redirect_stdout(printed):
        run(cfg, root / "run")
    (root / "printed.txt").write_text(printed.getvalue())  # beside the run folder, not in it
    return root / "run"


class TagChecker(HTMLParser):
    """Records every element left open or closed out of order, and every src/href."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.errors: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [value or "" for name, value in attrs if name in ("src", "href")]
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1] if self.open else 'nothing'}")
        else:
            self.open.pop()


def check_page(text: str) -> TagChecker:
    """Parse a page: every tag closes in order, and nothing is loaded from elsewhere."""
    checker = TagChecker()
    checker.feed(text)
    checker.close()
    assert checker.errors == [] and checker.open == [], (checker.errors[:5], checker.open)
    assert text.startswith("<!DOCTYPE html>")
    remote = [link for link in checker.links if not link.startswith(("data:image/png;base64,", "#"))]
    assert remote == []
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.IGNORECASE)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    return checker


def test_the_run_writes_its_report_with_tables_marks_and_figures(real_run):
    """The run folder holds report.html (the run says where): every paper table's value with
    "± half-width" from table_<variant>.csv's bounds, the significance marks of every measure,
    and every PNG of the folder inlined; the page is well-formed and loads nothing."""
    assert f"report: {real_run / 'report.html'}" in (real_run.parent / "printed.txt").read_text()
    page = (real_run / "report.html").read_text()
    checker = check_page(page)
    for variant in ("box", "mask"):
        table = pd.read_csv(real_run / f"table_{variant}.csv")
        for _, row in table.iterrows():
            for column in ("Pixel Acc", "IoU", "Dice", "ABPC"):
                text = interval_text(column, row[column], row[f"{column} ci_lo"], row[f"{column} ci_hi"])
                assert "±" in text and f">{text}</td>" in page, (variant, column, text)
    compare = pd.read_csv(real_run / "compare.csv")
    for measure in dict.fromkeys(compare["measure"]):
        matrix = significance_matrix(compare, measure)
        marks = [matrix.loc[a, b] for a in matrix.index for b in matrix.columns if a != b]
        heading = f"<h4>{html.escape(measure)}</h4>"
        assert heading in page, measure
        start = page.index(heading)
        block = page[start:page.index("</table>", start)]
        found = re.findall(r'<td class="(higher|lower|same)"[^>]*>([+=-])</td>', block)
        assert [mark for _, mark in found] == marks, measure
        assert all({"higher": "+", "lower": "-", "same": "="}[css] == mark for css, mark in found)
    assert "Holm-adjusted" in page and "95 %" in page
    images = {alt: src for src, alt in re.findall(r'<img src="(data:image/png;base64,[^"]+)" alt="([^"]+)"', page)}
    assert set(images) == {"sweep.png", "faithfulness_curves.png", "gallery.png"}
    for name, src in images.items():
        assert base64.b64decode(src.split(",", 1)[1]) == (real_run / name).read_bytes(), name
    assert page.index("faithfulness_curves.png") < page.index('alt="gallery.png"')
    assert len(checker.links) >= 3


def test_the_report_command_rebuilds_the_page(real_run, tmp_path, capsys):
    """`wsol-bench-report RUN` writes report.html again (and says where); --check ignores it."""
    folder = Path(shutil.copytree(real_run, tmp_path / "copy"))
    (folder / "report.html").unlink()
    assert main([str(folder), "--no-gallery"]) == 0
    assert f"report: {folder / 'report.html'}" in capsys.readouterr().out
    check_page((folder / "report.html").read_text())
    (folder / "report.html").write_text("edited")
    assert main([str(folder), "--check"]) == 0


def test_compare_writes_one_page_naming_both_runs(real_run, tmp_path, capsys, monkeypatch):
    """--compare A B writes compare.html (into the current folder unless --out says otherwise)
    with both runs named, the setting in which they differ, their side-by-side table and each
    run's figures."""
    other = Path(shutil.copytree(real_run, tmp_path / "other"))
    config = OmegaConf.load(other / "config.yaml")
    config.seed = 1
    OmegaConf.save(config, other / "config.yaml")
    write_json(other / MANIFEST, {**read_manifest(other), **manifest_payload(other, [], {})})  # complete again
    monkeypatch.chdir(tmp_path)
    assert main(["--compare", str(real_run), str(other)]) == 0
    assert f"report: {tmp_path / 'compare.html'}" in capsys.readouterr().out
    page = (tmp_path / "compare.html").read_text()
    check_page(page)
    assert str(real_run) in page and str(other) in page
    assert "B-A: IoU" in page and "runs side by side" in page
    assert "<tr><td>seed</td><td>0</td><td>1</td></tr>" in page
    assert page.count('alt="gallery.png"') == 2
    assert main(["--compare", str(real_run), str(other), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "compare.html").is_file()
    assert main(["--compare", str(real_run)]) == 2
    assert "--compare needs two or more run folders" in capsys.readouterr().err


def test_cells_carry_their_values_and_every_table_appears(real_run):
    """Numeric cells hold their full value in data-value ("a ± b" holds a, "--" none); a table
    the report does not know by name appears too, escaped."""
    run = read_run(real_run)
    tables = run_tables(run)
    table = html_table("box", tables["box"])
    iou = table.columns.index("IoU")
    assert [row[iou].value for row in table.rows] == pytest.approx(tables["box"]["IoU"].tolist())
    missing = html_table("x", pd.DataFrame({"method": ["a", "b"], "score": [1.5, float("nan")]}))
    assert [(c.text, c.value, c.missing) for c in (row[1] for row in missing.rows)] == [
        ("1.50", 1.5, False), ("--", None, True)]
    tables["future_measure"] = pd.DataFrame({"method": ["<b>agcam</b>"], "novel score": [12.345]})
    tables["ranking"] = pd.DataFrame({"method": ["agcam", "random"], "IoU rank": [1, 2], "median rank": [1.5, 2.5],
                                      "median rank ci_lo": [1.0, 2.0], "median rank ci_hi": [2.0, 3.0]})
    page = html_report(run, tables)
    check_page(page)
    assert "<h3>future_measure.csv</h3>" in page and "&lt;b&gt;agcam&lt;/b&gt;" in page
    assert 'data-value="12.345">12.35</td>' in page
    rankings = page.index('<h2 id="rankings">')
    assert page.index('<h2 id="significance">') < rankings < page.index('<h2 id="curves">')
    assert page.index("<h3>ranking.csv</h3>") > rankings and 'data-value="1.5">1.50</td>' in page
    assert "<td>1 to 2</td>" in page  # a rank's interval by its ends: it is far from symmetric
    assert page.index("<h3>ranking.csv</h3>") < page.index('<h2 id="other-tables">')


def test_the_sweep_table_is_shown_in_percent_with_its_intervals(real_run):
    """sweep.csv holds fractions; the page shows its scores in percent with "± half-width", as
    every other table, and the mean number of boxes with its decimals (not rounded as a count)."""
    page = (real_run / "report.html").read_text()
    sweep = pd.read_csv(real_run / "sweep.csv")
    row = sweep.iloc[len(sweep) // 2]
    start = page.index("<h3>sweep.csv</h3>")
    block = page[start:page.index("<h3>", start + 1)]
    assert "Scores in percent here" in block and 'title="click to sort by mean boxes">mean boxes</th>' in block
    iou = interval_text("box_iou", row["box_iou"] * 100, row["box_iou ci_lo"] * 100, row["box_iou ci_hi"] * 100)
    assert "±" in iou and f">{iou}</td>" in block
    boxes = interval_text("mean boxes", row["n_pred_boxes"], row["n_pred_boxes ci_lo"], row["n_pred_boxes ci_hi"])
    assert f">{boxes}</td>" in block
