"""Tables from records, faithfulness and wsolevaluation rows: hand-computed means, the paper
layout, published rows, bad input, and Markdown/LaTeX that parse back to the CSV numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from wsol_bench.report.paper_numbers import AGCAM_PAPER, PAPER_MODEL, published_numbers
from wsol_bench.report.table_format import cell_text, to_latex, to_markdown, to_text, write_table_files
from wsol_bench.report.tables import localization_table, paper_table, published_rows
from wsol_bench.run.scorers.faithfulness import faithfulness_summary
from wsol_bench.run.scorers.sweep import wsoleval_summary

METRICS = ("pixel_acc", "iou", "dice", "precision", "recall")


def records_frame() -> pd.DataFrame:
    """Two methods x 4 images at threshold 0.5; image 3 is misclassified. Every box metric of
    agcam on image i is (i + 1) / 10, of rollout (i + 1) / 20; mask metrics are half of that."""
    rows = []
    for method, scale in (("agcam", 10), ("rollout", 20)):
        for i in range(4):
            row = {"image_id": f"im{i}", "method": method, "threshold": 0.5, "correct": int(i != 3),
                   "degenerate": int(method == "rollout" and i == 0)}
            row |= {f"box_{m}": (i + 1) / scale for m in METRICS}
            row |= {f"mask_{m}": (i + 1) / scale / 2 for m in METRICS}
            rows.append(row)
    return pd.DataFrame(rows)


def faithfulness_frame() -> pd.DataFrame:
    """agcam: abpc 0.3, 0.5, 0.1 over three images (mean 30 %); rollout: 0.2 on one image."""
    rows = [("im0", "agcam", 0.2, 0.5), ("im1", "agcam", 0.1, 0.6), ("im2", "agcam", 0.4, 0.5),
            ("im0", "rollout", 0.3, 0.5)]
    return pd.DataFrame([{"image_id": i, "method": m, "auc_morf": morf, "auc_lerf": lerf, "abpc": lerf - morf}
                         for i, m, morf, lerf in rows])


def wsoleval_frame(pxap=(float("nan"), float("nan"))) -> pd.DataFrame:
    return pd.DataFrame({"method": ["agcam", "rollout"], "dataset": "synthetic", "n_images": [4, 4],
                         "maxboxacc_v2": [61.25, 40.0], "pxap": list(pxap)})


def test_localization_means_are_hand_computed():
    """Filter "correct" averages images 0-2: agcam IoU (0.1 + 0.2 + 0.3) / 3 = 20 %; "all"
    averages 4 images: 25 %."""
    table = localization_table(records_frame(), "correct")
    assert table.loc[("agcam", 0.5), "box_iou"] == pytest.approx(20.0)
    assert table.loc[("rollout", 0.5), "mask_dice"] == pytest.approx(5.0)
    assert table.loc[("agcam", 0.5), "n_images"] == 3 and table.loc[("agcam", 0.5), "n_total"] == 4
    assert table.loc[("rollout", 0.5), "n_degenerate"] == 1
    assert localization_table(records_frame(), "all").loc[("agcam", 0.5), "box_iou"] == pytest.approx(25.0)
    with pytest.raises(ValueError, match="metric.image_filter"):
        localization_table(records_frame(), "some")


def test_faithfulness_summary_is_the_mean_over_all_images_in_percent():
    summary = faithfulness_summary(faithfulness_frame())
    assert summary.loc["agcam", "ABPC"] == pytest.approx(30.0)
    assert summary.loc["agcam", "AUC MoRF"] == pytest.approx(70 / 3)
    assert summary.loc["agcam", "AUC LeRF"] == pytest.approx(160 / 3)
    assert summary.loc["rollout", "ABPC"] == pytest.approx(20.0)
    assert summary["n_images_abpc"].tolist() == [3, 1]


@pytest.mark.parametrize("breakage, message", [
    (lambda f: pd.concat([f, f.iloc[:1]]), "repeat an"),
    (lambda f: f.assign(abpc=f["abpc"].where(f.index != 1)), "missing scores"),
    (lambda f: f.assign(abpc=f["abpc"] + 0.01), "abpc != auc_lerf - auc_morf"),
    (lambda f: f.drop(columns="auc_morf"), "lacks column"),
])
def test_bad_faithfulness_rows_are_refused_naming_the_file(breakage, message):
    with pytest.raises(ValueError, match=message) as err:
        faithfulness_summary(breakage(faithfulness_frame()), "run/faithfulness.csv")
    assert "run/faithfulness.csv" in str(err.value)


def test_wsoleval_summary_keeps_pxap_only_where_it_applies():
    """All-NaN PxAP (no masks) gives no PxAP column; one value keeps it."""
    plain = wsoleval_summary(wsoleval_frame())
    assert list(plain.columns) == ["MaxBoxAccV2", "n_images_wsol"]
    assert plain.loc["agcam", "MaxBoxAccV2"] == 61.25
    with_pxap = wsoleval_summary(wsoleval_frame((55.5, float("nan"))))
    assert with_pxap.loc["agcam", "PxAP"] == 55.5 and math.isnan(with_pxap.loc["rollout", "PxAP"])
    with pytest.raises(ValueError, match="more than once"):
        wsoleval_summary(pd.concat([wsoleval_frame(), wsoleval_frame()]))


def test_paper_table_joins_every_source_in_the_paper_column_order():
    """Localization, then ABPC block, then MaxBoxAccV2, one row per method, run order kept;
    a method only present in faithfulness.csv becomes a row with no localization numbers."""
    faith = faithfulness_frame()
    faith = pd.concat([faith, faith.iloc[:1].assign(method="center")])
    view = paper_table(localization_table(records_frame()), "box",
                       extras=[faithfulness_summary(faith), wsoleval_summary(wsoleval_frame())])
    assert list(view.columns) == ["method", "Pixel Acc", "IoU", "Dice", "Precision", "Recall", "n_images",
                                  "n_degenerate", "ABPC", "AUC MoRF", "AUC LeRF", "n_images_abpc", "MaxBoxAccV2",
                                  "n_images_wsol"]
    assert view["method"].tolist() == ["agcam", "rollout", "center"]
    assert view.loc[0, "Dice"] == pytest.approx(20.0) and view.loc[0, "ABPC"] == pytest.approx(30.0)
    assert view.loc[1, "MaxBoxAccV2"] == 40.0
    assert math.isnan(view.loc[2, "IoU"]) and view.loc[2, "ABPC"] == pytest.approx(30.0)


def test_threshold_column_appears_only_when_it_varies():
    records = records_frame()
    swept = pd.concat([records, records.assign(threshold=0.3)])
    assert "threshold" not in paper_table(localization_table(records)).columns
    view = paper_table(localization_table(swept))
    assert view[["method", "threshold"]].values.tolist() == [["agcam", 0.3], ["agcam", 0.5],
                                                             ["rollout", 0.3], ["rollout", 0.5]]


def test_published_numbers_exist_only_for_the_paper_setting():
    """docs/protocol.md 7: ImageNet val, ViT-B/16 orig weights, AG-CAM; nothing else is invented."""
    found = {p.metric: p.value for p in published_numbers("imagenet", "val", PAPER_MODEL)}
    assert found == {"box_pixel_acc": 73.41, "box_iou": 52.12, "box_dice": 65.15, "abpc": 36.91}
    assert all(p.source == AGCAM_PAPER for p in published_numbers("imagenet", "val", PAPER_MODEL))
    assert published_numbers("imagenet", "val", "vit_base_patch16_224") == []
    assert published_numbers("synthetic", "val", "wsol_synthetic_vit") == []
    assert published_numbers("imagenet", "train", PAPER_MODEL) == []


def test_published_row_follows_its_method_in_the_box_table_only():
    published = published_numbers("imagenet", "val", PAPER_MODEL)
    table = localization_table(records_frame())
    view = paper_table(table, "box", published=published)
    assert view["method"].tolist() == ["agcam", "agcam (published)", "rollout"]
    row = view.iloc[1]
    assert (row["Pixel Acc"], row["IoU"], row["Dice"], row["ABPC"]) == (73.41, 52.12, 65.15, 36.91)
    assert math.isnan(row["Precision"]) and math.isnan(row["n_images"])
    assert "ABPC" in view.columns  # shown even without a faithfulness file, for the published value
    mask = paper_table(table, "mask", published=published)
    assert mask.loc[1, "method"] == "agcam (published)" and math.isnan(mask.loc[1, "IoU"])
    # With a threshold sweep the published row carries the paper's threshold.
    swept = published_rows(pd.DataFrame({"method": ["agcam"], "threshold": [0.3], "IoU": [1.0]}), published, "box")
    assert swept.loc[1, "threshold"] == 0.5


def test_cells_format_counts_thresholds_scores_and_missing_values():
    assert cell_text("IoU", 12.345) == "12.35" and cell_text("IoU", 0.5) == "0.50"
    assert cell_text("n_images", 12.0) == "12" and cell_text("B-A: n_images", -2) == "-2"
    assert cell_text("threshold", 0.25) == "0.25" and cell_text("IoU", float("nan")) == "--"
    assert cell_text("method", "agcam") == "agcam"


def parse_markdown(text: str) -> pd.DataFrame:
    """The pipe table of a Markdown file, cells stripped (caption and notes ignored)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return pd.DataFrame(rows[2:], columns=rows[0])


def parse_latex(text: str) -> pd.DataFrame:
    """The tabular rows of a booktabs table, unescaped; block rules skipped."""
    body = text.split("\\toprule")[1].split("\\bottomrule")[0]
    rows = [[c.strip().replace("\\_", "_") for c in line.rstrip().removesuffix("\\\\").split(" & ")]
            for line in body.strip().splitlines() if line.strip() != "\\midrule"]
    return pd.DataFrame(rows[1:], columns=rows[0])


def assert_matches_csv(parsed: pd.DataFrame, csv: pd.DataFrame) -> None:
    """Same columns (a column's interval bounds folded into its cells) and rows; every number
    equal to the CSV's rounded to two decimals (counts exact), a cell with bounds as
    "mean ± half-width", missing values as "--"."""
    shown = [c for c in csv.columns if not c.endswith((" ci_lo", " ci_hi"))]
    assert list(parsed.columns) == shown
    assert len(parsed) == len(csv)
    for column in shown:
        bounds = [f"{column} ci_lo", f"{column} ci_hi"]
        for row, (text, value) in enumerate(zip(parsed[column], csv[column])):
            if isinstance(value, str):
                assert text == value
            elif pd.isna(value):
                assert text == "--", (column, text)
            elif column.startswith("n_"):
                assert int(text) == value
            elif all(b in csv.columns for b in bounds) and not csv.loc[row, bounds].isna().any():
                mean, half = text.split(" ± ")
                assert float(mean) == round(float(value), 2), (column, text, value)
                lo, hi = csv.loc[row, bounds]
                assert float(half) == round((hi - lo) / 2, 2), (column, text, lo, hi)
            else:
                assert float(text) == round(float(value), 2), (column, text, value)


def test_markdown_and_latex_parse_back_to_the_csv(tmp_path):
    """Written with every block and a published row: CSV at full precision, Markdown and
    LaTeX equal to it at two decimals, LaTeX specials escaped, caption and notes present."""
    view = paper_table(localization_table(records_frame()), "box",
                       extras=[faithfulness_summary(faithfulness_frame()), wsoleval_summary(wsoleval_frame())],
                       published=published_numbers("imagenet", "val", PAPER_MODEL))
    view.loc[0, "IoU"] = 12.345678  # rounds up at the third decimal
    paths = write_table_files(view, tmp_path, "t", caption="caption 100% of images", notes=["a_note"])
    assert [p.name for p in paths] == ["t.csv", "t.md", "t.tex"]
    csv = pd.read_csv(tmp_path / "t.csv")
    assert csv.loc[0, "IoU"] == 12.345678
    md, tex = (tmp_path / "t.md").read_text(), (tmp_path / "t.tex").read_text()
    assert_matches_csv(parse_markdown(md), csv)
    assert_matches_csv(parse_latex(tex), csv)
    assert "12.35" in md and "caption 100% of images" in md and "a_note" in md
    assert "caption 100\\% of images" in tex and "a\\_note" in tex and "n\\_images\\_abpc" in tex


def test_latex_blocks_are_separated_by_rules():
    view = pd.DataFrame({"dataset": ["x", "x", "y"], "method": ["a", "b", "a"], "IoU": [1.0, 2.0, 3.0]})
    tex = to_latex(view, block_column="dataset")
    body = tex.split("\\toprule")[1].split("\\bottomrule")[0].strip().splitlines()
    assert body == ["dataset & method & IoU \\\\", "\\midrule", "x & a & 1.00 \\\\", "x & b & 2.00 \\\\",
                    "\\midrule", "y & a & 3.00 \\\\"]
    assert "\\begin{table}" not in tex  # no caption, no notes: a bare tabular to \input


def test_text_and_markdown_show_the_same_cells():
    view = pd.DataFrame({"method": ["agcam"], "IoU": [np.float64(1 / 3)], "n_images": [7]})
    assert to_text(view).splitlines()[-1].split() == ["agcam", "0.33", "7"]
    assert parse_markdown(to_markdown(view)).values.tolist() == [["agcam", "0.33", "7"]]
