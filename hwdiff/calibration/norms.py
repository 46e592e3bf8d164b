"""What a diff says about each norm: its local error, the sub-block it feeds (by data flow, else by
name), and which local error no norm's sigma carries."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HwdiffError
from ..structure import layer_index

if TYPE_CHECKING:
    from ..compare.results import DiffResult, LayerDiff
log = logging.getLogger(__name__)

LOCAL_OVER_TOTAL = (
    2.0  # a local error this many times the total error is not a measurement to trust
)


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


def norm_errors(diff: DiffResult) -> list[NormError]:
    """Local errors, output rms and sub-block of every RMSNorm output in a diff."""
    outputs = list(diff.outputs)
    norms = [m for m in outputs if m.kind == "rmsnorm"]
    if not norms:
        others = sorted({m.kind for m in outputs})
        layernorms = [m.name for m in outputs if m.kind == "layernorm"]
        if layernorms:
            from ..structure import aqn_needs_rmsnorm

            raise HwdiffError("the diff has no RMSNorm outputs; " + aqn_needs_rmsnorm(layernorms))
        raise HwdiffError(
            f"the diff has no RMSNorm outputs (kinds present: {', '.join(others) or 'none'}): capture "
            "with the default module selection or --kinds rmsnorm,attention,mlp,head"
        )
    missing = [m.name for m in norms if m.local is None]
    if missing and len(missing) < len(
        norms
    ):  # some norms were not replayed: those are named, not refused whole
        log.warning("no local error for %s: no σ for them", ", ".join(missing))
        norms = [m for m in norms if m.local is not None]
    elif missing:
        raise HwdiffError(
            f"calibrate needs local errors and the diff has none for {missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}: replay the reference on the "
            "target (hwdiff replay REF.h5 --device TARGET -o local.h5) and diff with --local local.h5 "
            "(the divergence-increment estimate was measured 1.1-21x off, so it is not offered)"
        )
    by_name = {m.name: m for m in outputs}
    mapping, flow, _ = norm_map(diff)
    nested = _nested_power(flow, by_name)
    found = [_norm_error(m, mapping[m.name], by_name, nested) for m in norms]
    kept = {m.name for m in norms}
    absent = [
        NormError(
            name,
            0.0,
            0.0,
            0.0,
            0.0,
            None,
            entry.reason
            or (
                "no local error in the diff (the replay did not run it: see its log)"
                if name in by_name
                else "not in the diff: the capture did not record it (see the capture's 'unrecorded' list)"
            ),
            entry.role,
            entry.accounts_for,
        )
        for name, entry in mapping.items()
        if name not in kept
    ]
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
    from ..structure import DataFlow

    outputs = list(diff.outputs)
    flow = DataFlow.from_json(diff.reference.get("dataflow"))
    if flow is None:
        norms = [m.name for m in outputs if m.kind == "rmsnorm"]
        blocks = sub_blocks(norms, outputs)
        return (
            {n: NormMap("", blocks[n], blocks[n]) for n in norms},
            None,
            "name rule (the reference capture has no data-flow record: captured before hwdiff measured it)",
        )
    present = {m.name for m in outputs}
    carried_by_pre = {r.sub_block for r in flow.norms if r.role in ("pre", "final")}
    mapping = {}
    for role in flow.norms:
        block = role.sub_block
        if role.role in ("pre", "final"):
            entry = NormMap(role.role, block, block)
        elif (
            role.role == "post"
        ):  # its producer's error, unless a pre-norm already carries it (Gemma 2/3)
            entry = NormMap("post", None, None if block in carried_by_pre else block)
        elif role.role == "nested":
            entry = NormMap("nested", None, None)
        else:
            entry = NormMap(
                role.role,
                None,
                None,
                role.reason or role.role,
                tuple(c for c in role.consumers if c in flow.sub_blocks),
            )
        if entry.accounts_for and entry.accounts_for not in present and entry.reason is None:
            entry = replace(
                entry,
                reason=f"its sub-block {entry.accounts_for} ({flow.sub_blocks.get(entry.accounts_for)}) "
                "is not in the diff: capture it (the default kinds record it)",
            )
        mapping[role.name] = entry
    return mapping, flow, "data flow measured on one traced forward of the reference model"


def _nested_power(flow: Any, by_name: dict[str, LayerDiff]) -> dict[str, float]:
    """Per sub-block, the squared local errors of the norms nested inside it: their share of the
    sub-block's local error, which their own σ carries (not counted again for the sub-block's norm)."""
    power: dict[str, float] = {}
    for role in flow.norms if flow is not None else ():
        if role.role == "nested" and role.name in by_name:
            error = _local_error(by_name[role.name])
            power[role.sub_block] = power.get(role.sub_block, 0.0) + error**2
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
    zero = {
        e.name: _zero_reason(e) for e in errors if e.skip_reason is None and sigmas.get(e.name) == 0
    }
    if flow is None:
        return Attribution(zero, {}, 0.0, (), roles_from, [])
    nested = _nested_power(flow, by_name)
    carried = {
        e.accounts_for
        for e in errors
        if e.skip_reason is None and sigmas.get(e.name, 0) > 0 and e.accounts_for
    }
    unattributed, total = {}, 0.0
    absent = [block for block in flow.sub_blocks if block not in by_name]
    warnings = (
        [
            f"{len(absent)} sub-block(s) not in the diff, their local error unknown: {', '.join(absent[:3])}"
            + (" …" if len(absent) > 3 else "")
        ]
        if absent
        else []
    )
    for block in flow.sub_blocks:
        if block not in by_name:
            continue
        raw = _local_error(by_name[block])
        total += raw**2
        left = math.sqrt(max(0.0, raw**2 - nested.get(block, 0.0)))
        if left > 0 and block not in carried:
            unattributed[block] = left
    fraction = sum(v * v for v in unattributed.values()) / total if total else 0.0
    unreproduced = tuple(
        e.name
        for e in errors
        if (e.skip_reason is not None or sigmas.get(e.name) == 0)
        and ({e.accounts_for} | set(mapping.get(e.name, NormMap("", None, None)).consumers))
        & set(unattributed)
    )
    return Attribution(zero, unattributed, fraction, unreproduced, roles_from, warnings)


def _zero_reason(error: NormError) -> str:
    where = (
        f" nor in {error.accounts_for}, the sub-block its sigma carries"
        if error.accounts_for
        else ""
    )
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
    reason = (
        "feeds the LM head, which is not in the diff (a vLLM-layout capture: vLLM computes the logits outside the "
        "model's forward; or a capture without the head kind): its sub-block error is unknown, so it is not "
        "calibrated — calibrate it from a Hugging Face-layout capture that records lm_head"
    )
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
    which = (
        "norms that vLLM calls as a fused add+norm (norm(x, residual): in its decoder layers every norm but the "
        "first layer's input_layernorm, and the final norm)"
        if fused is None
        else f"{len(fused)} norm(s) called as a fused add+norm norm(x, residual) ({', '.join(fused[:3])}"
        f"{', …' if len(fused) > 3 else ''})"
    )
    return [
        f"vLLM layout: {which} are replayed with the residual add inside, so their local error includes the "
        "rounding of that add and of both its inputs, which a Hugging Face-layout replay attributes to no module: "
        "their sigma comes out above an HF-layout calibration of the same pair (bf16 vs fp32 on the stand-in: up to "
        "6% with the in-place CUDA path, within 3% with the native path)"
    ]


def fused_add_norms(diff: DiffResult, names: list[str]) -> list[str] | None:
    """The norms of ``names`` whose recorded call in the reference capture passed a residual (two
    tensor arguments), or None when the capture or its call records are not at hand."""
    path = diff.reference.get("path")
    if not path or not Path(path).exists():
        return None
    from ..store.reader import open_capture

    try:
        with open_capture(path) as cap:
            specs = {name: cap.call_spec(name, 0) for name in names if name in cap.modules}
    except HwdiffError:
        return None
    recorded = {name: spec for name, spec in specs.items() if spec is not None}
    if not specs or len(recorded) != len(specs):
        return None
    return [
        name
        for name, spec in recorded.items()
        if sum(1 for a in spec.get("args", []) if "slot" in a) >= 2
    ]


def sub_blocks(norm_names: list[str], outputs: list[LayerDiff]) -> dict[str, str | None]:
    """The module whose output carries each norm's noise first (:func:`hwdiff.structure.norm_specs_from_names`):
    the sub-block a pre-norm or the final norm feeds; None — the error is taken at the norm's own
    output — for post-norms (they normalise their sub-block's output), for q/k norms (the attention
    core is no module; its output is o_proj's input) and when the sub-block was not recorded."""
    from ..structure import norm_specs_from_names

    specs = norm_specs_from_names([m.name for m in outputs], {}, norms=norm_names)
    return {
        spec.name: spec.observe[0]
        if spec.observe and spec.observe[1] == "output" and spec.observe[0] != spec.name
        else None
        for spec in specs
    }


def _local_error(module: LayerDiff) -> float:
    """A module's local (replayed) relative error; 0 when it has none (not replayed, or exact)."""
    return float(module.local.local_rel_l2 or 0.0) if module.local is not None else 0.0


def _norm_error(
    norm: LayerDiff, entry: NormMap, by_name: dict[str, LayerDiff], nested: dict[str, float]
) -> NormError:
    output_rms = norm.metrics.ref_rms
    if not math.isfinite(output_rms):  # NaN: a diff made before hwdiff stored it
        raise HwdiffError(
            f"the diff has no reference output rms for {norm.name}: rerun hwdiff diff with this version"
        )
    weight_rms = norm.weight_rms
    if weight_rms is None:
        raise HwdiffError(
            f"the diff has no weight for {norm.name}: diff captures that store norm weights"
        )
    assert norm.local is not None  # norm_errors keeps only the norms with a local error
    norm_local = float(norm.local.local_rel_l2)
    block = by_name.get(entry.accounts_for) if entry.accounts_for else None
    raw = _local_error(block) if block else 0.0
    block_local = math.sqrt(
        max(0.0, raw**2 - (nested.get(entry.accounts_for, 0.0) if entry.accounts_for else 0.0))
    )  # nested norms' share out
    reason = entry.reason or _untrusted(norm) or (_untrusted(block) if block else None)
    if reason:
        log.warning("%s: %s — no σ for this norm", norm.name, reason)
    return NormError(
        norm.name,
        norm_local,
        block_local,
        float(output_rms),
        float(weight_rms),
        entry.observe if entry.observe in by_name else None,
        reason,
        entry.role,
        entry.accounts_for,
    )


def _untrusted(module: LayerDiff) -> str | None:
    if module.local is None:
        return None
    local, total = module.local.local_rel_l2, module.metrics.rel_l2
    if not math.isfinite(total) or not math.isfinite(local):
        return None
    if local > LOCAL_OVER_TOTAL * total and local > 1e-6:
        return (
            f"local error {local:.3g} at {module.name} exceeds its total error {total:.3g} by more than "
            f"{LOCAL_OVER_TOTAL:g}x: the replay did not reproduce that module's inputs (a mask or state it "
            "could not rebuild)"
        )
    return None
