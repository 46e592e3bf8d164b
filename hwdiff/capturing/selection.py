"""Which modules a capture records: by name pattern and by kind, each named with its kind (sub-
blocks by what they hold)."""

from __future__ import annotations

import re
from typing import Iterable

import torch

from ..errors import SelectionError
from ..structure import (
    KINDS,
    module_kind,
)
from .tensors import _fingerprint, _first_input, _token_major, _version, first_tensor  # noqa: F401

DEFAULT_KINDS = tuple(kind for kind in KINDS if kind != "other")


def select_modules(
    model: torch.nn.Module,
    modules: str | Iterable[str] | None = None,
    kinds: str | Iterable[str] | None = None,
    sub_blocks: dict[str, str] | None = None,
) -> list[tuple[str, torch.nn.Module, str]]:
    """``(name, module, kind)`` of the modules to record, in registration order.

    ``modules``: regexes searched in qualified names (any kind unless ``kinds`` is given too);
    ``kinds``: kind names from :data:`KINDS`. Neither → every kind but ``other``. ``sub_blocks``:
    kinds measured by :func:`hwdiff.structure.trace_dataflow` (a mamba mixer, an MoE block of any
    class) for modules the class rule calls ``other``. A regex or kind that matches nothing raises
    :class:`SelectionError`.
    """
    patterns = [modules] if isinstance(modules, str) else list(modules or [])
    wanted = (
        [kinds] if isinstance(kinds, str) else list(kinds or ([] if patterns else DEFAULT_KINDS))
    )
    unknown = sorted(set(wanted) - set(KINDS))
    if unknown:
        raise SelectionError(
            f"unknown module kind(s) {', '.join(unknown)}: expected {', '.join(KINDS)}"
        )
    compiled = [_compile(pattern) for pattern in patterns]
    named = [
        (name, module, _kind(name, module, sub_blocks or {}))
        for name, module in model.named_modules()
        if name
    ]
    chosen = [
        item
        for item in named
        if (not wanted or item[2] in wanted)
        and (not compiled or any(p.search(item[0]) for p in compiled))
    ]
    for pattern in compiled:
        if not any(pattern.search(name) for name, _, kind in chosen):
            raise SelectionError(
                f"module regex {pattern.pattern!r} matches no module{_kinds_note(wanted, patterns)}; "
                f"module names look like {named[min(2, len(named) - 1)][0]!r}"
            )
    if not chosen:
        raise SelectionError(f"no module of kind {', '.join(wanted)} in {type(model).__name__}")
    return chosen


def _kind(name: str, module: torch.nn.Module, sub_blocks: dict[str, str]) -> str:
    kind = module_kind(name, module)
    return sub_blocks.get(name, kind) if kind == "other" else kind


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise SelectionError(f"invalid module regex {pattern!r}: {exc}") from exc


def _kinds_note(kinds: list[str], patterns: list[str]) -> str:
    return f" of kind {', '.join(kinds)}" if kinds and patterns else ""
