"""Which slots of two captures are compared: matched by qualified module name + call index.

Never by a global op counter: a kernel path that inserts an extra op must not shift every later
pair. Modules or calls present on one side only, and shape mismatches, are listed, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CaptureFormatError, HwdiffError
from ..store.reader import Capture


@dataclass(frozen=True)
class Pair:
    """One slot compared: module ``name``, ``call`` and ``slot`` ("output" or "input")."""

    name: str
    call: int
    slot: str
    kind: str
    shape: tuple[int, ...]
    ref_dtype: str
    target_dtype: str
    alias_of: str | None  # both sides link this slot to the same stored slot: reuse its numbers


@dataclass(frozen=True)
class Unmatched:
    """A slot that could not be compared, and why."""

    name: str
    call: int
    slot: str
    reason: str


def check_comparable(
    reference: Capture, target: Capture, *, allow_model_mismatch: bool = False, role: str = "target"
) -> None:
    """Refuse captures of different inputs, of another model (unless allowed), or of stats mode."""
    if reference.is_generation != target.is_generation:
        generation = reference if reference.is_generation else target
        raise HwdiffError(
            f"{generation.path} is a greedy generation file (hwdiff generate) and the other a layer "
            "capture: compare two captures or two generation files"
        )
    for cap in (reference, target):
        if cap.mode == "stats":
            raise HwdiffError(
                f"{cap.path} is a 'stats' capture; diff needs 'full' or 'sample' captures"
            )
    if reference.meta["inputs_fingerprint"] != target.meta["inputs_fingerprint"]:
        raise HwdiffError(
            f"the captures ran different inputs: {reference.path} has {reference.meta['inputs_fingerprint'][:19]}… "
            f"({reference.meta.get('inputs_source')}, {reference.input_ids.shape[0]}x{reference.input_ids.shape[1]}), "
            f"{target.path} has {target.meta['inputs_fingerprint'][:19]}… ({target.meta.get('inputs_source')}, "
            f"{target.input_ids.shape[0]}x{target.input_ids.shape[1]}); capture both with the same --inputs, "
            "--limit and --max-tokens"
        )
    if (
        reference.meta.get("model_fingerprint") != target.meta.get("model_fingerprint")
        and not allow_model_mismatch
    ):
        raise HwdiffError(
            f"the {role} capture is of another model ({target.meta.get('model_spec')}, "
            f"{str(target.meta.get('model_fingerprint'))[:19]}…) than the reference ({reference.meta.get('model_spec')}, "
            f"{str(reference.meta.get('model_fingerprint'))[:19]}…); pass --allow-model-mismatch to compare anyway"
        )
    if reference.mode != target.mode:
        raise HwdiffError(
            f"cannot compare a '{reference.mode}' capture with a '{target.mode}' capture"
        )
    if reference.mode == "sample" and not np.array_equal(
        _sample_positions(reference), _sample_positions(target)
    ):
        raise HwdiffError(
            "the sample captures kept different token positions; capture both with the same --seed and --tokens"
        )


def _sample_positions(capture: Capture) -> np.ndarray:
    positions = capture.sample_positions
    if positions is None:
        raise CaptureFormatError(
            f"{capture.path} is a sample capture without its token positions (/inputs/sample_positions)"
        )
    return positions


def align(reference: Capture, target: Capture) -> tuple[list[Pair], list[Unmatched]]:
    """The slot pairs to compare, in the reference's forward order, and what could not be paired
    (modules never called or not recordable on a side, as each capture lists them, included)."""
    pairs, unmatched = [], absent(reference, "reference") + absent(target, "target")
    for name, info in reference.modules.items():
        other = target.modules.get(name)
        if other is None:
            unmatched += [
                Unmatched(name, call, "output", "only in the reference")
                for call in range(info.calls)
            ]
            continue
        for call in range(max(info.calls, other.calls)):
            stored = (
                call < info.calls and reference.has_call(name, call),
                call < other.calls and target.has_call(name, call),
            )
            if not any(stored):
                unmatched.append(
                    Unmatched(
                        name, call, "output", "called in neither capture (an expert never chosen)"
                    )
                )
                continue
            if not all(stored):
                side = "reference" if stored[0] else "target"
                unmatched.append(Unmatched(name, call, "output", f"call {call} only in the {side}"))
                continue
            for slot in info.slots:
                if slot not in other.slots:
                    if slot == "output":
                        unmatched.append(Unmatched(name, call, slot, "no output in the target"))
                    continue
                pair = _pair(reference, target, name, call, slot, info.kind)
                if isinstance(pair, Unmatched):
                    unmatched.append(pair)
                else:
                    pairs.append(pair)
    unmatched += [
        Unmatched(name, call, "output", "only in the target")
        for name, info in target.modules.items()
        if name not in reference.modules
        for call in range(info.calls)
    ]
    return pairs, unmatched


def absent(capture: Capture, role: str) -> list[Unmatched]:
    """What ``capture`` lists as never called or not recorded (its ``never_called`` / ``unrecorded``)."""
    import json

    never = json.loads(str(capture.meta.get("never_called") or "[]"))
    unrecorded = json.loads(str(capture.meta.get("unrecorded") or "{}"))
    mapped_out = json.loads(
        str(capture.meta.get("mapped_out") or "{}")
    )  # a layout mapping's drop rules
    return (
        [Unmatched(name, 0, "output", f"never called in the {role}") for name in never]
        + [
            Unmatched(name, 0, "output", f"not recorded in the {role}: {why}")
            for name, why in unrecorded.items()
        ]
        + [
            Unmatched(name, 0, "output", f"only in the {role} (not compared: {why})")
            for name, why in mapped_out.items()
        ]
    )


def _pair(
    reference: Capture, target: Capture, name: str, call: int, slot: str, kind: str
) -> Pair | Unmatched:
    ref_shape, ref_dtype = reference.slot_info(name, call, slot)
    tgt_shape, tgt_dtype = target.slot_info(name, call, slot)
    if ref_shape != tgt_shape:
        return Unmatched(
            name, call, slot, f"shape {ref_shape} in the reference, {tgt_shape} in the target"
        )
    ref_alias, tgt_alias = reference.alias_of(name, call, slot), target.alias_of(name, call, slot)
    return Pair(
        name,
        call,
        slot,
        kind,
        ref_shape,
        ref_dtype,
        tgt_dtype,
        ref_alias if ref_alias == tgt_alias else None,
    )
