#!/usr/bin/env python3
"""Diff throughput and peak memory on two captures of at least 1 GB each, against merely reading them.

    python benchmarks/diff_throughput.py --work /tmp/hwdiff-bench --out docs/diff-benchmark.json

Makes two float32 captures of tiny-qwen2 (sdpa vs eager attention) of 64 sequences of --max-tokens
seeded random byte ids (the shipped prompts are too short to reach 1 GB) unless they exist, then times (median of --repeats, warm page cache): reading every
stored activation of both files with h5py in the differ's block order, and `hwdiff.diff` in a fresh
process — its first call (lazy imports and numba's cache loads included) and a second, warm one —
whose peak RSS is read from the kernel (VmHWM).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Peak RSS from VmHWM: ru_maxrss of a child started by fork keeps the parent's peak across exec.
DIFF_SNIPPET = """
import re, sys, time
import hwdiff
times = []
for _ in range(2):  # the first pays for the lazy imports and numba's cache loads, the second does not
    start = time.perf_counter()
    hwdiff.diff(sys.argv[1], sys.argv[2], progress=False)
    times.append(time.perf_counter() - start)
print(*times, re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


def make_captures(work: Path, max_tokens: int) -> tuple[Path, Path]:
    import numpy as np

    import hwdiff

    ids = np.random.default_rng(0).integers(0, 256, (64, max_tokens))
    paths = []
    for attn in ("sdpa", "eager"):
        path = work / f"tiny-fp32-{attn}-64x{max_tokens}.h5"
        if not path.exists():
            model = hwdiff.load_model("tiny-qwen2", dtype="float32", attn_implementation=attn)
            hwdiff.capture(model, path, inputs=ids, max_tokens=None, progress=False)
        paths.append(path)
    return paths[0], paths[1]


def read_all(paths: tuple[Path, Path]) -> float:
    """Seconds to read every stored slot of both files, block by block as the differ does."""
    import hwdiff
    from hwdiff.store import plan_blocks

    start = time.perf_counter()
    for path in paths:
        with hwdiff.open_capture(path) as cap:
            for name, info in cap.modules.items():
                if info.alias_of:
                    continue
                for call in range(info.calls):
                    for slot in info.slots:
                        if cap.alias_of(name, call, slot):
                            continue
                        shape, _ = cap.slot_info(name, call, slot)
                        for index in plan_blocks(shape, 1 << 20):
                            cap.read(name, call, slot, index)
    return time.perf_counter() - start


def run_diff(paths: tuple[Path, Path]) -> tuple[float, float, float]:
    """(seconds of the first diff of a fresh process, of a second one in it, peak RSS in MB)."""
    out = subprocess.run(
        [sys.executable, "-c", DIFF_SNIPPET, *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    first, second, rss_kb = out.stdout.split()
    return float(first), float(second), float(rss_kb) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hwdiff-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "diff-benchmark.json")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = make_captures(args.work, args.max_tokens)
    size = sum(p.stat().st_size for p in paths)
    read_all(paths)  # warm the page cache
    reads = [read_all(paths) for _ in range(args.repeats)]
    diffs = [run_diff(paths) for _ in range(args.repeats)]
    read_s, diff_s = statistics.median(reads), statistics.median(d[0] for d in diffs)
    warm_s = statistics.median(d[1] for d in diffs)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "files_bytes": [p.stat().st_size for p in paths],
        "repeats": args.repeats,
        "read_both_s": read_s,
        "diff_s": diff_s,
        "diff_over_read": diff_s / read_s,
        "diff_gb_per_s": size / diff_s / 1e9,
        "read_gb_per_s": size / read_s / 1e9,
        "diff_warm_s": warm_s,
        "diff_warm_gb_per_s": size / warm_s / 1e9,
        "diff_warm_over_read": warm_s / read_s,
        "diff_peak_rss_mb": max(d[2] for d in diffs),
        "all_read_s": reads,
        "all_diff": diffs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("all_")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
