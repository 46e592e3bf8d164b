"""Distribution fits of an error sample: Gaussian, Student-t and Laplace by maximum likelihood.

The Student-t fit profiles the likelihood over the degrees of freedom (bounded to [0.5, 1000]) with
location and scale from an EM iteration at each df; it takes 5–15 ms for the default 20,000 values, where
``scipy.stats.t.fit``'s generic optimizer takes seconds. Goodness of fit: the KS statistic and
p-value against each fitted distribution, AIC = 2k − 2 ln L and BIC = k ln n − 2 ln L (k = 2, 3, 2).
Best = lowest AIC.

The relative error e/|r| (|r| floored at rms(r)/1024) is fitted the same way: rounding error, and
AQN's own noise Z⊙x̂, scale with the value, so their absolute errors are a mixture of widths (heavy
tails in any one-width law) while their relative errors are one law. Which describes the error
better is decided on one footing: the relative fit's likelihood is carried over to the absolute
errors (ln L_abs = ln L_rel − Σ ln s, s the floored |r| of each element) and the lower AIC wins.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..common import jit
from .bounded import minimize_bounded

MIN_SAMPLES = 50  # fewer differing elements than this: too few for a meaningful fit
RELATIVE_FLOOR = 1.0 / 1024  # |r| is floored at this fraction of rms(r) in the relative error
_DF_BOUNDS = (0.5, 1000.0)
TIES_FACTOR = (
    4  # the Student-t EM sums per distinct value when there are at most 1/4 as many as values
)


@dataclass(frozen=True)
class Fit:
    """One fitted distribution: its parameters, log-likelihood, AIC and KS test."""

    params: dict[str, float]
    loglik: float
    aic: float
    bic: float
    ks_stat: float
    ks_p: float

    def to_dict(self) -> dict[str, float]:
        return {
            **self.params,
            "loglik": self.loglik,
            "aic": self.aic,
            "bic": self.bic,
            "ks_stat": self.ks_stat,
            "ks_p": self.ks_p,
        }


@dataclass(frozen=True)
class FitResult:
    """Fits of one module's error sample; ``best`` is "none" (with ``reason``) when not fitted."""

    best: str
    n: int
    reason: str = ""
    skew: float = float("nan")
    excess_kurtosis: float = float("nan")
    fits: dict[str, Fit] = field(default_factory=dict)
    relative: "FitResult | None" = None  # the same fits of e/|r| (absolute fits only)
    law: str = ""  # "absolute" or "relative": which describes the error better (absolute fits only)
    not_fitted: dict[str, str] = field(default_factory=dict)  # law -> why it has no fit in ``fits``

    def to_dict(self) -> dict:
        out: dict = {"best": self.best, "n": self.n}
        if self.reason:
            out["reason"] = self.reason
        if self.fits:
            out.update(skew=self.skew, excess_kurtosis=self.excess_kurtosis)
            out.update({name: fit.to_dict() for name, fit in self.fits.items()})
        if self.relative is not None:
            out["relative"] = self.relative.to_dict()
        if self.law:
            out["law"] = self.law
        if self.not_fitted:
            out["not_fitted"] = dict(self.not_fitted)
        return out

    @property
    def summary(self) -> str:
        """The best law and the error it describes: "gaussian (relative)", "laplace (absolute)", "none"."""
        if self.law == "relative" and self.relative is not None:
            return f"{self.relative.best} (relative)"
        return f"{self.best} (absolute)" if self.law else self.best


def fit_both(r: np.ndarray, t: np.ndarray, *, exact: bool = False) -> FitResult:
    """Fits of the absolute error t − r and of the relative error (t − r)/max(|r|, rms(r)/1024) of
    the differing elements, with the law that describes them better (module docstring). The two
    fits run at once on two cores (each is deterministic: the numbers do not depend on it)."""
    errors = t - r
    differing = errors != 0
    pending = None
    if not exact and np.count_nonzero(differing) >= MIN_SAMPLES:
        floor = RELATIVE_FLOOR * float(np.sqrt(np.mean(r * r)))
        scale = np.maximum(np.abs(r[differing]), floor)
        pending = _submit(fit_errors, errors[differing] / scale)
    absolute = fit_errors(errors, exact=exact)
    if not absolute.fits:
        return absolute
    # submitted on the same condition as the absolute fits: not exact, enough differing values
    assert pending is not None
    relative = pending.result()
    if not relative.fits:
        return dataclasses.replace(absolute, relative=relative, law="absolute")
    carried = relative.fits[relative.best].aic + 2.0 * float(np.sum(np.log(scale)))
    law = "relative" if carried < absolute.fits[absolute.best].aic else "absolute"
    return dataclasses.replace(absolute, relative=relative, law=law)


_pool: list = []


def _submit(function: Any, *args: Any) -> Any:
    """``function(*args)`` on a helper thread when the machine has a second core (the Student-t EM
    releases the GIL), else at once; returns something with ``result()``."""
    if (os.cpu_count() or 1) < 2:
        return _Done(function(*args))
    if not _pool:
        _pool.append(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=os.cpu_count(), thread_name_prefix="hwdiff-fit"
            )
        )
    return _pool[0].submit(function, *args)


@dataclass(frozen=True)
class _Done:
    value: Any

    def result(self) -> Any:
        return self.value


def fit_errors(errors: np.ndarray, *, exact: bool = False) -> FitResult:
    """Fit the differing elements' errors (zeros, the bit-identical elements, are left out).

    Not fitted, with the reason: fewer than ``MIN_SAMPLES`` differing values, one value only (a constant
    offset has no spread), or any NaN/Inf (no law has them). The sample is fitted after an exact
    power-of-two rescaling (denormal and near-overflow errors fit like any others) and the parameters and
    likelihood are carried back. A law that cannot be fitted (the Student-t when one value holds nearly
    all the sample, :func:`_student_t`) is left out of ``fits`` and named in ``not_fitted``."""
    if exact:
        return FitResult(best="none", n=0, reason="bit-identical: no error to fit")
    x = np.asarray(errors, dtype=np.float64).ravel()
    nonfinite = int(x.size - np.count_nonzero(np.isfinite(x)))
    if nonfinite:
        return FitResult(
            best="none",
            n=int(x.size),
            reason=f"{nonfinite} of the {x.size} errors are NaN or Inf: no law fitted",
        )
    x = x[x != 0]
    if x.size < MIN_SAMPLES:
        return FitResult(
            best="none", n=int(x.size), reason=f"only {x.size} differing values in the sample"
        )
    if np.ptp(x) == 0:
        return FitResult(
            best="none",
            n=int(x.size),
            reason=f"all {x.size} differing values equal {x[0]:.6g}: a constant offset, no spread to fit",
        )
    unit = math.ldexp(
        1.0, int(np.frexp(np.max(np.abs(x)))[1]) - 1
    )  # a power of two: x / unit is exact, in [-2, 2)
    z = np.sort(x / unit)  # sorted once: the KS statistics and the Laplace median read it
    sample = _Sample(z)
    fits = {"gaussian": _gaussian(sample), "laplace": _laplace(sample)}
    student, why_not = _student_t(sample)
    if student is not None:
        fits["student_t"] = student
    fits = {name: _rescaled(fit, unit, z.size) for name, fit in fits.items()}
    centred = z - z.mean()
    squared = centred * centred
    m2 = float(np.mean(squared))
    skew = float(np.mean(squared * centred) / m2**1.5)
    kurt = float(np.mean(squared * squared) / m2**2 - 3.0)
    best = min(fits, key=lambda name: fits[name].aic)
    return FitResult(
        best=best,
        n=int(x.size),
        skew=skew,
        excess_kurtosis=kurt,
        fits=fits,
        not_fitted={"student_t": why_not} if why_not else {},
    )


_LENGTHS = ("mu", "sigma", "loc", "scale")  # the parameters in the sample's units (df is not)


def _rescaled(fit: Fit, unit: float, n: int) -> Fit:
    """A fit of x / unit carried to x: lengths times ``unit``; the density divides by ``unit`` per value."""
    params = {key: value * unit if key in _LENGTHS else value for key, value in fit.params.items()}
    loglik = fit.loglik - n * math.log(unit)
    k = sum(1 for key in params if key != "df_floor")
    return Fit(
        params=params,
        loglik=loglik,
        aic=2 * k - 2 * loglik,
        bic=k * math.log(n) - 2 * loglik,
        ks_stat=fit.ks_stat,
        ks_p=fit.ks_p,
    )


class _Sample:
    """A sorted sample and its distinct values: the first and last index of each run of ties (error
    samples of low-precision outputs are multiples of an ulp, often a few hundred distinct values)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        starts = np.flatnonzero(np.diff(x)) + 1
        self.first = np.concatenate([[0], starts])
        self.last = np.concatenate([starts - 1, [x.size - 1]])
        self.values = x[self.first]


def _finish(
    sample: _Sample, params: dict[str, float], loglik: float, k: int, cdf: np.ndarray
) -> Fit:
    ks = _ks(sample, cdf)
    return Fit(
        params=params,
        loglik=loglik,
        aic=2 * k - 2 * loglik,
        bic=k * math.log(sample.x.size) - 2 * loglik,
        ks_stat=ks[0],
        ks_p=ks[1],
    )


def _ks(sample: _Sample, cdf: np.ndarray) -> tuple[float, float]:
    """Two-sided KS statistic of the fitted CDF (given at the sample's distinct values) with its
    asymptotic p-value: what ``scipy.stats.kstest(x, cdf, method="asymp")`` computes. Within a run of
    ties D+ = i/n − F peaks at the run's last element and D− = F − (i−1)/n at its first."""
    from scipy import special

    n = sample.x.size
    d_plus = float(np.max((sample.last + 1) / n - cdf))
    d_minus = float(np.max(cdf - sample.first / n))
    statistic = max(d_plus, d_minus)
    return statistic, float(np.clip(special.kolmogorov(statistic * math.sqrt(n)), 0.0, 1.0))


def _gaussian(sample: _Sample) -> Fit:
    from scipy import special

    x = sample.x
    mu, sigma = float(x.mean()), float(x.std())
    loglik = float(
        -0.5 * x.size * math.log(2 * math.pi * sigma * sigma)
        - 0.5 * np.sum(((x - mu) / sigma) ** 2)
    )
    return _finish(
        sample, {"mu": mu, "sigma": sigma}, loglik, 2, special.ndtr((sample.values - mu) / sigma)
    )


def _laplace(sample: _Sample) -> Fit:
    x = sample.x
    loc = float(np.median(x))
    scale = float(np.mean(np.abs(x - loc)))
    loglik = float(-x.size * math.log(2 * scale) - np.sum(np.abs(x - loc)) / scale)
    z = (sample.values - loc) / scale
    cdf = np.where(z > 0, 1.0 - 0.5 * np.exp(-np.abs(z)), 0.5 * np.exp(-np.abs(z)))
    return _finish(sample, {"loc": loc, "scale": scale}, loglik, 2, cdf)


def _student_t(sample: _Sample) -> tuple[Fit | None, str]:
    """Student-t fit, or None and why not. With a share p of the sample on one value the likelihood is
    unbounded for df < p/(1 − p) (put loc on that value and let the scale go to 0: the value gains
    ln(1/scale) per element, the others lose (df + 1) ln(1/scale)), so df is searched above that bound
    (with a 25 % margin, recorded as ``df_floor``); when the bound passes the top of the df range
    (p ≥ 99.9 %) there is no Student-t fit."""
    from scipy import special

    x = sample.x
    counts = (sample.last - sample.first + 1).astype(np.float64)
    share = float(counts.max()) / x.size
    floor = _DF_BOUNDS[0] if share <= 1 / 3 else 1.25 * share / (1.0 - share)
    if floor >= _DF_BOUNDS[1]:
        return None, (
            f"{share:.1%} of the differing values are one value: the Student-t likelihood has no maximum "
            f"for df below {_DF_BOUNDS[1]:g}"
        )
    # A sample with many ties (errors of low-precision outputs are multiples of an ulp) runs the EM on
    # its distinct values with their counts: the same sums, a few hundred terms instead of 20,000.
    tied = (sample.values, counts) if sample.values.size * TIES_FACTOR <= x.size else None
    state = [
        float(np.median(x)),
        1.4826 * float(np.median(np.abs(x - np.median(x)))) or float(x.std()),
    ]

    def negative_loglik(log_df: float) -> float:
        loc, scale, loglik = _t_em(x, math.exp(log_df), state[0], state[1], tied=tied)
        if not math.isfinite(loglik):
            return math.inf
        state[:] = [loc, scale]  # warm start: neighbouring df have nearly the same loc and scale
        return -loglik

    # scipy.optimize.minimize_scalar(method="bounded")'s algorithm, without importing scipy.optimize
    bounds = (math.log(max(floor, _DF_BOUNDS[0])), math.log(_DF_BOUNDS[1]))
    df = math.exp(minimize_bounded(negative_loglik, bounds, xatol=1e-2))
    loc, scale, loglik = _t_em(x, df, state[0], state[1], tied=tied)
    if not (math.isfinite(loglik) and scale > 0):
        return (
            None,
            f"the Student-t EM's scale collapsed at df {df:.3g} ({share:.1%} of the values are one value)",
        )
    params = {"df": df, "loc": loc, "scale": scale}
    if floor > _DF_BOUNDS[0]:
        params["df_floor"] = floor
    return _finish(sample, params, loglik, 3, special.stdtr(df, (sample.values - loc) / scale)), ""


def _t_em(
    x: np.ndarray,
    df: float,
    loc: float,
    scale: float,
    iterations: int = 50,
    *,
    tied: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[float, float, float]:
    """EM for a Student-t's location and scale at fixed ``df``; returns (loc, scale, log-likelihood).
    ``tied``: the sample as (distinct values, counts), summed per distinct value. The compiled kernel
    (:mod:`hwdiff.common.jit`) runs the same iteration when available."""
    compiled = jit.kernels()
    if compiled is not None:
        if tied is not None:
            return compiled.t_em_counts(
                tied[0], tied[1], float(df), float(loc), float(scale), iterations
            )
        return compiled.t_em(x, float(df), float(loc), float(scale), iterations)
    x, counts = tied if tied is not None else (x, np.ones(1))
    size = float(counts.sum()) if tied is not None else x.size
    for _ in range(iterations):
        if not (0.0 < scale < math.inf):  # collapsed (an unbounded likelihood): no fit at this df
            return loc, scale, math.nan
        z2 = ((x - loc) / scale) ** 2
        weights = counts * (df + 1.0) / (df + z2)
        # Plain numpy reductions, not np.dot: BLAS threads would spin on the cores the diff kernel uses.
        new_loc = float((weights * x).sum() / weights.sum())
        new_scale = math.sqrt(float((weights * (x - new_loc) ** 2).sum()) / size)
        converged = (
            abs(new_loc - loc) <= 1e-7 * new_scale and abs(new_scale - scale) <= 1e-7 * new_scale
        )
        loc, scale = new_loc, new_scale
        if converged:
            break
    if not (0.0 < scale < math.inf):
        return loc, scale, math.nan
    z2 = ((x - loc) / scale) ** 2
    loglik = size * (
        math.lgamma((df + 1) / 2)
        - math.lgamma(df / 2)
        - 0.5 * math.log(df * math.pi)
        - math.log(scale)
    ) - (df + 1) / 2 * float(np.sum(counts * np.log1p(z2 / df)))
    return loc, scale, loglik
