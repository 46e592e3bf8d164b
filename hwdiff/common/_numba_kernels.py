"""The numba kernels behind :mod:`hwdiff.common.jit` (imported only when numba is installed and wanted)."""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.cpython.unsafe.numbers import leading_zeros
from numba.extending import intrinsic, overload


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret a uint32 as the float32 with those bits."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_float64(typingctx, value):
    """Reinterpret a float64 as the int64 with its bits."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


def _value(x):
    """An element as float64: floats widen; uint16 elements are bfloat16 bit patterns, as stored."""


@overload(_value, inline="always")
def _value_impl(x):
    if isinstance(x, types.Integer):
        return lambda x: np.float64(_float32_from_bits(np.uint32(x) << np.uint32(16)))
    return lambda x: np.float64(x)


@numba.njit(cache=True, nogil=True, inline="always")
def _ordered(bits, top):
    """Sign-magnitude float bits → integers in value order (+0 and −0 both map to 0)."""
    negative = np.int64(
        bits < 0
    )  # branchless: the sign of activations is a coin flip for the predictor
    return ((bits & top) ^ -negative) + negative


@numba.njit(parallel=True, cache=True, nogil=True)
def reduce_block(
    r,
    t,
    rbits,
    tbits,
    top,
    shift,
    same_dtype,
    mantissa,
    min_exponent,
    floor,
    light,
    width,
    quarter_steps,
    thresholds,
    partial,
    hist,
    exact_counts,
    row_ee,
):
    """Reduce one block of element pairs into one row per chunk of ``partial`` [chunks, columns] (the
    columns of :data:`hwdiff.compare.kernel.COLUMNS`, in that order), ``hist`` [chunks, bins] and
    ``exact_counts`` [chunks, small]; chunks end on token boundaries.

    r, t: 1-D arrays, float32 / float64 values or uint16 bfloat16 bit patterns as stored (each
    side on its own). Same dtype: the ULP distance is the integer
    d = |ordered(tbits) − ordered(rbits)| >> shift; d < small is counted exactly in
    ``exact_counts`` (binned afterwards), larger d goes to quarter-octave bin 256 + 4(j − 4) + q with
    j = ⌊log2 d⌋ and q the number of ``thresholds[j, 1:4]`` (⌈2^j·2^(q/4)⌉) that d reaches. Otherwise
    u = |e| / ulp at r (at t where r is 0) of a format with ``mantissa`` bits and ``min_exponent``,
    binned by 1/16 below 16 and by quarter octaves 16·2^j·quarter_steps[q] above, read off u/16's
    exponent and fraction fields. Either way the bins are the numpy path's edges, compared exactly.
    ``width`` > 0: elements per token, each token's ‖e‖² goes to ``row_ee``.
    """
    n = r.size
    chunks = partial.shape[0]
    last_bin = hist.shape[1] - 1
    small = exact_counts.shape[1]
    rows = n // width if width > 0 else 0
    fraction_mask = np.int64(0xFFFFFFFFFFFFF)
    step_bits = quarter_steps.view(np.int64) & fraction_mask  # fraction fields of 1, 2^¼, 2^½, 2^¾
    step1, step2, step3 = step_bits[1], step_bits[2], step_bits[3]
    for c in numba.prange(chunks):
        if width > 0:
            lo = (c * rows // chunks) * width
            hi = ((c + 1) * rows // chunks) * width
            segment = width
        else:
            lo = c * n // chunks
            hi = (c + 1) * n // chunks
            segment = max(hi - lo, 1)
        count = 0.0
        equal = 0.0
        rr = 0.0
        tt = 0.0
        ee = 0.0
        re = 0.0
        es = 0.0
        abs_sum = 0.0
        le1 = 0.0
        r1 = 0.0
        r5 = 0.0
        max_abs = 0.0
        max_index = -1
        max_ulp = 0.0
        max_distance = np.int64(0)
        r_nan = 0.0
        r_inf = 0.0
        t_nan = 0.0
        t_inf = 0.0
        start = lo
        while start < hi:
            stop = min(start + segment, hi)
            row = 0.0
            for k in range(start, stop):
                rv = _value(r[k])
                tv = _value(t[k])
                e = tv - rv
                if not math.isfinite(e):
                    if math.isnan(rv):
                        r_nan += 1.0
                    elif math.isinf(rv):
                        r_inf += 1.0
                    if math.isnan(tv):
                        t_nan += 1.0
                    elif math.isinf(tv):
                        t_inf += 1.0
                    continue
                a = abs(e)
                row += e * e
                count += 1.0
                rr += rv * rv
                tt += tv * tv
                re += rv * e
                es += e
                abs_sum += a
                # Counts and maxima without branches: most of these comparisons are unpredictable.
                equal += e == 0.0
                scale = max(abs(rv), floor)
                r1 += a <= 1e-3 * scale
                r5 += a <= 5e-3 * scale
                max_index = (
                    k if a > max_abs else max_index
                )  # the first largest: strictly greater only
                max_abs = max(max_abs, a)
                if light:
                    continue
                if same_dtype:
                    d = (
                        abs(_ordered(np.int64(tbits[k]), top) - _ordered(np.int64(rbits[k]), top))
                        >> shift
                    )
                    max_distance = max(max_distance, d)
                    if d < small:
                        exact_counts[c, d] += 1
                    else:
                        j = 63 - leading_zeros(d)
                        quarter = (
                            np.int64(d >= thresholds[j, 1])
                            + np.int64(d >= thresholds[j, 2])
                            + np.int64(d >= thresholds[j, 3])
                        )
                        hist[c, min(256 + (j - 4) * 4 + quarter, last_bin)] += 1
                    continue
                at = abs(rv) if rv != 0.0 else abs(tv)
                exponent = max(math.frexp(at)[1] - 1, min_exponent) if at != 0.0 else min_exponent
                u = a / math.ldexp(1.0, exponent - mantissa)
                le1 += u <= 1.0
                max_ulp = max(max_ulp, u)
                bits = _bits_of_float64(u / 16.0)
                quarter = (
                    np.int64((bits & fraction_mask) >= step1)
                    + np.int64((bits & fraction_mask) >= step2)
                    + np.int64((bits & fraction_mask) >= step3)
                )
                coarse = min(256 + (((bits >> 52) & 0x7FF) - 1023) * 4 + quarter, last_bin)
                hist[c, np.int64(u * 16.0) if u < 16.0 else coarse] += 1
            ee += row
            if width > 0:
                row_ee[start // width] = row
            start = stop
        out = partial[c]  # in the order of hwdiff.compare.kernel.COLUMNS
        out[0] = count
        out[1] = equal
        out[2] = rr
        out[3] = tt
        out[4] = ee
        out[5] = re
        out[6] = es
        out[7] = abs_sum
        out[8] = le1
        out[9] = r1
        out[10] = r5
        out[11] = max_abs
        out[12] = max(max_ulp, np.float64(max_distance))
        out[13] = r_nan
        out[14] = r_inf
        out[15] = t_nan
        out[16] = t_inf
        out[17] = max_index


@numba.njit(parallel=True, cache=True, nogil=True)
def stats_parts(x, partial):
    """One pass over a 1-D float array: per chunk (``partial`` [chunks, 8]) the count, sum, sum of
    squares, sum of |x|, min and max of the finite values, and the NaN and Inf counts."""
    chunks = partial.shape[0]
    for c in numba.prange(chunks):
        _stats_chunk(x, c, chunks, partial[c])


@numba.njit(cache=True, nogil=True)
def stats_parts_serial(x, partial):
    """:func:`stats_parts` on the calling thread, for one chunk: the same numbers without waking the
    parallel region's threads (a wait per slot that a loaded machine makes milliseconds long)."""
    chunks = partial.shape[0]
    for c in range(chunks):
        _stats_chunk(x, c, chunks, partial[c])


@numba.njit(cache=True, nogil=True, inline="always")
def _stats_chunk(x, c, chunks, out):
    """Chunk ``c`` of ``chunks`` of :func:`stats_parts` into ``out`` [8]."""
    n = x.size
    count = 0.0
    total = 0.0
    squares = 0.0
    absolute = 0.0
    low = np.inf
    high = -np.inf
    nan = 0.0
    inf = 0.0
    for k in range(c * n // chunks, (c + 1) * n // chunks):
        v = _value(x[k])
        if math.isfinite(v):
            count += 1.0
            total += v
            squares += v * v
            absolute += abs(v)
            low = min(low, v)
            high = max(high, v)
        elif math.isnan(v):
            nan += 1.0
        else:
            inf += 1.0
    out[0] = count
    out[1] = total
    out[2] = squares
    out[3] = absolute
    out[4] = low
    out[5] = high
    out[6] = nan
    out[7] = inf


@numba.njit(
    cache=True,
    nogil=True,
    inline="always",
    fastmath={"reassoc", "contract", "arcp"},
    error_model="numpy",
)
def _t_scale_step(x, weights, weighted, weight_sum, n, loc, scale):
    """The M-step shared by :func:`t_em` and :func:`t_em_counts`: (new loc, new scale, converged)."""
    new_loc = weighted / weight_sum
    spread = 0.0
    for i in range(x.size):
        d = x[i] - new_loc
        spread += weights[i] * d * d
    new_scale = math.sqrt(spread / n)
    converged = (
        abs(new_loc - loc) <= 1e-7 * new_scale and abs(new_scale - scale) <= 1e-7 * new_scale
    )
    return new_loc, new_scale, converged


@numba.njit(cache=True, nogil=True, inline="always")
def _t_loglik(n, df, scale, log_terms):
    """Student-t log-likelihood of n values from Σ log1p(z²/df)."""
    return (
        n
        * (
            math.lgamma((df + 1) / 2)
            - math.lgamma(df / 2)
            - 0.5 * math.log(df * math.pi)
            - math.log(scale)
        )
        - (df + 1) / 2 * log_terms
    )


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "arcp"}, error_model="numpy")
def t_em(x, df, loc, scale, iterations):
    """EM for a Student-t's location and scale at fixed ``df`` (:func:`hwdiff.compare.fit._t_em`,
    fused): returns (loc, scale, log-likelihood). Reassociated (vectorized) sums: a fit of a sample,
    not an exact reduction, so only the compiled code's own order has to be fixed."""
    n = x.size
    weights = np.empty(n)
    for _ in range(iterations):
        if not (
            scale > 0.0 and scale < np.inf
        ):  # collapsed (an unbounded likelihood): no fit at this df
            return loc, scale, np.nan
        inverse = 1.0 / scale
        weight_sum = 0.0
        weighted = 0.0
        for i in range(n):
            z = (x[i] - loc) * inverse
            w = (df + 1.0) / (df + z * z)
            weights[i] = w
            weight_sum += w
            weighted += w * x[i]
        new_loc, new_scale, converged = _t_scale_step(
            x, weights, weighted, weight_sum, n, loc, scale
        )
        loc, scale = new_loc, new_scale
        if converged:
            break
    if not (scale > 0.0 and scale < np.inf):
        return loc, scale, np.nan
    log_terms = 0.0
    for i in range(n):
        z = (x[i] - loc) / scale
        log_terms += math.log1p(z * z / df)
    return loc, scale, _t_loglik(n, df, scale, log_terms)


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "arcp"}, error_model="numpy")
def t_em_counts(values, counts, df, loc, scale, iterations):
    """:func:`t_em` on a sample given as its distinct ``values`` and how often each occurs
    (``counts``, float64): the same sums, one term per distinct value instead of per element."""
    n = 0.0
    for i in range(values.size):
        n += counts[i]
    weights = np.empty(values.size)
    for _ in range(iterations):
        if not (
            scale > 0.0 and scale < np.inf
        ):  # collapsed (an unbounded likelihood): no fit at this df
            return loc, scale, np.nan
        inverse = 1.0 / scale
        weight_sum = 0.0
        weighted = 0.0
        for i in range(values.size):
            z = (values[i] - loc) * inverse
            w = counts[i] * (df + 1.0) / (df + z * z)
            weights[i] = w
            weight_sum += w
            weighted += w * values[i]
        new_loc, new_scale, converged = _t_scale_step(
            values, weights, weighted, weight_sum, n, loc, scale
        )
        loc, scale = new_loc, new_scale
        if converged:
            break
    if not (scale > 0.0 and scale < np.inf):
        return loc, scale, np.nan
    log_terms = 0.0
    for i in range(values.size):
        z = (values[i] - loc) / scale
        log_terms += counts[i] * math.log1p(z * z / df)
    return loc, scale, _t_loglik(n, df, scale, log_terms)
