"""hwdiff.compare.bounded: scipy's bounded Brent minimiser transcribed, so that the Student-t fit's
df search needs no scipy.optimize at start-up — it must return scipy's own minimiser bit for bit."""

import math

import numpy as np
import pytest
from scipy import optimize

from hwdiff.compare.bounded import minimize_bounded

FUNCTIONS = {
    "parabola": (lambda x: (x - 1.3) ** 2, (-4.0, 7.0)),
    "quartic_at_a_bound": (lambda x: (x + 3.0) ** 4, (-2.0, 5.0)),
    "cosine": (lambda x: math.cos(3 * x) + 0.1 * x, (0.0, 6.0)),
    "flat": (lambda x: 1.0, (0.0, 1.0)),
    "abs_kink": (lambda x: abs(x - 0.25), (-1.0, 1.0)),
    # the shape the Student-t fit minimises: a negative log-likelihood over log df
    "t_loglik": (
        lambda x: (
            -(
                1000
                * (
                    math.lgamma((math.exp(x) + 1) / 2)
                    - math.lgamma(math.exp(x) / 2)
                    - 0.5 * math.log(math.exp(x) * math.pi)
                )
                - (math.exp(x) + 1) / 2 * 1000 * math.log1p(2.0 / math.exp(x))
            )
        ),
        (math.log(0.5), math.log(1000.0)),
    ),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("xatol", [1e-2, 1e-5])
def test_same_minimiser_as_scipy_bit_for_bit(name, xatol):
    func, bounds = FUNCTIONS[name]
    visited, expected_visited = [], []
    got = minimize_bounded(lambda x: visited.append(x) or func(x), bounds, xatol=xatol)
    expected = optimize.minimize_scalar(
        lambda x: expected_visited.append(x) or func(x),
        bounds=bounds,
        method="bounded",
        options={"xatol": xatol},
    ).x
    assert got == expected and visited == expected_visited


def test_stops_after_maxiter_as_scipy_does():
    func = lambda x: math.sin(40 * x) + x * x  # noqa: E731
    got = minimize_bounded(func, (-3.0, 3.0), xatol=1e-12, maxiter=7)
    assert (
        got
        == optimize.minimize_scalar(
            func, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-12, "maxiter": 7}
        ).x
    )


@pytest.mark.parametrize("bounds", [(1.0, 0.0), (0.0, np.inf), (np.nan, 1.0)])
def test_bad_bounds_refused(bounds):
    with pytest.raises(ValueError, match="bounds"):
        minimize_bounded(lambda x: x, bounds)
