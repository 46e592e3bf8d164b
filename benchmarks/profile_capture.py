#!/usr/bin/env python3
"""Profile one capture (after a warm-up capture): where does the time beyond the forward go?

python benchmarks/profile_capture.py --model qwen2.5-1.5b-arch --device cuda --mode stats
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hwdiff  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--modes", default="stats", help="comma-separated capture modes to profile in turn"
    )
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    model = hwdiff.load_model(args.model, device=args.device, dtype=args.dtype)
    inputs = hwdiff.load_inputs(limit=args.limit, max_tokens=args.max_tokens)
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c.h5"
            kwargs = dict(inputs=inputs, mode=mode, batch_size=args.limit, progress=False)
            hwdiff.capture(model, path, **kwargs)
            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.enable()
            hwdiff.capture(model, path, **kwargs)
            profiler.disable()
            print(f"capture {mode}: {time.perf_counter() - started:.3f} s", flush=True)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
