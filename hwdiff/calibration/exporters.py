"""Sigma exports for the tools that run AQN: a registry (name → writer) that also feeds the CLI.

An export carries everything its consumer needs to give every norm the σ of sigma.yaml at every
stage, or it is refused with the reason; each is checked against the calibrated model's norm list
(the consumer's own selection rule run on those names) before anything is written.

verl (the fork ``zhshgmail/verl``, branch ``feature/npu-aqn-test``, read from its source at cfb21db5):
- ``trainer.noise_injection`` {enabled, sigma_start, sigma_end, num_stages, target_modules,
  exclude_patterns, layer_types, epoch_aware, layer_sigma_config}; patterns match as substrings of
  module names; an empty ``target_modules`` / ``exclude_patterns`` selects its automatic mode (MoE:
  ``post_attention_layernorm`` only), so hwdiff writes full names in both, never an empty list.
- Its schedule is exponential with exponent j/(K−2) only (``get_sigma_schedule``).
- Without ``integrations/verl/aqn-delivery.patch`` the trainer never copies ``layer_sigma_config``
  into the rollout (every targeted norm gets the global σ), sizes the schedule from epochs ignoring
  ``trainer.total_training_steps``, noises validation rollouts, and runs step s with step s−1's σ.
  With it, ``layer_sigma_config.norm_multipliers`` ([[full name, multiplier], …], a list so that a
  Hydra override replaces it whole) gives each norm its own multiplier; unlisted norms get none.
QeRL (NVlabs/QeRL at e8c6e79): see :data:`QERL_AS_PUBLISHED`; ``integrations/qerl/aqn-delivery.patch``
makes it select norms by class name and read per-norm multipliers from the export.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import HwdiffError
from .sigmafile import write_yaml
from .types import Calibration

log = logging.getLogger(__name__)
VERL_NEEDS_PATCH = (
    "the verl fork as published (cfb21db5) never copies layer_sigma_config into the rollout, sizes the schedule from "
    "epochs (ignoring trainer.total_training_steps), noises validation rollouts and runs step s at step s-1's sigma: "
    "apply integrations/verl/aqn-delivery.patch and run integrations/verl/check.py"
)
QERL_AS_PUBLISHED = (
    "QeRL as published (e8c6e79) injects only when the model name contains 'nvfp4', selects norms with isinstance "
    "against transformers' Qwen2RMSNorm/LlamaRMSNorm while injecting into the vLLM rollout model (whose norms are "
    "vLLM's RMSNorm: nothing is injected there), would give every matched norm the same global sigma (per-norm "
    "values and zeros ignored), and restarts its step counter every epoch: apply integrations/qerl/aqn-delivery.patch "
    "(norms by class name, per-norm multipliers from this file, a global step) and run integrations/qerl/check.py"
)
# a pattern no module name contains: an empty exclude list would switch the fork to its MoE automatic mode
NOTHING_EXCLUDED = "<hwdiff: no norm excluded>"
RELATIVE = 1e-9  # per-norm schedule vs multiplier x global schedule: float rounding only


@dataclass(frozen=True)
class ConsumerSchedule:
    """The exponential schedule (exponent j/(K−2)) a consumer runs, equal to the calibrated one."""

    sigma_start: float
    sigma_end: float
    num_stages: int
    note: str  # how the calibrated kind maps onto it ("" when it is the same)


@dataclass(frozen=True)
class NormPlan:
    """Which norms get noise, with which multiplier of the consumer's global schedule."""

    schedule: ConsumerSchedule
    multipliers: dict[str, float]  # noisy norm (full name) → multiplier, in the calibration's order
    silent: tuple[str, ...]  # norms that get no noise (σ = 0 or skipped), full names


def consumer_schedule(calibration: Calibration, consumer: str) -> ConsumerSchedule:
    """``calibration``'s schedule as the exponential one QeRL and the verl fork run, or a refusal.

    ``qerl-code`` maps as is; ``qerl-paper`` (exponent j/(K−1)) is the same curve ending at
    σ_start·(σ_end/σ_start)^((K−2)/(K−1)); ``constant`` is σ_start = σ_end; ``linear`` has no
    exponential equivalent and is refused."""
    s = calibration.schedule
    k = s.num_stages
    if s.kind == "qerl-code":
        return ConsumerSchedule(s.sigma_start, s.sigma_end, k, "")
    if s.kind == "qerl-paper":
        end = s.sigma_start * (s.sigma_end / s.sigma_start) ** ((k - 2) / (k - 1))
        return ConsumerSchedule(
            s.sigma_start,
            end,
            k,
            f"qerl-paper written as the code's curve ending at {end:.6g} "
            f"(the paper's last value; sigma_end {s.sigma_end:.6g} is never reached)",
        )
    if s.kind == "constant":
        if s.sigma_end <= 0:
            raise HwdiffError(
                f"{consumer} export refused: a constant schedule at sigma 0 injects nothing"
            )
        return ConsumerSchedule(
            s.sigma_end, s.sigma_end, k, "constant written as sigma_start = sigma_end"
        )
    raise HwdiffError(
        f"{consumer} export refused: {consumer} runs only the exponential schedule "
        f"sigma_start*(sigma_end/sigma_start)^(j/(K-2)); a {s.kind} schedule cannot be expressed there "
        f"(calibrate with --schedule qerl-code, qerl-paper or constant, or inject with "
        f"hwdiff.aqn.apply_schedule)"
    )


def norm_plan(calibration: Calibration, consumer: str) -> NormPlan:
    """Each noisy norm's multiplier of the consumer's schedule, checked stage by stage against the
    norm's own schedule in ``calibration`` (refused when a norm's curve is not a multiple of it)."""
    schedule = consumer_schedule(calibration, consumer)
    consumer_values = _exponential(schedule)
    multipliers, silent = {}, list(calibration.skipped)
    for layer in calibration.layers:
        own = calibration.schedule_for(layer.name)
        if own is None:
            silent.append(layer.name)
            continue
        multiplier = own.values[-1] / consumer_values[-1]
        for stage, (want, base) in enumerate(zip(own.values, consumer_values), start=1):
            if abs(multiplier * base - want) > RELATIVE * want:
                raise HwdiffError(
                    f"{consumer} export refused: {layer.name}'s sigma at stage {stage} ({want:.6g}) is not "
                    f"{multiplier:.6g} x the global schedule ({base:.6g}): {consumer} scales one global "
                    f"curve per norm"
                )
        multipliers[layer.name] = multiplier
    if not multipliers:
        raise HwdiffError(f"{consumer} export refused: no norm has sigma > 0 in this calibration")
    return NormPlan(schedule, multipliers, tuple(dict.fromkeys(silent)))


def _exponential(s: ConsumerSchedule) -> list[float]:
    """The consumers' own formula (the verl fork's get_sigma_schedule, QeRL's grpo_trainer)."""
    k = s.num_stages
    return [s.sigma_start * (s.sigma_end / s.sigma_start) ** (j / (k - 2)) for j in range(k - 1)]


def verl_selection(
    names: Iterable[str], target_modules: list[str], exclude_patterns: list[str]
) -> set[str]:
    """The norms of ``names`` the fork's ``_should_target_module`` selects (substring rule, non-empty lists)."""
    return {
        n
        for n in names
        if any(p in n for p in target_modules) and not any(p in n for p in exclude_patterns)
    }


def verl_block(calibration: Calibration) -> dict[str, Any]:
    """The ``trainer.noise_injection`` block; refused (HwdiffError) when the fork cannot carry it."""
    plan = norm_plan(calibration, "verl")
    targets = list(plan.multipliers)
    excluded = list(plan.silent) or [NOTHING_EXCLUDED]
    names = list(plan.multipliers) + list(plan.silent)
    selected = verl_selection(names, targets, excluded)
    if selected != set(plan.multipliers):
        wrong = sorted(selected ^ set(plan.multipliers))
        raise HwdiffError(
            f"verl export refused: the fork's substring patterns cannot single out the noisy norms of "
            f"this model ({len(wrong)} norm(s) wrongly selected or dropped, first {wrong[0]})"
        )
    s = plan.schedule
    return {
        "trainer": {
            "noise_injection": {
                "enabled": True,
                "sigma_start": s.sigma_start,
                "sigma_end": s.sigma_end,
                "num_stages": s.num_stages,
                "epoch_aware": False,
                "target_modules": targets,
                "exclude_patterns": excluded,
                "layer_types": ["rmsnorm"],
                "layer_sigma_config": {
                    "enabled": True,
                    "default_multiplier": 0.0,
                    "layer_multipliers": {},
                    "norm_multipliers": [[name, m] for name, m in plan.multipliers.items()],
                    "zone_schedule": {"enabled": False},
                },
            }
        }
    }


def hydra_overrides(calibration: Calibration) -> list[str]:
    """The verl block as Hydra ``++`` overrides for a verl command line (full float precision;
    ``epoch_aware`` and ``zone_schedule`` pinned off; lists, which Hydra replaces whole, for
    everything per norm)."""
    block = verl_block(calibration)["trainer"]["noise_injection"]
    prefix = "++trainer.noise_injection"
    layer = block["layer_sigma_config"]
    pairs = ", ".join(f'["{n}", {m!r}]' for n, m in layer["norm_multipliers"])
    return [
        f"{prefix}.enabled=True",
        f"{prefix}.sigma_start={block['sigma_start']!r}",
        f"{prefix}.sigma_end={block['sigma_end']!r}",
        f"{prefix}.num_stages={block['num_stages']}",
        f"{prefix}.epoch_aware=False",
        f"'{prefix}.target_modules=[{_quoted(block['target_modules'])}]'",
        f"'{prefix}.exclude_patterns=[{_quoted(block['exclude_patterns'])}]'",
        f"'{prefix}.layer_types=[\"rmsnorm\"]'",
        f"{prefix}.layer_sigma_config.enabled=True",
        f"{prefix}.layer_sigma_config.default_multiplier=0.0",
        f"'{prefix}.layer_sigma_config.norm_multipliers=[{pairs}]'",
        f"{prefix}.layer_sigma_config.zone_schedule.enabled=False",
    ]


def _quoted(items: list[str]) -> str:
    return ", ".join(f'"{item}"' for item in items)


def qerl_block(calibration: Calibration) -> dict[str, Any]:
    """QeRL's three schedule arguments and, for the patched QeRL, one multiplier per norm (a norm
    absent from ``norm_multipliers`` gets no noise there)."""
    plan = norm_plan(calibration, "QeRL")
    s = plan.schedule
    return {
        "sigma_start": s.sigma_start,
        "sigma_end": s.sigma_end,
        "num_stages": s.num_stages,
        "norm_multipliers": dict(plan.multipliers),
    }


def law_lost(calibration: Calibration) -> str | None:
    """What a Gaussian, independent export drops of the calibrated laws and correlation, or None."""
    other = sorted(
        {
            f"{l.law}" + (f"(df {l.df:.2f})" if l.df else "")
            for l in calibration.layers
            if l.sigma_end > 0 and l.law != "gaussian"
        }
    )
    parts = ([f"the measured law is {', '.join(other)} for some norms"] if other else []) + (
        [f"consecutive layers' noise correlates at rho {calibration.rho:g}"]
        if calibration.rho
        else []
    )
    if not parts:
        return None
    return (
        "; ".join(parts)
        + ": this format draws independent Gaussian noise — the Gaussian sigma (the same standard "
        "deviation) is kept, the tails and the correlation are lost (hwdiff's injector and apply_schedule keep them)"
    )


def _warn_common(calibration: Calibration, consumer: str) -> None:
    note = consumer_schedule(calibration, consumer).note
    if note:
        log.info("%s export: %s", consumer, note)
    if law_lost(calibration):
        log.warning("%s export: %s", consumer, law_lost(calibration))


def _write_verl(calibration: Calibration, path: Path) -> Path:
    block = verl_block(calibration)
    _warn_common(calibration, "verl")
    log.warning("verl export: %s", VERL_NEEDS_PATCH)
    return write_yaml(path, block)


def _write_qerl(calibration: Calibration, path: Path) -> Path:
    block = qerl_block(calibration)
    _warn_common(calibration, "QeRL")
    log.warning("QeRL export: %s", QERL_AS_PUBLISHED)
    return write_yaml(path, block)


EXPORTERS: dict[str, Callable[[Calibration, Path], Path]] = {
    "verl": _write_verl,
    "qerl": _write_qerl,
}
CHECKS: dict[str, Callable[[Calibration], Any]] = {"verl": verl_block, "qerl": qerl_block}


def check_export(calibration: Calibration, target: str) -> None:
    """Raise the reason when ``target`` cannot carry ``calibration`` (writes nothing)."""
    if target not in EXPORTERS:
        raise HwdiffError(
            f"unknown export format {target!r}: expected one of {', '.join(EXPORTERS)}"
        )
    CHECKS[target](calibration)


def export(calibration: Calibration, target: str, path: str | os.PathLike) -> Path:
    """Write ``calibration`` in the format ``target`` (a key of :data:`EXPORTERS`) to ``path``;
    HwdiffError (nothing written) when the consumer cannot give every norm its σ."""
    check_export(calibration, target)
    return EXPORTERS[target](calibration, Path(path))
