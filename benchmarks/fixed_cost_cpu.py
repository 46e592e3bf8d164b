#!/usr/bin/env python3
"""The fixed cost of a capture in CPU seconds, robust to a shared machine's load.

    python benchmarks/fixed_cost_cpu.py [--root OTHER_CHECKOUT] [--work /tmp/hwdiff-vs-msprobe]

Workload A's model (saved by vs_msprobe.py into --work, or saved here) on 2 × 8 tokens, where the
forward is nearly free: the process CPU time of a stats and of a full capture minus that of the plain
forward, medians of --repeats. torch and numba run on one thread each, so that no thread spinning
while it waits for another counts. --root imports hwdiff from another checkout (an earlier commit's
tree), so that two versions can be measured alternately under the same load. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=HERE.parent, help="checkout whose hwdiff is measured"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/hwdiff-vs-msprobe"))
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    os.environ["NUMBA_NUM_THREADS"] = "1"
    sys.path[:0] = [str(args.root.resolve()), str(HERE)]
    import torch
    import vs_msprobe

    import hwdiff

    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "workload_a.pt").exists():
        vs_msprobe.save_workload(args.work)
    model, ids = vs_msprobe.load_model(args.work, "sdpa")
    short = ids[:, :8]
    inputs = hwdiff.load_inputs(short, max_tokens=None)
    path = args.work / f"fixed-cpu-{os.getpid()}.h5"

    def forward():
        with torch.no_grad():
            model(input_ids=short, use_cache=False)

    def cpu_seconds(fn, setup=None) -> float:
        runs = []
        for _ in range(args.repeats):
            if setup is not None:
                setup()
            start = time.process_time()
            fn()
            runs.append(time.process_time() - start)
        return statistics.median(runs)

    forward()
    result = {
        "hwdiff": str(Path(hwdiff.__file__).parent),
        "tokens": list(short.shape),
        "forward_cpu_s": cpu_seconds(forward),
    }
    for mode in ("stats", "full"):

        def capture(mode=mode):
            return hwdiff.capture(
                model, path, inputs=inputs, mode=mode, batch_size=2, progress=False
            )

        capture()
        result[f"{mode}_overhead_cpu_s"] = (
            cpu_seconds(capture, lambda: path.unlink(missing_ok=True)) - result["forward_cpu_s"]
        )
    path.unlink(missing_ok=True)
    result["loadavg"] = os.getloadavg()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
