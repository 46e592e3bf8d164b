"""``hwdiff.capture``: run fixed inputs through a model and write every selected activation to HDF5."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .._version import __version__
from ..common import outputs
from ..errors import HwdiffError, InputsError
from ..store.format import MODES
from ..store.h5 import compression_options
from ..store.ranks import write_manifest
from ..store.writer import CaptureWriter
from . import devices, distributed
from .emulate import describe, emulation
from .hooks import record
from .inputs import DEFAULT_MAX_TOKENS, ByteTokenizer, Inputs, check_counts, load_inputs
from .models import dtype_name, model_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureOptions:
    """How a capture runs. ``tokens`` is K, the positions kept per sequence in ``sample`` mode;
    ``max_tokens`` and ``limit`` (first N sequences) apply when inputs are read or tokenized:
    ``max_tokens`` None cuts prompts and files at 128 tokens (:data:`~hwdiff.capturing.inputs.DEFAULT_MAX_TOKENS`)
    and uses token ids given as an array or tensor whole. ``seed`` must be ≥ 0."""

    batch_size: int = 8
    max_tokens: int | None = None
    limit: int | None = None
    tokens: int = 16
    seed: int = 0
    compression: str | None = None
    progress: bool = True
    logprobs: bool = (
        True  # token log-probabilities at the head (/logprobs, hwdiff.capturing.logprobs)
    )
    logprob_topk: int = 8

    def __post_init__(self) -> None:
        for name in ("batch_size", "tokens", "logprob_topk"):
            if getattr(self, name) < 1:
                raise HwdiffError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_counts(max_tokens=self.max_tokens, limit=self.limit)
        if self.seed < 0:
            raise HwdiffError(f"seed must be 0 or more, got {self.seed}")
        if self.compression is not None:
            compression_options(
                self.compression
            )  # an unknown name, or hdf5plugin missing: one clear line


@dataclass(frozen=True)
class CaptureResult:
    """What a capture wrote: the file, how many modules and bytes, seconds, and NaN/Inf modules."""

    path: Path
    modules: int
    sequences: int
    tokens: int
    bytes: int
    seconds: float
    nonfinite_modules: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        text = (
            f"wrote {self.path} ({self.bytes / 2**20:.1f} MiB, {self.modules} modules, "
            f"{self.sequences} x {self.tokens} tokens, {self.seconds:.1f} s)"
        )
        if self.nonfinite_modules:
            text += f"; NaN/Inf in {len(self.nonfinite_modules)} module(s), first {self.nonfinite_modules[0]}"
        return text


def capture(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    inputs: Any = None,
    modules: str | Iterable[str] | None = None,
    kinds: str | Iterable[str] | None = None,
    mode: str = "full",
    record_inputs: bool = False,
    emulate: list[str] | None = None,
    **options: Any,
) -> CaptureResult:
    """Run ``inputs`` through ``model`` with hooks and write one capture file at ``path``.

    ``inputs``: None (the shipped prompt set), a file path, an :class:`~hwdiff.capturing.inputs.Inputs`, or
    token ids (see :func:`~hwdiff.load_inputs`). ``modules`` / ``kinds`` select what to record (see
    :func:`~hwdiff.capturing.hooks.select_modules`). ``mode``: ``full`` (every element), ``sample`` (K token
    positions per sequence) or ``stats`` (float64 statistics only). ``emulate``: emulation profiles
    (:mod:`hwdiff.capturing.emulate`) applied during the run. ``options`` are the fields of
    :class:`CaptureOptions`. The file appears at ``path`` only when complete; on failure an existing
    file there is left as it was.

    Inside an initialised process group of several ranks (torchrun), ``path`` is a directory: every
    rank writes its own file there and rank 0 a manifest (:mod:`hwdiff.capturing.distributed`,
    :mod:`hwdiff.store.ranks`); data parallel (rank r takes batches r, r + N, …) unless the model was
    sharded with :func:`hwdiff.capturing.distributed.tensor_parallel`. Every rank must call it.
    """
    if mode not in MODES:
        raise HwdiffError(f"unknown capture mode {mode!r}: expected {', '.join(MODES)}")
    opts = CaptureOptions(**options)
    ranks = distributed.rank_info()
    if ranks is None:
        outputs.check_outputs([inputs], [path])
    started = time.perf_counter()
    device, dtype = model_device_and_dtype(model)
    inputs = _resolve_inputs(model, inputs, opts)
    positions = sample_positions(inputs, opts.tokens, opts.seed) if mode == "sample" else None
    meta = capture_metadata(model, device, dtype, mode, record_inputs, opts)
    job = _Job(model, modules, kinds, mode, record_inputs, emulate, opts, started)
    if ranks is not None:
        return _capture_ranks(job, Path(path), ranks, inputs, positions, meta)
    return _write_file(job, path, inputs, positions, meta)


@dataclass(frozen=True)
class _Job:
    """What one capture records and how (the arguments of :func:`capture`)."""

    model: torch.nn.Module
    modules: Any
    kinds: Any
    mode: str
    record_inputs: bool
    emulate: list[str] | None
    opts: CaptureOptions
    started: float


def _write_file(
    job: _Job,
    path: str | os.PathLike,
    inputs: Inputs,
    positions: np.ndarray | None,
    meta: dict[str, Any],
    placements: dict[str, str] | None = None,
) -> CaptureResult:
    """Run every batch of ``inputs`` through the model and write one capture file at ``path``."""
    model, opts = job.model, job.opts
    device = model_device_and_dtype(model)[0]
    flow = _dataflow(model, inputs)
    if flow is not None:
        meta["dataflow"] = flow.to_json()
    with emulation(model, job.emulate) as profiles:
        meta["emulate"] = describe(profiles)
        # On the CPU the hooks write synchronously: a writer thread would take cores from the forward.
        writer = CaptureWriter(
            path,
            meta=meta,
            inputs=inputs,
            mode=job.mode,
            sample_positions=positions,
            compression=opts.compression,
            synchronous=device.type == "cpu",
            placements=placements,
        )
        try:
            with (
                record(
                    model,
                    job.modules,
                    kinds=job.kinds,
                    mode=job.mode,
                    record_inputs=job.record_inputs,
                    sink=writer,
                    sub_blocks=flow.sub_blocks if flow is not None else None,
                    token_major=flow.token_major if flow is not None else None,
                ) as rec,
                _logprobs(model, writer, opts) as lp,
            ):
                _run_batches(model, rec, inputs, positions, device, opts)
            if opts.logprobs and not lp.batches:
                log.warning(
                    "%s has no head module and no logits output: no token log-probabilities stored",
                    type(model).__name__,
                )
            final = writer.finish(
                {"capture_seconds": time.perf_counter() - job.started, **_absences(rec)}
            )
        except BaseException:
            writer.abort()
            raise
    result = CaptureResult(
        final,
        len(rec.registered),
        inputs.shape[0],
        inputs.shape[1],
        final.stat().st_size,
        time.perf_counter() - job.started,
        tuple(writer.nonfinite),
    )
    if result.nonfinite_modules:
        log.warning(
            "NaN/Inf activations in %d module(s), first in forward order: %s",
            len(result.nonfinite_modules),
            result.nonfinite_modules[0],
        )
    return result


def _dataflow(model: torch.nn.Module, inputs: Inputs) -> Any:
    """The model's measured structure (:func:`hwdiff.structure.trace_dataflow`), traced once on the
    first sequence's first tokens before the capture; None for a model without RMSNorms (GPT-2:
    nothing to map)."""
    from ..structure import dataflow_of_capture, find_norms, name_rule_disagreements

    if not find_norms(model):
        return None
    flow = dataflow_of_capture(model, inputs.input_ids)
    differ = name_rule_disagreements(flow, [name for name, _ in model.named_modules() if name])
    if differ:  # names are a cross-check only: the measured roles are used
        log.info("data flow and name rule differ at %d norm(s): %s", len(differ), "; ".join(differ))
    return flow


def _capture_ranks(
    job: _Job,
    target: Path,
    ranks: distributed.RankInfo,
    inputs: Inputs,
    positions: np.ndarray | None,
    meta: dict[str, Any],
) -> CaptureResult:
    """This rank's part of a multi-rank capture into directory ``target`` (:mod:`hwdiff.capturing.distributed`)."""
    placements = distributed.sharded_outputs(job.model)
    parallel = "tensor" if placements else "data"
    if job.mode == "stats":
        raise HwdiffError(
            "a multi-rank capture stores activations (mode full or sample); stats mode is not "
            "supported under torch.distributed yet"
        )
    if parallel == "tensor" and job.record_inputs:
        raise HwdiffError(
            "--record-inputs is not supported with --tp (the inputs of row-parallel modules are "
            "shards); replay a single-device or data-parallel capture instead"
        )
    if parallel == "tensor" and job.emulate:
        raise HwdiffError(
            "--emulate is not supported with --tp (the emulation profiles patch modules whose "
            "weights are sharded tensors); emulate on a single-device or data-parallel capture"
        )
    world, rank = ranks.world_size, ranks.rank
    rows = (
        None
        if parallel == "tensor"
        else [
            distributed.batch_rows(inputs.shape[0], job.opts.batch_size, r, world)
            for r in range(world)
        ]
    )
    device = model_device_and_dtype(job.model)[0]
    run = distributed.RankRun.start(target, ranks)
    try:
        mine = inputs if rows is None else distributed.rank_inputs(inputs, rows[rank])
        my_positions = positions if rows is None or positions is None else positions[rows[rank]]
        rank_meta = {
            **meta,
            **ranks.meta(parallel, device),
            "run_id": run.run_id,
            "parallel_sequences": inputs.shape[0],
        }
        opts = dataclasses.replace(job.opts, progress=job.opts.progress and rank == 0)
        result = _write_file(
            dataclasses.replace(job, opts=opts),
            run.rank_file,
            mine,
            my_positions,
            rank_meta,
            placements,
        )
        manifest = {
            "capture_id": uuid.uuid4().hex,
            "created_utc": distributed.utc_now(),
            "run_id": run.run_id,
            "inputs_fingerprint": inputs.fingerprint,
            "inputs_source": inputs.source,
            "world_size": world,
        }
        final = run.finish(
            lambda folder: write_manifest(
                folder, world, parallel, inputs, positions, manifest, rows
            )
        )
    except BaseException as exc:
        run.abort(exc)
        raise
    size = sum(path.stat().st_size for path in final.iterdir() if path.is_file())
    return CaptureResult(
        final,
        result.modules,
        inputs.shape[0],
        inputs.shape[1],
        size,
        time.perf_counter() - job.started,
        result.nonfinite_modules,
    )


def _logprobs(model: torch.nn.Module, writer: CaptureWriter, opts: CaptureOptions) -> Any:
    """The head's token log-probabilities of every batch into ``writer`` (a no-op scope when off)."""
    from .logprobs import _State, record_logprobs

    if not opts.logprobs:
        return contextlib.nullcontext(_State())
    return record_logprobs(model, writer.put, opts.logprob_topk)


def _absences(rec: Any) -> dict[str, str]:
    """Capture attributes listing what is absent and why: ``never_called`` (selected modules no
    forward called) and ``unrecorded`` (module → why some calls could not be stored), JSON."""
    for name in rec.never_called:
        log.info("%s was never called: listed in the capture's never_called", name)
    for name, reason in rec.unrecorded.items():
        log.warning("%s: not recorded (%s)", name, reason)
    return {"never_called": json.dumps(rec.never_called), "unrecorded": json.dumps(rec.unrecorded)}


def _run_batches(
    model: torch.nn.Module,
    rec: Any,
    inputs: Inputs,
    positions: np.ndarray | None,
    device: torch.device,
    opts: CaptureOptions,
) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=inputs.shape[0],
        unit="seq",
        desc=f"capture on {device}",
        disable=not opts.progress,
        leave=False,
    )
    # inference_mode as vLLM's engine runs: an output a parent updated in place after a child returned
    # it (Llama 4's MoE) is told from an alias by measurement in the recorder (hooks.Recorder._unchanged)
    with bar, torch.inference_mode():
        for row0, ids, mask in inputs.batches(opts.batch_size):
            rec.row0, rec.tokens = row0, ids.shape[1]
            if positions is not None:
                rec.positions = torch.from_numpy(positions[row0 : row0 + len(ids)]).to(device)
            model(
                input_ids=torch.from_numpy(ids).to(device),
                attention_mask=torch.from_numpy(mask).to(device),
                use_cache=False,
            )
            outputs.check_interrupted()  # a Ctrl-C swallowed inside the forward stops the run here
            bar.update(len(ids))
        devices.synchronize(device)


def sample_positions(inputs: Inputs, k: int, seed: int) -> np.ndarray:
    """K sorted token positions per sequence, drawn among its real tokens from PCG64(seed, row).

    A sequence with fewer than K real tokens repeats its real positions cyclically.
    """
    k = min(k, inputs.shape[1])
    rows = []
    for row, mask in enumerate(inputs.attention_mask):
        valid = np.flatnonzero(mask)
        rng = np.random.Generator(np.random.PCG64([seed, row]))
        chosen = (
            np.sort(rng.choice(valid, size=k, replace=False))
            if len(valid) >= k
            else np.resize(valid, k)
        )
        rows.append(chosen)
    return np.stack(rows).astype(np.int64)


def model_device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    floating = [p for p in model.parameters() if p.is_floating_point()]
    if not floating:
        raise HwdiffError(f"{type(model).__name__} has no floating-point parameters to capture")
    return floating[0].device, floating[0].dtype


def _resolve_inputs(model: torch.nn.Module, inputs: Any, opts: CaptureOptions) -> Inputs:
    if not isinstance(inputs, Inputs):
        from_file = inputs is None or isinstance(inputs, (str, os.PathLike))
        max_tokens = opts.max_tokens or (DEFAULT_MAX_TOKENS if from_file else None)
        inputs = load_inputs(
            inputs, tokenizer=LazyTokenizer(model), max_tokens=max_tokens, limit=opts.limit
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int):
        inputs.check_vocab(vocab)
    return inputs


class LazyTokenizer:
    """The model's tokenizer, loaded only when a text has to be tokenized: token-id inputs (``.npy``,
    ``input_ids`` JSONL) need none, so a checkpoint without tokenizer files serves them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model, self._loaded = model, None

    def encode(self, text: str) -> list[int]:
        if self._loaded is None:
            self._loaded = model_tokenizer(self._model)
        return self._loaded.encode(text)

    @property
    def pad_token_id(self) -> int | None:
        """The tokenizer's pad id once loaded; before, the config's when it is inside the vocabulary."""
        if self._loaded is not None:
            return getattr(self._loaded, "pad_token_id", None)
        config = getattr(self._model, "config", None)
        value, vocab = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
        return (
            value
            if isinstance(value, int) and isinstance(vocab, int) and 0 <= value < vocab
            else None
        )

    @property
    def eos_token_id(self) -> int | None:
        return getattr(self._loaded, "eos_token_id", None) if self._loaded is not None else None


def model_tokenizer(model: torch.nn.Module) -> Any:
    info = model_info(model)
    source = info.tokenizer
    if source is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=info.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputsError(
            f"model {source!r} has no loadable tokenizer ({str(exc).splitlines()[0]}); "
            "pass token ids instead (--inputs ids.npy or ids.jsonl)"
        ) from exc


def capture_metadata(
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    mode: str,
    record_inputs: bool,
    opts: CaptureOptions,
) -> dict[str, Any]:
    info = model_info(model)
    config = getattr(model, "config", None)
    meta = devices.describe(device)
    meta.update(
        hwdiff_version=__version__,
        host=platform.node(),
        dtype=dtype_name(dtype),
        model_spec=info.spec,
        model_fingerprint=info.fingerprint,
        model_class=type(model).__name__,
        model_seed=info.seed if info.seed is not None else -1,
        attn_implementation=str(getattr(config, "_attn_implementation", None) or "unknown"),
        record_inputs=record_inputs,
        batch_size=opts.batch_size,
        seed=opts.seed,
        sample_tokens=opts.tokens if mode == "sample" else 0,
    )
    if (
        mode == "stats"
    ):  # what the device summed in before the host's float64 merge (hwdiff.store.stats)
        from ..store.stats import accumulation_dtype

        meta["stats_accumulation"] = dtype_name(accumulation_dtype(device))
    from .devicemap import device_map_of

    if (
        device_map_of(model) is not None
    ):  # one process over several devices: which device ran each module
        meta["module_devices"] = device_map_of(model)
    if config is not None and hasattr(config, "to_dict"):
        meta["model_config"] = json.dumps(config.to_dict(), default=str, sort_keys=True)
    return meta
