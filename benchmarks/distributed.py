#!/usr/bin/env python3
"""Cost of multi-rank capture and of diffing a rank directory, on the CPU (gloo).

    python benchmarks/distributed.py --work /tmp/hwdiff-dist --out docs/distributed-benchmark.json

Captures tiny-qwen2 in float32 (--sequences x --max-tokens seeded random byte ids, batches of
--batch-size) three ways: one process, ``torchrun --nproc_per_node 2`` data parallel, and the same
with ``--tp 2``; reports each run's wall time (the whole command: torch import, model build, rendezvous
included), the in-capture time every file records (``capture_seconds``, the slowest rank) and the
bytes written. Then times ``hwdiff.diff`` (median of --repeats, warm page cache, in-process after a
first warm-up call) of single vs a second single-process capture, single vs the data-parallel
directory and single vs the tensor-parallel directory, with the peak RSS of each diff process, and
the time to merely read every stored activation of each target (block by block, as the differ does).
All ranks share this machine's cores: on a 2-core machine the two ranks compete with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIFF_SNIPPET = """
import re, statistics, sys, time
import hwdiff
times = []
for _ in range(int(sys.argv[3]) + 1):
    start = time.perf_counter()
    hwdiff.diff(sys.argv[1], sys.argv[2], progress=False)
    times.append(time.perf_counter() - start)
print(statistics.median(times[1:]), re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def capture(args: argparse.Namespace, ids: Path, out: Path, ranks: int, tp: bool) -> dict:
    common = [
        "capture",
        "--model",
        "tiny-qwen2",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--inputs",
        str(ids),
        "--batch-size",
        str(args.batch_size),
        "--max-tokens",
        str(args.max_tokens),
        "-q",
        "-o",
        str(out),
    ]
    launcher = (
        [sys.executable, "-m", "hwdiff"]
        if ranks == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(ranks),
            "-m",
            "hwdiff",
        ]
    )
    start = time.perf_counter()
    subprocess.run(
        [*launcher, *common, *(["--tp", str(ranks)] if tp else [])],
        check=True,
        env=env(),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    import hwdiff

    with hwdiff.open_capture(out) as cap:
        seconds = float(cap.meta["capture_seconds"])
    files = list(out.iterdir()) if out.is_dir() else [out]
    return {
        "wall_s": round(wall, 2),
        "capture_s": round(seconds, 3),
        "bytes": sum(p.stat().st_size for p in files),
    }


def time_read(path: Path, repeats: int) -> float:
    """Seconds to read every stored activation once, in the differ's block order (median, warm cache)."""
    import hwdiff
    from hwdiff.store import plan_blocks

    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with hwdiff.open_capture(path) as cap:
            for name, info in cap.modules.items():
                if info.alias_of or "output" not in info.slots:
                    continue
                for index in plan_blocks(info.shape, 1 << 20):
                    cap.read(name, 0, "output", index, stored=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times[1:]), 3)


def time_diff(ref: Path, tgt: Path, repeats: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", DIFF_SNIPPET, str(ref), str(tgt), str(repeats)],
        check=True,
        env=env(),
        capture_output=True,
        text=True,
    )
    seconds, peak_kb = done.stdout.split()
    return {"seconds": round(float(seconds), 3), "peak_rss_mib": round(int(peak_kb) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/hwdiff-dist"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ids = args.work / "ids.npy"
    np.save(
        ids,
        np.random.default_rng(0).integers(
            0, 256, (args.sequences, args.max_tokens), dtype=np.int64
        ),
    )
    runs = {
        "single": (1, False),
        "single_again": (1, False),
        "data_parallel_2": (2, False),
        "tensor_parallel_2": (2, True),
    }
    paths = {
        name: args.work / (f"{name}.h5" if ranks == 1 else name)
        for name, (ranks, _) in runs.items()
    }
    captures = {name: capture(args, ids, paths[name], *spec) for name, spec in runs.items()}
    single = paths["single"]
    diffs = {
        name: time_diff(single, paths[name], args.repeats)
        for name in ("single_again", "data_parallel_2", "tensor_parallel_2")
    }
    stored = captures["single"]["bytes"]
    for row in diffs.values():
        row["mb_per_s"] = round(
            2 * stored / row["seconds"] / 1e6, 1
        )  # both sides' activations read
    for name, row in diffs.items():
        row["read_target_s"] = time_read(paths[name], args.repeats)
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "sequences": args.sequences,
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
        "captures": captures,
        "diffs": diffs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
