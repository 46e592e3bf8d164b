"""Packages that were one module: each re-exports the names its submodules hold and imports a
submodule on first use of one of them (PEP 562), so ``from hwdiff.calibration import calibrate`` keeps
working and importing the package stays cheap."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any, Callable, Mapping


def reexport(
    package: str, exports: Mapping[str, str]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``, whose ``exports`` maps each name to
    the submodule that holds it. A name is looked up once, then is a plain attribute of the package; an
    unlisted name that is a submodule (``hwdiff.store.ranks``) is imported."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            setattr(sys.modules[package], name, value)
            return value
        if importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return [name for name in exports if not name.startswith("_")], __getattr__, __dir__
