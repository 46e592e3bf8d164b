"""Where greedy generations split: compare two generation files (:mod:`hwdiff.capturing.generate`).

Per prompt, the split is the first generated position j where the two continuations differ (or
where one ended and the other went on). Before it both sides saw the same context, so the
log-probs of the shared prefix are directly comparable; at the split, |Δlogp| is that of the
reference's token: |logp_ref(a) − logp_target(a)|, read from the target's top-k (NaN when the
token is not in the target's top-k).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..common import outputs
from ..common.numbers import json_number as _num
from ..errors import HwdiffError
from ..store.reader import Capture, Generation, open_capture
from .align import check_comparable


@dataclass(frozen=True)
class PromptSplit:
    """One prompt: ``split`` is the first differing generated position, None when identical."""

    prompt: int
    split: int | None
    ref_token: int | None
    target_token: int | None
    abs_delta_at_split: (
        float  # |logp_ref(a) - logp_target(a)| of the reference's token a (NaN: not in top-k)
    )
    ref_margin: (
        float  # logp_ref(a) - logp_ref(b) at the split (NaN: b not in the reference's top-k)
    )
    prefix_mean_abs_delta: float  # mean |Δlogp| of the shared generated prefix (NaN when empty)


@dataclass(frozen=True)
class GenerationDiff:
    reference: dict[str, Any]
    target: dict[str, Any]
    max_new_tokens: int
    prompts: tuple[PromptSplit, ...]

    @property
    def splits(self) -> list[int]:
        return [p.split for p in self.prompts if p.split is not None]

    @property
    def identical(self) -> int:
        return sum(p.split is None for p in self.prompts)

    def split_histogram(self) -> list[int]:
        """Counts of split positions 0 .. max_new_tokens − 1 (identical continuations not counted)."""
        return np.bincount(
            np.array(self.splits, dtype=np.int64), minlength=self.max_new_tokens
        ).tolist()


def diff_generations(
    reference: str | os.PathLike | Capture,
    target: str | os.PathLike | Capture,
    *,
    json_path: str | os.PathLike | None = None,
    csv_path: str | os.PathLike | None = None,
    allow_model_mismatch: bool = False,
) -> GenerationDiff:
    """Compare two generation files of the same prompts and settings; writes JSON / CSV when asked
    (refused before anything is read when an output is an input or both outputs are one file)."""
    outputs.check_outputs((reference, target), (json_path, csv_path))
    with contextlib.ExitStack() as stack:
        ref, tgt = (
            p if isinstance(p, Capture) else stack.enter_context(open_capture(p))
            for p in (reference, target)
        )
        for cap in (ref, tgt):
            if not cap.is_generation:
                raise HwdiffError(
                    f"{cap.path} is a layer capture, not a generation file: diff two captures or two "
                    "generation files (hwdiff generate)"
                )
        _check_comparable(ref, tgt, allow_model_mismatch)
        a, b = ref.generation(), tgt.generation()
        result = GenerationDiff(
            _meta(ref),
            _meta(tgt),
            int(a.attrs["max_new_tokens"]),
            tuple(_split(i, a, b) for i in range(len(a.lengths))),
        )
    if json_path is not None:
        _write(Path(json_path), lambda path: path.write_text(json.dumps(summary(result), indent=1)))
    if csv_path is not None:
        _write(Path(csv_path), lambda path: _write_csv(result, path))
    return result


def is_generation_pair(
    reference: str | os.PathLike, target: str | os.PathLike, **layer_only: Any
) -> bool:
    """True when both files are generation files; raises when one is and the other is not, or when
    options that only a layer diff has (``layer_only``: name → value, e.g. ``golden``) are set."""
    kinds = []
    for path in (reference, target):
        with open_capture(path) as cap:
            kinds.append(cap.is_generation)
    if not any(kinds):
        return False
    if not all(kinds):
        raise HwdiffError(
            f"{reference if kinds[0] else target} is a greedy generation file (hwdiff generate) and "
            "the other a layer capture: compare two captures or two generation files"
        )
    given = [name for name, value in layer_only.items() if value]
    if given:
        raise HwdiffError(
            f"--{given[0]} does not apply to generation files (a generation diff writes --json and --csv)"
        )
    return True


def _check_comparable(ref: Capture, tgt: Capture, allow_model_mismatch: bool) -> None:
    """As for captures (inputs, model), and the same generation settings."""
    check_comparable(ref, tgt, allow_model_mismatch=allow_model_mismatch)
    a, b = ref.generation().attrs, tgt.generation().attrs
    for key in ("max_new_tokens", "strategy"):
        if a.get(key) != b.get(key):
            raise HwdiffError(
                f"the generation files differ in {key}: {a.get(key)} in {ref.path}, {b.get(key)} in "
                f"{tgt.path}; generate both with the same settings"
            )


def _split(i: int, a: Generation, b: Generation) -> PromptSplit:
    na, nb = int(a.lengths[i]), int(b.lengths[i])
    n = min(na, nb)
    differ = np.flatnonzero(a.ids[i, :n] != b.ids[i, :n])
    split = int(differ[0]) if differ.size else (n if na != nb else None)
    end = n if split is None else split
    lp_a, lp_b = a.logprobs.next_token[i], b.logprobs.next_token[i]
    prefix = float(np.mean(np.abs(lp_a[:end] - lp_b[:end]))) if end else math.nan
    if split is None or split >= n:
        return PromptSplit(i, split, None, None, math.nan, math.nan, prefix)
    tok_a, tok_b = int(a.ids[i, split]), int(b.ids[i, split])
    target_of_a = _lookup(b, i, split, tok_a)
    return PromptSplit(
        i,
        split,
        tok_a,
        tok_b,
        abs(float(lp_a[split]) - target_of_a),
        float(lp_a[split]) - _lookup(a, i, split, tok_b),
        prefix,
    )


def _lookup(gen: Generation, i: int, j: int, token: int) -> float:
    """log-prob of ``token`` at generated position j of prompt i, from the stored top-k (NaN if absent)."""
    where = np.flatnonzero(gen.logprobs.topk_ids[i, j] == token)
    return float(gen.logprobs.topk_logprobs[i, j, where[0]]) if where.size else math.nan


def _meta(cap: Capture) -> dict[str, Any]:
    keys = (
        "device",
        "device_name",
        "dtype",
        "attn_implementation",
        "model_spec",
        "model_fingerprint",
        "inputs_fingerprint",
        "torch_version",
        "hwdiff_version",
    )
    return {"path": str(cap.path), **{k: cap.meta[k] for k in keys if k in cap.meta}}


def summary(result: GenerationDiff) -> dict[str, Any]:
    """JSON summary (schema ``hwdiff/generation-diff/1``)."""
    splits = result.splits
    return {
        "schema": "hwdiff/generation-diff/1",
        "reference": result.reference,
        "target": result.target,
        "max_new_tokens": result.max_new_tokens,
        "prompts": len(result.prompts),
        "identical": result.identical,
        "split_positions": {
            "histogram": result.split_histogram(),
            "median": float(np.median(splits)) if splits else None,
            "min": min(splits) if splits else None,
        },
        "per_prompt": [
            {
                "prompt": p.prompt,
                "split": p.split,
                "ref_token": p.ref_token,
                "target_token": p.target_token,
                "abs_delta_at_split": _num(p.abs_delta_at_split),
                "ref_margin": _num(p.ref_margin),
                "prefix_mean_abs_delta": _num(p.prefix_mean_abs_delta),
            }
            for p in result.prompts
        ],
    }


def _write_csv(result: GenerationDiff, path: Path) -> None:
    rows = summary(result)["per_prompt"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["prompt"])
        writer.writeheader()
        writer.writerows(rows)


def _write(path: Path, write: Any) -> None:
    with outputs.atomic_output(path) as temp:
        write(temp)


def format_generation_diff(result: GenerationDiff) -> str:
    """The terminal table: one row per prompt, then the distribution of split positions."""
    ref, tgt = result.reference, result.target
    lines = [
        f"reference  {ref['path']}  ({ref.get('device')}, {ref.get('dtype')}, {ref.get('attn_implementation')})",
        f"target     {tgt['path']}  ({tgt.get('device')}, {tgt.get('dtype')}, {tgt.get('attn_implementation')})",
        f"greedy generations of {len(result.prompts)} prompts, {result.max_new_tokens} new tokens: "
        f"{result.identical} identical, {len(result.splits)} split",
        "",
        "prompt  split  ref tok  tgt tok  |Δlogp| at split  ref margin  prefix mean |Δlogp|",
    ]
    for p in result.prompts:
        split = "-" if p.split is None else str(p.split)
        lines.append(
            f"{p.prompt:<6}  {split:<5}  {_tok(p.ref_token):<7}  {_tok(p.target_token):<7}  "
            f"{p.abs_delta_at_split:<16.3g}  {p.ref_margin:<10.3g}  {p.prefix_mean_abs_delta:.3g}"
        )
    hist = result.split_histogram()
    lines.append("")
    lines.append(
        "split positions: " + (", ".join(f"{j}: {c}" for j, c in enumerate(hist) if c) or "none")
    )
    return "\n".join(lines)


def _tok(token: int | None) -> str:
    return "-" if token is None else str(token)
