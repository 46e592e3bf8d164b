"""From measured error to AQN noise: the σ math and the sigma file (torch-free).

AQN adds Z ~ N(0, σ²) channel-wise to an RMSNorm weight w (QeRL eq. 10): the norm output
y = w⊙x̂ becomes (w+Z)⊙x̂, so Δy = Z⊙x̂ and E‖Δy‖² = σ²·Σ_t‖x̂_t‖² = σ²·N (x̂ has unit rms per
token; N = tokens × channels). A relative error ε of the norm output is therefore reproduced by

    σ = ε · rms(y_ref)            (conversion ``output-rms``, exact in expectation)

with rms(y_ref) the rms of the reference norm output over real tokens — whatever the weights and
however x̂'s power is spread over channels (the old shortcut ε·rms(w) is off by several times with
outlier channels). Gemma's y = (1+w)⊙x̂ changes nothing: Δy is still Z⊙x̂.

Which ε: for every norm, the local error (a replay, ``diff --local``) the hardware adds in the norm
(ε_norm) and in the sub-block it feeds (ε_block). Noise at the norm reaches the sub-block's output
through a gain g (relative error there per unit σ): ``output-rms`` assumes g = 1/rms(y) (the
sub-block passes a relative error on unchanged); ``measured`` measures g on a float32 copy of the
model (:mod:`hwdiff.sigma_probe`). Then σ_end = √((ε_norm·rms(y))² + (ε_block/g)²). Without local
errors calibrate refuses: the divergence-increment estimate was measured 1.1–21× off.

The schedule: σ_end per norm; one global schedule (the median σ_end, QeRL's stage formula) and a
multiplier per norm, as the verl fork applies it. σ_start follows a stated rule
(:func:`start_rule`): ``factor``·σ_end, capped at QeRL's largest σ_start relative to the weights.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ._version import __version__
from .calibration_types import (METHOD_NOTE, QERL_PRESETS, Calibration, LayerSigma, PolicyCheck, StageRounding,
                                VerifyResult)
from .errors import HwdiffError
from .schedule import SigmaSchedule
from .structure import layer_index

# the types and the sigma file's functions, where hwdiff.calibration named them before they had modules of their own
from .calibration_types import CONVERSION_NOTES, CONVERSIONS, READABLE_SCHEMAS, SCHEMA  # noqa: F401
from .calibration_types import UNATTRIBUTED_NOTE, VerifyLayer  # noqa: F401
from .sigmafile import load_sigma, save, save_sigma  # noqa: F401

if TYPE_CHECKING:
    from .compare.results import DiffResult, LayerDiff

log = logging.getLogger(__name__)
QERL_MAX_START = 5e-2  # QeRL's largest σ_start, for weights ≈ 1: the cap relative to rms(w_eff)
LOCAL_OVER_TOTAL = 2.0  # a local error this many times the total error is not a measurement to trust


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormError:
    """What the diff says about one norm: its local errors, output rms and sub-block."""

    name: str
    norm_error: float
    block_error: float
    output_rms: float
    weight_rms: float
    sub_block: str | None
    skip_reason: str | None = None
    role: str = ""
    accounts_for: str | None = None


@dataclass(frozen=True)
class GainRequest:
    """What :func:`calibrate` needs measured on the model: ``norms``, the (norm, sub-block) pairs
    whose sub-block gain its σ uses, and ``reference``, the reference capture whose recorded
    arguments the probe runs (None when the diff names none)."""

    norms: tuple[tuple[str, str | None], ...]
    reference: str | None


GainProbe = Callable[[GainRequest], Mapping[str, float]]  # measures the gains a calibration asks for


def calibrate(diff: Any, *, factor: float = 100.0, num_stages: int = 10, kind: str = "qerl-code",
              gains: Mapping[str, float] | GainProbe | None = None, sigma_start: float | None = None,
              weights: Any = None, weight_dtype: str | None = None) -> Calibration:
    """Per-norm σ schedules from a diff with local errors (a DiffResult, a diff.h5 or a diff JSON).

    ``gains``: the sub-block gains measured on the model ({norm: relative sub-block error per unit
    realized σ}, for the norms of :func:`norms_to_probe`), or a function that measures them given
    that :class:`GainRequest` (called once the diff is read, before the σ math) — conversion
    ``measured`` where a gain is given; without any, ``output-rms`` (the gain assumed).
    :func:`hwdiff.calibrate` passes :func:`hwdiff.sigma_probe.measure_gains` on the model; this
    function touches no model. ``factor``: σ_start / σ_end before the cap of :func:`start_rule`;
    ``sigma_start``: the global σ_start itself (overrides the rule, warned when above QeRL's range).
    ``weights`` ({norm: numpy array}) and ``weight_dtype`` (default: the reference's dtype) feed the
    per-stage rounding check; by default the weights are read from the reference capture when it is
    on disk. Raises :class:`HwdiffError` for a diff without RMSNorm outputs or local errors, a diff
    with no error at any norm, or an out-of-range schedule.
    """
    if not (factor >= 1 and math.isfinite(factor)):
        raise HwdiffError(f"factor (σ_start / σ_end) must be ≥ 1, got {factor}")
    from .compare.io import load_diff

    result = load_diff(diff, arrays=False)
    errors = norm_errors(result)
    if callable(gains):
        gains = gains(_gain_request(result, errors))
    gains = dict(gains or {})
    # the gain is per unit rms(Δy) at the norm's output, and rms(Δy) = σ_w·rms(x̂): both parts over rms(x̂)
    unit, near_eps_notes = normalised_rms(result, [e.name for e in errors if e.skip_reason is None])
    sigmas = {e.name: sigma_end(e, gains.get(e.name)) / unit.get(e.name, 1.0) for e in errors if e.skip_reason is None}
    positive = [value for value in sigmas.values() if value > 0]
    if not sigmas:
        first = next(e for e in errors if e.skip_reason)
        raise HwdiffError(f"no RMSNorm can be calibrated: every one is skipped ({first.name}: {first.skip_reason})")
    if not positive:
        raise HwdiffError("the diff shows no local error at any RMSNorm or its sub-block: there is nothing to calibrate")
    end = statistics.median(positive)
    w_rms = statistics.median(e.weight_rms for e in errors if e.skip_reason is None)
    start, rule, warnings = start_rule(end, w_rms, factor=factor, sigma_start=sigma_start)
    warnings += layout_notes(result, [e.name for e in errors if e.skip_reason is None])
    warnings += near_eps_notes
    schedule = SigmaSchedule(start, end, num_stages, kind)
    layers = tuple(LayerSigma(
        name=e.name, layer_index=layer_index(e.name), sub_block=e.sub_block, norm_error=e.norm_error,
        block_error=e.block_error, output_rms=e.output_rms, weight_rms=e.weight_rms, sigma_end=sigmas[e.name],
        sigma_start=start * sigmas[e.name] / end, multiplier=sigmas[e.name] / end, gain_block=gains.get(e.name),
        role=e.role, accounts_for=e.accounts_for, normalised_rms=unit.get(e.name, 1.0),
    ) for e in errors if e.skip_reason is None)
    skipped = {e.name: e.skip_reason for e in errors if e.skip_reason is not None}
    attributed = attribution(result, errors, sigmas)
    calibration = with_laws(Calibration(layers, schedule, "local", "measured" if gains else "output-rms", rule,
                                        _provenance(result, diff), skipped, warnings=tuple(warnings + attributed.warnings),
                                        zero_sigma=attributed.zero_sigma, unattributed=attributed.unattributed,
                                        unattributed_fraction=attributed.fraction, unreproduced=attributed.unreproduced,
                                        roles_from=attributed.roles_from), result)
    return with_rounding(calibration, weights if weights is not None else reference_weights(result, layers),
                         weight_dtype or str(result.reference.get("dtype", "float32")))


def norms_to_probe(diff: Any) -> GainRequest:
    """The norms of a diff whose sub-block gain :func:`calibrate` uses, and the reference capture to
    probe them on (:class:`GainRequest`)."""
    from .compare.io import load_diff

    result = load_diff(diff, arrays=False)
    return _gain_request(result, norm_errors(result))


def _gain_request(diff: DiffResult, errors: list[NormError]) -> GainRequest:
    # a norm with no error in it nor in its sub-block gets σ = 0 whatever the gain: not probed
    return GainRequest(tuple((e.name, e.sub_block) for e in errors
                             if e.skip_reason is None and (e.norm_error > 0 or e.block_error > 0)),
                       diff.reference.get("path"))


def with_laws(calibration: Calibration, diff: DiffResult) -> Calibration:
    """Per norm the law (and Student-t df) that reproduces its measured local error, and the
    recommended correlation along depth (:mod:`hwdiff.law_evidence`)."""
    from .law_evidence import law_evidence

    evidence = law_evidence(diff, [l.name for l in calibration.layers if l.sigma_end > 0])
    layers = tuple(replace(l, law=evidence.fits[l.name].law, df=evidence.fits[l.name].df, law_why=evidence.fits[l.name].why)
                   if l.name in evidence.fits else replace(l, law_why=_law_missing(l, evidence.note))
                   for l in calibration.layers)
    return replace(calibration, layers=layers, rho=evidence.rho, correlation_note=evidence.note)


def _law_missing(layer: LayerSigma, note: str) -> str:
    """Why a norm with noise has no fitted law: the evidence's own reason, or what this norm lacks."""
    if layer.sigma_end == 0:
        return "no noise"
    if note.startswith("law:"):
        return note
    if layer.norm_error == 0:
        return ("law: Gaussian assumed — the norm's own local error is zero (the error lives in its sub-block, whose "
                "law is not measured at the norm)")
    return ("law: Gaussian assumed — the norm's local error was not fitted per channel (its recorded input is missing "
            "or not tokens x channels, e.g. a per-head q/k norm)")


def with_sigmas(calibration: Calibration, other: Calibration) -> Calibration:
    """``calibration`` (its measured errors and targets) carrying the σ of ``other`` (e.g. a hand-edited
    sigma file) per norm and its schedule — to verify those σ against this measurement."""
    layers = []
    for layer in calibration.layers:
        try:
            theirs = other.layer(layer.name)
        except KeyError:
            raise HwdiffError(f"the sigma file has no entry for {layer.name}") from None
        layers.append(replace(layer, sigma_end=theirs.sigma_end, sigma_start=theirs.sigma_start,
                              multiplier=theirs.multiplier))
    return replace(calibration, layers=tuple(layers), schedule=other.schedule, start_rule="from the sigma file",
                   provenance={**calibration.provenance, "sigma_file": other.provenance.get("diff")})


NEAR_EPS = 0.999  # rms(x̂) below this: the norm's input sits near eps, and σ is divided by rms(x̂)


def normalised_rms(diff: DiffResult, names: list[str]) -> tuple[dict[str, float], list[str]]:
    """rms of x̂ = y / (offset + w) over real tokens, per norm, read from the reference capture — where
    it is below :data:`NEAR_EPS` (the norm's input sits near eps: x̂ = x / sqrt(mean(x²) + eps) is
    then shorter than unit rms). Both conversions assume unit-rms x̂ (Δy = Δw⊙x̂ has rms σ); there
    σ = ε·rms(y) is rms(x̂) times too small, and σ is divided by it. Channels whose effective weight
    is below 1e-3 of the largest are left out. Returns ({norm: rms(x̂)}, notes)."""
    path = diff.reference.get("path")
    if not path or not Path(path).exists():
        return {}, ["the reference capture is not at hand: whether a norm's input sits near eps (x̂ shorter than "
                    "unit rms, sigma too small by that factor) was not checked"]
    from .store.reader import open_capture

    found = {}
    with open_capture(path) as cap:
        if cap.mode != "full":
            return {}, [f"the reference is a '{cap.mode}' capture: whether a norm's input sits near eps was not checked"]
        for name in names:
            value = _xhat_rms(cap, name)
            if value is not None and value < NEAR_EPS:
                found[name] = value
    notes = [f"the input of {len(found)} norm(s) sits near eps (rms of x̂ {min(found.values()):.3g} at "
             f"{min(found, key=found.get)}): their sigma is divided by rms(x̂)"] if found else []
    return found, notes


def _xhat_rms(cap: Any, name: str) -> float | None:
    import numpy as np

    from .structure import token_axis

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
        rows = np.moveaxis(block, axis, 1)[mask[row0: row0 + block.shape[0]]]
        x_hat = rows[..., keep].astype("float64") / scale[keep]
        total, count, row0 = total + float((x_hat ** 2).sum()), count + x_hat.size, row0 + block.shape[0]
    return math.sqrt(total / count) if count else None


def sigma_end(error: NormError, gain_block: float | None) -> float:
    """σ_end of one norm (see the module docstring)."""
    norm_part = error.norm_error * error.output_rms
    if gain_block is None:
        return error.output_rms * math.hypot(error.norm_error, error.block_error)
    block_part = error.block_error / gain_block if gain_block > 0 else 0.0
    return math.hypot(norm_part, block_part)


def start_rule(sigma_end: float, weight_rms: float, *, factor: float = 100.0,
               sigma_start: float | None = None) -> tuple[float, str, list[str]]:
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
            raise HwdiffError(f"sigma_start {sigma_start:.3g} is below the measured sigma_end {sigma_end:.3g}")
        if sigma_start > cap:
            warnings.append(f"sigma_start {sigma_start:.3g} is above QeRL's range (its largest, 0.05, relative to "
                            f"weights of rms {weight_rms:.3g}: {cap:.3g})")
        return sigma_start, f"given: sigma_start = {sigma_start:.6g}", warnings
    start = min(factor * sigma_end, cap)
    if sigma_end >= cap:
        warnings.append(f"the measured sigma_end {sigma_end:.3g} is at or above QeRL's largest sigma_start "
                        f"({cap:.3g} for weights of rms {weight_rms:.3g}): the schedule is constant")
        start = sigma_end
    rule = (f"min({factor:g} x sigma_end, 0.05 x median rms(w_eff) = {cap:.3g})"
            + (" — capped" if start < factor * sigma_end else ""))
    return start, rule, warnings


def norm_errors(diff: DiffResult) -> list[NormError]:
    """Local errors, output rms and sub-block of every RMSNorm output in a diff."""
    outputs = list(diff.outputs)
    norms = [m for m in outputs if m.kind == "rmsnorm"]
    if not norms:
        others = sorted({m.kind for m in outputs})
        layernorms = [m.name for m in outputs if m.kind == "layernorm"]
        if layernorms:
            from .structure import aqn_needs_rmsnorm

            raise HwdiffError("the diff has no RMSNorm outputs; " + aqn_needs_rmsnorm(layernorms))
        raise HwdiffError(f"the diff has no RMSNorm outputs (kinds present: {', '.join(others) or 'none'}): capture "
                          "with the default module selection or --kinds rmsnorm,attention,mlp,head")
    missing = [m.name for m in norms if m.local is None]
    if missing and len(missing) < len(norms):  # some norms were not replayed: those are named, not refused whole
        log.warning("no local error for %s: no σ for them", ", ".join(missing))
        norms = [m for m in norms if m.local is not None]
    elif missing:
        raise HwdiffError(f"calibrate needs local errors and the diff has none for {missing[0]}"
                          f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}: replay the reference on the "
                          "target (hwdiff replay REF.h5 --device TARGET -o local.h5) and diff with --local local.h5 "
                          "(the divergence-increment estimate was measured 1.1-21x off, so it is not offered)")
    by_name = {m.name: m for m in outputs}
    mapping, flow, _ = norm_map(diff)
    nested = _nested_power(flow, by_name)
    found = [_norm_error(m, mapping[m.name], by_name, nested) for m in norms]
    kept = {m.name for m in norms}
    absent = [NormError(name, 0.0, 0.0, 0.0, 0.0, None, entry.reason or (
        "no local error in the diff (the replay did not run it: see its log)" if name in by_name else
        "not in the diff: the capture did not record it (see the capture's 'unrecorded' list)"), entry.role,
        entry.accounts_for) for name, entry in mapping.items() if name not in kept]
    return [_final_norm_without_head(e, outputs) for e in found] + absent


@dataclass(frozen=True)
class NormMap:
    """Where one norm's σ lives: ``observe`` — the module whose output carries its noise first (the
    sub-block a pre-norm or the final norm feeds; None: the norm's own output, for post-norms and
    nested norms) — and ``accounts_for``, the sub-block whose local error its σ carries (None: only
    its own error). ``reason``: why it gets no σ."""

    role: str
    observe: str | None
    accounts_for: str | None
    reason: str | None = None
    consumers: tuple[str, ...] = ()


def norm_map(diff: DiffResult) -> tuple[dict[str, NormMap], Any, str]:
    """Every norm's :class:`NormMap`, from the data-flow record of the reference capture
    (:func:`hwdiff.structure.trace_dataflow`): ``(map, DataFlow or None, how it was found)``. A
    reference without that record (captured before it existed) falls back to the name rule
    (:func:`sub_blocks`), which says so."""
    from .structure import DataFlow

    outputs = list(diff.outputs)
    flow = DataFlow.from_json(diff.reference.get("dataflow"))
    if flow is None:
        norms = [m.name for m in outputs if m.kind == "rmsnorm"]
        blocks = sub_blocks(norms, outputs)
        return ({n: NormMap("", blocks[n], blocks[n]) for n in norms}, None,
                "name rule (the reference capture has no data-flow record: captured before hwdiff measured it)")
    present = {m.name for m in outputs}
    carried_by_pre = {r.sub_block for r in flow.norms if r.role in ("pre", "final")}
    mapping = {}
    for role in flow.norms:
        block = role.sub_block
        if role.role in ("pre", "final"):
            entry = NormMap(role.role, block, block)
        elif role.role == "post":  # its producer's error, unless a pre-norm already carries it (Gemma 2/3)
            entry = NormMap("post", None, None if block in carried_by_pre else block)
        elif role.role == "nested":
            entry = NormMap("nested", None, None)
        else:
            entry = NormMap(role.role, None, None, role.reason or role.role,
                            tuple(c for c in role.consumers if c in flow.sub_blocks))
        if entry.accounts_for and entry.accounts_for not in present and entry.reason is None:
            entry = replace(entry, reason=f"its sub-block {entry.accounts_for} ({flow.sub_blocks.get(entry.accounts_for)}) "
                                          "is not in the diff: capture it (the default kinds record it)")
        mapping[role.name] = entry
    return mapping, flow, "data flow measured on one traced forward of the reference model"


def _nested_power(flow: Any, by_name: dict[str, LayerDiff]) -> dict[str, float]:
    """Per sub-block, the squared local errors of the norms nested inside it: their share of the
    sub-block's local error, which their own σ carries (not counted again for the sub-block's norm)."""
    power: dict[str, float] = {}
    for role in flow.norms if flow is not None else ():
        if role.role == "nested" and role.name in by_name:
            error = _local_error(by_name[role.name])
            power[role.sub_block] = power.get(role.sub_block, 0.0) + error ** 2
    return power


@dataclass(frozen=True)
class Attribution:
    zero_sigma: dict[str, str]
    unattributed: dict[str, float]
    fraction: float
    unreproduced: tuple[str, ...]
    roles_from: str
    warnings: list[str]


def attribution(diff: DiffResult, errors: list[NormError], sigmas: dict[str, float]) -> Attribution:
    """No silent zero: why each norm with σ_end = 0 has none; the local error of every sub-block that
    no norm's σ carries (after its nested norms' share), also as a fraction of all sub-blocks' squared
    local error; and the norms given no σ (zero or skipped) while their sub-block has such error."""
    mapping, flow, roles_from = norm_map(diff)
    by_name = {m.name: m for m in diff.outputs}
    zero = {e.name: _zero_reason(e) for e in errors if e.skip_reason is None and sigmas.get(e.name) == 0}
    if flow is None:
        return Attribution(zero, {}, 0.0, (), roles_from, [])
    nested = _nested_power(flow, by_name)
    carried = {e.accounts_for for e in errors if e.skip_reason is None and sigmas.get(e.name, 0) > 0 and e.accounts_for}
    unattributed, total = {}, 0.0
    absent = [block for block in flow.sub_blocks if block not in by_name]
    warnings = [f"{len(absent)} sub-block(s) not in the diff, their local error unknown: {', '.join(absent[:3])}"
                + (" …" if len(absent) > 3 else "")] if absent else []
    for block in flow.sub_blocks:
        if block not in by_name:
            continue
        raw = _local_error(by_name[block])
        total += raw ** 2
        left = math.sqrt(max(0.0, raw ** 2 - nested.get(block, 0.0)))
        if left > 0 and block not in carried:
            unattributed[block] = left
    fraction = sum(v * v for v in unattributed.values()) / total if total else 0.0
    unreproduced = tuple(e.name for e in errors if (e.skip_reason is not None or sigmas.get(e.name) == 0)
                         and ({e.accounts_for} | set(mapping.get(e.name, NormMap("", None, None)).consumers)) & set(unattributed))
    return Attribution(zero, unattributed, fraction, unreproduced, roles_from, warnings)


def _zero_reason(error: NormError) -> str:
    where = f" nor in {error.accounts_for}, the sub-block its sigma carries" if error.accounts_for else ""
    return f"no local error at the norm{where}: nothing to reproduce"


def _final_norm_without_head(error: NormError, outputs: list[LayerDiff]) -> NormError:
    """The final norm feeds the LM head; a diff without it (vLLM computes logits outside the model's
    forward; a capture without the head kind) cannot say what the norm's noise does there: the norm is
    named as not calibrated rather than given the σ of its own output's error alone (measured 15-26 %
    low on the vLLM stand-in)."""
    if error.skip_reason or error.sub_block or layer_index(error.name) is not None:
        return error
    if any(m.kind == "head" for m in outputs):
        return error
    reason = ("feeds the LM head, which is not in the diff (a vLLM-layout capture: vLLM computes the logits outside the "
              "model's forward; or a capture without the head kind): its sub-block error is unknown, so it is not "
              "calibrated — calibrate it from a Hugging Face-layout capture that records lm_head")
    log.warning("%s: %s", error.name, reason)
    return replace(error, skip_reason=reason)


def layout_notes(diff: DiffResult, names: list[str]) -> list[str]:
    """What a capture layout changes in the calibration of the norms ``names``, said in its output."""
    layouts = {side.get("layout") for side in (diff.reference, diff.target)}
    if "vllm" not in layouts:
        return []
    fused = fused_add_norms(diff, names)
    if fused == []:
        return []
    which = ("norms that vLLM calls as a fused add+norm (norm(x, residual): in its decoder layers every norm but the "
             "first layer's input_layernorm, and the final norm)" if fused is None else
             f"{len(fused)} norm(s) called as a fused add+norm norm(x, residual) ({', '.join(fused[:3])}"
             f"{', …' if len(fused) > 3 else ''})")
    return [f"vLLM layout: {which} are replayed with the residual add inside, so their local error includes the "
            "rounding of that add and of both its inputs, which a Hugging Face-layout replay attributes to no module: "
            "their sigma comes out above an HF-layout calibration of the same pair (bf16 vs fp32 on the stand-in: up to "
            "6% with the in-place CUDA path, within 3% with the native path)"]


def fused_add_norms(diff: DiffResult, names: list[str]) -> list[str] | None:
    """The norms of ``names`` whose recorded call in the reference capture passed a residual (two
    tensor arguments), or None when the capture or its call records are not at hand."""
    path = diff.reference.get("path")
    if not path or not Path(path).exists():
        return None
    from .store.reader import open_capture

    try:
        with open_capture(path) as cap:
            specs = {name: cap.call_spec(name, 0) for name in names if name in cap.modules}
    except HwdiffError:
        return None
    if not specs or any(spec is None for spec in specs.values()):
        return None
    return [name for name, spec in specs.items() if sum(1 for a in spec.get("args", []) if "slot" in a) >= 2]


def sub_blocks(norm_names: list[str], outputs: list[LayerDiff]) -> dict[str, str | None]:
    """The module whose output carries each norm's noise first (:func:`hwdiff.structure.norm_specs_from_names`):
    the sub-block a pre-norm or the final norm feeds; None — the error is taken at the norm's own
    output — for post-norms (they normalise their sub-block's output), for q/k norms (the attention
    core is no module; its output is o_proj's input) and when the sub-block was not recorded."""
    from .structure import norm_specs_from_names

    specs = norm_specs_from_names([m.name for m in outputs], {}, norms=norm_names)
    return {spec.name: spec.observe[0] if spec.observe and spec.observe[1] == "output" and spec.observe[0] != spec.name
            else None for spec in specs}


def _local_error(module: LayerDiff) -> float:
    """A module's local (replayed) relative error; 0 when it has none (not replayed, or exact)."""
    return float(module.local.local_rel_l2 or 0.0) if module.local is not None else 0.0


def _norm_error(norm: LayerDiff, entry: NormMap, by_name: dict[str, LayerDiff], nested: dict[str, float]) -> NormError:
    output_rms = norm.metrics.ref_rms
    if not math.isfinite(output_rms):  # NaN: a diff made before hwdiff stored it
        raise HwdiffError(f"the diff has no reference output rms for {norm.name}: rerun hwdiff diff with this version")
    weight_rms = norm.weight_rms
    if weight_rms is None:
        raise HwdiffError(f"the diff has no weight for {norm.name}: diff captures that store norm weights")
    norm_local = float(norm.local.local_rel_l2)
    block = by_name.get(entry.accounts_for) if entry.accounts_for else None
    raw = _local_error(block) if block else 0.0
    block_local = math.sqrt(max(0.0, raw ** 2 - nested.get(entry.accounts_for, 0.0)))  # nested norms' share out
    reason = entry.reason or _untrusted(norm) or (_untrusted(block) if block else None)
    if reason:
        log.warning("%s: %s — no σ for this norm", norm.name, reason)
    return NormError(norm.name, norm_local, block_local, float(output_rms), float(weight_rms),
                     entry.observe if entry.observe in by_name else None, reason, entry.role, entry.accounts_for)


def _untrusted(module: LayerDiff) -> str | None:
    if module.local is None:
        return None
    local, total = module.local.local_rel_l2, module.metrics.rel_l2
    if not math.isfinite(total) or not math.isfinite(local):
        return None
    if local > LOCAL_OVER_TOTAL * total and local > 1e-6:
        return (f"local error {local:.3g} at {module.name} exceeds its total error {total:.3g} by more than "
                f"{LOCAL_OVER_TOTAL:g}x: the replay did not reproduce that module's inputs (a mask or state it "
                "could not rebuild)")
    return None


def _provenance(result: DiffResult, diff: Any) -> dict[str, Any]:
    return {"diff": str(diff) if isinstance(diff, (str, os.PathLike)) else "in memory",
            "reference": result.reference, "target": result.target, "golden": result.golden,
            "hwdiff_version": __version__}


# ------------------------------------------------------------------------------------------------
def with_rounding(calibration: Calibration, weights: dict[str, Any] | None, dtype: str) -> Calibration:
    """Add the per-stage rounding check (``weights``: {norm: stored weight values}); warns when
    late stages are mostly rounded away in ``dtype``."""
    from .rounding import CHANGED_WARNING, changed_fraction

    if not weights:
        note = "the norm weights are not at hand (reference capture not found): no per-stage rounding check"
        return replace(calibration, warnings=calibration.warnings + (note,))
    rows, warnings = [], list(calibration.warnings)
    values = calibration.schedule.values
    for stage, value in enumerate(values, start=1):
        changed = {l.name: changed_fraction(weights[l.name], value * l.multiplier, dtype)
                   for l in calibration.layers if l.multiplier > 0 and l.name in weights}
        if not changed:
            continue
        weakest = min(changed, key=changed.get)
        rows.append(StageRounding(stage, value, changed[weakest], statistics.median(changed.values()), weakest))
    late = [r for r in rows if r.min_changed < CHANGED_WARNING]
    if late:
        warnings.append(f"in {dtype}, stages {', '.join(str(r.stage) for r in late)} change fewer than half of some "
                        f"norm's weight elements (stage {late[-1].stage}: {late[-1].min_changed:.1%} of "
                        f"{late[-1].weakest}): the noise is mostly rounded away there. Drawing it in float32 on a clean "
                        "master copy (hwdiff's injector, apply_schedule) avoids accumulation, not this: it survives "
                        "only where the noisy forward reads float32 norm weights")
    return replace(calibration, rounding=tuple(rows), rounding_dtype=dtype, warnings=tuple(warnings))


def reference_weights(diff: DiffResult, layers: tuple[LayerSigma, ...]) -> dict[str, Any] | None:
    """The stored weights of ``layers`` from the diff's reference capture, or None when it is not at hand."""
    path = diff.reference.get("path")
    if not path or not Path(path).exists():  # a capture file, or a multi-rank capture's directory
        return None
    from .store.reader import open_capture

    try:
        with open_capture(path) as cap:
            weights = {l.name: cap.weight(l.name) for l in layers if l.name in cap.modules}
    except HwdiffError:
        return None
    return {name: w for name, w in weights.items() if w is not None} or None


# ------------------------------------------------------------------------------------------------
def format_calibration(calibration: Calibration) -> str:
    """The terminal summary: method, conversion, schedule vs QeRL's presets, σ per norm, checks."""
    s = calibration.schedule
    presets = "; ".join(f"{name} {a:g} -> {b:g}" for name, (a, b) in QERL_PRESETS.items())
    lines = [f"method: {calibration.method} ({METHOD_NOTE})", f"conversion: {calibration.conversion}",
             f"schedule: {s.kind}, {s.num_stages} stages, sigma {s.sigma_start:.3g} -> {s.sigma_end:.3g} "
             f"(sigma_start rule: {calibration.start_rule})", f"for comparison: {presets}", "",
             f"{'norm':<42} {'target err':>10} {'y rms':>7} {'sigma_end':>10} {'sigma_start':>11} {'mult':>6} {'law':>14}"
             + ("  verify (induced/target)" if calibration.verify else "")]
    for layer in calibration.layers:
        row = (f"{layer.name:<42} {layer.target_error:>10.3g} {layer.output_rms:>7.3f} {layer.sigma_end:>10.3g} "
               f"{layer.sigma_start:>11.3g} {layer.multiplier:>6.2f} {_law_text(layer):>14}")
        if calibration.verify and any(v.name == layer.name for v in calibration.verify.layers):
            check = calibration.verify.layer(layer.name)
            row += f"  {check.ratio:.2f} at {check.measured_at.rsplit('.', 2)[-2:][-1]}"
        lines.append(row)
    for name, reason in calibration.skipped.items():
        lines.append(f"{name:<42} skipped: {reason}")
    for name, reason in calibration.zero_sigma.items():
        lines.append(f"{name:<42} sigma 0: {reason}")
    if calibration.roles_from:
        lines.append(f"norm -> sub-block map: {calibration.roles_from}")
    if calibration.unattributed:
        lines.append(f"unattributed local error ({calibration.unattributed_fraction:.1%} of the sub-blocks' squared local "
                     "error; no norm's sigma carries it):")
        lines += [f"  {name:<40} {error:.3g}" for name, error in calibration.unattributed.items()]
    lines += _rounding_lines(calibration) + _verify_lines(calibration.verify) + format_policy(calibration.policy)
    if calibration.verify is not None and not calibration.verify.passed and calibration.conversion == "output-rms":
        lines.append("  the sub-blocks do not pass a relative error on unchanged here: --conversion measured measures "
                     "their gain on the model")
    if calibration.correlation_note:
        lines.append(f"\ncorrelation along depth: rho {calibration.rho:g} — {calibration.correlation_note}")
    lines += [f"warning: {w}" for w in calibration.warnings]
    return "\n".join(lines)


def _law_text(layer: LayerSigma) -> str:
    if layer.sigma_end == 0:
        return "-"
    return f"student_t({layer.df:.2f})" if layer.law == "student_t" and layer.df else layer.law


def _rounding_lines(calibration: Calibration) -> list[str]:
    from .rounding import CHANGED_WARNING

    if not calibration.rounding:
        return []
    lines = ["", f"weight elements changed per stage in {calibration.rounding_dtype} (min / median over norms):"]
    lines += [f"  stage {r.stage}: sigma {r.sigma:.3g}: {r.min_changed:.1%} / {r.median_changed:.1%}"
              + ("  <- mostly rounded away" if r.min_changed < CHANGED_WARNING else "") for r in calibration.rounding]
    return lines


def _verify_lines(result: VerifyResult | None) -> list[str]:
    if result is None:
        return []
    lo, hi = result.band
    verdict = "PASS" if result.passed else f"FAIL ({len(result.failed)} norm(s) outside)"
    ratios = [l.ratio for l in result.layers]
    errors = [l.ratio_se for l in result.layers if l.ratio_se is not None]
    draws = sorted(l.draws for l in result.layers)
    spread = (f"{min(draws)}-{max(draws)} draws per norm, standard error of each ratio at most {max(errors):.1%}"
              if errors else f"{result.seeds} seeds, standard error not estimated")
    lines = ["", f"verify: {verdict} — induced/target {min(ratios):.3g}-{max(ratios):.3g} over {len(ratios)} norms "
                 f"(band {lo:g}-{hi:g}) at the sub-block output; {spread}"]
    lines += [f"  {l.name}: {l.ratio:.3g}" + (f" ± {l.ratio * l.ratio_se:.2g}" if l.ratio_se is not None else "")
              for l in result.failed[:5]]
    if result.unreproduced:
        lines.append(f"verify: FAIL — sigma 0 or none at {', '.join(result.unreproduced)} while the sub-block it maps to "
                     "has local error")
    checked = [l for l in result.layers if l.law_induced is not None]
    if checked:
        lines.append(f"verify law: the noise recovered from the induced error fits the calibrated law at "
                     f"{len(checked) - len(result.law_mismatches)} of {len(checked)} norms"
                     + "".join(f"; {l.name}: {l.law} injected, {l.law_induced} fitted" for l in result.law_mismatches[:3]))
    return lines


def _fmt(stat: dict[str, Any], spec: str) -> str:
    if stat.get("value") is None:
        return stat.get("why", "no value")
    bounds = "" if stat.get("low") is None else f" [{stat['low']:{spec}}, {stat['high']:{spec}}]"
    return f"{stat['value']:{spec}}{bounds}"


def format_policy(check: PolicyCheck | None) -> list[str]:
    """The terminal lines of the check (none without one)."""
    if check is None:
        return []
    m = check.model
    lines = ["", f"policy check: all sigma_end at once, {check.draws} draws (seed {check.seed}), {check.prompts} "
                 f"prompts ({check.positions} positions), {m.get('dtype')} {m.get('attn_implementation')}; "
                 f"intervals {check.confidence:.0%} bootstrap",
             f"  {'':22}{'noise (all norms)':32}{'hardware pair':16}noise / hardware"]
    for label, stat, spec in (("mean |Δlogp| (nats)", "mean_abs", ".4g"), ("K3 KL", "k3_kl", ".3g"),
                              ("top-1 agreement", "top1_agreement", ".4f")):
        ratio = _fmt(check.ratio[stat], ".3g") if stat in check.ratio else ""
        lines.append(f"  {label:22}{_fmt(check.emulated[stat], spec):32}{check.hardware[stat]:<16{spec}}{ratio}")
    return lines


def policy_sentence(check: PolicyCheck) -> str:
    """One sentence for the report."""
    r, h, e = check.ratio, check.hardware, check.emulated
    return (f"Policy check (all σ_end at once, {check.draws} draws, {check.positions} positions): mean |Δlogp| "
            f"{_fmt(e['mean_abs'], '.3g')} under the noise against {h['mean_abs']:.3g} on the hardware pair, ratio "
            f"{_fmt(r['mean_abs'], '.3g')}; K3 KL {_fmt(e['k3_kl'], '.3g')} against {h['k3_kl']:.3g}, ratio "
            f"{_fmt(r['k3_kl'], '.3g')}; top-1 agreement {_fmt(e['top1_agreement'], '.4f')} against "
            f"{h['top1_agreement']:.4f} ({check.confidence:.0%} bootstrap intervals).")
