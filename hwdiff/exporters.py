"""Sigma exports for the tools that run AQN: a registry (name → writer) that also feeds the CLI.

verl (the fork ``zhshgmail/verl``, branch ``feature/npu-aqn-test``, read from its source):
- ``trainer.noise_injection`` {enabled, sigma_start, sigma_end, num_stages, target_modules,
  exclude_patterns, layer_types, epoch_aware, layer_sigma_config}; patterns match as substrings of
  module names; ``target_modules: []`` selects its automatic mode (dense: every RMSNorm), ``null``
  crashes its rollout (``list(None)``).
- ``layer_sigma_config`` scales the global σ by one multiplier per decoder-layer index; names
  without an index (the final norm) take ``default_multiplier``; σ = 0 skips a norm.
- Its trainer copies enabled / sigma / stages / target_modules / exclude_patterns / layer_types /
  epoch_aware into the rollout config but never ``layer_sigma_config``: without the patch in
  ``integrations/verl/`` the per-layer multipliers never reach the rollout.
QeRL (NVlabs/QeRL): one global schedule, applied only when the model name contains ``nvfp4`` and
only to the vLLM rollout model.
"""
from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import structure
from .calibration import Calibration, LayerSigma
from .errors import HwdiffError
from .sigmafile import write_yaml

log = logging.getLogger(__name__)
FINAL = structure.FINAL_NORM
FORK_DROPS_LAYER_SIGMA = (
    "the verl fork as published never copies layer_sigma_config into the rollout config: without "
    "integrations/verl/layer-sigma-config.patch every targeted norm gets the global sigma")
QERL_NVFP4_ONLY = ("QeRL injects noise only when the model name contains 'nvfp4', and only into the vLLM rollout "
                   "model: for a bf16 model this export has no effect there")


@dataclass(frozen=True)
class VerlPlan:
    """How a calibration maps onto the fork's knobs, and what the mapping loses."""

    exclude_patterns: tuple[str, ...]
    layer_multipliers: dict[str, float]
    default_multiplier: float
    classes: tuple[str, ...]  # norm classes that keep noise
    lost: tuple[str, ...]  # what cannot be expressed


def norm_class(layer: LayerSigma) -> str:
    return structure.norm_class(layer.name)


def verl_plan(calibration: Calibration) -> VerlPlan:
    """Classes whose σ is all zero → ``exclude_patterns``; one multiplier per layer for the rest
    (exact when one class of per-layer norms remains; their root mean square otherwise, which keeps a
    layer's injected noise power, and a line in ``lost``)."""
    by_class: dict[str, list[LayerSigma]] = defaultdict(list)
    for layer in calibration.layers:
        by_class[norm_class(layer)].append(layer)
    zero = [c for c, layers in by_class.items() if all(l.sigma_end == 0 for l in layers)]
    # a skipped norm is excluded by its full name, which matches only itself
    excluded = [_pattern(c, by_class[c]) for c in zero] + list(calibration.skipped)
    kept = [c for c in by_class if c not in zero and c != FINAL]
    per_layer: dict[int, list[float]] = defaultdict(list)
    for c in kept:
        for layer in by_class[c]:
            per_layer[layer.layer_index].append(layer.multiplier)
    multipliers = {str(i): math.sqrt(sum(m * m for m in ms) / len(ms)) for i, ms in sorted(per_layer.items())}
    lost = []
    if len(kept) > 1:
        spread = max(_spread(ms) for ms in per_layer.values())
        lost.append(f"{' and '.join(kept)} share one multiplier per layer in verl: each layer gets the root mean "
                    f"square of its norms' multipliers (per-norm values differ up to {spread:.2g}x within a layer)")
    final = by_class.get(FINAL, [])
    default = final[0].multiplier if final and FINAL not in zero else 1.0
    return VerlPlan(tuple(dict.fromkeys(excluded)), multipliers, default, tuple(kept + ([FINAL] if final and FINAL not in zero else [])),
                    tuple(lost))


def _pattern(cls: str, layers: list[LayerSigma]) -> str:
    return layers[0].name if cls == FINAL else cls


def _spread(values: list[float]) -> float:
    positive = [v for v in values if v > 0]
    return max(positive) / min(positive) if len(positive) > 1 else 1.0


def verl_block(calibration: Calibration) -> dict[str, Any]:
    plan = verl_plan(calibration)
    s = calibration.schedule
    return {"trainer": {"noise_injection": {
        "enabled": True, "sigma_start": s.sigma_start, "sigma_end": s.sigma_end, "num_stages": s.num_stages,
        "target_modules": [], "exclude_patterns": list(plan.exclude_patterns), "layer_types": ["rmsnorm"],
        "epoch_aware": False, "layer_sigma_config": {
            "enabled": True, "default_multiplier": plan.default_multiplier,
            "layer_multipliers": plan.layer_multipliers}}}}


def hydra_overrides(calibration: Calibration) -> list[str]:
    """The verl block as Hydra ``++`` overrides for a verl command line."""
    block = verl_block(calibration)["trainer"]["noise_injection"]
    prefix = "++trainer.noise_injection"
    multipliers = ", ".join(f"{k}: {v:.6g}" for k, v in block["layer_sigma_config"]["layer_multipliers"].items())
    excluded = ", ".join(f'"{p}"' for p in block["exclude_patterns"])
    return [f"{prefix}.enabled=True", f"{prefix}.sigma_start={block['sigma_start']:.6g}",
            f"{prefix}.sigma_end={block['sigma_end']:.6g}", f"{prefix}.num_stages={block['num_stages']}",
            f"'{prefix}.target_modules=[]'", f"'{prefix}.layer_types=[\"rmsnorm\"]'",
            f"'{prefix}.exclude_patterns=[{excluded}]'", f"{prefix}.layer_sigma_config.enabled=True",
            f"{prefix}.layer_sigma_config.default_multiplier={block['layer_sigma_config']['default_multiplier']:.6g}",
            f"'{prefix}.layer_sigma_config.layer_multipliers={{{multipliers}}}'"]


def law_lost(calibration: Calibration) -> str | None:
    """What a Gaussian, independent export drops of the calibrated laws and correlation, or None."""
    other = sorted({f"{l.law}" + (f"(df {l.df:.2f})" if l.df else "") for l in calibration.layers
                    if l.sigma_end > 0 and l.law != "gaussian"})
    parts = ([f"the measured law is {', '.join(other)} for some norms"] if other else []) + (
        [f"consecutive layers' noise correlates at rho {calibration.rho:g}"] if calibration.rho else [])
    if not parts:
        return None
    return ("; ".join(parts) + ": this format draws independent Gaussian noise — the Gaussian sigma (the same standard "
            "deviation) is kept, the tails and the correlation are lost (hwdiff's injector and apply_schedule keep them)")


def _write_verl(calibration: Calibration, path: Path) -> Path:
    plan = verl_plan(calibration)
    if law_lost(calibration):
        log.warning("verl export: %s", law_lost(calibration))
    for line in plan.lost:
        log.warning("verl export: %s", line)
    if plan.exclude_patterns:
        log.info("verl export: no noise for %s (exclude_patterns)", ", ".join(plan.exclude_patterns))
    log.warning("verl export: %s", FORK_DROPS_LAYER_SIGMA)
    return write_yaml(path, verl_block(calibration))


def _write_qerl(calibration: Calibration, path: Path) -> Path:
    multipliers = [l.multiplier for l in calibration.layers]
    log.warning("QeRL export: one global schedule; the per-norm values (multipliers %.3g … %.3g) are lost",
                min(multipliers), max(multipliers))
    log.warning("QeRL export: %s", QERL_NVFP4_ONLY)
    if law_lost(calibration):
        log.warning("QeRL export: %s", law_lost(calibration))
    s = calibration.schedule
    return write_yaml(path, {"sigma_start": s.sigma_start, "sigma_end": s.sigma_end, "num_stages": s.num_stages})


EXPORTERS: dict[str, Callable[[Calibration, Path], Path]] = {"verl": _write_verl, "qerl": _write_qerl}


def export(calibration: Calibration, target: str, path: str | os.PathLike) -> Path:
    """Write ``calibration`` in the format ``target`` (a key of :data:`EXPORTERS`) to ``path``."""
    if target not in EXPORTERS:
        raise HwdiffError(f"unknown export format {target!r}: expected one of {', '.join(EXPORTERS)}")
    return EXPORTERS[target](calibration, Path(path))
