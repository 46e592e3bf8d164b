"""Numbers as JSON can hold them (standard library only).

JSON has no inf and no nan (``json.dumps`` would write the non-standard ``Infinity`` / ``NaN``), so
the writers of hwdiff's JSON (diff summaries, a sigma file's verify block, robustness cards) pass
floats that may be non-finite through :func:`json_number`, and a reader sees null (in a diff summary,
an exact module's infinite SQNR is null with ``exact: true`` beside it).
"""

from __future__ import annotations

import math


def json_number(value: float | None) -> float | None:
    """``value`` unchanged when finite, None for inf, nan and None (no conversion: an int stays an int)."""
    return None if value is None or not math.isfinite(value) else value
