"""Noisy linear imputation of ROAD (Rong et al., ICML 2022) for a whole stack of images and
removal masks at once, on their device (docs/protocol.md 5); the noise is added by the caller.

Every removed pixel takes the weighted mean of its in-image 8 neighbours (weight 1/6 for the
4 edge neighbours, 1/12 for the 4 corner ones; neighbours outside the image are left out and
the remaining weights renormalised by their sum s_i), where removed neighbours are unknowns
themselves. For one image and mask that is the sparse linear system
    s_i x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij v_j    (i removed),
one right-hand side per channel, symmetric positive definite as soon as one pixel is kept.
On the whole grid, with kept pixels as identity rows, every system of the stack has the same
9-point stencil shape, so `GridCholesky` factors them all at once. The factorisation runs in
float32 (half the memory traffic of float64) and iterative refinement with float64 residuals
makes up the precision: the first refinement step brings the residual below
REFINEMENT_TOLERANCE, which leaves the solution within ~1e-8 of a float64 direct sparse solve.
The right-hand side is built as the reference builds it: each term w_ij v_j in float32 (from
the float32 image), summed in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsol_bench.metrics.grid_solver import OFFSETS, GridCholesky

CENTRE = 4
# The neighbour weights of the ROAD imputation in OFFSETS order: 1/6 edge, 1/12 corner.
NEIGHBOUR_WEIGHTS = [1 / 12, 1 / 6, 1 / 12, 1 / 6, 0.0, 1 / 6, 1 / 12, 1 / 6, 1 / 12]
REFINEMENT_TOLERANCE = 1e-10  # max |residual| / max(1, max |image|) at which refinement stops
MAX_REFINEMENTS = 8  # float32 factors gain ~4 digits a step; more steps mean a bug


def _neighbours(x: torch.Tensor) -> list[torch.Tensor]:
    """x(i + offset) for every offset of OFFSETS and every pixel i, zero outside the grid."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return [padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width] for dy, dx in OFFSETS]


def kept_neighbour_sum(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """sum_j w_ij v_j over the kept in-image neighbours j of every pixel i: float64
    [N, C, H, W]. Each term is rounded to float32 and the terms summed in float64, as the
    reference computes them from a float32 image (it moves the solution by up to ~1e-7)."""
    known = images.float() * (~removed).float()[:, None]
    total = torch.zeros(known.shape, dtype=torch.float64, device=known.device)
    for shifted, weight in zip(_neighbours(known), NEIGHBOUR_WEIGHTS):
        if weight:
            total += (shifted * weight).double()
    return total


def system_coefficients(removed: torch.Tensor) -> torch.Tensor:
    """The systems on the whole grid: [N, 9, H, W] float64, slot k holding a(i, i + OFFSETS[k]).
    Removed pixels: a_ii = s_i, a_ij = -w_ij for removed neighbours j; kept pixels are
    identity rows, decoupled from the rest."""
    unknown = removed.to(torch.float64)[:, None]
    weight_sum = sum(w * shifted for shifted, w in zip(_neighbours(torch.ones_like(unknown[:1])), NEIGHBOUR_WEIGHTS))
    slots = [unknown * weight_sum + (1 - unknown) if k == CENTRE else -weight * unknown * shifted
             for k, (shifted, weight) in enumerate(zip(_neighbours(unknown), NEIGHBOUR_WEIGHTS))]
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
    least one pixel kept in each) -> float64 [N, C, H, W], the solved values at the removed
    pixels and 0 at the kept ones. The factorisation runs in `dtype`; refinement with float64
    residuals brings the solution to float64 accuracy either way."""
    coefficients = system_coefficients(removed)
    rhs = kept_neighbour_sum(images, removed) * removed[:, None]
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
