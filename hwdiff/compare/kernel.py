"""One fused, compiled pass per block for :class:`~hwdiff.compare.metrics.Accumulator`.

The numpy path in :mod:`.metrics` makes about forty passes over float64 copies of a block; the numba
kernel (:mod:`hwdiff.common._numba_kernels`) reads each element pair once, in its stored dtype, and accumulates every sum,
the ULP histogram bin, the 1‰/5‰ counts, the non-finite counts and each token's ‖e‖² in registers.
A block is cut into a fixed number of chunks (on token boundaries) reduced on parallel threads, each
into its own row of partial results, and the rows are added in a fixed order: results do not depend
on the thread count, and a rerun is bit-identical. Definitions are the numpy path's; the tests hold
the two paths to each other (counts and maxima exactly, sums to 1e-12 relative).

numba is optional: without it, or with ``HWDIFF_JIT=0`` in the environment, the numpy path is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..common import jit
from ..store.format import decoded

SUMS = ("n", "equal", "rr", "tt", "ee", "re", "e", "abs_e", "le1", "r1", "r5")
# The row of partial results the kernel (hwdiff.common._numba_kernels.reduce_block) writes per chunk, in column order:
# the sums, the maxima, the non-finite counts, the flat index of the chunk's first largest |e| (-1: none)
COLUMNS = SUMS + (
    "max_abs",
    "max_ulp",
    "ref_nan",
    "ref_inf",
    "target_nan",
    "target_inf",
    "max_index",
)
_MAX_ABS, _MAX_ULP, _MAX_INDEX = (
    COLUMNS.index(name) for name in ("max_abs", "max_ulp", "max_index")
)
_NONFINITE = slice(COLUMNS.index("ref_nan"), COLUMNS.index("target_inf") + 1)


@dataclass(frozen=True)
class BlockSums:
    """What one block adds: the sums named in :data:`SUMS`, the maxima, non-finite counts
    (ref NaN, ref Inf, target NaN, target Inf), the ULP histogram and each token's ‖e‖²;
    ``max_index``: the flat index of the first element with the largest |e| (-1 when every e is 0)."""

    sums: dict[str, float]
    max_abs: float
    max_ulp: float
    nonfinite: np.ndarray
    hist: np.ndarray
    token_squares: np.ndarray
    max_index: int


# Integer view, magnitude mask and shift of the ULP distance, by (dtype, storage): bfloat16 arrives
# either as stored (uint16 bit patterns) or widened to float32 (its bits << 16).
_BITS: dict[tuple[str, str], tuple[type[np.signedinteger], int, int]] = {
    ("float16", "float16"): (np.int16, 0x7FFF, 0),
    ("float32", "float32"): (np.int32, 0x7FFFFFFF, 0),
    ("bfloat16", "uint16"): (np.int16, 0x7FFF, 0),
    ("bfloat16", "float32"): (np.int32, 0x7FFFFFFF, 16),
}


def reduce_block(
    r: np.ndarray,
    t: np.ndarray,
    *,
    ref_dtype: str,
    target_dtype: str,
    floor: float,
    light: bool,
    width: int,
    mantissa: int,
    min_exponent: int,
    quarter_steps: np.ndarray,
    thresholds: np.ndarray,
    small_bins: np.ndarray,
    bins: int,
) -> BlockSums:
    """Reduce a block of (r, t) values, decoded or as stored (bfloat16 as uint16 bit patterns, read
    without a decoding pass); ``width`` > 0 gives per-token ‖e‖² of that many elements each.
    ``mantissa`` / ``min_exponent`` describe the target dtype for the ULP distance; ``small_bins[d]``
    is the histogram bin of an integer distance d < len(small_bins), ``thresholds`` the quarter-octave
    edges of larger ones by bit length (:mod:`.metrics` defines the bins)."""
    compiled = jit.kernels()
    if compiled is None:
        raise RuntimeError(jit.why_unavailable())
    function = compiled.reduce_block
    r, t = np.ascontiguousarray(r).ravel(), np.ascontiguousarray(t).ravel()
    if r.dtype != t.dtype:  # one side as stored, one decoded (uint16 is always bfloat16 bits)
        r, t = decoded(r), decoded(t)
    same = ref_dtype == target_dtype and r.dtype == t.dtype and (ref_dtype, r.dtype.name) in _BITS
    bits, top, shift = None, 0, 0
    if same:
        view, top, shift = _BITS[(ref_dtype, r.dtype.name)]
        bits = (r.view(view), t.view(view))
    # numba's CPU target has no float16 arithmetic; the widening is exact (the bits are viewed before)
    r, t = (x.astype(np.float32) if x.dtype == np.float16 else x for x in (r, t))
    # unused unless same: any array of the right length
    rbits, tbits = bits if bits is not None else (r, t)
    chunks = jit.chunks(r.size)
    partial = np.zeros((chunks, len(COLUMNS)), dtype=np.float64)
    hist = np.zeros((chunks, bins), dtype=np.int64)
    exact = np.zeros((chunks, small_bins.size if same and not light else 1), dtype=np.int64)
    row_ee = np.zeros(r.size // width if width > 0 else 0, dtype=np.float64)
    function(
        r,
        t,
        rbits,
        tbits,
        top,
        shift,
        same,
        mantissa,
        min_exponent,
        float(floor),
        light,
        width,
        quarter_steps,
        thresholds,
        partial,
        hist,
        exact,
        row_ee,
    )
    total = partial.sum(axis=0)
    sums = dict(zip(SUMS, map(float, total[: len(SUMS)])))
    histogram = hist.sum(axis=0)
    if same and not light:
        counts = exact.sum(axis=0)
        histogram += np.bincount(small_bins, weights=counts, minlength=bins).astype(np.int64)
        sums["le1"] = float(counts[:2].sum())  # d ≤ 1
    first = int(
        np.argmax(partial[:, _MAX_ABS])
    )  # chunks are in element order: the first largest |e|
    return BlockSums(
        sums=sums,
        max_abs=float(partial[first, _MAX_ABS]),
        max_ulp=float(partial[:, _MAX_ULP].max()),
        nonfinite=total[_NONFINITE].astype(np.int64),
        hist=histogram,
        token_squares=row_ee,
        max_index=int(partial[first, _MAX_INDEX]),
    )
