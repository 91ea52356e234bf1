"""AG-CAM pixel scores (docs/protocol.md 4.1): pixel accuracy, IoU, Dice, precision and recall
from confusion counts (tp, fp, fn, tn), with eps = 1e-5. `scores_from_counts` is the one place
the formulas are written; every score of the suite (records, sweeps, masks) goes through it."""

from __future__ import annotations

import torch

EPS = 1e-5
PIXEL_METRICS = ("pixel_acc", "iou", "dice", "precision", "recall")


def scores_from_counts(tp, fp, fn, tn) -> dict:
    """The five scores from float64 counts (numpy arrays or torch tensors of any shape)."""
    total = tp + fp + fn + tn
    return {
        "pixel_acc": (tp + tn + EPS) / (total + EPS),
        "iou": (tp + EPS) / (tp + fp + fn + EPS),
        "dice": (2 * tp + EPS) / (2 * tp + fp + fn + EPS),
        "precision": (tp + EPS) / (tp + fp + EPS),
        "recall": (tp + EPS) / (tp + fn + EPS),
    }


def confusion_counts(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
    """tp, fp, fn, tn per image (float64 [B]) over [B, H, W] bool masks; pixels where `valid`
    is False (ignore labels) are not counted anywhere."""
    pred, gt = pred.bool(), gt.bool()
    if valid is not None:
        valid = valid.bool()
        pred, gt = pred & valid, gt & valid

    def count(x: torch.Tensor) -> torch.Tensor:
        return torch.count_nonzero(x.flatten(1), dim=1).double()

    n = count(valid) if valid is not None else torch.full((len(pred),), float(pred[0].numel()), dtype=torch.float64)
    tp = count(pred & gt)
    fp = count(pred) - tp
    fn = count(gt) - tp
    return {"tp": tp, "fp": fp, "fn": fn, "tn": n - tp - fp - fn}


def pixel_scores(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
    """The five AG-CAM scores of [B, H, W] bool masks per image, as fractions (float64 [B] each)."""
    c = confusion_counts(pred, gt, valid)
    return scores_from_counts(c["tp"], c["fp"], c["fn"], c["tn"])
