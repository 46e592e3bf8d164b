"""Start-up cost of a fresh ``hwdiff diff`` process (docs/benchmarks.md): what it must not import."""

import json
import subprocess
import sys

import pytest

import hwdiff

HEAVY = ("torch", "scipy.optimize", "scipy.linalg", "scipy.stats", "matplotlib")


@pytest.mark.slow
def test_a_fresh_diff_imports_neither_torch_nor_scipy_optimize_nor_linalg(
    tmp_path, tiny_fp32, tiny_bf16
):
    """A diff whose fits run (a float32 / bfloat16 pair differs everywhere) in a fresh process: scipy.special
    is all of scipy it loads; numba's import is kept from loading scipy.linalg; no torch."""
    pair = []
    for name, model in (("a", tiny_fp32), ("b", tiny_bf16)):
        pair.append(
            str(
                hwdiff.capture(
                    model,
                    tmp_path / f"{name}.h5",
                    inputs=hwdiff.load_inputs([[1, 2, 3, 4, 5, 6]] * 2),
                    progress=False,
                ).path
            )
        )
    code = (
        "import sys, json, hwdiff; result = hwdiff.diff(*sys.argv[1:], progress=False); "
        f"print(json.dumps([len(result.layers), [m for m in {HEAVY!r} if m in sys.modules], "
        "'scipy.special' in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *pair], capture_output=True, text=True, check=True, timeout=300
    )
    layers, heavy, special = json.loads(out.stdout.strip().splitlines()[-1])
    assert layers > 10 and special  # the fits ran (they need scipy.special's CDFs)
    assert heavy == []
