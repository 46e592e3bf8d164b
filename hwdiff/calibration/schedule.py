"""Noise schedules: QeRL's exponential decay over training stages, and simple variants, each named.

QeRL's code (the verl fork's noise_injection.py) uses K stages: stage 0 injects nothing, stages
1 … K−1 take ``sigma_trend[j] = σ_start · (σ_end/σ_start)^(j/(K−2))``, j = 0 … K−2 (it divides by
K−2; the paper writes K−1). The stage of a step is ``int(min(step, T) // (T / K))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import HwdiffError

KINDS = ("qerl-code", "qerl-paper", "linear", "constant")
MIN_STAGES = 3  # stage 0 is noise-free, and the decay needs two more (it divides by K − 2)


@dataclass(frozen=True)
class SigmaSchedule:
    """σ per training stage. ``kind``: ``qerl-code`` (default, what the verl fork runs),
    ``qerl-paper`` (exponent j/(K−1), so σ_end is never reached), ``linear`` or ``constant`` (σ_end)."""

    sigma_start: float
    sigma_end: float
    num_stages: int
    kind: str = "qerl-code"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HwdiffError(f"unknown schedule {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.num_stages < MIN_STAGES:
            raise HwdiffError(
                f"num_stages must be at least {MIN_STAGES} (stage 0 is noise-free), got {self.num_stages}"
            )
        for name in ("sigma_start", "sigma_end"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise HwdiffError(f"{name} must be a finite σ ≥ 0, got {value}")
        if self.kind.startswith("qerl") and (self.sigma_start <= 0 or self.sigma_end <= 0):
            raise HwdiffError("an exponential schedule needs sigma_start > 0 and sigma_end > 0")

    @property
    def values(self) -> tuple[float, ...]:
        """The K−1 noise levels of stages 1 … K−1."""
        k, start, end = self.num_stages, self.sigma_start, self.sigma_end
        if self.kind == "constant":
            return (end,) * (k - 1)
        if self.kind == "linear":
            return tuple(start + (end - start) * j / (k - 2) for j in range(k - 1))
        denominator = k - 2 if self.kind == "qerl-code" else k - 1
        return tuple(start * (end / start) ** (j / denominator) for j in range(k - 1))

    def stage(self, step: int, total_steps: int) -> int:
        if total_steps <= 0:
            raise HwdiffError(f"total_steps must be positive, got {total_steps}")
        return int(min(step, total_steps) // (total_steps / self.num_stages))

    def at(self, step: int, total_steps: int) -> float:
        """σ at ``step`` of ``total_steps``: 0 in stage 0, then the stage's value."""
        stage = self.stage(step, total_steps)
        return 0.0 if stage == 0 else self.values[min(stage - 1, self.num_stages - 2)]

    def scaled(self, multiplier: float) -> "SigmaSchedule":
        return SigmaSchedule(
            self.sigma_start * multiplier, self.sigma_end * multiplier, self.num_stages, self.kind
        )
