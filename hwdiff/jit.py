"""The optional compiled kernels (numba): loaded once, on first use, and only when wanted.

``HWDIFF_JIT=0`` in the environment, or numba missing, selects the plain numpy / torch paths, which
compute the same numbers (the tests hold each kernel to its reference path). ``NUMBA_NUM_THREADS``
limits the kernels' threads; their results do not depend on it.
"""
from __future__ import annotations

import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)

_state: dict = {}


def kernels() -> ModuleType | None:
    """The module of compiled kernels (:mod:`hwdiff._numba_kernels`), or None when unavailable."""
    if "module" not in _state:
        _state["module"], _state["why"] = None, ""
        if os.environ.get("HWDIFF_JIT", "1").strip().lower() in ("0", "false", "no", "off"):
            _state["why"] = "disabled by HWDIFF_JIT=0"
        else:
            try:
                from . import _numba_kernels
            except ImportError as error:
                _state["why"] = f"numba is not importable ({error}); pip install numba for the compiled kernels"
                log.warning("hwdiff: %s; using the numpy/torch paths (same numbers, several times slower)",
                            _state["why"])
            else:
                _state["module"] = _numba_kernels
    return _state["module"]


def available() -> bool:
    """True when the compiled kernels are used."""
    return kernels() is not None


def why_unavailable() -> str:
    """Why the reference paths are used ('' when the kernels are available)."""
    kernels()
    return _state["why"]


CHUNK_ELEMENTS, MAX_CHUNKS = 1 << 16, 16


def chunks(size: int) -> int:
    """Chunks (rows of partial results) a kernel cuts ``size`` elements into: one per
    CHUNK_ELEMENTS, at most MAX_CHUNKS. It depends on the size alone, so that results do not depend
    on the number of threads that reduce the chunks."""
    return int(min(MAX_CHUNKS, max(1, -(-size // CHUNK_ELEMENTS))))
