"""The README's examples run as written: its Python block, and each CLI line it shows for capture."""

import re

import numpy as np

from .conftest import ROOT, run_cli

README = (ROOT / "README.md").read_text()


def test_readme_python_examples_run_in_order(tmp_path, monkeypatch):
    from hwdiff.demo import main

    monkeypatch.chdir(tmp_path)
    assert main(["--out", "demo", "-q"]) == 0  # what `make demo` leaves behind
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", README, re.S):
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["norm_out"].dtype == np.float32 and namespace["weight"].shape == (256,)
    assert (tmp_path / "cpu.h5").exists() and (tmp_path / "diff.json").exists()
    assert str(namespace["result"].first_divergence).startswith("model.layers.0.self_attn")
    assert (tmp_path / "sigma.yaml").exists() and namespace["used"][
        "model.layers.0.input_layernorm"
    ] > 0


def test_readme_cli_example_runs(tmp_path):
    lines = [
        line.strip()
        for line in README.splitlines()
        if re.match(r"\s*hwdiff (capture|inspect|diff) ", line)
    ]
    assert lines[:2] == [
        "hwdiff capture --model tiny-qwen2 --device cpu --dtype bfloat16 -o cpu.h5",
        "hwdiff inspect cpu.h5",
    ]
    for line in lines[:2]:
        args = line.split()[1:]
        if args[0] == "capture":
            args += ["--limit", "4", "--max-tokens", "16", "-q"]  # the same command, smaller
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    diff_line = next(line for line in lines if line.startswith("hwdiff diff"))
    for name in (
        "gpu.h5",
        "npu.h5",
        "golden.h5",
    ):  # stand-ins: three captures of one model and inputs
        (tmp_path / name).write_bytes((tmp_path / "cpu.h5").read_bytes())
    proc = run_cli(*diff_line.split()[1:], "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all((tmp_path / name).exists() for name in ("diff.h5", "diff.json", "diff.csv"))
