"""hwdiff: measure how two devices compute the same model differently, and turn it into AQN noise.

The public API; heavy dependencies (torch, transformers, h5py) load on first use of a name.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from . import _moved
from ._version import __version__
from .errors import HwdiffError

_moved.install()  # the flat layout's module paths (hwdiff.hooks, ...) still import, with a DeprecationWarning

__all__ = [
    "__version__",
    "HwdiffError",
    "load_model",
    "load_inputs",
    "resolve_device",
    "record",
    "capture",
    "open_capture",
    "inspect_capture",
    "diff",
    "DiffResult",
    "replay",
    "calibrate",
    "SigmaSchedule",
    "AQNInjector",
    "load_sigma",
    "save_sigma",
    "report",
    "robustness",
]

_LAZY = {
    "load_model": "capturing.models",
    "load_inputs": "capturing.inputs",
    "resolve_device": "capturing.devices",
    "record": "capturing.hooks",
    "capture": "capturing.run",
    "open_capture": "store.reader",
    "inspect_capture": "store.inspect",
    "diff": "compare.core",
    "DiffResult": "compare.results",
    "replay": "capturing.replaying",
    "calibrate": "measure.calibrate_run",  # the library call of hwdiff calibrate; hwdiff.calibration.calibrate is the σ math
    "SigmaSchedule": "calibration.schedule",
    "AQNInjector": "aqn",
    "load_sigma": "calibration.sigmafile",
    "save_sigma": "calibration.sigmafile",
    "report": "reporting",
    "robustness": "measure.robustness_run",  # not hwdiff/robustness.py: a module of that name would shadow the function
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if (
        importlib.util.find_spec(f"{__name__}.{name}") is not None
    ):  # hwdiff.aqn, hwdiff.capturing, ... as in the docs
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hwdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
