"""Typed, frozen results of a diff. Arrays (histograms, samples) live in ``DiffResult.arrays``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .align import Unmatched
from .correlation import Correlation
from .fit import FitResult
from .metrics import Metrics
from .rl import RLImpact

DIVERGENCE_THRESHOLD = 0.01
DIVERGENCE_RULE = (
    "a slot diverges when more than 1% of its (sampled) elements differ by more than one ulp of the "
    "lower-precision dtype of the pair, the ulp taken at max(|r|, rms(r)/64); one rounding, or the same "
    "value rounded the other way after another summation order, stays within one ulp. The first divergence "
    "is the earliest diverging module output in forward (completion) order; when that module's recorded "
    "input already diverges, the divergence arose before it, inside its parent module")


@dataclass(frozen=True)
class GoldenDiff:
    """Each side's relative L2 error against the golden capture."""

    reference_rel_l2: float
    target_rel_l2: float

    @property
    def ratio(self) -> float:
        """target error / reference error: > 1 means the target is further from the golden."""
        if self.reference_rel_l2 == 0:
            return 1.0 if self.target_rel_l2 == 0 else math.inf
        return self.target_rel_l2 / self.reference_rel_l2


@dataclass(frozen=True)
class LocalDiff:
    """Local vs propagated error of one module output (``--local``: a replay of the reference's
    inputs on the target's device). The local and inherited parts are taken as independent:
    propagated² = total² − local². ``amplification`` = propagated / the error of the module's input
    (how much the module magnifies the error it receives; NaN when the input is exact or unknown)."""

    local_rel_l2: float
    total_rel_l2: float
    input_rel_l2: float

    @property
    def propagated_rel_l2(self) -> float:
        return math.sqrt(max(self.total_rel_l2 ** 2 - self.local_rel_l2 ** 2, 0.0))

    @property
    def amplification(self) -> float:
        if not self.input_rel_l2 or math.isnan(self.input_rel_l2):
            return math.nan
        return self.propagated_rel_l2 / self.input_rel_l2


@dataclass(frozen=True)
class LayerDiff:
    """One compared slot: module ``name``, ``call`` and ``slot``, with its metrics and fits."""

    name: str
    call: int
    slot: str
    kind: str
    shape: tuple[int, ...]
    ref_dtype: str
    target_dtype: str
    metrics: Metrics
    fit: FitResult
    beyond_rounding_frac: float
    golden: GoldenDiff | None = None
    alias_of: str | None = None  # the same tensor as this slot (numbers shared, listed once in tables)
    local: LocalDiff | None = None
    weight_rms: float | None = None  # RMSNorm outputs: rms of the norm's weight in the reference

    @property
    def exact(self) -> bool:
        return self.metrics.exact

    @property
    def diverges(self) -> bool:
        return self.beyond_rounding_frac > DIVERGENCE_THRESHOLD

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.name, self.call, self.slot)


@dataclass(frozen=True)
class FirstDivergence:
    name: str
    call: int
    detected_at: str  # the module output where it was first seen
    origin: str  # "output": the module itself; "input": it arose before it, inside ``name``
    beyond_rounding_frac: float
    rel_l2: float
    rule: str = DIVERGENCE_RULE

    def __str__(self) -> str:
        where = self.name if self.origin == "output" else f"{self.name} (seen at the input of {self.detected_at})"
        return f"{where}: {self.beyond_rounding_frac:.1%} of elements beyond one ulp, rel L2 {self.rel_l2:.3g}"


@dataclass(frozen=True)
class Growth:
    """Relative L2 error of the residual stream with depth."""

    names: tuple[str, ...]
    rel_l2: tuple[float, ...]

    @property
    def factor_per_layer(self) -> float:
        """Geometric mean growth of the error from one decoder layer to the next."""
        values = [v for v in self.rel_l2 if v > 0]
        if len(values) < 2:
            return math.nan
        return (values[-1] / values[0]) ** (1.0 / (len(values) - 1))


@dataclass(frozen=True)
class DiffResult:
    reference: dict[str, Any]
    target: dict[str, Any]
    golden: dict[str, Any] | None
    layers: tuple[LayerDiff, ...]
    unmatched: tuple[Unmatched, ...]
    correlation: Correlation | None
    growth: Growth | None
    first_divergence: FirstDivergence | None
    arrays: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    local: dict[str, Any] | None = None  # metadata of the replay given as --local
    rl_impact: RLImpact | None = None  # token log-prob mismatch (compare/rl.py); None: see rl_absent
    rl_absent: str = ""  # why there is no RL block (older captures without /logprobs)

    def layer(self, name: str, call: int = 0, slot: str = "output") -> LayerDiff:
        for layer in self.layers:
            if layer.key == (name, call, slot):
                return layer
        raise KeyError(f"no compared slot {name}/{call}/{slot}")

    @property
    def outputs(self) -> tuple[LayerDiff, ...]:
        return tuple(layer for layer in self.layers if layer.slot == "output")

    def worst(self, n: int | None = None) -> list[LayerDiff]:
        """Module outputs, largest relative L2 error first."""
        ranked = sorted(self.outputs, key=lambda layer: -layer.metrics.rel_l2)
        return ranked[:n] if n else ranked

    @property
    def exact(self) -> bool:
        return all(layer.exact for layer in self.layers)

    @property
    def nonfinite(self) -> tuple[LayerDiff, ...]:
        """Module outputs holding NaN or Inf on either side, in forward order (first = where they appear)."""
        return tuple(layer for layer in self.outputs if layer.metrics.nan_inf.any and not layer.alias_of)
