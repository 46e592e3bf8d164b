#!/usr/bin/env python3
"""Capture overhead on one GPU against its own bounds (issue 18's GPU targets), in one process.

    PYTHONPATH=$PWD python benchmarks/gpu_capture.py --out "$OUT"     # writes gpu_capture.json there

qwen2.5-1.5b-arch in bfloat16 on cuda:0 (seeded random weights), 8 × 512 seeded random token ids, one
batch of 8: the plain forward, then captures in stats, sample (16 positions) and full mode, medians of
--repeats after a warm-up. The full mode's floor is the host write path, measured here on the same
bytes: device → pinned host copy (GB/s) and h5py writing them with the Fletcher-32 filter to --work and
syncing (GB/s). ``full_bound_s`` = bytes / D2H + bytes / write (the copy and the write of one tensor
are serial; the forward overlaps both). A cProfile of one stats capture (top 20 by own time) is kept
to show where a miss goes. Targets: stats ≤ 1.2×, sample ≤ 1.5× the plain forward, full ≤ 1.5 ×
(forward + bound).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import hwdiff  # noqa: E402


def timed(fn, repeats: int, setup=None) -> list[float]:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def d2h_gb_s(nbytes: int) -> float:
    """Pinned device → host copy bandwidth on ``nbytes`` (best of 3)."""
    source = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
    best = min(timed(lambda: host.copy_(source, non_blocking=True), 3))
    return nbytes / best / 1e9


def write_gb_s(nbytes: int, work: Path) -> float:
    """h5py writing ``nbytes`` of uint16 in 4 MiB rows with Fletcher-32, then fsync (best of 3)."""
    rows = max(1, nbytes // (4 << 20))
    data = np.random.default_rng(0).integers(0, 1 << 16, size=(rows, 2 << 20), dtype=np.uint16)
    best = float("inf")
    for _ in range(3):
        path = work / "write.h5"
        start = time.perf_counter()
        with h5py.File(path, "w", libver=("v110", "v110"), rdcc_nbytes=0) as handle:
            dataset = handle.create_dataset(
                "x", shape=data.shape, dtype=data.dtype, chunks=(1, 2 << 20), fletcher32=True
            )
            for row in range(rows):
                dataset[row] = data[row]
        with open(path, "rb+") as raw:
            os.fsync(raw.fileno())
        best = min(best, time.perf_counter() - start)
        path.unlink()
    return data.nbytes / best / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-capture")))
    parser.add_argument(
        "--work", type=Path, default=None, help="where captures are written (default: a temp dir)"
    )
    parser.add_argument("--model", default="qwen2.5-1.5b-arch")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    model = hwdiff.load_model(args.model, device="cuda", dtype="bfloat16")
    ids = np.random.default_rng(0).integers(
        0, model.config.vocab_size, (args.sequences, args.tokens)
    )
    inputs = hwdiff.load_inputs(ids, max_tokens=None)
    device_ids = torch.from_numpy(ids).cuda()
    with torch.inference_mode():
        forward = lambda: model(input_ids=device_ids, use_cache=False)  # noqa: E731
        forward()
        plain = timed(forward, args.repeats)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": [args.sequences, args.tokens],
        "plain_forward_s": statistics.median(plain),
        "plain_forward_runs_s": plain,
    }
    path = work / "capture.h5"
    for mode in ("stats", "sample", "full"):

        def capture(mode=mode):
            return hwdiff.capture(
                model, path, inputs=inputs, mode=mode, batch_size=args.sequences, progress=False
            )

        capture()
        runs = timed(capture, args.repeats, setup=lambda: path.unlink(missing_ok=True))
        result[mode] = {
            "capture_s": statistics.median(runs),
            "runs_s": runs,
            "bytes": path.stat().st_size,
            "ratio": statistics.median(runs) / result["plain_forward_s"],
        }
        print(mode, result[mode], flush=True)
    nbytes = result["full"]["bytes"]
    result["d2h_gb_s"], result["h5py_write_gb_s"] = d2h_gb_s(nbytes), write_gb_s(nbytes, work)
    result["full_bound_s"] = (
        nbytes / result["d2h_gb_s"] / 1e9 + nbytes / result["h5py_write_gb_s"] / 1e9
    )
    result["full_over_forward_plus_bound"] = result["full"]["capture_s"] / (
        result["plain_forward_s"] + result["full_bound_s"]
    )
    profiler = cProfile.Profile()
    path.unlink(missing_ok=True)
    profiler.enable()
    hwdiff.capture(
        model, path, inputs=inputs, mode="stats", batch_size=args.sequences, progress=False
    )
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
    result["stats_profile"] = text.getvalue()
    (args.out / "gpu_capture.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "stats_profile"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
