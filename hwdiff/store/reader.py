"""Reading a capture: :func:`open_capture` and :class:`Capture` (a file, or a multi-rank directory
through its manifest), the module table (:class:`ModuleInfo`), token log-probabilities and
generations, and :func:`plan_blocks`, the block plan streaming readers share.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, cast

import h5py
import numpy as np

from ..errors import CaptureFormatError, HwdiffError
from ..structure import offset_from_class
from . import ranks
from .format import (
    GENERATE_MODE,
    LOGPROB_FIELDS,
    SCHEMA,
    SCHEMA_FAMILY,
    SCHEMA_MAJOR,
    SLOTS,
    STATS_FIELDS,
    decode,
)
from .h5 import _open_h5, read_checked
from .tokens import Inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleInfo:
    """One captured module: ``shape``/``dtype`` describe call 0's output as stored (decoded dtype)."""

    name: str
    kind: str
    class_name: str
    calls: int
    order: int
    shape: tuple[int, ...]
    dtype: str
    slots: tuple[str, ...]
    alias_of: str | None
    has_weight: bool
    weight_offset: float = 0.0  # the norm's effective scale is weight_offset + weight


@dataclass(frozen=True, eq=False)
class TokenLogProbs:
    """Token log-probabilities as stored in ``/logprobs`` (or ``/generation``): arrays
    ``[sequences, positions]`` (``topk_*``: ``[sequences, positions, k]``), log-probs in nats."""

    next_token: np.ndarray
    entropy: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    attrs: dict[str, Any]

    @property
    def topk(self) -> int:
        return int(self.topk_ids.shape[-1])

    def __repr__(self) -> str:
        return f"TokenLogProbs({self.next_token.shape}, k={self.topk}, {self.attrs.get('compute_dtype')})"


@dataclass(frozen=True, eq=False)
class Generation:
    """A greedy generation file's ``/generation`` group: ``ids`` / ``lengths`` and the log-probs of
    the generated tokens (``logprobs.next_token`` [sequences, N] is each generated token's log-prob)."""

    ids: np.ndarray
    lengths: np.ndarray
    logprobs: TokenLogProbs
    attrs: dict[str, Any]

    def __repr__(self) -> str:
        return f"Generation({self.ids.shape[0]} prompts x {self.attrs.get('max_new_tokens')} new tokens)"


class Capture:
    """A complete capture file opened for reading (see :func:`open_capture`)."""

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        self._file = _open_h5(ranks.manifest_of(self.path) if self.path.is_dir() else self.path)
        self._opened: dict[tuple[str, int, str], tuple[h5py.Dataset, str]] = {}
        # HDF5 lookups cost more than reading a small slot: each group is found once per reader
        self._groups: dict[str, h5py.Group] = {}
        self._call_groups: dict[tuple[str, int], h5py.Group | None] = {}
        self._slot_infos: dict[tuple[str, int, str], tuple[tuple[int, ...], str]] = {}
        try:
            self.meta = _read_meta(self._file, self.path)
            _check_parallel(self.meta, Path(self._file.filename), self.path)
            if not self.meta.get("complete") and not allow_incomplete:
                raise CaptureFormatError(
                    f"{self.path} is an incomplete capture (the run that wrote it did not finish); "
                    "capture again"
                )
            self.modules = _read_modules(self._file)
        except BaseException:
            self._file.close()
            raise

    @property
    def mode(self) -> str:
        return str(self.meta.get("mode", "full"))

    @property
    def dtype(self) -> str:
        return str(self.meta.get("dtype", ""))

    @property
    def input_ids(self) -> np.ndarray:
        return read_checked(self._file["inputs/input_ids"])

    @property
    def attention_mask(self) -> np.ndarray:
        return read_checked(self._file["inputs/attention_mask"])

    @property
    def inputs(self) -> Inputs:
        """The exact inputs of the run, as :class:`~hwdiff.capturing.inputs.Inputs`."""
        return Inputs(
            self.input_ids,
            self.attention_mask,
            source=str(self.meta.get("inputs_source", self.path)),
        )

    @property
    def sample_positions(self) -> np.ndarray | None:
        node = self._file["inputs"].get("sample_positions")
        return None if node is None else read_checked(node)

    @property
    def is_generation(self) -> bool:
        """A greedy generation file (:mod:`hwdiff.capturing.generate`) rather than a layer capture."""
        return self.mode == GENERATE_MODE

    def token_logprobs(self) -> TokenLogProbs | None:
        """The ``/logprobs`` group, or None for files written without it (older hwdiff, no head)."""
        group = self._file.get("logprobs")
        if group is None:
            return None
        next_token, entropy, topk_ids, topk_logprobs = (
            read_checked(group[name]) for name in LOGPROB_FIELDS
        )
        attrs = {key: _plain(value) for key, value in group.attrs.items()}
        return TokenLogProbs(next_token, entropy, topk_ids, topk_logprobs, attrs)

    def generation(self) -> Generation:
        """The ``/generation`` group of a greedy generation file."""
        group = self._file.get("generation")
        if group is None:
            raise CaptureFormatError(
                f"{self.path} is not a generation file (hwdiff generate); it has no /generation"
            )
        attrs = {key: _plain(value) for key, value in group.attrs.items()}
        next_token, entropy, topk_ids, topk_logprobs = (
            read_checked(group[name])
            for name in ("logprobs", "entropy", "topk_ids", "topk_logprobs")
        )
        logprobs = TokenLogProbs(next_token, entropy, topk_ids, topk_logprobs, attrs)
        return Generation(
            read_checked(group["ids"]), read_checked(group["lengths"]), logprobs, attrs
        )

    def activation(self, name: str, call: int = 0, slot: str = "output") -> np.ndarray:
        """The whole stored slot, decoded exactly (bfloat16 widened to float32)."""
        dataset = self._dataset(name, call, slot)
        return decode(read_checked(dataset), dataset.attrs["dtype"])

    def iter_chunks(
        self, name: str, call: int = 0, slot: str = "output", rows: int | None = None
    ) -> Iterator[np.ndarray]:
        """Decoded blocks of ``rows`` sequences (default: as many as fit in about 16 MiB)."""
        dataset = self._dataset(name, call, slot)
        dtype = dataset.attrs["dtype"]
        row_bytes = max(int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize, 1)
        step = rows or max(1, (16 << 20) // row_bytes)
        for start in range(0, dataset.shape[0], step):
            yield decode(read_checked(dataset, (slice(start, start + step),)), dtype)

    def read(
        self, name: str, call: int, slot: str, index: tuple[slice, ...], *, stored: bool = False
    ) -> np.ndarray:
        """A decoded block ``dataset[index]`` of a slot (see :func:`plan_blocks`); ``stored``: as
        stored instead (bfloat16 as its uint16 bit patterns, for readers that decode it themselves)."""
        key = (name, call, slot)
        opened = self._opened.get(key)
        if opened is None:  # the lookups cost more than reading a small block: once per slot
            dataset = self._dataset(name, call, slot)
            opened = (dataset, str(dataset.attrs["dtype"]))
            if (
                len(self._opened) >= 64
            ):  # e.g. every residual-stream position of the correlation pass
                del self._opened[next(iter(self._opened))]
            self._opened[key] = opened
        block = read_checked(opened[0], index)
        return block if stored else decode(block, opened[1])

    def layout(self, name: str, call: int = 0, slot: str = "output") -> str:
        """How the module's rows were stored: "" (sequences first, as called), :data:`FLAT`, :data:`ROUTED`,
        :data:`EXPERTS` or :data:`EXPERT_ROWS`."""
        return str(_plain(self._dataset(name, call, slot).attrs.get("rows", "")))

    def present(self, name: str, call: int = 0, slot: str = "output") -> np.ndarray | None:
        """bool [sequences, tokens] of a routed slot: the tokens routed to this expert call, else None."""
        group = self._call_group(name, call)
        node = None if group is None else group.get(f"{slot}_present")
        return None if node is None else node[...]

    def has_call(self, name: str, call: int) -> bool:
        """Whether call ``call`` of module ``name`` was stored (a routed expert may never have been hit)."""
        return self._call_group(name, call) is not None

    def slot_info(
        self, name: str, call: int = 0, slot: str = "output"
    ) -> tuple[tuple[int, ...], str]:
        """(shape, real dtype) of a stored slot."""
        key = (name, call, slot)
        if key not in self._slot_infos:
            dataset = self._dataset(name, call, slot)
            self._slot_infos[key] = (tuple(dataset.shape), str(dataset.attrs["dtype"]))
        return self._slot_infos[key]

    def alias_of(self, name: str, call: int = 0, slot: str = "output") -> str | None:
        """``name/call/slot`` of the slot this one links to, or None when it is stored itself."""
        value = self._call_group(name, call)
        return None if value is None else _plain(value.attrs.get(f"{slot}_alias_of"))

    def call_spec(self, name: str, call: int = 0) -> dict | None:
        """The recorded call arguments of a module call (:mod:`hwdiff.structure.callspec`), or None."""
        group = self._call_group(name, call)
        spec = None if group is None else group.attrs.get("call_spec")
        return None if spec is None else json.loads(spec)

    def stats(self, name: str, call: int = 0, slot: str = "output") -> dict[str, float]:
        """The float64 statistics of a slot (``stats`` mode)."""
        record = read_checked(self._node(name, call, f"{slot}_stats"), ())
        return {field: float(record[field]) for field in STATS_FIELDS}

    def weight(self, name: str) -> np.ndarray | None:
        """A norm's weight as captured (decoded), or None when the module has none."""
        group = self._module_group(name)
        if "weight" not in group:
            return None
        return decode(read_checked(group["weight"]), str(group["weight"].attrs["dtype"]))

    def weight_dtype(self, name: str) -> str | None:
        """The dtype a norm's weight was captured in (:meth:`weight` decodes bfloat16 to float32)."""
        group = self._module_group(name)
        return str(group["weight"].attrs["dtype"]) if "weight" in group else None

    def nonfinite(self, name: str, call: int = 0, slot: str = "output") -> tuple[int, int]:
        """(NaN count, Inf count) recorded for a stored slot."""
        attrs = self._dataset(name, call, slot).attrs
        return int(attrs.get("nan_count", 0)), int(attrs.get("inf_count", 0))

    def _module_group(self, name: str) -> h5py.Group:
        group = self._groups.get(name)
        if group is None:
            if name not in self.modules:
                raise HwdiffError(f"{self.path} has no module {name!r}")
            group = self._groups[name] = self._file["modules"][name]
        return group

    def _call_group(self, name: str, call: int) -> h5py.Group | None:
        key = (name, call)
        if key not in self._call_groups:
            self._call_groups[key] = self._module_group(name).get(str(call))
        return self._call_groups[key]

    def _node(self, name: str, call: int, slot: str) -> Any:
        group = self._call_group(name, call)
        node = None if group is None else group.get(slot)
        if node is None:
            raise HwdiffError(f"{self.path}: module {name!r} has no {slot!r} for call {call}")
        return node

    def _dataset(self, name: str, call: int, slot: str) -> h5py.Dataset:
        if self.mode == "stats":
            raise HwdiffError(
                f"{self.path} is a 'stats' capture: it holds statistics, not activations"
            )
        return self._node(name, call, slot)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Capture({str(self.path)!r}, device={self.meta.get('device')!r}, dtype={self.dtype!r}, "
            f"mode={self.mode!r}, modules={len(self.modules)})"
        )


def _check_parallel(meta: dict[str, Any], file: Path, path: Path) -> None:
    """A multi-rank manifest is read only with every rank file of its run (:mod:`hwdiff.store.ranks`);
    one rank's file of a tensor-parallel run holds shards and is refused on its own."""
    if "rank_files" in meta:
        ranks.check_ranks(file, meta)
    elif meta.get("parallel") == "tensor" and "rank" in meta:
        raise CaptureFormatError(
            f"{path} is rank {meta['rank']} of a {meta.get('world_size')}-rank tensor-parallel capture: it holds "
            f"shards of the column-parallel outputs; open its directory ({path.parent}) to read the whole tensors"
        )


def plan_blocks(shape: tuple[int, ...], max_elements: int = 1 << 22) -> list[tuple[slice, ...]]:
    """Index blocks covering an array of ``shape`` in order, each at most ``max_elements`` (when a
    single sequence is larger, it is split along the token axis). Streaming readers use the same
    plan for every file of a comparison, whatever their stored dtypes."""
    if not shape:
        return [()]
    row = int(np.prod(shape[1:], dtype=np.int64))
    if row <= max_elements or len(shape) < 2:
        step = max(1, max_elements // max(row, 1))
        return [(slice(start, min(start + step, shape[0])),) for start in range(0, shape[0], step)]
    per_token = max(1, int(np.prod(shape[2:], dtype=np.int64)))
    tokens = max(1, max_elements // per_token)
    return [
        (slice(r, r + 1), slice(t, min(t + tokens, shape[1])))
        for r in range(shape[0])
        for t in range(0, shape[1], tokens)
    ]


def open_capture(path: str | os.PathLike, *, allow_incomplete: bool = False) -> Capture:
    """Open a capture for reading; raises :class:`CaptureFormatError` for anything else.

    Refuses files that are not HDF5, truncated, of another schema or major version, or incomplete
    (unless ``allow_incomplete``). ``path`` may be a multi-rank capture directory
    (:mod:`hwdiff.store.ranks`): it reads as one capture, and is refused without its manifest or with a
    missing or foreign rank file.
    """
    return Capture(path, allow_incomplete=allow_incomplete)


def _read_meta(handle: h5py.File, path: Path) -> dict[str, Any]:
    meta = {key: _plain(value) for key, value in handle.attrs.items()}
    schema = meta.get("schema")
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_FAMILY + "/"):
        raise CaptureFormatError(
            f"{path} is an HDF5 file but not an hwdiff capture (schema {schema!r})"
        )
    if schema.rsplit("/", 1)[1].split(".")[0] != SCHEMA_MAJOR:
        raise CaptureFormatError(
            f"{path} has schema {schema!r}; this hwdiff reads {SCHEMA!r}: upgrade hwdiff to read it"
        )
    if "model_config" in meta and isinstance(meta["model_config"], str):
        meta["model_config"] = json.loads(meta["model_config"])
    return meta


def _indexed_modules(handle: h5py.File) -> dict[str, ModuleInfo] | None:
    node = handle.get("module_index")
    if not isinstance(node, h5py.Dataset):
        return None
    # a scalar string dataset reads as one bytes object, not an array
    index = json.loads(cast("str | bytes", read_checked(node, ())))
    if set(index) != set(handle["modules"]):  # changed after it was written: trust the groups
        log.warning(
            "%s: /module_index does not list the groups under /modules; reading the groups",
            handle.filename,
        )
        return None
    modules = [
        ModuleInfo(
            name=name,
            kind=entry["kind"],
            class_name=entry["class_name"],
            calls=entry["calls"],
            order=entry["order"],
            shape=tuple(entry["shape"]),
            dtype=entry["dtype"],
            slots=tuple(entry["slots"]),
            alias_of=entry["alias_of"],
            has_weight=entry["has_weight"],
            weight_offset=entry["weight_offset"],
        )
        for name, entry in index.items()
    ]
    return {info.name: info for info in sorted(modules, key=lambda info: info.order)}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _read_modules(handle: h5py.File) -> dict[str, ModuleInfo]:
    """Every module's :class:`ModuleInfo`: from ``/module_index`` when the file has one that lists
    exactly the groups under /modules, else by walking them (each group's names and attributes read
    once: a lookup in HDF5 costs tens of microseconds, and a capture has ~100 groups of ~8)."""
    indexed = _indexed_modules(handle)
    return indexed if indexed is not None else _walk_modules(handle)


def _walk_modules(handle: h5py.File) -> dict[str, ModuleInfo]:
    modules = []
    for name, group in handle["modules"].items():
        keys = list(group)
        attrs = {key: _plain(value) for key, value in group.attrs.items()}
        stored_calls = sorted(int(key) for key in keys if key.isdigit())
        first = group.get(str(stored_calls[0])) if stored_calls else None
        inside = set(first) if first is not None else set()
        slots = tuple(slot for slot in SLOTS if slot in inside or f"{slot}_stats" in inside)
        output = (
            first.get("output", first.get("output_stats"))
            if first is not None and inside & {"output", "output_stats"}
            else None
        )
        modules.append(
            ModuleInfo(
                name=name,
                kind=str(attrs["kind"]),
                class_name=str(attrs["class_name"]),
                calls=int(
                    attrs.get("calls", len(stored_calls))
                ),  # written when the capture finished
                order=int(attrs["order"]),
                shape=tuple(output.shape) if output is not None and "output" in inside else (),
                dtype=str(output.attrs["dtype"]) if output is not None else "",
                slots=slots,
                alias_of=_plain(first.attrs.get("output_alias_of")) if first is not None else None,
                has_weight="weight" in keys,
                weight_offset=float(
                    attrs.get("weight_offset", offset_from_class(str(attrs["class_name"])) or 0.0)
                ),
            )
        )
    return {info.name: info for info in sorted(modules, key=lambda info: info.order)}
