#!/usr/bin/env python3
"""What the Fletcher-32 checksums on every stored dataset cost: capture and diff of workload A,
with checksums (as hwdiff writes) and without (the filter left off), in one process.

    nice python benchmarks/checksum_cost.py --repeats 5     # prints JSON; merge it into docs by hand

Workload A as in vs_msprobe.py (random Qwen2, hidden 512, 8 layers, float32, 2 x 256 tokens, batch 2).
Captures alternate between the two settings so that the VM's drift hits both alike; the diff is
timed in this process after one warm-up diff (numba's kernels loaded), on the sdpa / eager pair
written each way. Both settings write through the same temporary + fsync + rename path.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


@contextlib.contextmanager
def checksums(enabled: bool):
    """Leave hwdiff's writer as it is, or make it create every dataset without the checksum filter."""
    from hwdiff import store

    original = store.create_checked

    def plain(group, name, *, data=None, **kwargs):
        return group.create_dataset(name, data=data, **kwargs)

    store.create_checked = original if enabled else plain
    try:
        yield
    finally:
        store.create_checked = original


def main() -> int:
    from vs_msprobe import load_model, save_workload

    import hwdiff

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hwdiff-checksum-cost"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    save_workload(args.work)
    models = {attn: load_model(args.work, attn) for attn in ("sdpa", "eager")}
    ids = models["sdpa"][1]
    inputs = hwdiff.load_inputs(ids, max_tokens=None)
    times: dict[str, list[float]] = {"capture_on": [], "capture_off": [], "diff_on": [], "diff_off": []}
    sizes = {}
    for _ in range(args.repeats):
        for setting in ("on", "off"):
            path = args.work / f"full-{setting}.h5"
            path.unlink(missing_ok=True)
            with checksums(setting == "on"):
                start = time.perf_counter()
                hwdiff.capture(models["sdpa"][0], path, inputs=inputs, batch_size=2, progress=False)
                times[f"capture_{setting}"].append(time.perf_counter() - start)
            sizes[setting] = path.stat().st_size
    pairs = {}
    for setting in ("on", "off"):
        with checksums(setting == "on"):
            pairs[setting] = [hwdiff.capture(models[attn][0], args.work / f"{attn}-{setting}.h5", inputs=inputs,
                                             batch_size=2, progress=False).path for attn in ("sdpa", "eager")]
    hwdiff.diff(*pairs["on"], progress=False)  # warm-up: numba's kernels loaded from its cache
    for _ in range(args.repeats):
        for setting in ("on", "off"):
            start = time.perf_counter()
            hwdiff.diff(*pairs[setting], progress=False)
            times[f"diff_{setting}"].append(time.perf_counter() - start)
    medians = {key: statistics.median(values) for key, values in times.items()}
    result = {"repeats": args.repeats, "median_s": medians, "all_s": times, "capture_bytes": sizes,
              "capture_cost": medians["capture_on"] / medians["capture_off"] - 1,
              "diff_cost": medians["diff_on"] / medians["diff_off"] - 1}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
