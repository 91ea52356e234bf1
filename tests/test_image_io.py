"""Image reading: decode by content, conversions are noted, broken files raise clearly."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsol_bench.datasets.image_io import ImageReadError, read_palette_indices, read_rgb


def _pattern(h: int = 24, w: int = 32) -> np.ndarray:
    """A smooth RGB pattern (JPEG keeps smooth images close to the original)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 90)], -1).astype(np.uint8)


def _save(image: Image.Image, path: Path, fmt: str, **kwargs) -> Path:
    image.save(path, format=fmt, **kwargs)
    return path


def test_plain_rgb_png_is_exact_and_has_no_notes(tmp_path: Path) -> None:
    arr = _pattern()
    image, notes = read_rgb(_save(Image.fromarray(arr), tmp_path / "a.png", "PNG"))
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 32)
    assert torch.equal(image, torch.from_numpy(arr).permute(2, 0, 1))
    assert notes == ()


def test_plain_rgb_jpeg_has_no_notes(tmp_path: Path) -> None:
    image, notes = read_rgb(_save(Image.fromarray(_pattern()), tmp_path / "a.JPEG", "JPEG"))
    assert image.shape == (3, 24, 32) and notes == ()


def test_cmyk_jpeg_is_converted_and_noted(tmp_path: Path) -> None:
    arr = _pattern()
    path = _save(Image.fromarray(arr).convert("CMYK"), tmp_path / "cmyk.JPEG", "JPEG", quality=98)
    assert Image.open(path).mode == "CMYK"
    image, notes = read_rgb(path)
    assert notes == ("cmyk converted to rgb",)
    assert image.shape == (3, 24, 32)
    # CMYK -> RGB round trip through lossy JPEG stays close to the original colours.
    assert (image.permute(1, 2, 0).int() - torch.from_numpy(arr).int()).abs().float().mean() < 6


def test_greyscale_jpeg_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = _pattern()[..., 0]
    image, notes = read_rgb(_save(Image.fromarray(grey, "L"), tmp_path / "g.jpg", "JPEG", quality=98))
    assert notes == ("greyscale converted to rgb",)
    assert image.shape == (3, 24, 32)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert (image[0].int() - torch.from_numpy(grey).int()).abs().max() <= 8


def test_rgba_png_drops_alpha_keeps_colours(tmp_path: Path) -> None:
    arr = _pattern()
    rgba = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 7, np.uint8)], -1)
    image, notes = read_rgb(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png", "PNG"))
    assert notes == ("alpha channel dropped",)
    assert torch.equal(image, torch.from_numpy(arr).permute(2, 0, 1))


def test_jpeg_named_png_is_decoded_by_content(tmp_path: Path) -> None:
    arr = _pattern()
    honest = _save(Image.fromarray(arr), tmp_path / "a.jpg", "JPEG")
    lying = tmp_path / "b.png"
    lying.write_bytes(honest.read_bytes())
    image, notes = read_rgb(lying)
    assert notes == ("file extension .png but content is jpeg",)
    assert torch.equal(image, read_rgb(honest)[0])


def test_file_without_extension_is_noted(tmp_path: Path) -> None:
    path = tmp_path / "noext"
    path.write_bytes(_save(Image.fromarray(_pattern()), tmp_path / "a.png", "PNG").read_bytes())
    assert read_rgb(path)[1] == ("file extension (none) but content is png",)


def test_exif_rotation_is_not_applied_but_noted(tmp_path: Path) -> None:
    arr = _pattern()
    exif = Image.Exif()
    exif[0x0112] = 6
    image, notes = read_rgb(_save(Image.fromarray(arr), tmp_path / "r.jpg", "JPEG", exif=exif))
    assert image.shape == (3, 24, 32)  # stored orientation, not rotated to 32 x 24
    assert notes == ("exif orientation 6 ignored (pixels used as stored)",)


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_jpeg_raises_naming_the_file(tmp_path: Path, keep: float) -> None:
    data = _save(Image.fromarray(_pattern(64, 64)), tmp_path / "full.jpg", "JPEG").read_bytes()
    path = tmp_path / "cut.JPEG"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageReadError, match=r"cut\.JPEG.*truncated or corrupt"):
        read_rgb(path)


def test_garbage_and_missing_files_raise(tmp_path: Path) -> None:
    garbage = tmp_path / "x.JPEG"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageReadError, match=r"x\.JPEG is not a recognised image format"):
        read_rgb(garbage)
    with pytest.raises(ImageReadError, match=r"cannot read image file .*missing\.jpg"):
        read_rgb(tmp_path / "missing.jpg")


def test_sixteen_bit_png_is_refused_not_clipped(tmp_path: Path) -> None:
    deep = (np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16)
    path = _save(Image.fromarray(deep), tmp_path / "deep.png", "PNG")
    with pytest.raises(ImageReadError, match=r"deep\.png has high bit depth .*convert it to 8-bit"):
        read_rgb(path)


def test_palette_indices_are_raw_not_colours(tmp_path: Path) -> None:
    idx = np.zeros((10, 12), np.uint8)
    idx[2:5, 3:9] = 15
    idx[7:, :] = 255
    pal = Image.fromarray(idx, "P")
    pal.putpalette([0, 0, 0, 128, 0, 0] * 128)
    path = _save(pal, tmp_path / "seg.png", "PNG")
    out = read_palette_indices(path)
    assert out.dtype == torch.uint8 and torch.equal(out, torch.from_numpy(idx))
    # The same file through read_rgb gives colours, which is what must be avoided for masks.
    rgb, notes = read_rgb(path)
    assert notes == ("palette converted to rgb",) and int(rgb[0, 3, 4]) == 128


def test_greyscale_mask_is_read_as_is(tmp_path: Path) -> None:
    soft = (np.arange(60).reshape(6, 10) * 4).astype(np.uint8)
    path = _save(Image.fromarray(soft, "L"), tmp_path / "soft.png", "PNG")
    assert torch.equal(read_palette_indices(path), torch.from_numpy(soft))


def test_rgb_mask_is_refused(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_pattern()), tmp_path / "colour.png", "PNG")
    with pytest.raises(ImageReadError, match=r"colour\.png has mode RGB, not a palette"):
        read_palette_indices(path)


def test_real_jpeg_with_png_name(shared_data: Path) -> None:
    path = shared_data / "multi-class-samples" / "tusker_zebra.png"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    image, notes = read_rgb(path)
    assert image.shape == (3, 225, 225) and image.dtype == torch.uint8
    assert notes == ("file extension .png but content is jpeg",)


def test_real_files_match_torchvision_decoder(shared_data: Path) -> None:
    """Pillow and torchvision (both libjpeg-turbo / libpng) must give identical pixels."""
    io = pytest.importorskip("torchvision.io")
    files = sorted((shared_data / "imagenet-val-samples").glob("*.JPEG"))
    files += sorted((shared_data / "multi-class-samples").glob("*.png"))
    if not files:
        pytest.skip("no real sample images found")
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision >= 0.29 warns that its decoders are deprecated
            reference = io.decode_image(io.read_file(str(path)), mode=io.ImageReadMode.RGB)
        assert torch.equal(read_rgb(path)[0], reference), path.name
