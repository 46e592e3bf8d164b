"""Device resolution, synchronization and the numerics facts recorded in every capture.

The code is generic over torch's device modules (``torch.cuda``, ``torch.npu``): the only
Ascend-specific part is importing torch_npu, which lives in :mod:`hwdiff.capturing.ascend`.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from typing import Any

import torch

from ..errors import DeviceError
from . import ascend

_DEVICE_RE = re.compile(r"^(cpu|cuda|npu)(?::(\d+))?$")
DEVICE_HELP = "cpu, cuda[:N], npu[:N] or auto"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``cpu``, ``cuda[:N]``, ``npu[:N]`` or ``auto`` into an available :class:`torch.device`.

    ``auto`` (also ``None``) picks CUDA, then an Ascend NPU (only if torch_npu is installed), then CPU.
    Raises :class:`DeviceError` for an unknown spec or a device this machine does not have.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return _auto_device()
    match = _DEVICE_RE.match(spec)
    if not match:
        raise DeviceError(f"unknown device {spec!r}: expected {DEVICE_HELP}")
    kind, index = match.group(1), int(match.group(2) or 0)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "npu":
        ascend.import_torch_npu()
    module = getattr(torch, kind, None)
    if module is None or not module.is_available():
        raise DeviceError(
            f"device {spec!r} is not available on this machine ({_why_unavailable(kind)})"
        )
    count = module.device_count()
    if index >= count:
        raise DeviceError(
            f"device {spec!r} does not exist: this machine has {count} {kind} device(s)"
        )
    return torch.device(kind, index)


def _auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if ascend.is_installed():
        ascend.import_torch_npu()
        if torch.npu.is_available():
            return torch.device("npu", 0)
    return torch.device("cpu")


def _why_unavailable(kind: str) -> str:
    if kind == "cuda" and torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA"
    return f"torch.{kind}.is_available() is False: no visible {kind} device or driver"


def device_module(device: torch.device) -> Any:
    """``torch.cuda`` / ``torch.npu`` for an accelerator, None for the CPU."""
    return None if device.type == "cpu" else getattr(torch, device.type)


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU)."""
    module = device_module(device)
    if module is not None:
        module.synchronize(device)


def describe(device: torch.device) -> dict[str, Any]:
    """Device name, backend versions and numerics flags to record as capture metadata.

    Every value is a str, int, float or bool so that it can be an HDF5 attribute.
    """
    info: dict[str, Any] = {"device": str(device), "torch_version": torch.__version__}
    info.update(_numerics_flags())
    if device.type == "cpu":
        info["device_name"] = cpu_name()
    elif device.type == "cuda":
        info.update(_cuda_info(device.index or 0))
    elif device.type == "npu":
        info.update(ascend.describe(device.index or 0))
    return info


def _numerics_flags() -> dict[str, Any]:
    flags: dict[str, Any] = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda_matmul_allow_bf16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "cuda_matmul_allow_fp16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    for kernel in ("flash", "mem_efficient", "math", "cudnn"):
        enabled = getattr(torch.backends.cuda, f"{kernel}_sdp_enabled", None)
        if enabled is not None:
            flags[f"sdp_{kernel}_enabled"] = bool(enabled())
    return {
        key: (value if isinstance(value, (bool, int, float)) else str(value))
        for key, value in flags.items()
    }


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _cuda_info(index: int) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(index)
    return {
        "device_name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda_version": str(torch.version.cuda),
        "cudnn_version": str(torch.backends.cudnn.version()),
        "driver_version": _nvidia_driver_version(index),
    }


@functools.lru_cache(maxsize=None)
def _nvidia_driver_version(index: int) -> str:
    """The driver version from nvidia-smi; torch does not expose it."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            env={**os.environ, "LC_ALL": "C"},
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
