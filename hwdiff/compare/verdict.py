"""The divergence rule: when is a slot's error more than the precision of the pair explains?

One place for the rule; docs/diff.md ("First divergence") states it in words. Per slot, with e = t − r
and the *coarse* dtype the lower-precision one of the pair:

- **Same precision** (the ulp test): more than :data:`ULP_FRACTION` of the sampled elements lie more
  than one coarse ulp apart, the ulp taken at max(|r|, rms(r)/64) so that values near zero do not
  count as huge ULP distances. One rounding, or the same value rounded the other way after another
  summation order, stays within one ulp.
- **Different precision** (the rounding budget): the finer side rounded to the coarse dtype is what
  the coarse side computes at best; one such rounding has the relative RMS error ε₁, measured on the
  sample by rounding the finer side. The slot's error in units of ε₁ (``roundings`` = rel_l2 / ε₁)
  may reach :data:`BUDGET_ROUNDINGS` (a module rounds its inputs, weights and output: a few
  roundings of its own) plus :data:`BUDGET_GAIN` × the largest error, in roundings, of any module
  output before it in forward order (the rounding error it inherits, grown by at most that gain).
  Local errors from a replay inherit nothing: their budget is :data:`BUDGET_ROUNDINGS`.
- **Either**: a systematic bias counts even under one ulp — the mean error (over all n elements), or
  the mean error away from zero (e·sign(r), which truncation makes negative; over the n elements of
  the fit sample), has a z-score z = mean / (std / √n) above :data:`BIAS_Z` *and* is at least
  :data:`BIAS_EFFECT` × rms(e):
  errors of neighbouring elements are correlated, so a z-test alone over-states significance, and
  round-to-nearest errors have a mean far below a quarter of their rms.
- **Either**: an outlier — max |e| above :data:`OUTLIER_K` × rms(e), at an element whose error is
  also more than :data:`OUTLIER_ULPS` coarse ulps of max(|r|, rms(r)/64) (a lone rounding flip in an
  otherwise identical tensor has a huge max/rms too, but only an ulp or two) — is flagged with its
  position and counts as a divergence.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .metrics import Metrics, lower_precision, ulp_at, unit_roundoff

ULP_FRACTION = 0.01
BIAS_Z = 5.0
BIAS_EFFECT = 0.25
OUTLIER_K = 50.0
OUTLIER_ULPS = 16.0
BUDGET_ROUNDINGS = 4.0
BUDGET_GAIN = 2.0


@dataclass(frozen=True)
class Outlier:
    """The largest error of a slot: ``position`` in the stored tensor ([batch, token, channel…]),
    the error, both values there and ``ratio`` = |error| / rms(e)."""

    position: tuple[int, ...]
    error: float
    reference: float
    target: float
    ratio: float

    def __str__(self) -> str:
        return f"outlier {self.ratio:.0f}× the error rms at {list(self.position)} (t − r = {self.error:.3g})"


@dataclass(frozen=True)
class Verdict:
    """Why a slot's error (or its local error) is beyond rounding; no ``reasons``: within rounding.

    ``rule``: "ulp" (same precision) or "budget" (different precision); ``beyond_ulp_frac``: sampled
    elements more than one coarse ulp apart (the finer side first rounded to the coarse dtype);
    ``rounding_rel``: ε₁, the relative RMS error of one rounding to the coarse dtype at these values;
    ``roundings`` = rel_l2 / ε₁; ``budget``: the roundings allowed (budget rule only); ``bias_z`` and
    ``bias_effect`` (|mean| / rms(e)) of the stronger of the two bias tests, ``bias_outward`` the
    sample's mean e·sign(r); ``outlier`` when flagged."""

    rule: str
    coarse_dtype: str
    beyond_ulp_frac: float
    rounding_rel: float
    roundings: float
    budget: float | None
    bias_z: float
    bias_effect: float
    bias_outward: float
    outlier: Outlier | None
    reasons: tuple[str, ...]

    @property
    def diverges(self) -> bool:
        return bool(self.reasons)

    def describe(self) -> str:
        """The reasons in words ('' when within rounding)."""
        words = {
            "ulp": f"{self.beyond_ulp_frac:.1%} of elements beyond one {self.coarse_dtype} ulp",
            "budget": f"{self.roundings:.1f} {self.coarse_dtype} roundings of error, above its budget of "
            f"{self.budget if self.budget is not None else math.nan:.1f}",
            "bias": f"a systematic bias of {self.bias_effect:.2f}× the error rms (z = {self.bias_z:.0f})",
            "outlier": str(self.outlier),
        }
        return "; ".join(words[reason] for reason in self.reasons)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to nearest (even) in ``dtype``, as float64."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return rounded.astype(np.uint32).view(np.float32).astype(np.float64)
    if dtype == "float32":
        return x.astype(np.float32).astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def judge(
    metrics: Metrics,
    r: np.ndarray,
    t: np.ndarray,
    ref_dtype: str,
    target_dtype: str,
    budget: float | None = BUDGET_ROUNDINGS,
) -> Verdict:
    """The verdict of one slot from its metrics and its sampled (r, t) pairs (float64).
    ``budget``: roundings allowed under the budget rule (different precision only)."""
    coarse = lower_precision(ref_dtype, target_dtype)
    same = unit_roundoff(ref_dtype) == unit_roundoff(target_dtype)
    scale = np.maximum(np.abs(r), metrics.ref_rms / 64.0)
    if same:
        beyond = float(np.mean(np.abs(t - r) > ulp_at(scale, coarse))) if r.size else 0.0
        rounding = _model_rounding(r, coarse, metrics.ref_rms)
    else:
        finer = r if unit_roundoff(ref_dtype) < unit_roundoff(target_dtype) else t
        beyond = (
            float(
                np.mean(np.abs(round_to(t, coarse) - round_to(r, coarse)) > ulp_at(scale, coarse))
            )
            if r.size
            else 0.0
        )
        norm_r = float(np.linalg.norm(r))
        rounding = (
            float(np.linalg.norm(round_to(finer, coarse) - finer)) / norm_r if norm_r else math.nan
        )
        if (
            not rounding
        ):  # the finer side's sampled values are all representable in the coarse dtype
            rounding = _model_rounding(r, coarse, metrics.ref_rms)
    roundings = (
        metrics.rel_l2 / rounding if rounding and math.isfinite(metrics.rel_l2) else math.nan
    )
    outward = (t - r) * np.sign(r)
    z, effect = _bias(metrics, outward)
    verdict = Verdict(
        rule="ulp" if same else "budget",
        coarse_dtype=coarse,
        beyond_ulp_frac=beyond,
        rounding_rel=rounding,
        roundings=roundings,
        budget=None if same else budget,
        bias_z=z,
        bias_effect=effect,
        bias_outward=float(outward.mean()) if outward.size else 0.0,
        outlier=_outlier(metrics, coarse),
        reasons=(),
    )
    return _with_reasons(verdict)


def with_budget(verdict: Verdict, budget: float) -> Verdict:
    """The same verdict under another rounding budget (budget rule only)."""
    if verdict.rule != "budget":
        return verdict
    return _with_reasons(dataclasses.replace(verdict, budget=budget))


def _with_reasons(verdict: Verdict) -> Verdict:
    reasons = []
    if verdict.rule == "ulp" and verdict.beyond_ulp_frac > ULP_FRACTION:
        reasons.append("ulp")
    if verdict.rule == "budget":
        # the budget rule carries its budget (verdict() and with_budget() set it)
        assert verdict.budget is not None
        if verdict.roundings > verdict.budget:
            reasons.append("budget")
    if abs(verdict.bias_z) > BIAS_Z and verdict.bias_effect >= BIAS_EFFECT:
        reasons.append("bias")
    if verdict.outlier is not None:
        reasons.append("outlier")
    return dataclasses.replace(verdict, reasons=tuple(reasons))


def _model_rounding(r: np.ndarray, dtype: str, ref_rms: float) -> float:
    """Relative RMS error of one rounding to ``dtype`` at the values r: uniform over ±ulp/2, so
    rms = ulp/√12 element-wise."""
    if not r.size or not ref_rms:
        return math.nan
    ulp = ulp_at(r, dtype)
    return float(np.sqrt(np.mean(ulp * ulp) / 12.0)) / ref_rms


def _bias(metrics: Metrics, outward: np.ndarray) -> tuple[float, float]:
    """(z, |mean| / rms(e)) of the stronger of mean e (all elements) and mean e·sign(r) (the sample)."""
    tests = [(metrics.bias, metrics.rmse, metrics.numel)]
    if outward.size:
        tests.append(
            (float(outward.mean()), float(np.sqrt(np.mean(outward * outward))), outward.size)
        )
    best = (0.0, 0.0)
    for mean, rms, n in tests:
        if not n or not rms:
            continue
        spread = math.sqrt(max(rms * rms - mean * mean, 0.0))
        z = math.copysign(math.inf, mean) if not spread else mean / (spread / math.sqrt(n))
        effect = abs(mean) / rms
        if effect > best[1]:
            best = (z, effect)
    return best


def _outlier(metrics: Metrics, coarse: str) -> Outlier | None:
    if metrics.max_at is None or not metrics.rmse:
        return None
    ratio = metrics.max_abs / metrics.rmse
    scale = max(abs(metrics.max_ref), metrics.ref_rms / 64.0)
    if ratio <= OUTLIER_K or metrics.max_abs <= OUTLIER_ULPS * float(
        ulp_at(np.array(scale), coarse)
    ):
        return None
    return Outlier(
        position=metrics.max_at,
        error=metrics.max_target - metrics.max_ref,
        reference=metrics.max_ref,
        target=metrics.max_target,
        ratio=ratio,
    )


def rule_text(ref_dtype: str, target_dtype: str, local: bool) -> str:
    """The rule applied to this pair, in words (for the summary and the report)."""
    coarse = lower_precision(ref_dtype, target_dtype)
    if unit_roundoff(ref_dtype) == unit_roundoff(target_dtype):
        core = (
            f"same precision ({coarse}): a slot is beyond rounding when more than {ULP_FRACTION:.0%} of its "
            f"sampled elements differ by more than one ulp, the ulp taken at max(|r|, rms(r)/64)"
        )
    else:
        core = (
            f"different precision ({ref_dtype} vs {target_dtype}): a slot is beyond rounding when its relative "
            f"error exceeds {BUDGET_ROUNDINGS:g} roundings to {coarse} (ε₁ measured by rounding the finer side) "
            f"plus {BUDGET_GAIN:g}× the largest error, in roundings, of the module outputs before it"
        )
    extra = (
        f"; either way a bias of at least {BIAS_EFFECT:g}× the error rms with |z| > {BIAS_Z:g}, or an "
        f"outlier above {OUTLIER_K:g}× the error rms and {OUTLIER_ULPS:g} ulps, counts"
    )
    origin = (
        "With a replay (--local) the first divergence is the first module whose local error is beyond "
        "rounding (local errors have a budget of their own roundings only); a module whose replayed "
        "submodules already differ locally is not named for their propagated error."
        if local
        else "Without a replay the first module beyond rounding may carry error propagated from the first "
        "non-identical module, which is named beside it."
    )
    return f"{core}{extra}. {origin}"
