"""OpenImages30k (wsolevaluation's PxAP benchmark): index, masks (union, binarisation, ignore),
skip reasons, the transform, the real upstream metadata, and an end-to-end PxAP run."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import MISSING
from PIL import Image

from wsol_bench.config.datasets import DATASET_SCHEMAS, OpenImagesParams
from wsol_bench.datasets import EvalTransform, Sample, SkippedSample, build_dataset
from wsol_bench.datasets.base import IGNORE_INDEX
from wsol_bench.datasets.openimages import OpenImagesDataset, binarize_mask

W, H = 40, 30  # image size of the tiny tree (width, height)
META = Path("metadata") / "OpenImages" / "test"


def _png(path: Path, array: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode=mode if mode != "RGB" else None).save(path)


def _rect(y0: int, y1: int, x0: int, x1: int, value: int = 255, size=(H, W)) -> np.ndarray:
    m = np.zeros(size, dtype=np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def make_tree(root: Path) -> Path:
    """wsolevaluation's layout: <root>/test/<class>/<id>.jpg with the masks beside the images,
    <root>/metadata/OpenImages/test/*.txt. Two classes (folders 0aaa, 0bbb)."""
    rng = np.random.default_rng(0)
    ids = ["test/0aaa/a1.jpg", "test/0aaa/a2.jpg", "test/0bbb/b1.jpg", "test/0bbb/b2.jpg",
           "test/0bbb/b3.jpg", "test/0bbb/b4.jpg", "test/0bbb/b5.jpg", "test/0bbb/b6.jpg"]
    for image_id in ids:
        (root / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / image_id)
    (root / "test/0bbb/b5.jpg").write_bytes(b"not a jpeg")  # corrupt image
    # a1: two instance masks, one soft (values 1 and 128 are object, 0 is not), and an ignore
    # mask overlapping the first instance (the overlap stays object)
    soft = _rect(2, 10, 2, 12, 128)
    soft[2, 2] = 1
    soft[9, 11] = 0
    _png(root / "test/0aaa/a1_m0aaa_1.png", soft)
    _png(root / "test/0aaa/a1_m0aaa_2.png", _rect(20, 28, 30, 38))
    _png(root / "test/0aaa/a1_ignore.png", _rect(0, 15, 0, 20))
    # a2: one mask, ignore mask; b1: no ignore mask; b2: no mask line; b3: mask file missing;
    # b4: mask of another size
    _png(root / "test/0aaa/a2_m0aaa_1.png", _rect(5, 25, 10, 30))
    _png(root / "test/0aaa/a2_ignore.png", _rect(0, 3, 0, 3))
    _png(root / "test/0bbb/b1_m0bbb_1.png", _rect(10, 20, 5, 35))
    _png(root / "test/0bbb/b4_m0bbb_1.png", _rect(0, 5, 0, 5, size=(H + 1, W)))
    _png(root / "test/0bbb/b5_m0bbb_1.png", _rect(0, 5, 0, 5))
    _png(root / "test/0bbb/b6_m0bbb_1.png", _rect(0, 0, 0, 0))  # b6: an empty mask (kept: all negatives)
    meta = root / META
    meta.mkdir(parents=True)
    (meta / "image_ids.txt").write_text("\n".join(ids))  # no final newline, as upstream
    (meta / "class_labels.txt").write_text("\n".join(f"{i},{0 if '0aaa' in i else 1}" for i in ids) + "\n")
    (meta / "image_sizes.txt").write_text("")
    (meta / "localization.txt").write_text(
        "test/0aaa/a1.jpg,test/0aaa/a1_m0aaa_1.png,test/0aaa/a1_ignore.png\n"
        "test/0aaa/a1.jpg,test/0aaa/a1_m0aaa_2.png,\n"
        "test/0aaa/a2.jpg,test/0aaa/a2_m0aaa_1.png,test/0aaa/a2_ignore.png\n"
        "test/0bbb/b1.jpg,test/0bbb/b1_m0bbb_1.png,\n"
        "test/0bbb/b3.jpg,test/0bbb/b3_m0bbb_1.png,test/0bbb/b3_ignore.png\n"
        "test/0bbb/b4.jpg,test/0bbb/b4_m0bbb_1.png,\n"
        "test/0bbb/b5.jpg,test/0bbb/b5_m0bbb_1.png,\n"
        "test/0bbb/b6.jpg,test/0bbb/b6_m0bbb_1.png,\n")
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "OpenImages")


def _items(ds) -> dict[str, Sample | SkippedSample]:
    return {r.image_id: ds[i] for i, r in enumerate(ds.records)}


def test_index_labels_and_class_names(tree):
    ds = build_dataset("openimages", root=str(tree))
    assert ds.metadata_dir == tree / META
    assert ds.class_names == ("0aaa", "0bbb") and ds.num_classes == 2
    assert [r.image_id for r in ds.records] == ["test/0aaa/a1.jpg", "test/0aaa/a2.jpg", "test/0bbb/b1.jpg",
                                                "test/0bbb/b3.jpg", "test/0bbb/b4.jpg", "test/0bbb/b5.jpg",
                                                "test/0bbb/b6.jpg"]
    assert [r.label for r in ds.records] == [0, 0, 1, 1, 1, 1, 1]
    assert ds.mask_paths["test/0aaa/a1.jpg"] == ["test/0aaa/a1_m0aaa_1.png", "test/0aaa/a1_m0aaa_2.png"]
    assert ds.ignore_paths["test/0aaa/a1.jpg"] == "test/0aaa/a1_ignore.png"
    [skip] = ds.skipped
    assert skip.image_id == "test/0bbb/b2.jpg" and skip.reason.startswith("no instance mask")
    # the parent of the data folder and the metadata folder itself resolve too
    other = build_dataset("openimages", root=str(tree.parent), metadata=str(tree / "metadata" / "OpenImages"))
    assert other.data_dir == tree and len(other) == len(ds)
    assert build_dataset("openimages", root=str(tree), num_images=2).records[-1].image_id == "test/0aaa/a2.jpg"


def test_masks_union_binarisation_and_ignore(tree):
    items = _items(OpenImagesDataset(tree))
    a1 = items["test/0aaa/a1.jpg"]
    assert tuple(a1.mask.shape) == (H, W) and a1.image.shape == (3, H, W) and a1.label == 0
    expected = np.zeros((H, W), dtype=np.uint8)
    ignore = _rect(0, 15, 0, 20) > 0
    expected[ignore] = IGNORE_INDEX
    fg = (_rect(2, 10, 2, 12) > 0) | (_rect(20, 28, 30, 38) > 0)
    fg[9, 11] = False  # the soft mask's 0 pixel; its 1 pixel (2, 2) is object: value > 0.5, not / 255
    expected[fg] = 1  # label + 1; union of both instances wins over the ignore mask
    np.testing.assert_array_equal(a1.mask.numpy(), expected)
    assert a1.mask[2, 2] == 1 and a1.mask[9, 11] == IGNORE_INDEX
    assert a1.boxes.tolist() == [[2, 2, 12, 10], [30, 20, 38, 28]]  # tight boxes of the instances
    np.testing.assert_array_equal(binarize_mask(np.array([0, 1, 127, 128, 255])), [False, True, True, True, True])
    b1 = items["test/0bbb/b1.jpg"]
    assert set(np.unique(b1.mask.numpy())) == {0, 2}  # class 1 -> 2; no ignore mask: every pixel counts
    assert "no ignore mask: every pixel counts" in b1.notes
    b6 = items["test/0bbb/b6.jpg"]  # kept, as wsolevaluation keeps it: its pixels are PxAP negatives
    assert not b6.mask.any() and len(b6.boxes) == 0
    assert "no object pixel in any instance mask (all pixels are negatives)" in b6.notes


def test_masks_equal_the_reference_get_mask(tree):
    """At wsolevaluation's 224x224, the transformed mask equals evaluation.py's get_mask:
    cv2 greyscale read, INTER_NEAREST resize of each mask, > 0.5, union, ignore minus object."""
    cv2 = pytest.importorskip("cv2")
    ds = OpenImagesDataset(tree, transform=EvalTransform((224, 224), (0.5,) * 3, (0.5,) * 3))

    def load(relative):
        mask = np.float32(cv2.imread(str(tree / relative), cv2.IMREAD_GRAYSCALE))
        return cv2.resize(mask, (224, 224), interpolation=cv2.INTER_NEAREST)

    checked = 0
    for sample in _items(ds).values():
        if isinstance(sample, SkippedSample):
            continue
        fg = np.stack([load(m) > 0.5 for m in ds.mask_paths[sample.image_id]]).any(0)
        ignore_path = ds.ignore_paths[sample.image_id]
        ignore = (load(ignore_path) > 0.5) & ~fg if ignore_path else np.zeros_like(fg)
        reference = fg.astype(np.uint8) + 255 * ignore.astype(np.uint8)
        ours = sample.mask.numpy().copy()
        ours[(ours != 0) & (ours != IGNORE_INDEX)] = 1
        np.testing.assert_array_equal(ours, reference, err_msg=sample.image_id)
        checked += 1
    assert checked == 4


def test_masks_at_a_size_where_the_nearest_rules_differ_equal_get_mask(tmp_path):
    """36x36 images (OpenCV and torch's nearest rules pick different source columns at output
    column 168): two instance masks, one of them ending at the differing column, an ignore box
    and a second image, each equal to a step-by-step transcription of wsolevaluation's get_mask
    (cv2 greyscale read as float32, INTER_NEAREST to 224, > 0.5 per instance, union, ignore
    minus foreground, foreground 1 and ignore 255)."""
    cv2 = pytest.importorskip("cv2")
    root, size = tmp_path / "OpenImages", (36, 36)
    ids = ["test/0aaa/c1.jpg", "test/0aaa/c2.jpg"]
    rng = np.random.default_rng(1)
    for image_id in ids:
        _png(root / image_id, rng.integers(0, 256, (*size, 3)), "RGB")
    _png(root / "test/0aaa/c1_m0aaa_1.png", _rect(3, 20, 27, 36, size=size))  # columns 27-35
    _png(root / "test/0aaa/c1_m0aaa_2.png", _rect(22, 33, 1, 9, 200, size=size))
    _png(root / "test/0aaa/c1_ignore.png", _rect(0, 36, 20, 30, size=size))
    _png(root / "test/0aaa/c2_m0aaa_1.png", _rect(10, 26, 26, 31, size=size))
    meta = root / META
    meta.mkdir(parents=True)
    (meta / "image_ids.txt").write_text("\n".join(ids))
    (meta / "class_labels.txt").write_text("".join(f"{i},0\n" for i in ids))
    (meta / "localization.txt").write_text(
        "test/0aaa/c1.jpg,test/0aaa/c1_m0aaa_1.png,test/0aaa/c1_ignore.png\n"
        "test/0aaa/c1.jpg,test/0aaa/c1_m0aaa_2.png,\n"
        "test/0aaa/c2.jpg,test/0aaa/c2_m0aaa_1.png,\n")
    ds = OpenImagesDataset(root, transform=EvalTransform((224, 224), (0.5,) * 3, (0.5,) * 3))

    def load_mask_image(relative):  # evaluation.py: float32 greyscale, then cv2.resize
        return cv2.resize(np.float32(cv2.imread(str(root / relative), cv2.IMREAD_GRAYSCALE)), (224, 224),
                          interpolation=cv2.INTER_NEAREST)

    def get_mask(mask_paths, ignore_path):
        instances = np.stack([load_mask_image(m) > 0.5 for m in mask_paths], axis=0).any(axis=0)
        ignore_box = load_mask_image(ignore_path) > 0.5 if ignore_path else np.zeros_like(instances)
        ignore = np.logical_and(ignore_box, np.logical_not(instances))
        return instances.astype(np.uint8) + 255 * ignore.astype(np.uint8)

    items = _items(ds)
    for image_id, sample in items.items():  # class 0: the suite's label + 1 is get_mask's 1
        reference = get_mask(ds.mask_paths[image_id], ds.ignore_paths[image_id])
        np.testing.assert_array_equal(sample.mask.numpy(), reference, err_msg=image_id)
    # output column 168 reads source column 26 (ignore box) in OpenCV, 27 (object) in torch's rule
    c1 = items["test/0aaa/c1.jpg"].mask
    assert c1[50, 168] == IGNORE_INDEX and c1[50, 169] == 1


def test_skip_reasons_name_the_file(tree):
    items = _items(OpenImagesDataset(tree))
    assert isinstance(items["test/0bbb/b3.jpg"], SkippedSample)
    assert "b3_m0bbb_1.png" in items["test/0bbb/b3.jpg"].reason
    assert items["test/0bbb/b4.jpg"].reason == ("mask test/0bbb/b4_m0bbb_1.png is 40x31 but the image is "
                                               "40x30")
    assert "b5.jpg" in items["test/0bbb/b5.jpg"].reason


def test_index_errors_name_file_and_line(tree):
    loc = tree / META / "localization.txt"
    loc.write_text(loc.read_text().replace("a1_m0aaa_2.png,", "a1_m0aaa_2.png,test/0aaa/a1_ignore.png"))
    with pytest.raises(ValueError, match=r"localization.txt:2: a second ignore mask"):
        OpenImagesDataset(tree)
    (tree / META / "class_labels.txt").write_text("test/0aaa/a1.jpg;0\n")
    with pytest.raises(ValueError, match=r"class_labels.txt:1: expected 2"):
        OpenImagesDataset(tree)
    with pytest.raises(FileNotFoundError, match="no wsolevaluation OpenImages metadata"):
        OpenImagesDataset(tree / "test")


def test_transform_moves_masks_with_the_image(tree):
    ds = OpenImagesDataset(tree, transform=EvalTransform((60, 80), (0.5,) * 3, (0.5,) * 3))
    a1 = _items(ds)["test/0aaa/a1.jpg"]
    raw = _items(OpenImagesDataset(tree))["test/0aaa/a1.jpg"].mask
    assert a1.image.shape == (3, 60, 80) and tuple(a1.mask.shape) == (60, 80)
    np.testing.assert_array_equal(a1.mask.numpy(), raw.numpy().repeat(2, 0).repeat(2, 1))  # nearest, x2
    assert a1.boxes.tolist() == [[4, 4, 24, 20], [60, 40, 76, 56]]


def test_params_mirror_the_class_and_are_registered():
    params = {p.name: (MISSING if p.default is p.empty else p.default)
              for p in inspect.signature(OpenImagesDataset).parameters.values() if p.name != "transform"}
    assert {f.name: f.default for f in dataclasses.fields(OpenImagesParams)} == params
    assert "openimages" in DATASET_SCHEMAS


def test_real_metadata_counts(shared_data):
    folder = shared_data / "wsolevaluation-metadata" / "OpenImages" / "test"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    ds = OpenImagesDataset(folder.parent, metadata=folder.parent)  # images need not exist
    assert ds.metadata_dir == folder
    # 5,000 image lines (the last without a newline, so `wc -l` counts 4,999), 100 classes
    assert len(ds.records) == 5000 and not ds.skipped
    assert ds.num_classes == 100 and len(set(ds.class_names)) == 100
    assert sum(len(m) for m in ds.mask_paths.values()) == 7632
    assert sum(1 for p in ds.ignore_paths.values() if p) == 5000
    assert ds.records[0].image_id == "test/01226z/7af766bd43da900b.jpg" and ds.records[0].label == 0
    assert len(ds.mask_paths["test/01226z/7af766bd43da900b.jpg"]) == 2


def test_cli_writes_pxap(tree, tmp_path, command):
    args = ["experiment=wsoleval_openimages", f"dataset.params.root={tree}",
           "model=vit_base_orig", "model.name=vit_tiny_patch16_224", "model.pretrained=false",
           "++model.kwargs.num_classes=2", "method=[rollout,center]", "progress=false", "gallery_images=0",
           "batch_size=4", "num_workers=0", "scoring_workers=0", f"store.root={tmp_path}/cache",
           f"hydra.run.dir={tmp_path}/run"]
    done = command("wsol-bench", args, Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "run" / "wsoleval.csv")
    assert set(table["method"]) == {"rollout", "center"}
    assert table["pxap"].between(0, 100).all() and table["pxap"].notna().all()
    assert (table["n_images"] == 4).all()  # a1, a2, b1 and b6 (empty mask: negatives only)
    skipped = pd.read_csv(tmp_path / "run" / "skipped.csv")
    assert len(skipped) == 4  # b2 (no mask), b3 (missing mask), b4 (size), b5 (corrupt image)


def test_preset_composes_the_wsolevaluation_protocol():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=wsoleval_openimages"])
    assert cfg.dataset.name == "openimages" and cfg.dataset.params.split == "test"
    assert OmegaConf.is_missing(cfg.dataset.params, "root") and OmegaConf.is_missing(cfg.model, "checkpoint")
    assert cfg.target == "label" and cfg.metric.image_filter == "all"
    assert cfg.sweep.step == 0.01 and cfg.sweep.start == 0.0 and cfg.sweep.stop == 1.0
    assert list(cfg.preprocess.input_size) == [224, 224] and cfg.preprocess.resize == "squash"
    assert list(cfg.preprocess.mean) == [0.485, 0.456, 0.406] and list(cfg.preprocess.std) == [0.229, 0.224, 0.225]
