"""Property-based tests (hypothesis) of the metrics, the fits and the verdict on degenerate samples:
ties, constants, two values, zeros, NaN/Inf, denormals, empty, huge. Each result is either a number
equal to a numpy reference computed here or a stated "not fitted" reason; nothing raises."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwdiff.common import jit
from hwdiff.compare import fit
from hwdiff.compare.metrics import Accumulator
from hwdiff.compare.verdict import judge

FAST = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SPECIAL = [
    0.0,
    -0.0,
    5e-324,
    -5e-324,
    2.2e-308,
    1e-300,
    1.0,
    -1.0,
    0.0117,
    0.0078,
    1e300,
    -1e300,
    1.7e308,
]


@st.composite
def degenerate(draw, allow_nonfinite=True):
    """A float64 sample of one of the awkward shapes errors take."""
    kind = draw(
        st.sampled_from(
            [
                "ties",
                "constant",
                "two",
                "zeros",
                "denormal",
                "huge",
                "empty",
                "mixed",
                "nonfinite" if allow_nonfinite else "mixed",
                "atom",
            ]
        )
    )
    n = draw(st.integers(0 if kind == "empty" else 1, 600))
    value = draw(st.sampled_from(SPECIAL))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "empty":
        return np.zeros(0)
    if kind == "constant":
        return np.full(n, value)
    if kind == "zeros":
        return np.zeros(n)
    if kind in ("two", "atom"):
        other = draw(st.sampled_from(SPECIAL))
        share = draw(st.floats(0.5, 0.999)) if kind == "atom" else 0.5
        return np.where(rng.random(n) < share, value, other)
    if kind == "ties":
        return rng.integers(-3, 4, n) * (value or 1.0) * 2.0**-8
    if kind == "denormal":
        return rng.integers(-50, 50, n) * 5e-324
    if kind == "huge":
        return rng.standard_normal(n) * 1e307
    if kind == "nonfinite":
        x = rng.standard_normal(n)
        x[rng.integers(0, n, max(1, n // 10))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf])
        )
        return x
    return rng.standard_t(3, n) * draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e30]))


@pytest.fixture(params=["compiled", "numpy"])
def path(request, monkeypatch):
    if request.param == "compiled":
        if not jit.available():
            pytest.skip(f"compiled kernels unavailable: {jit.why_unavailable()}")
        return request.param
    monkeypatch.setattr(jit, "kernels", lambda: None)
    monkeypatch.setattr(jit, "available", lambda: False)
    return request.param


def _check_fit(x):
    result = fit.fit_errors(x)
    nonzero = x[x != 0]
    if result.best == "none":
        assert result.reason and not result.fits
        assert (~np.isfinite(x)).any() or nonzero.size < fit.MIN_SAMPLES or np.ptp(nonzero) == 0
        return result
    assert np.isfinite(x).all() and nonzero.size >= fit.MIN_SAMPLES and np.ptp(nonzero) > 0
    assert result.n == nonzero.size and result.best in result.fits
    gaussian, laplace = result.fits["gaussian"].params, result.fits["laplace"].params
    unit = float(
        np.max(np.abs(nonzero))
    )  # numpy's own std of 1e300-sized values overflows: scale first
    z = nonzero / unit
    grain = (
        1e-12 + 5e-324 / unit
    )  # parameters of denormal samples are themselves on the denormal grid
    assert gaussian["mu"] / unit == pytest.approx(np.mean(z), rel=1e-9, abs=grain)
    assert gaussian["sigma"] / unit == pytest.approx(np.std(z), rel=1e-9, abs=grain)
    assert laplace["loc"] / unit == pytest.approx(np.median(z), rel=1e-12, abs=grain)
    assert laplace["scale"] / unit == pytest.approx(
        np.mean(np.abs(z - np.median(z))), rel=1e-9, abs=grain
    )
    for name, one in result.fits.items():
        assert all(math.isfinite(v) for v in one.params.values()), name
        assert math.isfinite(one.loglik) and math.isfinite(one.aic) and 0 <= one.ks_stat <= 1, name
    if "student_t" not in result.fits:
        assert result.not_fitted["student_t"]
    else:
        assert result.fits["student_t"].params["scale"] > 0
    return result


@FAST
@given(degenerate())
def test_fits_are_numbers_equal_to_numpy_or_a_stated_reason(path, x):
    _check_fit(x)


@FAST
@given(
    st.integers(fit.MIN_SAMPLES, 3000),
    st.floats(0.5, 0.9995),
    st.sampled_from([0.0117, 1e-300, 1e300]),
)
def test_a_sample_mostly_one_value_fits_or_says_why(path, n, share, value):
    """The reported crash: 990 × 0.0117 and 10 × 0.0078 (ZeroDivisionError in the compiled EM)."""
    x = np.r_[np.full(int(n * share), value), np.full(n - int(n * share), value * 2 / 3)]
    _check_fit(x)


def test_the_reported_sample_fits(path):
    x = np.r_[np.full(990, 0.0117), np.full(10, 0.0078)]
    result = _check_fit(x)
    assert result.best != "none"
    t = result.fits["student_t"].params
    assert (
        t["df"] >= t["df_floor"] >= 0.99 / 0.01
    )  # the likelihood is unbounded below df = p / (1 − p)


def _reference_metrics(r, t):
    with np.errstate(invalid="ignore", over="ignore"):
        r64, t64 = r.astype(np.float64), t.astype(np.float64)
        e = t64 - r64
    keep = np.isfinite(e)
    r64, t64, e = r64[keep], t64[keep], e[keep]
    return r64, t64, e


@FAST
@given(degenerate(), st.sampled_from(["same", "offset", "rounded", "flipped"]))
def test_metrics_equal_numpy_references(path, x, how):
    with np.errstate(over="ignore", invalid="ignore"):
        r = x.astype(np.float32)
        t = {
            "same": r,
            "offset": r + np.float32(1e-3),
            "rounded": (r * np.float32(1 + 2**-10)),
            "flipped": -r,
        }[how].astype(np.float32)
    acc = Accumulator("float32", "float32", sample_fraction=1.0, seed=0)
    acc.update(r, t, None)
    m = acc.metrics()
    r64, t64, e = _reference_metrics(r, t)
    assert m.numel == e.size
    assert m.nan_inf.ref_nan == np.isnan(r).sum() and m.nan_inf.target_inf == np.isinf(t).sum()
    if not e.size:
        return
    assert m.equal_frac == pytest.approx(np.mean(e == 0))
    assert m.max_abs == pytest.approx(np.max(np.abs(e)), rel=1e-12)
    assert m.bias == pytest.approx(np.mean(e), rel=1e-9, abs=1e-300)
    rr, ee = float(np.sum(r64 * r64)), float(np.sum(e * e))
    if rr and math.isfinite(rr) and math.isfinite(ee):
        assert m.rel_l2 == pytest.approx(math.sqrt(ee / rr), rel=1e-9)
    elif rr == 0:
        assert m.rel_l2 == (0.0 if ee == 0 else math.inf)
    sr, st_ = acc.sample()
    verdict = judge(m, sr, st_, "float32", "float32")
    assert set(verdict.reasons) <= {"ulp", "budget", "bias", "outlier"}
    assert verdict.diverges == bool(verdict.reasons)
    if how == "same":
        assert m.exact == bool(e.size) and not verdict.diverges


@FAST
@given(degenerate(allow_nonfinite=False))
def test_the_budget_verdict_of_a_rounding_is_within_budget(path, x):
    """fp32 against its own bf16 rounding: exactly one rounding, never a divergence by the budget."""
    from hwdiff.compare.verdict import round_to

    r = np.clip(x, -1e38, 1e38).astype(np.float32)
    t = round_to(r.astype(np.float64), "bfloat16")
    if not np.isfinite(t).all():
        return
    acc = Accumulator("float32", "bfloat16", sample_fraction=1.0, seed=0)
    acc.update(r, t.astype(np.float32), None)
    m = acc.metrics()
    sr, st_ = acc.sample()
    verdict = judge(m, sr, st_, "float32", "bfloat16")
    assert verdict.rule == "budget"
    if math.isfinite(verdict.roundings):
        assert verdict.roundings == pytest.approx(1.0, rel=1e-6) or m.rel_l2 == 0
    assert "budget" not in verdict.reasons
