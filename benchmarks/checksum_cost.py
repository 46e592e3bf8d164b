#!/usr/bin/env python3
"""What the Fletcher-32 checksums on every stored dataset cost: capture and diff of workload A,
with checksums (as hwdiff writes) and without (the filter left off), in one process.

    nice python benchmarks/checksum_cost.py --repeats 5     # prints JSON; merge it into docs by hand

Workload A as in vs_msprobe.py (random Qwen2, hidden 512, 8 layers, float32, 2 x 256 tokens, batch 2).
Captures alternate between the two settings so that the VM's drift hits both alike; the diff is
timed in this process after one warm-up diff (numba's kernels loaded), on the sdpa / eager pair
written each way. Both settings write through the same temporary + fsync + rename path. Wall time
and this process's CPU time (``time.process_time``: all its threads; less sensitive to other load on
a shared machine) are both reported, as medians and minima (the minimum is the least disturbed run).

``filter_cost`` isolates the filter: the same bytes as the full capture (143 MB of float32 in chunks
of one sequence row, 512 KiB) written to and read from an in-memory HDF5 file with and without
Fletcher-32, minimum of --repeats runs: seconds per GB that the checksum adds to a write and a read.
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
    from hwdiff.store import writer

    original = writer.create_checked

    def plain(group, name, *, data=None, **kwargs):
        return group.create_dataset(name, data=data, **kwargs)

    writer.create_checked = original if enabled else plain
    try:
        yield
    finally:
        writer.create_checked = original


def filter_cost(nbytes: int, repeats: int) -> dict[str, float]:
    """Seconds per GB that Fletcher-32 adds to writing and reading ``nbytes`` in 512 KiB chunks (in memory)."""
    import h5py
    import numpy as np

    rows = max(1, nbytes // (256 * 512 * 4))
    data = np.random.default_rng(0).standard_normal((rows, 256, 512), dtype=np.float32)
    best: dict[str, float] = {}
    for _ in range(repeats):
        for fletcher in (False, True):
            with h5py.File(f"mem-{fletcher}.h5", "w", driver="core", backing_store=False) as handle:
                start = time.perf_counter()
                dataset = handle.create_dataset(
                    "x",
                    shape=data.shape,
                    dtype=data.dtype,
                    chunks=(1, 256, 512),
                    fletcher32=fletcher,
                )
                for row in range(rows):
                    dataset[row : row + 1] = data[row : row + 1]
                written = time.perf_counter() - start
                start = time.perf_counter()
                for row in range(rows):
                    dataset[row : row + 1]
                read = time.perf_counter() - start
            for key, value in ((f"write_{fletcher}", written), (f"read_{fletcher}", read)):
                best[key] = min(best.get(key, float("inf")), value)
    gb = data.nbytes / 1e9
    return {
        "bytes": int(data.nbytes),
        "write_s": best["write_False"],
        "write_fletcher32_s": best["write_True"],
        "read_s": best["read_False"],
        "read_fletcher32_s": best["read_True"],
        "write_added_s_per_gb": (best["write_True"] - best["write_False"]) / gb,
        "read_added_s_per_gb": (best["read_True"] - best["read_False"]) / gb,
    }


@contextlib.contextmanager
def clocked(times: dict[str, list[float]], key: str):
    """Append the block's wall time to ``times[key]`` and its process CPU time to ``times[key + "_cpu"]``."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    times[key].append(time.perf_counter() - wall)
    times[key + "_cpu"].append(time.process_time() - cpu)


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
    times: dict[str, list[float]] = {
        f"{what}_{setting}{clock}": []
        for what in ("capture", "diff")
        for setting in ("on", "off")
        for clock in ("", "_cpu")
    }
    sizes = {}
    for _ in range(args.repeats):
        for setting in ("on", "off"):
            path = args.work / f"full-{setting}.h5"
            path.unlink(missing_ok=True)
            with checksums(setting == "on"), clocked(times, f"capture_{setting}"):
                hwdiff.capture(models["sdpa"][0], path, inputs=inputs, batch_size=2, progress=False)
            sizes[setting] = path.stat().st_size
    pairs = {}
    for setting in ("on", "off"):
        with checksums(setting == "on"):
            pairs[setting] = [
                hwdiff.capture(
                    models[attn][0],
                    args.work / f"{attn}-{setting}.h5",
                    inputs=inputs,
                    batch_size=2,
                    progress=False,
                ).path
                for attn in ("sdpa", "eager")
            ]
    hwdiff.diff(*pairs["on"], progress=False)  # warm-up: numba's kernels loaded from its cache
    for _ in range(args.repeats):
        for setting in ("on", "off"):
            with clocked(times, f"diff_{setting}"):
                hwdiff.diff(*pairs[setting], progress=False)
    medians = {key: statistics.median(values) for key, values in times.items()}
    result = {
        "repeats": args.repeats,
        "median_s": medians,
        "min_s": {k: min(v) for k, v in times.items()},
        "all_s": times,
        "capture_bytes": sizes,
        "filter_cost": filter_cost(sizes["off"], args.repeats),
        "capture_cost": medians["capture_on"] / medians["capture_off"] - 1,
        "capture_cost_cpu": medians["capture_on_cpu"] / medians["capture_off_cpu"] - 1,
        "diff_cost": medians["diff_on"] / medians["diff_off"] - 1,
        "diff_cost_cpu": medians["diff_on_cpu"] / medians["diff_off_cpu"] - 1,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
