"""Capture inside a vLLM / vLLM-Ascend worker: hooks on the model object the worker holds, while the
engine runs its own batch (see docs/vllm.md for the calls on each machine).

vLLM's model forward takes *flattened* ``input_ids`` and ``positions`` (``[num_tokens]``, the
scheduled requests one after another, no batch axis). :func:`record_vllm` reads them from the
forward the engine actually ran, tells the sequences from the positions
(:func:`hwdiff.structure.flat_sequences`: whole prompts of one length), stores those token ids as
the capture's inputs and every module's ``[num_tokens, …]`` rows as ``[sequences, tokens, …]``
(attribute ``rows = "tokens"``), so a diff against a Hugging Face capture of the same token ids
compares like with like (``hwdiff diff hf.h5 vllm.h5 --map vllm``). Fused norms and decoder layers
are stored by meaning (:mod:`hwdiff.structure`: the normed output, the residual stream).

One forward is recorded: the first whose batch is whole prompts of one length (the prefill of
``llm.generate(prompts, SamplingParams(max_tokens=1))``); later forwards (decode steps) are skipped
and counted. The engine must run eagerly (``enforce_eager=True``): hooks do not run inside CUDA /
ACL graphs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .capturing.hooks import Recorder, select_modules
from .capturing.inputs import Inputs
from .capturing.run import (
    CaptureOptions,
    capture_metadata,
    model_device_and_dtype,
    sample_positions,
)
from .common import outputs
from .errors import HwdiffError
from .store.format import MODES
from .store.writer import CaptureWriter
from .structure import SemanticsError, flat_sequences

log = logging.getLogger(__name__)


@dataclass
class VllmCapture:
    """What :func:`record_vllm` did: the file (once the scope has closed), the batch recorded
    (``sequences`` × ``tokens``) and the forwards it skipped, with why."""

    path: Path | None = None
    sequences: int = 0
    tokens: int = 0
    skipped: list[str] = field(default_factory=list)


class _LazyWriter:
    """The capture writer, opened by the first recordable forward (its token ids are the inputs)."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        mode: str,
        options: CaptureOptions,
        synchronous: bool,
    ) -> None:
        self.path, self.meta, self.mode, self.options = path, meta, mode, options
        self.synchronous = synchronous
        self.writer: CaptureWriter | None = None

    def open(self, ids: np.ndarray) -> np.ndarray | None:
        """Open the writer for ``ids`` [sequences, tokens]; returns the sample positions (sample mode)."""
        inputs = Inputs(
            ids.astype(np.int64), np.ones(ids.shape, dtype=np.int64), source="vllm engine batch"
        )
        positions = (
            sample_positions(inputs, self.options.tokens, self.options.seed)
            if self.mode == "sample"
            else None
        )
        self.writer = CaptureWriter(
            self.path,
            meta=self.meta,
            inputs=inputs,
            mode=self.mode,
            sample_positions=positions,
            compression=self.options.compression,
            synchronous=self.synchronous,
        )
        return positions

    def put(self, item: Any) -> None:
        self.writer.put(item)

    def stored_rows(self, key: str, row0: int, rows: int) -> np.ndarray | None:
        return self.writer.stored_rows(key, row0, rows)


class VllmRecorder(Recorder):
    """A :class:`~hwdiff.capturing.hooks.Recorder` for vLLM's flattened forward ``model(input_ids, positions, …)``."""

    def __init__(self, *args: Any, report: VllmCapture, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report = report

    def _new_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        super()._new_forward(module, args, kwargs)  # tells the sequences of a flattened batch
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        self.active = False
        if self.sink.writer is not None:
            self.report.skipped.append("a later forward (one forward is recorded)")
            return
        try:
            if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
                raise SemanticsError(
                    "the forward has no flattened input_ids [num_tokens] (inputs_embeds or "
                    "pipeline-parallel intermediate tensors)"
                )
            if not self.batch:
                flat_sequences(positions)  # raises, saying why the sequences cannot be told
        except SemanticsError as exc:
            self.report.skipped.append(str(exc))
            return
        sampled = self.sink.open(ids.detach().to("cpu").reshape(self.batch, self.tokens).numpy())
        self.positions = None if sampled is None else torch.from_numpy(sampled).to(ids.device)
        self.report.sequences, self.report.tokens = self.batch, self.tokens
        self.active = True


@contextlib.contextmanager
def record_vllm(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    modules: str | Iterable[str] | None = None,
    kinds: str | Iterable[str] | None = None,
    mode: str = "full",
    record_inputs: bool = False,
    compression: str | None = None,
    tokens: int = 16,
    seed: int = 0,
) -> Iterator[VllmCapture]:
    """Hook a vLLM model object (the one a worker holds: ``worker.model_runner.get_model()``) and write
    a capture of the first forward the engine runs inside the ``with`` block that is whole prompts of
    one length. ``modules`` / ``kinds`` / ``mode`` / ``record_inputs`` / ``compression`` as in
    :func:`hwdiff.capture`; ``tokens`` and ``seed``: K positions per sequence in ``sample`` mode. The
    file appears at ``path`` when the block closes; a block in which no forward was recordable raises
    :class:`HwdiffError` with the reasons. Token log-probabilities are not stored (vLLM computes logits
    outside the model's forward)."""
    if mode not in MODES:
        raise HwdiffError(f"unknown capture mode {mode!r}: expected {', '.join(MODES)}")
    outputs.check_outputs([], [path])
    started = time.perf_counter()
    options = CaptureOptions(
        batch_size=1,
        compression=compression,
        tokens=tokens,
        seed=seed,
        logprobs=False,
        progress=False,
    )
    device, dtype = model_device_and_dtype(model)
    meta = capture_metadata(model, device, dtype, mode, record_inputs, options)
    meta.update(layout="vllm", emulate="", vllm_class=type(model).__name__)
    report = VllmCapture()
    sink = _LazyWriter(Path(path), meta, mode, options, synchronous=device.type == "cpu")
    recorder = VllmRecorder(
        model,
        select_modules(model, modules, kinds),
        mode=mode,
        record_inputs=record_inputs,
        sink=sink,
        report=report,
    )
    recorder.attach()
    try:
        yield report
    except BaseException:
        if sink.writer is not None:
            sink.writer.abort()
        raise
    finally:
        recorder.detach()
    if sink.writer is None:
        raise HwdiffError(
            "no forward inside the record_vllm block was whole prompts of one length, nothing was "
            f"recorded ({'; '.join(sorted(set(report.skipped))) or 'the model never ran'}); run "
            "llm.generate on equal-length token prompts with enforce_eager=True and prefix caching off"
        )
    _check_hooks_ran(recorder)
    if report.skipped:
        log.info("record_vllm: %d later forward(s) not recorded", len(report.skipped))
    try:
        report.path = sink.writer.finish(
            {
                "capture_seconds": time.perf_counter() - started,
                "batch_size": report.sequences,
                "never_called": json.dumps(recorder.never_called),
                "unrecorded": json.dumps(recorder.unrecorded),
                "skipped_forwards": json.dumps(report.skipped),
            }
        )
    except BaseException:
        sink.writer.abort()
        raise


class HwdiffWorkerExtension:
    """A vLLM worker extension (``LLM(..., worker_extension_cls="hwdiff.vllm.HwdiffWorkerExtension")``):
    its methods run inside each worker, called by name through ``llm.collective_rpc`` (no function is
    pickled to the workers): ``collective_rpc("hwdiff_start", args=(path,))``, then ``llm.generate(...)``,
    then ``collective_rpc("hwdiff_stop")``; ``collective_rpc("hwdiff_apply_schedule", args=(sigma_yaml,
    step, total_steps))`` puts AQN noise on the rollout model. It works on the model object the worker
    holds (``self.model_runner.get_model()``, the same attribute on vLLM's GPU worker and vLLM-Ascend's
    NPU worker)."""

    def hwdiff_start(self, path: str, **options: Any) -> str:
        """Start recording the model into ``path`` (``options``: those of :func:`record_vllm`)."""
        _check_worker(self)
        scope = record_vllm(self.model_runner.get_model(), path, **options)
        self._hwdiff_report = scope.__enter__()
        self._hwdiff_scope = scope
        return str(path)

    def hwdiff_stop(self) -> str:
        """Close the recording; returns the capture's path."""
        scope = getattr(self, "_hwdiff_scope", None)
        if scope is None:
            raise HwdiffError("hwdiff_stop without hwdiff_start on this worker")
        self._hwdiff_scope = None
        scope.__exit__(None, None, None)
        return str(self._hwdiff_report.path)

    def hwdiff_apply_schedule(
        self, sigma_config: Any, step: int, total_steps: int, seed: int | None = None
    ) -> dict[str, float]:
        """AQN noise at ``step`` of ``total_steps`` on the RMSNorms of the model this worker holds
        (:func:`hwdiff.aqn.apply_schedule`; ``sigma_config``: a sigma.yaml path readable by the worker,
        or one σ). Returns σ per norm. Call it after each weight sync, before generating."""
        from .aqn import apply_schedule

        return apply_schedule(
            self.model_runner.get_model(), sigma_config, step, total_steps, seed=seed
        )


def _check_worker(worker: Any) -> None:
    """Refuse what one file per worker cannot hold: tensor-parallel shards, pipeline stages and
    data-parallel replicas (every worker would write the same path), graph-captured forwards."""
    config = getattr(worker, "vllm_config", None)
    parallel = getattr(config, "parallel_config", None)
    tp = getattr(parallel, "tensor_parallel_size", 1)
    if tp != 1:
        raise HwdiffError(
            f"tensor_parallel_size is {tp}: each worker holds a shard of every column/row-parallel "
            "output; capture with tensor_parallel_size=1"
        )
    for key, what in (
        ("pipeline_parallel_size", "each worker runs a part of the layers"),
        ("data_parallel_size", "each replica runs other requests"),
    ):
        size = getattr(parallel, key, 1)
        if size != 1:
            raise HwdiffError(
                f"{key} is {size}: {what} and every worker would write the same path; capture "
                f"with {key}=1"
            )
    eager = getattr(getattr(config, "model_config", None), "enforce_eager", True)
    if not eager:
        raise HwdiffError(
            "the engine runs CUDA/ACL graphs, inside which hooks do not run: start it with "
            "enforce_eager=True"
        )


def _check_hooks_ran(recorder: VllmRecorder) -> None:
    """A forward was recorded but no selected decoder layer's hooks ran: the layers run as a compiled
    graph (torch.compile, CUDA/ACL graphs), which module hooks do not enter."""
    layers = [name for name, _, kind in recorder.selection if kind == "decoder_layer"]
    if layers and not any(name in recorder.registered for name in layers):
        if recorder.sink.writer is not None:
            recorder.sink.writer.abort()
        raise HwdiffError(
            f"the engine ran a forward but none of the {len(layers)} decoder layers' hooks did: the "
            "model runs compiled (torch.compile or graphs); start the engine with enforce_eager=True "
            "and compilation_config=0"
        )
