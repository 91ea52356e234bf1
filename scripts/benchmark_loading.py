"""Images per second of pure ImageNet loading at 224 x 224: decode, squash-resize image and
boxes, normalise, collate (no model), with DataLoader workers 0 and 2 (or as given).

The tree is the three real validation images of the reference data repeated (links, so
nothing is copied) in the wsolevaluation layout, with their real metadata lines:

    python scripts/benchmark_loading.py --data <folder with imagenet-val-samples/ and
        wsolevaluation-metadata/> [--copies 200] [--workers 0 2] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from wsol_bench.datasets import EvalTransform, collate_samples
from wsol_bench.datasets.imagenet import ImageNetVal

SAMPLES = "imagenet-val-samples"
METADATA = "wsolevaluation-metadata/ILSVRC/test"


def build_repeated_tree(data: Path, root: Path, copies: int) -> Path:
    """<root>/val/<renumbered id>.JPEG linking to the sample images, and a metadata folder whose
    lines are the originals' lines under the new ids; returns the metadata folder."""
    sources = sorted((data / SAMPLES).glob("*.JPEG"))
    if not sources:
        raise FileNotFoundError(f"no *.JPEG in {data / SAMPLES}; pass --data <reference data folder>")
    wanted = {f"val/{p.name}" for p in sources}
    lines: dict[str, dict[str, list[str]]] = {}
    for name in ("class_labels.txt", "image_sizes.txt", "localization.txt"):
        for line in (data / METADATA / name).read_text().splitlines():
            key, _, rest = line.partition(",")
            if key in wanted:
                lines.setdefault(name, {}).setdefault(key, []).append(rest)
    (root / "val").mkdir(parents=True)
    metadata = root / "metadata"
    metadata.mkdir()
    out: dict[str, list[str]] = {"image_ids.txt": [], "class_labels.txt": [], "image_sizes.txt": [],
                                 "localization.txt": []}
    for n in range(copies * len(sources)):
        source = sources[n % len(sources)]
        key = f"val/ILSVRC2012_val_{n + 1:08d}.JPEG"
        try:
            os.symlink(source, root / key)
        except OSError:  # file systems without links
            shutil.copyfile(source, root / key)
        out["image_ids.txt"].append(key)
        for name in ("class_labels.txt", "image_sizes.txt", "localization.txt"):
            out[name] += [f"{key},{rest}" for rest in lines[name][f"val/{source.name}"]]
    for name, rows in out.items():
        (metadata / name).write_text("\n".join(rows) + "\n")
    return metadata


def images_per_second(dataset: ImageNetVal, workers: int, batch_size: int) -> float:
    """Throughput of one full pass, worker start-up included (a warm-up batch would hide the
    batches the workers prefetch meanwhile)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_samples)
    count, start = 0, time.perf_counter()
    for batch in loader:
        assert batch.images.shape[1:] == (3, 224, 224)
        count += len(batch) + len(batch.skipped)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="reference data folder (holds imagenet-val-samples/, wsolevaluation-metadata/)")
    parser.add_argument("--copies", type=int, default=200, help="how often the three images are repeated")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one decode/resize per core: what workers do
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        metadata = build_repeated_tree(args.data, root, args.copies)
        transform = EvalTransform((224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        start = time.perf_counter()
        dataset = ImageNetVal(root, metadata=metadata, transform=transform)
        print(f"index: {len(dataset)} images in {time.perf_counter() - start:.3f} s "
              f"({os.cpu_count()} CPUs, batch size {args.batch_size})")
        for workers in args.workers:
            rate = images_per_second(dataset, workers, args.batch_size)
            print(f"workers={workers}: {rate:,.1f} images/s (decode + resize to 224 + normalise + collate)")


if __name__ == "__main__":
    main()
