#!/usr/bin/env python3
"""hwdiff side by side with Huawei's msprobe (PyPI mindstudio-probe) on workload A, in one run.

    python benchmarks/vs_msprobe.py --work /tmp/hwdiff-vs-msprobe     # writes docs/benchmarks.json

Workload A: a random Qwen2 (vocab 8192, hidden 512, intermediate 1408, 8 layers, 8 heads / 2 KV
heads), float32, input 2 × 256 seeded ids, no_grad; its weights are saved once and loaded by both
tools. msprobe runs in its own virtual environment (made here on first use, with the same torch and
transformers). Times are medians of --repeats runs (with the range of the per-run ratios); ratios are
to the plain forward measured in the same process. The diff / compare pair is sdpa (reference) vs
eager (target) attention; ``hwdiff diff`` runs as the CLI in a fresh process, writing a CSV table, as
``msprobe compare`` writes its own. Also measured (issue 18's targets): the fixed cost of a capture
(2 × 8 tokens, where the forward is nearly free), the same diff in a warm process against reading
both files with h5py, and the start-up cost of a fresh ``hwdiff diff`` process. Issue 29's additions:
the write bound of the full capture (forward + its bytes at h5py's measured write speed with the
checksum), the cost and error of the token log-probs, the load average at start and end, and
``--no-msprobe`` for a machine without msprobe's virtual environment (hwdiff's side only).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VENV = ROOT / "benchmarks" / ".msprobe-venv"


def msprobe_venv() -> Path:
    python = VENV / "bin" / "python"
    if not (VENV / "bin" / "msprobe").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pins = [
            line
            for line in (ROOT / "requirements" / "pinned.txt").read_text().splitlines()
            if line.startswith(("torch==", "transformers=="))
        ]
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *pins, "mindstudio-probe"], check=True
        )
    return python


def save_workload(work: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    ids = torch.randint(0, 8192, (2, 256), generator=torch.Generator().manual_seed(1))
    torch.save((config, model.state_dict(), ids), work / "workload_a.pt")


def load_model(work: Path, attn: str):
    import torch
    from transformers import Qwen2ForCausalLM

    config, state, ids = torch.load(work / "workload_a.pt", weights_only=False)
    config._attn_implementation = attn
    model = Qwen2ForCausalLM(config).eval()
    model.load_state_dict(state)
    return model, ids


def timed(fn, repeats: int, setup=None, runs: list | None = None) -> float:
    """Median seconds of ``repeats`` calls (each run's seconds appended to ``runs``)."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if runs is not None:
        runs.extend(times)
    return statistics.median(times)


def hwdiff_side(work: Path, repeats: int) -> dict:
    import torch

    import hwdiff

    model, ids = load_model(work, "sdpa")
    inputs = hwdiff.load_inputs(ids, max_tokens=None)  # all 256 tokens (the default cuts at 128)

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    forward()
    result = {"plain_forward_s": timed(forward, repeats)}
    for mode in ("full", "sample", "stats"):
        path, runs = work / f"hw-{mode}.h5", []
        # The previous file is removed before the clock starts, as the msprobe worker removes its dump.
        result[f"{mode}_s"] = timed(
            lambda: hwdiff.capture(
                model, path, inputs=inputs, mode=mode, batch_size=2, progress=False
            ),
            repeats,
            setup=lambda: path.unlink(missing_ok=True),
            runs=runs,
        )
        result[f"{mode}_ratio_range"] = [
            min(runs) / result["plain_forward_s"],
            max(runs) / result["plain_forward_s"],
        ]
        result[f"{mode}_bytes"] = path.stat().st_size
    result["plain_forward_after_s"] = timed(forward, repeats)
    result["write_bound"] = write_bound(
        work, result["full_bytes"], result["plain_forward_s"], repeats
    )
    result["full_over_write_bound"] = result["full_s"] / result["write_bound"]["bound_s"]
    result["fixed_cost"] = fixed_cost(model, ids, work, repeats)
    result["logprobs"] = logprob_cost(model, ids, repeats)
    for attn in ("sdpa", "eager"):
        m, _ = load_model(work, attn)
        hwdiff.capture(m, work / f"hw-{attn}.h5", inputs=inputs, batch_size=2, progress=False)
    return result


def fixed_cost(model, ids, work: Path, repeats: int) -> dict:
    """What a capture costs beyond the forward when the forward is nearly free (2 × 8 tokens): file,
    module registry, per-slot metadata, log-probs, sync and rename."""
    import torch

    import hwdiff

    short = ids[:, :8]
    inputs = hwdiff.load_inputs(short, max_tokens=None)

    def forward():
        with torch.no_grad():
            model(input_ids=short, use_cache=False)

    forward()
    result = {"tokens": list(short.shape), "plain_forward_s": timed(forward, repeats)}
    path = work / "hw-fixed.h5"
    for mode in ("full", "stats"):
        seconds = timed(
            lambda: hwdiff.capture(
                model, path, inputs=inputs, mode=mode, batch_size=2, progress=False
            ),
            repeats,
            setup=lambda: path.unlink(missing_ok=True),
        )
        result[f"{mode}_overhead_s"] = seconds - result["plain_forward_s"]
    return result


def write_bound(work: Path, nbytes: int, forward_s: float, repeats: int) -> dict:
    """The full capture's floor: the forward plus its file's bytes at h5py's write speed on this
    machine, measured writing as many float32 bytes in 512 KiB rows with the Fletcher-32 checksum,
    then flushing and syncing the file (as a capture does)."""
    import h5py
    import numpy as np

    row = 1 << 17  # float32 elements: 512 KiB per chunk
    data = np.random.default_rng(0).standard_normal(
        (max(1, nbytes // (4 * row)), row), dtype=np.float32
    )
    path = work / "write-bound.h5"

    def write():
        with h5py.File(path, "w", libver=("v110", "v110")) as handle:
            handle.create_dataset("x", data=data, chunks=(1, row), fletcher32=True)
            handle.flush()
            os.fsync(handle.id.get_vfd_handle())

    seconds = timed(write, repeats, setup=lambda: path.unlink(missing_ok=True))
    path.unlink(missing_ok=True)
    speed = data.nbytes / seconds
    return {
        "bytes": data.nbytes,
        "write_s": seconds,
        "write_gb_per_s": speed / 1e9,
        "bound_s": forward_s + nbytes / speed,
    }


def logprob_cost(model, ids, repeats: int) -> dict:
    """The token log-probs (hwdiff.capturing.logprobs.token_logprobs) against the earlier whole-row float64
    log_softmax, on workload A's own logits and on random logits of Qwen2.5's 151,936 words: seconds
    and the largest difference of any stored value (nats)."""
    import torch

    from hwdiff.capturing.logprobs import token_logprobs

    def whole_row(
        logits, ids
    ):  # the earlier implementation: float64 log_softmax, entropy and top-k per row
        lp = torch.log_softmax(logits.double(), -1)
        return {
            "next_token": lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0],
            "entropy": -(lp.exp() * lp).sum(-1),
            "topk_logprobs": torch.topk(lp, 8, -1).values,
        }

    with torch.no_grad():
        own = model(input_ids=ids, use_cache=False).logits
    wide = torch.randn(1, ids.shape[1], 151936, generator=torch.Generator().manual_seed(2)) * 3
    result = {}
    for name, logits in (("workload_a", own), ("vocab_151936", wide)):
        tokens = torch.randint(
            0, logits.shape[-1], logits.shape[:2], generator=torch.Generator().manual_seed(3)
        )
        new, old = token_logprobs(logits, tokens), whole_row(logits, tokens)
        error = max(
            float((new[key][:, :-1] if key == "next_token" else new[key]).sub(old[key]).abs().max())
            for key in old
        )
        result[name] = {
            "shape": list(logits.shape),
            "max_abs_diff_nats": error,
            "blocked_s": timed(lambda: token_logprobs(logits, tokens), repeats),
            "whole_row_float64_s": timed(lambda: whole_row(logits, tokens), repeats),
        }
    return result


# ru_maxrss of a child keeps the peak of the process it was forked from across exec, so the command
# runs under a small launcher process and the launcher reports its child's peak RSS.
LAUNCHER = (
    "import resource, subprocess, sys, time; s = time.perf_counter(); "
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
    "print(time.perf_counter() - s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def run_peak(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MB) of a command."""
    out = subprocess.run(
        ["/usr/bin/env", "python3", "-c", LAUNCHER, *command],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, rss_kb = out.stdout.split()
    return float(seconds), float(rss_kb) / 1024


def cli_diff(work: Path, repeats: int) -> dict:
    """``hwdiff diff`` of the sdpa / eager pair as the CLI in a fresh process (writing a CSV table)."""
    hw = [work / "hw-sdpa.h5", work / "hw-eager.h5"]
    hw_bytes = sum(p.stat().st_size for p in hw)
    cli = [
        sys.executable,
        "-m",
        "hwdiff",
        "diff",
        *map(str, hw),
        "-q",
        "--csv",
        str(work / "hw-diff.csv"),
    ]
    os.environ["PYTHONPATH"] = str(ROOT)
    diffs = [run_peak(cli) for _ in range(repeats)]
    diff_s = statistics.median(d[0] for d in diffs)
    return {
        "runs": diffs,
        "hwdiff_diff_s": diff_s,
        "hwdiff_diff_bytes": hw_bytes,
        "hwdiff_diff_gb_per_s": hw_bytes / diff_s / 1e9,
        "hwdiff_diff_peak_rss_mb": max(d[1] for d in diffs),
    }


def diff_vs_compare(work: Path, python: Path, repeats: int) -> dict:
    hw = cli_diff(work, repeats)
    diffs = hw.pop("runs")
    msp_dirs = [work / "msp-eager" / "step0", work / "msp-sdpa" / "step0"]
    msp_bytes = sum(p.stat().st_size for d in msp_dirs for p in d.rglob("*") if p.is_file())
    msprobe = str(python.parent / "msprobe")
    compares = [
        run_peak(
            [
                msprobe,
                "compare",
                "-tp",
                str(msp_dirs[0]),
                "-gp",
                str(msp_dirs[1]),
                "-o",
                str(work / "msp-compare"),
            ]
        )
        for _ in range(repeats)
    ]
    diff_s, compare_s = hw["hwdiff_diff_s"], statistics.median(c[0] for c in compares)
    return {
        **hw,
        "msprobe_compare_s": compare_s,
        "msprobe_compare_bytes": msp_bytes,
        "msprobe_compare_gb_per_s": msp_bytes / compare_s / 1e9,
        "msprobe_compare_peak_rss_mb": max(c[1] for c in compares),
        "speedup": compare_s / diff_s,
        "speedup_range": [
            min(c[0] for c in compares) / max(d[0] for d in diffs),
            max(c[0] for c in compares) / min(d[0] for d in diffs),
        ],
    }


def diff_in_process(work: Path, repeats: int) -> dict:
    """The workload A diff in a warm process against merely reading both files (h5py, no chunk cache,
    every dataset under /modules, as the diff reads them)."""
    import h5py

    import hwdiff

    pair = [work / "hw-sdpa.h5", work / "hw-eager.h5"]

    def read_both():
        for path in pair:
            with h5py.File(path, "r", rdcc_nbytes=0) as handle:
                datasets = []  # (visititems stops at the first callback that returns something)
                handle["modules"].visititems(
                    lambda name, node: (
                        datasets.append(node) if isinstance(node, h5py.Dataset) else None
                    )
                )
                for dataset in datasets:
                    dataset[()]

    hwdiff.diff(*pair, progress=False)
    read_both()
    diff_runs, read_runs = [], []
    diff_s = timed(lambda: hwdiff.diff(*pair, progress=False), repeats, runs=diff_runs)
    read_s = timed(read_both, repeats, runs=read_runs)
    return {
        "diff_s": diff_s,
        "read_both_s": read_s,
        "ratio": diff_s / read_s,
        "ratio_range": [min(diff_runs) / max(read_runs), max(diff_runs) / min(read_runs)],
    }


def process_start(work: Path, repeats: int) -> dict:
    """Start-up of a fresh ``hwdiff diff``: the CLI on two tiny captures (2 × 8 tokens) minus the same
    diff in a warm process, and what the imports and the first compiled-kernel load take alone."""
    import hwdiff

    pair = [str(work / "hw-fixed-a.h5"), str(work / "hw-fixed-b.h5")]
    for path, dtype in zip(
        pair, ("float32", "bfloat16")
    ):  # a pair that differs: every stage (fits included) runs
        hwdiff.capture(
            hwdiff.load_model("tiny-qwen2", dtype=dtype),
            path,
            inputs=hwdiff.load_inputs([[1, 2, 3, 4, 5, 6, 7, 8]] * 2),
            progress=False,
        )
    cli = [sys.executable, "-m", "hwdiff", "diff", *pair, "-q", "--csv", str(work / "hw-fixed.csv")]
    fresh = statistics.median(run_peak(cli)[0] for _ in range(repeats))
    hwdiff.diff(*pair, progress=False)
    warm = timed(lambda: hwdiff.diff(*pair, progress=False), repeats)
    parts = {}
    for name, code in (
        ("python", "pass"),
        ("hwdiff_cli", "import hwdiff.cli"),
        ("compare_modules", "import hwdiff.compare.core"),
        (
            "numba_and_first_kernel",
            "import numpy as np; from hwdiff.common import jit; "
            "jit.kernels().t_em(np.arange(9.0), 3.0, 0.0, 1.0, 2)",
        ),
        ("scipy_fit_modules", "import scipy.special"),
        ("scipy_optimize_no_longer_imported", "import scipy.optimize"),
    ):
        parts[name] = statistics.median(
            run_peak([sys.executable, "-c", code])[0] for _ in range(repeats)
        )
    return {"cli_s": fresh, "warm_diff_s": warm, "start_s": fresh - warm, "parts_s": parts}


def cross_check(work: Path) -> dict:
    """hwdiff's cosine and max abs error against msprobe's, for every module output both report."""
    import hwdiff

    result = hwdiff.diff(work / "hw-sdpa.h5", work / "hw-eager.h5", progress=False)
    table = sorted((work / "msp-compare").glob("compare_result_*.csv"))[-1]
    pattern = re.compile(r"^Module\.(.+)\.[A-Za-z0-9_]+\.forward\.0\.output\.0$")
    rows, worst_cos, worst_max, identical = 0, 0.0, 0.0, 0
    for row in csv.DictReader(table.open()):
        match = pattern.match(row["NPU Name"])
        if not match:
            continue
        try:
            layer = result.layer(match.group(1))
        except KeyError:
            continue
        rows += 1
        identical += _same_tensors(work, match.group(1))
        cos, max_abs = float(row["Cosine"]), float(row["MaxAbsErr"])
        worst_cos = max(worst_cos, abs(layer.metrics.cosine - cos) / abs(cos))
        worst_max = max(worst_max, abs(layer.metrics.max_abs - max_abs) / max(abs(max_abs), 1e-30))
    return {
        "modules_compared": rows,
        "tensors_bit_identical_between_tools": identical,
        "max_rel_diff_cosine": worst_cos,
        "max_rel_diff_max_abs": worst_max,
        "note": "msprobe prints MaxAbsErr with 6 significant digits: relative differences up to 5e-6 are "
        "that rounding",
    }


def _same_tensors(work: Path, name: str) -> int:
    """1 when msprobe's dumped output of ``name`` equals hwdiff's captured one, bit for bit, on both sides."""
    import numpy as np
    import torch

    import hwdiff

    same = 1
    exact = re.compile(rf"^Module\.{re.escape(name)}\.[A-Za-z0-9_]+\.forward\.0\.output\.0\.pt$")
    for attn in ("sdpa", "eager"):
        dumped = next(
            (p for p in (work / f"msp-{attn}").rglob("*.pt") if exact.match(p.name)), None
        )
        if dumped is None:
            return 0
        with hwdiff.open_capture(work / f"hw-{attn}.h5") as cap:
            same &= int(
                np.array_equal(torch.load(dumped, weights_only=False).numpy(), cap.activation(name))
            )
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hwdiff-vs-msprobe"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--no-msprobe",
        action="store_true",
        help="hwdiff's side only (no msprobe venv: its rows are recorded as not measured)",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    python = None if args.no_msprobe else msprobe_venv()
    started = {"loadavg": os.getloadavg()}
    save_workload(args.work)
    hw = hwdiff_side(args.work, args.repeats)
    ratios = {
        "hwdiff_full": hw["full_s"] / hw["plain_forward_s"],
        "hwdiff_sample": hw["sample_s"] / hw["plain_forward_s"],
        "hwdiff_stats": hw["stats_s"] / hw["plain_forward_s"],
        "hwdiff_full_over_write_bound": hw["full_over_write_bound"],
    }
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "load": started,
        "hwdiff": hw,
        "ratios": ratios,
    }
    if python is None:
        result["msprobe"] = "not measured (--no-msprobe)"
    else:
        worker = subprocess.run(
            [
                str(python),
                str(ROOT / "benchmarks" / "_msprobe_worker.py"),
                str(args.work),
                str(args.repeats),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        msp = result["msprobe"] = json.loads(worker.stdout.strip().splitlines()[-1])
        ratios.update(
            {
                "msprobe_tensor": msp["tensor_s"] / msp["plain_forward_s"],
                "msprobe_statistics": msp["statistics_s"] / msp["plain_forward_s"],
                "size_hwdiff_full_over_msprobe_outputs": hw["full_bytes"]
                / msp["tensor_dump_output_bytes"],
            }
        )
        result["compare"] = diff_vs_compare(args.work, python, min(args.repeats, 3))
    if python is None:
        result["compare"] = {
            **cli_diff(args.work, min(args.repeats, 3)),
            "msprobe_compare_s": "not measured",
        }
        result["compare"].pop("runs")
    result["diff_in_process"] = diff_in_process(args.work, args.repeats)
    result["process_start"] = process_start(args.work, args.repeats)
    if python is not None:
        result["cross_check"] = cross_check(args.work)
    result["load"]["end"] = os.getloadavg()
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    kept = {
        key: previous[key] for key in ("workload_b", "capture_scaling") if key in previous
    }  # other scripts' parts
    args.out.write_text(json.dumps({**result, **kept}, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
