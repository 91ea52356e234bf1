"""Chefer et al.'s positive and negative perturbation test for ViT explanations ("Transformer
Interpretability Beyond Attention Visualization", CVPR 2021), batched.

The published procedure is baselines/ViT/pertubation_eval_from_hdf5.py (P) of the authors'
repository, run on the maps that baselines/ViT/generate_visualizations.py (G) stores. Each of
its conventions below is followed and tested:
- Maps: G upsamples the patch map bilinearly by the patch size (align_corners=False) and
  min-max normalises it (G 98-100), as `regions.heatmaps.to_heatmaps` does. Only the order of
  the values matters here, so the heatmaps may come normalised or not.
- Steps: the fractions 0.1, 0.2, ..., 0.9 of the n = H*W pixels (P 32-34); step s removes
  k = int(n * s) pixels, in float64 and truncated (P 91): 5017 of 50176 at 0.1.
- Which pixels: torch.topk(relevance, k) over the flattened map at pixel resolution (P 86, 91):
  the positive test removes the k most relevant pixels, the negative test the k least relevant,
  as topk of the negated map (P 83-84). Pixels tied at the cut are chosen the way torch.topk
  chooses them, which is not a stable order (nor nested from one step to the next). The engine
  sorts each map once: where the k-th and (k+1)-th values differ, topk's k pixels are exactly
  those at or above the k-th value, a comparison; only where the cut splits tied values does it
  call torch.topk itself, with the same k on the same values, so it removes the same pixels (a
  row's choice does not depend on the other rows of a call). Every step of tied, quantised and
  float16-rounded maps is tested against topk. This is on purpose a different rule from the
  stable sort of `faithfulness.pixel_ranks`.
- Removal: every channel of a removed pixel is set to 0 in the unnormalised [0, 1] image
  (P 92-94), before normalisation (P 97); in the normalised input that is (0 - mean) / std
  per channel (-1 for mean = std = 0.5, the published ViT-B and the shipped model).
- Score: top-1 correct, argmax of the logits (first index on ties) equal to the dataset label
  (P 110-112), in both class settings: the class the maps explain (--vis-class top or target,
  G 66-68; top is the argmax, ViT_explanation_generator.py 29) changes the maps, never what is
  scored. `explained_classes` gives that class.
- AUC: P prints the mean accuracy per step and computes no area (P 130-134). The area follows
  the reuse of the test (e.g. jiaminchen-1031/transformerinterp, the same script with
  sklearn.metrics.auc added): the trapezoid rule over x = 0, 0.1, ..., 0.9, 1 of the curve
  [clean accuracy, the 9 step accuracies, 0], the point at x = 1 fixed at 0 (not a model pass).
  The rule is linear in the curve, so the mean of the per-image areas returned here is the
  area of the mean curve. Areas are fractions; the published tables show percents (x100).

No input goes through the model twice: the clean point comes from the clean logits of the
explanation pass (one extra pass per image when they are not given), a step that removes no
pixel reuses it, equal inputs of one image (steps with equal counts; a constant map's positive
and negative steps where topk picks the same pixels) share a pass, and the distinct perturbed
inputs of all images, steps and tests are built in one reused buffer and sent through the model
`batch_size` at a time with the fused attention kernel. The model passes are most of the cost
(scripts/benchmark_chefer_perturbation.py).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from wsol_bench.errors import SettingError
from wsol_bench.metrics.faithfulness import _check_inputs, _check_targets, _model_device, default_batch_size
from wsol_bench.models import data_config, fused_attention

PUBLISHED_STEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # P 34
TESTS = {"positive": ("positive",), "negative": ("negative",), "both": ("positive", "negative")}
VIS_CLASSES = ("predicted", "target")  # faithfulness.vis_class: the script's --vis-class top / target


@dataclass(frozen=True)
class CheferSettings:
    """How the perturbation test runs.

    steps: fractions of the pixels removed, strictly increasing inside (0, 1) (the curve's end
    points 0 and 1 are the clean image and the fixed 0). test: "positive", "negative" or
    "both". vis_class: the class the maps explain, "predicted" (the script's default `top`) or
    "target" (the label); it picks the explained class in `explained_classes`, the score is
    always against the label. batch_size: perturbed images per forward pass; None picks the
    device default (speed only, not the numbers). baseline: the value removed pixels get in the
    unnormalised [0, 1] image (published: 0, black). mean, std: the normalisation of the
    images; None reads the model's timm data config.
    """

    steps: tuple[float, ...] = PUBLISHED_STEPS
    test: str = "both"
    vis_class: str = "predicted"
    batch_size: int | None = None
    baseline: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        steps = _floats("steps", self.steps)
        if not steps or not all(0 < s < 1 for s in steps) or any(a >= b for a, b in itertools.pairwise(steps)):
            raise SettingError(f"faithfulness.steps must be fractions strictly increasing inside (0, 1), "
                               f"e.g. {list(PUBLISHED_STEPS)}; got {list(steps)}")
        if len({step_column("", s) for s in steps}) < len(steps):
            raise SettingError(f"faithfulness.steps {list(steps)} has steps closer than 1e-6 %; their record "
                               "columns would collide")
        object.__setattr__(self, "steps", steps)
        if self.test not in TESTS:
            raise SettingError(f"faithfulness.test {self.test!r} is unknown; valid: {', '.join(TESTS)}")
        if self.vis_class not in VIS_CLASSES:
            raise SettingError(f"faithfulness.vis_class {self.vis_class!r} is unknown; valid: "
                               f"{', '.join(VIS_CLASSES)}")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise SettingError(f"faithfulness.batch_size must be a positive integer, got {self.batch_size!r}")
        object.__setattr__(self, "baseline", _floats("baseline", (self.baseline,))[0])
        if (self.mean is None) != (self.std is None):
            raise SettingError("give both faithfulness.mean and faithfulness.std, or neither (then the "
                               "model's data config gives them)")
        if self.mean is not None:
            object.__setattr__(self, "mean", _floats("mean", self.mean))
            object.__setattr__(self, "std", _floats("std", self.std))
            if not all(s > 0 for s in self.std):
                raise SettingError(f"faithfulness.std must be positive, got {list(self.std)}")

    @property
    def tests(self) -> tuple[str, ...]:
        """The tests this setting runs, positive first."""
        return TESTS[self.test]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _floats(key: str, values: object) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise SettingError(f"faithfulness.{key} must be a list of numbers, got {values!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise SettingError(f"faithfulness.{key} must be finite numbers, got {list(out)}")
    return out


def pixel_counts(num_pixels: int, steps: tuple[float, ...]) -> list[int]:
    """Pixels removed at each step: int(n * s) in float64, truncated, as P 91 computes it."""
    return [int(num_pixels * s) for s in steps]


def removed_value(model: nn.Module, settings: CheferSettings, channels: int,
                  device: torch.device) -> torch.Tensor:
    """[1, C, 1, 1]: the baseline pixel value normalised as P 97 normalises it ((v - mean) / std
    in float32), with the settings' mean and std or else the model's timm data config."""
    mean, std = settings.mean, settings.std
    if mean is None:
        if getattr(model, "pretrained_cfg", None) is None and getattr(model, "default_cfg", None) is None:
            raise SettingError(f"{type(model).__name__} carries no timm data config to read the image "
                               "normalisation from; give faithfulness.mean and faithfulness.std")
        config = data_config(model)
        mean, std = config.mean, config.std
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise SettingError(f"faithfulness.mean/std have {len(mean)}/{len(std)} values for {channels}-channel "
                           "images; give one value or one per channel")
    value = torch.full((channels,), settings.baseline, dtype=torch.float32, device=device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).expand(channels)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).expand(channels)
    return ((value - mean_t) / std_t).view(1, channels, 1, 1)  # float32, subtract then divide, as P


def explained_classes(settings: CheferSettings, labels: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """The class the maps must explain: the label ("target") or the model's clean prediction
    ("predicted", argmax with the first index on ties, as G does when no index is given)."""
    if settings.vis_class == "target":
        return torch.as_tensor(labels, dtype=torch.long)
    return clean_logits.argmax(1)


def curve_area(clean: torch.Tensor, curve: torch.Tensor, steps: tuple[float, ...]) -> torch.Tensor:
    """Trapezoid area of [clean, curve..., 0] over x = [0, steps..., 1], float64 [B]."""
    y = torch.cat([clean[:, None], curve, torch.zeros_like(clean)[:, None]], dim=1).double()
    x = torch.tensor((0.0, *steps, 1.0), dtype=torch.float64, device=y.device)
    return torch.trapezoid(y, x, dim=1)


class RemovalPlan:
    """The distinct perturbed inputs ("jobs") of a batch, and which job each (test, step,
    image) is: `job` [tests, steps, B], -1 for a step that removes nothing (the clean image).

    Where the k-th and (k+1)-th largest relevance differ, the k pixels torch.topk returns are
    exactly those at or above the k-th value, whatever order tied pixels take, so one sort per
    map turns such a step into a comparison with that threshold. Only a cut inside a run of tied
    values asks torch.topk itself (the script's k on the script's values) and keeps its choice
    as a mask. Equal inputs of one image (equal counts, or a constant map whose two tests remove
    the same pixels) are one job. Jobs run image by image, so a chunk copies no image.
    """

    def __init__(self, relevance: torch.Tensor, counts: list[int], tests: tuple[str, ...], clean_pass: bool) -> None:
        self.relevance = relevance  # [B, H*W]: the positive test ranks x, the negative -x (P 83-84)
        self.owners: list[int] = []
        self._signs: list[float] = []  # a job removes the pixels where sign * x >= its threshold
        self._thresholds: list[float] = []
        self.masks: dict[int, torch.Tensor] = {}  # job -> its pixels, for a cut inside a tie
        self.clean_jobs: list[int] = []
        self.job = torch.full((len(tests), len(counts), len(relevance)), -1, dtype=torch.long)
        for b, edges in enumerate(self._cut_values(counts, tests)):
            if clean_pass:
                self.clean_jobs.append(self._add(b, 1.0, math.inf))
            seen: dict[tuple, int] = {}
            pairs = iter(zip(edges[0::2], edges[1::2]))
            for t, test in enumerate(tests):
                for s, k in enumerate(counts):
                    if k > 0:
                        self.job[t, s, b] = self._job(seen, b, test, k, *next(pairs))
        self.total = len(self.owners)
        self.signs, self.thresholds = (torch.tensor(v, dtype=relevance.dtype, device=relevance.device)
                                       for v in (self._signs, self._thresholds))

    def _cut_values(self, counts: list[int], tests: tuple[str, ...]) -> list[list[float]]:
        """Per image, the two values of x on either side of every (test, k > 0) cut, flattened:
        the k-th and (k+1)-th largest for the positive test, the k-th and (k+1)-th smallest
        for the negative one (the k-th and (k+1)-th largest of -x, un-negated)."""
        num_pixels = self.relevance.shape[1]
        # stable only because it is the faster sort here: the order of ties never matters
        descending = torch.sort(self.relevance, dim=1, descending=True, stable=True).values
        cuts = [i for test in tests for k in counts if k > 0
                for i in ((k - 1, k) if test == "positive" else (num_pixels - k, num_pixels - k - 1))]
        return descending[:, cuts].tolist() if cuts else [[] for _ in range(len(descending))]

    def _add(self, owner: int, sign: float, threshold: float, mask: torch.Tensor | None = None) -> int:
        self.owners.append(owner)
        self._signs.append(sign)
        self._thresholds.append(threshold)
        if mask is not None:
            self.masks[len(self.owners) - 1] = mask
        return len(self.owners) - 1

    def _job(self, seen: dict[tuple, int], owner: int, test: str, k: int, kth: float, after: float) -> int:
        """The job removing `test`'s k pixels of image `owner`, added unless `seen` has it."""
        sign = 1.0 if test == "positive" else -1.0
        if kth != after:  # -0.0 == 0.0: a cut between zeros of both signs is a tie
            key, job = ("cut", test, k), (sign, sign * kth, None)
        else:
            mask = topk_mask(sign * self.relevance[owner:owner + 1], k)  # sign * x is -x exactly
            key, job = ("tie", k, mask.cpu().numpy().tobytes()), (1.0, math.inf, mask)
        if key not in seen:
            seen[key] = self._add(owner, *job)
        return seen[key]

    def removed(self, first: int, last: int) -> torch.Tensor:
        """Bool [last - first, H*W]: the pixels jobs first..last-1, all of one image, remove."""
        row = self.relevance[self.owners[first]]
        removed = row * self.signs[first:last, None] >= self.thresholds[first:last, None]
        for j in range(first, last):
            if j in self.masks:
                removed[j - first] = self.masks[j]
        return removed

    def perturbed(self, images: torch.Tensor, fill: torch.Tensor, start: int, stop: int,
                  out: torch.Tensor) -> torch.Tensor:
        """The inputs of jobs start..stop-1 written into `out` [stop - start, C, H, W]: each
        image with its removed pixels set to `fill`."""
        height, width = images.shape[2:]
        first = start
        for j in range(start + 1, stop + 1):
            if j == stop or self.owners[j] != self.owners[first]:
                removed = self.removed(first, j).view(-1, 1, height, width)
                torch.where(removed, fill, images[self.owners[first]], out=out[first - start:j - start])
                first = j
        return out


def topk_mask(row: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [H*W]: torch.topk's k pixels of a [1, H*W] map, the same call as P 91, so ties
    resolve the same way. On CPU `sorted` only orders the chosen pixels (TopKImpl.h picks them
    by nth_element or partial_sort either way), so that sort is skipped; elsewhere the call is
    the script's own."""
    chosen = torch.topk(row, k, dim=1, sorted=row.device.type != "cpu").indices[0]
    return torch.zeros(row.shape[1], dtype=torch.bool, device=row.device).index_fill_(0, chosen, True)


@torch.inference_mode()
def score_chefer_batch(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, labels: torch.Tensor,
                       settings: CheferSettings | None = None,
                       clean_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The perturbation test for a batch.

    images: normalised [B, C, H, W]; heatmaps: [B, H, W], higher = more relevant; labels: [B]
    dataset labels (what is scored); clean_logits: [B, K] logits of the unperturbed images
    (one pass per image here when None). Returns CPU tensors: `clean_correct` [B] (0/1), per
    test `<test>` [B, steps] (1 where the prediction is still the label) and `auc_<test>`
    (float64 [B], a fraction).
    """
    settings = settings or CheferSettings()
    device = _model_device(model, images.device)
    images = images.to(device, torch.float32)
    heatmaps = heatmaps.to(device, torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    _check_inputs(model, images, heatmaps, labels)
    batch, channels, height, width = images.shape
    if clean_logits is not None:
        clean_logits = clean_logits.to(device).float()
        if clean_logits.ndim != 2 or clean_logits.shape[0] != batch:
            raise SettingError(f"clean_logits {tuple(clean_logits.shape)} must be [B={batch}, classes]")
        _check_targets(labels, clean_logits.shape[1])
    fill = removed_value(model, settings, channels, device)
    counts = pixel_counts(height * width, settings.steps)
    plan = RemovalPlan(heatmaps.flatten(1), counts, settings.tests, clean_pass=clean_logits is None)

    # Every distinct input (each image's clean one first when its logits are not given),
    # `batch_size` per forward pass; without clean logits the first pass tells the number of
    # classes, so bad labels fail before the other passes.
    top = torch.empty(plan.total, dtype=torch.long, device=device)
    chunk = settings.batch_size or default_batch_size(device)
    buffer = torch.empty(min(chunk, plan.total), channels, height, width, device=device)  # reused: no new pages
    with fused_attention(model):  # outputs only: the fused kernel is faster
        for start in range(0, plan.total, chunk):
            stop = min(start + chunk, plan.total)
            logits = model(plan.perturbed(images, fill, start, stop, buffer[:stop - start])).float()
            if clean_logits is None and start == 0:
                _check_targets(labels, logits.shape[1])
            top[start:stop] = logits.max(1).indices  # as P 110: first index on ties
    top = top.cpu()

    labels_cpu = labels.cpu()
    clean_top = top[plan.clean_jobs] if clean_logits is None else clean_logits.max(1).indices.cpu()
    clean = (clean_top == labels_cpu).double()
    out: dict[str, torch.Tensor] = {"clean_correct": clean}
    for t, test in enumerate(settings.tests):
        jobs = plan.job[t].T  # [B, steps]; -1: the clean image
        predicted = clean_top[:, None].repeat(1, len(counts))
        predicted[jobs >= 0] = top[jobs[jobs >= 0]]
        curve = (predicted == labels_cpu[:, None]).double()
        out[test] = curve
        out[f"auc_{test}"] = curve_area(clean, curve, settings.steps)
    return out


def step_column(test: str, fraction: float) -> str:
    """Record column of one step: the test and the percent of pixels removed (positive_10;
    positive_12p5 for 12.5 %)."""
    return f"{test}_{f'{100 * fraction:.6g}'.replace('.', 'p'):0>2}"


def row_columns(settings: CheferSettings) -> list[str]:
    """The columns of `chefer_rows` for these settings, in order."""
    return (["clean_correct"] + [f"auc_{t}" for t in settings.tests]
            + [step_column(t, f) for t in settings.tests for f in settings.steps])


def chefer_rows(scores: dict[str, torch.Tensor], settings: CheferSettings) -> list[dict[str, float]]:
    """One record row per image from `score_chefer_batch` output, columns as `row_columns`."""
    columns = row_columns(settings)
    batch = scores["clean_correct"].shape[0]
    values = {"clean_correct": scores["clean_correct"]}
    for test in settings.tests:
        values[f"auc_{test}"] = scores[f"auc_{test}"]
        for s, fraction in enumerate(settings.steps):
            values[step_column(test, fraction)] = scores[test][:, s]
    return [{name: float(values[name][b]) for name in columns} for b in range(batch)]
