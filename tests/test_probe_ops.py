import numpy as np
import pytest
import torch

import hwdiff
from hwdiff.capturing.probe_ops import MATMUL_KS, build, probe_ops

from .conftest import ROOT, run_cli

BF16_ROUNDING = 0.425 * 2.0**-8


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return probe_ops(
        tmp_path_factory.mktemp("ops") / "golden.h5", device="cpu", dtype="float64", progress=False
    ).path


def test_inputs_are_exactly_representable_in_every_dtype():
    for name, module, values in build():
        if name == "cast":
            continue
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert np.array_equal(torch.from_numpy(values).to(dtype).double().numpy(), values), (
                name,
                dtype,
            )
        for param in module.parameters():
            assert torch.equal(param.bfloat16().double(), param)


def test_bf16_matmul_with_fp32_accumulation_is_one_rounding_for_every_k(tmp_path, golden):
    ops = probe_ops(tmp_path / "bf16.h5", dtype="bfloat16", progress=False).path
    result = hwdiff.diff(golden, ops, progress=False)
    for k in MATMUL_KS:
        assert result.layer(f"matmul.K{k}").metrics.rel_l2 == pytest.approx(
            BF16_ROUNDING, rel=0.10
        ), k
    assert result.layer("cast").metrics.rel_l2 == pytest.approx(BF16_ROUNDING, rel=0.10)


def test_bf16_block_accumulation_grows_like_sqrt_k(tmp_path, golden):
    ops = probe_ops(
        tmp_path / "blk.h5", dtype="float32", emulate=["bf16-block-accum:block=64"], progress=False
    ).path
    result = hwdiff.diff(golden, ops, progress=False)
    errors = np.array([result.layer(f"matmul.K{k}").metrics.rel_l2 for k in MATMUL_KS])
    assert (np.diff(errors) > 0).all()
    slope = np.polyfit(np.log(MATMUL_KS[3:]), np.log(errors[3:]), 1)[
        0
    ]  # once many blocks are summed
    assert 0.4 < slope < 0.6
    assert result.layer("silu").metrics.rel_l2 < 1e-6  # the Linear profile touches nothing else


def test_two_runs_are_bit_identical_and_float32_is_close_to_golden(tmp_path, golden):
    a = probe_ops(tmp_path / "a.h5", dtype="float32", progress=False).path
    b = probe_ops(tmp_path / "b.h5", dtype="float32", progress=False).path
    assert hwdiff.diff(a, b, progress=False).exact
    assert (
        max(layer.metrics.rel_l2 for layer in hwdiff.diff(golden, a, progress=False).outputs) < 1e-6
    )


def test_cli_and_probe_script(tmp_path):
    proc = run_cli(
        "probe-ops", "--device", "cpu", "--dtype", "float16", "-q", "-o", tmp_path / "ops.h5"
    )
    assert proc.returncode == 0, proc.stderr
    import subprocess
    import sys

    script = subprocess.run(
        [
            sys.executable,
            str(ROOT / "probes" / "ops.py"),
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--output",
            str(tmp_path / "p.h5"),
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert script.returncode == 0, script.stderr
    assert "ops file:" in script.stdout
    bad = run_cli("probe-ops", "--device", "tpu", "-o", tmp_path / "x.h5")
    assert bad.returncode == 2 and "unknown device" in bad.stderr
