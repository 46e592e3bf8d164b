"""Line coverage of hwdiff's Ascend path by the npu tests, without the coverage package.

    PYTHONPATH=$PWD python tests/ascend_coverage.py

Runs ``pytest -m npu`` with the stand-in worker tracing the lines it executes (sys.settrace, every
thread) and prints, per file, executed / executable lines and the lines never run. Executable lines
are those the compiler gives bytecode to (``co_lines`` of every function's code object) minus each
``def`` line, which ran at import, before any tracing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = (
    "hwdiff/capturing/ascend.py",
    "hwdiff/capturing/devices.py",
    "hwdiff/capturing/hooks.py",
    "hwdiff/store/stats.py",
)


def executable_lines(path: Path) -> dict[str, set[int]]:
    """Lines of each function of ``path`` (qualified name → line numbers), bodies only."""
    found: dict[str, set[int]] = {}

    def visit(code: types.CodeType, prefix: str) -> None:
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                name = f"{prefix}{const.co_name}"
                lines = {line for _, _, line in const.co_lines() if line is not None}
                lines.discard(
                    const.co_firstlineno
                )  # the def line (decorators, signature) ran at import
                if const.co_name not in (
                    "<lambda>",
                    "<genexpr>",
                    "<listcomp>",
                    "<dictcomp>",
                    "<setcomp>",
                ):
                    found.setdefault(name, set()).update(lines)
                visit(const, name + ".")

    visit(compile(path.read_text(), str(path), "exec"), "")
    return found


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "lines.json"
        env = {**os.environ, "HWDIFF_NPU_TRACE": str(trace), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-m",
                "npu",
                "-p",
                "no:cacheprovider",
                str(ROOT / "tests" / "test_npu.py"),
            ],
            cwd=ROOT,
            env=env,
        )
        executed = (
            {(f, line) for f, line in json.loads(trace.read_text())} if trace.exists() else set()
        )
    for relative in FILES:
        path = ROOT / relative
        ran = {line for f, line in executed if f == str(path)}
        functions = executable_lines(path)
        total = set().union(*functions.values())
        missed_functions = [name for name, lines in functions.items() if lines and not lines & ran]
        print(
            f"{relative}: {len(total & ran)}/{len(total)} executable lines in functions "
            f"({100 * len(total & ran) / max(len(total), 1):.0f}%), {len(functions) - len(missed_functions)}/"
            f"{len(functions)} functions; never run: lines {sorted(total - ran) or 'none'}; "
            f"functions {missed_functions or 'none'}"
        )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
