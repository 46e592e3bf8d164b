"""Per-layer conclusions over a diff's compared slots: each slot's rounding budget, the first
difference, the first divergence beyond rounding (by local error where a replay gives it), and
the error's growth with depth."""

from __future__ import annotations

import dataclasses
import logging
import math

from .align import Pair
from .results import (
    FirstDifference,
    FirstDivergence,
    Growth,
    LayerDiff,
)
from .verdict import BUDGET_GAIN, BUDGET_ROUNDINGS, rule_text, with_budget

log = logging.getLogger(__name__)


def with_budgets(layers: tuple[LayerDiff, ...]) -> tuple[LayerDiff, ...]:
    """Give each slot of a different-precision pair its rounding budget: its own roundings plus
    BUDGET_GAIN × the largest error, in roundings, of the module outputs before it (:mod:`.verdict`)."""
    seen = 0.0
    out = []
    for layer in layers:
        if layer.verdict.rule == "budget":
            layer = dataclasses.replace(
                layer, verdict=with_budget(layer.verdict, BUDGET_ROUNDINGS + BUDGET_GAIN * seen)
            )
        out.append(layer)
        if layer.slot == "output" and math.isfinite(layer.verdict.roundings):
            seen = max(seen, layer.verdict.roundings)
    return tuple(out)


def with_local_budgets(layers: tuple[LayerDiff, ...]) -> tuple[LayerDiff, ...]:
    """Give each local error of a different-precision pair the roundings of the ops it contains: a
    replayed module that holds recorded submodules (a decoder layer, an MLP) carries their local errors
    too, so its budget is its own :data:`BUDGET_ROUNDINGS` plus BUDGET_GAIN × the largest local error,
    in roundings, of its submodules (they complete before it in forward order); a leaf keeps its own."""
    inner: dict[
        str, float
    ] = {}  # module name -> the largest local roundings of its submodules so far
    out = []
    for layer in layers:
        local = layer.local
        verdict = local.verdict if local is not None else None
        if layer.slot == "output" and local is not None and verdict is not None:
            if verdict.rule == "budget" and layer.name in inner:
                verdict = with_budget(verdict, BUDGET_ROUNDINGS + BUDGET_GAIN * inner[layer.name])
                layer = dataclasses.replace(
                    layer, local=dataclasses.replace(local, verdict=verdict)
                )
            if math.isfinite(verdict.roundings):
                parts = layer.name.split(".")
                for depth in range(1, len(parts)):
                    parent = ".".join(parts[:depth])
                    inner[parent] = max(inner.get(parent, 0.0), verdict.roundings)
        out.append(layer)
    return tuple(out)


def first_divergence(layers: tuple[LayerDiff, ...]) -> FirstDivergence | None:
    """The first module output beyond rounding. With local errors (a replay) the first whose local
    error is (the origin); otherwise the first whose error is (which may be propagated), attributed
    to its parent when its recorded input already is."""
    outputs = [layer for layer in layers if layer.slot == "output"]
    if not outputs:
        return None
    rule = rule_text(
        outputs[0].ref_dtype, outputs[0].target_dtype, local=any(l.local for l in outputs)
    )
    if any(layer.local is not None and layer.local.verdict is not None for layer in outputs):
        for index, layer in enumerate(outputs):
            local = layer.local
            verdict = local.verdict if local is not None else None
            if (
                local is not None
                and verdict is not None
                and verdict.diverges
                and not _children_differ(layer, outputs[:index])
            ):
                return FirstDivergence(
                    layer.name,
                    layer.call,
                    layer.name,
                    "output",
                    verdict.beyond_ulp_frac,
                    local.local_rel_l2,
                    rule,
                    "local",
                    verdict.describe(),
                )
        return None
    inputs = {(l.name, l.call): l for l in layers if l.slot == "input"}
    for layer in outputs:
        if not layer.diverges:
            continue
        recorded_input = inputs.get((layer.name, layer.call))
        if recorded_input is not None and recorded_input.diverges and "." in layer.name:
            parent = layer.name.rsplit(".", 1)[0]
            return FirstDivergence(
                parent,
                layer.call,
                layer.name,
                "input",
                recorded_input.beyond_rounding_frac,
                recorded_input.metrics.rel_l2,
                rule,
                "total",
                recorded_input.verdict.describe(),
            )
        return FirstDivergence(
            layer.name,
            layer.call,
            layer.name,
            "output",
            layer.beyond_rounding_frac,
            layer.metrics.rel_l2,
            rule,
            "total",
            layer.verdict.describe(),
        )
    return None


def _children_differ(layer: LayerDiff, before: list[LayerDiff]) -> bool:
    """Whether a replayed submodule of ``layer`` (completed before it) has a local error: the
    replay of ``layer`` then carries that error, propagated, and ``layer`` itself is not its origin."""
    prefix = layer.name + "."
    return any(
        other.name.startswith(prefix) and other.local is not None and not other.local.exact
        for other in before
    )


def first_difference(layers: tuple[LayerDiff, ...]) -> FirstDifference | None:
    """The first module output (forward order) that is not bit-identical."""
    for layer in layers:
        if layer.slot == "output" and not layer.exact and layer.metrics.numel:
            return FirstDifference(
                layer.name,
                layer.call,
                layer.metrics.rel_l2,
                layer.metrics.equal_frac,
                layer.metrics.numel,
            )
    return None


def _growth(layers: tuple[LayerDiff, ...], positions: list[Pair]) -> Growth | None:
    if not positions:
        return None
    by_key = {layer.key: layer for layer in layers}
    chosen = [by_key[(p.name, p.call, p.slot)] for p in positions]
    return Growth(tuple(l.name for l in chosen), tuple(l.metrics.rel_l2 for l in chosen))
