"""Writing a capture file: the records the forward hands over (:class:`Record`, :class:`Register`,
:class:`Alias`, :class:`Signature`, :class:`LogProbRecord`) and :class:`CaptureWriter`, which writes
them from a background thread (layout: :mod:`hwdiff.store`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import queue
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..common import outputs
from ..errors import HwdiffError
from ..structure import offset_from_class
from . import stats
from .format import CHUNK_BYTES, LOGPROB_FIELDS, SCHEMA, SLOTS, encode, nonfinite_counts
from .h5 import compression_options, create_checked, new_group, set_attrs
from .tokens import Inputs


@dataclass
class Record:
    """One host-side tensor on its way to the file: rows ``[row0, row0 + len)`` of a slot."""

    name: str
    call: int
    slot: str
    row0: int
    array: Any  # torch.Tensor on the host; the writer thread converts it
    dtype: str
    event: Any = None  # device event to wait for before the host copy may be read
    reduced: bool = False  # ``array`` is already a stats parts vector (stats mode, accelerators)
    layout: str = (
        ""  # FLAT or ROUTED when the module's rows were not [sequences, …] (see ``rows`` attribute)
    )
    present: Any = None  # ROUTED: bool [sequences, tokens], True where the token was routed here
    nonfinite: Any = None  # host int64 (NaN count, Inf count), counted on the device, or None


@dataclass
class LogProbRecord:
    """Token log-probabilities of rows ``[row0, row0 + len)`` (host tensors, see the module
    docstring): ``arrays`` maps each name of :data:`LOGPROB_FIELDS` to a tensor; ``attrs`` go on
    the group once."""

    row0: int
    arrays: dict[str, Any]
    attrs: dict[str, Any]
    event: Any = None


@dataclass
class Register:
    """First sight of a module: its group, attributes and (for norms) weight."""

    name: str
    kind: str
    class_name: str
    order: int
    weight: Any = None
    weight_dtype: str = ""
    weight_offset: float = (
        0.0  # 1.0 for norms computing x̂·(1 + w) (Gemma): the effective scale is 1 + w
    )


@dataclass
class Signature:
    """How module ``name`` was called at ``call``: a :mod:`hwdiff.structure.callspec` JSON spec."""

    name: str
    call: int
    spec: str


@dataclass
class Alias:
    """``name/call/slot`` is the very tensor stored at ``target`` (``name/call/slot``)."""

    name: str
    call: int
    slot: str
    target: str


class CaptureWriter:
    """Writes one capture file from a background thread; see the module docstring for the layout.

    The forward thread only enqueues host tensors (with the device event of their async copy); the
    writer thread waits for each copy, encodes it and writes it, so device-to-host transfers and HDF5
    I/O overlap the forward. At most ``max_bytes`` of host copies wait in the queue (one larger
    tensor is let through alone), which bounds pinned host memory.

    ``synchronous``: no thread; :meth:`put` writes before it returns, so the caller may pass views of
    live tensors (no copies). That is the faster choice on the CPU, where the forward and a writer
    thread would compete for the same cores (docs/benchmarks.md).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        meta: dict[str, Any],
        inputs: Inputs,
        mode: str,
        sample_positions: np.ndarray | None = None,
        compression: str | None = None,
        max_bytes: int = 1 << 30,
        synchronous: bool = False,
        placements: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.placements = (
            placements or {}
        )  # module → placement of its outputs (tensor-parallel shards)
        self.mode = mode
        self.synchronous = synchronous
        self.rows = inputs.shape[0]
        self.compression = compression
        self._filter = compression_options(compression)
        self._queue: queue.Queue = queue.Queue()
        self._max_bytes, self._queued_bytes = max_bytes, 0
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._failed = False
        self._stats: dict[tuple[str, int, str], stats.RunningStats] = {}
        self._stats_dtype: dict[tuple[str, int, str], str] = {}
        self._groups: dict[tuple[str, int], h5py.Group] = {}
        self._modules: dict[str, h5py.Group] = {}  # /modules/<name>, in registration order
        self._root: h5py.Group | None = None  # /modules
        self._index: dict[str, dict[str, Any]] = {}  # what /module_index will say of each module
        self._inside: dict[
            tuple[str, int], dict[str, tuple]
        ] = {}  # call group → its slots as written
        self._calls: dict[str, int] = {}
        self.nonfinite: list[str] = []  # modules with NaN/Inf, in the order they were first seen
        self._thread = None
        self._temp = outputs.temporary(self.path)
        try:
            self._file = outputs.open_h5(self._temp)
        except OSError as exc:
            outputs.discard(self._temp)
            raise outputs.write_error(exc, self.path) from exc
        try:
            self._write_header(meta, inputs, sample_positions)
        except BaseException as exc:
            self.abort()
            raise outputs.write_error(exc, self.path) if isinstance(exc, OSError) else exc
        if not synchronous:
            self._thread = threading.Thread(target=self._run, name="hwdiff-writer", daemon=True)
            self._thread.start()

    def _write_header(
        self, meta: dict[str, Any], inputs: Inputs, positions: np.ndarray | None
    ) -> None:
        set_attrs(
            self._file,
            {
                "schema": SCHEMA,
                "capture_id": uuid.uuid4().hex,
                "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "mode": self.mode,
                "inputs_fingerprint": inputs.fingerprint,
                "inputs_source": inputs.source,
                **{key: _attr(value) for key, value in meta.items() if value is not None},
                "complete": False,
            },
        )
        group = self._file.create_group("inputs")
        create_checked(group, "input_ids", data=inputs.input_ids.astype(np.int64))
        create_checked(group, "attention_mask", data=inputs.attention_mask.astype(np.int64))
        if positions is not None:
            create_checked(group, "sample_positions", data=positions.astype(np.int64))
        self._file.create_group("modules")

    # -- forward thread -------------------------------------------------------------------------
    def put(self, item: Record | Register | Alias | Signature) -> None:
        """Enqueue work for the writer thread; waits while the queue holds ``max_bytes``; re-raises
        a failure of the writer thread here."""
        if self.synchronous:
            self._handle(item)
            return
        size = _nbytes(item)
        with self._room:
            while (
                self._queued_bytes
                and self._queued_bytes + size > self._max_bytes
                and self._error is None
            ):
                self._room.wait(timeout=1.0)
            self._queued_bytes += size
        self._raise_if_failed()
        self._queue.put(item)

    def finish(self, extra_meta: dict[str, Any] | None = None) -> Path:
        """Drain the queue, set ``complete``, flush, close, sync and rename onto the final path."""
        self._stop()
        self._raise_if_failed()
        try:
            set_attrs(self._file, {key: _attr(value) for key, value in (extra_meta or {}).items()})
            for name, group in self._modules.items():  # written once, now that every call is known
                set_attrs(group, {"calls": self._calls.get(name, 0)})
            for (name, call, slot), running in self._stats.items():
                dtype = self._stats_dtype[(name, call, slot)]
                set_attrs(
                    create_checked(
                        self._groups[(name, call)], f"{slot}_stats", data=running.record()
                    ),
                    {"dtype": dtype},
                )
                self._inside[(name, call)][f"{slot}_stats"] = ("data", (), dtype)
            create_checked(self._file, "module_index", data=json.dumps(self._module_index()))
            self._file.attrs["complete"] = True
            self._file.flush()
            self._groups.clear()
            self._modules.clear()
            self._root = None
            self._file.close()
        except OSError as exc:
            self._failed = True
            raise outputs.write_error(exc, self.path) from exc
        return outputs.commit(self._temp, self.path)

    def abort(self) -> None:
        """Stop writing and delete the temporary file; an existing file at ``path`` is untouched."""
        self._failed = True
        self._stop()
        self._groups.clear()
        self._modules.clear()
        self._root = None
        outputs.discard_h5(self._file, self._temp)

    def _stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, HwdiffError):
                raise error
            if isinstance(error, OSError):
                raise outputs.write_error(error, self.path) from error
            raise RuntimeError(f"the capture writer thread failed: {error!r}") from error

    # -- writer thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if self._error is None:
                    self._handle(item)
            except BaseException as exc:  # handed to the forward thread by put() / finish()
                self._error = exc
            finally:
                with self._room:
                    self._queued_bytes -= _nbytes(item)
                    self._room.notify_all()

    def _handle(self, item: Record | Register | Alias | Signature | LogProbRecord) -> None:
        if self._failed:  # never write into a file that already failed (HDF5 would only fail again)
            raise HwdiffError(f"the capture writer of {self.path} has stopped after an error")
        try:
            self._handle_item(item)
        except OSError as exc:
            self._failed = True
            raise outputs.write_error(exc, self.path) from exc

    def _handle_item(self, item: Record | Register | Alias | Signature | LogProbRecord) -> None:
        if isinstance(item, LogProbRecord):
            if item.event is not None:
                item.event.synchronize()
            self._write_logprobs(item)
        elif isinstance(item, Register):
            self._register(item)
        elif isinstance(item, Signature):
            self._call_group(item.name, item.call).attrs["call_spec"] = item.spec
        elif isinstance(item, Alias):
            self._alias(item)
        else:
            if item.event is not None:
                item.event.synchronize()
            self._write(item)

    def _write_logprobs(self, item: LogProbRecord) -> None:
        group = self._file.get("logprobs")
        if group is None:
            group = self._file.create_group("logprobs")
            group.attrs.update({key: _attr(value) for key, value in item.attrs.items()})
        for name in LOGPROB_FIELDS:
            array = item.arrays[name].numpy()
            dataset = group.get(name)
            if dataset is None:
                dataset = create_checked(
                    group,
                    name,
                    shape=(self.rows, *array.shape[1:]),
                    dtype=array.dtype,
                    chunks=_chunk_shape((self.rows, *array.shape[1:]), array.itemsize),
                )
            if array.shape[1:] != dataset.shape[1:]:
                raise HwdiffError(
                    f"token log-probabilities changed shape between batches: "
                    f"{dataset.shape[1:]} then {array.shape[1:]}"
                )
            dataset[item.row0 : item.row0 + array.shape[0]] = array

    def write_generation(self, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Write the ``/generation`` group of a greedy generation file (see the module docstring)."""
        try:
            group = self._file.create_group("generation")
            group.attrs.update({key: _attr(value) for key, value in attrs.items()})
            for name, array in arrays.items():
                create_checked(group, name, data=array)
        except OSError as exc:
            self._failed = True
            raise outputs.write_error(exc, self.path) from exc

    def _module_index(self) -> dict[str, dict[str, Any]]:
        """Every module's :class:`ModuleInfo` fields as :func:`_read_modules` would find them by walking
        the file, from what this writer created (readers then read one dataset instead of ~8 HDF5
        objects per module)."""
        first: dict[
            str, int
        ] = {}  # each module's first stored call (one pass: MoE models have thousands)
        for module, call in self._inside:
            first[module] = min(call, first.get(module, call))
        index = {}
        for name, entry in self._index.items():
            inside = self._inside[(name, first[name])] if name in first else {}
            output = inside.get("output", inside.get("output_stats"))
            if output is not None and output[0] == "alias":
                target, _, slot = output[1].rpartition("/")
                module, _, call = target.rpartition("/")
                output = self._inside.get((module, int(call)), {}).get(
                    slot
                )  # dangling in stats mode
            index[name] = {
                **entry,
                "calls": self._calls.get(name, 0),
                "shape": list(output[1]) if output is not None and "output" in inside else [],
                "dtype": output[2] if output is not None else "",
                "slots": [slot for slot in SLOTS if slot in inside or f"{slot}_stats" in inside],
                "alias_of": inside["output"][1]
                if inside.get("output", ("",))[0] == "alias"
                else None,
            }
        return index

    def _register(self, item: Register) -> None:
        group = self._module_group(
            item.name
        )  # a pre-hook may have stored its inputs already (it registers on return)
        set_attrs(group, {"kind": item.kind, "class_name": item.class_name, "order": item.order})
        self._index[item.name] = {
            "kind": item.kind,
            "class_name": item.class_name,
            "order": item.order,
            "has_weight": item.weight is not None,
            "weight_offset": float(item.weight_offset)
            if item.weight is not None
            else float(offset_from_class(item.class_name) or 0.0),
        }
        if item.weight is not None:
            data = encode(item.weight)
            set_attrs(create_checked(group, "weight", data=data), {"dtype": item.weight_dtype})
            set_attrs(group, {"weight_offset": float(item.weight_offset)})

    def _module_group(self, name: str) -> h5py.Group:
        group = self._modules.get(name)
        if group is None:
            if self._root is None:
                self._root = self._file["modules"]
            group = self._modules[name] = new_group(self._root, name)
        return group

    def _call_group(self, name: str, call: int) -> h5py.Group:
        group = self._groups.get((name, call))
        if (
            group is None
        ):  # this writer creates every group once (cached here): no lookups in the file
            group = self._groups[(name, call)] = new_group(self._module_group(name), str(call))
            self._inside.setdefault((name, call), {})
            self._calls[name] = max(self._calls.get(name, 0), call + 1)
        return group

    def stored_rows(self, key: str, row0: int, rows: int) -> np.ndarray | None:
        """Rows ``row0 … row0 + rows`` of slot ``key`` (``name/call/slot``) as written (bfloat16 as its
        bits), for the recorder to check a candidate link; None unless this writer is synchronous (a
        threaded writer may not have written them yet) or when the slot holds no data."""
        name, call, slot = key.rsplit("/", 2)
        group = self._groups.get((name, int(call)))
        if not self.synchronous or group is None or slot not in group or self.mode == "stats":
            return None
        return group[slot][row0 : row0 + rows]

    def _alias(self, item: Alias) -> None:
        group = self._call_group(item.name, item.call)
        if item.slot in group:
            return  # the same alias, seen again in a later batch
        group[item.slot] = h5py.SoftLink(f"/modules/{item.target}")
        group.attrs[f"{item.slot}_alias_of"] = item.target
        self._inside[(item.name, item.call)][item.slot] = ("alias", item.target)

    def _write(self, item: Record) -> None:
        if self.mode == "stats":
            self._add_stats(item)
            return
        stored = encode(item.array)
        dataset = self._dataset(item, stored)
        if stored.shape[1:] != dataset.shape[1:]:
            raise HwdiffError(
                f"module {item.name} call {item.call} {item.slot} changed shape between batches: "
                f"{dataset.shape[1:]} then {stored.shape[1:]}"
            )
        dataset[item.row0 : item.row0 + stored.shape[0]] = stored
        if item.layout:
            dataset.attrs["rows"] = item.layout
        if item.present is not None:
            self._present(item)
        nan, inf = (
            item.nonfinite.tolist()
            if item.nonfinite is not None
            else nonfinite_counts(stored, item.dtype)
        )
        if nan or inf:
            if (
                item.slot == "output" and item.name not in self.nonfinite
            ):  # -inf in an attention mask is fine
                self.nonfinite.append(item.name)
            dataset.attrs["nan_count"] = dataset.attrs.get("nan_count", 0) + nan
            dataset.attrs["inf_count"] = dataset.attrs.get("inf_count", 0) + inf

    def _present(self, item: Record) -> None:
        """``<slot>_present``: which tokens a routed slot holds (the other rows are not data)."""
        group = self._call_group(item.name, item.call)
        present = np.asarray(item.present, dtype=bool)
        name = f"{item.slot}_present"
        if name not in group:
            create_checked(group, name, shape=(self.rows, present.shape[1]), dtype=bool)
            self._inside[(item.name, item.call)][name] = (
                "data",
                (self.rows, present.shape[1]),
                "bool",
            )
        group[name][item.row0 : item.row0 + present.shape[0]] = present

    def _add_stats(self, item: Record) -> None:
        key = (item.name, item.call, item.slot)
        self._call_group(item.name, item.call)
        self._stats_dtype[key] = item.dtype
        running = self._stats.setdefault(key, stats.RunningStats())
        running.add((item.array if item.reduced else stats.partial_stats(item.array)).numpy())
        if running.nonfinite and item.name not in self.nonfinite:
            self.nonfinite.append(item.name)

    def _dataset(self, item: Record, stored: np.ndarray) -> h5py.Dataset:
        group = self._call_group(item.name, item.call)
        if item.slot in group:
            return group[item.slot]
        shape = (self.rows, *stored.shape[1:])
        dataset = create_checked(
            group,
            item.slot,
            shape=shape,
            dtype=stored.dtype,
            chunks=_chunk_shape(shape, stored.itemsize),
            **self._filter,
        )
        set_attrs(dataset, {"dtype": item.dtype})
        self._inside[(item.name, item.call)][item.slot] = ("data", shape, item.dtype)
        if item.name in self.placements:
            dataset.attrs["placement"] = self.placements[item.name]
        return dataset


def _nbytes(item: Record | Register | Alias | Signature | LogProbRecord) -> int:
    if isinstance(item, LogProbRecord):
        return sum(array.numel() * array.element_size() for array in item.arrays.values())
    return item.array.numel() * item.array.element_size() if isinstance(item, Record) else 0


def _attr(value: Any) -> Any:
    """A metadata value as an HDF5 attribute: plain bool / int / float, anything else as str."""
    return value if type(value) in (bool, int, float) else str(value)


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...] | None:
    """One row per chunk, its second axis halved until the chunk is at most :data:`CHUNK_BYTES`."""
    if len(shape) == 0 or 0 in shape:
        return None
    chunk = [1, *shape[1:]]
    while len(chunk) > 1 and chunk[1] > 1 and int(np.prod(chunk)) * itemsize > CHUNK_BYTES:
        chunk[1] = (chunk[1] + 1) // 2
    return tuple(chunk)
