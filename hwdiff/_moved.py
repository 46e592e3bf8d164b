"""Where the modules of hwdiff's flat layout (before the packages by stage) live now.

``import hwdiff.hooks`` (or ``from hwdiff.sigma_probe import verify``) still works: a finder on
``sys.meta_path`` answers the old name with the module at its new place — the same module object,
so a monkeypatch through either name is seen by both — and warns with a :class:`DeprecationWarning`
naming the new path. The table is the whole story; docs/design.md ("Layer order and package
layout") gives the stage each package holds.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import warnings
from types import ModuleType

# old name under hwdiff -> new dotted name under hwdiff
MOVED: dict[str, str] = {
    "_numba_kernels": "common._numba_kernels",
    "ascend": "capturing.ascend",
    "callspec": "structure.callspec",
    "checkpoints": "capturing.checkpoints",
    "devicemap": "capturing.devicemap",
    "devices": "capturing.devices",
    "distributed": "capturing.distributed",
    "emulate": "capturing.emulate",
    "exporters": "calibration.exporters",
    "generate": "capturing.generate",
    "hooks": "capturing.hooks",
    "inputs": "capturing.inputs",
    "inspect": "store.inspect",
    "jit": "common.jit",
    "law_evidence": "calibration.law_evidence",
    "laws": "compare.laws",
    "logprobs": "capturing.logprobs",
    "models": "capturing.models",
    "outputs": "common.outputs",
    "policy_check": "measure.policy_check",
    "probe": "capturing.probe",
    "probe_ops": "capturing.probe_ops",
    "rankstore": "store.ranks",
    "replaying": "capturing.replaying",
    "robustness_card": "measure.robustness_card",
    "robustness_run": "measure.robustness_run",
    "rounding": "calibration.rounding",
    "schedule": "calibration.schedule",
    "sigma_probe": "measure.sigma_probe",
    "sigmafile": "calibration.sigmafile",
    "stats": "store.stats",
}


class _OldPath:  # a meta-path finder and its loader (the protocol, without importlib.abc's import cost)
    """Answers ``hwdiff.<old>`` with ``hwdiff.<new>`` (and warns); everything else passes by."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        old = fullname.partition("hwdiff.")[2] if fullname.startswith("hwdiff.") else ""
        if old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        old = spec.name.partition("hwdiff.")[2]
        new = f"hwdiff.{MOVED[old]}"
        warnings.warn(
            f"{spec.name} moved to {new}: import it from there (the old path goes in a later release)",
            DeprecationWarning,
            stacklevel=_importer_level(),
        )
        module = importlib.import_module(new)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system set the old name's spec on the shared module: give it back its own
        module.__spec__ = self._real_spec


def _importer_level() -> int:
    """The ``stacklevel`` that names the code doing the import, so the default filter shows the
    warning for an import in ``__main__``. ``warnings`` already skips the import system's frozen
    frames; ``importlib.import_module`` and ``hwdiff.__getattr__`` (``hwdiff.hooks`` as an attribute)
    are skipped here."""
    level, frame = 2, sys._getframe(2)  # level 1 is create_module, the caller of warnings.warn
    passing = (importlib.__file__, os.path.join(os.path.dirname(__file__), "__init__.py"))
    while frame is not None:
        name = frame.f_code.co_filename
        if not ("importlib" in name and "_bootstrap" in name):  # frames warnings counts
            if name not in passing:
                return level
            level += 1
        frame = frame.f_back
    return level


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (``import hwdiff`` calls this)."""
    if not any(isinstance(finder, _OldPath) for finder in sys.meta_path):
        sys.meta_path.append(_OldPath())
