"""The calibration's types: what calibrate produces, the sigma file holds and the injector reads (torch-free).

A leaf: it imports nothing from hwdiff but errors-level basics and :mod:`hwdiff.calibration.schedule`, so the
injector (:mod:`hwdiff.aqn`), the sigma file (:mod:`hwdiff.calibration.sigmafile`) and the live-model checks
(:mod:`hwdiff.measure.sigma_probe`, :mod:`hwdiff.measure.policy_check`) take these types without importing
calibrate's math (:mod:`hwdiff.calibration`, which re-exports them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..common.numbers import json_number as _num
from .schedule import SigmaSchedule

SCHEMA = "hwdiff/sigma/2"
READABLE_SCHEMAS = ("hwdiff/sigma/1", SCHEMA)
CONVERSIONS = ("output-rms", "measured")
QERL_PRESETS = {"QeRL config default": (5e-2, 5e-4), "QeRL shipped scripts": (1e-2, 1e-4)}
UNATTRIBUTED_NOTE = (
    "local error of a sub-block that no norm's sigma carries (a sub-block without a pre- or "
    "post-norm, or whose norm was refused), after the share of the norms nested inside it; fraction: "
    "its squared sum over the squared sum of all sub-blocks' local errors"
)
METHOD_NOTE = (
    "local errors from a replay of the reference's inputs on the target device (diff --local)"
)
CONVERSION_NOTES = {
    "output-rms": "sigma = rms(y_ref) * sqrt(eps_norm^2 + eps_block^2): exact for the norm's own error; assumes the "
    "sub-block passes a relative error on unchanged (gain 1/rms(y)); --verify measures that",
    "measured": "sigma = sqrt((eps_norm * rms(y_ref))^2 + (eps_block / g)^2), g = relative sub-block error per unit "
    "realized sigma, measured on a float32 copy of the model",
}


@dataclass(frozen=True)
class LayerSigma:
    """The calibrated noise of one RMSNorm (σ absolute, on the weight; errors relative L2)."""

    name: str
    layer_index: int | None
    sub_block: str | None
    norm_error: float  # relative error the hardware adds in the norm (local)
    block_error: float  # relative error the hardware adds in the sub-block the norm feeds (local)
    output_rms: float  # rms of the reference norm output over real tokens
    weight_rms: float  # rms of the effective weight (1+w for Gemma-style norms)
    sigma_end: float
    sigma_start: float
    multiplier: float
    gain_block: float | None = None  # measured: relative sub-block error per unit realized σ
    law: str = (
        "gaussian"  # the noise law that best reproduces the measured error (hwdiff.compare.laws)
    )
    df: float | None = None  # Student-t degrees of freedom (pooled over the norms that choose it)
    law_why: str = ""
    role: str = ""  # pre / post / nested / final (hwdiff.structure.NormRole), "" when not known
    accounts_for: str | None = None  # the sub-block whose local error (block_error) σ carries
    normalised_rms: float = (
        1.0  # rms of x̂ (< 1 where the norm's input sits near eps): σ was divided by it
    )

    @property
    def assumed_gain(self) -> float:
        """Relative error at the sub-block output per unit σ that the conversion assumed."""
        if self.gain_block is not None:
            return self.gain_block
        return 1.0 / self.output_rms if self.output_rms else math.nan

    @property
    def target_error(self) -> float:
        """The error σ_end is meant to reproduce at the sub-block output (at the norm when it feeds none):
        the sub-block's local error with the norm's own error carried there through the gain the
        conversion assumed (``--verify`` recomputes it with the gain it measures)."""
        carried = self.norm_error * self.output_rms * self.assumed_gain
        return math.hypot(carried, self.block_error)


@dataclass(frozen=True)
class VerifyLayer:
    """Closed-loop check of one norm: σ_end injected alone, error induced where the claim lives."""

    name: str
    measured_at: str  # module whose output was compared (the sub-block, else the norm)
    target_error: float
    induced_error: float  # rms over seeds of the relative L2 error induced there
    realized_sigma: float  # rms over seeds of the power-weighted realized σ (rms of Δy at the norm)
    law: str = "gaussian"  # the calibrated law that was injected
    law_induced: str | None = (
        None  # the law fitted to the weight noise recovered from the induced error
    )
    df_induced: float | None = None
    draws: int = 0  # noise draws behind induced_error
    ratio_se: float | None = None  # relative standard error of the ratio (None: not estimated)

    @property
    def ratio(self) -> float:
        return self.induced_error / self.target_error if self.target_error else math.nan

    @property
    def law_matches(self) -> bool | None:
        return None if self.law_induced is None else self.law_induced == self.law


@dataclass(frozen=True)
class VerifyResult:
    layers: tuple[VerifyLayer, ...]
    band: tuple[float, float]
    seeds: int
    method: str
    unreproduced: tuple[
        str, ...
    ] = ()  # norms with σ = 0 (or none) while their sub-block has local error

    @property
    def failed(self) -> tuple[VerifyLayer, ...]:
        lo, hi = self.band
        return tuple(layer for layer in self.layers if not lo <= layer.ratio <= hi)

    @property
    def passed(self) -> bool:
        return not self.failed and not self.unreproduced

    @property
    def law_mismatches(self) -> tuple[VerifyLayer, ...]:
        return tuple(layer for layer in self.layers if layer.law_matches is False)

    def layer(self, name: str) -> VerifyLayer:
        return next(layer for layer in self.layers if layer.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "band": list(self.band),
            "seeds": self.seeds,
            "passed": self.passed,
            "unreproduced": list(self.unreproduced),
            "layers": {
                l.name: {
                    "measured_at": l.measured_at,
                    "target_error": l.target_error,
                    "induced_error": l.induced_error,
                    "realized_sigma": l.realized_sigma,
                    "ratio": _num(l.ratio),
                    "law": l.law,
                    "law_induced": l.law_induced,
                    "df_induced": l.df_induced,
                    "draws": l.draws,
                    "ratio_se": _num(l.ratio_se),
                }
                for l in self.layers
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VerifyResult":
        layers = tuple(
            VerifyLayer(
                name,
                e["measured_at"],
                float(e["target_error"]),
                float(e["induced_error"]),
                float(e["realized_sigma"]),
                e.get("law", "gaussian"),
                e.get("law_induced"),
                e.get("df_induced"),
                int(e.get("draws") or 0),
                e.get("ratio_se"),
            )
            for name, e in data["layers"].items()
        )
        return cls(
            layers,
            tuple(data["band"]),
            int(data["seeds"]),
            data["method"],
            tuple(data.get("unreproduced") or ()),
        )


@dataclass(frozen=True)
class StageRounding:
    """Per stage: the fraction of weight elements σ changes once cast to the weights' dtype."""

    stage: int
    sigma: float  # the global σ of the stage
    min_changed: float  # over norms with σ > 0
    median_changed: float
    weakest: str


@dataclass(frozen=True)
class PolicyCheck:
    """The policy-level check of a calibration (:func:`hwdiff.measure.policy_check.policy_check`).

    ``emulated``: stat → {value, low, high} under the noise; ``hardware``: stat → the pair's value
    (the diff's RL block); ``ratio``: mean_abs / k3_kl → {value, low, high} (emulated / hardware; a
    ``why`` and no value when the pair's figure is 0)."""

    emulated: dict[str, dict[str, float | None]]
    hardware: dict[str, float]
    ratio: dict[str, dict[str, Any]]
    draws: int
    seed: int
    prompts: int
    positions: int
    confidence: float
    interval_rule: str
    model: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "all sigma_end injected at once (hwdiff robustness, token level) on the reference "
            "capture's prompts, against the diff's two captures",
            "draws": self.draws,
            "seed": self.seed,
            "prompts": self.prompts,
            "positions": self.positions,
            "confidence": self.confidence,
            "interval_rule": self.interval_rule,
            "model": dict(self.model),
            "emulated": {k: dict(v) for k, v in self.emulated.items()},
            "hardware": dict(self.hardware),
            "ratio": {k: dict(v) for k, v in self.ratio.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PolicyCheck":
        return cls(
            {k: dict(v) for k, v in data["emulated"].items()},
            {k: float(v) for k, v in data["hardware"].items()},
            {k: dict(v) for k, v in data["ratio"].items()},
            int(data["draws"]),
            int(data["seed"]),
            int(data["prompts"]),
            int(data["positions"]),
            float(data["confidence"]),
            str(data.get("interval_rule", "")),
            dict(data.get("model") or {}),
        )


@dataclass(frozen=True)
class Calibration:
    layers: tuple[LayerSigma, ...]
    schedule: SigmaSchedule
    method: str  # "local"
    conversion: str  # "output-rms" or "measured"
    start_rule: str
    provenance: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # norm → why it got no σ
    rounding: tuple[StageRounding, ...] = ()
    rounding_dtype: str | None = None
    verify: VerifyResult | None = None
    warnings: tuple[str, ...] = ()
    rho: float = 0.0  # recommended correlation of consecutive layers' noise (AR(1) along depth)
    correlation_note: str = ""
    zero_sigma: dict[str, str] = field(default_factory=dict)  # norm with σ_end = 0 → why
    unattributed: dict[str, float] = field(
        default_factory=dict
    )  # sub-block → local error no norm's σ carries
    unattributed_fraction: float = 0.0  # Σ unattributed² / Σ sub-block local error²
    unreproduced: tuple[
        str, ...
    ] = ()  # norms with σ = 0 (or none) while their sub-block has local error
    roles_from: str = (
        ""  # how the norm → sub-block map was found (measured data flow, or the name rule)
    )
    policy: PolicyCheck | None = (
        None  # all σ_end at once against the hardware pair (calibrate --policy-check)
    )

    @property
    def factor(self) -> float:
        return self.schedule.sigma_start / self.schedule.sigma_end

    def layer(self, name: str) -> LayerSigma:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def schedule_for(self, name: str) -> SigmaSchedule | None:
        """The norm's schedule (the global one times its multiplier), or None: no noise there."""
        try:
            layer = self.layer(name)
        except KeyError:
            return None
        if layer.sigma_end == 0:
            return None
        return replace(self.schedule, sigma_start=layer.sigma_start, sigma_end=layer.sigma_end)
