"""Runs inside the msprobe virtual environment (see vs_msprobe.py): workload A under msprobe's L0 dump."""

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2ForCausalLM

work, repeats = Path(sys.argv[1]), int(sys.argv[2])
config, state, ids = torch.load(work / "workload_a.pt", weights_only=False)


def model(attn):
    config._attn_implementation = attn
    built = Qwen2ForCausalLM(config).eval()
    built.load_state_dict(state)
    return built


def forward(m):
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)


def dump(m, task, path):
    from msprobe.pytorch import PrecisionDebugger

    shutil.rmtree(path, ignore_errors=True)
    config_path = work / f"msprobe-{task}.json"
    config_path.write_text(
        json.dumps(
            {
                "task": task,
                "dump_path": str(path),
                "rank": [],
                "step": [],
                "level": "L0",
                "async_dump": False,
                task: {"scope": [], "list": [], "data_mode": ["forward"]},
            }
        )
    )
    debugger = PrecisionDebugger(config_path=str(config_path))
    start = time.perf_counter()
    debugger.start(model=m)
    forward(m)
    debugger.stop()
    debugger.step()
    seconds = time.perf_counter() - start
    PrecisionDebugger._instance = None  # a fresh debugger next time
    return seconds


def median_time(fn, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


m = model("sdpa")
forward(m)
result = {"plain_forward_s": median_time(lambda: forward(m), repeats)}
for task in ("tensor", "statistics"):
    result[f"{task}_s"] = statistics.median(
        dump(m, task, work / f"msp-{task}") for _ in range(repeats)
    )
result["plain_forward_after_s"] = median_time(lambda: forward(m), repeats)
for attn in ("sdpa", "eager"):
    dump(model(attn), "tensor", work / f"msp-{attn}")
files = list((work / "msp-sdpa").rglob("*.pt"))
result["tensor_dump_bytes"] = sum(p.stat().st_size for p in files)
result["tensor_dump_output_bytes"] = sum(p.stat().st_size for p in files if ".output." in p.name)
print(json.dumps(result))
