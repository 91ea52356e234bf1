"""Reading image files robustly: decode by content, convert to RGB, say what was converted.

Real datasets hold files that are not what their names say (ImageNet has CMYK and greyscale
JPEGs; a .png file may hold JPEG data). `read_rgb` decodes whatever the bytes are, returns
uint8 RGB and a note for each conversion, so a run can count them; a file that cannot be
decoded, or is no regular file (a named pipe, a device), raises `ImageReadError` naming the
file and the reason, which datasets turn into a `SkippedSample`. Paths in messages are shown
as `records.display_name` does, so a reason stays writable to skipped.csv whatever bytes a
folder name holds.

Decoding uses Pillow, which identifies the format from the file's content and is what the
reference implementations (the AG-CAM release, wsolevaluation) use, so pixels match theirs.
torchvision's decoders give identical pixels for JPEG and PNG but are deprecated from
torchvision 0.29 on. EXIF orientation is NOT applied: dataset annotations refer to the pixels
as stored, so the image must be used as stored (a note says when a file carries a rotation).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .records import display_name, read_regular_file

# Extensions that honestly describe each format Pillow can report.
_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "MPO": {".jpg", ".jpeg", ".jpe", ".jfif", ".mpo"},  # multi-picture JPEG (camera files)
    "PNG": {".png"},
    "GIF": {".gif"},
    "BMP": {".bmp", ".dib"},
    "WEBP": {".webp"},
    "TIFF": {".tif", ".tiff"},
    "PPM": {".ppm", ".pgm", ".pbm", ".pnm"},
}
_MODE_NOTES = {
    "L": "greyscale converted to rgb",
    "LA": "greyscale with alpha converted to rgb (alpha dropped)",
    "1": "bilevel converted to rgb",
    "CMYK": "cmyk converted to rgb",
    "RGBA": "alpha channel dropped",
    "RGBX": "padding channel dropped",
    "P": "palette converted to rgb",
    "PA": "palette with alpha converted to rgb (alpha dropped)",
    "YCbCr": "ycbcr converted to rgb",
    "LAB": "lab converted to rgb",
    "HSV": "hsv converted to rgb",
}
# Errors Pillow raises for unreadable, truncated or corrupt data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
_EXIF_ORIENTATION = 0x0112


class ImageReadError(Exception):
    """An image file that cannot be used; the message names the file and why."""


def _open_bytes(path: Path) -> bytes:
    """The bytes of the image file at `path`; `ImageReadError` for a file that cannot be read
    and for anything that is not a regular file (a named pipe would block the read forever)."""
    shown = display_name(str(path))
    try:
        return read_regular_file(path)
    except OSError as err:
        raise ImageReadError(f"cannot read image file {shown}: {err.strerror or err}") from err


def _extension_note(path: Path, image_format: str | None) -> tuple[str, ...]:
    fmt = image_format or "unknown"
    if path.suffix.lower() in _EXTENSIONS.get(fmt, set()):
        return ()
    return (f"file extension {path.suffix or '(none)'} but content is {fmt.lower()}",)


def _orientation_note(image: Image.Image) -> tuple[str, ...]:
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except _DECODE_ERRORS:  # broken EXIF does not make the pixels unusable
        return ("unreadable exif data ignored",)
    if orientation in (None, 1):
        return ()
    return (f"exif orientation {orientation} ignored (pixels used as stored)",)


def read_rgb(path: str | Path) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Decode the image at `path` by its content; return (uint8 [3, H, W] RGB, notes).

    The notes name each conversion made ("cmyk converted to rgb", "greyscale converted to
    rgb", "file extension .png but content is jpeg", ...); empty for a plain RGB file with an
    honest extension. Raises `ImageReadError` for a missing, truncated, corrupt or
    unsupported (e.g. 16-bit) file."""
    path = Path(path)
    data, shown = _open_bytes(path), display_name(str(path))
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: truncation and corruption surface here
            notes = _extension_note(path, image.format) + _orientation_note(image)
            mode = image.mode
            if mode.startswith(("I", "F")):
                # Pillow would clip 16-bit and float data to 0..255 silently.
                raise ImageReadError(
                    f"image file {shown} has high bit depth (mode {mode}); convert it to 8-bit RGB")
            if mode != "RGB":
                notes += (_MODE_NOTES.get(mode, f"{mode.lower()} converted to rgb"),)
                image = image.convert("RGB")
            pixels = np.asarray(image, dtype=np.uint8)
    except ImageReadError:
        raise
    except Image.UnidentifiedImageError as err:
        raise ImageReadError(f"image file {shown} is not a recognised image format "
                             f"({len(data)} bytes)") from err
    except _DECODE_ERRORS as err:
        raise ImageReadError(f"image file {shown} is truncated or corrupt: {err}") from err
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous(), notes


def read_palette_indices(path: str | Path) -> torch.Tensor:
    """The raw pixel values of a palette ("P") or greyscale ("L") PNG, uint8 [H, W].

    Segmentation masks store class indices as palette indices; converting them to RGB would
    turn indices into colours, so they are read without any conversion. Any other mode raises
    `ImageReadError`."""
    path = Path(path)
    data, shown = _open_bytes(path), display_name(str(path))
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode not in ("P", "L"):
                raise ImageReadError(
                    f"mask file {shown} has mode {image.mode}, not a palette (P) or greyscale (L) "
                    "image; segmentation masks must store class indices, not colours")
            indices = np.array(image, dtype=np.uint8)
    except ImageReadError:
        raise
    except Image.UnidentifiedImageError as err:
        raise ImageReadError(f"mask file {shown} is not a recognised image format") from err
    except _DECODE_ERRORS as err:
        raise ImageReadError(f"mask file {shown} is truncated or corrupt: {err}") from err
    return torch.from_numpy(indices)
