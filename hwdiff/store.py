"""The capture file: the one module that writes and reads the HDF5 contract (docs/design.md#file-contracts).

Layout (schema ``hwdiff/capture/1``)::

    /                       attrs: schema, hwdiff_version, created_utc, device, device_name, dtype,
                            torch_version, backend versions, numerics flags, model_spec,
                            model_fingerprint, model_config (JSON), inputs_fingerprint, mode,
                            batch_size, complete; stats_accumulation (mode "stats": float64, or
                            float32 where the device reduced in float32); dataflow (JSON, schema
                            ``hwdiff/dataflow/1``: each RMSNorm's measured role and sub-block,
                            :func:`hwdiff.structure.trace_dataflow`; absent in older files and for
                            models without RMSNorms: readers fall back to the name rule)
    /inputs/input_ids       int64 [sequences, tokens]
    /inputs/attention_mask  int64 [sequences, tokens]
    /inputs/sample_positions int64 [sequences, K]          (mode "sample" only)
    /module_index           JSON string: per module what a reader would find by walking /modules
                            (kind, class_name, calls, order, call 0's shape/dtype/slots/alias,
                            weight); read instead of ~8 HDF5 objects per module when it lists
                            exactly the groups under /modules (absent in older files)
    /modules/<name>         attrs: kind, class_name, calls, order; ``weight`` dataset for norms
                            (and ``weight_offset``: 1.0 when the norm scales by 1 + weight)
    /modules/<name>/<call>/output   [sequences, tokens, ...] (K positions instead of tokens in
                                    "sample" mode); attrs: dtype, and nan_count /
                                    inf_count when not zero
    /modules/<name>/<call>/input    the module's main input (``record_inputs``); in full mode also
                                    ``input.<argument>`` for its other tensor arguments and a JSON
                                    ``call_spec`` attribute, so that replay can call it again
    /modules/<name>/<call>/output_stats  float64 compound record (mode "stats", instead of output)

    /logprobs               token log-probabilities at the head (every mode; absent in files written
                            before it existed, and when the model has no head): attrs ``topk`` (k),
                            ``compute_dtype`` (float64 where the device has it, else float32),
                            ``head_dtype`` (dtype of the logits), ``source`` (``logits``: the
                            model's output logits; a head module's name when it returned none), ``definition``
    /logprobs/next_token    [sequences, tokens]: log p(input_ids[s, t+1] | tokens ≤ t) under the
                            model (teacher forcing on the fixed inputs); NaN at the last position
    /logprobs/entropy       [sequences, tokens]: −Σ_v p log p of the distribution at position t (nats)
    /logprobs/topk_ids      int64 [sequences, tokens, k]: the k most probable next tokens, best first
    /logprobs/topk_logprobs [sequences, tokens, k]: their log-probabilities
    /generation             greedy generation files only (root ``mode = "generate"``, no modules):
                            ``ids`` int64 [sequences, N] (generated tokens, ``pad`` after ``lengths``),
                            ``lengths`` int64 [sequences], ``logprobs`` [sequences, N] (log-prob of each
                            generated token), ``entropy``, ``topk_ids`` and ``topk_logprobs`` as in
                            /logprobs; attrs ``max_new_tokens``, ``strategy``, ``topk``,
                            ``compute_dtype``, ``head_dtype``, ``pad``

Log-probabilities are log_softmax of the model's output logits (:mod:`hwdiff.logprobs`) computed on
the capture device in ``compute_dtype`` (never in the model's bfloat16), stored as computed (float64 or float32). All
positions are kept in every mode (they are small: 8 bytes per token plus 16·k), padding included;
readers mask with the attention mask.

bfloat16 is stored as its raw uint16 bit patterns with ``dtype = "bfloat16"``; other float dtypes
natively. Every dataset carries HDF5's Fletcher-32 checksum filter (a scalar dataset, which HDF5
cannot filter, a ``crc32`` attribute instead; the v110 object format checksums the metadata), so a
flipped bit is reported by name instead of read as a number (:func:`verify_file`, ``hwdiff inspect
--verify``). Root attribute ``capture_id`` names the run; a replay records ``replay_of_id``. A slot holding the very tensor another module already returned is an HDF5 soft link to it
(attribute ``<slot>_alias_of`` on the call group). Files are written under a temporary name and
synced and renamed only after ``complete`` is set (:mod:`hwdiff.outputs`), so a partial file is
never taken for a whole one and an existing file is replaced only by a complete one.
A multi-rank capture (torchrun) is a directory of such files, one per rank, plus ``manifest.h5``: a
capture file whose activations are HDF5 virtual datasets over the rank files (:mod:`hwdiff.rankstore`);
:func:`open_capture` reads the directory as one capture and refuses it with a missing or foreign rank
file. Rank files carry root ``rank``, ``world_size``, ``local_rank``, ``local_device``,
``process_group_backend``, ``parallel`` and ``run_id``; a tensor-parallel shard's datasets
``placement = "Shard(-1)"``.
New files use the HDF5 1.10 object format (``libver="v110"``: smaller and quicker to write for many
small groups and attributes; any HDF5 ≥ 1.10 reads them); files written in the older format read alike.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import queue
import threading
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from . import outputs, stats
from .errors import CaptureFormatError, CorruptDataError, HwdiffError
from .inputs import Inputs
from .structure import offset_from_class

log = logging.getLogger(__name__)

SCHEMA = "hwdiff/capture/1"
SCHEMA_FAMILY, SCHEMA_MAJOR = SCHEMA.rsplit("/", 1)
MODES = ("full", "sample", "stats")
# Lossless filters a capture may be written with (docs/benchmarks.md, "Compression"): HDF5's own
# gzip and lzf (byte shuffle first), and Blosc's lz4 with bit shuffle / Blosc2's zstd with byte shuffle
# from the hdf5plugin package (pip install hdf5plugin), which any reader then needs too.
COMPRESSIONS = ("gzip", "lzf", "lz4", "zstd")
PLUGIN_FILTERS = {32001: "blosc", 32026: "blosc2"}  # HDF5 filter id → name, read through hdf5plugin
GENERATE_MODE = "generate"  # root ``mode`` of a greedy generation file (:mod:`hwdiff.generate`)
LOGPROB_FIELDS = ("next_token", "entropy", "topk_ids", "topk_logprobs")
SLOTS = ("output", "input", "routing")  # routing: a router's chosen experts per token (int64 [sequences, tokens, k])
ROUTED = "routed"  # slot attribute ``rows``: rows of the tokens routed to one expert, scattered to their token
FLAT = "tokens"  # slot attribute ``rows``: the module saw [sequences·tokens, …] rows, stored [sequences, tokens, …]
EXPERTS = "experts"  # ``rows``: [experts, sequences·tokens, …] (every token at every expert), stored [sequences, tokens, experts, …]
EXPERT_ROWS = "expert-rows"  # ``rows``: [experts·sequences·tokens, …], stored [sequences, tokens, experts, …]
CHUNK_BYTES = 4 << 20
STATS_FIELDS = stats.FIELDS


def encode(tensor: Any) -> np.ndarray:
    """Host torch tensor → the numpy array stored: bfloat16 as its raw uint16 bits, else as is."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored array → exact numpy values: bfloat16 bits widen losslessly to float32."""
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored


def decoded(array: np.ndarray) -> np.ndarray:
    """Values of an array given as stored or already decoded: bfloat16 is the only dtype stored as
    integers (uint16 bit patterns), so a uint16 array is widened and anything else returned as is."""
    return decode(array, "bfloat16") if array.dtype == np.uint16 else array


def compression_options(name: str | None) -> dict[str, Any]:
    """``create_dataset`` keywords of a :data:`COMPRESSIONS` name (None: no filter but the checksum)."""
    if name is None:
        return {}
    if name in ("gzip", "lzf"):
        return {"compression": name, "shuffle": True}
    if name not in COMPRESSIONS:
        raise HwdiffError(f"compression must be one of {', '.join(COMPRESSIONS)} or none, got {name!r}")
    try:
        import hdf5plugin
    except ImportError as exc:
        raise HwdiffError(f"compression {name} needs the hdf5plugin package (pip install hdf5plugin), "
                          "and so does every machine that reads the file; gzip and lzf need nothing") from exc
    if name == "lz4":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
    return dict(hdf5plugin.Blosc2(cname="zstd", clevel=1, filters=hdf5plugin.Blosc2.SHUFFLE))


_SCALAR = h5py.h5s.create(h5py.h5s.SCALAR)
_ATTR_TYPES: dict[type, tuple[Any, Any, Any]] = {}  # Python type → (numpy dtype, stored type, memory type)


def set_attrs(obj: h5py.Group | h5py.Dataset, values: dict[str, Any]) -> None:
    """``obj.attrs.update(values)`` in about half the time for new scalar str / int / float / bool
    attributes (h5py's ``attrs.create`` spends most of its ~40 µs in Python; a capture writes ~700),
    with the very HDF5 types h5py gives them; anything else, or a name already there, goes through h5py."""
    for key, value in values.items():
        kind, name = type(value), key.encode()
        fast = kind in (str, float, bool) or (kind is int and -2**63 <= value < 2**63)
        if not fast or h5py.h5a.exists(obj.id, name):
            obj.attrs[key] = value
            continue
        if kind not in _ATTR_TYPES:
            dtype = h5py.string_dtype() if kind is str else np.asarray(value).dtype
            _ATTR_TYPES[kind] = (dtype, h5py.h5t.py_create(dtype, logical=True), h5py.h5t.py_create(dtype))
        dtype, stored, memory = _ATTR_TYPES[kind]
        h5py.h5a.create(obj.id, name, stored, _SCALAR).write(np.array(value, dtype=dtype), mtype=memory)


# Property lists as h5py's high-level calls make them (no timestamps; intermediate groups created; str
# names in UTF-8), built once: a capture creates ~100-400 groups and datasets, and h5py's high-level
# create_group / create_dataset spend most of their time in Python rebuilding them (docs/benchmarks.md).
_GROUP_PLIST = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
_GROUP_PLIST.set_obj_track_times(False)
_LINK_PLIST = h5py.h5p.create(h5py.h5p.LINK_CREATE)
_LINK_PLIST.set_create_intermediate_group(True)
_LINK_PLIST.set_char_encoding(h5py.h5t.CSET_UTF8)
_DATASET_PLISTS: dict[tuple, Any] = {}  # (chunks or None, fletcher32) → dataset creation property list
_TYPES: dict[np.dtype, Any] = {}  # numpy dtype → HDF5 type, as h5py makes it (py_create, logical)


def new_group(parent: h5py.Group, name: str) -> h5py.Group:
    """``parent.create_group(name)`` with the same group properties, through HDF5's own call."""
    if h5py.get_config().track_order:  # h5py's global option changes the properties: its own call then
        return parent.create_group(name)
    return h5py.Group(h5py.h5g.create(parent.id, name.encode(), lcpl=_LINK_PLIST, gcpl=_GROUP_PLIST))


def _dataset_plist(chunks: tuple[int, ...] | None) -> Any:
    key = (chunks, chunks is not None)
    plist = _DATASET_PLISTS.get(key)
    if plist is None:
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        if chunks is not None:
            plist.set_chunk(chunks)
            plist.set_fletcher32()
        plist.set_obj_track_times(False)
        plist = _DATASET_PLISTS[key] = plist
    return plist


def _new_dataset(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: np.dtype,
                 chunks: tuple[int, ...] | None, data: np.ndarray | None = None) -> h5py.Dataset:
    """A new dataset with the properties ``create_dataset`` gives it (Fletcher-32 when chunked, no
    other filter), made through HDF5's own calls with cached property lists and types."""
    dtype = np.dtype(dtype)
    kind = _TYPES.get(dtype)
    if kind is None:
        kind = _TYPES[dtype] = h5py.h5t.py_create(dtype, logical=True)
    space = _SCALAR if shape == () else h5py.h5s.create_simple(shape)
    dataset = h5py.h5d.create(group.id, name.encode(), kind, space, dcpl=_dataset_plist(chunks), lcpl=_LINK_PLIST)
    if data is not None:
        dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, data)
    return h5py.Dataset(dataset)


def create_checked(group: h5py.Group, name: str, *, data: Any = None, **kwargs: Any) -> h5py.Dataset:
    """``group.create_dataset`` with a checksum: the Fletcher-32 filter on every chunked or
    chunkable dataset, a ``crc32`` attribute of the bytes on a scalar one (HDF5 filters need chunks)."""
    shape = kwargs.get("shape", np.shape(data) if data is not None else ())
    fast = _fast_dataset(group, name, data, shape, kwargs)
    if fast is not None:
        return fast
    if len(shape) == 0:
        dataset = group.create_dataset(name, data=data, **kwargs)
        # the bytes a reader gets back: a numeric or record value is stored as given (h5py made the
        # dataset's type from it); a string or object is read back
        value = np.asarray(data)
        if value.dtype.hasobject or value.dtype.kind in "OSU" or (value.dtype.kind == "V" and not value.dtype.names):
            value = np.asarray(dataset[()])
        set_attrs(dataset, {"crc32": zlib.crc32(value.tobytes())})
        return dataset
    if 0 in shape:
        return group.create_dataset(name, data=data, **kwargs)
    return group.create_dataset(name, data=data, fletcher32=True, **kwargs)


def _fast_dataset(group: h5py.Group, name: str, data: Any, shape: tuple, kwargs: dict) -> h5py.Dataset | None:
    """:func:`create_checked`'s common cases through :func:`_new_dataset`: a scalar numeric or record
    value (its ``crc32`` attribute), or a chunked numeric dataset with no filter but the checksum;
    None for anything else (strings, objects, compression, empty shapes), which h5py then makes."""
    if h5py.get_config().track_order or set(kwargs) - {"shape", "dtype", "chunks"}:
        return None
    if len(shape) == 0:
        value = np.asarray(data) if data is not None else None
        if value is None or value.dtype.hasobject or value.dtype.kind not in "biufV" \
                or (value.dtype.kind == "V" and not value.dtype.names) or value.shape != ():
            return None
        dataset = _new_dataset(group, name, (), value.dtype, None, value)
        set_attrs(dataset, {"crc32": zlib.crc32(value.tobytes())})
        return dataset
    chunks = kwargs.get("chunks")
    dtype = np.dtype(kwargs["dtype"]) if "dtype" in kwargs else (np.asarray(data).dtype if data is not None else None)
    if 0 in shape or dtype is None or dtype.kind not in "biuf" or (data is None and chunks is None):
        return None
    if data is not None:
        data = np.ascontiguousarray(data, dtype=dtype)
        if chunks is None:  # h5py's own choice of chunk shape, as create_dataset(fletcher32=True) makes
            guess = getattr(getattr(h5py, "_hl", None) and h5py._hl.filters, "guess_chunk", None)
            if guess is None:
                return None
            chunks = guess(data.shape, None, dtype.itemsize)
    return _new_dataset(group, name, tuple(shape), dtype, tuple(chunks), data)


def nonfinite_counts(stored: np.ndarray, dtype: str) -> tuple[int, int]:
    """(NaN count, Inf count) of a stored array, read from the bits for bfloat16."""
    if dtype == "bfloat16":
        exponent_all_ones = (stored & 0x7F80) == 0x7F80
        nan = int(np.count_nonzero(exponent_all_ones & ((stored & 0x007F) != 0)))
        return nan, int(np.count_nonzero(exponent_all_ones)) - nan
    if stored.dtype.kind != "f":
        return 0, 0
    return int(np.count_nonzero(np.isnan(stored))), int(np.count_nonzero(np.isinf(stored)))


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
    layout: str = ""  # FLAT or ROUTED when the module's rows were not [sequences, …] (see ``rows`` attribute)
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
    weight_offset: float = 0.0  # 1.0 for norms computing x̂·(1 + w) (Gemma): the effective scale is 1 + w


@dataclass
class Signature:
    """How module ``name`` was called at ``call``: a :mod:`hwdiff.callspec` JSON spec."""

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

    def __init__(self, path: str | os.PathLike, *, meta: dict[str, Any], inputs: Inputs, mode: str,
                 sample_positions: np.ndarray | None = None, compression: str | None = None,
                 max_bytes: int = 1 << 30, synchronous: bool = False, placements: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.placements = placements or {}  # module → placement of its outputs (tensor-parallel shards)
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
        self._inside: dict[tuple[str, int], dict[str, tuple]] = {}  # call group → its slots as written
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

    def _write_header(self, meta: dict[str, Any], inputs: Inputs, positions: np.ndarray | None) -> None:
        set_attrs(self._file, {
            "schema": SCHEMA, "capture_id": uuid.uuid4().hex,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "mode": self.mode, "inputs_fingerprint": inputs.fingerprint, "inputs_source": inputs.source,
            **{key: _attr(value) for key, value in meta.items() if value is not None}, "complete": False})
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
            while self._queued_bytes and self._queued_bytes + size > self._max_bytes and self._error is None:
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
                set_attrs(create_checked(self._groups[(name, call)], f"{slot}_stats", data=running.record()),
                          {"dtype": dtype})
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
                dataset = create_checked(group, name, shape=(self.rows, *array.shape[1:]), dtype=array.dtype,
                                         chunks=_chunk_shape((self.rows, *array.shape[1:]), array.itemsize))
            if array.shape[1:] != dataset.shape[1:]:
                raise HwdiffError(f"token log-probabilities changed shape between batches: "
                                  f"{dataset.shape[1:]} then {array.shape[1:]}")
            dataset[item.row0: item.row0 + array.shape[0]] = array

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
        first: dict[str, int] = {}  # each module's first stored call (one pass: MoE models have thousands)
        for module, call in self._inside:
            first[module] = min(call, first.get(module, call))
        index = {}
        for name, entry in self._index.items():
            inside = self._inside[(name, first[name])] if name in first else {}
            output = inside.get("output", inside.get("output_stats"))
            if output is not None and output[0] == "alias":
                target, _, slot = output[1].rpartition("/")
                module, _, call = target.rpartition("/")
                output = self._inside.get((module, int(call)), {}).get(slot)  # dangling in stats mode
            index[name] = {**entry, "calls": self._calls.get(name, 0),
                           "shape": list(output[1]) if output is not None and "output" in inside else [],
                           "dtype": output[2] if output is not None else "",
                           "slots": [slot for slot in SLOTS if slot in inside or f"{slot}_stats" in inside],
                           "alias_of": inside["output"][1] if inside.get("output", ("",))[0] == "alias" else None}
        return index

    def _register(self, item: Register) -> None:
        group = self._module_group(item.name)  # a pre-hook may have stored its inputs already (it registers on return)
        set_attrs(group, {"kind": item.kind, "class_name": item.class_name, "order": item.order})
        self._index[item.name] = {
            "kind": item.kind, "class_name": item.class_name, "order": item.order, "has_weight": item.weight is not None,
            "weight_offset": float(item.weight_offset) if item.weight is not None
            else float(offset_from_class(item.class_name) or 0.0)}
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
        if group is None:  # this writer creates every group once (cached here): no lookups in the file
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
        return group[slot][row0: row0 + rows]

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
        dataset[item.row0: item.row0 + stored.shape[0]] = stored
        if item.layout:
            dataset.attrs["rows"] = item.layout
        if item.present is not None:
            self._present(item)
        nan, inf = item.nonfinite.tolist() if item.nonfinite is not None else nonfinite_counts(stored, item.dtype)
        if nan or inf:
            if item.slot == "output" and item.name not in self.nonfinite:  # -inf in an attention mask is fine
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
            self._inside[(item.name, item.call)][name] = ("data", (self.rows, present.shape[1]), "bool")
        group[name][item.row0: item.row0 + present.shape[0]] = present

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
        dataset = create_checked(group, item.slot, shape=shape, dtype=stored.dtype,
                                 chunks=_chunk_shape(shape, stored.itemsize), **self._filter)
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


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
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
        from . import rankstore

        self.path = Path(path)
        self._file = _open_h5(rankstore.manifest_of(self.path) if self.path.is_dir() else self.path)
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
        """The exact inputs of the run, as :class:`~hwdiff.inputs.Inputs`."""
        return Inputs(self.input_ids, self.attention_mask, source=str(self.meta.get("inputs_source", self.path)))

    @property
    def sample_positions(self) -> np.ndarray | None:
        node = self._file["inputs"].get("sample_positions")
        return None if node is None else read_checked(node)

    @property
    def is_generation(self) -> bool:
        """A greedy generation file (:mod:`hwdiff.generate`) rather than a layer capture."""
        return self.mode == GENERATE_MODE

    def token_logprobs(self) -> TokenLogProbs | None:
        """The ``/logprobs`` group, or None for files written without it (older hwdiff, no head)."""
        group = self._file.get("logprobs")
        if group is None:
            return None
        return TokenLogProbs(*(read_checked(group[name]) for name in LOGPROB_FIELDS),
                             attrs={key: _plain(value) for key, value in group.attrs.items()})

    def generation(self) -> Generation:
        """The ``/generation`` group of a greedy generation file."""
        group = self._file.get("generation")
        if group is None:
            raise CaptureFormatError(f"{self.path} is not a generation file (hwdiff generate); it has no /generation")
        attrs = {key: _plain(value) for key, value in group.attrs.items()}
        logprobs = TokenLogProbs(*(read_checked(group[name]) for name in ("logprobs", "entropy", "topk_ids",
                                                                           "topk_logprobs")), attrs)
        return Generation(read_checked(group["ids"]), read_checked(group["lengths"]), logprobs, attrs)

    def activation(self, name: str, call: int = 0, slot: str = "output") -> np.ndarray:
        """The whole stored slot, decoded exactly (bfloat16 widened to float32)."""
        dataset = self._dataset(name, call, slot)
        return decode(read_checked(dataset), dataset.attrs["dtype"])

    def iter_chunks(self, name: str, call: int = 0, slot: str = "output",
                    rows: int | None = None) -> Iterator[np.ndarray]:
        """Decoded blocks of ``rows`` sequences (default: as many as fit in about 16 MiB)."""
        dataset = self._dataset(name, call, slot)
        dtype = dataset.attrs["dtype"]
        row_bytes = max(int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize, 1)
        step = rows or max(1, (16 << 20) // row_bytes)
        for start in range(0, dataset.shape[0], step):
            yield decode(read_checked(dataset, (slice(start, start + step),)), dtype)

    def read(self, name: str, call: int, slot: str, index: tuple[slice, ...], *, stored: bool = False) -> np.ndarray:
        """A decoded block ``dataset[index]`` of a slot (see :func:`plan_blocks`); ``stored``: as
        stored instead (bfloat16 as its uint16 bit patterns, for readers that decode it themselves)."""
        key = (name, call, slot)
        opened = self._opened.get(key)
        if opened is None:  # the lookups cost more than reading a small block: once per slot
            dataset = self._dataset(name, call, slot)
            opened = (dataset, str(dataset.attrs["dtype"]))
            if len(self._opened) >= 64:  # e.g. every residual-stream position of the correlation pass
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

    def slot_info(self, name: str, call: int = 0, slot: str = "output") -> tuple[tuple[int, ...], str]:
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
        """The recorded call arguments of a module call (:mod:`hwdiff.callspec`), or None."""
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
        return decode(read_checked(group["weight"]), self.weight_dtype(name))

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
            raise HwdiffError(f"{self.path} is a 'stats' capture: it holds statistics, not activations")
        return self._node(name, call, slot)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Capture({str(self.path)!r}, device={self.meta.get('device')!r}, dtype={self.dtype!r}, "
                f"mode={self.mode!r}, modules={len(self.modules)})")


def _check_parallel(meta: dict[str, Any], file: Path, path: Path) -> None:
    """A multi-rank manifest is read only with every rank file of its run (:mod:`hwdiff.rankstore`);
    one rank's file of a tensor-parallel run holds shards and is refused on its own."""
    from . import rankstore

    if "rank_files" in meta:
        rankstore.check_ranks(file, meta)
    elif meta.get("parallel") == "tensor" and "rank" in meta:
        raise CaptureFormatError(
            f"{path} is rank {meta['rank']} of a {meta.get('world_size')}-rank tensor-parallel capture: it holds "
            f"shards of the column-parallel outputs; open its directory ({path.parent}) to read the whole tensors")


def read_checked(dataset: h5py.Dataset, index: Any = Ellipsis) -> np.ndarray:
    """``dataset[index]``, with a failed checksum (or any read error) turned into a
    :class:`CorruptDataError` that names the file and the dataset. A dataset written with a plugin
    filter (``--compression lz4 / zstd``) loads hdf5plugin on first need, or says it is missing."""
    try:
        values = dataset[index]
    except OSError as exc:
        values = _read_with_plugin(dataset, index, exc)
    crc = dataset.attrs.get("crc32") if dataset.shape == () else None
    if crc is not None and zlib.crc32(np.asarray(values).tobytes()) != int(crc):
        raise CorruptDataError(f"{dataset.file.filename}: dataset {dataset.name} is damaged (crc32 mismatch); "
                               "copy it again or capture again")
    return values


def _read_with_plugin(dataset: h5py.Dataset, index: Any, exc: OSError) -> np.ndarray:
    plugins = [int(key) for key in dataset._filters if str(key).isdigit() and int(key) in PLUGIN_FILTERS]
    where = dataset.file.filename
    if dataset.is_virtual:  # a multi-rank manifest: the filters, and any damage, are the rank files'
        where += " (read from the rank files of its directory: hwdiff inspect --verify DIR names the file)"
        plugins = _source_plugins(dataset)
    if plugins:
        try:
            import hdf5plugin  # noqa: F401  (registers its filters with HDF5)
        except ImportError:
            pass
        missing = [PLUGIN_FILTERS[key] for key in plugins if not h5py.h5z.filter_avail(key)]
        if missing:
            raise HwdiffError(f"{dataset.file.filename}: dataset {dataset.name} is compressed with {missing[0]}, "
                              "which needs the hdf5plugin package here: pip install hdf5plugin") from exc
        try:
            return dataset[index]
        except OSError as again:
            exc = again
    raise CorruptDataError(
        f"{where}: dataset {dataset.name} is damaged ({_h5_reason(exc)}); the file changed "
        "after it was written: copy it again or capture again (hwdiff inspect --verify lists every damaged dataset)"
    ) from exc


def _source_plugins(dataset: h5py.Dataset) -> list[int]:
    """The plugin filters (:data:`PLUGIN_FILTERS`) of a virtual dataset's first source (the rank
    files of one capture are written alike); every plugin filter when the source cannot be opened."""
    try:
        source = dataset.virtual_sources()[0]
        path = Path(dataset.file.filename).parent / source.file_name
        with h5py.File(path, "r") as handle:
            return [int(key) for key in handle[source.dset_name]._filters
                    if str(key).isdigit() and int(key) in PLUGIN_FILTERS]
    except (OSError, KeyError, IndexError):
        return list(PLUGIN_FILTERS)


def _h5_reason(exc: OSError) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return "checksum failed" if "filter returned failure" in text or "checksum" in text.lower() else text


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_file` found: datasets read, and ``(dataset, problem)`` for each damaged one."""

    path: Path
    datasets: int
    problems: tuple[tuple[str, str], ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"damaged  {name}: {problem}" for name, problem in self.problems]
        state = "every checksum holds" if self.ok else f"{len(self.problems)} damaged"
        return "\n".join([*lines, f"verified {self.path}: {self.datasets} datasets read, {state}"])


def verify_file(path: str | os.PathLike, *, block_elements: int = 1 << 22) -> Verification:
    """Read every dataset of an HDF5 file (a capture or a diff.h5) and check its checksum; for a
    capture also that no activation holds other NaN/Inf counts than recorded when it was written.
    A multi-rank capture directory: its manifest and every rank file (each dataset read once)."""
    if Path(path).is_dir():
        return _verify_directory(Path(path), block_elements)
    handle = _open_h5(Path(path))
    problems: list[tuple[str, str]] = []
    try:
        names: list[str] = []
        handle.visititems(lambda name, node: names.append(name) if isinstance(node, h5py.Dataset) else None)
        names = [name for name in names if not handle[name].is_virtual]  # read through their rank files
        for name in names:
            problem = _verify_dataset(handle[name], block_elements)
            if problem:
                problems.append(("/" + name, problem))
    finally:
        handle.close()
    return Verification(Path(path), len(names), tuple(problems))


def _verify_directory(folder: Path, block_elements: int) -> Verification:
    from . import rankstore

    manifest = rankstore.manifest_of(folder)
    with open_capture(folder) as cap:  # refuses a missing or foreign rank file
        files = [manifest] + [folder / entry["file"] for entry in json.loads(cap.meta["rank_files"])]
    datasets, problems = 0, []
    for file in files:
        found = verify_file(file, block_elements=block_elements)
        datasets += found.datasets
        problems += [(f"{file.name}:{name}", problem) for name, problem in found.problems]
    return Verification(folder, datasets, tuple(problems))


def _verify_dataset(dataset: h5py.Dataset, block_elements: int) -> str | None:
    counted = [0, 0]
    dtype = str(dataset.attrs.get("dtype", ""))
    try:
        for index in plan_blocks(tuple(dataset.shape), block_elements) if dataset.shape else [()]:
            block = read_checked(dataset, index)
            if dtype and dataset.dtype.kind in "fu":
                nan, inf = nonfinite_counts(block, dtype)
                counted[0] += nan
                counted[1] += inf
    except CorruptDataError as exc:
        return "crc32 mismatch" if "crc32" in str(exc) else _h5_reason(exc.__cause__) if exc.__cause__ else str(exc)
    recorded = (int(dataset.attrs.get("nan_count", 0)), int(dataset.attrs.get("inf_count", 0)))
    if dtype and tuple(counted) != recorded and dataset.name.split("/")[-1] in SLOTS:
        return (f"holds {counted[0]} NaN and {counted[1]} Inf, but {recorded[0]} NaN and {recorded[1]} Inf were "
                "recorded when it was written: its values were changed afterwards")
    return None


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
    return [(slice(r, r + 1), slice(t, min(t + tokens, shape[1])))
            for r in range(shape[0]) for t in range(0, shape[1], tokens)]


def open_capture(path: str | os.PathLike, *, allow_incomplete: bool = False) -> Capture:
    """Open a capture for reading; raises :class:`CaptureFormatError` for anything else.

    Refuses files that are not HDF5, truncated, of another schema or major version, or incomplete
    (unless ``allow_incomplete``). ``path`` may be a multi-rank capture directory
    (:mod:`hwdiff.rankstore`): it reads as one capture, and is refused without its manifest or with a
    missing or foreign rank file.
    """
    return Capture(path, allow_incomplete=allow_incomplete)


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise CaptureFormatError(f"{path}: no such file")
    if path.is_dir():
        raise CaptureFormatError(f"{path} is a directory, not a capture file")
    try:
        # No HDF5 chunk cache: readers take whole rows (whole chunks) once, and the cache only copied
        # every chunk once more and held ~1 MB per open dataset (4x slower reads of a capture).
        return h5py.File(path, "r", rdcc_nbytes=0)
    except OSError as exc:
        detail = "truncated" if "truncated" in str(exc) else "not an HDF5 file or damaged"
        raise CaptureFormatError(f"{path} is not a readable capture ({detail}: {exc})") from exc


def _read_meta(handle: h5py.File, path: Path) -> dict[str, Any]:
    meta = {key: _plain(value) for key, value in handle.attrs.items()}
    schema = meta.get("schema")
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_FAMILY + "/"):
        raise CaptureFormatError(f"{path} is an HDF5 file but not an hwdiff capture (schema {schema!r})")
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
    index = json.loads(read_checked(node, ()))
    if set(index) != set(handle["modules"]):  # changed after it was written: trust the groups
        log.warning("%s: /module_index does not list the groups under /modules; reading the groups",
                    handle.filename)
        return None
    modules = [ModuleInfo(name=name, kind=entry["kind"], class_name=entry["class_name"], calls=entry["calls"],
                          order=entry["order"], shape=tuple(entry["shape"]), dtype=entry["dtype"],
                          slots=tuple(entry["slots"]), alias_of=entry["alias_of"], has_weight=entry["has_weight"],
                          weight_offset=entry["weight_offset"]) for name, entry in index.items()]
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
        output = first.get("output", first.get("output_stats")) if inside & {"output", "output_stats"} else None
        modules.append(ModuleInfo(
            name=name, kind=str(attrs["kind"]), class_name=str(attrs["class_name"]),
            calls=int(attrs.get("calls", len(stored_calls))),  # written when the capture finished
            order=int(attrs["order"]),
            shape=tuple(output.shape) if output is not None and "output" in inside else (),
            dtype=str(output.attrs["dtype"]) if output is not None else "",
            slots=slots,
            alias_of=_plain(first.attrs.get("output_alias_of")) if first is not None else None,
            has_weight="weight" in keys,
            weight_offset=float(attrs.get("weight_offset", offset_from_class(str(attrs["class_name"])) or 0.0)),
        ))
    return {info.name: info for info in sorted(modules, key=lambda info: info.order)}
