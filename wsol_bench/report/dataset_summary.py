"""What a dataset holds (images, boxes, classes) and what loading it runs into.

Annotation index protocol (optional, for any dataset): a dataset that exposes `records`, a
sequence aligned with its items (`records[i]` describes `dataset[i]`) whose elements have
`image_id`, `label` and `boxes` (anything with `len()` = the number of boxes) and optionally
`notes` (a tuple of strings), can be summarised without decoding a single image. A dataset may
also expose `skipped`, the `SkippedSample`s its index left out. Datasets without `records`
(e.g. the synthetic one) are summarised by loading every item.

`check_images=True` loads every item through a DataLoader (worker processes decode in
parallel) and counts the items that come back as `SkippedSample` (unreadable or unusable
files) and the notes of those that load (conversions, clipping, size mismatches). Loaded items
also give the split's ground-truth coverage: where objects lie, as the share of images whose
ground truth (mask where the dataset has one, else the union of boxes) covers each cell of a
COVERAGE_GRID x COVERAGE_GRID grid over the image, so a centre prior shows at a glance.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from wsol_bench.datasets.base import IGNORE_INDEX, Sample, SkippedSample, boxes_to_mask
from wsol_bench.errors import counted

EXAMPLES_PER_GROUP = 3
COVERAGE_GRID = 32  # cells per side of the coverage map (any image size maps onto it)


def ground_truth_coverage(sample: Sample) -> torch.Tensor:
    """float [COVERAGE_GRID, COVERAGE_GRID]: the share of each cell of the image that the
    sample's ground truth covers (its mask's object pixels where it has a mask, else the union
    of its boxes)."""
    if sample.mask is not None:
        region = (sample.mask > 0) & (sample.mask != IGNORE_INDEX)
    else:
        region = boxes_to_mask(sample.boxes, tuple(sample.image.shape[-2:]))
    return F.adaptive_avg_pool2d(region[None, None].float(), COVERAGE_GRID)[0, 0]


def centre_share(coverage: torch.Tensor) -> float:
    """The share of the coverage that lies in the central quarter of the image (the middle half
    of each side): 0.25 when objects are spread evenly, near 1 when they sit in the centre."""
    n = coverage.shape[-1]
    total = float(coverage.sum())
    return float(coverage[n // 4: n - n // 4, n // 4: n - n // 4].sum()) / total if total else float("nan")


def group_key(text: str, image_id: str | None = None) -> str:
    """A reason or note with its specifics (file paths, the item's id, sizes, counts) replaced
    by placeholders, so that the same problem on many files counts as one group."""
    if image_id:
        text = text.replace(image_id, "<id>")
    text = re.sub(r"\d+x\d+", "WxH", text)
    text = re.sub(r"[^\s'\"(),;]*[/\\][^\s'\"(),;:]*", "<file>", text)
    return re.sub(r"(?<![\w\-.])\d+(?:\.\d+)?(?!\w)", "N", text)


class _Digests(Dataset):
    """Each item reduced to what a summary needs, so workers send back a few bytes, not images."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        if isinstance(item, SkippedSample):
            return ("skipped", item.image_id, item.reason)
        if not isinstance(item, Sample):
            raise TypeError(f"item {index} of {type(self.dataset).__name__} is a {type(item).__name__}, "
                            "not a Sample or SkippedSample")
        return ("sample", item.image_id, int(item.label), len(item.boxes), tuple(item.notes),
                ground_truth_coverage(item))


def _as_list(batch: list) -> list:
    return batch


def _load_digests(dataset: Any, num_workers: int, batch_size: int) -> list[tuple]:
    loader = DataLoader(_Digests(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_as_list)
    return [digest for batch in loader for digest in batch]


def _grouped(pairs: list[tuple[str, str]]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """(image_id, text) pairs -> counts per group key (most frequent first) and example ids."""
    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    for image_id, text in pairs:
        key = group_key(text, image_id)
        counts[key] += 1
        if len(examples[key]) < EXAMPLES_PER_GROUP:
            examples[key].append(image_id)
    return dict(counts.most_common()), {k: examples[k] for k, _ in counts.most_common()}


def summarize(dataset: Any, check_images: bool = False, *, num_workers: int = 2,
              batch_size: int = 16) -> dict[str, Any]:
    """Counts of `dataset`: images, boxes, classes present, multi-box images, boxes per image,
    items skipped by its index (grouped by reason); with `check_images` (or when it has no
    `records`) every item is loaded and unreadable items and notes are counted too."""
    records = getattr(dataset, "records", None)
    index_skips = list(getattr(dataset, "skipped", None) or [])
    digests = _load_digests(dataset, num_workers, batch_size) if check_images or records is None else None
    if records is not None:
        rows = [(r.image_id, int(r.label), len(r.boxes), tuple(getattr(r, "notes", ()) or ()))
                for r in records]
        source = "records"
    else:
        rows = [d[1:5] for d in digests if d[0] == "sample"]
        source = "items"
    box_counts = Counter(n for _, _, n, _ in rows)
    summary: dict[str, Any] = {
        "dataset": type(dataset).__name__,
        "source": source,
        "images": len(rows),
        "boxes": sum(n for _, _, n, _ in rows),
        "classes_present": len({label for _, label, _, _ in rows}),
        "num_classes": getattr(dataset, "num_classes", None),
        "multi_box_images": sum(c for n, c in box_counts.items() if n > 1),
        "max_boxes_per_image": max(box_counts, default=0),
        "boxes_per_image": dict(sorted(box_counts.items())),
        "skipped_at_index": len(index_skips),
    }
    summary["skipped_reasons"], summary["skipped_examples"] = _grouped(
        [(s.image_id, s.reason) for s in index_skips])
    if digests is None:  # notes the index already knows; decoding may add more
        summary["checked_images"] = False
        notes = [(image_id, note) for image_id, _, _, item_notes in rows for note in item_notes]
    else:
        unreadable = [(d[1], d[2]) for d in digests if d[0] == "skipped"]
        loaded = [d[1:5] for d in digests if d[0] == "sample"]
        notes = [(image_id, note) for image_id, _, _, item_notes in loaded for note in item_notes]
        summary["checked_images"] = True
        summary["loaded"] = len(loaded)
        summary["unreadable"] = len(unreadable)
        summary["unreadable_reasons"], summary["unreadable_examples"] = _grouped(unreadable)
        summary["images_with_notes"] = sum(1 for d in loaded if d[3])
    summary["notes"], summary["note_examples"] = _grouped(notes)
    coverages = [d[5] for d in digests or () if d[0] == "sample"]
    if coverages:
        coverage = torch.stack(coverages).mean(0)
        summary["coverage"] = {"grid": [[round(float(v), 4) for v in row] for row in coverage],
                               "mean": round(float(coverage.mean()), 4),
                               "centre_quarter_share": round(centre_share(coverage), 4)}
    return summary


def _group_lines(counts: dict[str, int], examples: dict[str, list[str]]) -> list[str]:
    width = len(f"{max(counts.values(), default=0):,}")
    return [f"    {count:>{width},}  {key}  (e.g. {', '.join(examples.get(key, []))})"
            for key, count in counts.items()]


def format_summary(summary: dict[str, Any]) -> str:
    """`summarize`'s result as a readable text block."""
    present = summary["classes_present"]
    classes = (f"{present:,} of {counted(summary['num_classes'], 'class', 'classes')}" if summary.get("num_classes")
               else counted(present, "class", "classes"))
    lines = [(f"{summary['dataset']}: {counted(summary['images'], 'image')}, "
              f"{counted(summary['boxes'], 'box', 'boxes')}, {classes} present"),
             (f"  boxes per image: max {summary['max_boxes_per_image']}; "
              f"{counted(summary['multi_box_images'], 'image')} with more than one box"),
             f"  skipped by the index: {summary['skipped_at_index']:,}"]
    lines += _group_lines(summary["skipped_reasons"], summary["skipped_examples"])
    if summary["checked_images"]:
        lines.append(f"  loaded every item: {summary['loaded']:,} usable, {summary['unreadable']:,} skipped "
                     "while loading")
        lines += _group_lines(summary["unreadable_reasons"], summary["unreadable_examples"])
        lines.append(f"  notes ({counted(summary['images_with_notes'], 'image')}):")
    else:
        lines.append("  notes from the index (images not decoded; check_images=True counts all):")
    lines += _group_lines(summary["notes"], summary["note_examples"]) or ["    none"]
    if "coverage" in summary:
        coverage = summary["coverage"]
        lines.append(f"  ground-truth coverage: {coverage['mean']:.1%} of the image on average; the central "
                     f"quarter holds {coverage['centre_quarter_share']:.1%} of it (spread evenly: 25%)")
    else:
        lines.append("  ground-truth coverage: not mapped (images not decoded; check_images=True maps it)")
    return "\n".join(lines)
