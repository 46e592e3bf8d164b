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
    """The module of compiled kernels (:mod:`hwdiff.common._numba_kernels`), or None when unavailable."""
    if "module" not in _state:
        _state["module"], _state["why"] = None, ""
        if os.environ.get("HWDIFF_JIT", "1").strip().lower() in ("0", "false", "no", "off"):
            _state["why"] = "disabled by HWDIFF_JIT=0"
        else:
            try:
                _numba_kernels = _import_kernels()
            except ImportError as error:
                _state["why"] = (
                    f"numba is not importable ({error}); pip install numba for the compiled kernels"
                )
                log.warning(
                    "hwdiff: %s; using the numpy/torch paths (same numbers, several times slower)",
                    _state["why"],
                )
            else:
                _state["module"] = _numba_kernels
    return _state["module"]


_BLAS = "scipy.linalg.cython_blas"


def _import_kernels() -> ModuleType:
    """Import :mod:`hwdiff.common._numba_kernels` without numba importing scipy.linalg on the way.

    numba's import probes scipy.linalg's BLAS (≈0.2 s of a fresh process, measured in
    docs/benchmarks.md) only to choose how its own np.correlate / np.convolve are compiled; the
    kernels here call no BLAS. The probe is answered "absent" during the import and numba's answer
    set afterwards to what the probe would have found (scipy installed: BLAS available; numba then
    imports scipy.linalg itself when it compiles something that needs it)."""
    import importlib.util
    import sys

    blocked = _BLAS not in sys.modules and "numba" not in sys.modules
    if blocked:
        sys.modules[_BLAS] = None  # type: ignore[assignment]  # `import` of it raises ImportError
    try:
        from . import _numba_kernels

        if blocked:
            import numba.np.arraymath  # noqa: F401  # where the probe runs (otherwise at the first kernel's load)
    finally:
        if blocked:
            if sys.modules.get(_BLAS, 0) is None:
                del sys.modules[_BLAS]
            arraymath = sys.modules.get("numba.np.arraymath")
            if arraymath is not None and hasattr(arraymath, "_HAVE_BLAS"):
                # setattr: a module object declares no attributes to the type checker
                setattr(arraymath, "_HAVE_BLAS", importlib.util.find_spec("scipy") is not None)
    return _numba_kernels


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
