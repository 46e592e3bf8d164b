"""``hwdiff inspect``: a capture's metadata and one table row per module, as text."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from .ranks import capture_file
from .reader import Capture, open_capture

_HEADLINE = (
    "device",
    "device_name",
    "dtype",
    "mode",
    "torch_version",
    "model_spec",
    "model_fingerprint",
    "attn_implementation",
    "inputs_fingerprint",
    "inputs_source",
    "hwdiff_version",
    "created_utc",
)
_SKIP = {"schema", "complete", "model_config", "dataflow", *_HEADLINE}


def inspect_capture(path: str | os.PathLike, *, allow_incomplete: bool = False) -> str:
    """The metadata and the module table of the capture at ``path``, ready to print."""
    with open_capture(path, allow_incomplete=allow_incomplete) as cap:
        return "\n".join([*_header(cap), "", *_module_table(cap)])


def _header(cap: Capture) -> list[str]:
    meta = cap.meta
    state = "complete" if meta.get("complete") else "INCOMPLETE"
    files = (
        [
            p for p in cap.path.iterdir() if p.is_file() and capture_file(p.name)
        ]  # a rank directory's own files
        if cap.path.is_dir()
        else [cap.path]
    )
    size = sum(os.path.getsize(p) for p in files) / 2**20
    ids = cap.input_ids
    lines = [f"capture  {cap.path}  ({state}, {meta['schema']}, {size:.1f} MiB)"]
    lines += [f"{key:<20} {meta[key]}" for key in _HEADLINE if key in meta]
    lines.append(
        f"{'inputs':<20} {ids.shape[0]} sequences x {ids.shape[1]} tokens "
        f"({int(cap.attention_mask.sum())} real)"
    )
    lines += [f"{key:<20} {_fmt(meta[key])}" for key in sorted(meta) if key not in _SKIP]
    lines.append(f"{'dataflow':<20} {_dataflow(meta.get('dataflow'))}")
    kinds = Counter(info.kind for info in cap.modules.values())
    lines.append(
        f"{'modules':<20} {len(cap.modules)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})"
    )
    return lines


def _dataflow(record: Any) -> str:
    """One line for the data-flow record (docs/model-families.md): norms by role, sub-blocks by kind."""
    if not record:
        return (
            "not recorded (a capture made before hwdiff measured it: calibrate uses the name rule)"
        )
    try:
        data = json.loads(record) if isinstance(record, str) else dict(record)
        roles = Counter(norm["role"] for norm in data.get("norms", []))
        blocks = Counter(data.get("sub_blocks", {}).values())
    except (TypeError, ValueError, KeyError):
        return "unreadable"
    refused = [n["name"] for n in data.get("norms", []) if n.get("reason")]
    text = (
        f"{sum(roles.values())} norms ({', '.join(f'{r} {n}' for r, n in sorted(roles.items()))}); sub-blocks "
        f"{', '.join(f'{k} {n}' for k, n in sorted(blocks.items())) or 'none'}"
    )
    return text + (f"; {len(refused)} unresolved, first {refused[0]}" if refused else "")


def _module_table(cap: Capture) -> list[str]:
    rows = [("#", "name", "kind", "shape", "dtype", "calls", "note")]
    for info in cap.modules.values():
        shape = "x".join(map(str, info.shape)) if info.shape else "-"
        rows.append(
            (
                str(info.order),
                info.name,
                info.kind,
                shape,
                info.dtype or "-",
                str(info.calls),
                _note(cap, info),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    ]


def _note(cap: Capture, info) -> str:
    notes = []
    if info.alias_of:
        notes.append(f"same tensor as {info.alias_of.rsplit('/', 2)[0]}")
    if info.has_weight:
        notes.append("weight stored")
    if "input" in info.slots:
        notes.append("input stored")
    if cap.mode != "stats" and info.shape and not info.alias_of:
        nan, inf = cap.nonfinite(info.name)
        if nan or inf:
            notes.append(f"NaN {nan} Inf {inf}")
    return "; ".join(notes)


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
