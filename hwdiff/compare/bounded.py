"""Bounded scalar minimisation without importing ``scipy.optimize`` (≈0.3 s of a fresh process's start).

:func:`minimize_bounded` is the algorithm of ``scipy.optimize.minimize_scalar(method="bounded")``
(Brent's method: golden-section steps and parabolic interpolation, after Forsythe, Malcolm and
Moler), transcribed from SciPy 1.17's ``_minimize_scalar_bounded`` (BSD-3-Clause, Copyright (c) the
SciPy Developers) operation for operation, so that it visits the same points and returns the same
minimiser bit for bit (the tests compare the two).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def minimize_bounded(
    func: Callable[[float], float],
    bounds: tuple[float, float],
    xatol: float = 1e-5,
    maxiter: int = 500,
) -> float:
    """The ``x`` in ``bounds`` (finite, low ≤ high) that minimises ``func`` to within ``xatol``
    (absolute), after at most ``maxiter`` evaluations: ``minimize_scalar(func, bounds=bounds,
    method="bounded", options={"xatol": xatol, "maxiter": maxiter}).x``."""
    a, b = bounds
    if not (np.isfinite(a) and np.isfinite(b)) or a > b:
        raise ValueError(f"bounds must be finite with low <= high, got {bounds}")
    sqrt_eps = np.sqrt(2.2e-16)
    golden_mean = 0.5 * (3.0 - np.sqrt(5.0))
    fulc = a + golden_mean * (b - a)
    nfc, xf = fulc, fulc
    rat = e = 0.0
    fx = func(xf)
    num = 1
    ffulc = fnfc = fx
    xm = 0.5 * (a + b)
    tol1 = sqrt_eps * np.abs(xf) + xatol / 3.0
    tol2 = 2.0 * tol1
    while np.abs(xf - xm) > (tol2 - 0.5 * (b - a)):
        golden = 1
        if np.abs(e) > tol1:  # try a parabolic step
            golden = 0
            r = (xf - nfc) * (fx - ffulc)
            q = (xf - fulc) * (fx - fnfc)
            p = (xf - fulc) * q - (xf - nfc) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                p = -p
            q = np.abs(q)
            r = e
            e = rat
            if (np.abs(p) < np.abs(0.5 * q * r)) and (p > q * (a - xf)) and (p < q * (b - xf)):
                rat = (p + 0.0) / q
                x = xf + rat
                if ((x - a) < tol2) or ((b - x) < tol2):
                    rat = tol1 * (np.sign(xm - xf) + ((xm - xf) == 0))
            else:
                golden = 1
        if golden:
            e = a - xf if xf >= xm else b - xf
            rat = golden_mean * e
        x = xf + (np.sign(rat) + (rat == 0)) * np.maximum(np.abs(rat), tol1)
        fu = func(x)
        num += 1
        if fu <= fx:
            if x >= xf:
                a = xf
            else:
                b = xf
            fulc, ffulc = nfc, fnfc
            nfc, fnfc = xf, fx
            xf, fx = x, fu
        else:
            if x < xf:
                a = x
            else:
                b = x
            if (fu <= fnfc) or (nfc == xf):
                fulc, ffulc = nfc, fnfc
                nfc, fnfc = x, fu
            elif (fu <= ffulc) or (fulc == xf) or (fulc == nfc):
                fulc, ffulc = x, fu
        xm = 0.5 * (a + b)
        tol1 = sqrt_eps * np.abs(xf) + xatol / 3.0
        tol2 = 2.0 * tol1
        if num >= maxiter:
            break
    return xf
