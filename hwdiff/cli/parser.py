"""The ``hwdiff`` command line's parser: every subcommand's options, built from the shared argument
groups of :mod:`hwdiff.cli.args`.

An option that several subcommands take (``--model``, ``--limit``, ``--seed``, ``--sigma`` ...) is
added by one function of :mod:`hwdiff.cli.args` with one validator (an argparse ``type``), so the
same value is refused the same way by every subcommand, at parse time: one ``hwdiff: error:`` line
and exit 2. The handlers
(``_cmd_*``) live in :mod:`hwdiff.cli`; building the parser imports neither torch nor h5py.
"""

from __future__ import annotations

import argparse
from typing import Any

from .._version import __version__
from ..calibration.schedule import KINDS as SCHEDULES
from ..calibration.schedule import MIN_STAGES
from ..structure import KINDS
from .args import (
    CAPTURE,
    CARD_FILE,
    COMPRESSION,
    COUNT,
    DIFF_FILE,
    DRAWS,
    INPUTS_FILE,
    MODE,
    NON_NEGATIVE,
    STAGES,
    _attn_arg,
    _device_arg,
    _dtype_arg,
    _emulate_arg,
    _inputs_arg,
    _kinds,
    _model_arg,
    _output_arg,
    _quiet_arg,
    _seed_arg,
    _sequence_args,
    _sigma_arg,
    _trust_arg,
)


# ---- the parser ---------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one ``hwdiff: error:`` line, like every other error (the usage is in --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = self.prog.removeprefix("hwdiff").strip()
        self.exit(
            2,
            f"hwdiff: error: {where + ': ' if where else ''}{message} (see `{self.prog} --help`)\n",
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``hwdiff`` parser; ``args.command`` names the subcommand (:data:`hwdiff.cli.HANDLERS` runs it)."""
    parser = _Parser(
        prog="hwdiff", description="Measure how two devices compute the same model differently."
    )
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


def _add_capture(sub: Any) -> None:
    cap = sub.add_parser(
        "capture",
        help="record per-module activations of a model into one HDF5 file",
        description="Run fixed inputs through a model with forward hooks and write every "
        "selected module's output to one self-describing HDF5 file. Under torchrun "
        "(WORLD_SIZE > 1) every rank writes its own file into the -o directory and "
        "rank 0 a manifest: data parallel by whole batches, or tensor parallel with "
        "--tp; the directory reads as one capture everywhere (docs/distributed.md).",
    )
    _model_arg(cap, default="tiny-qwen2")
    _device_arg(cap)
    _dtype_arg(cap)
    _inputs_arg(cap)
    _sequence_args(cap, "sequences", batch_size=8)
    cap.add_argument(
        "--modules",
        action="append",
        default=None,
        metavar="REGEX",
        help="record modules whose qualified name matches REGEX (repeatable)",
    )
    cap.add_argument(
        "--kinds",
        type=_kinds,
        default=None,
        metavar="K[,K...]",
        help=f"record modules of these kinds: {', '.join(KINDS)} (default: all but other)",
    )
    cap.add_argument(
        "--mode",
        type=MODE,
        default="full",
        help="full: every element; sample: --tokens positions per sequence; "
        "stats: float64 statistics only (default: %(default)s)",
    )
    cap.add_argument(
        "--tokens",
        type=COUNT,
        default=16,
        help="positions per sequence in sample mode (default: %(default)s)",
    )
    _attn_arg(cap)
    _emulate_arg(cap)
    cap.add_argument(
        "--record-inputs", action="store_true", help="also store each module's input (for replay)"
    )
    _trust_arg(cap)
    _seed_arg(cap, "built-in model weights and of sample positions")
    cap.add_argument(
        "--compression",
        type=COMPRESSION,
        default=None,
        help="lossless HDF5 filter (default: none, the fastest): gzip and lzf are built in; lz4 "
        "(Blosc, bit shuffle: fast) and zstd (Blosc2: smaller) need the hdf5plugin package to "
        "write and to read (docs/benchmarks.md, Compression)",
    )
    cap.add_argument(
        "--logprob-topk",
        type=COUNT,
        default=8,
        help="top-k ids and log-probs kept per position with the head's token log-probabilities "
        "(/logprobs, stored in every mode; docs/rl-impact.md) (default: %(default)s)",
    )
    cap.add_argument(
        "--no-logprobs", action="store_true", help="do not store the head's token log-probabilities"
    )
    cap.add_argument(
        "--tp",
        type=COUNT,
        default=1,
        help="tensor parallel over N torchrun ranks: q/k/v/gate/up column-wise, o/down row-wise "
        "(Qwen2/Llama layout; docs/distributed.md) (default: %(default)s)",
    )
    cap.add_argument(
        "--device-map",
        choices=("auto",),
        default=None,
        help="one process, decoder layers split over every visible GPU/NPU; records which device ran "
        "each module (one device visible: no split)",
    )
    _output_arg(
        cap,
        "capture file to write (.h5); under torchrun a directory (one file per rank + manifest.h5)",
        required=True,
    )
    _quiet_arg(cap)


def _add_diff(sub: Any) -> None:
    dif = sub.add_parser(
        "diff",
        help="compare two captures module by module",
        description="Compare TARGET against REFERENCE module by module: exactness, ULP, relative "
        "error, error distribution fits, cross-layer correlation, first divergence, and "
        "the RL impact (token log-prob mismatch at the head, docs/rl-impact.md). "
        "Prints the worst modules first. Given two generation files (hwdiff generate): "
        "where each prompt's greedy continuations split.",
    )
    dif.add_argument(
        "reference", type=CAPTURE, help="reference capture (.h5, or a multi-rank capture directory)"
    )
    dif.add_argument(
        "target", type=CAPTURE, help="target capture (.h5 or directory), same model and inputs"
    )
    dif.add_argument(
        "--golden",
        type=CAPTURE,
        default=None,
        help="a third capture (e.g. CPU float32): each side's error against it",
    )
    dif.add_argument(
        "--local",
        type=CAPTURE,
        default=None,
        help="a replay of the reference's inputs on the target's device (hwdiff replay): adds each "
        "module's local error, the propagated part and the amplification",
    )
    _output_arg(dif, "write everything, histograms included, to this diff.h5")
    dif.add_argument(
        "--json", default=None, help="write the summary (schema hwdiff/diff-summary/1) to this file"
    )
    dif.add_argument(
        "--csv",
        default=None,
        help="write a flat table to this file (and the RL block to NAME.rl.csv beside it)",
    )
    dif.add_argument(
        "--strict", action="store_true", help="fail when any module or call cannot be paired"
    )
    dif.add_argument(
        "--allow-model-mismatch", action="store_true", help="compare captures of different weights"
    )
    dif.add_argument(
        "--allow-any-local",
        action="store_true",
        help="accept a --local capture that is not a replay of REFERENCE (by default it must be)",
    )
    dif.add_argument(
        "--map",
        default=None,
        metavar="NAME|FILE.yaml",
        help="compare captures of two module layouts through a mapping: 'vllm' splits vLLM's fused "
        "qkv_proj / gate_up_proj into HF's q/k/v_proj and gate/up_proj (docs/vllm.md), or a YAML "
        "file of fused / rename / drop rules; the weights are checked by the stored norm weights",
    )
    dif.add_argument(
        "--fit-samples",
        type=COUNT,
        default=20_000,
        help="elements per module (seeded sample) for the fits and divergence rule (default: %(default)s)",
    )
    _seed_arg(dif, "the fit samples")
    dif.add_argument(
        "--top", type=COUNT, default=25, help="rows in the printed table (default: %(default)s)"
    )
    _quiet_arg(dif)


def _add_generate(sub: Any) -> None:
    gen = sub.add_parser(
        "generate",
        help="greedy-decode the prompts and store the tokens and their log-probs",
        description="Greedy decoding (transformers generate, do_sample=False, one prompt at a time) "
        "of the shipped prompts or --inputs; stores the generated ids and each token's "
        "log-prob, entropy and top-k with the capture metadata. `hwdiff diff A B` of two "
        "such files says where each prompt's continuations split (docs/rl-impact.md).",
    )
    _model_arg(gen, default="tiny-qwen2")
    _device_arg(gen)
    _dtype_arg(gen)
    _attn_arg(gen)
    _inputs_arg(gen)
    gen.add_argument(
        "--max-new-tokens",
        type=COUNT,
        default=16,
        help="tokens generated per prompt (default: %(default)s)",
    )
    gen.add_argument(
        "--topk",
        type=COUNT,
        default=8,
        help="top-k kept per generated position (default: %(default)s)",
    )
    _sequence_args(gen, "prompts")
    _trust_arg(gen)
    _seed_arg(gen, "built-in model weights")
    _output_arg(gen, "generation file to write (.h5)", required=True)
    _quiet_arg(gen)


def _add_replay(sub: Any) -> None:
    rep = sub.add_parser(
        "replay",
        help="run each recorded module on the reference's own inputs",
        description="Call every module whose inputs REFERENCE recorded (--record-inputs) with exactly "
        "those inputs, on --device in --dtype, and write the outputs as a capture: "
        "`hwdiff diff REFERENCE LOCAL` is then each module's local error.",
    )
    rep.add_argument("reference", type=CAPTURE, help="reference capture made with --record-inputs")
    _device_arg(rep)
    _dtype_arg(rep, default=None, default_help="the reference's")
    _attn_arg(rep)
    _model_arg(rep, default_help="the one the reference was captured from")
    _emulate_arg(rep)
    rep.add_argument(
        "--allow-model-mismatch", action="store_true", help="replay with different weights"
    )
    _trust_arg(rep)
    _output_arg(rep, "capture file to write (.h5)", required=True)
    _quiet_arg(rep)


def _add_probe_ops(sub: Any) -> None:
    ops = sub.add_parser(
        "probe-ops",
        help="measure matmul, casts, activations, softmax, RMSNorm, reductions op by op",
        description="Run single ops (matmul for K = 64 ... 16384, dtype cast, silu, gelu, exp, tanh, "
        "softmax, RMSNorm, sum, mean) on seeded inputs exactly representable in every "
        "dtype, and store the outputs in the capture format: `hwdiff diff` compares "
        "two devices op by op; --device cpu --dtype float64 is the golden.",
    )
    _device_arg(ops)
    _dtype_arg(ops)
    _seed_arg(ops, "the op inputs")
    _emulate_arg(ops)
    _output_arg(ops, "capture file to write (.h5)", required=True)
    _quiet_arg(ops)


def _add_calibrate(sub: Any) -> None:
    from ..calibration.exporters import EXPORTERS
    from ..calibration.types import CONVERSIONS

    cal = sub.add_parser(
        "calibrate",
        help="turn a diff into per-norm AQN sigma schedules (hwdiff, verl, QeRL)",
        description="For every RMSNorm: the local error the hardware introduces in the norm and in "
        "the sub-block it feeds (needs diff --local), converted to the sigma at the "
        "norm's weight that reproduces it; writes sigma.yaml (schema hwdiff/sigma/2) "
        "and optional exports. Definitions: docs/calibrate.md.",
    )
    cal.add_argument(
        "diff", type=DIFF_FILE, help="diff.h5 or diff JSON summary (hwdiff diff -o / --json)"
    )
    _output_arg(cal, "sigma file to write (default: %(default)s)", default="sigma.yaml")
    cal.add_argument(
        "--factor",
        type=float,
        default=100.0,
        help="sigma_start / sigma_end before the cap at QeRL's largest sigma_start (0.05 x rms of the "
        "norm weights) (default: %(default)s, QeRL's ratio)",
    )
    cal.add_argument(
        "--sigma-start",
        type=float,
        default=None,
        help="the global sigma_start itself instead of the rule (warned when above QeRL's range)",
    )
    cal.add_argument(
        "--stages",
        type=STAGES,
        default=10,
        help=f"number of stages K, at least {MIN_STAGES}: stage 0 is noise-free (default: %(default)s)",
    )
    cal.add_argument(
        "--schedule",
        default="qerl-code",
        choices=SCHEDULES,
        help="schedule shape (default: %(default)s, what the verl fork runs)",
    )
    cal.add_argument(
        "--conversion",
        default="measured",
        choices=CONVERSIONS,
        help="measured: the sub-block gain measured on float32 copies of the norm and its sub-block, "
        "run on the reference's recorded inputs; output-rms: sigma = error x rms(reference norm "
        "output), the gain assumed (off 0.5-4x on a real checkpoint) (default: %(default)s)",
    )
    cal.add_argument(
        "--verify",
        action="store_true",
        help="inject each norm's sigma_end alone (float32 copies of the norm and its sub-block on the "
        "reference's recorded inputs, draws until the standard error is below 2%%) and compare "
        "the error induced at its sub-block output with the error sigma_end is meant to reproduce",
    )
    cal.add_argument(
        "--policy-check",
        action="store_true",
        help="also inject every norm's sigma_end at once into the reference model (its dtype and "
        "kernels) on the reference capture's prompts (--policy-draws draws, hwdiff robustness at the "
        "token level) and set mean |dlogp|, K3 KL and top-1 agreement beside the hardware pair's "
        "(the diff's RL block), with the noise/hardware ratio and its 95%% bootstrap interval; "
        "needs both captures with log-probs; reported, never fails --strict",
    )
    cal.add_argument(
        "--policy-draws",
        type=DRAWS,
        default=4,
        help="noise draws of --policy-check (default: %(default)s)",
    )
    _sigma_arg(
        cal,
        help="take the sigma of this sigma file (e.g. hand-edited) instead of the calibrated ones: with "
        "--verify, checks them against this diff's measured errors",
    )
    cal.add_argument(
        "--strict",
        action="store_true",
        help="with --verify: exit 1 when a norm's induced/target ratio is outside 0.67-1.5",
    )
    needs_model = "for --conversion measured / --verify / --policy-check: "
    _model_arg(cal, purpose=f"model {needs_model}", default_help="the diff's reference model")
    _device_arg(cal, default="cpu", purpose=f"device {needs_model}")
    cal.add_argument(
        "--export",
        action="append",
        choices=tuple(EXPORTERS),
        default=None,
        help="also write SIGMA.verl.yaml (trainer.noise_injection block; prints Hydra ++ lines) or "
        "SIGMA.qerl.yaml (QeRL's schedule arguments and per-norm multipliers, for integrations/qerl's patch); "
        "refused, nothing written, when the consumer cannot give every norm its sigma",
    )
    _quiet_arg(cal)


def _add_aqn_check(sub: Any) -> None:
    chk = sub.add_parser(
        "aqn-check",
        help="show which norms AQN matches and how much of each sigma survives the dtype",
        description="Match the RMSNorms of --model as the injector does, and for every stage and norm "
        "report the effective sigma after the cast to --dtype and the fraction of weight "
        "elements that actually change; warns where the noise is rounded away.",
    )
    _model_arg(chk, required=True)
    _sigma_arg(chk, required=True)
    _dtype_arg(chk, purpose="dtype the weights live in during training: ")
    _trust_arg(chk)
    _quiet_arg(chk, progress=False)


def _add_report(sub: Any) -> None:
    rpt = sub.add_parser(
        "report",
        help="write an HTML report (figures, summary, sigma) of a diff",
        description="Write DIR/index.html (opens from disk, no network), DIR/report.md and "
        "DIR/figures/*.png: where the devices first diverge, the worst layers, error "
        "distributions, correlations, local vs propagated and golden attribution, and "
        "with --sigma the schedules, bf16 effectiveness and QeRL's default against the "
        "measured hardware error.",
    )
    rpt.add_argument(
        "diff",
        type=DIFF_FILE,
        help="diff.h5 from hwdiff diff -o (the JSON summary works, without histograms)",
    )
    _sigma_arg(rpt)
    rpt.add_argument(
        "--robustness",
        type=CARD_FILE,
        default=None,
        help="robustness card (JSON) from hwdiff robustness -o: adds its section",
    )
    _output_arg(rpt, "output folder (default: %(default)s)", default="report")
    _quiet_arg(rpt, progress=False)


def _add_robustness(sub: Any) -> None:
    rob = sub.add_parser(
        "robustness",
        help="a checkpoint under draws of the calibrated noise: token and answer effects",
        description="Draw the calibrated AQN noise of --sigma (each norm's sigma_end, law, depth "
        "correlation) --draws times and measure each noisy copy of --model against the "
        "clean one on the same prompts: mean |dlogp|, K3 KL and top-1 agreement on the "
        "prompts' own tokens; greedy continuations that change, where they split, and "
        "answers right/wrong (prompts with an 'answer'). --pair adds a measured device "
        "pair by the same statistics; --compare A B says whether checkpoint B is more or "
        "less robust than A (docs/robustness.md).",
    )
    _model_arg(rob)
    _sigma_arg(rob)
    rob.add_argument(
        "--draws", type=DRAWS, default=8, help="independent noise draws (default: %(default)s)"
    )
    _seed_arg(rob, "the noise draws", flag="--draw-seed")
    rob.add_argument(
        "--prompts",
        type=INPUTS_FILE,
        default=None,
        help="prompts (.jsonl with question/answer, .txt, .npy; default: the shipped math word problems)",
    )
    _sequence_args(rob, "prompts", limit=16, batch_size=16)
    rob.add_argument(
        "--max-new-tokens",
        type=NON_NEGATIVE,
        default=32,
        help="greedy continuation length; 0: token level only (default: %(default)s)",
    )
    rob.add_argument(
        "--pair",
        nargs=2,
        action="append",
        type=CAPTURE,
        metavar=("REF", "TGT"),
        help="a measured device pair over the same prompts: two captures (token level) or two "
        "generation files (sequence level); give --pair twice for both",
    )
    rob.add_argument(
        "--compare",
        nargs=2,
        type=CARD_FILE,
        metavar=("CARD_A", "CARD_B"),
        help="compare two cards (B against A)",
    )
    rob.add_argument(
        "--confidence",
        type=float,
        default=None,
        help="interval confidence (default: 0.95; with --compare the cards' own)",
    )
    _device_arg(rob)
    _dtype_arg(rob)
    _attn_arg(rob)
    _seed_arg(rob, "built-in model weights")
    _trust_arg(rob)
    _output_arg(rob, "card (or comparison) JSON to write")
    _quiet_arg(rob)


def _add_inspect(sub: Any) -> None:
    ins = sub.add_parser(
        "inspect",
        help="print a capture's metadata and module table",
        description="Print a capture's metadata and one row per module.",
    )
    ins.add_argument(
        "file", type=CAPTURE, help="capture file (.h5) or multi-rank capture directory"
    )
    ins.add_argument(
        "--allow-incomplete", action="store_true", help="show a capture whose run did not finish"
    )
    ins.add_argument(
        "--verify",
        action="store_true",
        help="read every dataset and check its checksum (captures and diff.h5); lists each damaged one",
    )
    _quiet_arg(ins, progress=False)
