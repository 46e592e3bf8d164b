#!/usr/bin/env python3
"""Peak memory of building and capturing qwen2.5-1.5b-arch in bfloat16 on the CPU, against its weights.

    python benchmarks/memory.py            # writes docs/memory.json

Each step runs in a fresh process (peak RSS from the kernel's ru_maxrss, reported by a small launcher):
importing hwdiff and torch; building the model only; a full capture of one batch (--limit 2
--max-tokens 64 --batch-size 2, the shipped prompts). The bound of issue 18 is 1.5 × (bf16 weights + one
batch of activations), the batch being the bytes the capture stored (one batch here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from vs_msprobe import run_peak  # noqa: E402  (the launcher that reads a child's peak RSS)


def peak(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of a command, run with this checkout on PYTHONPATH."""
    os.environ["PYTHONPATH"] = str(ROOT)
    seconds, megabytes = run_peak(command)
    return seconds, megabytes * 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-1.5b-arch")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "memory.json")
    args = parser.parse_args()
    python = sys.executable
    count = (
        "import hwdiff, torch; m = hwdiff.load_model(%r, dtype='bfloat16'); "
        "print(sum(p.numel() * p.element_size() for p in m.parameters()))" % args.model
    )
    weights = int(
        subprocess.run(
            [python, "-c", count],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        ).stdout.split()[-1]
    )
    result = {"model": args.model, "dtype": "bfloat16", "weights_bytes": weights}
    result["import_s"], result["import_peak_bytes"] = peak(
        [python, "-c", "import torch, hwdiff.capturing"]
    )
    build = "import hwdiff; hwdiff.load_model(%r, dtype='bfloat16')" % args.model
    result["build_s"], result["build_peak_bytes"] = peak([python, "-c", build])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.h5"
        result["capture_s"], result["capture_peak_bytes"] = peak(
            [
                python,
                "-m",
                "hwdiff",
                "capture",
                "--model",
                args.model,
                "--dtype",
                "bfloat16",
                "--device",
                "cpu",
                "--limit",
                "2",
                "--max-tokens",
                "64",
                "--batch-size",
                "2",
                "-q",
                "-o",
                str(path),
            ]
        )
        result["batch_activation_bytes"] = path.stat().st_size
    bound = 1.5 * (weights + result["batch_activation_bytes"])
    result["bound_bytes"] = bound
    result["capture_peak_over_weights_plus_batch"] = result["capture_peak_bytes"] / (
        weights + result["batch_activation_bytes"]
    )
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
