#!/usr/bin/env python3
"""Capture overhead of workload A's model as the input grows: how much of the ratio is fixed cost.

    python benchmarks/capture_scaling.py --repeats 3      # merges into docs/benchmarks.json

Workload A's random Qwen2 (vocab 8192, hidden 512, 8 layers; saved by benchmarks/vs_msprobe.py in
--work, made here when missing), float32, no_grad, batches of 2: for each input size the plain
forward over all batches and hwdiff's capture in stats and full mode, and full mode with lzf and
gzip compression (time and bytes); medians, the previous file removed before the clock starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    import torch
    import vs_msprobe

    import hwdiff

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hwdiff-vs-msprobe"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.json")
    parser.add_argument("--sizes", default="2x256,8x512", help="comma-separated SEQUENCESxTOKENS")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "workload_a.pt").exists():
        vs_msprobe.save_workload(args.work)
    model, _ = vs_msprobe.load_model(args.work, "sdpa")
    rows = []
    for size in args.sizes.split(","):
        sequences, tokens = map(int, size.split("x"))
        ids = torch.randint(
            0, 8192, (sequences, tokens), generator=torch.Generator().manual_seed(1)
        )
        inputs = hwdiff.load_inputs(ids, max_tokens=None)

        def forward():
            with torch.no_grad():
                for start in range(0, sequences, 2):
                    model(input_ids=ids[start : start + 2], use_cache=False)

        forward()
        row = {
            "sequences": sequences,
            "tokens": tokens,
            "plain_forward_s": vs_msprobe.timed(forward, args.repeats),
        }
        for mode in ("stats", "full"):
            path = args.work / f"scaling-{mode}.h5"
            row[f"{mode}_s"] = vs_msprobe.timed(
                lambda: hwdiff.capture(
                    model, path, inputs=inputs, mode=mode, batch_size=2, progress=False
                ),
                args.repeats,
                setup=lambda: path.unlink(missing_ok=True),
            )
            row[f"{mode}_ratio"] = row[f"{mode}_s"] / row["plain_forward_s"]
        for compression in (
            "lzf",
            "gzip",
        ):  # full mode, HDF5 filters with byte shuffle: lossless size
            path = args.work / f"scaling-{compression}.h5"
            row[f"full_{compression}_s"] = vs_msprobe.timed(
                lambda: hwdiff.capture(
                    model,
                    path,
                    inputs=inputs,
                    batch_size=2,
                    compression=compression,
                    progress=False,
                ),
                args.repeats,
                setup=lambda: path.unlink(missing_ok=True),
            )
            row[f"full_{compression}_bytes"] = path.stat().st_size
        row["full_bytes"] = (args.work / "scaling-full.h5").stat().st_size
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["capture_scaling"] = rows
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
