"""What a hook needs to know of a tensor: its first tensor among outputs or arguments, its token-
major axis, its in-place version counter, and a cheap fingerprint for telling a changed tensor
from the one already written."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..structure.callspec import main_input_path


def _token_major(tensor: Any, batch: int, tokens: int) -> int | None:
    """k when ``tensor`` is a contiguous view of a contiguous ``[batch, tokens, …]`` tensor with the
    same storage start and size and ``batch·tokens·k`` rows: its rows run token-major."""
    base = getattr(tensor, "_base", None) if isinstance(tensor, torch.Tensor) else None
    if base is None or not batch or not tokens or tensor.dim() < 1 or base.dim() < 3:
        return None
    rows = tensor.shape[0]
    if (
        tuple(base.shape[:2]) != (batch, tokens)
        or rows % (batch * tokens)
        or rows == batch * tokens
        or tensor.numel() != base.numel()
        or tensor.data_ptr() != base.data_ptr()
        or not (tensor.is_contiguous() and base.is_contiguous())
    ):
        return None
    return rows // (batch * tokens)


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter, or None where torch keeps none (inference tensors)."""
    if tensor.is_inference():  # asked first: reading _version there raises, and exceptions are slow
        return None
    try:
        return tensor._version
    except RuntimeError:
        return None


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor's values, on its device (float64 on the CPU and CUDA; float32 on others, such
    as Ascend), kept to tell later whether an inference tensor — which has no version counter — was
    changed in place. On an accelerator the reduction costs little and is read back only for a candidate
    link; on the CPU it is taken only where the sink cannot give the stored rows back."""
    tensor = torch.view_as_real(tensor.detach()) if tensor.is_complex() else tensor.detach()
    if not tensor.is_floating_point():
        return tensor.sum(dtype=torch.int64)
    return tensor.sum(
        dtype=torch.float64 if tensor.device.type in ("cpu", "cuda") else torch.float32
    )


def first_tensor(value: Any) -> torch.Tensor | None:
    """The primary tensor of a module's output: itself, or the first tensor in a tuple / dict."""
    if isinstance(value, torch.Tensor):
        return value
    items: Iterable[Any] = (
        value.values()
        if isinstance(value, dict)
        else value
        if isinstance(value, (tuple, list))
        else ()
    )
    return next((item for item in items if isinstance(item, torch.Tensor)), None)


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A module's main input, found as :func:`hwdiff.structure.callspec.main_input_path` finds it for replay."""
    path = main_input_path(args, kwargs)
    if path is None:
        return None
    return args[path[1]] if path[0] == "arg" else kwargs[path[1]]
