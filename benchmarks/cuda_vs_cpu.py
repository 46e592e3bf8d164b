#!/usr/bin/env python3
"""Real CUDA-vs-CPU captures on one NVIDIA machine, a first per-module comparison, capture overhead.

Run on a machine with a CUDA GPU (it also runs its CPU):

    python benchmarks/cuda_vs_cpu.py --out results/

Writes small reference captures of tiny-qwen2 (bf16 on CUDA and CPU, float32 CPU golden) for
data/reference/, and `cuda_vs_cpu.json` with, per module, the relative L2 error and the fraction of
bit-identical elements over real (unpadded) tokens, for several pairs, plus capture overhead of
qwen2.5-1.5b-arch in bf16 on the GPU. The comparison here is deliberately minimal (hwdiff diff is the
full tool); it exists so that a device session yields numbers before the differ is written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hwdiff  # noqa: E402

SMALL = dict(limit=4, max_tokens=32, compression="gzip", progress=False)


def compare(ref_path: Path, tgt_path: Path) -> dict:
    """Per module: rel_l2 = ||t - r|| / ||r|| and equal_frac over real tokens (float64)."""
    rows = {}
    with hwdiff.open_capture(ref_path) as ref, hwdiff.open_capture(tgt_path) as tgt:
        mask = ref.attention_mask.astype(bool)
        for name in ref.modules:
            if name not in tgt.modules or ref.modules[name].alias_of:
                continue
            r = ref.activation(name).astype(np.float64)
            t = tgt.activation(name).astype(np.float64)
            if r.shape[:2] == mask.shape:
                r, t = r[mask], t[mask]
            err = np.linalg.norm(t - r) / max(np.linalg.norm(r), 1e-300)
            rows[name] = {
                "rel_l2": float(err),
                "equal_frac": float(np.mean(r == t)),
                "max_abs": float(np.max(np.abs(t - r))),
            }
    return rows


def headline(rows: dict) -> dict:
    pick = [
        n
        for n in rows
        if n
        in (
            "model.embed_tokens",
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.o_proj",
            "model.layers.0",
            "model.norm",
            "lm_head",
        )
        or n.endswith(".layers.27")
        or n.endswith(".layers.3")
    ]
    return {n: rows[n] for n in pick}


def tiny_section(out: Path, work: Path, results: dict) -> None:
    def run(device, dtype, attn, path, **kw):
        model = hwdiff.load_model(
            "tiny-qwen2", device=device, dtype=dtype, attn_implementation=attn
        )
        return hwdiff.capture(model, path, **kw).path

    torch.use_deterministic_algorithms(True, warn_only=True)
    ref = {
        "cuda": run("cuda", "bfloat16", "sdpa", out / "tiny-qwen2-cuda-bf16-sdpa.h5", **SMALL),
        "cuda_again": run("cuda", "bfloat16", "sdpa", work / "again.h5", **SMALL),
        "cpu": run("cpu", "bfloat16", "sdpa", out / "tiny-qwen2-cpu-bf16-sdpa.h5", **SMALL),
        "golden": run("cpu", "float32", "eager", out / "tiny-qwen2-cpu-fp32-eager.h5", **SMALL),
    }
    pairs = {
        "cuda_bf16_vs_cpu_bf16": ("cpu", "cuda"),
        "cuda_rerun": ("cuda", "cuda_again"),
        "cpu_bf16_vs_golden": ("golden", "cpu"),
        "cuda_bf16_vs_golden": ("golden", "cuda"),
    }
    results["tiny_small"] = {k: compare(ref[a], ref[b]) for k, (a, b) in pairs.items()}
    big = dict(limit=64, max_tokens=128, progress=False)
    full = {
        "cuda": run("cuda", "bfloat16", "sdpa", work / "c.h5", **big),
        "cpu": run("cpu", "bfloat16", "sdpa", work / "p.h5", **big),
        "golden": run("cpu", "float32", "eager", work / "g.h5", **big),
    }
    results["tiny_64x128"] = {
        "cuda_bf16_vs_cpu_bf16": compare(full["cpu"], full["cuda"]),
        "cpu_bf16_vs_golden": compare(full["golden"], full["cpu"]),
        "cuda_bf16_vs_golden": compare(full["golden"], full["cuda"]),
    }


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def big_section(work: Path, results: dict) -> None:
    started = time.perf_counter()
    model = hwdiff.load_model("qwen2.5-1.5b-arch", device="cuda", dtype="bfloat16")
    results["qwen15b_load_s"] = time.perf_counter() - started
    inputs = hwdiff.load_inputs(max_tokens=128, limit=4)
    ids, mask = (torch.from_numpy(a).cuda() for a in (inputs.input_ids, inputs.attention_mask))
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
        plain = timed(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False), 5)
    overhead = {"plain_forward_s": plain, "shape": list(inputs.shape)}
    for mode in ("full", "sample", "stats"):
        path = work / f"q-{mode}.h5"
        seconds = timed(
            lambda: hwdiff.capture(
                model, path, inputs=inputs, mode=mode, batch_size=4, progress=False
            ),
            3,
        )
        overhead[mode] = {
            "capture_s": seconds,
            "ratio": seconds / plain,
            "bytes": path.stat().st_size,
        }
    results["qwen15b_cuda_capture_overhead"] = overhead
    sample_in = hwdiff.load_inputs(max_tokens=128, limit=8)
    cuda_path = hwdiff.capture(
        model, work / "qc.h5", inputs=sample_in, mode="sample", batch_size=4, progress=False
    ).path
    model.to("cpu")
    started = time.perf_counter()
    cpu_path = hwdiff.capture(
        model, work / "qp.h5", inputs=sample_in, mode="sample", batch_size=4, progress=False
    ).path
    results["qwen15b_cpu_capture_s"] = time.perf_counter() - started
    results["qwen15b_sample_cuda_bf16_vs_cpu_bf16"] = compare(cpu_path, cuda_path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--sections",
        default="tiny,big",
        help="comma-separated: tiny (reference captures, comparisons), big (1.5B overhead)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    results = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(),
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    report = args.out / "cuda_vs_cpu.json"
    with tempfile.TemporaryDirectory() as tmp:
        available = {
            "tiny": lambda: tiny_section(args.out, Path(tmp), results),
            "big": lambda: big_section(Path(tmp), results),
        }
        for name in args.sections.split(","):
            section = available[name]
            started = time.perf_counter()
            try:
                section()
            except Exception as exc:  # keep what the other sections measured
                results[f"{name}_error"] = repr(exc)
            results[f"{name}_seconds"] = time.perf_counter() - started
            report.write_text(json.dumps(results, indent=1))
            print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)
    for key in ("tiny_small", "tiny_64x128"):
        for pair, rows in results.get(key, {}).items():
            print(key, pair, json.dumps(headline(rows)))
    for key in (
        "qwen15b_cuda_capture_overhead",
        "qwen15b_load_s",
        "qwen15b_cpu_capture_s",
        "big_error",
        "tiny_error",
    ):
        if key in results:
            print(key, json.dumps(results[key]))
    if "qwen15b_sample_cuda_bf16_vs_cpu_bf16" in results:
        print("qwen15b", json.dumps(headline(results["qwen15b_sample_cuda_bf16_vs_cpu_bf16"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
