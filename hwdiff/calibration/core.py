"""Per-norm sigma schedules from a diff's local errors: calibrate() and the rules it applies
(sigma_end from a norm's error and its sub-block's gain, the near-eps correction, the start rule,
laws, the rounding check)."""

from __future__ import annotations

import logging
import math
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .._version import __version__
from ..errors import HwdiffError
from ..structure import layer_index
from .norms import NormError, attribution, layout_notes, norm_errors
from .schedule import SigmaSchedule
from .types import Calibration, LayerSigma, StageRounding

if TYPE_CHECKING:
    from ..compare.results import DiffResult
log = logging.getLogger(__name__)


QERL_MAX_START = 5e-2  # QeRL's largest σ_start, for weights ≈ 1: the cap relative to rms(w_eff)


@dataclass(frozen=True)
class GainRequest:
    """What :func:`calibrate` needs measured on the model: ``norms``, the (norm, sub-block) pairs
    whose sub-block gain its σ uses, and ``reference``, the reference capture whose recorded
    arguments the probe runs (None when the diff names none)."""

    norms: tuple[tuple[str, str | None], ...]
    reference: str | None


GainProbe = Callable[
    [GainRequest], Mapping[str, float]
]  # measures the gains a calibration asks for


def calibrate(
    diff: Any,
    *,
    factor: float = 100.0,
    num_stages: int = 10,
    kind: str = "qerl-code",
    gains: Mapping[str, float] | GainProbe | None = None,
    sigma_start: float | None = None,
    weights: Any = None,
    weight_dtype: str | None = None,
    model: Any = None,
    progress: bool = False,
) -> Calibration:
    """Per-norm σ schedules from a diff with local errors (a DiffResult, a diff.h5 or a diff JSON).

    ``gains``: the sub-block gains measured on the model ({norm: relative sub-block error per unit
    realized σ}, for the norms of :func:`norms_to_probe`), or a function that measures them given
    that :class:`GainRequest` (called once the diff is read, before the σ math) — conversion
    ``measured`` where a gain is given; without any, ``output-rms`` (the gain assumed).
    :func:`hwdiff.calibrate` passes :func:`hwdiff.measure.sigma_probe.measure_gains` on the model; this
    function touches no model. ``factor``: σ_start / σ_end before the cap of :func:`start_rule`;
    ``sigma_start``: the global σ_start itself (overrides the rule, warned when above QeRL's range).
    ``weights`` ({norm: numpy array}) and ``weight_dtype`` (default: the reference's dtype) feed the
    per-stage rounding check; by default the weights are read from the reference capture when it is
    on disk. Raises :class:`HwdiffError` for a diff without RMSNorm outputs or local errors, a diff
    with no error at any norm, or an out-of-range schedule. ``model`` and ``progress`` are refused:
    they belonged to this function before the measuring moved to :func:`hwdiff.calibrate`.
    """
    if model is not None or progress:
        raise HwdiffError(
            "hwdiff.calibration.calibrate takes measured gains (gains=) and touches no model; to "
            "measure them on the model call hwdiff.calibrate(diff, model=model) (what "
            "hwdiff.calibration.calibrate(diff, model=model) did before)"
        )
    if not (factor >= 1 and math.isfinite(factor)):
        raise HwdiffError(f"factor (σ_start / σ_end) must be ≥ 1, got {factor}")
    from ..compare.io import load_diff

    result = load_diff(diff, arrays=False)
    errors = norm_errors(result)
    if callable(gains):
        gains = gains(_gain_request(result, errors))
    gains = dict(gains or {})
    # the gain is per unit rms(Δy) at the norm's output, and rms(Δy) = σ_w·rms(x̂): both parts over rms(x̂)
    unit, near_eps_notes = normalised_rms(result, [e.name for e in errors if e.skip_reason is None])
    sigmas = {
        e.name: sigma_end(e, gains.get(e.name)) / unit.get(e.name, 1.0)
        for e in errors
        if e.skip_reason is None
    }
    positive = [value for value in sigmas.values() if value > 0]
    if not sigmas:
        first = next(e for e in errors if e.skip_reason)
        raise HwdiffError(
            f"no RMSNorm can be calibrated: every one is skipped ({first.name}: {first.skip_reason})"
        )
    if not positive:
        raise HwdiffError(
            "the diff shows no local error at any RMSNorm or its sub-block: there is nothing to calibrate"
        )
    end = statistics.median(positive)
    w_rms = statistics.median(e.weight_rms for e in errors if e.skip_reason is None)
    start, rule, warnings = start_rule(end, w_rms, factor=factor, sigma_start=sigma_start)
    warnings += layout_notes(result, [e.name for e in errors if e.skip_reason is None])
    warnings += near_eps_notes
    schedule = SigmaSchedule(start, end, num_stages, kind)
    layers = tuple(
        LayerSigma(
            name=e.name,
            layer_index=layer_index(e.name),
            sub_block=e.sub_block,
            norm_error=e.norm_error,
            block_error=e.block_error,
            output_rms=e.output_rms,
            weight_rms=e.weight_rms,
            sigma_end=sigmas[e.name],
            sigma_start=start * sigmas[e.name] / end,
            multiplier=sigmas[e.name] / end,
            gain_block=gains.get(e.name),
            role=e.role,
            accounts_for=e.accounts_for,
            normalised_rms=unit.get(e.name, 1.0),
        )
        for e in errors
        if e.skip_reason is None
    )
    skipped = {e.name: e.skip_reason for e in errors if e.skip_reason is not None}
    attributed = attribution(result, errors, sigmas)
    calibration = with_laws(
        Calibration(
            layers,
            schedule,
            "local",
            "measured" if gains else "output-rms",
            rule,
            _provenance(result, diff),
            skipped,
            warnings=tuple(warnings + attributed.warnings),
            zero_sigma=attributed.zero_sigma,
            unattributed=attributed.unattributed,
            unattributed_fraction=attributed.fraction,
            unreproduced=attributed.unreproduced,
            roles_from=attributed.roles_from,
        ),
        result,
    )
    return with_rounding(
        calibration,
        weights if weights is not None else reference_weights(result, layers),
        weight_dtype or str(result.reference.get("dtype", "float32")),
    )


def norms_to_probe(diff: Any) -> GainRequest:
    """The norms of a diff whose sub-block gain :func:`calibrate` uses, and the reference capture to
    probe them on (:class:`GainRequest`)."""
    from ..compare.io import load_diff

    result = load_diff(diff, arrays=False)
    return _gain_request(result, norm_errors(result))


def _gain_request(diff: DiffResult, errors: list[NormError]) -> GainRequest:
    # a norm with no error in it nor in its sub-block gets σ = 0 whatever the gain: not probed
    return GainRequest(
        tuple(
            (e.name, e.sub_block)
            for e in errors
            if e.skip_reason is None and (e.norm_error > 0 or e.block_error > 0)
        ),
        diff.reference.get("path"),
    )


def with_laws(calibration: Calibration, diff: DiffResult) -> Calibration:
    """Per norm the law (and Student-t df) that reproduces its measured local error, and the
    recommended correlation along depth (:mod:`hwdiff.calibration.law_evidence`)."""
    from .law_evidence import law_evidence

    evidence = law_evidence(diff, [l.name for l in calibration.layers if l.sigma_end > 0])
    layers = tuple(
        replace(
            l,
            law=evidence.fits[l.name].law,
            df=evidence.fits[l.name].df,
            law_why=evidence.fits[l.name].why,
        )
        if l.name in evidence.fits
        else replace(l, law_why=_law_missing(l, evidence.note))
        for l in calibration.layers
    )
    return replace(calibration, layers=layers, rho=evidence.rho, correlation_note=evidence.note)


def _law_missing(layer: LayerSigma, note: str) -> str:
    """Why a norm with noise has no fitted law: the evidence's own reason, or what this norm lacks."""
    if layer.sigma_end == 0:
        return "no noise"
    if note.startswith("law:"):
        return note
    if layer.norm_error == 0:
        return (
            "law: Gaussian assumed — the norm's own local error is zero (the error lives in its sub-block, whose "
            "law is not measured at the norm)"
        )
    return (
        "law: Gaussian assumed — the norm's local error was not fitted per channel (its recorded input is missing "
        "or not tokens x channels, e.g. a per-head q/k norm)"
    )


def with_sigmas(calibration: Calibration, other: Calibration) -> Calibration:
    """``calibration`` (its measured errors and targets) carrying the σ of ``other`` (e.g. a hand-edited
    sigma file) per norm and its schedule — to verify those σ against this measurement."""
    layers = []
    for layer in calibration.layers:
        try:
            theirs = other.layer(layer.name)
        except KeyError:
            raise HwdiffError(f"the sigma file has no entry for {layer.name}") from None
        layers.append(
            replace(
                layer,
                sigma_end=theirs.sigma_end,
                sigma_start=theirs.sigma_start,
                multiplier=theirs.multiplier,
            )
        )
    return replace(
        calibration,
        layers=tuple(layers),
        schedule=other.schedule,
        start_rule="from the sigma file",
        provenance={**calibration.provenance, "sigma_file": other.provenance.get("diff")},
    )


NEAR_EPS = 0.999  # rms(x̂) below this: the norm's input sits near eps, and σ is divided by rms(x̂)


def normalised_rms(diff: DiffResult, names: list[str]) -> tuple[dict[str, float], list[str]]:
    """rms of x̂ = y / (offset + w) over real tokens, per norm, read from the reference capture — where
    it is below :data:`NEAR_EPS` (the norm's input sits near eps: x̂ = x / sqrt(mean(x²) + eps) is
    then shorter than unit rms). Both conversions assume unit-rms x̂ (Δy = Δw⊙x̂ has rms σ); there
    σ = ε·rms(y) is rms(x̂) times too small, and σ is divided by it. Channels whose effective weight
    is below 1e-3 of the largest are left out. Returns ({norm: rms(x̂)}, notes)."""
    path = diff.reference.get("path")
    if not path or not Path(path).exists():
        return {}, [
            "the reference capture is not at hand: whether a norm's input sits near eps (x̂ shorter than "
            "unit rms, sigma too small by that factor) was not checked"
        ]
    from ..store.reader import open_capture

    found = {}
    with open_capture(path) as cap:
        if cap.mode != "full":
            return {}, [
                f"the reference is a '{cap.mode}' capture: whether a norm's input sits near eps was not checked"
            ]
        for name in names:
            value = _xhat_rms(cap, name)
            if value is not None and value < NEAR_EPS:
                found[name] = value
    notes = (
        [
            f"the input of {len(found)} norm(s) sits near eps (rms of x̂ {min(found.values()):.3g} at "
            f"{min(found, key=found.__getitem__)}): their sigma is divided by rms(x̂)"
        ]
        if found
        else []
    )
    return found, notes


def _xhat_rms(cap: Any, name: str) -> float | None:
    import numpy as np

    from ..structure import token_axis

    info, weight = cap.modules.get(name), cap.weight(name)
    if info is None or weight is None or not cap.has_call(name, 0):
        return None
    scale = weight.astype("float64") + info.weight_offset
    keep = np.abs(scale) > 1e-3 * np.abs(scale).max()
    mask = cap.attention_mask.astype(bool)
    total, count, row0 = 0.0, 0, 0
    for block in cap.iter_chunks(name):
        axis = token_axis(block.shape, block.shape[0], mask.shape[1])
        if axis is None or block.shape[-1] != scale.shape[0]:
            return None
        rows = np.moveaxis(block, axis, 1)[mask[row0 : row0 + block.shape[0]]]
        x_hat = rows[..., keep].astype("float64") / scale[keep]
        total, count, row0 = (
            total + float((x_hat**2).sum()),
            count + x_hat.size,
            row0 + block.shape[0],
        )
    return math.sqrt(total / count) if count else None


def sigma_end(error: NormError, gain_block: float | None) -> float:
    """σ_end of one norm (see the module docstring)."""
    norm_part = error.norm_error * error.output_rms
    if gain_block is None:
        return error.output_rms * math.hypot(error.norm_error, error.block_error)
    block_part = error.block_error / gain_block if gain_block > 0 else 0.0
    return math.hypot(norm_part, block_part)


def start_rule(
    sigma_end: float, weight_rms: float, *, factor: float = 100.0, sigma_start: float | None = None
) -> tuple[float, str, list[str]]:
    """Global σ_start, the rule in words, and warnings.

    Default: min(factor·σ_end, 0.05·rms(w_eff)) — QeRL's ratio, capped at QeRL's largest σ_start
    (0.05 for weights ≈ 1) relative to the median rms of the effective norm weights; never below
    σ_end. An explicit ``sigma_start`` is kept, with a warning when above that cap."""
    cap = QERL_MAX_START * weight_rms
    warnings = []
    if sigma_start is not None:
        if not (math.isfinite(sigma_start) and sigma_start > 0):
            raise HwdiffError(f"sigma_start must be a finite σ > 0, got {sigma_start}")
        if sigma_start < sigma_end:
            raise HwdiffError(
                f"sigma_start {sigma_start:.3g} is below the measured sigma_end {sigma_end:.3g}"
            )
        if sigma_start > cap:
            warnings.append(
                f"sigma_start {sigma_start:.3g} is above QeRL's range (its largest, 0.05, relative to "
                f"weights of rms {weight_rms:.3g}: {cap:.3g})"
            )
        return sigma_start, f"given: sigma_start = {sigma_start:.6g}", warnings
    start = min(factor * sigma_end, cap)
    if sigma_end >= cap:
        warnings.append(
            f"the measured sigma_end {sigma_end:.3g} is at or above QeRL's largest sigma_start "
            f"({cap:.3g} for weights of rms {weight_rms:.3g}): the schedule is constant"
        )
        start = sigma_end
    rule = f"min({factor:g} x sigma_end, 0.05 x median rms(w_eff) = {cap:.3g})" + (
        " — capped" if start < factor * sigma_end else ""
    )
    return start, rule, warnings


def _provenance(result: DiffResult, diff: Any) -> dict[str, Any]:
    return {
        "diff": str(diff) if isinstance(diff, (str, os.PathLike)) else "in memory",
        "reference": result.reference,
        "target": result.target,
        "golden": result.golden,
        "hwdiff_version": __version__,
    }


# ------------------------------------------------------------------------------------------------
def with_rounding(
    calibration: Calibration, weights: dict[str, Any] | None, dtype: str
) -> Calibration:
    """Add the per-stage rounding check (``weights``: {norm: stored weight values}); warns when
    late stages are mostly rounded away in ``dtype``."""
    from .rounding import CHANGED_WARNING, changed_fraction

    if not weights:
        note = "the norm weights are not at hand (reference capture not found): no per-stage rounding check"
        return replace(calibration, warnings=calibration.warnings + (note,))
    rows, warnings = [], list(calibration.warnings)
    values = calibration.schedule.values
    for stage, value in enumerate(values, start=1):
        changed = {
            l.name: changed_fraction(weights[l.name], value * l.multiplier, dtype)
            for l in calibration.layers
            if l.multiplier > 0 and l.name in weights
        }
        if not changed:
            continue
        weakest = min(changed, key=changed.__getitem__)
        rows.append(
            StageRounding(
                stage, value, changed[weakest], statistics.median(changed.values()), weakest
            )
        )
    late = [r for r in rows if r.min_changed < CHANGED_WARNING]
    if late:
        warnings.append(
            f"in {dtype}, stages {', '.join(str(r.stage) for r in late)} change fewer than half of some "
            f"norm's weight elements (stage {late[-1].stage}: {late[-1].min_changed:.1%} of "
            f"{late[-1].weakest}): the noise is mostly rounded away there. Drawing it in float32 on a clean "
            "master copy (hwdiff's injector, apply_schedule) avoids accumulation, not this: it survives "
            "only where the noisy forward reads float32 norm weights"
        )
    return replace(
        calibration, rounding=tuple(rows), rounding_dtype=dtype, warnings=tuple(warnings)
    )


def reference_weights(diff: DiffResult, layers: tuple[LayerSigma, ...]) -> dict[str, Any] | None:
    """The stored weights of ``layers`` from the diff's reference capture, or None when it is not at hand."""
    path = diff.reference.get("path")
    if not path or not Path(path).exists():  # a capture file, or a multi-rank capture's directory
        return None
    from ..store.reader import open_capture

    try:
        with open_capture(path) as cap:
            weights = {l.name: cap.weight(l.name) for l in layers if l.name in cap.modules}
    except HwdiffError:
        return None
    return {name: w for name, w in weights.items() if w is not None} or None
