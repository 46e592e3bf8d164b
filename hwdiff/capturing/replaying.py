"""``hwdiff.replay``: run each recorded module on the reference's own inputs, on another device.

A divergence measured at layer 20 is mostly inherited from layers 0–19. Replay separates the error
a module *adds* (local) from the error it *receives*: every module whose call arguments the
reference recorded (``--record-inputs``, full mode) is called again with exactly those arguments,
batch by batch with the reference's batch size, and its output is written in the capture format.
``hwdiff diff REF LOCAL`` then gives the local error of each module; ``hwdiff diff REF TARGET
--local LOCAL`` puts local and propagated error side by side.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from typing import Any

import numpy as np
import torch

from ..common import outputs
from ..errors import HwdiffError
from ..store.format import EXPERT_ROWS, EXPERTS, FLAT, ROUTED
from ..store.reader import Capture, open_capture
from ..store.writer import CaptureWriter, Register
from ..structure import (
    attention_type,
    is_norm,
    layer_index,
    module_kind,
    norm_offset,
    output_by_meaning,
    padding_only,
)
from ..structure.callspec import decode_call, unsupported
from .emulate import describe, emulation
from .hooks import slot_record
from .models import dtype_name, model_info
from .run import CaptureOptions, CaptureResult, capture_metadata, model_device_and_dtype

log = logging.getLogger(__name__)


def replay(
    model: torch.nn.Module,
    reference: str | os.PathLike | Capture,
    path: str | os.PathLike,
    *,
    emulate: list[str] | None = None,
    allow_model_mismatch: bool = False,
    progress: bool = True,
) -> CaptureResult:
    """Call every module of ``model`` that ``reference`` recorded inputs for, on those inputs, and
    write the outputs to a capture at ``path`` (atomically). ``model`` may be on any device and dtype:
    inputs are moved there and floating-point ones cast to the model's dtype. ``emulate``: emulation
    profiles (:mod:`hwdiff.capturing.emulate`) active during the replay."""
    outputs.check_outputs([reference], [path])
    ref = reference if isinstance(reference, Capture) else open_capture(reference)
    try:
        with emulation(model, emulate) as profiles:
            return _replay(model, ref, path, allow_model_mismatch, progress, describe(profiles))
    finally:
        if ref is not reference:
            ref.close()


def model_for(
    reference: str | os.PathLike,
    *,
    device: str = "auto",
    dtype: str | None = None,
    attn_implementation: str | None = None,
    spec: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load the model a reference capture was made of (its spec and seed), or ``spec`` instead,
    in ``dtype`` (default: the reference's) on ``device``."""
    from .models import load_model

    with open_capture(reference) as ref:
        meta = ref.meta
    seed = int(meta.get("model_seed", 0))
    model_spec = spec or str(meta.get("model_spec", ""))
    if model_spec.startswith("object:"):
        raise HwdiffError(
            f"{reference} was captured from a model object ({model_spec}); pass --model SPEC"
        )
    return load_model(
        model_spec,
        device=device,
        dtype=dtype or str(meta.get("dtype", "float32")),
        attn_implementation=attn_implementation,
        seed=max(seed, 0),
        trust_remote_code=trust_remote_code,
    )


def _replay(
    model: torch.nn.Module,
    ref: Capture,
    path: Any,
    allow_model_mismatch: bool,
    progress: bool,
    emulated: str,
) -> CaptureResult:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    targets = _replayable(ref)
    _check_model(model, ref, allow_model_mismatch)
    device, dtype = model_device_and_dtype(model)
    batch = int(ref.meta.get("batch_size", ref.input_ids.shape[0]))
    meta = capture_metadata(
        model, device, dtype, "full", False, CaptureOptions(batch_size=batch, progress=progress)
    )
    meta.update(
        replay_of=str(ref.path),
        replay_of_id=str(ref.meta.get("capture_id", "")),
        replay_of_device=str(ref.meta.get("device")),
        replay_of_dtype=str(ref.meta.get("dtype")),
        emulate=emulated,
        layout=str(ref.meta.get("layout", "")),
    )
    masks = _MaskRebuilder(model, ref, device, dtype)
    writer = CaptureWriter(path, meta=meta, inputs=ref.inputs, mode="full")
    try:
        bar = tqdm(
            total=len(targets),
            desc=f"replay on {device}",
            unit="module",
            disable=not progress,
            leave=False,
        )
        with bar, torch.inference_mode():
            for order, (name, calls) in enumerate(targets):
                module = _submodule(model, name)
                kind = ref.modules[name].kind or module_kind(
                    name, module
                )  # as the reference classed it (data flow)
                writer.put(Register(name, kind, type(module).__name__, order, *_weight(module)))
                for call, spec in calls:
                    _replay_call(ref, writer, module, name, call, spec, batch, device, dtype, masks)
                bar.update()
        final = writer.finish({"capture_seconds": time.perf_counter() - started})
    except BaseException:
        writer.abort()
        raise
    return CaptureResult(
        final,
        len(targets),
        *ref.input_ids.shape,
        final.stat().st_size,
        time.perf_counter() - started,
        tuple(writer.nonfinite),
    )


def _replayable(ref: Capture) -> list[tuple[str, list[tuple[int, dict]]]]:
    if ref.mode != "full":
        raise HwdiffError(
            f"{ref.path} is a '{ref.mode}' capture; replay needs a full capture made with --record-inputs"
        )
    targets, skipped = [], []
    for name, info in ref.modules.items():
        calls = []
        for call in range(info.calls):
            if not ref.has_call(name, call):
                continue  # an expert the routing never chose
            spec = ref.call_spec(name, call)
            reason = "no recorded arguments" if spec is None else unsupported(spec)
            if "output" in info.slots and ref.layout(name, call, "output") == ROUTED:
                reason = "an expert's routed rows (replay runs whole batches of tokens)"
            if reason:
                skipped.append(f"{name} ({reason})")
            else:
                calls.append((call, spec))
        if calls:
            targets.append((name, calls))
    if not targets:
        raise HwdiffError(
            f"{ref.path} has no recorded module inputs; capture the reference with --record-inputs"
        )
    if skipped:
        log.warning("not replayed: %s", "; ".join(skipped))
    return targets


def _check_model(model: torch.nn.Module, ref: Capture, allow_model_mismatch: bool) -> None:
    found = model_info(model).fingerprint
    if found != ref.meta.get("model_fingerprint") and not allow_model_mismatch:
        raise HwdiffError(
            f"the model to replay ({found[:19]}…) is not the one captured in {ref.path} "
            f"({str(ref.meta.get('model_fingerprint'))[:19]}…, {ref.meta.get('model_spec')}); "
            "pass the same checkpoint, or --allow-model-mismatch"
        )


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise HwdiffError(
            f"the model has no module {name!r}, which the reference captured"
        ) from None


def _weight(module: torch.nn.Module) -> tuple[Any, str, float]:
    if is_norm(module):
        return (
            module.weight.detach().to("cpu", copy=True),
            dtype_name(module.weight.dtype),
            norm_offset(module),
        )
    return None, "", 0.0


def _replay_call(
    ref: Capture,
    writer: CaptureWriter,
    module: torch.nn.Module,
    name: str,
    call: int,
    spec: dict,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    masks: "_MaskRebuilder",
) -> None:
    rows = ref.input_ids.shape[0]
    reference_dtype = str(ref.meta.get("dtype"))
    for row0 in range(0, rows, batch):
        index = (slice(row0, min(row0 + batch, rows)),)

        def load(slot: str) -> torch.Tensor:
            values = torch.from_numpy(np.ascontiguousarray(ref.read(name, call, slot, index))).to(
                device
            )
            layout = ref.layout(name, call, slot)
            if layout == FLAT:  # the module saw [sequences·tokens, …] rows
                values = values.reshape(-1, *values.shape[2:])
            elif layout in (
                EXPERTS,
                EXPERT_ROWS,
            ):  # it saw expert-major rows: [experts, sequences·tokens, …]
                values = values.movedim(2, 0).reshape(values.shape[2], -1, *values.shape[3:])
                values = values.reshape(-1, *values.shape[2:]) if layout == EXPERT_ROWS else values
            # Activations in the reference's dtype move to the replaying dtype; a tensor the model
            # keeps in another precision (float32 router weights in a bf16 model) stays as it was.
            recorded = ref.slot_info(name, call, slot)[1]
            return (
                values.to(dtype)
                if values.is_floating_point() and recorded == reference_dtype
                else values
            )

        args, kwargs = decode_call(spec, load)
        if "attention_mask" in kwargs and masks.needed:
            kwargs["attention_mask"] = masks.build(index[0], name, kwargs["attention_mask"])
        output = output_by_meaning(
            module, module(*args, **kwargs)
        )  # the element the capture stored
        if output is None:
            raise HwdiffError(f"module {name} returned no tensor when replayed")
        record = slot_record(name, call, "output", row0, output)
        layout = ref.layout(name, call, "output")
        sequences = index[0].stop - row0
        if layout == FLAT:
            record.array = record.array.reshape(sequences, -1, *output.shape[1:])
            record.layout = FLAT
        elif layout in (EXPERTS, EXPERT_ROWS):
            experts = ref.slot_info(name, call, "output")[0][2]
            tail = output.shape[2:] if layout == EXPERTS else output.shape[1:]
            record.array = (
                record.array.reshape(experts, sequences, -1, *tail).movedim(0, 2).contiguous()
            )
            record.layout = layout
        writer.put(record)


class _MaskRebuilder:
    """Attention masks are specific to the attention implementation: sdpa may pass None (it is causal
    by itself) where eager needs an explicit additive mask. When the replaying model's implementation
    differs from the reference's, each attention mask argument is rebuilt from the stored 2-D mask
    by transformers' own mask function for the replaying implementation and for the module's own
    layer (:func:`hwdiff.structure.attention_type`): full causal, sliding window or chunked. A layer
    whose mask hwdiff cannot tell is refused, never given a full causal mask by default."""

    _FUNCTIONS = {
        "full": "create_causal_mask",
        "sliding": "create_sliding_window_causal_mask",
        "chunked": "create_chunked_causal_mask",
    }

    def __init__(
        self, model: torch.nn.Module, ref: Capture, device: torch.device, dtype: torch.dtype
    ) -> None:
        config = getattr(model, "config", None)
        config = getattr(config, "text_config", None) or config
        mine = str(getattr(config, "_attn_implementation", None))
        self.needed = config is not None and mine != str(ref.meta.get("attn_implementation"))
        self.config, self.device, self.dtype = config, device, dtype
        self.reference_impl = ref.meta.get("attn_implementation")
        self.mask2d = torch.from_numpy(ref.attention_mask)
        if self.needed:
            if getattr(config, "use_bidirectional_attention", False):
                raise HwdiffError(
                    "the model attends bidirectionally (use_bidirectional_attention): replay cannot "
                    "rebuild its masks for another attention implementation; replay with "
                    f"--attn-impl {ref.meta.get('attn_implementation')}"
                )
            log.info(
                "rebuilding attention masks for %s (the reference used %s)",
                mine,
                ref.meta.get("attn_implementation"),
            )

    def build(self, rows: slice, name: str, recorded: Any = None) -> Any:
        """The mask module ``name`` (in its decoder layer) needs for batch ``rows``. A layer whose type
        is no attention (mamba, linear attention) and whose recorded mask is the plain 2-D padding mask
        (or None: no padding) keeps it: that mask does not depend on the attention implementation."""
        from transformers import masking_utils

        plain = recorded is None or (isinstance(recorded, torch.Tensor) and recorded.dim() == 2)
        if plain and padding_only(self.config, layer_index(name)):
            return recorded
        try:
            kind, _ = attention_type(self.config, layer_index(name))
        except HwdiffError as exc:  # the reference's own masks need no rebuilding
            raise HwdiffError(
                f"{exc}; replay with the reference's attention implementation "
                f"(--attn-impl {self.reference_impl})"
            ) from None
        function = getattr(masking_utils, self._FUNCTIONS[kind], None)
        if function is None:
            raise HwdiffError(
                f"{name} attends with a {kind} mask, which this transformers version cannot build"
            )
        mask = self.mask2d[rows].to(self.device)
        batch, tokens = mask.shape
        embeds = torch.zeros(
            batch, tokens, self.config.hidden_size, dtype=self.dtype, device=self.device
        )
        positions = torch.arange(tokens, device=self.device)
        offered = {
            "config": self.config,
            "inputs_embeds": embeds,
            "input_embeds": embeds,
            "attention_mask": mask,
            "cache_position": positions,
            "position_ids": positions[None].expand(batch, -1),
            "past_key_values": None,
            "cache": None,
        }
        accepted = set(inspect.signature(function).parameters)
        return function(**{k: v for k, v in offered.items() if k in accepted})
