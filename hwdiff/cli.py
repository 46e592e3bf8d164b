"""The ``hwdiff`` command: a thin shell over the library, one function call per subcommand."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from ._version import __version__
from .errors import HwdiffError

MODES = ("full", "sample", "stats")
KINDS = ("embedding", "rmsnorm", "linear", "attention", "mlp", "activation", "decoder_layer", "head", "other")


def _cmd_capture(args: argparse.Namespace) -> int:
    from .capturing import capture
    from .models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype,
                       attn_implementation=args.attn_impl, seed=args.seed)
    result = capture(model, args.output, inputs=args.inputs, modules=args.modules, kinds=args.kinds,
                     mode=args.mode, record_inputs=args.record_inputs, emulate=args.emulate, batch_size=args.batch_size,
                     max_tokens=args.max_tokens, limit=args.limit, tokens=args.tokens, seed=args.seed,
                     compression=args.compression, progress=not args.quiet)
    print(result)
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from .replaying import model_for, replay

    model = model_for(args.reference, device=args.device, dtype=args.dtype, attn_implementation=args.attn_impl,
                      spec=args.model)
    print(replay(model, args.reference, args.output, emulate=args.emulate,
                 allow_model_mismatch=args.allow_model_mismatch, progress=not args.quiet))
    return 0


def _cmd_probe_ops(args: argparse.Namespace) -> int:
    from .probe_ops import probe_ops

    print(probe_ops(args.output, device=args.device, dtype=args.dtype, seed=args.seed, emulate=args.emulate,
                    progress=not args.quiet))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_capture

    print(inspect_capture(args.file, allow_incomplete=args.allow_incomplete))
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from .compare import diff
    from .compare.output import format_table

    result = diff(args.reference, args.target, out=args.output, golden=args.golden, local=args.local, json_path=args.json,
                  csv_path=args.csv, strict=args.strict, allow_model_mismatch=args.allow_model_mismatch,
                  fit_samples=args.fit_samples, seed=args.seed, progress=not args.quiet)
    print(format_table(result, top=args.top))
    written = [path for path in (args.output, args.json, args.csv) if path]
    if written:
        print(f"\nwrote {', '.join(map(str, written))}")
    return 0


def _kinds(text: str) -> list[str]:
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kind {', '.join(unknown)} (choose from {', '.join(KINDS)})")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hwdiff", description="Measure how two devices compute the same model differently.")
    parser.add_argument("--version", action="version", version=f"hwdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cap = sub.add_parser("capture", help="record per-module activations of a model into one HDF5 file",
                         description="Run fixed inputs through a model with forward hooks and write every "
                                     "selected module's output to one self-describing HDF5 file.")
    cap.add_argument("--model", default="tiny-qwen2",
                     help="tiny-qwen2, qwen2.5-1.5b-arch, a local checkpoint directory or a hub id "
                          "(default: %(default)s)")
    cap.add_argument("--device", default="auto", help="cpu, cuda[:N], npu[:N] or auto (default: %(default)s)")
    cap.add_argument("--dtype", default="bfloat16",
                     help="float32, bfloat16, float16 or float64 (default: %(default)s)")
    cap.add_argument("--inputs", default=None,
                     help="token ids or prompts: .jsonl, .txt or .npy (default: the shipped math word problems)")
    cap.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default: %(default)s)")
    cap.add_argument("--max-tokens", type=int, default=128, help="cut sequences to this length (default: %(default)s)")
    cap.add_argument("--limit", type=int, default=None, help="use only the first N sequences")
    cap.add_argument("--modules", action="append", default=None, metavar="REGEX",
                     help="record modules whose qualified name matches REGEX (repeatable)")
    cap.add_argument("--kinds", type=_kinds, default=None, metavar="K[,K...]",
                     help=f"record modules of these kinds: {', '.join(KINDS)} (default: all but other)")
    cap.add_argument("--mode", choices=MODES, default="full",
                     help="full: every element; sample: --tokens positions per sequence; "
                          "stats: float64 statistics only (default: %(default)s)")
    cap.add_argument("--tokens", type=int, default=16, help="positions per sequence in sample mode (default: %(default)s)")
    cap.add_argument("--attn-impl", default=None, help="attention kernel path: eager, sdpa, ... (default: transformers')")
    cap.add_argument("--emulate", action="append", default=None, metavar="PROFILE[:k=v,...]",
                     help="apply a documented numerical perturbation (repeatable): aqn[:sigma=,seed=], "
                          "bf16-truncate, bf16-block-accum[:block=], approx-silu, rmsnorm-order[:chunk=]")
    cap.add_argument("--record-inputs", action="store_true", help="also store each module's input (for replay)")
    cap.add_argument("--seed", type=int, default=0,
                     help="seed of built-in model weights and of sample positions (default: %(default)s)")
    cap.add_argument("--compression", choices=("gzip", "lzf"), default=None, help="HDF5 compression (default: none)")
    cap.add_argument("-o", "--output", required=True, help="capture file to write (.h5)")
    cap.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    cap.set_defaults(handler=_cmd_capture)

    dif = sub.add_parser("diff", help="compare two captures module by module",
                         description="Compare TARGET against REFERENCE module by module: exactness, ULP, relative "
                                     "error, error distribution fits, cross-layer correlation, first divergence. "
                                     "Prints the worst modules first.")
    dif.add_argument("reference", help="reference capture (.h5)")
    dif.add_argument("target", help="target capture (.h5), same model and inputs")
    dif.add_argument("--golden", default=None, help="a third capture (e.g. CPU float32): each side's error against it")
    dif.add_argument("--local", default=None,
                     help="a replay of the reference's inputs on the target's device (hwdiff replay): adds each "
                          "module's local error, the propagated part and the amplification")
    dif.add_argument("-o", "--output", default=None, help="write everything, histograms included, to this diff.h5")
    dif.add_argument("--json", default=None, help="write the summary (schema hwdiff/diff-summary/1) to this file")
    dif.add_argument("--csv", default=None, help="write a flat table to this file")
    dif.add_argument("--strict", action="store_true", help="fail when any module or call cannot be paired")
    dif.add_argument("--allow-model-mismatch", action="store_true", help="compare captures of different weights")
    dif.add_argument("--fit-samples", type=int, default=20_000,
                     help="elements per module (seeded sample) for the fits and divergence rule (default: %(default)s)")
    dif.add_argument("--seed", type=int, default=0, help="seed of the fit samples (default: %(default)s)")
    dif.add_argument("--top", type=int, default=25, help="rows in the printed table (default: %(default)s)")
    dif.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    dif.set_defaults(handler=_cmd_diff)

    rep = sub.add_parser("replay", help="run each recorded module on the reference's own inputs",
                         description="Call every module whose inputs REFERENCE recorded (--record-inputs) with exactly "
                                     "those inputs, on --device in --dtype, and write the outputs as a capture: "
                                     "`hwdiff diff REFERENCE LOCAL` is then each module's local error.")
    rep.add_argument("reference", help="reference capture made with --record-inputs")
    rep.add_argument("--device", default="auto", help="cpu, cuda[:N], npu[:N] or auto (default: %(default)s)")
    rep.add_argument("--dtype", default=None, help="float32, bfloat16, float16, float64 (default: the reference's)")
    rep.add_argument("--attn-impl", default=None, help="attention kernel path (default: transformers')")
    rep.add_argument("--model", default=None, help="model spec (default: the one the reference was captured from)")
    rep.add_argument("--emulate", action="append", default=None, metavar="PROFILE[:k=v,...]",
                     help="apply a documented numerical perturbation (repeatable): aqn[:sigma=,seed=], "
                          "bf16-truncate, bf16-block-accum[:block=], approx-silu, rmsnorm-order[:chunk=]")
    rep.add_argument("--allow-model-mismatch", action="store_true", help="replay with different weights")
    rep.add_argument("-o", "--output", required=True, help="capture file to write (.h5)")
    rep.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    rep.set_defaults(handler=_cmd_replay)

    ops = sub.add_parser("probe-ops", help="measure matmul, casts, activations, softmax, RMSNorm, reductions op by op",
                         description="Run single ops (matmul for K = 64 ... 16384, dtype cast, silu, gelu, exp, tanh, "
                                     "softmax, RMSNorm, sum, mean) on seeded inputs exactly representable in every "
                                     "dtype, and store the outputs in the capture format: `hwdiff diff` compares "
                                     "two devices op by op; --device cpu --dtype float64 is the golden.")
    ops.add_argument("--device", default="auto", help="cpu, cuda[:N], npu[:N] or auto (default: %(default)s)")
    ops.add_argument("--dtype", default="bfloat16", help="float32, bfloat16, float16, float64 (default: %(default)s)")
    ops.add_argument("--seed", type=int, default=0, help="seed of the op inputs (default: %(default)s)")
    ops.add_argument("--emulate", action="append", default=None, metavar="PROFILE[:k=v,...]",
                     help="apply an emulation profile (e.g. bf16-block-accum:block=64)")
    ops.add_argument("-o", "--output", required=True, help="capture file to write (.h5)")
    ops.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    ops.set_defaults(handler=_cmd_probe_ops)

    ins = sub.add_parser("inspect", help="print a capture's metadata and module table",
                         description="Print a capture's metadata and one row per module.")
    ins.add_argument("file", help="capture file (.h5)")
    ins.add_argument("--allow-incomplete", action="store_true", help="show a capture whose run did not finish")
    ins.add_argument("-q", "--quiet", action="store_true", help="no log lines")
    ins.set_defaults(handler=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="hwdiff: %(message)s", stream=sys.stderr)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except HwdiffError as exc:
        print(f"hwdiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hwdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
