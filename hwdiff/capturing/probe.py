"""The shared tail of the probes/ scripts: settings block + command-line overrides → one capture."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

from ..errors import HwdiffError

SETTING_KEYS = (
    "model",
    "device",
    "dtype",
    "attn_impl",
    "inputs",
    "limit",
    "max_tokens",
    "batch_size",
    "mode",
    "record_inputs",
    "seed",
    "compression",
    "output",
)


def run_probe(
    settings: dict[str, Any],
    set_flags: Callable[[], None],
    description: str,
    argv: list[str] | None = None,
) -> int:
    """Apply command-line overrides to ``settings``, call ``set_flags``, capture, print the path.

    ``set_flags`` sets the device's numerics flags (TF32, HF32, determinism) before the model loads;
    the capture records what is in force. Returns the exit code.
    """
    from ..common.outputs import install_signal_handlers
    from .models import load_model
    from .run import capture

    args = _parser(settings, description).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="hwdiff: %(message)s")
    install_signal_handlers()  # SIGTERM / SIGHUP clean up the temporary file like Ctrl-C
    try:
        set_flags()
        model = load_model(
            args.model,
            device=args.device,
            dtype=args.dtype,
            attn_implementation=args.attn_impl,
            seed=args.seed,
        )
        result = capture(
            model,
            args.output,
            inputs=args.inputs,
            mode=args.mode,
            record_inputs=args.record_inputs,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            limit=args.limit,
            seed=args.seed,
            compression=args.compression,
        )
    except HwdiffError as exc:
        print(f"hwdiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(
            f"hwdiff: error: interrupted ({exc or 'SIGINT'}); no partial output was kept",
            file=sys.stderr,
        )
        return 128 + getattr(exc, "signum", 2)
    print(result)
    print(
        f"capture file: {result.path.resolve()}  (copy it to the machine where you run `hwdiff diff`)"
    )
    return 0


def _parser(settings: dict[str, Any], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    for key in SETTING_KEYS:
        default = settings.get(key)
        flag = "--" + key.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = int if key in ("limit", "max_tokens", "batch_size", "seed") else str
            parser.add_argument(flag, type=kind, default=default, help=f"(default: {default})")
    return parser
