"""Noisy linear imputation of ROAD (Rong et al., ICML 2022) for a whole stack of images and
removal masks at once, on their device (docs/protocol.md 5); the noise is added by the caller.

Every removed pixel takes the weighted mean of its in-image 8 neighbours (weight 1/6 for the
4 edge neighbours, 1/12 for the 4 corner ones; neighbours outside the image are left out and
the remaining weights renormalised by their sum s_i), where removed neighbours are unknowns
themselves. For one image and mask that is the sparse linear system
    s_i x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij v_j    (i removed),
one right-hand side per channel, symmetric positive definite as soon as one pixel is kept.
On the whole grid, with kept pixels as identity rows, every system of the stack has the same
9-point stencil shape, so `GridCholesky` factors them all at once. Its cost does not depend
on how many pixels are removed, so disjoint removal sets share one grid system as its
`parts` (labels 1, 2, ...): a pixel couples only to neighbours of its own part and takes
every other neighbour's image value as known, which is each set's own system exactly
(MoRF at p and LeRF at 100 - p are near complements: one grid system serves both).
The factorisation runs in float32 (half the memory traffic of float64, faster even with the
refinement) and iterative refinement with float64 residuals makes up the precision: one or
two steps bring the residual below REFINEMENT_TOLERANCE, which leaves the solution within
1e-9 of a float64 direct sparse solve (at most 3e-11 measured on 224 x 224 AG-CAM masks).
The right-hand side is built as the reference builds it: each term w_ij v_j in float32 (from
the float32 image), summed in float64.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
import torch.nn.functional as F

from wsol_bench.metrics.grid_solver import OFFSETS, GridCholesky

CENTRE = 4
# The neighbour weights of the ROAD imputation in OFFSETS order: 1/6 edge, 1/12 corner.
NEIGHBOUR_WEIGHTS = [1 / 12, 1 / 6, 1 / 12, 1 / 6, 0.0, 1 / 6, 1 / 12, 1 / 6, 1 / 12]
REFINEMENT_TOLERANCE = 1e-10  # max |residual| / max(1, max |image|) at which refinement stops
MAX_REFINEMENTS = 8  # float32 factors gain ~4 digits a step; more steps mean a bug

Job = TypeVar("Job")
Result = TypeVar("Result")


def _neighbours(x: torch.Tensor) -> list[torch.Tensor]:
    """x(i + offset) for every offset of OFFSETS and every pixel i, zero outside the grid."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return [padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width] for dy, dx in OFFSETS]


def as_parts(removed: torch.Tensor) -> torch.Tensor:
    """Part labels [N, H, W] (int64, 0 = kept) of a bool removal mask (one part) or of labels."""
    return removed.long() if removed.dtype == torch.bool else removed.to(torch.int64)


def kept_neighbour_sum(images: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """sum_j w_ij v_j over the in-image neighbours j of every pixel i that are known to i's
    system (kept, or removed in another part): float64 [N, C, H, W], meaningful at removed
    pixels. Each term is rounded to float32 and the terms summed in float64, as the reference
    computes them from a float32 image (it moves the solution by up to ~1e-7)."""
    parts = as_parts(parts)
    values = images.float()
    total = torch.zeros(values.shape, dtype=torch.float64, device=values.device)
    for shifted, other, weight in zip(_neighbours(values), _neighbours(parts[:, None]), NEIGHBOUR_WEIGHTS):
        if weight:
            known = (other != parts[:, None]).float()  # outside the grid: zero values, whatever the flag
            total += (shifted * known * weight).double()
    return total


def system_coefficients(parts: torch.Tensor) -> torch.Tensor:
    """The systems on the whole grid: [N, 9, H, W] float64, slot k holding a(i, i + OFFSETS[k]).
    Removed pixels: a_ii = s_i, a_ij = -w_ij for neighbours j removed in the same part; kept
    pixels are identity rows, decoupled from the rest. `parts`: bool mask or part labels."""
    parts = as_parts(parts)[:, None]
    unknown = (parts != 0).to(torch.float64)
    weight_sum = sum(w * shifted for shifted, w in zip(_neighbours(torch.ones_like(unknown[:1])), NEIGHBOUR_WEIGHTS))
    slots = [unknown * weight_sum + (1 - unknown) if k == CENTRE else -weight * unknown * (shifted == parts)
             for k, (shifted, weight) in enumerate(zip(_neighbours(parts), NEIGHBOUR_WEIGHTS))]
    return torch.cat(slots, 1)


def apply_system(coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A x on the grid: coefficients [N, 9, H, W], x [N, C, H, W] -> [N, C, H, W]."""
    out = torch.zeros_like(x)
    for k, shifted in enumerate(_neighbours(x)):
        out.addcmul_(coefficients[:, k:k + 1], shifted)
    return out


def solve_imputation(images: torch.Tensor, removed: torch.Tensor, dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
    """The linear imputation without noise: images [N, C, H, W], removed [N, H, W] (bool, at
    least one pixel kept in each; or part labels, 0 = kept, each part leaving at least one
    pixel outside it) -> float64 [N, C, H, W], the solved values at the removed pixels (each
    part imputed from every pixel outside it) and 0 at the kept ones. The factorisation runs
    in `dtype`; refinement with float64 residuals brings the solution to float64 accuracy."""
    coefficients = system_coefficients(removed)
    rhs = kept_neighbour_sum(images, removed) * (as_parts(removed) != 0)[:, None]
    factors = GridCholesky(coefficients, dtype, rhs)
    solution = factors.first_solution.double()
    limit = REFINEMENT_TOLERANCE * images.detach().abs().amax((1, 2, 3), keepdim=True).double().clamp_min(1.0)
    for _ in range(MAX_REFINEMENTS):
        residual = rhs - apply_system(coefficients, solution)
        if bool((residual.abs().amax((1, 2, 3), keepdim=True) <= limit).all()):
            return solution
        solution += factors.solve(residual).double()
    raise RuntimeError(f"ROAD imputation: iterative refinement did not converge in {MAX_REFINEMENTS} steps "
                       f"(largest residual {float(residual.abs().max()):.3g})")


def solver_threads(device: torch.device) -> int:
    """Threads that solve chunks of systems side by side: on CPU one per torch intra-op thread,
    each single-threaded (the solver's many small batched operations split poorly between
    threads, and a waiting intra-op team stalls when another process holds a core: ~1.9x over
    one thread on 2 cores, against ~1.3x for torch's own threading); on accelerators one."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


def _single_threaded() -> None:
    torch.set_num_threads(1)  # per worker thread: the caller's thread keeps its own setting


def map_in_threads(fn: Callable[[Job], Result], jobs: Iterable[Job], workers: int) -> Iterator[Result]:
    """fn(job) for every job, yielded in the jobs' order, computed by `workers` single-threaded
    threads (torch releases the GIL) at most 2 x workers ahead of the consumer, so its memory
    stays bounded; inline when workers is 1. Meanwhile the consumer's thread runs torch
    single-threaded too (restored at the end): its own work between results (the model's
    passes) would otherwise wait on an intra-op team that competes with the solver threads
    for the cores (measured: the passes ~6x slower)."""
    if workers <= 1:
        yield from map(fn, jobs)
        return

    def run(job: Job) -> Result:
        with torch.inference_mode():  # grad mode is per thread: the caller's does not carry over
            return fn(job)

    caller_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, initializer=_single_threaded) as pool:
            pending: deque = deque()
            for job in jobs:
                pending.append(pool.submit(run, job))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(caller_threads)
