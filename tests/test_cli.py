import subprocess
import sys

import pytest

from .conftest import L, ROOT, run_cli


def _one_clear_line(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hwdiff: error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_capture_then_inspect(tmp_path):
    out = tmp_path / "cap.h5"
    proc = run_cli("capture", "--device", "cpu", "--dtype", "bfloat16", "--limit", "3", "--max-tokens", "16",
                   "--record-inputs", "-q", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    shown = run_cli("inspect", out)
    assert shown.returncode == 0, shown.stderr
    assert "device               cpu" in shown.stdout and "bfloat16" in shown.stdout
    rows = [line for line in shown.stdout.splitlines() if line.split()[2:3] == ["rmsnorm"]]
    assert len(rows) == 2 * L + 1
    assert "model.norm" in rows[-1] and "weight stored" in rows[-1]
    # Qwen2: two pre-norms per layer (attention, MLP) and the final norm before lm_head
    assert f"{2 * L + 1} norms (final 1, pre {2 * L}); sub-blocks attention {L}, head 1, mlp {L}" in shown.stdout


def test_capture_selects_by_regex_and_kind(tmp_path):
    out = tmp_path / "cap.h5"
    proc = run_cli("capture", "--device", "cpu", "--limit", "2", "--max-tokens", "8", "-q", "--modules",
                   r"layers\.0\.", "--kinds", "linear,rmsnorm", "--mode", "sample", "--tokens", "4", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "9 modules" in proc.stdout  # 7 Linear + 2 norms of layer 0


@pytest.mark.parametrize("args, fragments", [
    (["--model", "no/such/model"], ["no/such/model"]),
    (["--model", "./nowhere"], ["unknown model spec"]),
    (["--device", "tpu"], ["unknown device 'tpu'"]),
    (["--device", "npu"], ["torch_npu"]),
    (["--inputs", "/nonexistent/ids.npy"], ["cannot read inputs file"]),
    (["--modules", "no_such_module"], ["matches no module"]),
    (["--dtype", "float8"], ["unknown dtype"]),
])
def test_capture_bad_input_gets_one_clear_line(tmp_path, args, fragments):
    out = tmp_path / "x.h5"
    proc = run_cli("capture", "--device", "cpu", "--limit", "1", "--max-tokens", "8", "-q", *args, "-o", out)
    _one_clear_line(proc, *fragments)
    assert not out.exists()


def test_inspect_refuses_non_hdf5_and_truncated_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not a capture")
    _one_clear_line(run_cli("inspect", tmp_path / "notes.txt"), "not an HDF5 file")
    good = tmp_path / "good.h5"
    assert run_cli("capture", "--device", "cpu", "--limit", "2", "--max-tokens", "8", "-q", "-o", good).returncode == 0
    data = good.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    _one_clear_line(run_cli("inspect", tmp_path / "cut.h5"), "truncated")
    _one_clear_line(run_cli("inspect", tmp_path / "missing.h5"), "no such file")


def test_help_is_fast_and_lists_the_commands():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hwdiff", "--help"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0 and "capture" in proc.stdout and "inspect" in proc.stdout
    assert "torch" not in {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
