"""Call semantics: tuple outputs and in-place updates of fused norms and decoder layers, by meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import HwdiffError, SemanticsError
from .norms import is_norm, norm_weight_effective


# ------------------------------------------------------------------------------------------------
# Call semantics: tuple outputs and in-place updates, by meaning
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedNorm:
    """How a fused add+norm class answers ``norm(x, residual)``: the tuple element holding the normed
    output (``normed``) and the one holding the new residual stream ``x + residual`` (``residual``).
    Whether a call overwrites its arguments is not a property of the class (vLLM picks the kernel per
    platform at run time): it is measured on every call (:func:`writes_into_arguments`)."""

    normed: int = 0
    residual: int = 1


# The tuple order, read from the sources (docs/vllm.md): vLLM's RMSNorm / GemmaRMSNorm and vLLM-Ascend's
# AscendRMSNorm / AscendGemmaRMSNorm return (normed, x + residual) — new tensors or, on some platforms
# (vLLM's fused_add_rms_norm on CUDA, Intel XPU), x and residual overwritten in place. A class not listed
# here is resolved by meaning (:func:`_normed_element`).
FUSED_NORMS: dict[str, FusedNorm] = {
    "RMSNorm": FusedNorm(0, 1),
    "GemmaRMSNorm": FusedNorm(0, 1),
    "AscendRMSNorm": FusedNorm(0, 1),
    "AscendGemmaRMSNorm": FusedNorm(0, 1),
}


def register_fused_norm(class_name: str, *, normed: int = 0, residual: int = 1) -> None:
    """Declare the tuple order of another fused add+norm class, by class name."""
    if {normed, residual} != {0, 1}:
        raise HwdiffError(
            f"a fused norm returns (normed, residual) in some order: got elements {normed}, {residual}"
        )
    FUSED_NORMS[class_name] = FusedNorm(normed, residual)
    _DETECTED.pop(class_name, None)


_PARAMS: dict[type, Any] = {}
_DETECTED: dict[str, FusedNorm] = {}  # order found by meaning for an unregistered class


def _signature(module: Any) -> Any:
    """The signature of the module's real forward: vLLM's CustomOp classes dispatch ``forward(*args,
    **kwargs)`` to ``forward_native`` / ``forward_cuda`` / ``forward_oot``, which name the arguments."""
    import inspect

    cls = type(module)
    if cls not in _PARAMS:
        found = None
        for method in ("forward_native", "forward"):
            function = getattr(cls, method, None)
            if function is None:
                continue
            try:
                signature = inspect.signature(function)
            except (TypeError, ValueError):  # a forward without a Python signature
                continue
            if any(
                p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                for p in list(signature.parameters.values())[1:]
            ):
                found = signature
                break
        _PARAMS[cls] = found
    return _PARAMS[cls]


def _takes_residual(module: Any) -> bool:
    signature = _signature(module)
    return signature is not None and "residual" in signature.parameters


def is_fused_norm(module: Any) -> bool:
    """An RMSNorm that takes a ``residual`` argument (a fused add+norm: vLLM / vLLM-Ascend)."""
    return is_norm(module) and _takes_residual(module)


def is_residual_layer(module: Any) -> bool:
    """A decoder layer called ``layer(positions, hidden_states, residual)`` that returns
    ``(sub-block output, residual)`` (vLLM): its residual stream is the sum of the two."""
    return (
        not is_norm(module)
        and "decoderlayer" in type(module).__name__.lower()
        and _takes_residual(module)
    )


def _arguments(module: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    try:
        return dict(_signature(module).bind(module, *args, **kwargs).arguments)
    except TypeError:
        return {}


def input_by_meaning(module: Any, args: tuple, kwargs: dict) -> Any:
    """The module's input as the residual stream it reads, when that is not its first argument: a
    fused norm called with a residual normalises ``x + residual``; a vLLM decoder layer reads
    ``hidden_states + residual``. None: the first tensor argument is the input."""
    if is_fused_norm(module):
        bound = _arguments(module, args, kwargs)
        x, residual = bound.get("x", args[0] if args else None), bound.get("residual")
    elif is_residual_layer(module):
        bound = _arguments(module, args, kwargs)
        x, residual = bound.get("hidden_states"), bound.get("residual")
    else:
        return None
    if residual is None or x is None:
        return x
    return (
        residual + x
    )  # as HF adds the stream: residual + sub-block output (exact in the tensors' dtype)


def _tensors(value: Any) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    items = (
        value.values()
        if isinstance(value, dict)
        else value
        if isinstance(value, (tuple, list))
        else ()
    )
    return [item for item in items if isinstance(item, torch.Tensor)]


def writes_into_arguments(output: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a call returned a tensor that lives in the memory of one of its tensor arguments —
    measured on the call, whatever the class: vLLM's ``fused_add_rms_norm`` (CUDA, XPU) returns ``x`` and
    ``residual`` overwritten, an in-place rotary embedding returns its query and key, vLLM-Ascend adds a
    norm's bias with ``x.add_``. Such an output holds new values in an old tensor: it must be recorded
    as itself, never as a link to what was recorded for that tensor before."""
    inputs = {_storage(t) for t in (*_tensors(args), *_tensors(kwargs))} - {None}
    return bool(inputs) and any(_storage(t) in inputs for t in _tensors(output))


def _storage(tensor: Any) -> int | None:
    """Where a tensor's memory starts (its storage's address); None for an empty or storage-less tensor."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr() if storage.nbytes() else None
    except (
        RuntimeError,
        NotImplementedError,
    ):  # a wrapper tensor subclass without a storage of its own
        return None


def output_by_meaning(module: Any, output: Any) -> Any:
    """The tensor a module's output *means*: the normed element of a fused norm's tuple (by the class
    rule of :data:`FUSED_NORMS`, else found by meaning, :func:`_normed_element`), the residual stream
    ``hidden + residual`` of a vLLM decoder layer, else the first tensor (of a tuple / dict). Raises
    :class:`SemanticsError` when a fused norm's elements cannot be told apart."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    items = (
        list(output.values())
        if isinstance(output, dict)
        else list(output)
        if isinstance(output, (tuple, list))
        else []
    )
    tensors = [item for item in items if isinstance(item, torch.Tensor)]
    pair = len(items) == 2 and len(tensors) == 2 and tensors[0].shape == tensors[1].shape
    if pair and is_fused_norm(module):
        rule = FUSED_NORMS.get(type(module).__name__) or _DETECTED.get(type(module).__name__)
        if rule is None:
            rule = _DETECTED[type(module).__name__] = _normed_element(module, tensors)
        return tensors[rule.normed]
    if pair and is_residual_layer(module):
        return tensors[1] + tensors[0]
    return tensors[0] if tensors else None


def _normed_element(module: Any, tensors: list) -> FusedNorm:
    """Which of two tensors a fused norm of an unregistered class returned is the normed one: the one
    whose every row, divided by the effective weight, has rms 1 (to 2 %), when exactly one does."""
    import torch

    scale = norm_weight_effective(module)
    channels = scale.abs() > 1e-6 * float(scale.abs().max())
    unit = []
    for tensor in tensors:
        rows = (tensor.detach().float()[..., channels] / scale[channels].to(tensor.device)).reshape(
            -1, int(channels.sum())
        )
        rms = rows.pow(2).mean(dim=-1).sqrt()
        unit.append(bool(rows.shape[0]) and bool(torch.all((rms - 1).abs() < 0.02)))
    if unit.count(True) != 1:
        raise SemanticsError(
            f"{type(module).__name__} returns two tensors and hwdiff cannot tell which is the normed output "
            f"(unit rms after the weight: {unit}); declare its order with "
            "hwdiff.structure.register_fused_norm(class_name, normed=..., residual=...)"
        )
    normed = unit.index(True)
    return FusedNorm(normed, 1 - normed)


def flat_sequences(positions: Any) -> tuple[int, int]:
    """``(sequences, tokens)`` of a flattened batch (vLLM: ``input_ids`` and ``positions`` are
    ``[num_tokens]``, the scheduled requests one after another), told from its positions: every
    sequence must be a whole prompt — positions ``0 … T-1`` — and all of the same length T, so that
    the ``[num_tokens, …]`` rows reshape exactly to ``[sequences, tokens, …]``. Raises
    :class:`SemanticsError` saying why otherwise (a decode step, a chunked or prefix-cached prefill,
    prompts of different lengths, padding, M-RoPE positions)."""
    import torch

    if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
        shape = (
            tuple(positions.shape)
            if isinstance(positions, torch.Tensor)
            else type(positions).__name__
        )
        raise SemanticsError(
            f"positions of shape {shape}, not [num_tokens] (M-RoPE or no positions): the "
            "sequences of the batch cannot be told"
        )
    flat = positions.detach().to("cpu", torch.int64)
    starts = torch.nonzero(flat == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        raise SemanticsError(
            "the batch does not start at position 0 (a decode step, a chunked or prefix-cached "
            "prefill): it is not whole prompts"
        )
    tokens = (starts[1] if len(starts) > 1 else len(flat)) - starts[0]
    if len(flat) % tokens or not torch.equal(
        flat, torch.arange(tokens).repeat(len(flat) // tokens)
    ):
        raise SemanticsError(
            f"the {len(flat)} tokens of the batch are not prompts of one length (positions "
            f"{flat[:8].tolist()} …): equal-length prompts make [num_tokens] reshape exactly to "
            "[sequences, tokens]; use prompts of one length"
        )
    return len(flat) // tokens, tokens
