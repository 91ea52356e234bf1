"""Throughput of the `measure` group next to Quantus on the same work, and their agreement.

For each measure: the suite's engine and the Quantus metric it follows score the same maps of
the same synthetic images on the same model (the shipped ViT by default), both on --device;
the script prints images/s of each, the ratio, and the largest per-image difference between
the two (float noise expected; a measure whose definition departs from Quantus' on purpose
says so in docs/protocol.md). Timings are wall-clock of one call over all images after a
warm-up on two, so the first call's set-up is not timed for either side.

Usage: python scripts/benchmark_measures.py [N images, default 16] [--measures a,b,...]
           [--method rollout] [--device cpu] [--model wsol_synthetic_vit]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from wsol_bench.datasets.synthetic import synthetic_model_inputs
from wsol_bench.environment import timed
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.complexity import contribution_entropy, gini_index
from wsol_bench.metrics.localization import ground_truth
from wsol_bench.metrics.pointing import energy_shares, pointing_hits
from wsol_bench.metrics.randomisation import (
    SIMILARITIES,
    MapComparison,
    RandomisedModels,
    random_other_classes,
    randomisation_states,
)
from wsol_bench.metrics.sensitivity import copy_changes, input_noise
from wsol_bench.models import load_model, pretrained_file
from wsol_bench.regions.heatmaps import to_heatmaps


@dataclass
class Inputs:
    """What every measure scores: the model, images, labels, the explained classes, the
    heatmaps [N, H, W] in [0, 1], the ground-truth box and mask regions, and the explainer."""

    model: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    classes: torch.Tensor
    heat: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    method: str
    device: torch.device


@dataclass
class Case:
    """One measure: the suite's per-image values and Quantus' on the same Inputs."""

    suite: Callable[[Inputs], np.ndarray]
    quantus: Callable[[Inputs], np.ndarray]
    work: str  # what one image costs, for the printout


def quantus_options() -> dict:
    """Quantus sees the suite's heatmaps as they are (no abs, no renormalisation), quietly."""
    return {"disable_warnings": True, "display_progressbar": False, "abs": True, "normalise": False}


def quantus_call(metric, inputs: Inputs, **extra) -> np.ndarray:
    """`metric` on the whole batch: numpy inputs, the heatmaps as `a_batch` [N, 1, H, W]."""
    return np.asarray(metric(model=inputs.model, x_batch=inputs.images.cpu().numpy(),
                             y_batch=inputs.classes.cpu().numpy(), a_batch=inputs.heat[:, None].cpu().numpy(),
                             device=str(inputs.device), **extra), dtype=np.float64)


def map_only(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Inputs], np.ndarray]:
    return lambda inputs: fn(inputs.heat).cpu().numpy()


def quantus_region(metric, inputs: Inputs) -> np.ndarray:
    """A localisation metric of Quantus against the ground-truth boxes (`s_batch`)."""
    return quantus_call(metric(**{**quantus_options(), "abs": False}), inputs,
                        s_batch=inputs.boxes[:, None].numpy().astype(np.float32), channel_first=True)


SENSITIVITY = {"radius": 0.2, "nr_samples": 10, "seed": 0}  # 10 copies (default 50): time scales with it


def heat_explainer(inputs: Inputs):
    """(copies, classes) -> the heatmaps of `inputs.method` at the evaluation size and their flags."""
    explainer, size = get_explainer(inputs.method, inputs.model), tuple(inputs.images.shape[-2:])
    return lambda copies, classes: tuple(t.cpu() for t in to_heatmaps(explainer(copies, classes).maps, size))


def suite_sensitivity(inputs: Inputs, which: str) -> np.ndarray:
    """Max- or avg-sensitivity of the suite's engine: every copy of every image batched."""
    ids = [str(i) for i in range(len(inputs.images))]
    changes = copy_changes(heat_explainer(inputs), inputs.images, inputs.heat, inputs.classes, ids, batch_size=64,
                           **SENSITIVITY)
    return getattr(changes, which)().numpy()


def quantus_sensitivity(metric, inputs: Inputs) -> np.ndarray:
    """Quantus on the same explainer and the same noise: its perturb_func (called once per copy
    for the whole batch) adds the suite's copy `step`."""
    steps, explain = iter(range(SENSITIVITY["nr_samples"])), heat_explainer(inputs)
    radius, seed = SENSITIVITY["radius"], SENSITIVITY["seed"]

    def perturb(arr, indices, **kwargs):
        step = next(steps)
        noise = [input_noise(inputs.images.shape[1:], radius, seed, str(i), step) for i in range(len(arr))]
        return arr + torch.stack(noise).reshape(len(arr), -1).numpy()

    return quantus_call(metric(nr_samples=SENSITIVITY["nr_samples"], lower_bound=radius, perturb_func=perturb,
                               **{**quantus_options(), "abs": False}), inputs, batch_size=len(inputs.images),
                        explain_func=lambda model, inputs, targets, **kw: explain(
                            torch.as_tensor(inputs), torch.as_tensor(targets))[0].numpy())


def heatmaps_on(model: nn.Module, inputs: Inputs, images, classes) -> torch.Tensor:
    """The suite's heatmaps of `inputs.method` on `model` (what a run scores)."""
    maps = get_explainer(inputs.method, model)(torch.as_tensor(images, device=inputs.device),
                                               torch.as_tensor(classes, device=inputs.device)).maps
    return to_heatmaps(maps.cpu(), tuple(inputs.images.shape[-2:]))[0]


def quantus_explain(setup: Inputs):
    """Quantus' explain_func: the suite's heatmaps [N, 1, H, W] of `setup.method` on the model given."""
    def explain(model, inputs, targets, **_):
        return heatmaps_on(model, setup, inputs, targets)[:, None].numpy()
    return explain


def mprt_suite(inputs: Inputs) -> np.ndarray:
    """Cascading randomisation, every unit's state (L + 2 explanations per image), three
    similarities; returns the Spearman after the first block (Quantus' state `blocks.0.norm1`)."""
    models, comparison, values = RandomisedModels(inputs.model, seed=42), MapComparison(inputs.heat, 1000), {}
    for state, randomised in randomisation_states(models.units, "cascading"):
        heat = heatmaps_on(models.model_with(randomised), inputs, inputs.images, inputs.classes)
        values[state] = {name: comparison.similarity(name, heat) for name in SIMILARITIES}
    return values["block_0"]["spearman"].numpy()


def mprt_quantus(inputs: Inputs) -> np.ndarray:
    """Quantus' MPRT: one state per module with reset_parameters (47 on the shipped ViT), Spearman."""
    import quantus

    scores = quantus.MPRT(layer_order="top_down", seed=42, **quantus_options())(
        model=inputs.model, x_batch=inputs.images.cpu().numpy(), y_batch=inputs.classes.numpy(),
        a_batch=inputs.heat[:, None].numpy(), explain_func=quantus_explain(inputs), device=str(inputs.device))
    return np.asarray(scores["blocks.0.norm1"], dtype=np.float64)


def random_logit_suite(inputs: Inputs) -> np.ndarray:
    """One explanation per image of a random other class (drawn per image), SSIM."""
    ids = [str(i) for i in range(len(inputs.classes))]
    others = random_other_classes(inputs.classes, int(inputs.model.num_classes), 42, ids)
    heat = heatmaps_on(inputs.model, inputs, inputs.images, others)
    return MapComparison(inputs.heat, 1000).similarity("ssim", heat).numpy()


def random_logit_quantus(inputs: Inputs) -> np.ndarray:
    """Quantus' RandomLogit (its own class draw and flattened SSIM: the numbers agree only for
    maps that ignore the class; the tests compare on the same classes and SSIM)."""
    import quantus

    return quantus_call(quantus.RandomLogit(num_classes=int(inputs.model.num_classes), seed=42,
                                            **quantus_options()), inputs, explain_func=quantus_explain(inputs))


def cases() -> dict[str, Case]:
    """Every measure the script times (Quantus imported here: it is a test dependency)."""
    import quantus

    return {
        "sparseness": Case(map_only(gini_index), lambda i: quantus_call(quantus.Sparseness(**quantus_options()), i),
                           "no model pass"),
        "complexity": Case(map_only(contribution_entropy),
                           lambda i: quantus_call(quantus.Complexity(**quantus_options()), i), "no model pass"),
        # tolerance 0 is Quantus' rule; ties at the maximum differ on purpose (docs/protocol.md 5.9)
        "pointing_game": Case(lambda i: pointing_hits(i.heat, i.boxes, 0).numpy(),
                              partial(quantus_region, quantus.PointingGame), "no model pass"),
        "energy_pointing_game": Case(lambda i: energy_shares(i.heat, i.boxes).numpy(),
                                     partial(quantus_region, quantus.RelevanceMassAccuracy), "no model pass"),
        "max_sensitivity": Case(partial(suite_sensitivity, which="max_sensitivity"),
                                partial(quantus_sensitivity, quantus.MaxSensitivity),
                                f"{SENSITIVITY['nr_samples']} explanations (nr_samples)"),
        "avg_sensitivity": Case(partial(suite_sensitivity, which="avg_sensitivity"),
                                partial(quantus_sensitivity, quantus.AvgSensitivity),
                                f"{SENSITIVITY['nr_samples']} explanations (nr_samples)"),
        "model_randomisation": Case(mprt_suite, mprt_quantus, "L + 2 explanations (Quantus: one per module)"),
        "random_logit": Case(random_logit_suite, random_logit_quantus, "1 explanation"),
    }


def prepare(model_name: str, method: str, count: int, device: torch.device) -> Inputs:
    """`count` synthetic images, their predicted classes' maps of `method` and their regions."""
    model = load_model(model_name, pretrained=pretrained_file(model_name) is not None, device=str(device))
    samples = synthetic_model_inputs(model, count, samples=True)
    images = torch.stack([s.image for s in samples]).to(device)
    explanation = get_explainer(method, model)(images)
    heat, _ = to_heatmaps(explanation.maps.cpu(), tuple(images.shape[-2:]))
    gt = ground_truth(samples, tuple(images.shape[-2:]))
    return Inputs(model=model, images=images, labels=torch.tensor([s.label for s in samples]),
                  classes=explanation.targets.cpu(), heat=heat, boxes=gt.box_masks,
                  masks=gt.seg_masks if gt.seg_masks is not None else gt.box_masks, method=method, device=device)


def subset(inputs: Inputs, count: int) -> Inputs:
    """The first `count` images of `inputs` (the warm-up)."""
    return Inputs(inputs.model, inputs.images[:count], inputs.labels[:count], inputs.classes[:count],
                  inputs.heat[:count], inputs.boxes[:count], inputs.masks[:count], inputs.method, inputs.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=int, nargs="?", default=16)
    parser.add_argument("--measures", default=None, help="comma-separated (default: all)")
    parser.add_argument("--method", default="rollout", help="the explainer whose maps are scored")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="wsol_synthetic_vit")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Quantus warns about its own defaults on every call
    torch.manual_seed(0)
    device = torch.device(args.device)
    every = cases()
    chosen = args.measures.split(",") if args.measures else list(every)
    unknown = sorted(set(chosen) - set(every))
    if unknown:
        parser.error(f"unknown measure(s) {', '.join(unknown)}; valid: {', '.join(every)}")
    inputs = prepare(args.model, args.method, args.images, device)
    n = len(inputs.images)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, model {args.model}, "
          f"{n} images, maps of {args.method}")
    print(f"{'measure':<22} {'suite img/s':>12} {'Quantus img/s':>14} {'ratio':>7} {'max |diff|':>11}  work per image")
    for name in chosen:
        case = every[name]
        warm = subset(inputs, min(2, n))
        case.suite(warm), case.quantus(warm)
        ours, ours_s = timed(partial(case.suite, inputs), device)
        theirs, theirs_s = timed(partial(case.quantus, inputs), device)
        diff = float(np.nanmax(np.abs(np.asarray(ours, dtype=np.float64) - theirs)))
        print(f"{name:<22} {n / ours_s:12.1f} {n / theirs_s:14.1f} {theirs_s / ours_s:6.1f}x {diff:11.2e}  {case.work}")


if __name__ == "__main__":
    main()
