"""Exact, order-independent sums of scores in [0, 1], as integer states that merge by addition.

A mean over 50,000 images summed in float64 depends on the order of the additions, so two
shardings of one run (or two ranks of a data-parallel run) would disagree in the last digits.
Here every value is written as three 40-bit fixed-point chunks (exact for every float64 in
[2^-68, 1], and to 2^-120 below that), the chunks are summed as int64 (exact for up to 2^23
values), and the mean is the correctly rounded value of the exact total: the same number for
any order and any split.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from wsol_bench.errors import SettingError

CHUNK_BITS = 40
CHUNKS = 3
MAX_VALUES = 1 << 23  # chunk sums stay below 2^63


def fixed_point_chunks(values: np.ndarray) -> np.ndarray:
    """float64 values in [0, 1], any shape [...] -> int64 chunks [..., CHUNKS], most significant first."""
    rest = np.asarray(values, dtype=np.float64)
    if rest.size and not (np.isfinite(rest).all() and rest.min() >= 0 and rest.max() <= 1):
        raise SettingError("exact sums take scores in [0, 1]; got values outside it (or NaN)")
    chunks = []
    for _ in range(CHUNKS):
        rest = np.ldexp(rest, CHUNK_BITS)  # exact: a power-of-two scaling
        whole = np.floor(rest)
        chunks.append(whole.astype(np.int64))
        rest = rest - whole  # exact: the fraction of a float is a float
    return np.stack(chunks, axis=-1)


def exact_total(chunk_sums) -> Fraction:
    """The exact sum that summed chunks [CHUNKS] (ints) stand for."""
    total = 0
    for chunk in (int(c) for c in chunk_sums):
        total = (total << CHUNK_BITS) + chunk
    return Fraction(total, 1 << (CHUNK_BITS * CHUNKS))


def exact_mean(chunk_sums, count: int) -> float:
    """Correctly rounded mean of `count` values whose chunks sum to `chunk_sums`; NaN without values."""
    if count == 0:
        return float("nan")
    return float(exact_total(chunk_sums) / count)


def totals_exceed(chunk_sums, counts) -> np.ndarray:
    """bool [...]: where summed chunks [..., CHUNKS] stand for a total larger than `counts`
    values in [0, 1] can reach (`counts` broadcast to [...]): the mark of a damaged state."""
    chunks = np.asarray(chunk_sums, dtype=np.int64)
    total = np.zeros(chunks.shape[:-1], dtype=object)  # Python ints: the totals pass 64 bits
    for k in range(CHUNKS):
        total = (total << CHUNK_BITS) + chunks[..., k].astype(object)
    return total > (np.asarray(counts, dtype=np.int64).astype(object) << (CHUNK_BITS * CHUNKS))
