"""A batched direct solver for symmetric positive definite systems with a 9-point stencil on
one H x W pixel grid, many systems at once on their device (the ROAD imputation's solver).

Nested dissection: the grid is cut into boxes by one-pixel lines (a 9-point stencil couples
nothing across such a line), recursively, down to boxes of at most LEAF_AREA pixels. Each box
eliminates its own pixels (its cutting line, or all of a leaf) with a dense inverse of their
block and passes the Schur complement on its ring (the pixels around the box, which its
ancestors eliminate) up to its parent. That is an exact block Cholesky factorisation of the
sparse matrix. The elimination plan depends on the grid only, so it serves every system:
boxes of one shape are stacked with every system of the stack into one batched product.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

# Offsets (dy, dx) of the 3x3 stencil in row-major order; index 4 is the centre.
OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
LEAF_AREA = 12  # boxes of at most this many pixels are eliminated whole
SWEEP_SIZE = 32  # blocks up to this size are inverted by vectorised sweeps (see spd_inverse)


@dataclass
class _Node:
    """A box of the dissection: the pixels it eliminates (its separator line, or all of a
    leaf), the ring of pixels around the box (eliminated by its ancestors), its children."""

    eliminated: np.ndarray
    ring: np.ndarray
    children: list[_Node] = field(default_factory=list)
    height: int = 0


def _dissect(rows: tuple[int, int], cols: tuple[int, int], width: int, grid: tuple[int, int]) -> _Node:
    """Nested dissection of the box rows x cols (half-open) of a grid of `width` columns."""
    (r0, r1), (c0, c1) = rows, cols
    ring_rows = np.arange(max(r0 - 1, 0), min(r1 + 1, grid[0]))
    ring_cols = np.arange(max(c0 - 1, 0), min(c1 + 1, grid[1]))
    rr, cc = np.meshgrid(ring_rows, ring_cols, indexing="ij")
    outside = (rr < r0) | (rr >= r1) | (cc < c0) | (cc >= c1)
    ring = (rr * width + cc)[outside]
    if (r1 - r0) * (c1 - c0) <= LEAF_AREA:
        box_r, box_c = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        return _Node((box_r * width + box_c).ravel(), ring)
    if r1 - r0 >= c1 - c0:  # cut the longer side with one line through its middle
        mid = (r0 + r1) // 2
        line = mid * width + np.arange(c0, c1)
        halves = [((r0, mid), (c0, c1)), ((mid + 1, r1), (c0, c1))]
    else:
        mid = (c0 + c1) // 2
        line = np.arange(r0, r1) * width + mid
        halves = [((r0, r1), (c0, mid)), ((r0, r1), (mid + 1, c1))]
    children = [_dissect(r, c, width, grid) for r, c in halves if r[1] > r[0] and c[1] > c[0]]
    return _Node(line, ring, children, 1 + max(child.height for child in children))


@dataclass
class _Group:
    """Boxes of one shape (m eliminated pixels, r ring pixels, same entry count, parents on
    one level), factored as one batch. Their fronts are [G, M, M] with M = m + r: the
    eliminated pixels first, then the ring."""

    eliminated: torch.Tensor  # [G, m] pixel indices
    ring: torch.Tensor  # [G, r]
    matrix_offset: int  # where the group's fronts start in its level's matrix buffer
    vector_offset: int  # where its right-hand sides start (rows) in its level's vector buffer
    parent_level: int = -1  # the level of the parents (-1: the root)
    to_parent_matrix: torch.Tensor | None = None  # [G * r * r] Schur entries -> parent buffer
    to_parent_vector: torch.Tensor | None = None  # [G * r] reduced right-hand side -> parent buffer


@dataclass
class _Level:
    """All boxes of one height of the dissection tree, with one matrix and one vector buffer."""

    groups: list[_Group]
    matrix_size: int
    vector_size: int
    entry_index: torch.Tensor  # positions of the matrix entries in the matrix buffer
    entry_source: torch.Tensor  # their slot * H * W + pixel in `system_coefficients`
    rhs_index: torch.Tensor  # rows of the eliminated pixels in the vector buffer
    rhs_pixels: torch.Tensor  # those pixels
    children: list[tuple[int, int]] = field(default_factory=list)  # (level, group) feeding this level


def _front_entries(node: _Node, lookup: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Flat front positions and coefficient sources of the entries a_ij the box adds: i
    eliminated here, j eliminated here or on the ring (entered at (i, j) and (j, i))."""
    height, width = grid
    m, size = len(node.eliminated), len(node.eliminated) + len(node.ring)
    pixels = node.eliminated
    rows, cols = pixels // width, pixels % width
    index, source = [], []
    for k, (dy, dx) in enumerate(OFFSETS):
        inside = (rows + dy >= 0) & (rows + dy < height) & (cols + dx >= 0) & (cols + dx < width)
        i, here = pixels[inside], np.flatnonzero(inside)
        there = lookup[i + dy * width + dx]
        keep = there >= 0  # -1: a pixel of a child box, entered there
        i, here, there = i[keep], here[keep], there[keep]
        index += [here * size + there, (there * size + here)[there >= m]]
        source += [k * height * width + i, (k * height * width + i)[there >= m]]
    return np.concatenate(index), np.concatenate(source)


def _tree(height: int, width: int) -> tuple[list[_Node], dict[int, _Node]]:
    """The dissection's boxes, root first, and the parent of each box (by id)."""
    order, parent, stack = [], {}, [_dissect((0, height), (0, width), width, (height, width))]
    while stack:
        node = stack.pop()
        order.append(node)
        for child in node.children:
            parent[id(child)] = node
            stack.append(child)
    return order, parent


@functools.lru_cache(maxsize=8)
def _plan(height: int, width: int, device: torch.device) -> list[_Level]:
    """The elimination plan of an H x W grid: levels of equal-shape groups, leaves first."""
    order, parent = _tree(height, width)
    lookup = np.full(height * width, -1, dtype=np.int64)
    grouped: dict[tuple, list[_Node]] = {}
    entries, child_positions = {}, {}
    for node in order:
        front = np.concatenate([node.eliminated, node.ring])
        lookup[front] = np.arange(len(front))
        entries[id(node)] = _front_entries(node, lookup, (height, width))
        for child in node.children:
            child_positions[id(child)] = lookup[child.ring]
        lookup[front] = -1
        up = parent[id(node)].height if id(node) in parent else -1
        key = (node.height, len(node.eliminated), len(node.ring), len(entries[id(node)][0]), up)
        grouped.setdefault(key, []).append(node)
    heights = sorted({key[0] for key in grouped})
    level_of = {h: i for i, h in enumerate(heights)}
    where: dict[int, tuple[int, int, int]] = {}  # box -> (level, group, slot)
    levels = []

    def tensor(values) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)

    for h in heights:
        keys = [key for key in grouped if key[0] == h]
        groups, index, source, rhs_index, rhs_pixels = [], [], [], [], []
        matrix_size = vector_size = 0
        for key in keys:
            nodes, (_, m, r, _, up) = grouped[key], key
            size = m + r
            for slot, node in enumerate(nodes):
                where[id(node)] = (len(levels), len(groups), slot)
                position, origin = entries[id(node)]
                index.append(matrix_size + slot * size * size + position)
                source.append(origin)
                rhs_index.append(vector_size + slot * size + np.arange(m))
                rhs_pixels.append(node.eliminated)
            groups.append(_Group(tensor([n.eliminated for n in nodes]), tensor([n.ring for n in nodes]),
                                 matrix_size, vector_size, level_of.get(up, -1)))
            matrix_size += len(nodes) * size * size
            vector_size += len(nodes) * size
        levels.append(_Level(groups, matrix_size, vector_size, tensor(np.concatenate(index)),
                             tensor(np.concatenate(source)), tensor(np.concatenate(rhs_index)),
                             tensor(np.concatenate(rhs_pixels))))
    for key, nodes in grouped.items():  # where each group's Schur complements go
        level, g, _ = where[id(nodes[0])]
        if key[4] < 0:
            continue
        matrix, vector = [], []
        for node in nodes:
            up_level, up_group, up_slot = where[id(parent[id(node)])]
            target = levels[up_level].groups[up_group]
            size = target.eliminated.shape[1] + target.ring.shape[1]
            pos = child_positions[id(node)]
            matrix.append(target.matrix_offset + up_slot * size * size + (pos[:, None] * size + pos).ravel())
            vector.append(target.vector_offset + up_slot * size + pos)
        group = levels[level].groups[g]
        group.to_parent_matrix, group.to_parent_vector = tensor(np.concatenate(matrix)), tensor(np.concatenate(vector))
        levels[group.parent_level].children.append((level, g))
    return levels


def spd_inverse(matrices: torch.Tensor) -> torch.Tensor:
    """Inverses of symmetric positive definite matrices [..., m, m]. With them the Schur
    complements and both substitutions are batched products (batched triangular solves are
    slow on CPU). Small blocks come in large batches, where one LAPACK call per matrix costs
    more than the arithmetic: they are inverted by m vectorised sweeps (Gauss-Jordan without
    pivoting, stable for SPD matrices); large ones through their Cholesky factor."""
    size = matrices.shape[-1]
    if size > SWEEP_SIZE:
        return torch.cholesky_inverse(torch.linalg.cholesky(matrices))
    work = matrices.reshape(-1, size, size).clone()
    for k in range(size):
        pivot = work[:, k, k].clone()
        column = work[:, :, k] / pivot[:, None]
        row = work[:, k, :].clone()
        work -= column[:, :, None] * row[:, None, :]
        work[:, :, k] = column
        work[:, k, :] = row / pivot[:, None]
        work[:, k, k] = -1 / pivot
    return work.neg_().view(matrices.shape)


class GridCholesky:
    """The factorisation of a stack of systems: coefficients [N, 9, H, W] with slot k holding
    a(i, i + OFFSETS[k]) (zero outside the grid; each matrix symmetric positive definite),
    factored in `dtype`. `rhs` [N, C, H, W], when given, is eliminated along with the
    factorisation and its solution kept in `first_solution` (one forward sweep fewer)."""

    def __init__(self, coefficients: torch.Tensor, dtype: torch.dtype = torch.float32,
                 rhs: torch.Tensor | None = None) -> None:
        self.shape = tuple(coefficients.shape[-2:])
        self.levels = _plan(*self.shape, coefficients.device)
        self.dtype = dtype
        flat = coefficients.flatten(1).to(dtype)
        batch = flat.shape[0]
        values = None if rhs is None else self._pixel_values(rhs)
        self.factors: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self._reduced: dict[tuple[int, int], torch.Tensor] = {}
        partial, schur = [], {}
        for li, level in enumerate(self.levels):
            matrix = flat.new_zeros(batch, level.matrix_size)
            matrix.index_add_(1, level.entry_index, flat[:, level.entry_source])
            for child in level.children:
                matrix.index_add_(1, self.levels[child[0]].groups[child[1]].to_parent_matrix,
                                  schur.pop(child).flatten(1))
            self.factors.append([])
            for gi, group in enumerate(level.groups):
                count, m = group.eliminated.shape
                size = m + group.ring.shape[1]
                front = matrix[:, group.matrix_offset:group.matrix_offset + count * size * size]
                front = front.view(batch, count, size, size)
                inverse = spd_inverse(front[..., :m, :m])
                to_ring = inverse @ front[..., :m, m:]  # F_EE^-1 F_ER
                schur[(li, gi)] = front[..., m:, m:] - front[..., :m, m:].mT @ to_ring
                self.factors[-1].append((inverse, to_ring))
            if values is not None:
                partial.append(self._eliminate(li, values))
        self.first_solution = None if rhs is None else self._backward(partial, rhs.shape)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """x with A x = rhs for every system: [N, C, H, W] -> [N, C, H, W] in the factors' dtype."""
        values = self._pixel_values(rhs)
        partial = [self._eliminate(li, values) for li in range(len(self.levels))]
        return self._backward(partial, rhs.shape)

    def _pixel_values(self, rhs: torch.Tensor) -> torch.Tensor:
        return rhs.flatten(2).transpose(1, 2).to(self.dtype)  # [N, H*W, C]

    def _eliminate(self, li: int, values: torch.Tensor) -> list[torch.Tensor]:
        """Forward sweep of one level (its children done): per group F_EE^-1 b_E, and the
        ring's reduced right-hand side b_R - F_RE F_EE^-1 b_E, kept for the parents."""
        level = self.levels[li]
        batch, _, channels = values.shape
        vector = values.new_zeros(batch, level.vector_size, channels)
        vector[:, level.rhs_index] = values[:, level.rhs_pixels]
        for child in level.children:
            vector.index_add_(1, self.levels[child[0]].groups[child[1]].to_parent_vector,
                              self._reduced.pop(child).flatten(1, 2))
        partial = []
        for gi, (group, (inverse, to_ring)) in enumerate(zip(level.groups, self.factors[li])):
            count, m = group.eliminated.shape
            size = m + group.ring.shape[1]
            front = vector[:, group.vector_offset:group.vector_offset + count * size].view(batch, count, size, channels)
            self._reduced[(li, gi)] = front[..., m:, :] - to_ring.mT @ front[..., :m, :]
            partial.append(inverse @ front[..., :m, :])
        return partial

    def _backward(self, partial: list[list[torch.Tensor]], shape: torch.Size) -> torch.Tensor:
        """Backward sweep, root first: x_E = F_EE^-1 b_E - (F_EE^-1 F_ER) x_R."""
        solution = partial[0][0].new_zeros(shape[0], self.shape[0] * self.shape[1], shape[1])
        for li in reversed(range(len(self.levels))):
            for group, (_, to_ring), own in zip(self.levels[li].groups, self.factors[li], partial[li]):
                solution[:, group.eliminated] = own - to_ring @ solution[:, group.ring]
        return solution.transpose(1, 2).reshape(shape)
