"""``--device-map auto``: one process, a model split by whole decoder layers over the visible devices.

For a model that does not fit one accelerator and runs in one process (no torchrun): the decoder
layers are split into contiguous, equally long runs over the visible CUDA or Ascend devices; the
embedding and rotary tables go with the first layers, the final norm with the last, the head with the
embedding when their weights are tied (else with the last layers). A forward pre-hook on each placed
block moves its tensor arguments to the block's device, so the computation of each block is the
one it would be on a single device, and only activations cross devices. The capture records which
device ran each module (root attribute ``module_devices``, JSON name → device).

With one visible device (a CPU-only machine, one GPU) nothing is split: the whole model runs on
that device, and the capture says so. accelerate's big-model dispatch is not used: it is not a
dependency, and this split keeps the per-module device explicit.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import Any

import torch

from ..errors import HwdiffError

log = logging.getLogger(__name__)
_MAPS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, str]]" = weakref.WeakKeyDictionary()


def visible_devices() -> list[str]:
    """Every CUDA device, else every Ascend NPU (torch_npu installed), else ``["cpu"]``."""
    from . import ascend

    if torch.cuda.is_available():
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if ascend.is_installed():
        ascend.import_torch_npu()
        if torch.npu.is_available():
            return [f"npu:{index}" for index in range(torch.npu.device_count())]
    return ["cpu"]


def plan(model: torch.nn.Module, devices: list[str]) -> dict[str, str]:
    """Block name → device: decoder layers in contiguous equal runs, the rest as in the module docstring."""
    if not devices:
        raise HwdiffError("--device-map: no device to place the model on")
    body, layers = _layers(model)
    count = len(layers)
    placed = {f"{body}.{index}": devices[index * len(devices) // count] for index in range(count)}
    first, last = devices[0], devices[-1]
    tied = _tied_head(model)
    for name, child in model.named_modules():
        if not name or name in placed or name.startswith(f"{body}.") or name == body:
            continue
        if name.count(".") and any(name.startswith(f"{other}.") for other in placed):
            continue
        if _is_leaf_block(model, name, body):
            placed[name] = (
                last if name.endswith("norm") or (_is_head(model, name) and not tied) else first
            )
    return placed


def dispatch(model: torch.nn.Module, devices: list[str] | None = None) -> torch.nn.Module:
    """Place ``model`` over ``devices`` (default :func:`visible_devices`) in place; returns it."""
    devices = devices or visible_devices()
    if len(devices) == 1:
        log.info(
            "--device-map auto: one device visible (%s); the whole model runs there", devices[0]
        )
        model.to(devices[0])
        _MAPS[model] = {name: devices[0] for name, _ in model.named_modules() if name}
        return model
    blocks = plan(model, devices)
    for name, device in blocks.items():
        block = model.get_submodule(name)
        block.to(device)
        block.register_forward_pre_hook(_mover(torch.device(device)), with_kwargs=True)
    _MAPS[model] = module_devices(model, blocks)
    log.info("--device-map auto: %d blocks over %s", len(blocks), ", ".join(devices))
    return model


def module_devices(model: torch.nn.Module, blocks: dict[str, str]) -> dict[str, str]:
    """Every named module → the device of the block that contains it (or that it contains)."""
    found = {}
    for name, _ in model.named_modules():
        if not name:
            continue
        owner = next(
            (block for block in blocks if name == block or name.startswith(block + ".")), None
        )
        if owner is None:  # a container of several blocks (e.g. ``model``): the devices it spans
            spanned = sorted(
                {device for block, device in blocks.items() if block.startswith(name + ".")}
            )
            found[name] = ",".join(spanned)
        else:
            found[name] = blocks[owner]
    return found


def device_map_of(model: torch.nn.Module) -> str | None:
    """JSON name → device of a dispatched model (root attribute ``module_devices``), else None."""
    mapped = _MAPS.get(model)
    return None if mapped is None else json.dumps(mapped, sort_keys=True)


def _mover(device: torch.device) -> Any:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _to(args, device), _to(kwargs, device)

    return hook


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(_to(item, device) for item in value)
    if isinstance(value, list):
        return [_to(item, device) for item in value]
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def _layers(model: torch.nn.Module) -> tuple[str, list[str]]:
    for name, child in model.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) and name.endswith("layers"):
            return name, [str(index) for index in range(len(child))]
    raise HwdiffError(
        f"--device-map auto: {type(model).__name__} has no ModuleList of decoder layers "
        "(…layers) to split"
    )


def _is_leaf_block(model: torch.nn.Module, name: str, body: str) -> bool:
    """A direct child of the model or of the decoder stack's parent (embeddings, norm, rotary, head)."""
    parent = body.rsplit(".", 1)[0] if "." in body else ""
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    return owner == parent or (
        owner == "" and not any(True for _ in model.get_submodule(name).children())
    )


def _is_head(model: torch.nn.Module, name: str) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and model.get_submodule(name) is head


def _tied_head(model: torch.nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head is not None and embed is not None and head.weight is embed.weight
