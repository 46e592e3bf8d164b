"""The README's examples run as written: its Python block, and each CLI line it shows for capture."""
import re

import numpy as np

from .conftest import ROOT, run_cli

README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["norm_out"].dtype == np.float32 and namespace["weight"].shape == (256,)
    assert (tmp_path / "cpu.h5").exists()


def test_readme_cli_example_runs(tmp_path):
    lines = [line.strip() for line in README.splitlines() if re.match(r"\s*hwdiff (capture|inspect) ", line)]
    assert lines[:2] == ["hwdiff capture --model tiny-qwen2 --device cpu --dtype bfloat16 -o cpu.h5",
                         "hwdiff inspect cpu.h5"]
    for line in lines[:2]:
        args = line.split()[1:]
        if args[0] == "capture":
            args += ["--limit", "4", "--max-tokens", "16", "-q"]  # the same command, smaller
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
