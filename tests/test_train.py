"""wsol-bench-train: schedule, augmentation, image cache, loss, exact resume, weights the
benchmark reproduces, presets, and bad settings (exit code 2 through the CLI)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from wsol_bench.cli import train as train_cli
from wsol_bench.datasets import EvalTransform, Sample, SkippedSample, build_dataset, collate_samples, registry
from wsol_bench.datasets.base import normalize_image
from wsol_bench.errors import InputFileError, MissingInputError, UserError
from wsol_bench.models import ModelLoadError, load_model
from wsol_bench.train import recipe as train_recipe
from wsol_bench.train.data import (
    CachedBatches,
    LabelledImage,
    augment_batch,
    collate_labelled,
    dihedral,
    normalize_batch,
)
from wsol_bench.train.image_cache import DatasetSpec, ImageCache, cached_images, read_cache
from wsol_bench.train.trainer import Recipe, Trainer, autocast_dtype, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
TINY_KWARGS = "{img_size:32,patch_size:8,embed_dim:24,depth:2,num_heads:3}"
TINY = ["model.name=vit_tiny_patch16_224", f"++model.kwargs={TINY_KWARGS}", "preprocess.input_size=[32,32]",
        "dataset.params.image_size=32", "train.train_params.num_images=64", "train.val_params.num_images=32",
        "train.batch_size=16", "train.epochs=2", "num_workers=0", "progress=false", "threads=1"]


def make_cfg(tmp_path: Path, *overrides: str):
    """The trainer config of a tiny run (32 px images, 2-block ViT) writing under tmp_path."""
    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        return compose("trainer", overrides=[*TINY, f"cache_dir={tmp_path / 'cache'}", *overrides])


def run_cli(monkeypatch, tmp_path: Path, *overrides: str) -> None:
    """`wsol-bench-train` in this process (so test-registered datasets are visible)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["wsol-bench-train", *TINY, f"cache_dir={tmp_path / 'cache'}",
                                      f"hydra.run.dir={tmp_path / 'hydra'}", *overrides])
    train_cli.main()


def tiny_vit(num_classes: int) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=2,
                             num_heads=3, num_classes=num_classes)


def tiny_val_correct(weights: Path) -> int:
    """Correct top-1 of the benchmark's loader and transform on the tiny runs' 32 val images."""
    model = load_model("vit_tiny_patch16_224", checkpoint=weights, img_size=32, patch_size=8, embed_dim=24,
                       depth=2, num_heads=3)
    assert model.num_classes == 6
    transform = EvalTransform((32, 32), (0.5,) * 3, (0.5,) * 3)
    dataset = build_dataset("synthetic", split="val", num_images=32, image_size=32, transform=transform)
    batch = collate_samples([dataset[i] for i in range(32)])
    with torch.no_grad():
        return int((model(batch.images).argmax(1) == batch.labels).sum())


# ---------------------------------------------------------------- pieces


def test_warmup_cosine_hand_values():
    """Linear warm-up (s+1)/w, then cosine from 1 to the floor at the last step."""
    f = warmup_cosine(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # 0.55
    assert f(10) == pytest.approx(0.1) and f(12) == pytest.approx(0.1)
    assert warmup_cosine(4, 0, 0.0)(0) == 1.0


def test_dihedral_applies_each_of_the_eight_symmetries():
    """Op k: flip when bit 2 is set, then k & 3 quarter turns; 8 distinct results, per image."""
    image = torch.arange(9.0).view(1, 1, 3, 3)
    batch = image.repeat(8, 1, 1, 1)
    out = dihedral(batch, torch.arange(8))
    expected = [torch.rot90(image[0].flip(-1) if k & 4 else image[0], k & 3, dims=(-2, -1)) for k in range(8)]
    for k in range(8):
        assert torch.equal(out[k], expected[k]), k
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8
    assert torch.equal(out[1, 0], torch.tensor([[2.0, 5, 8], [1, 4, 7], [0, 3, 6]]))  # hand-rotated
    with pytest.raises(ValueError, match="square"):
        dihedral(torch.zeros(2, 3, 4, 5), torch.zeros(2, dtype=torch.long))


def test_batch_augmentations_are_seeded_and_permute_pixels():
    x = torch.rand(16, 3, 8, 8)
    a = augment_batch("dihedral", x, torch.Generator().manual_seed(3))
    b = augment_batch("dihedral", x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(a.flatten(1).sort(1).values, x.flatten(1).sort(1).values)  # same pixels, moved
    flipped = augment_batch("hflip", x, torch.Generator().manual_seed(0))
    for i in range(16):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    assert torch.equal(augment_batch("none", x, torch.Generator()), x)
    with pytest.raises(ValueError, match="train.augment"):
        augment_batch("mixup", x, torch.Generator())


def test_normalize_batch_equals_benchmark_normalisation():
    """Cached uint8 batches become exactly the benchmark's per-image normalised input."""
    images = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    batch = normalize_batch(images, mean, std)
    for i in range(4):
        assert torch.equal(batch[i], normalize_image(images[i], mean, std))


def test_collate_drops_and_counts_skipped_items():
    items = [LabelledImage(torch.zeros(3, 2, 2), 1, "a"), SkippedSample("b", "corrupt jpeg"),
             LabelledImage(torch.ones(3, 2, 2), 4, "c")]
    batch = collate_labelled(items)
    assert batch.images.shape == (2, 3, 2, 2) and batch.labels.tolist() == [1, 4]
    assert [s.image_id for s in batch.skipped] == ["b"]
    assert collate_labelled([SkippedSample("x", "r")]).labels.numel() == 0


def test_image_cache_equals_eval_transform_and_is_reused(tmp_path):
    """Cached pixels equal the benchmark's resize; a second call maps the same files; other
    parameters get another entry; parallel decoding gives the same bytes."""
    spec = DatasetSpec("synthetic", {"split": "val", "num_images": 6, "image_size": 48})
    cache = cached_images(spec, (32, 32), "bilinear", cache_dir=tmp_path, workers=0)
    transform = EvalTransform((32, 32), (0.5,) * 3, (0.5,) * 3)
    dataset = build_dataset("synthetic", split="val", num_images=6, image_size=48)
    for i in range(6):
        sample = dataset[i]
        assert cache.labels[i] == sample.label
        expected = transform(sample).image
        assert torch.equal(normalize_batch(torch.from_numpy(np.array(cache.images[i:i + 1])), (0.5,) * 3,
                                           (0.5,) * 3)[0], expected)
    again = cached_images(spec, (32, 32), "bilinear", cache_dir=tmp_path, workers=0)
    assert again.seconds == 0.0 and isinstance(again.images, np.memmap)
    assert np.array_equal(again.images, cache.images)
    other = DatasetSpec("synthetic", {"split": "val", "num_images": 5, "image_size": 48})
    cached_images(other, (32, 32), "bilinear", cache_dir=tmp_path, workers=0)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    parallel = cached_images(spec, (32, 32), "bilinear", cache_dir=None, workers=2)
    assert np.array_equal(parallel.images, cache.images) and np.array_equal(parallel.labels, cache.labels)


def test_precision_settings():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("fp16", torch.device("cuda")) is torch.float16
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    with pytest.raises(ValueError, match="train.precision=fp16 needs device=cuda"):
        autocast_dtype("fp16", torch.device("cpu"))


def test_training_attention_kernel_follows_the_recipe():
    """train.fused_attention picks the attention kernel of every block; null keeps timm's default."""
    model = timm.create_model("wsol_synthetic_vit", pretrained=False, depth=2)
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(attention) == 2
    for setting, expected in ((False, False), (True, True), (None, timm.layers.use_fused_attn())):
        train_recipe.prepare_for_training(model, setting)
        assert [m.fused_attn for m in attention] == [expected, expected]


def test_a_few_steps_reduce_the_loss():
    """Eighty steps on 32 synthetic images lower the loss on those images clearly."""
    dataset = build_dataset("synthetic", split="train", num_images=32, image_size=32)
    images = np.stack([dataset[i].image.numpy() for i in range(32)])
    labels = np.array([dataset[i].label for i in range(32)])
    cache = ImageCache(images, labels, [])
    batches = CachedBatches(cache, 16, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), shuffle=True)
    torch.manual_seed(0)
    model = tiny_vit(6)
    trainer = Trainer(model, Recipe(epochs=40, batch_size=16, lr=3e-3, warmup_epochs=0, label_smoothing=0.0),
                      len(batches), torch.device("cpu"), 6, seed=0)
    x = normalize_batch(torch.from_numpy(images), (0.5,) * 3, (0.5,) * 3)

    def loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model.eval()(x), torch.from_numpy(labels)))

    before = loss()
    for _ in range(40):
        stats = trainer.train_epoch(batches.epoch(trainer.order_rng))
    assert trainer.state.step == 80 and stats["images"] == 32
    assert loss() < before - 0.3


def test_epoch_sizes_downsample_the_train_batches_of_each_epoch():
    """Progressive resizing: epoch k trains at epoch_sizes[k], on a copy of the cache
    downsampled once (antialiased, uint8 like the cache); same order as at full size; the
    position embedding keeps its shape; each epoch's stats record its size."""
    dataset = build_dataset("synthetic", split="train", num_images=16, image_size=32)
    images = np.stack([dataset[i].image.numpy() for i in range(16)])
    cache = ImageCache(images, np.array([dataset[i].label for i in range(16)]), [])
    batches = CachedBatches(cache, 8, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), shuffle=True)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=2,
                              num_heads=3, num_classes=6, dynamic_img_size=True)
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    trainer = Trainer(model, Recipe(epochs=2, batch_size=8, lr=1e-3, epoch_sizes=[16, 32]), len(batches),
                      torch.device("cpu"), 6, seed=0)
    sizes = []
    for _ in range(2):
        sizes.append(trainer.epoch_size)
        stats = trainer.train_epoch(batches.epoch(trainer.order_rng, trainer.epoch_size))
        trainer.finish_epoch(stats, correct=0, counted=0, val_skipped=0)
    assert sizes == [16, 32] and [h["train_size"] for h in trainer.state.history] == [16, 32]
    assert [tuple(x.shape[-2:]) for x in seen] == [(16, 16)] * 2 + [(32, 32)] * 2
    assert model.pos_embed.shape == (1, 1 + 16, 24)
    # the first epoch's order (the trainer's order stream starts at the seed), downsampled by hand
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    small = torch.nn.functional.interpolate(torch.from_numpy(images).float(), size=(16, 16), mode="bilinear",
                                            antialias=True).round().clamp(0, 255).to(torch.uint8)
    for b, x in enumerate(seen[:2]):
        expected = normalize_batch(small[order[b * 8:(b + 1) * 8]], (0.5,) * 3, (0.5,) * 3)
        assert (x - expected).abs().max() <= 2.5 / 255 * 2  # at most a rounding step apart
    full = next(batches.epoch(torch.Generator().manual_seed(0), size=32))
    assert torch.equal(full.images, normalize_batch(torch.from_numpy(images[order[:8].numpy()]), (0.5,) * 3,
                                                    (0.5,) * 3))
    with pytest.raises(ValueError, match="one per epoch"):
        Recipe(epochs=3, batch_size=8, lr=1e-3, epoch_sizes=[16, 32])
    assert Recipe(epochs=3, batch_size=8, lr=1e-3, epoch_sizes=16).epoch_sizes == (16, 16, 16)


def test_progressive_run_exports_weights_of_the_plain_architecture(tmp_path):
    """A run with smaller early epochs writes weights that the benchmark's plain (fixed-size)
    model loads strictly, with the val accuracy logged at the full size."""
    cfg = make_cfg(tmp_path, "train.epoch_sizes=[16,32]")
    record = train_recipe.train_from_config(cfg, tmp_path / "out")
    assert [h["train_size"] for h in record["history"]] == [16, 32]
    assert "val_acc_at_train_size" in record["history"][0] and "val_acc_at_train_size" not in record["history"][1]
    assert "dynamic_img_size" not in record["kwargs"]
    assert tiny_val_correct(tmp_path / "out" / "model.safetensors") == record["history"][-1]["val_correct"]


# ---------------------------------------------------------------- whole runs


_RUNS: dict[str, tuple] = {}


def straight(kind: str, tmp_path_factory) -> tuple:
    """Two epochs without interruption (one per kind and module): image cache + dihedral,
    or DataLoader + timm crops."""
    if kind not in _RUNS:
        tmp = tmp_path_factory.mktemp(f"straight_{kind}")
        extra = [] if kind == "cache" else ["train.cache=false", "train.augment=timm",
                                            "train.timm_augment.scale=[0.5,1.0]"]
        _RUNS[kind] = (kind, extra, tmp, train_recipe.train_from_config(make_cfg(tmp, *extra), tmp / "out"))
    return _RUNS[kind]


@pytest.fixture(params=["cache", "stream"])
def straight_run(request, tmp_path_factory):
    return straight(request.param, tmp_path_factory)


def test_straight_run_writes_weights_record_and_checkpoint(straight_run):
    _, _, tmp, record = straight_run
    out = tmp / "out"
    for name in ("model.safetensors", "model.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "model.json").read_text())
    assert saved["history"] == record["history"] and saved["steps"] == record["steps"]
    assert saved["epochs"] == 2 and saved["steps"] == 2 * (64 // 16) and saved["images_seen"] == 128
    assert [h["epoch"] for h in saved["history"]] == [1, 2]
    assert saved["final_val_acc"] == saved["history"][-1]["val_acc"]
    assert saved["val_images"] == 32 and saved["images_per_second"] > 0
    assert saved["recipe"]["train"]["epochs"] == 2 and saved["num_classes"] == 6
    assert saved["train_dataset"]["params"]["split"] == "train"
    assert saved["val_dataset"]["params"]["split"] == "val"


def test_resume_continues_to_identical_weights(straight_run):
    """1 epoch, stop, resume 1 epoch == 2 epochs straight (weights bit-identical, same steps)."""
    _, extra, tmp, record = straight_run
    out = tmp / "resumed"
    first = train_recipe.train_from_config(make_cfg(tmp, *extra, "stop_after_epochs=1"), out)
    assert first == {"complete": False, "epoch": 1} and not (out / "model.safetensors").exists()
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert payload["state"]["epoch"] == 1 and payload["state"]["step"] == 4
    resumed = train_recipe.train_from_config(make_cfg(tmp, *extra), out)
    assert resumed["steps"] == record["steps"]
    a, b = load_file(str(tmp / "out" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep = ("epoch", "step", "train_loss", "val_acc", "val_correct", "lr")
    assert [{k: h[k] for k in keep} for h in resumed["history"]] == [{k: h[k] for k in keep}
                                                                    for h in record["history"]]


def test_resume_with_other_settings_is_refused(straight_run):
    _, extra, tmp, _ = straight_run
    with pytest.raises(ValueError, match=r"train.lr: 0.0005 -> 0.002"):
        train_recipe.train_from_config(make_cfg(tmp, *extra, "train.lr=2e-3"), tmp / "out")
    with pytest.raises(MissingInputError, match="resume=true"):
        train_recipe.train_from_config(make_cfg(tmp, *extra, "resume=true"), tmp / "empty")


class _Opaque:
    """An arbitrary Python object: torch.load(weights_only=True) refuses to unpickle it."""


def _write_bad_checkpoint(path: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        path.write_bytes(b"not a torch file\n" * 8)
    elif kind == "pickle":  # the keys of a real checkpoint, and a Python object
        torch.save({"format": 1, "fingerprint": {}, "state": _Opaque()}, path)
    else:  # another program's checkpoint: a plain state dict
        torch.save(tiny_vit(6).state_dict(), path)


@pytest.mark.parametrize("kind", ["garbage", "pickle", "state_dict"])
def test_resume_refuses_an_unreadable_checkpoint_in_one_line(tmp_path, kind):
    """A file the trainer cannot resume from is a UserError naming it and the fix, not a
    traceback (resume=auto and resume=true alike)."""
    ckpt = tmp_path / "out" / "checkpoint.pt"
    _write_bad_checkpoint(ckpt, kind)
    for resume in ("auto", "true"):
        with pytest.raises(UserError) as info:
            train_recipe.resume_if_asked(OmegaConf.create({"resume": resume}), None, {}, ckpt)
        message = str(info.value)
        assert str(ckpt) in message and "resume=false" in message and "\n" not in message, message
        assert isinstance(info.value, ModelLoadError if kind != "state_dict" else InputFileError)
    if kind == "pickle":
        assert "_Opaque" in message


def test_train_from_config_refuses_a_garbage_checkpoint(tmp_path):
    """The function the command calls: a damaged checkpoint in out_dir ends in one line."""
    out = tmp_path / "out"
    _write_bad_checkpoint(out / "checkpoint.pt", "garbage")
    cfg = make_cfg(tmp_path, "train.cache=false", "train.train_params.num_images=16",
                   "train.val_params.num_images=4")
    start = re.escape(f"cannot read checkpoint {out / 'checkpoint.pt'} ")
    with pytest.raises(ModelLoadError, match=rf"^{start}.*resume=false"):
        train_recipe.train_from_config(cfg, out)


def test_damaged_image_cache_is_refused_naming_the_folder(tmp_path):
    spec = DatasetSpec("synthetic", {"split": "val", "num_images": 2, "image_size": 32})
    cache = cached_images(spec, (32, 32), "bilinear", cache_dir=tmp_path, workers=0)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert read_cache(folder, (32, 32)).labels.tolist() == cache.labels.tolist()
    with pytest.raises(InputFileError, match="not the 2 uint8 3x16x16 images"):
        read_cache(folder, (16, 16))
    (folder / "labels.npy").write_bytes(b"\x93NUMPY cut short")
    start = re.escape(f"image cache {folder} is unreadable ")
    with pytest.raises(InputFileError, match=rf"^{start}.*delete that folder"):
        cached_images(spec, (32, 32), "bilinear", cache_dir=tmp_path, workers=0)


def test_load_model_reproduces_the_logged_val_accuracy(straight_run):
    """The benchmark's loader and transform on the val split give the logged accuracy."""
    _, _, tmp, record = straight_run
    correct = tiny_val_correct(tmp / "out" / "model.safetensors")
    assert correct == record["history"][-1]["val_correct"]
    assert record["final_val_acc"] == correct / 32


def test_benchmark_cli_loads_the_trained_weights(tmp_path_factory, tmp_path, command):
    """`wsol-bench` with the overrides the record gives runs on the trained file unchanged."""
    _, _, _, record = straight("cache", tmp_path_factory)
    args = [*record["benchmark_overrides"], "dataset.params.image_size=32", "dataset.params.num_images=4",
            "method=[rollout]", "batch_size=4", "progress=false", "gallery_images=0",
            f"store.root={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = command("wsol-bench", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "records.csv").is_file()


class _SometimesCorrupt(torch.utils.data.Dataset):
    """Synthetic images where every 4th item is unreadable (a `SkippedSample`)."""

    def __init__(self, transform=None, **params) -> None:
        self.inner, self.transform = build_dataset("synthetic", **params), transform
        self.num_classes = self.inner.num_classes

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        item = SkippedSample(f"img{i}", "corrupt jpeg") if i % 4 == 3 else self.inner[i]
        return self.transform(item) if self.transform else item


@pytest.mark.parametrize("cache", [True, False])
def test_skipped_items_are_dropped_and_counted(monkeypatch, tmp_path, cache):
    monkeypatch.setitem(registry._BUILDERS, "sometimes_corrupt",
                        lambda transform=None, **p: _SometimesCorrupt(transform, **p))
    cfg = make_cfg(tmp_path, "dataset.name=sometimes_corrupt", f"train.cache={str(cache).lower()}",
                   "train.epochs=1")
    record = train_recipe.train_from_config(cfg, tmp_path / "out")
    assert record["history"][0]["val_images"] == 24 and record["history"][0]["val_correct"] <= 24
    if cache:  # dropped once, when decoding: 16 of 64 train items, 8 of 32 val items
        assert record["cache_skipped"] == {"train": 16, "val": 8}
        assert record["images_seen"] == 48 and record["steps"] == 48 // 16
    else:  # dropped in collate, every epoch, and counted per reason
        assert record["skipped_train_items"] == {"corrupt jpeg": 16}
        assert record["history"][0]["train_skipped"] == {"corrupt jpeg": 16}
        assert record["history"][0]["val_skipped"] == 8
        assert record["images_seen"] == 48 and record["steps"] == 64 // 16


def test_shipped_architecture_round_trip(tmp_path):
    """The default recipe's model (wsol_synthetic_vit from scratch, 224 px) for one step: the
    file loads under the shipped name and gives the logged accuracy."""
    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        cfg = compose("trainer", overrides=["train.train_params.num_images=16", "train.batch_size=16",
                                            "train.val_params.num_images=8", "train.epochs=1",
                                            "num_workers=0",
                                            "progress=false", "threads=1", f"cache_dir={tmp_path / 'cache'}"])
    record = train_recipe.train_from_config(cfg, tmp_path / "out")
    assert record["steps"] == 1 and record["benchmark_overrides"][0] == "model.name=wsol_synthetic_vit"
    model = load_model("wsol_synthetic_vit", checkpoint=tmp_path / "out" / "model.safetensors", num_classes=6)
    transform = EvalTransform((224, 224), (0.5,) * 3, (0.5,) * 3)
    dataset = build_dataset("synthetic", split="val", num_images=8, transform=transform)
    batch = collate_samples([dataset[i] for i in range(8)])
    with torch.no_grad():
        correct = int((model(batch.images).argmax(1) == batch.labels).sum())
    assert correct == record["history"][0]["val_correct"]


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("preset,dataset,model", [
    ("synthetic", "synthetic", "wsol_synthetic_vit"),
    ("voc_single_class", "voc", "vit_base_patch16_224.orig_in21k_ft_in1k"),
    ("cub", "cub", "vit_base_patch16_224.orig_in21k_ft_in1k"),
])
def test_presets_compose(preset, dataset, model):
    if not (ROOT / "conf" / "dataset" / f"{dataset}.yaml").is_file():
        pytest.skip(f"conf/dataset/{dataset}.yaml is not in this checkout")
    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        cfg = compose("trainer", overrides=[f"train={preset}"])
    assert cfg.dataset.name == dataset and cfg.model.name == model
    assert cfg.train.train_params.split != cfg.train.val_params.split
    recipe = train_recipe.recipe_from(cfg)
    assert recipe.epochs >= 1 and recipe.lr > 0
    if preset == "synthetic":  # the model's own 224 px throughout, bf16 with the unfused kernel
        assert recipe.epoch_sizes is None and "first_index" not in cfg.train.train_params
        assert recipe.precision == "bf16" and recipe.fused_attention is False
    else:
        assert list(cfg.preprocess.input_size) == [224, 224] and list(cfg.preprocess.mean) == [0.5] * 3
        assert cfg.model.pretrained and recipe.augment == "timm" and not cfg.train.cache


def test_default_is_the_synthetic_recipe():
    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        cfg = compose("trainer")
    assert cfg.dataset.name == "synthetic" and cfg.model.name == "wsol_synthetic_vit"
    assert not cfg.model.pretrained
    assert cfg.train.cache and cfg.train.augment == "dihedral" and cfg.train.val_params.num_images == 1000


# ---------------------------------------------------------------- bad input


def _expect_exit_2(monkeypatch, capsys, tmp_path, *overrides: str) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(monkeypatch, tmp_path, *overrides)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_unknown_model_exits_2(monkeypatch, capsys, tmp_path):
    err = _expect_exit_2(monkeypatch, capsys, tmp_path, "model.name=no_such_vit", f"out_dir={tmp_path / 'o'}")
    assert "model.name='no_such_vit'" in err and "timm model" in err


def test_unwritable_out_dir_exits_2(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = _expect_exit_2(monkeypatch, capsys, tmp_path, f"out_dir={blocker / 'run'}")
    assert f"out_dir={blocker / 'run'}" in err and "writable" in err


class _NoLabels(torch.utils.data.Dataset):
    """A dataset with boxes but no classification labels."""

    def __init__(self, transform=None, **_: object) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return 40


class _UnknownLabels(_NoLabels):
    """Images whose class is unknown (label -1, as an unlabelled test split would give)."""

    num_classes = 6

    def __getitem__(self, i: int) -> Sample:
        sample = Sample(torch.zeros(3, 32, 32, dtype=torch.uint8), -1, torch.zeros(0, 4), f"img{i}", (32, 32))
        return self.transform(sample) if self.transform else sample


@pytest.mark.parametrize("cls,message", [(_NoLabels, "has no class labels"),
                                         (_UnknownLabels, "image img0 has no class label (label=-1)")])
def test_dataset_without_labels_exits_2(monkeypatch, capsys, tmp_path, cls, message):
    monkeypatch.setitem(registry._BUILDERS, "unlabelled", lambda transform=None, **p: cls(transform, **p))
    err = _expect_exit_2(monkeypatch, capsys, tmp_path, "dataset=synthetic", "dataset.name=unlabelled",
                         f"out_dir={tmp_path / 'o'}")
    assert message in err and "dataset" in err


def test_checkpoint_with_other_class_count_exits_2_unless_head_reset(monkeypatch, capsys, tmp_path):
    ckpt = tmp_path / "five_classes.safetensors"
    save_file(tiny_vit(5).state_dict(), str(ckpt))
    err = _expect_exit_2(monkeypatch, capsys, tmp_path, f"model.checkpoint={ckpt}",
                         f"out_dir={tmp_path / 'o'}")
    assert f"model.checkpoint={ckpt} has a 5-class head" in err and "train.reset_head=true" in err
    cfg = make_cfg(tmp_path, f"model.checkpoint={ckpt}", "train.reset_head=true", "train.epochs=1")
    record = train_recipe.train_from_config(cfg, tmp_path / "reset")
    assert record["num_classes"] == 6
    state = load_file(str(tmp_path / "reset" / "model.safetensors"))
    assert state["head.weight"].shape == (6, 24)


def test_bad_recipe_settings_exit_2(monkeypatch, capsys, tmp_path):
    err = _expect_exit_2(monkeypatch, capsys, tmp_path, "train.augment=mixup", f"out_dir={tmp_path / 'o'}")
    assert "train.augment='mixup'" in err
    err = _expect_exit_2(monkeypatch, capsys, tmp_path, "+train.lr_decay=0.5", f"out_dir={tmp_path / 'o'}")
    assert "unknown key train.lr_decay; valid keys here: train_params" in err


@pytest.mark.parametrize("override,message", [
    ("train.lr_decay=0.5", "unknown key train.lr_decay; valid keys here: train_params, val_params"),
    ("train.epochs=many", "train.epochs: Value 'many' of type 'str' could not be converted to Integer"),
    ("train.timm_augment=0.5", "train.timm_augment: Cannot assign float to Dict[str, Any]"),
    ("dataset.params.image_sise=32", "unknown key dataset.params.image_sise"),
])
def test_bad_types_and_keys_are_refused_when_composing(monkeypatch, capsys, tmp_path, override, message):
    """The train preset's schema refuses them before any work: one line, exit code 2."""
    err = _expect_exit_2(monkeypatch, capsys, tmp_path, override, f"out_dir={tmp_path / 'o'}")
    assert err.startswith(f"wsol-bench-train: error: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
    err = _expect_exit_2(monkeypatch, capsys, tmp_path, "train.augment=timm", f"out_dir={tmp_path / 'o'}")
    assert "train.cache=false" in err


# ---------------------------------------------------------------- the shipped model's recipe script


@pytest.mark.slow  # a script end to end: `pytest -m slow` (CI runs it)
def test_train_synthetic_script_trains_and_installs_without_paths(tmp_path, monkeypatch):
    """scripts/train_synthetic.py (shrunk by overrides): one run of the recipe at the input size,
    its weights installed byte for byte, and the installed record names no folder of this machine."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_synthetic", ROOT / "scripts" / "train_synthetic.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "WEIGHTS", tmp_path / "weights" / "wsol_synthetic_vit")
    (tmp_path / "weights").mkdir()
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["train_synthetic.py", "--out-dir", str(out), "--",
                                      "train.train_params.num_images=16", "train.val_params.num_images=8",
                                      "train.batch_size=8", "train.epochs=1", "num_workers=0", "threads=1",
                                      "progress=false"])
    script.main()
    record = json.loads((tmp_path / "weights" / "wsol_synthetic_vit.json").read_text())
    train = record["recipe"]["train"]
    assert train["lr"] == 5e-4 and train["precision"] == "bf16" and train["fused_attention"] is False
    assert train["epoch_sizes"] is None and record["history"][0]["train_size"] is None
    assert record["final_val_acc"] == record["history"][-1]["val_acc"]
    assert len(list((out / "cache").iterdir())) == 2  # train and val
    text = json.dumps(record)
    assert str(tmp_path) not in text and record["benchmark_command"] == "wsol-bench model=wsol_synthetic_vit"
    assert record["recipe_wall_clock_minutes"] >= 0 and record["command"] == "python scripts/train_synthetic.py"
    installed = load_file(str(tmp_path / "weights" / "wsol_synthetic_vit.safetensors"))
    trained = load_file(str(out / "run" / "model.safetensors"))
    assert installed.keys() == trained.keys() and all(torch.equal(installed[k], trained[k]) for k in trained)
