"""The fast paths of the ROAD imputation (docs/protocol.md 5): disjoint removal sets solved as
the parts of one grid system, their packing, and the solver threads, each against scipy's
spsolve of the library's own system or against the plain path."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from conftest import make_vit
from scipy.sparse import coo_matrix, csc_matrix, diags
from scipy.sparse.linalg import spsolve

import wsol_bench.metrics.road as road_engine
from wsol_bench.metrics.grid_solver import OFFSETS, SWEEP_SIZE, GridCholesky, _plan
from wsol_bench.metrics.road import RoadSettings, pack_disjoint, removal_masks, road_scores
from wsol_bench.metrics.road_imputation import map_in_threads, solve_imputation

road = pytest.importorskip("pytorch_grad_cam.metrics.road")
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")


def direct_solution(image: torch.Tensor, removed: torch.Tensor) -> np.ndarray:
    """scipy's spsolve of the library's system for one mask: [count, C], row-major pixels."""
    matrix, rhs = road.NoisyLinearImputer.setup_sparse_system((~removed).float().numpy(), image.numpy(),
                                                             road.neighbors_weights)
    return spsolve(csc_matrix(matrix), rhs).reshape(-1, image.shape[0])


def shaped_masks(height: int, width: int) -> list[torch.Tensor]:
    """Disjoint removal sets with the shapes the solver must handle: many small components
    (single pixels among them), a component along the border, a whole removed row."""
    generator = torch.Generator().manual_seed(31)
    scattered = torch.rand(height, width, generator=generator) < 0.15  # many 1- to few-pixel components
    border = torch.zeros(height, width, dtype=torch.bool)
    border[:, :3] = True  # touches three sides of the image
    border[0, :] = True
    row = torch.zeros(height, width, dtype=torch.bool)
    row[height // 2] = True  # a whole row: the image cut in two
    lone = torch.zeros(height, width, dtype=torch.bool)
    lone[height - 2, width - 2] = True  # one pixel alone
    masks, taken = [], torch.zeros(height, width, dtype=torch.bool)
    for mask in (border, row, lone, scattered):
        mask = mask & ~taken
        masks.append(mask)
        taken |= mask
    return masks


def test_parts_of_one_grid_system_equal_their_own_direct_solves() -> None:
    """Four disjoint sets as the parts 1..4 of one system: each part's values equal scipy's
    spsolve of that set alone (every pixel outside it known, the other parts' included) to
    1e-9; the same sets solved one per system agree to 1e-9."""
    image = torch.randn(3, 23, 29, generator=torch.Generator().manual_seed(32))
    masks = shaped_masks(23, 29)
    parts = torch.zeros(1, 23, 29, dtype=torch.int64)
    for label, mask in enumerate(masks, 1):
        parts[0][mask] = label
    together = solve_imputation(image[None], parts)[0]
    alone = solve_imputation(image[None].expand(len(masks), -1, -1, -1), torch.stack(masks))
    for mask, own in zip(masks, alone):
        direct = direct_solution(image, mask)
        assert np.abs(together[:, mask].numpy().T - direct).max() < 1e-9
        assert np.abs(own[:, mask].numpy().T - direct).max() < 1e-9
    assert (together[:, ~parts[0].bool()] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_complementary_masks_in_one_system_equal_spsolve(seed: int) -> None:
    """Random-threshold masks of a smooth map and of random noise: the top and the bottom of
    the ranking (MoRF at p and LeRF at 100 - p, disjoint) in one system, both to 1e-9."""
    generator = torch.Generator().manual_seed(seed)
    size = (31, 26)
    coarse = torch.rand(1, 1, 5, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0, 0]
    values = smooth if seed != 2 else torch.rand(size, generator=generator)
    split = float(torch.rand(1, generator=generator)) * 0.8 + 0.1
    threshold = values.flatten().quantile(split)
    top, bottom = values > threshold, values <= threshold
    image = torch.randn(3, *size, generator=generator)
    solved = solve_imputation(image[None], (top.long() + 2 * bottom.long())[None])[0]
    for mask in (top, bottom):
        assert np.abs(solved[:, mask].numpy().T - direct_solution(image, mask)).max() < 1e-9


def test_packing_pairs_disjoint_masks_and_keeps_every_slot_once() -> None:
    """The default percentiles on a map without ties: 18 inputs in at most 10 grid systems,
    each system's masks pairwise disjoint; overlapping masks never share one; a mask that
    removes every pixel stays alone."""
    heat = torch.rand(1, 24, 24, generator=torch.Generator().manual_seed(33))
    masks = removal_masks(heat, RoadSettings())[0]
    counts = masks.flatten(1).sum(1)
    systems = pack_disjoint(masks, counts)
    assert sorted(j for slots in systems for j in slots) == list(range(18))
    assert len(systems) <= 10
    for slots in systems:
        for a in slots:
            for b in slots:
                assert a == b or not (masks[a] & masks[b]).any()
    overlapping = torch.zeros(3, 4, 4, dtype=torch.bool)
    overlapping[0, :2] = True
    overlapping[1, 1:3] = True  # overlaps mask 0 in row 1
    overlapping[2] = True  # every pixel
    assert sorted(pack_disjoint(overlapping, overlapping.flatten(1).sum(1))) == [[0], [1], [2]]


def test_map_in_threads_keeps_the_order_of_the_jobs() -> None:
    """Jobs that finish out of order (the first is the slowest) come back in their order, from
    more than one thread, and the same as inline; the caller runs torch single-threaded while
    the solver threads work, and gets its own thread count back afterwards."""
    threads, caller_threads_seen = set(), []

    def job(delay: float) -> float:
        threads.add(threading.get_ident())
        time.sleep(delay)
        return delay

    delays = [0.05, 0.0, 0.02, 0.0, 0.01, 0.0]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for result in map_in_threads(job, delays, 2):
            caller_threads_seen.append(torch.get_num_threads())
            results.append(result)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert results == delays and set(caller_threads_seen) == {1}
    assert len(threads) == 2
    assert list(map_in_threads(job, delays, 1)) == delays


def test_solver_threads_give_the_single_thread_numbers(monkeypatch) -> None:
    """road_scores with two solver threads and small chunks equals one thread, per input."""
    model = make_vit()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(34))
    heat = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(35))
    labels = torch.tensor([0, 3, 4])
    settings = RoadSettings(solve_batch_size=2, seed=6)
    monkeypatch.setattr(road_engine, "solver_threads", lambda device: 2)
    threaded = road_scores(model, images, heat, labels, settings)
    monkeypatch.setattr(road_engine, "solver_threads", lambda device: 1)
    inline = road_scores(model, images, heat, labels, settings)
    for key in ("morf", "lerf", "road_combined"):
        assert torch.allclose(threaded[key], inline[key], rtol=0, atol=1e-6)


def test_grid_solver_with_cholesky_blocks_equals_spsolve() -> None:
    """A 70 x 75 grid, large enough that separators longer than SWEEP_SIZE (inverted through
    their Cholesky factor) pass a Schur complement up to a ring: random SPD 9-point systems
    factored in float64, no refinement, against scipy's spsolve of the assembled matrices."""
    height, width = 70, 75
    assert any(g.eliminated.shape[1] > SWEEP_SIZE and g.ring.shape[1] > 0
               for level in _plan(height, width, torch.device("cpu")) for g in level.groups)
    generator = torch.Generator().manual_seed(36)
    n = height * width
    index = np.arange(n).reshape(height, width)
    coefficients = torch.zeros(2, 9, height, width, dtype=torch.float64)
    matrices = []
    for s in range(2):
        rows, cols, values = [], [], []
        for dy, dx in OFFSETS:
            if (dy, dx) > (0, 0):  # each pair once, mirrored: symmetric
                here = index[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)].ravel()
                coupling = -torch.rand(len(here), generator=generator, dtype=torch.float64).numpy() / 8
                rows += [here, here + dy * width + dx]
                cols += [here + dy * width + dx, here]
                values += [coupling, coupling]
        off = coo_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
        matrix = (off + diags(np.asarray(abs(off).sum(1)).ravel() + 0.01)).tocsr()  # diagonally dominant: SPD
        matrices.append(matrix)
        for k, (dy, dx) in enumerate(OFFSETS):
            inside = index[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)]
            entries = np.asarray(matrix[inside.ravel(), inside.ravel() + dy * width + dx]).ravel()
            coefficients[s, k].view(-1)[torch.from_numpy(inside.ravel())] = torch.from_numpy(entries)
    rhs = torch.randn(2, 3, height, width, generator=generator, dtype=torch.float64)
    solved = GridCholesky(coefficients, torch.float64, rhs).first_solution
    for s in range(2):
        direct = spsolve(csc_matrix(matrices[s]), rhs[s].flatten(1).T.numpy())
        assert np.abs(solved[s].flatten(1).T.numpy() - direct).max() < 1e-10
