"""Typed, frozen results of a diff. Arrays (histograms, samples) live in ``DiffResult.arrays``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from .align import Unmatched
from .correlation import Correlation
from .fit import FitResult
from .metrics import Metrics, UlpStats
from .rl import RLImpact
from .verdict import Verdict, rule_text


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


PROPAGATED_FLOOR = (
    1e-9  # total² − local² below this fraction of total²: the sums' rounding, not inherited error
)


@dataclass(frozen=True)
class LocalDiff:
    """Local vs propagated error of one module output (``--local``: a replay of the reference's
    inputs on the target's device). The local and inherited parts are taken as independent:
    propagated² = total² − local². ``amplification`` = propagated / the error of the module's input
    (how much the module magnifies the error it receives; NaN when the input is exact or unknown).
    ``verdict``: whether the local error alone is beyond rounding (:mod:`.verdict`)."""

    local_rel_l2: float
    total_rel_l2: float
    input_rel_l2: float
    verdict: Verdict | None = None
    exact: bool = False

    @property
    def propagated_rel_l2(self) -> float:
        """sqrt(total² − local²); 0 where the two agree to the rounding of their float64 sums (which
        reduce in different orders): a module whose whole error is local inherits nothing."""
        inherited = self.total_rel_l2**2 - self.local_rel_l2**2
        return math.sqrt(inherited) if inherited > PROPAGATED_FLOOR * self.total_rel_l2**2 else 0.0

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
    verdict: Verdict
    golden: GoldenDiff | None = None
    alias_of: str | None = (
        None  # the same tensor as this slot (numbers shared, listed once in tables)
    )
    local: LocalDiff | None = None
    weight_rms: float | None = (
        None  # RMSNorm outputs: rms of the norm's effective scale (w, or 1 + w) in the reference
    )
    ulp_fine: UlpStats | None = (
        None  # different dtypes: ULP distance in the finer one, from the fit sample
    )

    @property
    def exact(self) -> bool:
        return self.metrics.exact

    @property
    def diverges(self) -> bool:
        """Beyond what the precision of the pair explains (:mod:`.verdict`); may be propagated error."""
        return self.verdict.diverges

    @property
    def beyond_rounding_frac(self) -> float:
        return self.verdict.beyond_ulp_frac

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.name, self.call, self.slot)


@dataclass(frozen=True)
class FirstDivergence:
    """The first module output beyond rounding. ``basis`` "local": its local error (replay) is,
    so it is the origin; "total": its total error is, which may be propagated from
    :attr:`DiffResult.first_difference`."""

    name: str
    call: int
    detected_at: str  # the module output where it was first seen
    origin: str  # "output": the module itself; "input": it arose before it, inside ``name``
    beyond_rounding_frac: float
    rel_l2: float
    rule: str
    basis: str = "total"
    reasons: str = ""

    def __str__(self) -> str:
        where = (
            self.name
            if self.origin == "output"
            else f"{self.name} (seen at the input of {self.detected_at})"
        )
        what = "local error (replay)" if self.basis == "local" else "error"
        return f"{where}: {what} beyond rounding — {self.reasons}; rel L2 {self.rel_l2:.3g}"


@dataclass(frozen=True)
class FirstDifference:
    """The first module output that is not bit-identical, in forward order."""

    name: str
    call: int
    rel_l2: float
    equal_frac: float
    numel: int

    def __str__(self) -> str:
        differing = round((1 - self.equal_frac) * self.numel)
        return f"{self.name}: {differing} of {self.numel} elements differ, rel L2 {self.rel_l2:.3g}"


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
class RoutedToken:
    """One real token whose router chose other experts in the target than in the reference."""

    sequence: int
    position: int
    reference: tuple[int, ...]  # the experts chosen, sorted
    target: tuple[int, ...]


@dataclass(frozen=True)
class RoutingDiff:
    """A router's choices compared token by token over the real tokens (``tokens`` of them)."""

    name: str
    call: int
    tokens: int
    changed: tuple[RoutedToken, ...]

    @property
    def changed_frac(self) -> float:
        return len(self.changed) / self.tokens if self.tokens else 0.0

    def __str__(self) -> str:
        shown = "; ".join(
            f"sequence {t.sequence} token {t.position}: {list(t.reference)} -> {list(t.target)}"
            for t in self.changed[:3]
        )
        return f"{self.name}: {len(self.changed)} of {self.tokens} tokens chose other experts" + (
            f" ({shown}{' …' if len(self.changed) > 3 else ''})" if self.changed else ""
        )


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
    first_difference: FirstDifference | None = None
    arrays: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    local: dict[str, Any] | None = None  # metadata of the replay given as --local
    rl_impact: RLImpact | None = (
        None  # token log-prob mismatch (compare/rl.py); None: see rl_absent
    )
    rl_absent: str = ""  # why there is no RL block (older captures without /logprobs)
    routing: tuple[RoutingDiff, ...] = ()  # MoE routers: tokens that chose other experts
    hwdiff_version: str = (
        __version__  # the hwdiff that made the diff (a loaded file: the one that wrote it)
    )

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
    def divergence_rule(self) -> str | None:
        """The divergence rule applied to this pair, in words (:func:`.verdict.rule_text`); None: nothing compared."""
        if not self.layers:
            return None
        return rule_text(
            self.layers[0].ref_dtype,
            self.layers[0].target_dtype,
            local=any(layer.local is not None for layer in self.layers),
        )

    @property
    def nonfinite(self) -> tuple[LayerDiff, ...]:
        """Module outputs holding NaN or Inf on either side, in forward order (first = where they appear)."""
        return tuple(
            layer for layer in self.outputs if layer.metrics.nan_inf.any and not layer.alias_of
        )
