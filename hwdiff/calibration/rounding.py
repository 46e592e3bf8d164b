"""What a σ does to weights stored in a low-precision dtype (numpy only).

The injector adds z ~ N(0, σ²) to a float32 copy of a stored weight w and casts once: the stored
value changes unless w + z stays inside w's round-to-nearest interval [(w⁻ + w)/2, (w + w⁺)/2]
(w⁻, w⁺ the neighbouring values of the dtype). The expected fraction of changed elements is
therefore exact without drawing: 1 − mean(Φ(up/σ) − Φ(−down/σ)).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import HwdiffError

CHANGED_WARNING = 0.5  # below this fraction of changed elements the noise is mostly rounded away


def neighbours(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(next value below, next value above) of each ``values`` element (representable in ``dtype``)."""
    w = np.asarray(values, dtype=np.float32)
    if dtype in ("float32", "float64"):
        if dtype == "float64":
            w = w.astype(np.float64)
        return np.nextafter(w, -np.inf), np.nextafter(w, np.inf)
    if dtype == "float16":
        h = w.astype(np.float16)
        return (
            np.nextafter(h, np.float16(-np.inf)).astype(np.float32),
            np.nextafter(h, np.float16(np.inf)).astype(np.float32),
        )
    if dtype == "bfloat16":
        return _bf16_step(w, -1), _bf16_step(w, +1)
    raise HwdiffError(
        f"no rounding model for dtype {dtype!r} (expected float32, float16, bfloat16 or float64)"
    )


def _bf16_step(w: np.ndarray, direction: int) -> np.ndarray:
    """The adjacent bfloat16 value towards ±inf: bfloat16 is the top 16 bits of a float32."""
    bits = (w.astype(np.float32).view(np.uint32) >> 16).astype(np.int64)
    negative = (bits & 0x8000) != 0
    magnitude = bits & 0x7FFF
    # moving towards +inf grows positive magnitudes and shrinks negative ones (and vice versa)
    step = np.where(negative, -direction, direction)
    new_mag = magnitude + step
    crossing = new_mag < 0  # ±0 stepping through zero: the smallest subnormal of the other sign
    new_bits = np.where(crossing, (~bits & 0x8000) | 1, (bits & 0x8000) | new_mag)
    return (new_bits.astype(np.uint32) << 16).view(np.float32)


def changed_fraction(weights: np.ndarray, sigma: float, dtype: str) -> float:
    """Expected fraction of ``weights`` (stored in ``dtype``) whose stored value changes when
    N(0, σ²) noise is added in float32 and the sum cast back once to ``dtype``."""
    if sigma <= 0:
        return 0.0
    w = np.asarray(weights, dtype=np.float64).ravel()
    below, above = (np.asarray(x, dtype=np.float64) for x in neighbours(w, dtype))
    up, down = (above - w) / 2, (w - below) / 2
    erf = np.vectorize(math.erf, otypes=[np.float64])
    stay = 0.5 * (erf(up / (sigma * math.sqrt(2))) + erf(down / (sigma * math.sqrt(2))))
    return float(1.0 - stay.mean())
