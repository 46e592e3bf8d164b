"""The AQN injector: Gaussian noise on RMSNorm weights (QeRL eq. 10), that cannot silently do nothing.

Norms are found by class name (``'rmsnorm' in type(m).__name__.lower()`` with a 1-D weight), never
by isinstance against transformers' classes: vLLM's ``RMSNorm`` and vLLM-Ascend's ``AscendRMSNorm``
match as well as HF's ``Qwen2RMSNorm``. Every ``apply`` draws fresh float32 noise and adds it to a
float32 copy of the clean weights, cast once to the weight's dtype — noise never accumulates, and a
bf16 weight is not rounded twice. ``restore`` puts back the original tensors bit for bit.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from . import structure
from .calibration.rounding import CHANGED_WARNING
from .calibration.schedule import SigmaSchedule
from .compare.laws import check_law, mixing_matrix, standardized
from .errors import HwdiffError

log = logging.getLogger(__name__)


def find_norms(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every RMSNorm with a 1-D weight, by class name (:func:`hwdiff.structure.is_norm`)."""
    return structure.find_norms(model)


def expected_norm_count(model: torch.nn.Module) -> int | None:
    """The family's RMSNorm count (2L + 1 for Qwen2 / Llama / Mistral / MoE, 4L + 1 Qwen3 / Gemma 2,
    6L + 1 Gemma 3; Qwen2.5-1.5B: 57), else None (:func:`hwdiff.structure.expected_norm_count`)."""
    return structure.expected_norm_count(model)


@dataclass(frozen=True)
class Effectiveness:
    """What σ actually does to one weight vector once cast to ``dtype``."""

    name: str
    sigma: float
    effective_sigma: float  # std of (cast(w + z) − w)
    changed_frac: float  # fraction of elements whose stored value changed


def effectiveness(
    name: str, weight: torch.Tensor, sigma: float, dtype: torch.dtype, seed: int = 0
) -> Effectiveness:
    """Draw the injector's noise once for ``weight`` and measure it after the cast to ``dtype``."""
    clean = weight.detach().float().cpu()
    stored = clean.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    noisy = (clean + torch.randn(clean.shape, generator=generator) * sigma).to(dtype)
    delta = noisy.float() - stored.float()
    return Effectiveness(
        name,
        sigma,
        float(delta.double().pow(2).mean().sqrt()),
        float((noisy != stored).float().mean()),
    )


class AQNInjector:
    """Adds noise of standard deviation σ to each RMSNorm weight of ``model``.

    ``sigma``: a float (every norm), a ``{module name: σ}`` mapping (norms it does not name get no
    noise), or a :class:`~hwdiff.calibration.Calibration` (per-layer schedules; pass ``step`` and
    ``total_steps`` to :meth:`apply`). ``law`` (``gaussian``, ``student_t`` with ``df`` > 2, or
    ``laplace``; :mod:`hwdiff.compare.laws`): every draw is scaled to standard deviation σ; None → each norm's
    law from a calibration, else Gaussian. ``rho``: correlation of the noise of the same norm class in
    consecutive layers (AR(1) along depth), or ``correlation``: a layer × layer matrix; None → a
    calibration's recommended ρ, else independent. ``expected_count`` (default: the family's count from
    :func:`hwdiff.structure.expected_norm_count`, else the same norms in every decoder layer) makes a
    wrong number of matched norms an error.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sigma: Any,
        *,
        law: str | None = None,
        df: float | None = None,
        rho: float | None = None,
        correlation: Any = None,
        expected_count: int | None = None,
        check_count: bool = True,
    ) -> None:
        self.model = model
        self._norms = find_norms(model)
        if not self._norms:
            raise HwdiffError(no_rmsnorm_message(model))
        names = [n for n, _ in self._norms]
        if check_count and expected_count is not None and expected_count != len(names):
            raise HwdiffError(
                f"AQN matched {len(names)} RMSNorm layers, expected {expected_count}: "
                f"{', '.join(names[:4])} …"
            )
        if (
            check_count and expected_count is None
        ):  # the family's count, or the same norms in every layer
            structure.check_norm_layout(names, model, what="RMSNorm")
        self._sigma = sigma
        self._check_names(sigma)
        self._originals = {name: module.weight.detach().clone() for name, module in self._norms}
        self._masters = {name: weight.float() for name, weight in self._originals.items()}
        self._applied_weights: dict[str, torch.Tensor | None] = dict.fromkeys(self.targets)
        self._applied = False
        self.laws = _laws(sigma, self.targets, law, df)
        self.rho = rho if rho is not None else float(getattr(sigma, "rho", 0.0) or 0.0)
        self.correlation = correlation
        mixing_matrix(2, self.rho)  # validates rho

    @property
    def targets(self) -> list[str]:
        return [name for name, _ in self._norms]

    def resync(self) -> list[str]:
        """Take as clean every norm weight that changed since the last :meth:`apply` (a weight sync
        from the trainer overwrote it); returns their names."""
        changed = []
        with torch.no_grad():
            for name, module in self._norms:
                if self._applied_weights.get(name) is None or not torch.equal(
                    module.weight, self._applied_weights[name]
                ):
                    self._originals[name] = module.weight.detach().clone()
                    self._masters[name] = self._originals[name].float()
                    changed.append(name)
        return changed

    def _check_names(self, sigma: Any) -> None:
        names = _layer_names(sigma)
        unknown = sorted(set(names) - set(self.targets)) if names is not None else []
        if unknown:
            raise HwdiffError(
                f"σ given for {len(unknown)} module(s) that are not RMSNorms of this model: "
                f"{', '.join(unknown[:4])}"
            )

    def sigmas(self, step: int | None = None, total_steps: int | None = None) -> dict[str, float]:
        """σ per norm at ``step`` (schedules need ``step`` and ``total_steps``)."""
        return {name: _sigma_for(self._sigma, name, step, total_steps) for name in self.targets}

    def apply(
        self, step: int | None = None, total_steps: int | None = None, seed: int | None = None
    ) -> dict[str, float]:
        """Fresh noise on every target from its clean float32 master; returns the σ used per norm."""
        sigmas = self.sigmas(step, total_steps)
        seed = seed if seed is not None else int(torch.seed() % 2**63)
        draws = self._draws(seed)
        with torch.no_grad():
            for name, module in self._norms:
                master = self._masters[name]
                noise = draws[name] * sigmas[name]
                module.weight.copy_((master + noise.to(master.device)).to(module.weight.dtype))
                self._applied_weights[name] = module.weight.detach().clone()
        self._applied = True
        noisy = [f"{name}={value:.3g}" for name, value in sigmas.items() if value > 0]
        log.info("applied noise to %d RMSNorm layers: %s", len(noisy), ", ".join(noisy))
        return sigmas

    def _draws(self, seed: int) -> dict[str, torch.Tensor]:
        """Standardised float32 noise per norm: torch's Gaussian stream (as in hwdiff 0.1) when every law is
        Gaussian and independent, else numpy draws of each law mixed along depth per norm class."""
        if (
            all(law == ("gaussian", None) for law in self.laws.values())
            and not self.rho
            and self.correlation is None
        ):
            generator = torch.Generator().manual_seed(seed)
            return {
                name: torch.randn(
                    self._masters[name].shape, generator=generator, dtype=torch.float32
                )
                for name in self.targets
            }
        rng = np.random.default_rng(seed)
        raw = {
            name: standardized(*self.laws[name], rng, self._masters[name].numel())
            for name in self.targets
        }
        out = {}
        for chain in structure.depth_chains(self.targets):
            matrix = (
                self.correlation if len(chain) > 1 else None
            )  # a lone norm (the final one) mixes with nothing
            mixed = mixing_matrix(len(chain), self.rho, matrix) @ np.stack([raw[n] for n in chain])
            out.update(
                {
                    name: torch.from_numpy(mixed[i].astype(np.float32)).reshape(
                        self._masters[name].shape
                    )
                    for i, name in enumerate(chain)
                }
            )
        return out

    def restore(self) -> None:
        """Put back the clean weights, bit for bit."""
        with torch.no_grad():
            for name, module in self._norms:
                module.weight.copy_(self._originals[name])
        self._applied_weights = dict.fromkeys(self.targets)
        self._applied = False

    def __enter__(self) -> "AQNInjector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _laws(
    sigma: Any, targets: list[str], law: str | None, df: float | None
) -> dict[str, tuple[str, float | None]]:
    """(law, df) per target: the explicit one, else each norm's from a calibration, else Gaussian."""
    layers = {layer.name: layer for layer in getattr(sigma, "layers", ())}
    out = {}
    for name in targets:
        chosen = (
            (law, df)
            if law is not None
            else ((layers[name].law, layers[name].df) if name in layers else ("gaussian", None))
        )
        check_law(*chosen)
        out[name] = (chosen[0], chosen[1] if chosen[0] == "student_t" else None)
    return out


def no_rmsnorm_message(model: torch.nn.Module) -> str:
    """Why AQN cannot run on a model without RMSNorm, naming its LayerNorm modules if it has any."""
    layernorms = structure.layernorm_names(model)
    text = (
        f"no RMSNorm found in {type(model).__name__}: AQN would inject into 0 layers "
        "(norms are matched by 'rmsnorm' in the class name, with a 1-D weight)"
    )
    return text + "; " + structure.aqn_needs_rmsnorm(layernorms) if layernorms else text


def _layer_names(sigma: Any) -> list[str] | None:
    if isinstance(sigma, Mapping):
        return list(sigma)
    layers = getattr(sigma, "layers", None)
    return [layer.name for layer in layers] if layers is not None else None


def _sigma_for(sigma: Any, name: str, step: int | None, total_steps: int | None) -> float:
    if isinstance(sigma, (int, float, np.floating)):
        value = float(sigma)
    elif isinstance(sigma, Mapping):
        value = float(sigma.get(name, 0.0))
    elif hasattr(sigma, "schedule_for"):
        schedule: SigmaSchedule | None = sigma.schedule_for(name)
        if schedule is None:
            return 0.0
        if step is None or total_steps is None:
            value = schedule.sigma_end
        else:
            value = schedule.at(step, total_steps)
    else:
        raise HwdiffError(
            f"sigma must be a float, a {{module name: σ}} mapping or a calibration, got {type(sigma).__name__}"
        )
    if value < 0 or not np.isfinite(value):
        raise HwdiffError(f"σ must be finite and ≥ 0, got {value} for {name}")
    return value


@dataclass(frozen=True)
class StageCheck:
    """Effectiveness of every norm's σ at one training stage."""

    stage: int
    layers: tuple[Effectiveness, ...]

    @property
    def min_changed_frac(self) -> float:
        return min(layer.changed_frac for layer in self.layers)

    @property
    def weak(self) -> tuple[Effectiveness, ...]:
        return tuple(
            layer
            for layer in self.layers
            if layer.sigma > 0 and layer.changed_frac < CHANGED_WARNING
        )


def check_effectiveness(
    model: torch.nn.Module, sigma: Any, dtype: torch.dtype | None = None, seed: int = 0
) -> list[StageCheck]:
    """Per stage (1 … K−1 of a calibration's schedule; one row for a plain σ) and per norm: the σ
    that survives the cast to ``dtype`` (default: the weights' dtype) and the fraction of elements
    that change. Logs a warning for each stage where some norm changes < 50% of its elements."""
    injector = AQNInjector(model, sigma)
    weights = {name: module.weight.detach() for name, module in injector._norms}
    schedule = getattr(sigma, "schedule", None)
    total = schedule.num_stages if schedule is not None else 1
    checks = []
    for stage in range(1, total) if schedule is not None else [1]:
        step = stage if schedule is not None else None
        sigmas = injector.sigmas(step, total if schedule is not None else None)
        layers = tuple(
            effectiveness(name, weights[name], sigmas[name], dtype or weights[name].dtype, seed)
            for name in injector.targets
        )
        check = StageCheck(stage, layers)
        if check.weak:
            worst = min(check.weak, key=lambda layer: layer.changed_frac)
            log.warning(
                "stage %d: σ=%.3g changes only %.1f%% of %s's elements in %s — the noise is mostly rounded "
                "away (%d norm(s) below %.0f%%)",
                stage,
                worst.sigma,
                100 * worst.changed_frac,
                worst.name,
                str(dtype or weights[worst.name].dtype).removeprefix("torch."),
                len(check.weak),
                100 * CHANGED_WARNING,
            )
        checks.append(check)
    return checks


def format_checks(injector_targets: list[str], checks: list[StageCheck]) -> str:
    lines = [
        f"matched {len(injector_targets)} RMSNorm layers: {', '.join(injector_targets[:3])}"
        + (f" … {injector_targets[-1]}" if len(injector_targets) > 3 else ""),
        "",
        "stage  sigma (min-max)        effective/sigma (median)  changed elements (min over noised norms)  warning",
    ]
    for check in checks:
        sigmas = [layer.sigma for layer in check.layers if layer.sigma > 0]
        ratios = sorted(
            layer.effective_sigma / layer.sigma for layer in check.layers if layer.sigma > 0
        )
        if not sigmas:
            lines.append(f"{check.stage:<6} 0")
            continue
        changed = min(
            layer.changed_frac for layer in check.layers if layer.sigma > 0
        )  # norms with no noise aside
        lines.append(
            f"{check.stage:<6} {min(sigmas):.3g} - {max(sigmas):<12.3g} {ratios[len(ratios) // 2]:<25.3f} "
            f"{changed:<23.1%} {'ROUNDED AWAY in ' + str(len(check.weak)) + ' norm(s)' if check.weak else ''}"
        )
    return "\n".join(lines)


_SCHEDULES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, AQNInjector]]" = (
    weakref.WeakKeyDictionary()
)


def apply_schedule(
    model: torch.nn.Module, sigma_config: Any, step: int, total_steps: int, seed: int | None = None
) -> dict[str, float]:
    """One call per rollout step: fresh AQN noise at ``step`` of ``total_steps`` on every RMSNorm of
    ``model`` (an HF or a vLLM / vLLM-Ascend module tree: norms found by class name, count checked).

    ``sigma_config``: a sigma.yaml path, a :class:`~hwdiff.calibration.Calibration`, a {norm: σ}
    mapping or one σ. Call it after each weight sync, before generating (in verl: at the end of the
    rollout's weight update, where the fork calls ``generate_expert_gaussian_noise``). The clean
    weights are kept in float32; a norm whose weight changed since the previous call (a full sync
    overwrote the noise) is taken as the new clean weight, one that did not (LoRA-only sync) is reset
    from the kept clean copy — noise never accumulates. Returns σ per norm; logs how many got noise.
    """
    key = str(sigma_config) if isinstance(sigma_config, (str, os.PathLike)) else id(sigma_config)
    state = _SCHEDULES.get(model)
    if state is not None:
        state[
            1
        ].resync()  # weights the trainer re-synced since the last call are the clean ones now
    if state is None or state[0] != key:
        if state is not None:
            state[1].restore()  # back to clean before another configuration takes over
        if isinstance(sigma_config, (str, os.PathLike)):
            from .calibration.sigmafile import load_sigma

            sigma_config = load_sigma(sigma_config)
        state = _SCHEDULES[model] = (key, AQNInjector(model, sigma_config))
    sigmas = state[1].apply(step, total_steps, seed)
    log.info(
        "AQN step %d/%d: noise on %d of %d RMSNorm layers",
        step,
        total_steps,
        sum(1 for value in sigmas.values() if value > 0),
        len(sigmas),
    )
    return sigmas
