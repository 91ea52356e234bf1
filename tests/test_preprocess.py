"""Preprocessing gives the reference implementations' pixels bit for bit: the paper presets'
`Resize((224, 224))` and timm's eval transform, both applied by torchvision to the decoded PIL
image, on the real ImageNet val images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from wsol_bench.datasets.base import EvalTransform, Sample, resize_image, resize_mask
from wsol_bench.datasets.image_io import read_rgb

REAL_IMAGES = ("ILSVRC2012_val_00000125", "ILSVRC2012_val_00001372", "ILSVRC2012_val_00001854")
HALF = (0.5, 0.5, 0.5)


def real_image_paths(shared: Path) -> list[Path]:
    folder = shared / "imagenet-val-samples"
    paths = [folder / f"{name}.JPEG" for name in REAL_IMAGES]
    if not all(p.is_file() for p in paths):
        pytest.skip("imagenet-val-samples absent")
    return paths


def sample_of(path: Path) -> Sample:
    image, _ = read_rgb(path)
    width, height = image.shape[-1], image.shape[-2]
    return Sample(image, 0, torch.tensor([[10.0, 20.0, 110.0, 220.0]]), path.stem, (width, height))


def test_paper_preset_resize_is_pils_bit_for_bit(shared_data: Path) -> None:
    """The paper presets' transform equals Resize((224, 224)) + ToTensor + Normalize(0.5, 0.5) on
    the PIL image, to the last bit, for all three real images (none of them is 224 x 224)."""
    reference = T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize(HALF, HALF)])
    ours = EvalTransform((224, 224), HALF, HALF, interpolation="bilinear", resize="squash")
    for path in real_image_paths(shared_data):
        pil = Image.open(path).convert("RGB")
        assert pil.size != (224, 224)
        sample = sample_of(path)
        resized = resize_image(sample.image, (224, 224), "bilinear")
        pil_resized = np.asarray(pil.resize((224, 224), Image.Resampling.BILINEAR))
        assert np.array_equal(resized.permute(1, 2, 0).numpy(), pil_resized), path.name
        assert torch.equal(ours(sample).image, reference(pil)), path.name
        # The tensor resize this replaces differs from the reference in some pixel values.
        tensor_path = TF.resize(sample.image, [224, 224], antialias=True)
        assert not torch.equal(tensor_path, resized)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_timm_resize_is_timms_transform_bit_for_bit(shared_data: Path, interpolation: str) -> None:
    """preprocess.resize=timm equals timm's own eval transform (shorter side to
    floor(224 / crop_pct), the longer truncated as torchvision does, centre crop) on the PIL image."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = timm.data.create_transform(input_size=(3, 224, 224), crop_pct=0.875, interpolation=interpolation,
                                           mean=mean, std=std)
    ours = EvalTransform((224, 224), mean, std, interpolation=interpolation, resize="timm", crop_pct=0.875)
    for path in real_image_paths(shared_data):
        pil = Image.open(path).convert("RGB")
        assert torch.equal(ours(sample_of(path)).image, reference(pil)), path.name


def test_timm_resize_truncates_the_longer_side() -> None:
    """A 300 x 257 image (shorter side 257 -> 256): the longer side is int(256 * 300 / 257) =
    int(298.83) = 298, as torchvision computes it, where rounding would give 299."""
    image = torch.randint(0, 256, (3, 257, 300), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sample = Sample(image, 0, torch.tensor([[100.0, 50.0, 200.0, 150.0]]), "x", (300, 257))
    out = EvalTransform((224, 224), HALF, HALF, resize="timm", crop_pct=0.875)(sample)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(HALF, HALF)])(pil)
    assert T.Resize(256)(pil).size == (298, 256)
    assert torch.equal(out.image, reference)
    # the box followed the image: scaled by 298 / 300 and 256 / 257, shifted by the crop offset
    left, top = round((298 - 224) / 2.0), round((256 - 224) / 2.0)
    expected = [100 * 298 / 300 - left, 50 * 256 / 257 - top, 200 * 298 / 300 - left, 150 * 256 / 257 - top]
    assert out.boxes[0].tolist() == pytest.approx(expected, abs=1e-4)


def test_image_at_the_target_size_is_left_alone() -> None:
    image = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    sample = Sample(image, 0, torch.zeros(0, 4), "x", (224, 224))
    out = EvalTransform((224, 224), HALF, HALF)(sample)
    assert torch.equal(out.image, image.float().div(255).sub(0.5).div(0.5))


def test_masks_resize_as_opencv_inter_nearest() -> None:
    """Label masks keep their values and take source pixel floor(i * scale), as cv2.resize with
    INTER_NEAREST does (wsolevaluation's mask resize)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 256, (375, 500), dtype=np.uint8)
    ours = resize_mask(torch.from_numpy(mask), (224, 224)).numpy()
    assert np.array_equal(ours, cv2.resize(mask, (224, 224), interpolation=cv2.INTER_NEAREST))
    assert set(np.unique(ours)) <= set(np.unique(mask))


def test_bad_interpolation_and_bad_image_are_named() -> None:
    image = torch.zeros(3, 10, 10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="interpolation"):
        resize_image(image, (5, 5), "cubic-ish")
    with pytest.raises(ValueError, match="uint8"):
        resize_image(image.float(), (5, 5))


def test_mask_resize_is_opencv_inter_nearest_for_every_source_length() -> None:
    """Every source length 1..2048 resized to 224 (rows and columns) takes exactly OpenCV's
    INTER_NEAREST source pixels; torch's nearest rule, which the suite used before, differs from
    it for hundreds of lengths (36: output column 168 reads source 26 in OpenCV, 27 in torch)."""
    cv2 = pytest.importorskip("cv2")
    differ = 0
    for length in range(1, 2049):
        values = (np.arange(length, dtype=np.int64) % 251).astype(np.uint8)  # neighbours always differ
        rows, cols = np.repeat(values[:, None], 2, 1), np.repeat(values[None, :], 2, 0)
        for mask, size in ((rows, (224, 2)), (cols, (2, 224))):
            ours = resize_mask(torch.from_numpy(mask), size).numpy()
            assert np.array_equal(ours, cv2.resize(mask, size[::-1], interpolation=cv2.INTER_NEAREST)), length
        torch_rule = torch.nn.functional.interpolate(torch.from_numpy(cols)[None, None].float(), size=(2, 224),
                                                     mode="nearest")[0, 0].to(torch.uint8).numpy()
        differ += not np.array_equal(torch_rule, resize_mask(torch.from_numpy(cols), (2, 224)).numpy())
    assert differ > 100  # the test can tell the two rules apart
    column = resize_mask(torch.from_numpy(np.tile(np.arange(36, dtype=np.uint8), (36, 1))), (224, 224))[:, 168]
    assert (column == 26).all()
