"""Scoped forward hooks: ``with hwdiff.record(model) as rec:`` sees every selected module's output.

Hooks are removed in ``finally`` and the model is never modified. Outputs leave the device through
asynchronous copies into pinned host memory; a sink (the capture writer) waits for each copy's
event on its own thread, so the forward is not stalled by transfers or file I/O. In ``stats`` mode an
accelerator first reduces each output to a few float64 numbers on the device (:mod:`hwdiff.store.stats`).
"""

from __future__ import annotations

import contextlib
import json
import math
import weakref
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from ..errors import HwdiffError
from ..store.format import EXPERT_ROWS, EXPERTS, FLAT, ROUTED, encode
from ..store.stats import partial_stats
from ..store.writer import Alias, Record, Register, Signature
from ..structure import (
    SemanticsError,
    expert_count,
    expert_from_name,
    expert_index,
    experts_per_token,
    flat_sequences,
    input_by_meaning,
    is_norm,
    module_kind,
    norm_offset,
    output_by_meaning,
    routed_tokens,
    routing_indices,
    row_layout,
    writes_into_arguments,
)
from ..structure.callspec import encode_call
from .models import dtype_name
from .selection import DEFAULT_KINDS, select_modules  # noqa: F401
from .tensors import _fingerprint, _first_input, _token_major, _version, first_tensor  # noqa: F401


def to_host(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
    """Start copying ``tensors`` to host memory; returns ``(host tensors, event or None)``.

    On an accelerator the copies are asynchronous into pinned memory, ordered on the current stream
    before any later kernel, and readable once the returned event has completed. On the CPU they are
    plain copies, so later in-place changes to an activation cannot reach the recorded value.
    """
    if tensors[0].device.type == "cpu":
        return [t.detach().clone(memory_format=torch.contiguous_format) for t in tensors], None
    hosts = []
    for tensor in tensors:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor.detach(), non_blocking=True)
        hosts.append(host)
    event = getattr(torch, tensors[0].device.type).Event()
    event.record()
    return hosts, event


class MemorySink:
    """Keeps records in memory: ``activations[(name, call, slot)]`` is a list, one tensor per forward."""

    def __init__(self) -> None:
        self.activations: dict[tuple[str, int, str], list[torch.Tensor]] = defaultdict(list)
        self.kinds: dict[str, str] = {}

    def stored_rows(self, key: str, row0: int, rows: int) -> np.ndarray | None:
        """The rows kept for slot ``key`` (``name/call/slot``) in this forward, encoded as stored."""
        name, call, slot = key.rsplit("/", 2)
        kept = self.activations.get((name, int(call), slot))
        return encode(kept[-1]) if kept else None

    def put(self, item: Record | Register | Alias | Signature) -> None:
        if isinstance(item, Signature):
            return
        if isinstance(item, Register):
            self.kinds[item.name] = item.kind
        elif isinstance(item, Alias):
            name, call, slot = item.target.rsplit("/", 2)
            self.activations[(item.name, item.call, item.slot)].append(
                self.activations[(name, int(call), slot)][-1]
            )
        else:
            if item.event is not None:
                item.event.synchronize()
            self.activations[(item.name, item.call, item.slot)].append(item.array)


class Recorder:
    """The hooks of one :func:`record` scope. Set ``row0`` (and ``tokens`` and ``positions`` in
    sample mode) before each forward; call indices restart at every top-level forward of the model."""

    def __init__(
        self,
        model: torch.nn.Module,
        selection: list[tuple[str, torch.nn.Module, str]],
        *,
        mode: str,
        record_inputs: bool,
        sink: Any,
    ) -> None:
        self.model, self.selection, self.mode = model, selection, mode
        self.record_inputs, self.sink = record_inputs, sink
        self.views = bool(
            getattr(sink, "synchronous", False)
        )  # the sink is done with a tensor when put() returns
        self.row0 = 0
        self.tokens = (
            0  # sequence length of the inputs: sample mode gathers along an axis of this size
        )
        self.batch = 0  # sequences in the current forward (read from its input_ids)
        self.positions: torch.Tensor | None = None
        self.active = (
            True  # False: the current forward is not recorded (set by a top-level pre-hook)
        )
        self.registered: dict[str, int] = {}
        self._calls: dict[str, int] = defaultdict(int)
        self._open: dict[str, list[int]] = defaultdict(
            list
        )  # call indices given by pre-hooks, not yet finished
        self._seen: dict[
            int, tuple[weakref.ref, str, int | None, Any]
        ] = {}  # id → (ref, key, version, fingerprint)
        self._links: dict[
            str, bool
        ] = {}  # slot key → stored as a link (decided at its first forward, kept)
        self._specs: set[tuple[str, int]] = set()
        self._weights = {
            name: module.weight.detach().to("cpu", copy=True)
            for name, module, kind in selection
            if is_norm(module)
        }
        self._handles: list[Any] = []
        self._top_k = experts_per_token(getattr(model, "config", None))
        self._routing: dict[
            str, torch.Tensor
        ] = {}  # MoE block name → experts chosen per flattened token
        self._experts: dict[
            str, int | None
        ] = {}  # MoE block name → experts its router chooses from
        self.unrecorded: dict[str, str] = {}  # module → why some of its calls could not be stored
        self._pending: list[
            tuple[str, int, str, str, torch.Tensor]
        ] = []  # stats reduced on the device
        self._row_wise: dict[
            str, int | None
        ] = {}  # norm → k of its token-major [batch·tokens·k, …] input
        self.token_major: dict[
            str, int
        ] = {}  # module → k, measured (hwdiff.structure.DataFlow.token_major)

    @property
    def never_called(self) -> list[str]:
        """Selected modules that no forward called (listed in the capture: absent is not exact)."""
        return [name for name, _, _ in self.selection if name not in self.registered]

    @property
    def activations(self) -> dict[tuple[str, int, str], list[torch.Tensor]]:
        return self.sink.activations

    def attach(self) -> None:
        self._handles.append(
            self.model.register_forward_pre_hook(self._new_forward, with_kwargs=True)
        )
        self._handles.append(self.model.register_forward_hook(lambda *_: self.flush_stats()))
        for name, module, kind in self.selection:
            if self.record_inputs:  # before the call: a module may update its arguments in place
                self._handles.append(
                    module.register_forward_pre_hook(self._pre_hook(name, kind), with_kwargs=True)
                )
            self._handles.append(
                module.register_forward_hook(self._hook(name, kind), with_kwargs=True)
            )
        selected = {name for name, _, _ in self.selection}
        for name, module in self.model.named_modules():  # routing is needed to place routed rows
            if name and name not in selected and module_kind(name, module) == "router":
                self._handles.append(module.register_forward_hook(self._routing_hook(name)))

    def detach(self) -> None:
        self.flush_stats()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def _new_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._calls.clear()
        self._open.clear()
        self._seen.clear()
        self._routing.clear()
        self._experts.clear()
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            self.batch, self.tokens = int(ids.shape[0]), int(ids.shape[1])
        elif (
            isinstance(ids, torch.Tensor) and ids.dim() == 1
        ):  # vLLM: flattened [num_tokens] ids and positions
            try:
                self.batch, self.tokens = flat_sequences(
                    kwargs.get("positions", args[1] if len(args) > 1 else None)
                )
            except (
                SemanticsError
            ):  # not whole prompts of one length: rows are kept as the modules return them
                self.batch = self.tokens = 0

    def _layout(self, tensor: torch.Tensor | None, name: str) -> str:
        """How ``tensor``'s rows relate to this forward's sequences (:func:`hwdiff.structure.row_layout`),
        with the expert count of the routed MoE block ``name`` sits in, if any."""
        if tensor is None:
            return ""
        block = self._block(name)
        experts = self._experts.get(block) if block is not None else None
        return row_layout(tuple(tensor.shape), self.batch, self.tokens, experts)

    def _block(self, name: str) -> str | None:
        """The innermost routed MoE block (its router ran in this forward) that module ``name`` is in."""
        return max((b for b in self._routing if name.startswith(b + ".")), key=len, default=None)

    def _routing_hook(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            self._note_routing(name, output)

        return hook

    def _note_routing(self, name: str, output: Any) -> torch.Tensor | None:
        indices = routing_indices(output, self._top_k)
        if indices is not None:
            block = name.rpartition(".")[0]
            self._routing[block] = indices.detach().to("cpu")
            self._experts[block] = expert_count(output, getattr(self.model, "config", None))
        return indices

    def _pre_hook(self, name: str, kind: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.active:
                return
            call = self._calls[name]
            self._calls[name] = call + 1
            self._open[name].append(
                call
            )  # registered when it returns: the order is the order of completion
            self._record_call(name, call, module, args, kwargs)

        return hook

    def _hook(self, name: str, kind: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self.active:
                return
            if self._open[name]:
                call = self._open[name].pop()
            else:
                call = self._calls[name]
                self._calls[name] = call + 1
            if name not in self.registered:
                self._register(name, kind, module)
            try:
                meant = output_by_meaning(module, output)
            except SemanticsError as exc:
                self.unrecorded[name] = str(exc)
                return
            if (
                is_norm(module) and args
            ):  # a norm is row-wise: its output rows are ordered as its input's
                self._row_wise[name] = _token_major(args[0], self.batch, self.tokens)
            # measured: an output living in an argument's memory holds new values in an old tensor
            self._emit(
                name, call, "output", meant, fresh=writes_into_arguments(output, args, kwargs)
            )
            if kind == "router":
                self._emit(name, call, "routing", self._note_routing(name, output))

        return hook

    def _record_call(
        self, name: str, call: int, module: torch.nn.Module, args: tuple, kwargs: dict
    ) -> None:
        """The main input (by meaning: :func:`hwdiff.structure.input_by_meaning`); in full mode also
        every argument, for replay (:mod:`hwdiff.structure.callspec`). A routed expert call keeps only its main
        input: replay does not run single experts. Runs before the call (a pre-hook)."""
        meant = input_by_meaning(module, args, kwargs)
        main = meant if meant is not None else _first_input(args, kwargs)
        routed = self._layout(main, name) == ROUTED and not (
            main is not None and self._rows_per_token(name, main)
        )
        if self.mode != "full" or routed:
            self._emit(name, call, "input", main)
            return
        spec, tensors = encode_call(args, kwargs, main_slot=meant is None)
        if (
            meant is not None
        ):  # every argument keeps its own slot; "input" is the stream the module reads
            tensors = [("input", meant)] + tensors
        if (name, call) not in self._specs:
            self._specs.add((name, call))
            self.sink.put(Signature(name, call, json.dumps(spec)))
        rows = tensors[0][1].shape[0] if tensors else 1
        for slot, tensor in tensors:
            self._emit(name, call, slot, tensor, rows=rows)

    def _register(self, name: str, kind: str, module: torch.nn.Module) -> None:
        self.registered[name] = len(self.registered)
        weight = self._weights.get(name)
        self.sink.put(
            Register(
                name,
                kind,
                type(module).__name__,
                self.registered[name],
                weight,
                dtype_name(weight.dtype) if weight is not None else "",
                norm_offset(module) if weight is not None else 0.0,
            )
        )

    def _emit(
        self,
        name: str,
        call: int,
        slot: str,
        tensor: torch.Tensor | None,
        rows: int | None = None,
        fresh: bool = False,
    ) -> None:
        """Send one slot to the sink; a tensor already sent in this forward becomes a link to it only
        when its values are measured unchanged since (:func:`_unchanged`: its version counter, or —
        for inference tensors, which have none — the sum of its values): a parent may change its
        child's output in place before returning it (Llama 4's MoE: ``out.add_(…)``). ``fresh``: the
        module wrote into its arguments (measured by the caller): stored as itself.
        ``rows``: expand a broadcast first axis of 1 to the batch (recorded call arguments)."""
        if tensor is None:
            return
        source = tensor  # what later modules may return again (aliases are found by identity)
        if rows is not None and tensor.dim() and tensor.shape[0] == 1 and rows > 1:
            tensor = tensor.expand(rows, *tensor.shape[1:])
        layout, present = self._layout(tensor, name), None
        per_token = self._rows_per_token(name, source) if layout == ROUTED else None
        if (
            per_token
        ):  # [batch·tokens·k, …] rows of a token-major view: stored as [batch, tokens, k, …]
            layout, tensor = (
                FLAT,
                tensor.reshape(self.batch, self.tokens, per_token, *tensor.shape[1:]),
            )
        elif layout == ROUTED:
            routed = self._routed(name, call, tensor)
            if routed is None:
                return
            call, tensor, present = routed
        elif layout == FLAT:
            tensor = tensor.reshape(self.batch, self.tokens, *tensor.shape[1:])
        elif layout in (
            EXPERTS,
            EXPERT_ROWS,
        ):  # expert-major rows → [sequences, tokens, experts, …]
            experts = self._experts[self._block(name)]
            tail = tensor.shape[2:] if layout == EXPERTS else tensor.shape[1:]
            tensor = tensor.reshape(experts, self.batch, self.tokens, *tail).movedim(0, 2)
        key = f"{name}/{call}/{slot}"
        seen = self._seen.get(id(source))
        version = _version(source)
        same = seen is not None and seen[0]() is source and not fresh and layout != ROUTED
        if self._link(key, same and self._unchanged(source, tensor, version, seen)):
            self.sink.put(Alias(name, call, slot, seen[1]))
            return
        fingerprint = (
            _fingerprint(source) if version is None and not self._reads_back(source) else None
        )
        self._seen[id(source)] = (weakref.ref(source), key, version, fingerprint)
        if self.mode == "stats" and _batched_stats(
            tensor
        ):  # reduced where it is, sent once per forward
            self._pending.append(
                (name, call, slot, dtype_name(tensor.dtype), partial_stats(tensor))
            )
        elif (
            self.mode == "stats" and self.views
        ):  # reduced now, before anything can change the tensor
            self.sink.put(
                Record(
                    name,
                    call,
                    slot,
                    self.row0,
                    partial_stats(tensor),
                    dtype_name(tensor.dtype),
                    reduced=True,
                )
            )
        else:  # a queued CPU copy is reduced (stats mode) or its NaN / Inf counted by the writer thread
            record = slot_record(
                name, call, slot, self.row0, self._sampled(tensor), copy=not self.views
            )
            record.layout, record.present = (
                layout,
                None if present is None else self._sampled(present),
            )
            self.sink.put(record)

    def _unchanged(
        self, source: torch.Tensor, tensor: torch.Tensor, version: int | None, seen: tuple
    ) -> bool:
        """Whether ``source``, recorded before in this forward under ``seen[1]``, still holds the values
        recorded then — measured: its version counter did not move; or, for an inference tensor (capture
        and vLLM's engine run under ``torch.inference_mode``, where torch keeps no counter), the sum of its
        values on its device is the same (accelerators), or (CPU) the rows the sink stored for it equal
        its values now. A parent may change its child's output in place before returning it (Llama 4's
        MoE: ``out.add_(routed)``); without a measurement the tensor is stored again."""
        if version is not None or seen[2] is not None:
            return version == seen[2]
        if seen[3] is not None:
            return bool(torch.equal(_fingerprint(source), seen[3]))
        if not self._reads_back(source):
            return False
        now = self._sampled(tensor)
        before = self.sink.stored_rows(seen[1], self.row0, now.shape[0])
        return before is not None and np.array_equal(before, encode(now.detach().to("cpu")))

    def _reads_back(self, tensor: torch.Tensor) -> bool:
        """Whether a link candidate of this CPU tensor can be checked against the rows the sink already
        stored (a synchronous writer, the in-memory sink); otherwise its values are summed when recorded."""
        synchronous = getattr(self.sink, "synchronous", isinstance(self.sink, MemorySink))
        return (
            tensor.device.type == "cpu"
            and synchronous
            and hasattr(self.sink, "stored_rows")
            and self.mode != "stats"
        )

    def _link(self, key: str, unchanged: bool) -> bool:
        """Whether slot ``key`` is stored as a link in this forward: decided at its first forward and kept
        for every later batch (a file holds one or the other for all rows). A link whose tensor changed
        in a later batch is refused: the rows already linked cannot be taken back."""
        linked = self._links.setdefault(key, unchanged)
        if linked and not unchanged:
            raise HwdiffError(
                f"{key} was stored as a link to an earlier module's output, and in the batch at row "
                f"{self.row0} that tensor changed in place first; capture with one batch "
                "(--batch-size at least the number of sequences)"
            )
        return linked

    def flush_stats(self) -> None:
        """Send the statistics reduced on the device during this forward: one [slots, 9] buffer
        stacked on the device and one asynchronous copy to the host per forward, instead of a copy
        (and an event for the writer to wait on) per module."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        (host,), event = to_host(torch.stack([parts for *_, parts in pending]))
        for row, (name, call, slot, dtype, _) in enumerate(pending):
            self.sink.put(
                Record(name, call, slot, self.row0, host[row], dtype, event, reduced=True)
            )

    def _rows_per_token(self, name: str, tensor: torch.Tensor) -> int | None:
        """k when ``tensor``'s rows are provably ``[batch, tokens, k]`` in that order: a view of a
        contiguous ``[batch, tokens, …]`` tensor (Qwen3-Next's gated norm sees ``[b·t·heads, d]``), or
        the output of a norm whose input was one; else None (routed MoE rows, or an order not known)."""
        measured = self.token_major.get(name)
        if measured and self.batch and tensor.shape[0] == measured * self.batch * self.tokens:
            return measured
        return _token_major(tensor, self.batch, self.tokens) or self._row_wise.get(name)

    def _routed(
        self, name: str, call: int, tensor: torch.Tensor
    ) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """(call index to store under, rows scattered to their tokens [batch, tokens, …], bool presence
        [batch, tokens]) of a call with a variable number of rows inside an MoE block; None, with the
        reason kept in :attr:`unrecorded`, when its tokens cannot be told."""
        block = self._block(name)
        if block is None or self.mode == "stats":
            self.unrecorded[name] = (
                "a variable number of rows outside any routed MoE block"
                if block is None
                else "routed rows are not reduced to statistics"
            )
            return None
        indices = self._routing[block]
        relative = name[len(block) + 1 :]
        expert = expert_index(relative, call, indices)
        tokens = routed_tokens(indices, expert) if expert is not None else None
        if tokens is None or len(tokens) != tensor.shape[0]:
            self.unrecorded[name] = (
                f"{tensor.shape[0]} rows per call that the routing of {block} does not place on tokens (an expert "
                "implementation that groups rows in its own order, such as transformers' grouped_mm; the experts "
                "module's per-token output is recorded — load the model with experts_implementation='eager' to "
                "record each expert's rows)"
            )
            return None
        dense = tensor.new_zeros(self.batch * self.tokens, *tensor.shape[1:])
        dense[tokens.to(tensor.device)] = tensor
        present = torch.zeros(self.batch * self.tokens, dtype=torch.bool)
        present[tokens] = True
        # A per-expert module keeps its call index; a fused module's calls are keyed by expert (the
        # k-th call is another expert on each side when routing differs).
        key = call if expert_from_name(relative) is not None else expert
        return (
            key,
            dense.reshape(self.batch, self.tokens, *tensor.shape[1:]),
            present.reshape(self.batch, self.tokens),
        )

    def _sampled(self, tensor: torch.Tensor) -> torch.Tensor:
        positions = self.positions
        if (
            self.mode != "sample"
            or positions is None
            or tensor.dim() < 2
            or tensor.shape[0] != positions.shape[0]
            or tensor.shape[1] != self.tokens
        ):
            return tensor
        rows = torch.arange(positions.shape[0], device=tensor.device)[:, None]
        return tensor[rows, positions.to(tensor.device)]


def _batched_stats(tensor: torch.Tensor) -> bool:
    """Whether a stats-mode slot is reduced on its device and sent with the forward's other slots
    (accelerators); on the CPU each slot is reduced by the compiled kernel as it comes."""
    return tensor.device.type != "cpu"


def slot_record(
    name: str, call: int, slot: str, row0: int, tensor: torch.Tensor, *, copy: bool = True
) -> Record:
    """A :class:`Record` of ``tensor`` on its way to the host. On an accelerator the copy is
    asynchronous and NaN / Inf are counted on the device, where that is nearly free. On the CPU the
    tensor is copied for a writer thread, which counts them; with ``copy=False`` (a synchronous
    sink) it is passed as a contiguous view, counted here."""
    dtype = dtype_name(tensor.dtype)
    if tensor.device.type == "cpu":
        if not copy:
            host = tensor.detach().contiguous()
            return Record(name, call, slot, row0, host, dtype, nonfinite=nonfinite_counts(host))
        (host,), _ = to_host(tensor)
        return Record(name, call, slot, row0, host, dtype)
    (host, counts), event = to_host(tensor, nonfinite_counts(tensor))
    return Record(name, call, slot, row0, host, dtype, event, nonfinite=counts)


def nonfinite_counts(tensor: torch.Tensor) -> torch.Tensor:
    """int64 ``[NaN count, Inf count]`` of a tensor, on its device (on an accelerator without a host
    synchronization; on the CPU one min/max pass settles the common all-finite case)."""
    if not tensor.is_floating_point() or not tensor.numel():
        return torch.zeros(2, dtype=torch.int64, device=tensor.device)
    if tensor.device.type == "cpu":
        low, high = torch.aminmax(tensor)  # NaN propagates: both finite means neither NaN nor Inf
        if math.isfinite(low.item()) and math.isfinite(high.item()):
            return torch.zeros(2, dtype=torch.int64)
    return torch.stack([torch.isnan(tensor).sum(), torch.isinf(tensor).sum()])


@contextlib.contextmanager
def record(
    model: torch.nn.Module,
    modules: str | Iterable[str] | None = None,
    *,
    kinds: str | Iterable[str] | None = None,
    mode: str = "full",
    record_inputs: bool = False,
    sink: Any = None,
    sub_blocks: dict[str, str] | None = None,
    token_major: dict[str, int] | None = None,
) -> Iterator[Recorder]:
    """Hook the selected modules of ``model`` for the duration of a ``with`` block.

    Without a ``sink`` the recorded host tensors are kept in memory: ``rec.activations[(name, call,
    slot)]`` lists one tensor per top-level forward (``slot`` is ``"output"`` or ``"input"``).
    See :func:`select_modules` for ``modules``, ``kinds`` and ``sub_blocks``. Every hook is removed on exit.
    """
    selection = select_modules(model, modules, kinds, sub_blocks)
    recorder = Recorder(
        model,
        selection,
        mode=mode,
        record_inputs=record_inputs,
        sink=sink if sink is not None else MemorySink(),
    )
    recorder.token_major = dict(token_major or {})
    recorder.attach()
    try:
        yield recorder
    finally:
        recorder.detach()
