"""Noise laws for AQN and their evidence in a measurement (numpy only).

Laws (each drawn standardised — mean 0, standard deviation 1 — and multiplied by the schedule's σ,
so σ is the noise's standard deviation whatever the law):
- ``gaussian``: N(0, 1).
- ``student_t``: t(df)·√((df−2)/df); needs df > 2 (the variance of t(df) is df/(df−2), infinite at
  df ≤ 2, where no σ can describe it). Excess kurtosis 6/(df−4) for df > 4, infinite below.
- ``laplace``: Laplace(0, b = 1/√2); excess kurtosis 3.

Correlation along depth (``rho``): the noise of the same norm class (e.g. every
``input_layernorm``) in consecutive decoder layers is drawn as an AR(1) chain per channel,
z_l = ρ·z_{l−1} + √(1−ρ²)·ε_l, so corr(z_l, z_{l+1}) = ρ and corr(z_l, z_{l+k}) = ρ^k; or from a full
layer × layer correlation matrix through its Cholesky factor (eigenvalues clipped to 1e-6 and the
diagonal renormalised when it is not positive definite). Mixing keeps each norm's variance; mixed
non-Gaussian draws keep σ but only approximately the law's shape (a sum of t variables is not t).

Evidence: AQN's noise Z on a norm's weight makes its local error e_tc = Z_c·x̂_tc, so the weight noise
that best explains a measured local error is Z_c = Σ_t e_tc x̂_tc / Σ_t x̂_tc² (least squares per
channel); its distribution and its correlation between layers are what calibrate fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import HwdiffError

LAWS = ("gaussian", "student_t", "laplace")


def _gaussian(rng: np.random.Generator, n: int, df: float | None) -> np.ndarray:
    return rng.standard_normal(n)


def _student_t(rng: np.random.Generator, n: int, df: float | None) -> np.ndarray:
    assert df is not None  # standardized() checked it (check_law)
    return rng.standard_t(df, n) * math.sqrt((df - 2) / df)


def _laplace(rng: np.random.Generator, n: int, df: float | None) -> np.ndarray:
    return rng.laplace(0.0, 1 / math.sqrt(2), n)


DRAW: dict[str, Callable[[np.random.Generator, int, float | None], np.ndarray]] = {
    "gaussian": _gaussian,
    "student_t": _student_t,
    "laplace": _laplace,
}


def check_law(law: str, df: float | None) -> None:
    if law not in DRAW:
        raise HwdiffError(f"unknown noise law {law!r}: expected one of {', '.join(LAWS)}")
    if law == "student_t" and not (df is not None and math.isfinite(df) and df > 2):
        raise HwdiffError(
            f"a student_t law needs df > 2 (its variance df/(df-2) is infinite at df <= 2, so no sigma "
            f"describes it), got df={df}"
        )


def standardized(law: str, df: float | None, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` draws of ``law`` with mean 0 and standard deviation 1 (float64)."""
    check_law(law, df)
    return DRAW[law](rng, n, df)


def mixing_matrix(size: int, rho: float | None = None, matrix: Any = None) -> np.ndarray:
    """Lower-triangular L with L Lᵀ = the correlation along depth (AR(1) with ``rho``, or ``matrix``)."""
    if matrix is not None:
        corr = np.asarray(matrix, dtype=np.float64)
        if corr.shape != (size, size):
            raise HwdiffError(f"correlation matrix of shape {corr.shape} for {size} layers")
        corr = (corr + corr.T) / 2
        values, vectors = np.linalg.eigh(corr)
        if values.min() < 1e-6:  # not positive definite: clip, then back to unit diagonal
            corr = (vectors * np.maximum(values, 1e-6)) @ vectors.T
            scale = np.sqrt(np.diag(corr))
            corr = corr / np.outer(scale, scale)
        return np.linalg.cholesky(corr)
    rho = 0.0 if rho is None else float(rho)
    if not -1 < rho < 1:
        raise HwdiffError(f"correlation rho must be in (-1, 1), got {rho}")
    idx = np.arange(size)
    return np.linalg.cholesky(rho ** np.abs(idx[:, None] - idx[None, :]))


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LawFit:
    """The law that best describes one norm's equivalent weight noise (lowest AIC)."""

    law: str
    df: float | None  # Student-t degrees of freedom when fitted
    scale: float  # the fitted law's scale parameter (Student-t) or std
    n: int  # channels
    why: str


def equivalent_noise(error: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    """Z_c = Σ_t e_tc x̂_tc / Σ_t x̂_tc² for ``error`` and ``x_hat`` of shape [tokens, channels]."""
    e, x = np.asarray(error, np.float64), np.asarray(x_hat, np.float64)
    power = (x * x).sum(axis=0)
    return np.where(power > 0, (e * x).sum(axis=0) / np.where(power > 0, power, 1.0), 0.0)


def fit_law(z: np.ndarray) -> LawFit:
    """Gaussian, Student-t and Laplace fits of ``z`` (hwdiff.compare.fit); best by AIC, in words."""
    from .fit import fit_errors

    result = fit_errors(np.asarray(z, np.float64))
    if result.best == "none":
        return LawFit(
            "gaussian",
            None,
            float(np.std(z)),
            int(z.size),
            f"no fit ({result.reason}): Gaussian assumed",
        )
    aic = {name: fit.aic for name, fit in result.fits.items()}
    ranked = sorted(aic, key=aic.__getitem__)
    best, second = ranked[0], ranked[1]
    t = result.fits["student_t"].params if "student_t" in result.fits else {}
    df = float(t["df"]) if best == "student_t" else None
    if df is not None and df <= 2:  # no σ describes it: the closest law with a variance
        best, df = "laplace", None
    why = (
        f"{best} has the lowest AIC over {z.size} channels (ΔAIC {aic[second] - aic[best]:.1f} to {second}"
        + (f", df {t['df']:.2f}" if best == "student_t" else "")
        + ")"
    )
    return LawFit(
        best, df, float(t["scale"]) if best == "student_t" else float(np.std(z)), int(z.size), why
    )


def pooled_df(samples: list[np.ndarray], scales: list[float]) -> float:
    """Student-t df fitted to the norms' noise pooled after dividing each by its own fitted scale."""
    from .fit import fit_errors

    pooled = np.concatenate([s / scale for s, scale in zip(samples, scales) if scale > 0])
    result = fit_errors(pooled)
    if "student_t" not in result.fits:
        raise HwdiffError(
            f"no Student-t fit of the pooled norm noise: {result.reason or result.not_fitted.get('student_t')}"
        )
    return float(result.fits["student_t"].params["df"])


def depth_correlation(z_by_layer: list[np.ndarray]) -> tuple[float, float]:
    """Mean Pearson correlation of consecutive layers' noise vectors, and its standard error."""
    pairs = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(z_by_layer, z_by_layer[1:])]
    if not pairs:
        return math.nan, math.nan
    n = z_by_layer[0].size
    return float(np.mean(pairs)), 1 / math.sqrt(max(n - 3, 1) * len(pairs))
