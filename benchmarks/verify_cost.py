"""What `calibrate --verify` costs against one capture of the same inputs (issue 25's target: ≤ 1.5×).

In one process, on the CPU: the reference capture (bf16 sdpa, --record-inputs, the first LIMIT shipped
prompts) is timed, then the target capture, the replay and the diff are made untimed, then the default
calibration (gains measured on the norm and its sub-block) and its --verify are timed. Writes a JSON
with the seconds, the ratio, torch's thread count and the CPU model (numbers depend on both).

    python benchmarks/verify_cost.py --model smollm2-135m --out docs/verify-cost.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import hwdiff
from hwdiff.capturing.devices import cpu_name
from hwdiff.measure.sigma_probe import verify


def cpu_model() -> str:
    return cpu_name()  # hwdiff.capturing.devices: the name captures record too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sdpa = hwdiff.load_model(args.model, dtype="bfloat16", attn_implementation="sdpa")
        eager = hwdiff.load_model(args.model, dtype="bfloat16", attn_implementation="eager")
        started = time.perf_counter()
        reference = hwdiff.capture(
            sdpa, root / "ref.h5", record_inputs=True, limit=args.limit, progress=False
        ).path
        capture_s = time.perf_counter() - started
        target = hwdiff.capture(eager, root / "tgt.h5", limit=args.limit, progress=False).path
        local = hwdiff.replay(eager, reference, root / "local.h5", progress=False).path
        hwdiff.diff(reference, target, local=local, out=root / "diff.h5", progress=False)
        started = time.perf_counter()
        calibration = hwdiff.calibrate(root / "diff.h5", model=sdpa)
        calibrate_s = time.perf_counter() - started
        started = time.perf_counter()
        checked = verify(calibration, sdpa)
        verify_s = time.perf_counter() - started
    result = {
        "model": args.model,
        "prompts": args.limit,
        "pair": "bf16 sdpa vs bf16 eager, CPU",
        "capture_s": round(capture_s, 2),
        "calibrate_measured_s": round(calibrate_s, 2),
        "verify_s": round(verify_s, 2),
        "calibrate_and_verify_over_capture": round((calibrate_s + verify_s) / capture_s, 2),
        "verify_over_capture": round(verify_s / capture_s, 2),
        "verify_passed": checked.passed,
        "ratios": [
            round(min(l.ratio for l in checked.layers), 3),
            round(max(l.ratio for l in checked.layers), 3),
        ],
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "hwdiff": hwdiff.__version__,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
