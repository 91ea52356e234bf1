"""Sizes the suite refuses before it starts the work that would need them: the memory of the
machine, the share of it one estimate may take, and the largest image it draws or reads. It
imports nothing heavy: the setting checks use it before torch loads."""

from __future__ import annotations

import os

from wsol_bench.errors import SettingError, UserError

# An estimate counts the largest tensors of a step only (an input batch, the attention maps of a
# pass, an image being drawn); what it leaves out (the activations of the MLPs, gradients, the
# batches the loader prefetches, the libraries) takes about as much again, so one estimate may
# use at most half of the memory.
MEMORY_SHARE = 0.5


def machine_memory() -> int | None:
    """Bytes of physical memory of this machine; None where the system does not tell."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def gib(size: float) -> str:
    """A byte count in GiB, as the refusals print it."""
    return f"{size / 2**30:.2f} GiB"


def memory_limit(total: int | None = None) -> int | None:
    """The bytes one estimate may take: `MEMORY_SHARE` of `total` (default: this machine's
    memory); None when the total is unknown (nothing is refused then)."""
    total = machine_memory() if total is None else total
    return None if total is None else int(total * MEMORY_SHARE)


def check_memory(estimate: int, what: str, fix: str, *, total: int | None = None,
                 where: str = "this machine's memory", error: type[UserError] = SettingError) -> None:
    """Refuse (as `error`) work whose estimated bytes exceed `memory_limit(total)`; the message
    names `what` needs them, the estimate, the limit and `fix`."""
    total = machine_memory() if total is None else total
    limit = memory_limit(total)
    if limit is not None and estimate > limit:
        raise error(f"{what} needs about {gib(estimate)}, more than the {gib(limit)} allowed ({MEMORY_SHARE:.0%} "
                    f"of {where}, {gib(total)}); {fix}")


def max_image_pixels() -> int | None:
    """The most pixels one image may have: Pillow's decompression-bomb limit
    (`PIL.Image.MAX_IMAGE_PIXELS`), which the suite's image reader applies to image files, so a
    drawn, stored or resized image obeys the same bound; None where a caller switched it off."""
    from PIL import Image  # light, and only needed when an image size is checked

    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else int(limit)


def check_image_pixels(height: int, width: int, what: str, fix: str, error: type[UserError] = SettingError) -> None:
    """Refuse an image of `height` x `width` pixels beyond `max_image_pixels()`."""
    limit = max_image_pixels()
    if limit is not None and int(height) * int(width) > limit:
        raise error(f"{what} is {height}x{width} = {int(height) * int(width):,} pixels, more than the {limit:,} "
                    f"one image may have (Pillow's decompression-bomb limit, also applied to image files); {fix}")
