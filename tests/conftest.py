import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub; failures must be fast

ROOT = Path(__file__).resolve().parents[1]
L = 4  # decoder layers of tiny-qwen2


@pytest.fixture(scope="session")
def tiny_fp32():
    import hwdiff

    return hwdiff.load_model("tiny-qwen2", dtype="float32")


@pytest.fixture(scope="session")
def tiny_bf16():
    import hwdiff

    return hwdiff.load_model("tiny-qwen2", dtype="bfloat16")


def run_cli(*args, cwd=None, timeout=300):
    """Run ``python -m hwdiff ARGS`` in a subprocess; returns the CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "hwdiff", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
