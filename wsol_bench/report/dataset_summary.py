"""What a dataset holds (images, boxes, classes) and what loading it runs into.

Annotation index protocol (optional, for any dataset): a dataset that exposes `records`, a
sequence aligned with its items (`records[i]` describes `dataset[i]`) whose elements have
`image_id`, `label` and `boxes` (anything with `len()` = the number of boxes) and optionally
`notes` (a tuple of strings), can be summarised without decoding a single image. A dataset may
also expose `skipped`, the `SkippedSample`s its index left out. Datasets without `records`
(e.g. the synthetic one) are summarised by loading every item.

`check_images=True` loads every item through a DataLoader (worker processes decode in
parallel) and counts the items that come back as `SkippedSample` (unreadable or unusable
files) and the notes of those that load (conversions, clipping, size mismatches).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

from torch.utils.data import DataLoader, Dataset

from wsol_bench.datasets.base import Sample, SkippedSample

EXAMPLES_PER_GROUP = 3


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
        return ("sample", item.image_id, int(item.label), len(item.boxes), tuple(item.notes))


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
        rows = [d[1:] for d in digests if d[0] == "sample"]
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
        loaded = [d[1:] for d in digests if d[0] == "sample"]
        notes = [(image_id, note) for image_id, _, _, item_notes in loaded for note in item_notes]
        summary["checked_images"] = True
        summary["loaded"] = len(loaded)
        summary["unreadable"] = len(unreadable)
        summary["unreadable_reasons"], summary["unreadable_examples"] = _grouped(unreadable)
        summary["images_with_notes"] = sum(1 for d in loaded if d[3])
    summary["notes"], summary["note_examples"] = _grouped(notes)
    return summary


def _group_lines(counts: dict[str, int], examples: dict[str, list[str]]) -> list[str]:
    width = len(f"{max(counts.values(), default=0):,}")
    return [f"    {count:>{width},}  {key}  (e.g. {', '.join(examples.get(key, []))})"
            for key, count in counts.items()]


def format_summary(summary: dict[str, Any]) -> str:
    """`summarize`'s result as a readable text block."""
    of = f" of {summary['num_classes']:,}" if summary.get("num_classes") else ""
    lines = [f"{summary['dataset']}: {summary['images']:,} images, {summary['boxes']:,} boxes, "
             f"{summary['classes_present']:,}{of} classes present",
             f"  boxes per image: max {summary['max_boxes_per_image']}; "
             f"{summary['multi_box_images']:,} images with more than one box",
             f"  skipped by the index: {summary['skipped_at_index']:,}"]
    lines += _group_lines(summary["skipped_reasons"], summary["skipped_examples"])
    if summary["checked_images"]:
        lines.append(f"  loaded every item: {summary['loaded']:,} usable, {summary['unreadable']:,} skipped "
                     "while loading")
        lines += _group_lines(summary["unreadable_reasons"], summary["unreadable_examples"])
        lines.append(f"  notes ({summary['images_with_notes']:,} images):")
    else:
        lines.append("  notes from the index (images not decoded; check_images=True counts all):")
    lines += _group_lines(summary["notes"], summary["note_examples"]) or ["    none"]
    return "\n".join(lines)
