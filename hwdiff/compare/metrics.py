"""Streaming error metrics of one slot pair, accumulated in float64 over blocks in one pass.

Definitions (e = t − r, over real tokens; elements that are NaN/Inf on either side are counted in
``nan_inf`` and left out of everything else):

- ``equal_frac``: fraction with t == r (value equality: +0 == −0).
- ``rel_l2`` = ‖e‖/‖r‖; ``sqnr_db`` = 10·log10(‖r‖²/‖e‖²); ``cosine`` = r·t/(‖r‖‖t‖) and
  ``one_minus_cos`` from the Lagrange identity (‖r‖²‖e‖² − (r·e)²)/(‖r‖‖t‖(‖r‖‖t‖ + r·t)), which
  keeps its precision when the cosine rounds to 1; ``rmse``, ``max_abs``, ``mean_abs`` = mean |e|,
  ``bias`` = mean e, ``err_std`` = std e; ``max_at`` = position of the first element with the
  largest |e| in the stored tensor, with ``max_ref`` / ``max_target`` its values.
- ``thousandth_frac`` / ``five_thousandth_frac``: fraction with |e| / max(|r|, floor) ≤ 1e-3 / 5e-3,
  floor = :data:`SMALL_VALUE` of the lower-precision dtype (msprobe's ratios, never a division by an
  exact zero).
- ULP distance in the coarser dtype of the pair: when both sides have the same dtype, the exact
  count of representable values between t and r; otherwise |e| / ulp_coarse(r), the ulp taken at t
  where r is exactly 0 (the spacing at 0 is the format's smallest). p50 / p99 come from a
  histogram with bins of 1/16 ulp below 16 ulp and quarter octaves above (so p99 = 35 reads 32);
  ``max`` and ``le1_frac`` are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..common import jit
from ..store.format import decoded
from . import kernel

MANTISSA_BITS = {"bfloat16": 7, "float16": 10, "float32": 23, "float64": 52}
MIN_EXPONENT = {"bfloat16": -126, "float16": -14, "float32": -126, "float64": -1022}
SMALL_VALUE = {"bfloat16": 1e-3, "float16": 1e-3, "float32": 1e-6, "float64": 1e-9}
_FINE, _OCTAVES, _PER_OCTAVE = (
    16,
    40,
    4,
)  # ULP histogram: 1/16 bins up to 16, quarter octaves up to 2^44
ULP_BINS = _FINE * 16 + _OCTAVES * _PER_OCTAVE + 1
QUARTER_STEPS = 2.0 ** (np.arange(_PER_OCTAVE) / _PER_OCTAVE)  # 1, 2^¼, 2^½, 2^¾


def unit_roundoff(dtype: str) -> float:
    """u = 2^-p for a dtype with p significand bits (bf16: 2^-8)."""
    return 2.0 ** -(MANTISSA_BITS.get(dtype, 52) + 1)


def lower_precision(a: str, b: str) -> str:
    """The dtype with the larger unit roundoff."""
    return a if unit_roundoff(a) >= unit_roundoff(b) else b


def ulp_at(x: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of ``dtype``'s representable values at |x| (float64)."""
    _, exponent = np.frexp(np.abs(x))
    lowest = MIN_EXPONENT.get(dtype, -1022)
    exponent = np.where(x == 0, lowest, np.maximum(exponent - 1, lowest))  # frexp(0) has exponent 0
    return np.ldexp(1.0, exponent - MANTISSA_BITS.get(dtype, 52))


def ulp_edges() -> np.ndarray:
    """Lower edges of the ULP histogram bins (the last bin is open above)."""
    fine = np.arange(_FINE * 16) / 16.0
    k = np.arange(_OCTAVES * _PER_OCTAVE + 1)
    coarse = np.ldexp(
        _FINE * QUARTER_STEPS[k % _PER_OCTAVE], k // _PER_OCTAVE
    )  # exactly 16·2^j·2^(q/4)
    return np.concatenate([fine, coarse])


_COARSE_EDGES = ulp_edges()[_FINE * 16 :]


def _ulp_bins(u: np.ndarray) -> np.ndarray:
    """Histogram bin of each ULP distance: exact comparisons with :func:`ulp_edges`, as the kernel does."""
    index = (np.minimum(u, float(_FINE)) * 16).astype(np.int64)
    big = u >= _FINE
    if big.any():
        index[big] = _FINE * 16 + np.searchsorted(_COARSE_EDGES, u[big], side="right") - 1
    return index


_SMALL_BINS = _ulp_bins(
    np.arange(16384, dtype=np.float64)
)  # the bin of each small integer ULP distance
# [62, 4]: ⌈2^j·2^(q/4)⌉, so that for an integer distance d, d ≥ 2^j·2^(q/4) ⇔ d ≥ entry (the kernel's bins)
_DISTANCE_THRESHOLDS = np.ceil(np.ldexp(QUARTER_STEPS[None, :], np.arange(62)[:, None])).astype(
    np.int64
)


def _ordered(bits: np.ndarray, top: int) -> np.ndarray:
    """Sign-magnitude float bits → integers in value order (+0 and −0 both map to 0)."""
    return np.where(bits < 0, -(bits & top), bits)


def ulp_distance(
    r: np.ndarray, t: np.ndarray, r_dtype: str, t_dtype: str, in_dtype: str | None = None
) -> np.ndarray:
    """ULP distance in the coarser of the two dtypes, or in ``in_dtype`` (see module docstring);
    float64, one per element."""
    unit = in_dtype or lower_precision(r_dtype, t_dtype)
    if r_dtype == t_dtype == unit and r_dtype in ("bfloat16", "float32", "float16"):
        storage, view, top = (
            (np.float16, np.int16, 0x7FFF)
            if r_dtype == "float16"
            else (np.float32, np.int32, 0x7FFFFFFF)
        )
        a, b = (_ordered(x.astype(storage, copy=False).view(view), top) for x in (r, t))
        distance = np.abs(np.subtract(b, a, dtype=np.int64))
        return (distance >> 16 if r_dtype == "bfloat16" else distance).astype(np.float64)
    t64 = t.astype(np.float64)
    with np.errstate(
        over="ignore"
    ):  # |e| over a float64 subnormal spacing can exceed the range: inf
        return np.abs(t64 - r) / ulp_at(np.where(r == 0, t64, r), unit)


@dataclass(frozen=True)
class UlpStats:
    p50: float
    p99: float
    max: float
    le1_frac: float


@dataclass(frozen=True)
class NonFinite:
    ref_nan: int
    ref_inf: int
    target_nan: int
    target_inf: int

    @property
    def any(self) -> bool:
        return bool(self.ref_nan or self.ref_inf or self.target_nan or self.target_inf)


@dataclass(frozen=True)
class Metrics:
    """The magnitude and exactness metrics of one slot pair (definitions: module docstring)."""

    numel: int
    equal_frac: float
    rel_l2: float
    sqnr_db: float
    cosine: float
    one_minus_cos: float
    rmse: float
    max_abs: float
    mean_abs: float
    bias: float
    err_std: float
    max_at: tuple[int, ...] | None
    max_ref: float
    max_target: float
    ulp: UlpStats
    thousandth_frac: float
    five_thousandth_frac: float
    nan_inf: NonFinite
    ref_rms: float

    @property
    def exact(self) -> bool:
        return self.numel > 0 and self.equal_frac == 1.0


class Accumulator:
    """Float64 running sums for :class:`Metrics`, plus a seeded sample of (r, t) pairs and the
    error norm of every real token (``light``: the sums and the sample only, no ULP histogram nor
    token norms, for golden and local comparisons). ``fused``: the compiled one-pass kernel
    (:mod:`.kernel`; default: when available) or the numpy path."""

    def __init__(
        self,
        ref_dtype: str,
        target_dtype: str,
        *,
        sample_fraction: float,
        seed: int,
        light: bool = False,
        fused: bool | None = None,
    ) -> None:
        self.ref_dtype, self.target_dtype, self.light = ref_dtype, target_dtype, light
        self.ulp_dtype = lower_precision(ref_dtype, target_dtype)
        self.fused = jit.available() if fused is None else fused
        self.floor = SMALL_VALUE.get(lower_precision(ref_dtype, target_dtype), 1e-9)
        self.sample_fraction = sample_fraction
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.sums = dict.fromkeys(kernel.SUMS, 0.0)
        self.max_abs = 0.0
        self.max_at: tuple[int, ...] | None = None
        self.max_values = (math.nan, math.nan)
        self.max_ulp = 0.0
        self.nonfinite = np.zeros(4, dtype=np.int64)
        self.hist = np.zeros(ULP_BINS, dtype=np.int64)
        self.samples: list[tuple[np.ndarray, np.ndarray]] = []
        self.token_norms: list[np.ndarray] = []

    def update(
        self, r: np.ndarray, t: np.ndarray, mask: np.ndarray | None, origin: tuple[int, ...] = ()
    ) -> None:
        """Add one block; ``mask`` [rows, tokens] selects real tokens when the block has that axis;
        ``origin``: the block's first index in the stored tensor (for the position of the max error)."""
        locate = _Locator(r.shape, mask, origin)
        if mask is not None:  # → [real tokens, ...]
            trailing = r.shape[mask.ndim :]
            if mask.all():
                r, t = r.reshape(-1, *trailing), t.reshape(-1, *trailing)
            else:
                r, t = r[mask], t[mask]
            if not r.shape[0]:
                return  # a block of padding only
        if not r.size:
            return
        before = self.max_abs
        if self.fused:
            index = self._update_fused(r, t, tokens=mask is not None)
        else:
            index = self._update_numpy(decoded(r), decoded(t), tokens=mask is not None)
        if (
            self.max_abs > before and index >= 0
        ):  # the first largest |e| stays where it was first seen
            self.max_at = locate(index)
            self.max_values = (
                float(decoded(r.reshape(-1)[index : index + 1])[0]),
                float(decoded(t.reshape(-1)[index : index + 1])[0]),
            )

    def _update_fused(self, r: np.ndarray, t: np.ndarray, *, tokens: bool) -> int:
        """Reduce one block with the kernel; returns the flat index of its first largest |e| (-1: none)."""
        width = int(np.prod(r.shape[1:], dtype=np.int64)) if tokens and not self.light else 0
        block = kernel.reduce_block(
            r,
            t,
            ref_dtype=self.ref_dtype,
            target_dtype=self.target_dtype,
            floor=self.floor,
            light=self.light,
            width=width,
            mantissa=MANTISSA_BITS.get(self.ulp_dtype, 52),
            min_exponent=MIN_EXPONENT.get(self.ulp_dtype, -1022),
            quarter_steps=QUARTER_STEPS,
            thresholds=_DISTANCE_THRESHOLDS,
            small_bins=_SMALL_BINS,
            bins=ULP_BINS,
        )
        for key, value in block.sums.items():
            self.sums[key] += value
        self.max_abs = max(self.max_abs, block.max_abs)
        self.max_ulp = max(self.max_ulp, block.max_ulp)
        self.nonfinite += block.nonfinite
        self.hist += block.hist
        if width:
            self.token_norms.append(np.sqrt(block.token_squares))
        if self.sample_fraction > 0:
            r, t = r.ravel(), t.ravel()
            if block.nonfinite.any():
                r, t = decoded(r), decoded(t)
                with np.errstate(invalid="ignore"):  # inf − inf: left out, as counted
                    keep = np.isfinite(t.astype(np.float64) - r.astype(np.float64))
                r, t = r[keep], t[keep]
            self._add_sample(r, t)
        return block.max_index if block.max_abs > 0 else -1

    def _update_numpy(self, r: np.ndarray, t: np.ndarray, *, tokens: bool) -> int:
        """The reference implementation: numpy passes over float64 copies (see :mod:`.kernel`)."""
        r64, t64 = r.astype(np.float64), t.astype(np.float64)
        with np.errstate(invalid="ignore"):  # inf − inf: left out, as counted
            e = t64 - r64
        flat: np.ndarray = e.reshape(e.shape[0], -1) if e.ndim > 1 else e.reshape(-1, 1)
        squares = np.einsum("ij,ij->i", flat, flat)  # per-token ‖e‖², finite iff every e is
        finite = None
        if not np.isfinite(squares).all():
            finite = np.isfinite(e)
            self._count_nonfinite(r64, t64)
            e = np.where(finite, e, 0.0)
            flat = e.reshape(flat.shape)
            squares = np.einsum("ij,ij->i", flat, flat)
        if tokens and not self.light:
            self.token_norms.append(np.sqrt(squares))
        r64, t64, e, rk, tk = (x.ravel() for x in (r64, t64, e, r, t))
        index = (
            int(np.argmax(np.abs(e))) if e.size else -1
        )  # non-finite errors are 0 here, as the kernel skips them
        if finite is not None:
            keep = finite.ravel()
            r64, t64, e, rk, tk = (x[keep] for x in (r64, t64, e, rk, tk))
        self._add_sums(r64, t64, e, float(squares.sum()) if finite is None else float(np.dot(e, e)))
        if not self.light:
            self._add_ulp(rk, tk)
        if self.sample_fraction > 0:
            self._add_sample(r64, t64)
        return index if self.max_abs > 0 else -1

    def _count_nonfinite(self, r: np.ndarray, t: np.ndarray) -> None:
        self.nonfinite += [
            np.count_nonzero(np.isnan(r)),
            np.count_nonzero(np.isinf(r)),
            np.count_nonzero(np.isnan(t)),
            np.count_nonzero(np.isinf(t)),
        ]

    def _add_sums(self, r: np.ndarray, t: np.ndarray, e: np.ndarray, ee: float) -> None:
        s = self.sums
        abs_e = np.abs(e)
        s["n"] += e.size
        s["equal"] += np.count_nonzero(e == 0)
        s["rr"] += float(np.dot(r, r))
        s["tt"] += float(np.dot(t, t))
        s["ee"] += ee
        s["re"] += float(np.dot(r, e))
        s["e"] += float(e.sum())
        s["abs_e"] += float(abs_e.sum())
        scale = np.abs(r)
        np.maximum(scale, self.floor, out=scale)
        s["r1"] += np.count_nonzero(abs_e <= 1e-3 * scale)
        s["r5"] += np.count_nonzero(abs_e <= 5e-3 * scale)
        if e.size:
            self.max_abs = max(self.max_abs, float(abs_e.max()))

    def _add_ulp(self, r: np.ndarray, t: np.ndarray) -> None:
        if not r.size:
            return
        u = ulp_distance(r, t, self.ref_dtype, self.target_dtype, self.ulp_dtype)
        self.sums["le1"] += np.count_nonzero(u <= 1)
        self.max_ulp = max(self.max_ulp, float(u.max()))
        self.hist += np.bincount(_ulp_bins(u), minlength=ULP_BINS)

    def _add_sample(self, r: np.ndarray, t: np.ndarray) -> None:
        if self.sample_fraction < 1 and r.size:  # a binomial count of distinct elements: no repeats
            count = int(self.rng.binomial(r.size, self.sample_fraction))
            index = np.sort(self.rng.choice(r.size, size=count, replace=False))
            r, t = r[index], t[index]
        if r.size:
            self.samples.append((decoded(r).astype(np.float64), decoded(t).astype(np.float64)))

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """The sampled (r, t) pairs, in float64."""
        if not self.samples:
            return np.zeros(0), np.zeros(0)
        return np.concatenate([a for a, _ in self.samples]), np.concatenate(
            [b for _, b in self.samples]
        )

    def metrics(self) -> Metrics:
        s = self.sums
        n = max(s["n"], 1.0)
        rr, tt, ee, re_ = s["rr"], s["tt"], s["ee"], s["re"]
        norm_rt = math.sqrt(rr * tt)
        cosine = (rr + re_) / norm_rt if norm_rt else (1.0 if ee == 0 else 0.0)
        # 1 − cos = (1 − cos²)/(1 + cos) without cancellation; 1 + cos = 0 (t = −c·r) has no such form
        opposite = norm_rt * (norm_rt + rr + re_)
        one_minus = (
            max(rr * ee - re_ * re_, 0.0) / opposite if norm_rt and opposite > 0 else 1.0 - cosine
        )
        bias = s["e"] / n
        return Metrics(
            numel=int(s["n"]),
            equal_frac=float(s["equal"]) / n,
            rel_l2=math.sqrt(ee / rr) if rr else (0.0 if ee == 0 else math.inf),
            sqnr_db=10 * math.log10(rr / ee) if ee and rr else (math.inf if ee == 0 else -math.inf),
            cosine=cosine,
            one_minus_cos=one_minus if ee else 0.0,
            rmse=math.sqrt(ee / n),
            max_abs=self.max_abs,
            mean_abs=s["abs_e"] / n,
            bias=bias,
            err_std=math.sqrt(max(ee / n - bias * bias, 0.0)),
            max_at=self.max_at,
            max_ref=self.max_values[0],
            max_target=self.max_values[1],
            ulp=self._ulp_stats(),
            thousandth_frac=float(s["r1"]) / n,
            five_thousandth_frac=float(s["r5"]) / n,
            nan_inf=NonFinite(*map(int, self.nonfinite)),
            ref_rms=math.sqrt(rr / n),
        )

    def _ulp_stats(self) -> UlpStats:
        total = int(self.hist.sum())
        if not total:
            return UlpStats(0.0, 0.0, 0.0, 1.0)
        edges = ulp_edges()
        cumulative = np.cumsum(self.hist)
        p50 = float(edges[np.searchsorted(cumulative, 0.5 * total)])
        p99 = float(edges[np.searchsorted(cumulative, 0.99 * total)])
        return UlpStats(
            p50=p50,
            p99=min(p99, self.max_ulp),
            max=self.max_ulp,
            le1_frac=float(self.sums["le1"]) / total,
        )


class _Locator:
    """Maps a flat index of a block as reduced (real tokens only, flattened) back to the index of
    the element in the stored tensor."""

    def __init__(
        self, shape: tuple[int, ...], mask: np.ndarray | None, origin: tuple[int, ...]
    ) -> None:
        self.shape, self.mask = shape, mask
        self.origin = tuple(origin) + (0,) * (len(shape) - len(origin))

    def __call__(self, flat: int) -> tuple[int, ...]:
        if self.mask is None:
            local = np.unravel_index(flat, self.shape)
        else:
            trailing = self.shape[self.mask.ndim :]
            width = int(np.prod(trailing, dtype=np.int64))
            row = (
                np.argwhere(self.mask)[flat // width]
                if not self.mask.all()
                else np.unravel_index(flat // width, self.mask.shape)
            )
            local = (*row, *np.unravel_index(flat % width, trailing))
        return tuple(int(o) + int(i) for o, i in zip(self.origin, local))
