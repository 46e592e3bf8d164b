#!/usr/bin/env python3
"""Device evidence in one run on a CUDA machine (issue 19): op probes, 1.5B CUDA vs CPU, overhead.

On the lent GPU machine, from the repository root (≈ 5–7 minutes on an H200 with 16 CPU cores):

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 benchmarks/device_evidence.py --out "$OUT"

1. ``pytest -m cuda`` (the CUDA-marked tests), then the op probes exactly as a user runs them:
   ``probes/ops.py --device cuda`` (bfloat16 and float32, TF32 off as the script sets it; float32
   again with TF32 on), ``hwdiff probe-ops --device cpu`` in bfloat16 and the float64 golden; each
   diffed against the golden, and CUDA-vs-CPU bfloat16 with the golden.
2. qwen2.5-1.5b-arch (seeded random weights), 8 × 256 tokens of the shipped prompts, sample mode:
   a CPU float32 golden, then the same weights in bfloat16 on CUDA with TF32 off/on × deterministic
   algorithms on/off; each CUDA capture diffed against the golden and against the first CUDA one.
3. The 1.5B capture overhead on the GPU (``benchmarks/cuda_vs_cpu.py --sections big``).

Writes at most 8 files under --out (what the device tool brings back): ``environment.json``,
``pytest-cuda.txt``, ``ops.json`` and ``qwen15b.json`` (hwdiff/diff-summary/1 summaries keyed by
pair), ``tables.md`` (the tables for docs/cuda-reference.md), ``overhead/cuda_vs_cpu.json``. Copy the
JSONs to data/reference/ and the tables into docs/cuda-reference.md. ``--device cpu --model
tiny-qwen2 --sequences 2 --tokens 16 --skip overhead,pytest`` is a smoke run on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault(
    "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
)  # deterministic cuBLAS needs it before CUDA starts
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import hwdiff  # noqa: E402
from hwdiff.capturing.devices import describe  # noqa: E402
from hwdiff.capturing.probe_ops import probe_ops  # noqa: E402

VARIANTS = (
    ("tf32-off.det-on", False, True),
    ("tf32-on.det-on", True, True),
    ("tf32-off.det-off", False, False),
    ("tf32-on.det-off", True, False),
)
HEADLINE = (
    "model.embed_tokens",
    "model.layers.0.input_layernorm",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.0",
    "model.layers.13",
    "model.layers.27",
    "model.norm",
    "lm_head",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(*argv: str) -> None:
    log(" ".join(argv))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(argv, check=True, cwd=ROOT, env=env)


def summary_of(reference: Path, target: Path, golden: Path | None = None) -> dict:
    json_path = target.with_suffix(f".vs-{reference.stem}.json")
    hwdiff.diff(reference, target, golden=golden, json_path=json_path, progress=False)
    return json.loads(json_path.read_text())


def set_flags(tf32: bool, deterministic: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic


def ops_section(device: str, work: Path) -> dict:
    golden, cpu_bf16 = work / "golden-ops-cpu-float64.h5", work / "cli-ops-cpu-bfloat16.h5"
    run(
        sys.executable,
        "-m",
        "hwdiff",
        "probe-ops",
        "--device",
        "cpu",
        "--dtype",
        "float64",
        "-q",
        "-o",
        str(golden),
    )
    run(
        sys.executable,
        "-m",
        "hwdiff",
        "probe-ops",
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
        "-q",
        "-o",
        str(cpu_bf16),
    )
    targets = {}
    for dtype in ("bfloat16", "float32"):
        targets[dtype] = work / f"probe-ops-{device}-{dtype}.h5"
        run(
            sys.executable,
            str(ROOT / "probes" / "ops.py"),
            "--device",
            device,
            "--dtype",
            dtype,
            "--output",
            str(targets[dtype]),
        )
    set_flags(
        tf32=True, deterministic=False
    )  # probes/ops.py keeps TF32 off; here the other setting
    targets["float32.tf32"] = probe_ops(
        work / f"probe-ops-{device}-float32-tf32.h5", device=device, dtype="float32", progress=False
    ).path
    set_flags(tf32=False, deterministic=False)
    pairs = {
        f"{device}-{name}-vs-cpu-float64": summary_of(golden, path)
        for name, path in targets.items()
    }
    pairs["cpu-bfloat16-vs-cpu-float64"] = summary_of(golden, cpu_bf16)
    pairs[f"{device}-bfloat16-vs-cpu-bfloat16(golden float64)"] = summary_of(
        cpu_bf16, targets["bfloat16"], golden
    )
    return pairs


def model_section(
    device: str, spec: str, sequences: int, tokens: int, work: Path
) -> tuple[dict, dict]:
    started = time.perf_counter()
    model = hwdiff.load_model(spec, device="cpu", dtype="float32")
    timings = {"load_s": time.perf_counter() - started}
    inputs = hwdiff.load_inputs(limit=sequences, max_tokens=tokens)
    options = dict(inputs=inputs, mode="sample", batch_size=sequences, progress=False)
    started = time.perf_counter()
    golden = hwdiff.capture(model, work / "q-cpu-float32.h5", **options).path
    timings["cpu_float32_capture_s"] = time.perf_counter() - started
    model.to(device=device, dtype=torch.bfloat16)  # the same weights, cast once as load_model casts
    paths = {}
    for name, tf32, deterministic in VARIANTS:
        set_flags(tf32, deterministic)
        started = time.perf_counter()
        paths[name] = hwdiff.capture(model, work / f"q-{device}-bf16.{name}.h5", **options).path
        timings[f"capture_{name}_s"] = time.perf_counter() - started
    set_flags(False, False)
    first = paths[VARIANTS[0][0]]
    pairs = {
        f"{device}-bf16.{name}-vs-cpu-float32": summary_of(golden, path)
        for name, path in paths.items()
    }
    pairs.update(
        {
            f"{device}-bf16.{name}-vs-{device}-bf16.{VARIANTS[0][0]}": summary_of(first, path)
            for name, path in list(paths.items())[1:]
        }
    )
    return pairs, {"inputs": list(inputs.shape), **timings}


def modules_of(summary: dict) -> dict:
    return {m["name"]: m for m in summary["modules"] if m.get("slot", "output") == "output"}


def cell(row: dict, name: str, with_equal: bool = False) -> str:
    value = row.get(name, {}).get("rel_l2")
    if value is None:
        return "—"
    return f"{value:.3g} ({row[name]['equal_frac']:.1%})" if with_equal else f"{value:.3g}"


def tables(ops: dict, models: dict) -> str:
    lines = []
    if ops:
        names = list(ops)
        lines += [
            "## Op probes: relative L2 against the reference of each pair",
            "",
            "| op | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        rows = [modules_of(summary) for summary in ops.values()]
        for op in rows[0]:
            lines.append(f"| {op} | " + " | ".join(cell(row, op) for row in rows) + " |")
        lines.append("")
    if models:
        names = list(models)
        lines += [
            "## qwen2.5-1.5b-arch bf16, sample mode: relative L2 (bit-identical fraction)",
            "",
            "| module | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        rows = [modules_of(summary) for summary in models.values()]
        for module in [m for m in HEADLINE if m in rows[0]]:
            lines.append(
                f"| {module} | " + " | ".join(cell(row, module, True) for row in rows) + " |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-evidence")))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="qwen2.5-1.5b-arch")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument(
        "--skip", default="", help="comma-separated sections to skip: pytest, ops, model, overhead"
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "hwdiff-device-evidence"
    work.mkdir(parents=True, exist_ok=True)
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": str(hwdiff.resolve_device(args.device)),
        "cpu_threads": torch.get_num_threads(),
        "describe": describe(hwdiff.resolve_device(args.device)),
    }
    (args.out / "environment.json").write_text(json.dumps(env, indent=1, default=str))
    if "pytest" not in skip:
        with open(args.out / "pytest-cuda.txt", "w") as handle:
            code = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs"],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        log(f"pytest -m cuda: exit {code.returncode}")
    ops = models = {}
    if "ops" not in skip:
        ops = ops_section(args.device, work)
        (args.out / "ops.json").write_text(json.dumps(ops, indent=1))
        log("ops done")
    if "model" not in skip:
        models, timings = model_section(args.device, args.model, args.sequences, args.tokens, work)
        (args.out / "qwen15b.json").write_text(
            json.dumps({"run": timings, "pairs": models}, indent=1)
        )
        log(f"model done: {timings}")
    (args.out / "tables.md").write_text(tables(ops, models))
    if "overhead" not in skip:
        run(
            sys.executable,
            str(ROOT / "benchmarks" / "cuda_vs_cpu.py"),
            "--out",
            str(args.out / "overhead"),
            "--sections",
            "big",
        )
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
