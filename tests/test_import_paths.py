"""Every import path the project documents works: the ones in README, docs, notebooks, integrations,
probes and benchmarks resolve at their current place without a warning, and the flat layout's old
module paths (``hwdiff.hooks``, ``hwdiff.sigma_probe``, ...) still import — the same module object —
with a DeprecationWarning naming the new place."""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from hwdiff._moved import MOVED

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [
    "README.md",
    "docs/*.md",
    "notebooks/*.ipynb",
    "integrations/**/*.py",
    "probes/*.py",
    "benchmarks/*.py",
]
FROM_IMPORT = re.compile(r"^\s*from (hwdiff(?:\.\w+)*) import \(?([\w ,]+)\)?\s*$", re.M)
PLAIN_IMPORT = re.compile(r"^\s*import (hwdiff(?:\.\w+)*)", re.M)
REFERENCE = re.compile(
    r"`(hwdiff(?:\.\w+)+)"
)  # a dotted name in backticks: `hwdiff.aqn.apply_schedule`


def _code(path: Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        return "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    return path.read_text()


def documented() -> list[tuple[str, str, str | None]]:
    """(where, module, name or None) for every hwdiff import and backticked hwdiff name in the documents."""
    found = set()
    for pattern in DOCUMENTS:
        for path in sorted(ROOT.glob(pattern)):
            if "vendor" in path.parts:
                continue
            where = str(path.relative_to(ROOT))
            if path.suffix == ".py":
                for node in ast.walk(ast.parse(path.read_text())):
                    if (
                        isinstance(node, ast.ImportFrom)
                        and not node.level
                        and (node.module or "").startswith("hwdiff")
                    ):
                        found.update((where, node.module, alias.name) for alias in node.names)
                    elif isinstance(node, ast.Import):
                        found.update(
                            (where, alias.name, None)
                            for alias in node.names
                            if alias.name.startswith("hwdiff")
                        )
                continue
            text = _code(path)
            for match in FROM_IMPORT.finditer(text):
                found.update(
                    (where, match.group(1), name.strip().split(" ")[0])
                    for name in match.group(2).split(",")
                    if name.strip()
                )
            found.update((where, match.group(1), None) for match in PLAIN_IMPORT.finditer(text))
            found.update(
                (where, match.group(1), "") for match in REFERENCE.finditer(path.read_text())
            )
    return sorted(found, key=lambda item: (item[1], item[2] or "", item[0]))


def _resolve(dotted: str) -> object:
    """A dotted name: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            value = getattr(value, attribute)
        return value
    raise ModuleNotFoundError(dotted)


PATHS = documented()


def test_the_documents_name_import_paths():
    """The scan finds what it should (a broken pattern would make the test below vacuous)."""
    modules = {module for _, module, _ in PATHS}
    assert (
        len(PATHS) > 50
        and {"hwdiff", "hwdiff.aqn", "hwdiff.capturing.generate", "hwdiff.errors"} <= modules
    )


@pytest.mark.parametrize("where, module, name", PATHS, ids=[f"{w}:{m}:{n}" for w, m, n in PATHS])
def test_documented_path_imports_without_a_warning(where, module, name):
    # by the table too: an old path imported earlier in this session would not warn again
    dotted = f"{module}.{name}" if name else module
    assert not any(
        dotted == f"hwdiff.{old}" or dotted.startswith(f"hwdiff.{old}.") for old in MOVED
    ), f"{where} names the old path {dotted}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        if name == "":  # a backticked reference
            _resolve(module)
        elif name is None:
            importlib.import_module(module)
        else:
            value = importlib.import_module(module)
            assert hasattr(value, name) or importlib.import_module(f"{module}.{name}"), (
                f"{where}: {module}.{name}"
            )


OLD_PATHS = r"""
import importlib, json, sys, warnings
from hwdiff._moved import MOVED
out = {}
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"hwdiff.{old}")
    target = importlib.import_module(f"hwdiff.{new}")
    names = [n for n in vars(target) if not n.startswith("__")][:5]
    out[old] = {"same": module is target, "spec": target.__spec__.name,
                "warnings": [str(w.message) for w in caught if w.category is DeprecationWarning],
                "names": all(getattr(importlib.import_module(f"hwdiff.{old}"), n) is getattr(target, n) for n in names)}
print(json.dumps(out))
"""


def test_old_flat_paths_still_import_with_a_deprecation_warning():
    result = subprocess.run(
        [sys.executable, "-c", OLD_PATHS], capture_output=True, text=True, cwd=ROOT, check=True
    )
    seen = json.loads(result.stdout)
    assert set(seen) == set(MOVED)
    for old, new in MOVED.items():
        assert seen[old]["same"] and seen[old]["names"], old
        assert seen[old]["spec"] == f"hwdiff.{new}", old  # the shared module keeps its own name
        assert any(
            f"hwdiff.{old} moved to hwdiff.{new}" in message for message in seen[old]["warnings"]
        ), old


def test_no_subpackage_shadows_a_function_of_the_api():
    """Importing every subpackage leaves hwdiff.capture, hwdiff.diff, ... the functions (a subpackage
    named like one would replace it on hwdiff once imported)."""
    code = (
        "import importlib, pkgutil, hwdiff\n"
        "for info in pkgutil.walk_packages(hwdiff.__path__, 'hwdiff.'):\n"
        "    if not info.name.endswith(('__main__', '_msprobe_worker')): importlib.import_module(info.name)\n"
        "print(sorted(n for n in hwdiff.__all__ if n[0].islower() and n != '__version__'"
        " and not callable(getattr(hwdiff, n))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "[]"


USER_SCRIPT = """import hwdiff.hooks
from hwdiff.sigma_probe import verify
from hwdiff import jit
from hwdiff.calibration import *
from hwdiff.structure import *
import hwdiff
hwdiff.exporters
print(load_sigma.__module__, find_norms.__module__, verify.__module__)
"""


def test_an_old_user_script_sees_each_warning_at_its_own_line(tmp_path):
    """Run as a script (the default warning filter: DeprecationWarning shown for __main__ only), each
    old path warns at the line that imports it; star imports of the packages give their public names."""
    script = tmp_path / "old_user.py"
    script.write_text(USER_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert result.stdout.split() == [
        "hwdiff.calibration.sigmafile",
        "hwdiff.structure.norms",
        "hwdiff.measure.sigma_probe",
    ]
    for line, old in ((1, "hooks"), (2, "sigma_probe"), (3, "jit"), (7, "exporters")):
        assert f"old_user.py:{line}: DeprecationWarning: hwdiff.{old} moved to" in result.stderr, (
            old
        )


def test_the_command_line_runs_as_a_module_of_its_package():
    result = subprocess.run(
        [sys.executable, "-m", "hwdiff.cli", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0 and result.stdout.startswith("hwdiff ")
