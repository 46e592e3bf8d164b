"""Everything Ascend-specific lives here: the lazy torch_npu import and the NPU numerics facts.

torch_npu registers the ``npu`` device type with torch when imported; after that the generic device
code (``torch.npu`` as the device module, events, pinned memory, synchronize) is the same as for CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from ..errors import DeviceError

_INSTALL_HINT = (
    "install the Ascend build of PyTorch with `pip install 'hwdiff[npu]'` on a machine with the "
    "CANN toolkit, and source CANN's set_env.sh before running"
)


def is_installed() -> bool:
    """True when torch_npu can be imported (checked without importing it)."""
    return importlib.util.find_spec("torch_npu") is not None


def import_torch_npu() -> Any:
    """Import torch_npu (registering the ``npu`` device) or raise a clear :class:`DeviceError`."""
    if not is_installed():
        raise DeviceError(
            f"device 'npu' needs the torch_npu package, which is not installed: {_INSTALL_HINT}"
        )
    try:
        return importlib.import_module("torch_npu")
    except Exception as exc:  # a broken CANN install raises all sorts of errors at import time
        raise DeviceError(
            f"torch_npu is installed but failed to import ({exc}); {_INSTALL_HINT}"
        ) from exc


def describe(index: int) -> dict[str, Any]:
    """Device name, backend versions and numerics flags of NPU ``index`` (torch_npu already imported)."""
    import torch

    torch_npu = importlib.import_module("torch_npu")
    info: dict[str, Any] = {
        "device_name": torch.npu.get_device_name(index),
        "torch_npu_version": getattr(torch_npu, "__version__", "unknown"),
        "cann_version": _cann_version(torch_npu),
    }
    matmul = getattr(torch.npu, "matmul", None)
    conv = getattr(torch.npu, "conv", None)
    # HF32 is Ascend's TF32: torch_npu defaults to matmul off, conv on. Record what is in force.
    info["npu_matmul_allow_hf32"] = bool(getattr(matmul, "allow_hf32", False))
    info["npu_conv_allow_hf32"] = bool(getattr(conv, "allow_hf32", True))
    return info


def _cann_version(torch_npu: Any) -> str:
    """CANN's version: ``torch_npu.npu.get_cann_version()`` (newer torch_npu; "" when CANN does not
    say), else ``torch.version.cann`` (set by torch_npu's collect_env at import; "not known" when it
    found no install file), else "unknown"."""
    import torch

    getter = getattr(getattr(torch_npu, "npu", None), "get_cann_version", None)
    if callable(getter):
        try:
            version = str(getter() or "")
        except Exception:  # a CANN without the version query raises; the fallback may still know
            version = ""
        if version:
            return version
    version = str(getattr(torch.version, "cann", None) or "")
    return version if version and version != "not known" else "unknown"
