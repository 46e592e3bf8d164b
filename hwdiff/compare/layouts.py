"""Layout mappings: compare a capture of one module layout (vLLM's fused ``qkv_proj`` /
``gate_up_proj``) with another (Hugging Face's ``q_proj`` / ``k_proj`` / ``v_proj``, ``gate_proj`` /
``up_proj``).

A mapping is a list of rules applied to the module names of a capture, which is then read through a
view (:class:`MappedCapture`) that the diff uses like any capture:

- ``fused``: a module whose output is several modules' outputs concatenated along the last axis
  (``{prefix}.self_attn.qkv_proj``) is read as those modules (``into``), each its slice of the last
  axis; ``sizes`` are integers or the symbols ``q`` (num_attention_heads × head_dim), ``kv``
  (num_key_value_heads × head_dim) and ``intermediate`` (intermediate_size), read from the
  capture's ``model_config`` root attribute. Their sum must be the fused width, else the mapping is
  refused. The parts' inputs are the fused module's input (the same tensor).
- ``rename``: ``{prefix}.a`` is read as ``to``.
- ``drop``: a module (optionally only of a class, a regex on the class name) that has a namesake on
  the other side computing something else (vLLM's ``mlp.act_fn``, ``SiluAndMul``, outputs
  silu(gate)·up; HF's outputs silu(gate)) is listed with ``reason``, never compared.

``{name}`` in a pattern matches any run of characters (dots included). A mapping is the built-in
``vllm`` (:data:`BUILTIN`) or a YAML file ``{name: ..., rules: [...]}`` of the same rules. Modules
on one side only are listed by the diff, as always; the mapping used is stored in the diff's metadata
(``layout_map``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import HwdiffError
from ..store.reader import Capture, ModuleInfo

BUILTIN: dict[str, dict[str, Any]] = {
    "vllm": {
        "name": "vllm",
        "rules": [
            {
                "fused": "{prefix}.qkv_proj",
                "into": ["{prefix}.q_proj", "{prefix}.k_proj", "{prefix}.v_proj"],
                "sizes": ["q", "kv", "kv"],
            },
            {
                "fused": "{prefix}.gate_up_proj",
                "into": ["{prefix}.gate_proj", "{prefix}.up_proj"],
                "sizes": ["intermediate", "intermediate"],
            },
            {
                "drop": "{prefix}.act_fn",
                "class": r".*AndMul.*",
                "reason": "vLLM's fused activation outputs act(gate)·up (down_proj's input); HF's act_fn outputs act(gate)",
            },
        ],
    },
}


@dataclass(frozen=True)
class Rule:
    """One mapping rule (see the module docstring)."""

    kind: str  # fused, rename or drop
    pattern: re.Pattern
    targets: tuple[str, ...] = ()
    sizes: tuple[str | int, ...] = ()
    class_pattern: re.Pattern | None = None
    reason: str = ""
    text: dict[str, Any] = field(default_factory=dict)

    def match(self, info: ModuleInfo) -> dict[str, str] | None:
        found = self.pattern.fullmatch(info.name)
        if found is None or (
            self.class_pattern is not None and not self.class_pattern.fullmatch(info.class_name)
        ):
            return None
        return found.groupdict()


@dataclass(frozen=True)
class LayoutMap:
    """A named list of :class:`Rule`; ``source``: the built-in name or the YAML file."""

    name: str
    source: str
    rules: tuple[Rule, ...]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "rules": [rule.text for rule in self.rules],
        }


def load_map(spec: str | os.PathLike) -> LayoutMap:
    """The built-in mapping ``spec`` (``vllm``) or the YAML file at ``spec``."""
    if str(spec) in BUILTIN:
        return _parse(BUILTIN[str(spec)], str(spec))
    path = Path(spec)
    if not path.is_file():
        raise HwdiffError(
            f"--map {spec}: neither a built-in mapping ({', '.join(BUILTIN)}) nor a YAML file"
        )
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())  # YAML's messages span several lines: one line here
        raise HwdiffError(f"{path} is not a readable YAML mapping ({detail})") from exc
    return _parse(data, str(path))


def _parse(data: Any, source: str) -> LayoutMap:
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list) or not data["rules"]:
        raise HwdiffError(
            f"mapping {source}: expected {{name: ..., rules: [fused / rename / drop rules]}}"
        )
    return LayoutMap(
        str(data.get("name", source)), source, tuple(_rule(item, source) for item in data["rules"])
    )


def _rule(item: Any, source: str) -> Rule:
    kinds = [key for key in ("fused", "rename", "drop") if isinstance(item, dict) and key in item]
    if len(kinds) != 1:
        raise HwdiffError(
            f"mapping {source}: each rule has exactly one of fused / rename / drop, got {item!r}"
        )
    kind = kinds[0]
    pattern = _pattern(str(item[kind]), source)
    try:
        class_pattern = re.compile(str(item["class"])) if "class" in item else None
    except re.error as exc:
        raise HwdiffError(f"mapping {source}: bad class regex {item['class']!r} ({exc})") from exc
    if kind == "fused":
        targets, sizes = tuple(map(str, item.get("into") or ())), tuple(item.get("sizes") or ())
        if len(targets) < 2 or len(sizes) != len(targets):
            raise HwdiffError(
                f"mapping {source}: fused rule {item[kind]!r} needs 'into' (2 or more names) and as many 'sizes'"
            )
        if any(isinstance(size, int) and size < 1 for size in sizes):
            raise HwdiffError(
                f"mapping {source}: fused rule {item[kind]!r} has a part size below 1: {list(sizes)}"
            )
        return Rule(kind, pattern, targets, sizes, class_pattern, text=dict(item))
    if kind == "rename":
        if "to" not in item:
            raise HwdiffError(f"mapping {source}: rename rule {item[kind]!r} needs 'to'")
        return Rule(kind, pattern, (str(item["to"]),), (), class_pattern, text=dict(item))
    return Rule(
        kind,
        pattern,
        (),
        (),
        class_pattern,
        str(item.get("reason", "dropped by the mapping")),
        dict(item),
    )


def _pattern(text: str, source: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", text)
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>.+)" for i, part in enumerate(parts)
    )
    try:
        return re.compile(regex)
    except re.error as exc:
        raise HwdiffError(f"mapping {source}: bad pattern {text!r} ({exc})") from exc


# ------------------------------------------------------------------------------------------------
def _sizes(rule: Rule, config: dict[str, Any] | None, width: int, name: str) -> list[int]:
    """The widths of a fused module's parts, checked against its stored width."""

    def value(size: str | int) -> int:
        if isinstance(size, int) and not isinstance(size, bool):
            if size < 1:
                raise HwdiffError(
                    f"splitting {name}: part size {size} must be a positive number of features"
                )
            return size
        if config is None:
            raise HwdiffError(
                f"splitting {name} needs the model config (head counts, head_dim), and the capture "
                "has no model_config attribute"
            )
        heads = config.get("num_attention_heads")
        head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads else None)
        known = {
            "q": heads * head_dim if heads and head_dim else None,
            "kv": config.get("num_key_value_heads", heads) * head_dim
            if heads and head_dim
            else None,
            "intermediate": config.get("intermediate_size"),
        }
        count = known.get(str(size))
        if count is None:
            raise HwdiffError(
                f"splitting {name}: size {size!r} is not an integer nor one of q, kv, intermediate "
                "that the capture's model config defines"
            )
        return int(count)

    sizes = [value(size) for size in rule.sizes]
    if sum(sizes) != width:
        raise HwdiffError(
            f"cannot split {name}: its output has {width} features, the mapping's parts "
            f"{dict(zip(rule.targets, sizes))} add up to {sum(sizes)}"
        )
    return sizes


def _delegate(method: str) -> Callable[..., Any]:
    """A :class:`MappedCapture` method that calls the capture's ``method`` with the module's
    original name (a small factory of name-translating methods)."""

    def call(self: MappedCapture, name: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._capture, method)(self._source.get(name, (name,))[0], *args, **kwargs)

    call.__name__ = method
    return call


class MappedCapture:
    """A capture read through a :class:`LayoutMap`: module names, shapes and reads of the mapped layout;
    every other attribute is the capture's. ``changed``: how many modules a rule touched."""

    def __init__(self, capture: Capture, mapping: LayoutMap) -> None:
        self._capture, self.mapping = capture, mapping
        self._source: dict[str, tuple[str, slice | None]] = {}
        self.dropped: dict[str, str] = {}
        self.modules: dict[str, ModuleInfo] = {}
        self.changed = 0
        config = capture.meta.get("model_config") or None
        config = json.loads(config) if isinstance(config, (str, bytes)) else config
        for info in capture.modules.values():
            self._place(info, config)
        self.meta = {
            **capture.meta,
            "layout_map": json.dumps(mapping.describe()),
            "mapped_out": json.dumps(self.dropped),
        }

    def _place(self, info: ModuleInfo, config: dict[str, Any] | None) -> None:
        for rule in self.mapping.rules:
            groups = rule.match(info)
            if groups is None:
                continue
            self.changed += 1
            if rule.kind == "drop":
                self.dropped[info.name] = rule.reason
                return
            names = [target.format(**groups) for target in rule.targets]
            if rule.kind == "rename":
                self._add(names[0], info, None)
                return
            if "output" not in info.slots:
                raise HwdiffError(f"cannot split {info.name}: the capture stored no output for it")
            width = self._capture.slot_info(info.name, 0, "output")[0][-1]
            start = 0
            for name, size in zip(names, _sizes(rule, config, width, info.name)):
                self._add(name, info, slice(start, start + size))
                start += size
            return
        self._add(info.name, info, None)

    def _add(self, name: str, info: ModuleInfo, cut: slice | None) -> None:
        if name in self.modules:
            raise HwdiffError(
                f"the mapping puts two modules at {name} ({self._source[name][0]} and {info.name})"
            )
        self._source[name] = (info.name, cut)
        shape = (
            info.shape[:-1] + (cut.stop - cut.start,)
            if cut is not None and info.shape
            else info.shape
        )
        self.modules[name] = replace(
            info,
            name=name,
            shape=shape,
            alias_of=None if cut is not None else info.alias_of,
            # a part of a module has no weight of its own (weight() gives None): none to check
            has_weight=info.has_weight and cut is None,
        )

    # -- the reads the diff makes, through the mapping -------------------------------------------
    def _cut(self, name: str, slot: str) -> tuple[str, slice | None]:
        if name not in self._source:
            raise HwdiffError(
                f"{self._capture.path} (mapped by {self.mapping.name}) has no module {name!r}"
            )
        original, cut = self._source[name]
        return original, cut if slot == "output" else None

    def read(
        self, name: str, call: int, slot: str, index: tuple[slice, ...], *, stored: bool = False
    ) -> np.ndarray:
        original, cut = self._cut(name, slot)
        if cut is None:
            return self._capture.read(original, call, slot, index, stored=stored)
        ndim = len(self._capture.slot_info(original, call, slot)[0])
        full = tuple(index) + (slice(None),) * (ndim - len(index))
        last = full[-1]
        width = cut.stop - cut.start
        start, stop, _ = last.indices(width)
        return self._capture.read(
            original,
            call,
            slot,
            full[:-1] + (slice(cut.start + start, cut.start + stop),),
            stored=stored,
        )

    def activation(self, name: str, call: int = 0, slot: str = "output") -> np.ndarray:
        original, cut = self._cut(name, slot)
        values = self._capture.activation(original, call, slot)
        return values if cut is None else values[..., cut]

    def slot_info(
        self, name: str, call: int = 0, slot: str = "output"
    ) -> tuple[tuple[int, ...], str]:
        original, cut = self._cut(name, slot)
        shape, dtype = self._capture.slot_info(original, call, slot)
        return (shape[:-1] + (cut.stop - cut.start,) if cut is not None else shape), dtype

    def alias_of(self, name: str, call: int = 0, slot: str = "output") -> str | None:
        original, cut = self._cut(name, slot)
        target = self._capture.alias_of(original, call, slot)
        if target is None or cut is not None:
            return None
        module = target.rsplit("/", 2)[0]
        return (
            target if self._source.get(module, (None, None)) == (module, None) else None
        )  # a mapped target: compare values

    layout = _delegate("layout")
    present = _delegate("present")
    has_call = _delegate("has_call")
    call_spec = _delegate("call_spec")
    nonfinite = _delegate("nonfinite")
    stats = _delegate("stats")

    def weight(self, name: str) -> np.ndarray | None:
        original, cut = self._source.get(name, (name, None))
        return None if cut is not None else self._capture.weight(original)

    def weight_dtype(self, name: str) -> str | None:
        original, cut = self._source.get(name, (name, None))
        return None if cut is not None else self._capture.weight_dtype(original)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._capture, attribute)


def map_captures(
    reference: Capture, target: Capture, spec: str | os.PathLike
) -> tuple[MappedCapture, MappedCapture]:
    """Both captures read through the mapping ``spec``; refused when it changes neither."""
    mapping = load_map(spec)
    ref, tgt = MappedCapture(reference, mapping), MappedCapture(target, mapping)
    if not ref.changed and not tgt.changed:
        raise HwdiffError(
            f"the mapping {mapping.name} matches no module of either capture: neither has that layout "
            "(compare them without --map)"
        )
    return ref, tgt


def check_same_weights(reference: MappedCapture, target: MappedCapture) -> None:
    """Across layouts the model fingerprints differ by construction (other parameter names and
    shapes); the RMSNorm weights both captures store, at the same names, must be equal instead
    (rounded to the coarser of the two dtypes). Raises :class:`HwdiffError` otherwise."""
    common = [
        name
        for name, info in reference.modules.items()
        if info.has_weight and name in target.modules and target.modules[name].has_weight
    ]
    if not common:
        raise HwdiffError(
            "the captures store no norm weights at common names: hwdiff cannot check that they are "
            "of the same model across layouts; pass --allow-model-mismatch to compare anyway"
        )
    for name in common:
        mine, theirs = reference.weight(name), target.weight(name)  # both decoded to float32
        if mine is None or theirs is None:
            missing = reference.path if mine is None else target.path
            raise HwdiffError(
                f"{missing} lists a norm weight for {name} but stores none: hwdiff cannot check that "
                "the captures are of the same model; pass --allow-model-mismatch to compare anyway"
            )
        same = reference.weight_dtype(name) == target.weight_dtype(name)
        if mine.shape != theirs.shape or not _equal(mine, theirs, np.float32 if same else None):
            raise HwdiffError(
                f"the captures are of different weights: {name}'s weight differs between "
                f"{reference.path} and {target.path}; pass --allow-model-mismatch to compare anyway"
            )


def _equal(a: np.ndarray, b: np.ndarray, same_dtype: Any) -> bool:
    if same_dtype is not None:
        return bool(np.array_equal(a, b))
    return bool(
        np.array_equal(_to_bfloat16(a), _to_bfloat16(b))
    )  # dtypes differ: compare at the coarsest


def _to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
