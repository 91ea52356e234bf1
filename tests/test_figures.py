"""Heatmap gallery (one row per image, input + one column per method) and two-class gallery
(two columns per method): panel counts from the image size, no blank panels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb
from matplotlib.legend import Legend
from PIL import Image

from wsol_bench.datasets import EvalTransform, Sample
from wsol_bench.files import save_figure
from wsol_bench.metrics.box_accuracy import BoxAccuracy
from wsol_bench.metrics.pxap import PxAP
from wsol_bench.report.curves import method_style, plot_perturbation_curves
from wsol_bench.report.figures import (
    RowCaption,
    class_gallery,
    coverage_figure,
    denormalize,
    heatmap_gallery,
    plot_sweep,
)
from wsol_bench.report.sweep_tables import BOX_STATE, PXAP_STATE, pxap_value
from wsol_bench.run.gallery import draw_gallery, row_captions


def test_gallery_has_one_panel_per_image_and_method(tmp_path):
    """3 images x (input + 2 methods) at 2.2 in per panel and 100 dpi: 660 x 660 pixels, plus
    a 90 px strip on top (title, legend) and a 110 px strip on the right (colour bar)."""
    gen = torch.Generator().manual_seed(0)
    images = [denormalize(torch.randn(3, 32, 32, generator=gen), (0.5,) * 3, (0.5,) * 3) for _ in range(3)]
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 16.0]])] * 3
    maps = {"peaked": torch.rand(3, 4, 4, generator=gen), "constant": torch.ones(3, 4, 4)}
    path = heatmap_gallery(images, boxes, maps, tmp_path / "g.png")
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape == (750, 770, 3)
    assert picture.std() > 10  # not blank
    # Each panel column differs from its neighbours (input vs overlays).
    cols = np.array_split(picture[90:, :660], 3, axis=1)
    assert not np.allclose(cols[0], cols[1]) and not np.allclose(cols[1], cols[2])


def test_denormalize_inverts_the_normalisation():
    """(x - mean) / std undone exactly, channels last, clamped to [0, 1]."""
    x = torch.rand(3, 5, 7)
    norm = (x - 0.2) / 0.4
    out = denormalize(norm, (0.2,) * 3, (0.4,) * 3)
    assert out.shape == (5, 7, 3)
    torch.testing.assert_close(out, x.permute(1, 2, 0))


def _panels(picture: np.ndarray, rows: int, cols: int) -> list[np.ndarray]:
    return [p for band in np.array_split(picture, rows, axis=0) for p in np.array_split(band, cols, axis=1)]


def test_class_gallery_has_two_panels_per_method_and_none_blank(tmp_path):
    """2 images x (input + 2 methods x 2 classes) at 220 px per panel: 440 x 1100 pixels, plus
    the 90 px title strip and the 110 px colour-bar strip; every panel is drawn, and a
    class-specific map differs between its A and B panels."""
    gen = torch.Generator().manual_seed(1)
    images = [denormalize(torch.randn(3, 32, 32, generator=gen), (0.5,) * 3, (0.5,) * 3) for _ in range(2)]
    boxes = [(torch.tensor([[2.0, 2.0, 12.0, 12.0]]), torch.tensor([[18.0, 18.0, 30.0, 30.0]]))] * 2
    left = torch.zeros(2, 4, 4)
    left[:, :, :2] = 1
    maps = {"specific": (left, left.flip(-1)), "agnostic": (torch.rand(2, 4, 4, generator=gen),) * 2}
    path = class_gallery(images, boxes, maps, tmp_path / "c.png", [("circle", "star"), ("ring", "cross")])
    picture = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert picture.shape == (530, 1210, 3)
    panels = _panels(picture[90:, :1100], 2, 5)
    assert all(p.std() > 10 for p in panels)
    # Row 0: the specific method's A panel (left half hot) differs from its B panel.
    assert np.abs(panels[1] - panels[2]).mean() > 5


def test_class_gallery_refuses_mismatched_inputs(tmp_path):
    image = [torch.zeros(8, 8, 3)]
    box = [(torch.zeros(0, 4), torch.zeros(0, 4))]
    with pytest.raises(ValueError, match="two map tensors"):
        class_gallery(image, box, {"m": (torch.rand(1, 2, 2),)}, tmp_path / "x.png", [("a", "b")])
    with pytest.raises(ValueError, match="1 images but 1 box pairs and 0 name pairs"):
        class_gallery(image, box, {"m": (torch.rand(1, 2, 2),) * 2}, tmp_path / "x.png", [])


def test_class_gallery_script_runs_end_to_end(tmp_path):
    """scripts/class_gallery.py on the shipped model: 2 two-class images, AG-CAM (class-
    specific) and rollout (class-agnostic): a 2 x 5 panel figure (with its title and colour-bar
    strips); rollout's maps for A and B are identical, AG-CAM's are not."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "class_gallery.py"
    spec = importlib.util.spec_from_file_location("class_gallery_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    captured = {}
    real = module.class_gallery

    def keep_maps(images, boxes, maps, path, names, **kwargs):
        captured.update(maps=maps, names=names)
        return real(images, boxes, maps, path, names, **kwargs)

    module.class_gallery = keep_maps
    path = module.make_class_gallery(tmp_path / "classes.png", num_images=2, methods=["agcam", "rollout"])
    assert np.asarray(Image.open(path)).shape[:2] == (530, 1210)
    agcam, rollout = captured["maps"]["agcam"], captured["maps"]["rollout"]
    assert torch.equal(rollout[0], rollout[1]) and not torch.allclose(agcam[0], agcam[1])
    assert all(a != b for a, b in captured["names"])


# --- Figures that explain themselves: titles, labelled axes, legends, colour bars ---------------


@pytest.fixture
def drawn(monkeypatch):
    """The figures the report modules save, kept (still whole after plt.close) so a test can
    read their titles, labels, legends and colour bars; the files are written as usual."""
    figures_module = importlib.import_module("wsol_bench.report.figures")
    curves_module = importlib.import_module("wsol_bench.report.curves")
    kept = []

    def keep(fig, path, *args, **kwargs):
        kept.append(fig)
        return save_figure(fig, path, *args, **kwargs)

    for module in (figures_module, curves_module):
        monkeypatch.setattr(module, "save_figure", keep)
    return kept


def _legend_texts(fig) -> list[str]:
    legends = list(fig.legends) + [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    legends += [c for a in fig.axes for c in a.get_children() if isinstance(c, Legend)]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def _colour_bars(fig) -> list:
    return [a for a in fig.axes if getattr(a, "_colorbar", None) is not None]


def test_gallery_names_its_boxes_threshold_colours_and_each_rows_class(tmp_path, drawn):
    """gallery.png's legend names the green ground-truth boxes and the white predicted boxes
    with the threshold used, a colour bar gives the heatmap's scale, and each row says its
    class, the predicted class and whether the prediction is correct."""
    gen = torch.Generator().manual_seed(2)
    images = [denormalize(torch.randn(3, 32, 32, generator=gen), (0.5,) * 3, (0.5,) * 3) for _ in range(2)]
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 16.0]])] * 2
    maps = {"peaked": torch.rand(2, 4, 4, generator=gen)}
    rows = [RowCaption("img_0", "circle", "circle", True), RowCaption("img_1", "star", "ring", False)]
    heatmap_gallery(images, boxes, maps, tmp_path / "g.png", threshold=0.3, titles=rows, title="the title")
    (fig,) = drawn
    legend = " | ".join(_legend_texts(fig))
    assert "ground-truth boxes" in legend and "predicted boxes at threshold 0.3" in legend
    (bar,) = _colour_bars(fig)
    assert "heatmap value" in bar.get_ylabel() and "threshold 0.3" in bar.get_ylabel()
    assert [line.get_ydata()[0] for line in bar.get_lines()] == [0.3]  # the threshold marked on the bar
    first = fig.axes[0].get_ylabel()
    assert "img_0" in first and "label: circle" in first and "predicted: circle" in first and "correct" in first
    second = fig.axes[2].get_ylabel()
    assert "label: star" in second and "predicted: ring" in second and "WRONG" in second
    assert fig.axes[0].yaxis.label.get_color() != fig.axes[2].yaxis.label.get_color()
    assert fig._suptitle.get_text() == "the title"


def test_run_gallery_rows_come_from_labels_predictions_and_class_names(tmp_path, drawn):
    """The run's gallery (`draw_gallery`) captions each row with the dataset's class names of
    the label and of the model's prediction, and its title names the target policy and the
    run's first threshold."""
    transform = EvalTransform((32, 32), (0.5,) * 3, (0.5,) * 3)
    samples = [Sample(torch.zeros(3, 32, 32), label, torch.tensor([[2.0, 2.0, 20.0, 20.0]]), f"id{label}", (32, 32))
               for label in (0, 2)]
    maps = {"m": torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(3))}
    draw_gallery(samples, maps, transform, tmp_path / "g.png", 0.4, predictions=[0, 1],
                 class_names=("circle", "triangle", "square"), target="label")
    (fig,) = drawn
    assert "label: circle\npredicted: circle\ncorrect" in fig.axes[0].get_ylabel()
    assert "label: square\npredicted: triangle\nWRONG" in fig.axes[2].get_ylabel()
    title = fig._suptitle.get_text()
    assert "labelled class (target=label)" in title and "metric.thresholds[0] = 0.4" in title
    assert row_captions(samples[:1], [7], None)[0].predicted == "class 7"  # no names: the class number


def test_class_gallery_has_a_legend_for_its_box_colours_and_a_colour_bar(tmp_path, drawn):
    image = [torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(4))]
    boxes = [(torch.tensor([[1.0, 1.0, 6.0, 6.0]]), torch.tensor([[8.0, 8.0, 14.0, 14.0]]))]
    class_gallery(image, boxes, {"m": (torch.rand(1, 2, 2), torch.rand(1, 2, 2))}, tmp_path / "c.png",
                  [("circle", "star")])
    (fig,) = drawn
    legend = " | ".join(_legend_texts(fig))
    assert "class A" in legend and "class B" in legend
    assert len(_colour_bars(fig)) == 1 and fig._suptitle is not None


def _sweep_table() -> pd.DataFrame:
    rows = []
    for method, peak in (("agcam", 0.5), ("rollout", 0.2)):
        for threshold in (0.0, 0.2, 0.5, 0.8):
            score = 0.6 - abs(threshold - peak)
            rows.append({"method": method, "threshold": threshold, "box_iou": score, "mask_iou": score / 2,
                         "n_images": 3, "filter": "correct"})
    return pd.DataFrame(rows)


def test_sweep_figure_has_a_title_readable_axes_and_explains_its_stars(tmp_path, drawn):
    """sweep.png: a title saying which images are averaged, readable axis labels, and a
    legend entry for the starred best threshold of each method."""
    plot_sweep(_sweep_table(), tmp_path / "s.png")
    (fig,) = drawn
    box, mask = fig.axes
    assert box.get_xlabel() == mask.get_xlabel() == "heatmap threshold (normalised map value)"
    assert (box.get_ylabel(), mask.get_ylabel()) == ("box IoU (%)", "mask IoU (%)")
    assert box.get_title().startswith("box IoU") and mask.get_title().startswith("mask IoU")
    assert "3 correctly classified images" in fig._suptitle.get_text()
    legend = _legend_texts(fig)
    assert legend[:2] == ["agcam", "rollout"] and "best threshold" in legend[2]
    # The best threshold is starred: agcam peaks at 0.5, rollout at 0.2.
    stars = [(line.get_xdata()[0], line.get_color()) for line in box.get_lines() if line.get_marker() == "*"]
    assert [x for x, _ in stars] == [0.5, 0.2] and stars[0][1] != stars[1][1]


def test_sweep_figure_shades_each_methods_interval_where_the_table_has_bounds(tmp_path, drawn):
    """With the bounds of sweep.csv, each IoU panel shades every method's interval in the
    method's colour (percent, like the line), and the legend says what the shading is."""
    table = _sweep_table()
    for column in ("box_iou", "mask_iou"):
        table[f"{column} ci_lo"] = table[column] - 0.05
        table[f"{column} ci_hi"] = table[column] + 0.1
    plot_sweep(table.drop(columns=["mask_iou ci_lo", "mask_iou ci_hi"]), tmp_path / "s.png", level=0.9)
    (fig,) = drawn
    box, mask = fig.axes
    bands = [c for c in box.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2 and not [c for c in mask.collections if isinstance(c, PolyCollection)]
    lines = [line for line in box.get_lines() if line.get_marker() != "*"]
    for band, line in zip(bands, lines):
        assert band.get_facecolor()[0][:3] == pytest.approx(to_rgb(line.get_color()))
        top = band.get_paths()[0].vertices[:, 1].max()
        assert top == pytest.approx(max(line.get_ydata()) + 10)  # the upper bound, in percent
    assert any(text.startswith("shaded: 90% bootstrap interval") for text in _legend_texts(fig))
    plot_sweep(_sweep_table(), tmp_path / "t.png")
    assert not any("shaded" in text for text in _legend_texts(drawn[1]))


def _sweep_states(with_masks: bool) -> dict:
    """Two methods' box accuracy (and PxAP) states on two tiny images."""
    thresholds = [0.0, 0.2, 0.5, 0.8]
    heat = torch.zeros(2, 16, 16)
    heat[:, 2:8, 2:8] = 1.0
    gt_boxes = [torch.tensor([[2, 2, 7, 7]])] * 2
    masks = heat > 0.5
    states = {}
    for method, maps in (("agcam", heat), ("rollout", heat.flip(-1))):
        named = {BOX_STATE: BoxAccuracy(thresholds, boxes="components")}
        named[BOX_STATE].update(maps, gt_boxes, torch.ones(2, dtype=torch.bool))
        if with_masks:
            named[PXAP_STATE] = PxAP(thresholds)
            named[PXAP_STATE].update(maps, masks)
        states[method] = named
    return states


def test_sweep_figure_adds_box_accuracy_and_pxap_panels_from_the_states(tmp_path, drawn):
    """Given the sweep's metric states, sweep.png adds a box-accuracy panel and a PxAP
    precision-recall panel, with each method's MaxBoxAccV2 and PxAP (as wsoleval.csv has
    them) in the legend; without masks, no PxAP panel."""
    states = _sweep_states(with_masks=True)
    plot_sweep(_sweep_table(), tmp_path / "s.png", states=states)
    plot_sweep(_sweep_table().drop(columns="mask_iou"), tmp_path / "t.png", states=_sweep_states(with_masks=False))
    full, boxes_only = drawn
    titles = [ax.get_title() for ax in full.axes]
    assert len(titles) == 4 and titles[2].startswith("box accuracy") and titles[3].startswith("PxAP")
    assert full.axes[2].get_ylabel() == "BoxAcc v2, mean over IoU 30/50/70 (%)"
    assert full.axes[3].get_xlabel() == "recall (% of ground-truth pixels)"
    legend = _legend_texts(full)
    for method, named in states.items():  # the values wsoleval.csv takes from the same states
        box, pxap = named[BOX_STATE].compute()["maxboxacc_v2"], pxap_value(named[PXAP_STATE])
        assert f"{method} (MaxBoxAccV2 {box:.1f}, PxAP {pxap:.1f})" in legend
    assert [ax.get_title().split(":")[0].split(",")[0] for ax in boxes_only.axes] == ["box IoU", "box accuracy"]


def test_perturbation_curves_tell_fifteen_methods_apart(tmp_path, drawn):
    """faithfulness_curves.png: every one of 15 methods has its own (colour, marker) pair on
    both of its curves, and the figure has a title, axis labels and a legend naming each."""
    rows = []
    for m in range(15):
        for image in range(2):
            row = {"method": f"method_{m}", "abpc": 0.1 * m, "degenerate": 0}
            row.update({f"{c}_{s:02d}": (s + m + image) / 40 for c in ("morf", "lerf") for s in range(3)})
            rows.append(row)
    plot_perturbation_curves(pd.DataFrame(rows), tmp_path / "f.png")
    (fig,) = drawn
    (ax,) = fig.axes
    styles = {}
    for line in ax.get_lines():
        styles.setdefault(line.get_color(), set()).add(line.get_marker())
    pairs = [(line.get_color(), line.get_marker()) for line in ax.get_lines()]
    assert len(pairs) == 30 and len(set(pairs)) == 15  # two curves per method, 15 distinct styles
    assert {line.get_linestyle() for line in ax.get_lines()} == {"-", "--"}  # MoRF solid, LeRF dashed
    assert ax.get_title() and ax.get_xlabel() == "fraction of pixels removed" and ax.get_ylabel()
    legend = _legend_texts(fig)
    assert all(any(text.startswith(f"method_{m} (ABPC") for text in legend) for m in range(15))
    assert any(text.startswith("MoRF") for text in legend) and any(text.startswith("LeRF") for text in legend)


def test_method_styles_differ_for_seventy_methods():
    pairs = {(s["color"], s["marker"]) for s in map(method_style, range(70))}
    assert len(pairs) == 70


def test_coverage_figure_names_its_dashed_square(tmp_path, drawn):
    coverage_figure([[0.1, 0.2], [0.3, 0.4]], tmp_path / "c.png", "coverage")
    (fig,) = drawn
    assert "central quarter" in _legend_texts(fig)
    assert len(_colour_bars(fig)) == 1 and fig.axes[0].get_title() == "coverage"


def test_figures_are_the_same_bytes_every_time(tmp_path):
    """Same inputs, same PNG: the gallery and the sweep are drawn twice and compared."""
    gen = torch.Generator().manual_seed(5)
    images = [denormalize(torch.randn(3, 16, 16, generator=gen), (0.5,) * 3, (0.5,) * 3)]
    maps = {"m": torch.rand(1, 4, 4, generator=gen)}
    rows = [RowCaption("a", "circle", "star", False)]
    for name in ("one", "two"):
        heatmap_gallery(images, [torch.zeros(0, 4)], maps, tmp_path / f"{name}.png", titles=rows)
        plot_sweep(_sweep_table(), tmp_path / f"{name}_sweep.png", states=_sweep_states(with_masks=True))
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    assert (tmp_path / "one_sweep.png").read_bytes() == (tmp_path / "two_sweep.png").read_bytes()
