import os
import subprocess
import sys

import pytest
import torch

import hwdiff
from hwdiff.capturing import ascend

from .conftest import ROOT


def _probe(name, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / "probes" / name), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )


def test_cpu_golden_probe_writes_a_float32_capture_and_says_where(tmp_path):
    out = tmp_path / "golden.h5"
    proc = _probe("capture_cpu_golden.py", "--limit", "2", "--max-tokens", "8", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert f"capture file: {out}" in proc.stdout
    with hwdiff.open_capture(out) as cap:
        assert cap.meta["dtype"] == "float32" and cap.meta["attn_implementation"] == "eager"
        assert cap.meta["deterministic_algorithms"] is True
        assert "input" in cap.modules["model.layers.0.mlp"].slots


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_probe_without_a_gpu_fails_clearly(tmp_path):
    proc = _probe("capture_cuda.py", "--output", tmp_path / "x.h5")
    assert (
        proc.returncode == 2 and "Traceback" not in proc.stderr and "not available" in proc.stderr
    )


@pytest.mark.skipif(
    ascend.is_installed(), reason="checks the message on a machine without torch_npu"
)
def test_npu_probe_without_torch_npu_fails_clearly(tmp_path):
    proc = _probe("capture_npu.py", "--output", tmp_path / "x.h5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "torch_npu" in proc.stderr
