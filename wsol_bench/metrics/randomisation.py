"""Randomisation sanity checks (docs/protocol.md 5.8): the layer units of a timm ViT, their
re-initialisation, the randomised models of the model-parameter randomisation test (Adebayo et
al., NeurIPS 2018), the random other class of the random-logit test (Sixt et al., ICML 2020),
and the similarities that compare two heatmaps: Spearman rank correlation, SSIM and top-k
intersection, batched over images, in float64.

Re-initialisation is Quantus' (MPRT's random layer generator): every module of a unit that has
`reset_parameters` gets its PyTorch default initialisation, each right after
`torch.manual_seed(seed + 1)`; a unit's own tensors that no module resets (class, register
and distillation tokens, position embeddings) get timm's initialisation under the same seed,
which Quantus leaves trained. It runs on a CPU copy, so a seed gives the same model on any
device, and it never disturbs the caller's random state.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from wsol_bench.models import UnsupportedModelError

# the model's own tensors a unit may hold, and timm's initialisation of each: (kind, std)
TOKEN_INITS = {"pos_embed": ("trunc_normal", 0.02), "cls_token": ("normal", 1e-6),
               "reg_token": ("normal", 1e-6), "dist_token": ("trunc_normal", 0.02)}
ORDERS = ("cascading", "independent")
FULL = "all"  # the independent order's extra state: every unit randomised
SSIM_SIGMA = 1.5  # Gaussian window (Adebayo et al.'s skimage call): 11 x 11 pixels (truncated at 3.5 sigma)


@dataclass(frozen=True)
class Unit:
    """One layer unit: its name, the modules re-initialised with it (top-down order) and the
    model's own tensors it also holds."""

    name: str
    prefixes: tuple[str, ...]  # the module names (top-level children or blocks) it covers
    modules: tuple[str, ...]  # its modules with `reset_parameters`, in reverse model order
    tokens: tuple[str, ...] = ()


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def model_units(model: nn.Module) -> list[Unit]:
    """The layer units of a timm VisionTransformer, top-down: `head` (every part after the
    blocks: final norm, pooling, classifier), `block_<i>` from the last block to the first, and
    `patch_embed` (every part before the blocks, with the class token and position embedding).
    A unit without parameters is left out. A model that does not split so, or holds a parameter
    no re-initialisation reaches, is refused naming what is missing."""
    label = type(model).__name__
    children = [name for name, _ in model.named_children()]
    blocks = getattr(model, "blocks", None)
    if "patch_embed" not in children or "blocks" not in children or not isinstance(blocks, nn.Sequential | nn.ModuleList) \
            or len(blocks) == 0:
        raise UnsupportedModelError(f"model randomisation splits a timm VisionTransformer into head, blocks and "
                                    f"patch_embed, but {label} has no `patch_embed` and `blocks` list; choose a "
                                    "VisionTransformer model or leave model_randomisation out of `measure`")
    at = children.index("blocks")
    tokens = tuple(name for name, _ in model.named_parameters(recurse=False))
    unknown = [t for t in tokens if t not in TOKEN_INITS]
    if unknown:
        raise UnsupportedModelError(f"model randomisation cannot re-initialise {label}.{unknown[0]} (it knows "
                                    f"{', '.join(TOKEN_INITS)}); leave model_randomisation out of `measure`")
    parts = [("head", tuple(children[at + 1:]), ())]
    parts += [(f"block_{i}", (f"blocks.{i}",), ()) for i in reversed(range(len(blocks)))]
    parts += [("patch_embed", tuple(children[:at]), tokens)]
    resettable = [name for name, m in model.named_modules() if hasattr(m, "reset_parameters") and name]
    units = []
    for name, prefixes, own in parts:
        modules = tuple(m for m in reversed(resettable) if _under(m, prefixes))
        params = [p for p, _ in model.named_parameters() if _under(p, prefixes)]
        unreached = [p for p in params if not any(_under(p, [m]) for m in modules)]
        if unreached:
            raise UnsupportedModelError(f"model randomisation cannot re-initialise {label}.{unreached[0]}: no module "
                                        "of it has reset_parameters; leave model_randomisation out of `measure`")
        if params or own:
            units.append(Unit(name, prefixes, modules, own))
    return units


def randomisation_states(units: list[Unit], order: str) -> list[tuple[str, tuple[str, ...]]]:
    """(state name, randomised unit names) of each randomised model, in order. Cascading: the
    top unit, then each next unit added (the last state is fully randomised); independent:
    each unit alone with the rest trained, then every unit (state `all`)."""
    names = [u.name for u in units]
    if order == "cascading":
        return [(name, tuple(names[:i + 1])) for i, name in enumerate(names)]
    if order == "independent":
        return [(name, (name,)) for name in names] + [(FULL, tuple(names))]
    raise ValueError(f"unknown randomisation order {order!r}; valid: {', '.join(ORDERS)}")


def reinitialise(model: nn.Module, units: list[Unit], seed: int) -> None:
    """Re-initialise `units` of `model` in place, as Quantus does: `torch.manual_seed(seed + 1)`
    before each module's `reset_parameters` (so a module's new values do not depend on the order
    or on the other units), then timm's initialisation of the unit's tokens under the same seed.
    `model` must be on the CPU: only the CPU generator is seeded (as `torch.manual_seed` seeds
    it), and the caller's random state is restored afterwards."""
    if any(t.device.type != "cpu" for t in model.parameters()):
        raise ValueError("reinitialise draws on the CPU; pass a CPU copy of the model")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for unit in units:
            for name in unit.modules:
                torch.default_generator.manual_seed(seed + 1)
                model.get_submodule(name).reset_parameters()
            for name in unit.tokens:
                torch.default_generator.manual_seed(seed + 1)
                kind, std = TOKEN_INITS[name]
                tensor = getattr(model, name)
                if kind == "normal":
                    nn.init.normal_(tensor, std=std)
                else:
                    nn.init.trunc_normal_(tensor, std=std)


def _unit_tensors(model: nn.Module, unit: Unit) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `unit` in `model`, by name (the model's own tensors)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: tensor for name, tensor in named if _under(name, unit.prefixes) or name in unit.tokens}


class RandomisedModels:
    """Every randomisation state of `model` from one working copy: the random values of all
    units are drawn once (on a CPU copy), and `model_with(units)` copies into the working copy
    the random tensors of the units that turn randomised and the trained ones of the units that
    turn back, so each state costs a copy of the tensors that change, never a new model. The
    run's model itself is never changed. Memory: two more copies of the model's tensors."""

    def __init__(self, model: nn.Module, seed: int) -> None:
        self.units = model_units(model)
        device = next(model.parameters()).device
        drawn = copy.deepcopy(model).cpu()
        reinitialise(drawn, self.units, seed)
        self.working = copy.deepcopy(model)
        self._trained = {u.name: _unit_tensors(model, u) for u in self.units}
        self._random = {u.name: {k: t.to(device) for k, t in _unit_tensors(drawn, u).items()} for u in self.units}
        self._slots = {u.name: _unit_tensors(self.working, u) for u in self.units}
        self._randomised: set[str] = set()

    def model_with(self, randomised: Iterable[str]) -> nn.Module:
        """The working copy with exactly the units `randomised` re-initialised."""
        wanted = set(randomised)
        unknown = wanted - set(self._slots)
        if unknown:
            raise ValueError(f"no unit {sorted(unknown)}; units: {', '.join(self._slots)}")
        with torch.no_grad():
            for name in wanted ^ self._randomised:
                source = self._random[name] if name in wanted else self._trained[name]
                for key, slot in self._slots[name].items():
                    slot.copy_(source[key])
        self._randomised = wanted
        return self.working


def random_other_classes(targets: torch.Tensor, num_classes: int, seed: int, keys: list[str]) -> torch.Tensor:
    """[B] a class other than each target, uniform over the other `num_classes - 1`, drawn from
    (seed, key of the image): the same image gets the same class in any batch."""
    if num_classes < 2:
        raise ValueError(f"a random other class needs at least 2 classes, got {num_classes}")
    drawn = []
    for target, key in zip(targets.tolist(), keys):
        digest = hashlib.blake2b(key.encode(), digest_size=8, key=int(seed).to_bytes(8, "little", signed=True)).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        index = int(torch.randint(num_classes - 1, (1,), generator=generator))
        drawn.append(index + (index >= int(target)))  # skip the target: uniform over the others
    return torch.tensor(drawn, dtype=torch.long)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """[B, N] ranks 1..N of each row's values, tied values sharing their mean rank (as scipy's
    rankdata 'average')."""
    n = values.shape[1]
    ordered, order = values.sort(dim=1, stable=True)
    position = torch.arange(n, device=values.device).expand_as(order)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    # within a run of equal values: the run's first position (running max of the starts seen)
    # and its last (running min, from the right, of the ends)
    first = torch.where(starts, position, 0).cummax(1).values
    last = torch.where(ends, position, n).flip(1).cummin(1).values.flip(1)
    mean_rank = (first + last).double() / 2 + 1
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def centred_ranks(maps: torch.Tensor) -> torch.Tensor:
    """[B, N] average ranks of each map's pixels minus their mean (what Spearman correlates)."""
    ranks = average_ranks(maps.reshape(len(maps), -1))  # sorted in their own dtype: the order is the same
    return ranks - ranks.mean(1, keepdim=True)


def rank_correlation(ra: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
    """[B] Pearson correlation of centred ranks; NaN where either map is constant."""
    scale = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(scale > 0, (ra * rb).sum(1) / scale, torch.nan)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B] Spearman rank correlation of maps a and b [B, ...] over their pixels (tied values get
    their mean rank, as scipy's spearmanr); NaN where either map is constant."""
    return rank_correlation(centred_ranks(a), centred_ranks(b))


@functools.lru_cache(maxsize=8)
def _window_matrix(length: int, sigma: float, device: torch.device) -> torch.Tensor:
    """[length - 2r, length] the Gaussian window (radius r = 3.5 sigma, rounded as scipy
    truncates) at each position where it fits inside a side of `length` pixels, as a band matrix,
    so filtering a map is two matrix products. Cached per size: the callers only read it."""
    radius = int(3.5 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    weights = torch.exp(-0.5 * x.square() / sigma**2)
    weights = weights / weights.sum()
    if length < len(weights):
        raise ValueError(f"SSIM needs heatmaps of at least {len(weights)} pixels a side, got {length}")
    band = torch.zeros(length - 2 * radius, length, dtype=torch.float64, device=device)
    for offset, weight in enumerate(weights.tolist()):
        band.diagonal(offset).fill_(weight)
    return band


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """[B] mean structural similarity of heatmaps a and b [B, H, W], as skimage's
    `structural_similarity(a, b, gaussian_weights=True, sigma=1.5, data_range=1)` (Adebayo et
    al.'s call on [0, 1]-normalised maps): local means, variances (sample normalisation) and
    covariance under an 11 x 11 Gaussian window, K1 = 0.01, K2 = 0.03, averaged over the
    positions where the window fits inside the image."""
    rows, cols = (_window_matrix(n, sigma, a.device) for n in a.shape[-2:])
    x, y = a.double(), b.double()
    ux, uy, uxx, uyy, uxy = rows @ torch.stack([x, y, x * x, y * y, x * y]) @ cols.T
    points = (rows.shape[1] - rows.shape[0] + 1) ** 2  # pixels under the window
    cov_norm = points / (points - 1)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return index.flatten(1).mean(1)


def top_pixels(maps: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, N]: the k most salient pixels of each map [B, ...]; among equal values the first
    in raster order ranks higher."""
    flat = maps.reshape(len(maps), -1)
    if not 1 <= k <= flat.shape[1]:
        raise ValueError(f"top-k intersection needs 1 <= k <= {flat.shape[1]} pixels, got k={k}")
    top = flat.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True)


def top_k_intersection(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """[B] the fraction of the k most salient pixels of map a that are also among the k most
    salient of map b [B, ...]."""
    return (top_pixels(a, k) & top_pixels(b, k)).sum(1).double() / k


SIMILARITIES = ("spearman", "ssim", "topk")


class MapComparison:
    """Heatmaps `reference` [B, H, W] compared with other heatmaps of the same images by
    `similarity(name, other)`: what depends on the reference alone (its ranks, its top-k
    pixels) is computed once for all the maps a randomisation test compares with it.

    A constant `other` map (the suite's heatmap of a degenerate map is all zeros,
    docs/protocol.md 3) is an empty map: it shares no order and no salient pixel with the
    reference, so its Spearman correlation and top-k intersection are 0 (not undefined, and not
    left out: leaving such images out would raise the mean of exactly the methods whose map the
    randomisation erased); its SSIM is computed as for any map."""

    def __init__(self, reference: torch.Tensor, top_k: int) -> None:
        self.reference, self.top_k = reference, top_k
        self._ranks: torch.Tensor | None = None
        self._top: torch.Tensor | None = None

    def similarity(self, name: str, other: torch.Tensor) -> torch.Tensor:
        """[B] similarity `name` (spearman, ssim or topk) of the reference maps and `other`."""
        flat = other.flatten(1)
        empty = flat.amax(1) == flat.amin(1)
        if name == "spearman":
            if self._ranks is None:
                self._ranks = centred_ranks(self.reference)
            return torch.where(empty, 0.0, rank_correlation(self._ranks, centred_ranks(other)))
        if name == "ssim":
            return ssim(self.reference, other)
        if name == "topk":
            if self._top is None:
                self._top = top_pixels(self.reference, self.top_k)
            shared = (self._top & top_pixels(other, self.top_k)).sum(1).double() / self.top_k
            return torch.where(empty, 0.0, shared)
        raise ValueError(f"unknown similarity {name!r}; valid: {', '.join(SIMILARITIES)}")
