"""The ``hwdiff`` command: a thin shell over the library, one function call per subcommand.

The parser is :mod:`hwdiff.cli.parser`, built from the shared options of :mod:`hwdiff.cli.args`; here
each subcommand's handler, and :func:`main`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..common.outputs import check_outputs
from ..errors import HwdiffError
from .parser import build_parser


def _cmd_capture(args: argparse.Namespace) -> int:
    from ..capturing import distributed

    device = distributed.init_from_env(
        args.device
    )  # torchrun: this rank's device, process group from the env
    try:
        ranks = distributed.rank_info()
        _check_capture_args(args, ranks)
        from ..capturing.models import load_model
        from ..capturing.run import capture

        model = load_model(
            args.model,
            device="cpu" if args.device_map else device,
            dtype=args.dtype,
            attn_implementation=args.attn_impl,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
        )
        if args.device_map:
            from ..capturing.devicemap import dispatch

            model = dispatch(model)
        if args.tp > 1:
            model = distributed.tensor_parallel(model, args.tp)
        result = capture(
            model,
            args.output,
            inputs=args.inputs,
            modules=args.modules,
            kinds=args.kinds,
            mode=args.mode,
            record_inputs=args.record_inputs,
            emulate=args.emulate,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            limit=args.limit,
            tokens=args.tokens,
            seed=args.seed,
            compression=args.compression,
            progress=not args.quiet,
            logprobs=not args.no_logprobs,
            logprob_topk=args.logprob_topk,
        )
        if ranks is None or ranks.rank == 0:
            print(result)
    finally:
        distributed.close()
    return 0


def _check_capture_args(args: argparse.Namespace, ranks: Any) -> None:
    if args.device_map and (ranks is not None or args.tp > 1):
        raise HwdiffError(
            "--device-map auto is for one process over several devices; under torchrun each rank "
            "has its own device (use --tp to shard a model over the ranks)"
        )
    if args.device_map and args.device != "auto":
        raise HwdiffError(
            f"--device-map auto chooses the devices itself; drop --device {args.device}"
        )
    if args.tp > 1 and ranks is None:
        raise HwdiffError(
            f"--tp {args.tp} shards the model over {args.tp} processes: run it under torchrun "
            f"(torchrun --nproc_per_node {args.tp} -m hwdiff capture ... --tp {args.tp})"
        )
    if ranks is None:
        if str(args.output).endswith(("/", os.sep)):
            raise HwdiffError(
                f"-o {args.output} names a directory, but one process writes one capture file (e.g. "
                f"{str(args.output).rstrip('/' + os.sep) or 'capture'}.h5); a directory is what a "
                "multi-rank capture under torchrun writes"
            )
        check_outputs([args.inputs], [args.output])
    else:
        from ..store.ranks import check_target

        check_target(Path(args.output))


def _cmd_replay(args: argparse.Namespace) -> int:
    check_outputs([args.reference], [args.output])
    from ..capturing.replaying import model_for, replay

    model = model_for(
        args.reference,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_impl,
        spec=args.model,
        trust_remote_code=args.trust_remote_code,
    )
    print(
        replay(
            model,
            args.reference,
            args.output,
            emulate=args.emulate,
            allow_model_mismatch=args.allow_model_mismatch,
            progress=not args.quiet,
        )
    )
    return 0


def _cmd_probe_ops(args: argparse.Namespace) -> int:
    check_outputs([], [args.output])
    from ..capturing.probe_ops import probe_ops

    print(
        probe_ops(
            args.output,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            emulate=args.emulate,
            progress=not args.quiet,
        )
    )
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from ..calibration.exporters import hydra_overrides
    from ..calibration.text import format_calibration
    from ..measure.calibrate_run import calibrate, export_paths, write
    from ..measure.sigma_probe import reference_model

    exports = export_paths(args.output, args.export or [])
    check_outputs(
        [args.diff, *([args.sigma] if args.sigma else [])], [args.output, *exports.values()]
    )
    needs_model = args.verify or args.policy_check or args.conversion == "measured"
    model = reference_model(args.diff, spec=args.model, device=args.device) if needs_model else None
    result = calibrate(
        args.diff,
        model=model,
        factor=args.factor,
        num_stages=args.stages,
        kind=args.schedule,
        sigma_start=args.sigma_start,
        conversion=args.conversion,
        progress=not args.quiet,
        verify=args.verify,
        policy_check=args.policy_check,
        policy_draws=args.policy_draws,
        sigma=args.sigma,
    )
    written = write(
        result, args.output, exports=args.export or []
    )  # a refused export writes nothing, sigma.yaml included
    print(format_calibration(result))
    if "verl" in (args.export or []):
        print("\nHydra overrides for verl:\n  " + " \\\n  ".join(hydra_overrides(result)))
    print(f"\nwrote {', '.join(map(str, written))}")
    if args.strict and result.verify is not None and not result.verify.passed:
        lo, hi = result.verify.band
        if result.verify.failed:
            print(
                f"hwdiff: error: verify: {len(result.verify.failed)} norm(s) induce an error outside {lo:g}-{hi:g}x "
                f"the target at their sub-block (first: {result.verify.failed[0].name})",
                file=sys.stderr,
            )
        else:
            print(
                f"hwdiff: error: verify: sigma 0 or none at {', '.join(result.verify.unreproduced)} while the "
                "sub-block it maps to has local error",
                file=sys.stderr,
            )
        return 1
    return 0


def _cmd_aqn_check(args: argparse.Namespace) -> int:
    from ..aqn import AQNInjector, check_effectiveness, format_checks
    from ..calibration.sigmafile import load_sigma
    from ..capturing.models import load_model, resolve_dtype

    sigma = load_sigma(args.sigma)
    model = load_model(
        args.model, device="cpu", dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    targets = AQNInjector(model, sigma).targets
    print(format_checks(targets, check_effectiveness(model, sigma, resolve_dtype(args.dtype))))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..reporting import report

    print(report(args.diff, args.output, sigma=args.sigma, robustness=args.robustness))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    if args.verify:
        from ..store.verify import verify_file

        found = verify_file(args.file)
        print(found)
        if not found.ok:
            name, problem = found.problems[0]
            raise HwdiffError(
                f"{args.file}: {len(found.problems)} damaged dataset(s), first {name}: {problem}"
            )
        return 0
    from ..store.inspect import inspect_capture

    print(inspect_capture(args.file, allow_incomplete=args.allow_incomplete))
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from ..compare import diff
    from ..compare.generation import diff_generations, format_generation_diff, is_generation_pair
    from ..compare.output import format_table, rl_csv_path

    if is_generation_pair(
        args.reference, args.target, output=args.output, golden=args.golden, local=args.local
    ):
        gen = diff_generations(
            args.reference,
            args.target,
            json_path=args.json,
            csv_path=args.csv,
            allow_model_mismatch=args.allow_model_mismatch,
        )
        print(format_generation_diff(gen))
        written = [path for path in (args.json, args.csv) if path]
        if written:
            print(f"\nwrote {', '.join(map(str, written))}")
        return 0

    result = diff(
        args.reference,
        args.target,
        out=args.output,
        golden=args.golden,
        local=args.local,
        json_path=args.json,
        csv_path=args.csv,
        strict=args.strict,
        allow_model_mismatch=args.allow_model_mismatch,
        allow_any_local=args.allow_any_local,
        layout_map=args.map,
        fit_samples=args.fit_samples,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(format_table(result, top=args.top))
    written = [
        path
        for path in (args.output, args.json, args.csv, args.csv and rl_csv_path(args.csv))
        if path
    ]
    if written:
        print(f"\nwrote {', '.join(map(str, written))}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    check_outputs([args.inputs], [args.output])
    from ..capturing.generate import generate
    from ..capturing.models import load_model

    model = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_impl,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
    )
    print(
        generate(
            model,
            args.output,
            inputs=args.inputs,
            max_new_tokens=args.max_new_tokens,
            topk=args.topk,
            max_tokens=args.max_tokens,
            limit=args.limit,
            progress=not args.quiet,
        )
    )
    return 0


# ---- hwdiff robustness (hwdiff/measure/robustness_run.py, docs/robustness.md) ----------------------------------
def _cmd_robustness(args: argparse.Namespace) -> int:
    from ..measure import robustness_run as rb

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
        raise HwdiffError(
            "hwdiff robustness needs --model and --sigma (or --compare CARD_A CARD_B)"
        )
    local_model = (
        [args.model] if Path(args.model).exists() else []
    )  # a checkpoint folder: nothing written inside
    check_outputs(
        [
            args.sigma,
            args.prompts,
            *local_model,
            *(path for pair in args.pair or [] for path in pair),
        ],
        [args.output],
    )
    from ..capturing.models import load_model

    model = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_impl,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
    )
    options = rb.Options(
        draws=args.draws,
        seed=args.draw_seed,
        prompts=args.prompts,
        limit=args.limit,
        max_tokens=args.max_tokens,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        confidence=args.confidence or 0.95,
        progress=not args.quiet,
    )
    card = rb.robustness(
        model,
        args.sigma,
        options=options,
        pair=[tuple(p) for p in args.pair or []],
        output=args.output,
    )
    print(rb.format_card(card.summary()))
    if args.output:
        print(f"\nwrote {args.output}")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "capture": _cmd_capture,
    "diff": _cmd_diff,
    "generate": _cmd_generate,
    "replay": _cmd_replay,
    "probe-ops": _cmd_probe_ops,
    "calibrate": _cmd_calibrate,
    "aqn-check": _cmd_aqn_check,
    "report": _cmd_report,
    "robustness": _cmd_robustness,
    "inspect": _cmd_inspect,
}  # subcommand (hwdiff.cli.parser.build_parser) → its handler


def _single_process_only(args: argparse.Namespace) -> None:
    """Under torchrun (WORLD_SIZE > 1) only capture is rank-aware; any other command would run whole
    on every rank, all writing the same outputs."""
    world = os.environ.get("WORLD_SIZE", "1")
    if args.command != "capture" and world.isdigit() and int(world) > 1:
        raise HwdiffError(
            f"hwdiff {args.command} runs in one process; under torchrun (WORLD_SIZE={world}) only "
            "capture is rank-aware: run it without torchrun (it reads a multi-rank directory as one capture)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    from ..common import outputs

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    outputs.install_signal_handlers()
    handler = HANDLERS[args.command]
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
        print(
            f"hwdiff: error: interrupted ({'SIGINT' if signum == 2 else exc}); no partial output was kept",
            file=sys.stderr,
        )
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
