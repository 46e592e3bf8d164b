#!/usr/bin/env python3
"""Workload B: qwen2.5-1.5b-arch (seeded random weights) on the CPU in bfloat16, 4 × 128 tokens, full mode.

    python benchmarks/workload_b.py --work /tmp/hwdiff-b      # merges into docs/benchmarks.json

Capture time and size (sdpa, and eager for the pair), then the diff of the pair: the median time of
--repeats fresh processes and their largest peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SNIPPET = (
    "import re, sys, time, hwdiff; s = time.perf_counter(); hwdiff.diff(sys.argv[1], sys.argv[2], progress=False); "
    "print(time.perf_counter() - s, re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))"
)


def main() -> int:
    import hwdiff

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hwdiff-b"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.json")
    parser.add_argument("--repeats", type=int, default=3, help="diff runs (median)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    for attn in ("sdpa", "eager"):
        started = time.perf_counter()
        model = hwdiff.load_model("qwen2.5-1.5b-arch", dtype="bfloat16", attn_implementation=attn)
        result[f"load_{attn}_s"] = time.perf_counter() - started
        capture = hwdiff.capture(
            model, args.work / f"b-{attn}.h5", limit=4, max_tokens=128, batch_size=4, progress=False
        )
        result[f"capture_{attn}_s"] = capture.seconds
        result[f"capture_{attn}_bytes"] = capture.bytes
        del model
    runs = []
    for _ in range(args.repeats):  # fresh processes; the median, and the largest peak RSS
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                SNIPPET,
                str(args.work / "b-sdpa.h5"),
                str(args.work / "b-eager.h5"),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        runs.append(tuple(map(float, out.stdout.split())))
    seconds = statistics.median(run[0] for run in runs)
    result.update(
        diff_s=seconds,
        diff_peak_rss_mb=max(run[1] for run in runs) / 1024,
        all_diff_s=[run[0] for run in runs],
        diff_gb_per_s=(result["capture_sdpa_bytes"] + result["capture_eager_bytes"])
        / seconds
        / 1e9,
    )
    merged = json.loads(args.out.read_text()) if args.out.exists() else {}
    merged["workload_b"] = result
    args.out.write_text(json.dumps(merged, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
