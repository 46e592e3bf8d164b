"""``hwdiff.diff``: compare captures layer by layer: alignment, streamed metrics, fits, correlation, first divergence."""

from .core import DiffOptions, diff
from .results import DiffResult, FirstDivergence, GoldenDiff, Growth, LayerDiff

__all__ = [
    "diff",
    "DiffOptions",
    "DiffResult",
    "LayerDiff",
    "GoldenDiff",
    "FirstDivergence",
    "Growth",
]
