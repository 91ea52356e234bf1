"""The Python API (wsol_bench.api): explain, overlay and localize give the run's own numbers."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from hydra import compose, initialize_config_module
from PIL import Image

import wsol_bench
from wsol_bench.api import as_frame, explain, localize, overlay
from wsol_bench.datasets import build_dataset
from wsol_bench.datasets.base import IGNORE_INDEX, Sample
from wsol_bench.errors import InputFileError, MissingInputError, SettingError
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.pixel import EPS
from wsol_bench.models import disable_fused_attention, load_model
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.run.maps import build_transform
from wsol_bench.run.runner import run

SHIPPED = "wsol_synthetic_vit"
# The README's example, run verbatim by `test_the_readme_example_runs`.
README_EXAMPLE = '''\
from PIL import Image
from wsol_bench import as_frame, explain, localize, overlay
from wsol_bench.datasets import build_dataset

sample = build_dataset("synthetic", split="val", num_images=1)[0]  # or Image.open("photo.jpg")
image = Image.fromarray(sample.image.permute(1, 2, 0).numpy())
result = explain("wsol_synthetic_vit", image, method="agcam")  # the shipped ViT, predicted class
Image.fromarray(overlay(image, result.heatmaps[0])).save("agcam.png")

found = localize(result, threshold=0.5, boxes=[sample.boxes], masks=[sample.mask == sample.label + 1])
print(found[0].boxes)  # xyxy boxes of the regions above the threshold
print(as_frame(found)[["box_iou", "mask_iou"]])  # the scores records.csv holds
'''


def bench_config(*overrides: str):
    """The run's configuration (the default preset) with `overrides`."""
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def raw_samples(count: int, image_size: int = 224) -> list[Sample]:
    """The first synthetic val images as decoded (uint8), with their ground truth."""
    dataset = build_dataset("synthetic", split="val", num_images=count, image_size=image_size)
    return [dataset[i] for i in range(count)]


def pil(sample: Sample) -> Image.Image:
    return Image.fromarray(sample.image.permute(1, 2, 0).numpy())


def test_importing_the_package_stays_light():
    code = "import sys, wsol_bench; assert 'torch' not in sys.modules and 'explain' in dir(wsol_bench)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert wsol_bench.explain is explain and wsol_bench.localize is localize and wsol_bench.overlay is overlay
    with pytest.raises(AttributeError):
        wsol_bench.no_such_name  # noqa: B018


@pytest.mark.parametrize(("method", "params", "use_labels"), [("agcam", {}, False),
                                                              ("agcam", {"head_fusion": "mean"}, True),
                                                              ("rollout", {"discard_ratio": 0.5}, False)])
def test_explain_by_name_equals_the_explainer_and_the_runs_heatmaps(method, params, use_labels):
    model = load_model(SHIPPED, pretrained=True)
    samples = raw_samples(3)
    transform = build_transform(bench_config())
    images = torch.stack([transform(s).image for s in samples])
    labels = torch.tensor([s.label for s in samples]) if use_labels else None
    got = explain(SHIPPED, images, method, labels, **params)
    expected = get_explainer(method, model, **params)(images, labels)
    heatmaps, degenerate = to_heatmaps(expected.maps, (224, 224))
    assert torch.equal(got.maps, expected.maps) and torch.equal(got.heatmaps, heatmaps)
    assert torch.equal(got.degenerate, degenerate) and torch.equal(got.targets, expected.targets)
    assert torch.equal(got.predictions, expected.logits.argmax(1))
    assert got.heatmaps.shape == (3, 224, 224) and got.heatmaps.min() == 0 and got.heatmaps.max() == 1


def test_pil_images_and_files_equal_the_runs_preprocessing(tmp_path):
    """A PIL image of another size, the same image as a file, and the run's transform of it as a
    tensor give the same heatmaps."""
    image = pil(raw_samples(1)[0]).resize((180, 150))
    path = tmp_path / "image.png"
    image.save(path)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    sample = Sample(image=pixels, label=0, boxes=torch.zeros(0, 4), image_id="x", orig_size=(180, 150))
    tensor = build_transform(bench_config())(sample).image[None]
    by_tensor, by_pil, by_file = (explain(SHIPPED, x) for x in (tensor, image, [path]))
    assert torch.equal(by_pil.heatmaps, by_tensor.heatmaps)
    assert torch.equal(by_file.heatmaps, by_tensor.heatmaps)
    grey = explain(SHIPPED, [image.convert("L"), np.asarray(image)])
    assert grey.notes == [("l converted to rgb",), ()]
    # another batch: equal up to float rounding (the batch size changes the order of sums)
    torch.testing.assert_close(grey.heatmaps[1], by_tensor.heatmaps[0], rtol=0, atol=1e-5)


def test_explain_takes_a_users_own_timm_module_and_leaves_it_as_it_was():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64,
                              depth=2, attn_drop_rate=0.5, proj_drop_rate=0.5)  # dropout: eval mode matters
    fused_before = [block.attn.fused_attn for block in model.blocks]
    images = torch.randn(2, 3, 64, 64)
    got = explain(model, images, "agcam", targets=3)
    reference = copy.deepcopy(model)
    disable_fused_attention(reference)
    expected = get_explainer("agcam", reference.requires_grad_(False).eval())(images, torch.tensor([3, 3]))
    assert torch.equal(got.maps, expected.maps) and got.targets.tolist() == [3, 3]
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert [block.attn.fused_attn for block in model.blocks] == fused_before
    by_pil = explain(model, [Image.new("RGB", (90, 70), (200, 30, 30)), Image.new("RGB", (40, 40))])
    assert by_pil.heatmaps.shape == (2, 64, 64) and by_pil.maps.shape == (2, 4, 4)


def test_a_module_that_cannot_be_explained_is_refused_in_one_line():
    pooled = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=1,
                               class_token=False, global_pool="avg")
    for model, words in ((torch.nn.Linear(3, 5), "not a timm VisionTransformer"), (pooled, "class token"),
                         (12, "model name")):
        with pytest.raises(SettingError, match=words) as refusal:
            explain(model, torch.zeros(1, 3, 32, 32))
        assert "\n" not in str(refusal.value)


def test_bad_inputs_are_refused_in_one_line(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    heat = torch.zeros(1, 8, 8)
    cases = [
        (lambda: explain(SHIPPED, torch.zeros(1, 3, 224, 224, dtype=torch.uint8)), SettingError, "float"),
        (lambda: explain(SHIPPED, torch.zeros(1, 3, 64, 64)), SettingError, "takes 224x224"),
        (lambda: explain(SHIPPED, [tmp_path / "absent.png"]), MissingInputError, "absent.png"),
        (lambda: explain(SHIPPED, [broken]), InputFileError, "broken.png"),
        (lambda: explain(SHIPPED, []), SettingError, "empty"),
        (lambda: explain(SHIPPED, [np.zeros((4, 4), np.float32)]), SettingError, r"images\[0\] is a ndarray"),
        (lambda: explain(SHIPPED, Image.new("I;16", (8, 8))), SettingError, "high bit depth"),
        (lambda: explain(SHIPPED, torch.zeros(1, 3, 224, 224), targets=[1.5]), SettingError, "integer"),
        (lambda: explain(SHIPPED, torch.zeros(1, 3, 224, 224), "agcam", no_such=1), SettingError, "no_such"),
        (lambda: localize(heat + 2), SettingError, r"\[0, 1\]"),
        (lambda: localize(heat, threshold=1.5), SettingError, "threshold"),
        (lambda: localize(heat, protocol="loose"), SettingError, "protocol"),
        (lambda: localize(heat, boxes=[[0, 0, 1, 1], [0, 0, 1, 1]]), SettingError, "one per image"),
        (lambda: localize(heat, boxes=[[4, 0, 1, 1]]), SettingError, "x1 >= x0"),
        (lambda: localize(heat, masks=[torch.zeros(4, 4, dtype=torch.bool)]), SettingError, "heatmap size"),
        (lambda: localize(heat, masks=[np.zeros((8, 8))]), SettingError, "bool or integer"),
        (lambda: localize(heat, boxes=[[0, 0, 1, 1]], box_image_sizes=[(0, 5)]), SettingError, "width, height"),
        (lambda: localize(np.zeros((1, 8, 8), dtype=int)), SettingError, "floats"),
        (lambda: overlay(np.zeros((4, 4, 3)), heat[0], alpha=2), SettingError, "alpha"),
        (lambda: overlay(np.full((4, 4, 3), 2.0), heat[0]), SettingError, r"\[0, 1\]"),
        (lambda: overlay(np.zeros((4, 4, 3)), heat[0], colormap="nope"), SettingError, "colormap"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=words) as refusal:
            call()
        assert "\n" not in str(refusal.value), str(refusal.value)


def test_overlay_blends_the_resized_heatmap_over_the_image():
    grey = np.full((4, 4, 3), 100, dtype=np.uint8)
    heatmap = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # bilinear to 4 x 4: column 0 is 0, column 3 is 1
    for image in (grey, Image.fromarray(grey), grey / 255.0):
        out = overlay(image, heatmap, alpha=0.25)
        assert out.shape == (4, 4, 3) and out.dtype == np.uint8
        # jet(1) = (0.5, 0, 0): 0.75 * 100 + 0.25 * 127.5 = 106.875 -> 107, and 0.75 * 100 = 75
        assert out[2, 3].tolist() == [107, 75, 75]
        assert out[2, 0].tolist() == [75, 75, 107]  # jet(0) = (0, 0, 0.5)
    assert overlay(grey, heatmap.numpy(), alpha=0.0).tolist() == grey.tolist()
    assert overlay(Image.new("RGB", (30, 20)), torch.rand(7, 7)).shape == (20, 30, 3)


def pixel_scores(tp: int, fp: int, fn: int, total: int) -> dict[str, float]:
    """The five scores by their formulas (docs/protocol.md 4.1), from hand-counted pixels."""
    tn = total - tp - fp - fn
    return {"pixel_acc": (tp + tn + EPS) / (total + EPS), "iou": (tp + EPS) / (tp + fp + fn + EPS),
            "dice": (2 * tp + EPS) / (2 * tp + fp + fn + EPS), "precision": (tp + EPS) / (tp + fp + EPS),
            "recall": (tp + EPS) / (tp + fn + EPS)}


def test_localize_finds_the_hand_made_boxes_and_scores():
    heat = torch.zeros(32, 32)
    heat[4:12, 8:20] = 0.9  # rows 4..11, columns 8..19: the box [8, 4, 20, 12]
    heat[20:24, 0:4] = 0.7  # a second region, 4 x 4
    truth = [[12.0, 4.0, 24.0, 12.0]]  # columns 12..23, rows 4..11: 96 pixels, 64 shared with the first
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:12, 12:24] = 1
    mask[20:24, 0:4] = IGNORE_INDEX  # the second region's pixels count nowhere in the mask scores
    exact = localize(heat, 0.5, "exact", boxes=[truth], masks=[mask])[0]
    assert exact.boxes.tolist() == [[8, 4, 20, 12], [0, 20, 4, 24]] and exact.n_pred_boxes == 2
    assert exact.n_gt_boxes == 1 and int(exact.mask.sum()) == 96 + 16
    for name, value in pixel_scores(64, 48, 32, 1024).items():
        assert exact.scores[f"box_{name}"] == pytest.approx(value, rel=1e-12)
    for name, value in pixel_scores(64, 32, 32, 1024 - 16).items():
        assert exact.scores[f"mask_{name}"] == pytest.approx(value, rel=1e-12)
    # agcam fills each predicted box one pixel beyond its right and bottom edges: 9 x 13 and 5 x 5
    agcam = localize(heat, 0.5, "agcam", boxes=[truth])[0]
    assert int(agcam.mask.sum()) == 117 + 25
    assert set(agcam.scores) == {f"box_{name}" for name in pixel_scores(1, 0, 0, 1)}  # no masks given
    assert agcam.scores["box_iou"] == pytest.approx(72 / 166, rel=1e-6)
    alone = localize(heat[None], 0.8)[0]  # no ground truth: regions only
    assert alone.boxes.tolist() == [[8, 4, 20, 12]] and alone.scores == {} and alone.n_gt_boxes is None


def test_localize_reproduces_the_records_of_a_run(tmp_path):
    """A run of six synthetic images (drawn at 160 px, so boxes and masks are rescaled to the
    model's 224 px) and localize() on explain()'s heatmaps of the same images give the same rows."""
    methods, thresholds = ["agcam", "rollout"], [0.3, 0.5]
    cfg = bench_config("dataset.params.num_images=6", "dataset.params.image_size=160", "batch_size=6",
                       f"method=[{','.join(methods)}]", "metric.thresholds=[0.3,0.5]",
                       "metric.box_protocol=agcam", "gallery_images=0", "progress=false", "run_name=api",
                       "report.ci=null", "scoring_workers=0",
                       f"store.root={tmp_path / 'cache'}")
    run(cfg, tmp_path / "run")
    records = pd.read_csv(tmp_path / "run" / "records.csv")
    samples, transform = raw_samples(6, image_size=160), build_transform(cfg)
    own_class = [s.orig_boxes[s.box_labels == s.label] for s in samples]
    masks = [torch.where(m == IGNORE_INDEX, IGNORE_INDEX, (m == s.label + 1).to(torch.uint8))
             for s, m in ((s, transform(s).mask) for s in samples)]
    for method in methods:
        result = explain(SHIPPED, [pil(s) for s in samples], method)
        for threshold in thresholds:
            found = localize(result, threshold, "agcam", boxes=own_class, masks=masks,
                             box_image_sizes=[s.orig_size for s in samples])
            mine = as_frame(found).drop(columns="image")
            mine["prediction"] = result.predictions.numpy()
            mine["degenerate"] = result.degenerate.numpy().astype(int)
            rows = records[(records["method"] == method) & (records["threshold"] == threshold)]
            assert rows["image_id"].tolist() == [s.image_id for s in samples]
            theirs = rows[mine.columns].reset_index(drop=True)
            pd.testing.assert_frame_equal(mine, theirs, check_exact=True, check_dtype=False)


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(README_EXAMPLE, "README example", "exec"), {})
    assert (tmp_path / "agcam.png").is_file() and "box_iou" in capsys.readouterr().out
    assert len(README_EXAMPLE.splitlines()) <= 15
