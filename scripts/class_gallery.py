"""Two-class gallery of the shipped model: for synthetic images that hold two shape classes
A and B, every method explains A and then B, and the figure shows both maps side by side, so
one sees which methods follow the target class and which draw the same map for both.

Usage: python scripts/class_gallery.py [--images 6] [--methods agcam rollout ...]
                                        [--out results/figures/class_gallery.png] [--device cpu]
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import torch
import yaml

from wsol_bench.datasets import EvalTransform, Sample, build_dataset
from wsol_bench.methods import available, get_explainer
from wsol_bench.models import data_config, load_model
from wsol_bench.report.figures import class_gallery, denormalize


def second_class(sample: Sample) -> int | None:
    """The class of the image's other object (None when it was fully hidden)."""
    others = [int(c) for c in sample.box_labels.tolist() if int(c) != int(sample.label)]
    return others[0] if others else None


def two_class_samples(dataset, count: int) -> list[tuple[Sample, int]]:
    """The first `count` images of `dataset` that show two classes, with class B of each."""
    found = []
    for i in range(len(dataset)):
        sample = dataset[i]
        other = second_class(sample) if isinstance(sample, Sample) else None
        if other is not None:
            found.append((sample, other))
        if len(found) == count:
            return found
    raise ValueError(f"only {len(found)} of the {len(dataset)} images show two classes; "
                     f"ask for fewer than {count} images")


def default_methods() -> list[str]:
    """The main job's methods (the `method` list of conf/config.yaml's defaults)."""
    config = yaml.safe_load((resources.files("wsol_bench.conf") / "config.yaml").read_text())
    return next(entry["method"] for entry in config["defaults"] if isinstance(entry, dict) and "method" in entry)


def make_class_gallery(path: Path, *, num_images: int = 6, methods: list[str] | None = None,
                       model_name: str = "wsol_synthetic_vit", split: str = "val", seed: int = 0,
                       device: str = "cpu") -> Path:
    """Explain class A (the label) and class B (the other object) of `num_images` two-class
    synthetic images with every method and draw `class_gallery` to `path`."""
    model = load_model(model_name, pretrained=True, device=device)
    dc = data_config(model)
    transform = EvalTransform(dc.input_size[1:], dc.mean, dc.std, dc.interpolation)
    # A few spare images in case an object was hidden behind the other one.
    dataset = build_dataset("synthetic_two_class", transform=transform, split=split,
                            num_images=2 * num_images + 8, seed=seed)
    pairs = two_class_samples(dataset, num_images)
    samples = [s for s, _ in pairs]
    images = torch.stack([s.image for s in samples])
    class_a = torch.tensor([s.label for s in samples])
    class_b = torch.tensor([b for _, b in pairs])
    maps = {}
    for name in methods or default_methods():
        explainer = get_explainer(name, model)
        maps[name] = tuple(explainer(images, targets).maps.cpu() for targets in (class_a, class_b))
    names = dataset.class_names
    return class_gallery(
        [denormalize(s.image, transform.mean, transform.std) for s in samples],
        [(s.boxes[s.box_labels == a], s.boxes[s.box_labels == b]) for s, a, b in zip(samples, class_a, class_b)],
        maps, path, [(names[a], names[b]) for a, b in zip(class_a.tolist(), class_b.tolist())],
        titles=[s.image_id for s in samples])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6, help="number of two-class images (rows)")
    parser.add_argument("--methods", nargs="+", default=None, help=f"default: the main job's ({', '.join(default_methods())}); any of "
                        f"{', '.join(available())}")
    parser.add_argument("--out", type=Path, default=Path("results/figures/class_gallery.png"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")
    args = parser.parse_args()
    path = make_class_gallery(args.out, num_images=args.images, methods=args.methods, seed=args.seed,
                              device=args.device)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
