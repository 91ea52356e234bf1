"""The built-in synthetic localization dataset.

Every image is a pure function of (version, seed, split, index): a cluttered background (a
two-colour gradient, low-frequency noise, random lines) with one to three instances of the
labelled shape class and up to two distractor shapes of no labelled class, each drawn with a
random colour, size, rotation, aspect and texture. There is no centre prior: shapes lie
anywhere (and may be cut by the border), their centres leaning towards the border so that the
ground truth is spread about evenly over the image, and sizes run from a few percent of the
image to a third of it, so a map that ignores the image (a centred blob) scores near chance.
Masks and boxes are exact because the image is drawn from the masks; distractors
are in no mask. The `two_class` variant draws one instance each of two different classes, for
class-sensitivity checks.

Version v3 (this one) replaced v2, whose uniform centres still left more ground truth in the
middle of the image than near the border (shapes there are cut), and v1, whose objects were
large and kept away from the border so that the image centre was usually on one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from wsol_bench.errors import SettingError

from .base import Sample, mask_boxes

CLASS_NAMES = ("circle", "triangle", "square", "star", "cross", "ring")
DISTRACTOR_SHAPES = ("bar", "half_disc", "ell")
# The drawing rules' version: part of every image id and of the random streams, so maps, caches
# and results of another version cannot be mixed with this one's.
VERSION = "v3"
VERSION_CODE = 3
# Shape sizes as the area of the shape's bounding circle over the image area (log-uniform):
# one object, several objects of the labelled class, distractors.
OBJECT_AREA = (0.03, 0.30)
OBJECT_AREA_CROWDED = (0.03, 0.12)
DISTRACTOR_AREA = (0.02, 0.08)
MIN_VISIBLE = 0.6  # a shape cut by the border keeps at least this share of its area
# Each centre coordinate is size * Beta(CENTRE_BETA, CENTRE_BETA): the arcsine law, denser near
# the border than uniform. A uniform centre (v2) still put 57 % of an image's ground truth in the
# central half of its pixels, because shapes near the border are cut (MIN_VISIBLE), and a centred
# blob that ignores the image scored ABPC 12.5 on it (docs/protocol.md 6).
CENTRE_BETA = 0.5
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass
class Scene:
    """A rendered synthetic image with its instances."""

    image: np.ndarray  # uint8 [H, W, 3]
    label: int  # the labelled class
    instance_masks: np.ndarray  # bool [K, H, W], visible pixels of each instance
    instance_labels: np.ndarray  # int [K]
    distractor_masks: np.ndarray  # bool [D, H, W], shapes of no labelled class (in no instance mask)


def _shape_polygon(cls: str, radius: float, angle: float, aspect: float) -> list[np.ndarray]:
    """Outline(s) of a shape centred at the origin; a second polygon is a hole (ring)."""
    def rotate(points: np.ndarray) -> np.ndarray:
        points = points * np.array([aspect, 1.0 / aspect])
        c, s = math.cos(angle), math.sin(angle)
        return points @ np.array([[c, s], [-s, c]])

    def regular(n: int, r: float, phase: float = 0.0) -> np.ndarray:
        t = phase + np.arange(n) * 2 * math.pi / n
        return r * np.stack([np.cos(t), np.sin(t)], 1)

    if cls == "circle":
        return [rotate(regular(64, radius))]
    if cls == "ring":
        return [rotate(regular(64, radius)), rotate(regular(64, radius * 0.55))]
    if cls == "triangle":
        return [rotate(regular(3, radius, -math.pi / 2))]
    if cls == "square":
        return [rotate(regular(4, radius, math.pi / 4))]
    if cls == "star":
        outer = regular(5, radius, -math.pi / 2)
        inner = regular(5, radius * 0.42, -math.pi / 2 + math.pi / 5)
        return [rotate(np.stack([outer, inner], 1).reshape(-1, 2))]
    if cls == "cross":
        a, b = radius, radius * 0.33
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                        [-b, b], [-a, b], [-a, -b], [-b, -b]])
        return [rotate(pts)]
    raise ValueError(f"unknown synthetic class {cls!r}; valid: {CLASS_NAMES}")


def _rasterise(polygons: list[np.ndarray], center: tuple[float, float], size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for i, poly in enumerate(polygons):
        pts = [(float(x + center[0]), float(y + center[1])) for x, y in poly]
        draw.polygon(pts, fill=0 if i else 1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    c0 = rng.uniform(40, 215, 3)
    c1 = np.clip(c0 + rng.uniform(-40, 40, 3), 0, 255)
    t = np.linspace(0, 1, size)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(angle) * t[None, :] + math.sin(angle) * t[:, None])
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    img = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    # Low-frequency blotches (a coarse random grid upsampled) make the background uneven
    # without adding edges; the clutter lines are faint (blended towards the background) so
    # the objects' outlines stay the strongest cue.
    coarse = rng.normal(0, 8, (6, 6)).astype(np.float32)
    img += np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))[..., None]
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 5))):
        pts = [tuple(map(float, rng.uniform(0, size, 2))) for _ in range(int(rng.integers(2, 4)))]
        colour = 0.65 * c0 + 0.35 * rng.uniform(0, 255, 3)
        draw.line(pts, fill=tuple(int(v) for v in colour), width=1)
    return np.asarray(canvas, dtype=np.float32)


def _texture(rng: np.random.Generator, size: int, base: np.ndarray) -> np.ndarray:
    kind = rng.integers(0, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 0:  # solid
        return np.broadcast_to(base, (size, size, 3)).copy()
    other = np.clip(base + rng.uniform(-45, 45, 3), 0, 255)  # subtle: the outline stays the cue
    if kind == 1:  # stripes
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(5, 14)
        wave = (np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period) > 0)
    else:  # checks
        period = rng.uniform(6, 14)
        wave = ((xx // period + yy // period) % 2) == 0
    return np.where(wave[..., None], base, other)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - background).sum() > 150:
            return colour
    return 255.0 - background


def _polygon_area(polygons: list[np.ndarray]) -> float:
    """Area of an outline minus its hole (shoelace formula), in pixels."""
    def shoelace(p: np.ndarray) -> float:
        x, y = p[:, 0], p[:, 1]
        return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return shoelace(polygons[0]) - sum(shoelace(p) for p in polygons[1:])


def _distractor_polygon(kind: str, radius: float, angle: float) -> list[np.ndarray]:
    """A shape of no labelled class: a bar, a half disc or an L, centred at the origin."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])
    if kind == "bar":
        a, b = radius, radius * 0.22
        pts = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
    elif kind == "half_disc":
        t = np.linspace(0.0, math.pi, 33)
        pts = radius * np.stack([np.cos(t), np.sin(t) - 0.4], 1)
    elif kind == "ell":
        a, b = radius * 0.7, radius * 0.25
        pts = np.array([[-a, -a], [-a + 2 * b, -a], [-a + 2 * b, a - 2 * b], [a, a - 2 * b], [a, a], [-a, a]])
    else:
        raise ValueError(f"unknown distractor {kind!r}; valid: {DISTRACTOR_SHAPES}")
    return [pts @ rot]


def _place(rng: np.random.Generator, size: int, taken: np.ndarray, make, area_range: tuple[float, float],
           attempts: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None:
    """Draw a shape of random size anywhere in the image: each centre coordinate follows the
    arcsine law over the whole image, so objects may be cut by the border (at most 40 % of the
    shape), and it keeps a margin from the shapes already placed. Returns (mask, margin mask,
    polygons), or None when no try fits."""
    for _attempt in range(attempts):
        # bounding-circle area, log-uniform: as many small as large objects
        fraction = math.exp(rng.uniform(math.log(area_range[0]), math.log(area_range[1])))
        radius = math.sqrt(fraction * size * size / math.pi)
        centre = tuple(size * rng.beta(CENTRE_BETA, CENTRE_BETA, 2))
        polys = make(radius)
        mask = _rasterise(polys, centre, size)
        visible = mask.sum()
        if visible <= 30 or visible < MIN_VISIBLE * _polygon_area(polys):
            continue
        grown = _rasterise([p * 1.15 for p in polys[:1]], centre, size)
        if not (grown & taken).any():
            return mask, grown, polys
    return None


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, size: int) -> None:
    """Fill `mask` with a texture in a colour that stands out from the background under it."""
    local_bg = image[mask].mean(0)
    tex = _texture(rng, size, _contrasting_colour(rng, local_bg))
    image[mask] = tex[mask]


def render_scene(index: int, *, seed: int = 0, split: str = "val", size: int = 224,
                 two_class: bool = False, num_classes: int = len(CLASS_NAMES)) -> Scene:
    """Draw scene `index` of `split`; the same arguments always give the same pixels.

    One to three instances of the labelled class (or, `two_class`, one each of two classes),
    then zero to two distractors (shapes of no labelled class, not in the masks). Every shape's
    centre follows the arcsine law over the image and its size is log-uniform from a few percent
    of the image."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(SPLIT_CODES)}")
    # Separate streams per split make train and val disjoint by construction; the version code
    # makes them disjoint from earlier versions' streams too.
    rng = np.random.default_rng([seed, SPLIT_CODES[split], int(two_class), index, VERSION_CODE])
    label = int(rng.integers(0, num_classes))
    if two_class:
        other = int((label + rng.integers(1, num_classes)) % num_classes)
        classes = [label, other]
    else:
        classes = [label] * int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    image = _background(rng, size)
    taken = np.zeros((size, size), dtype=bool)
    area_range = OBJECT_AREA if len(classes) == 1 else OBJECT_AREA_CROWDED
    masks: list[np.ndarray] = []
    for cls in classes:
        def make(radius: float, name: str = CLASS_NAMES[cls]) -> list[np.ndarray]:
            return _shape_polygon(name, radius, rng.uniform(0, 2 * math.pi), rng.uniform(0.85, 1.15))
        placed = _place(rng, size, taken, make, area_range, attempts=60)
        if placed is None:  # a crowded image: the smallest size at a random free pixel
            free = np.argwhere(~taken)
            cy, cx = free[int(rng.integers(0, len(free)))] if len(free) else rng.uniform(0, size, 2)
            radius = math.sqrt(area_range[0] * size * size / math.pi)
            polys = make(radius)
            mask = _rasterise(polys, (float(cx), float(cy)), size)
            placed = mask, _rasterise([p * 1.15 for p in polys[:1]], (float(cx), float(cy)), size), polys
        mask, grown, _ = placed
        taken |= grown
        _paint(rng, image, mask, size)
        for m in masks:  # a fallback shape may cover part of an earlier one
            m &= ~mask
        masks.append(mask)
    distractors: list[np.ndarray] = []
    for _ in range(int(rng.choice([0, 1, 2], p=[0.35, 0.4, 0.25]))):
        kind = DISTRACTOR_SHAPES[int(rng.integers(0, len(DISTRACTOR_SHAPES)))]
        angle = rng.uniform(0, 2 * math.pi)
        placed = _place(rng, size, taken, lambda r, k=kind, a=angle: _distractor_polygon(k, r, a),
                        DISTRACTOR_AREA, attempts=20)
        if placed is not None:  # no room left: the image has fewer distractors
            taken |= placed[1]
            _paint(rng, image, placed[0], size)
            distractors.append(placed[0])
    labels = np.array(classes)
    keep = np.array([m.any() for m in masks])
    return Scene(image=np.clip(image, 0, 255).astype(np.uint8), label=label,
                 instance_masks=np.stack(masks)[keep], instance_labels=labels[keep],
                 distractor_masks=np.stack(distractors) if distractors else np.zeros((0, size, size), bool))


class SyntheticShapes(Dataset):
    """Procedural shapes dataset; `transform` maps a `Sample` (e.g. `EvalTransform`)."""

    class_names = CLASS_NAMES

    def __init__(self, split: str = "val", num_images: int = 500, *, seed: int = 0,
                 image_size: int = 224, version: str = VERSION, two_class: bool = False,
                 first_index: int = 0, transform=None) -> None:
        if version != VERSION:
            raise SettingError(f"synthetic: version {version!r} is not drawn by this release; valid: "
                               f"{VERSION!r} (v1, the centred-object set, and v2, uniform centres, "
                               "were replaced)")
        self.version = version
        if split not in SPLIT_CODES:
            raise SettingError(f"synthetic: unknown split {split!r}; valid: {sorted(SPLIT_CODES)}")
        if num_images < 1:
            raise SettingError(f"synthetic: num_images must be >= 1, got {num_images}")
        self.split, self.num_images, self.seed = split, int(num_images), int(seed)
        if first_index < 0:
            raise SettingError(f"synthetic: first_index must be >= 0, got {first_index}")
        self.image_size, self.two_class, self.transform = int(image_size), two_class, transform
        # item i is scene first_index + i: a second training phase can draw images no earlier
        # phase has seen, from the same deterministic stream
        self.first_index = int(first_index)

    @property
    def num_classes(self) -> int:
        return len(CLASS_NAMES)

    def fingerprint(self) -> str:
        """What identifies the data: every image is a pure function of these settings and of
        this module's drawing code."""
        source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
        settings = (self.version, self.split, self.num_images, self.seed, self.image_size, self.two_class,
                    self.first_index)
        return hashlib.sha256(f"{settings}:{source}".encode()).hexdigest()

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        index = self.first_index + index
        scene = render_scene(index, seed=self.seed, split=self.split, size=self.image_size,
                             two_class=self.two_class)
        semantic = np.zeros(scene.image.shape[:2], dtype=np.uint8)
        for m, lab in zip(scene.instance_masks, scene.instance_labels):
            semantic[m] = lab + 1
        boxes = mask_boxes(scene.instance_masks)
        sample = Sample(
            image=torch.from_numpy(scene.image).permute(2, 0, 1).contiguous(),
            label=scene.label,
            boxes=boxes,
            box_labels=torch.from_numpy(scene.instance_labels).long(),
            mask=torch.from_numpy(semantic),
            image_id=f"synthetic{'2c' if self.two_class else ''}-{self.version}_{self.split}_{self.seed}_{index:06d}",
            orig_size=(self.image_size, self.image_size),
        )
        return self.transform(sample) if self.transform is not None else sample


def synthetic_model_inputs(model: torch.nn.Module, count: int, *, split: str = "val",
                           samples: bool = False) -> tuple[torch.Tensor, torch.Tensor] | list[Sample]:
    """The first `count` synthetic images of `split` preprocessed for `model` (its own input size
    and normalisation) as a batch [count, 3, H, W] with their labels; `samples=True` returns the
    transformed samples themselves (boxes and masks at the input size). For benchmarks and
    examples that need a few real inputs without a run."""
    from wsol_bench.models import data_config

    from .base import EvalTransform

    dc = data_config(model)
    transform = EvalTransform(size=dc.input_size[1:], mean=dc.mean, std=dc.std, interpolation=dc.interpolation)
    dataset = SyntheticShapes(split=split, num_images=count, transform=transform)
    items = [dataset[i] for i in range(count)]
    if samples:
        return items
    return torch.stack([s.image for s in items]), torch.tensor([s.label for s in items])
