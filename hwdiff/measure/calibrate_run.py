"""Calibrate as one library call: the steps of ``hwdiff calibrate`` above the pure σ math.

:func:`hwdiff.calibration.calibrate` turns a diff and measured gains into a
:class:`~hwdiff.calibration.types.Calibration`; it touches no model. This module runs what needs the
live model around it, in the command's order: the sub-block gains of the norms calibration asks for
(:class:`~hwdiff.calibration.GainRequest`, :func:`~hwdiff.measure.sigma_probe.measure_gains`), the σ math,
an optional σ override from a sigma file, the per-norm verify and the policy-level check.
:func:`write` then writes sigma.yaml and its exports, all or nothing. ``hwdiff.calibrate`` is
:func:`calibrate`; the ``hwdiff calibrate`` command is these two calls and their printout.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from .. import calibration
from ..calibration.exporters import check_export, export
from ..calibration.sigmafile import load_sigma, save_sigma
from ..calibration.types import Calibration
from ..errors import HwdiffError
from .policy_check import DRAWS
from .policy_check import policy_check as check_policy
from .sigma_probe import measure_gains
from .sigma_probe import verify as verify_sigma


def calibrate(
    diff: Any,
    *,
    model: Any = None,
    factor: float = 100.0,
    num_stages: int = 10,
    kind: str = "qerl-code",
    sigma_start: float | None = None,
    weights: Any = None,
    weight_dtype: str | None = None,
    conversion: str | None = None,
    progress: bool = False,
    verify: bool = False,
    policy_check: bool = False,
    policy_draws: int = DRAWS,
    sigma: str | os.PathLike | Calibration | None = None,
) -> Calibration:
    """Per-norm σ schedules from a diff with local errors (a DiffResult, a diff.h5 or a diff JSON),
    with the model's measurements that ``hwdiff calibrate`` makes; writes nothing.

    ``model`` (the reference's model, e.g. :func:`hwdiff.measure.sigma_probe.reference_model`): the sub-block
    gains are measured on a float32 copy of it (conversion ``measured``, the default with a model;
    ``conversion="output-rms"`` assumes them, the model then serves ``verify`` / ``policy_check``
    only). ``sigma``: a sigma file (or a Calibration) whose σ and schedule replace the calibrated
    ones, norm by norm (:func:`hwdiff.calibration.with_sigmas`) — to verify them against this diff.
    ``verify``: each norm's σ_end injected alone (:func:`hwdiff.measure.sigma_probe.verify`); ``policy_check``:
    all at once against the hardware pair, ``policy_draws`` draws
    (:func:`hwdiff.measure.policy_check.policy_check`). The other arguments are those of
    :func:`hwdiff.calibration.calibrate`. Raises :class:`HwdiffError` where those do, or when a step
    needs the model and none is given.
    """
    conversion = conversion or ("measured" if model is not None else "output-rms")
    if conversion not in calibration.CONVERSIONS:
        raise HwdiffError(
            f"conversion must be one of {', '.join(calibration.CONVERSIONS)}, got {conversion!r}"
        )
    needs = [
        name
        for name, wanted in (
            ("conversion measured", conversion == "measured"),
            ("verify", verify),
            ("policy_check", policy_check),
        )
        if wanted
    ]
    if needs and model is None:
        raise HwdiffError(
            f"{' and '.join(needs)} {'needs' if len(needs) == 1 else 'need'} the model: pass model= "
            "(the reference's: hwdiff.measure.sigma_probe.reference_model(diff))"
        )

    def probe(
        request: calibration.GainRequest,
    ) -> dict[str, float]:  # the norms calibrate asks for, once it read the diff
        return measure_gains(
            model, list(request.norms), reference=request.reference, progress=progress
        )

    result = calibration.calibrate(
        diff,
        factor=factor,
        num_stages=num_stages,
        kind=kind,
        gains=probe if conversion == "measured" else None,
        sigma_start=sigma_start,
        weights=weights,
        weight_dtype=weight_dtype,
    )
    if sigma is not None:
        result = calibration.with_sigmas(
            result, sigma if isinstance(sigma, Calibration) else load_sigma(sigma)
        )
    if verify:
        result = replace(result, verify=verify_sigma(result, model, progress=progress))
    if policy_check:
        result = replace(
            result, policy=check_policy(result, model, diff, draws=policy_draws, progress=progress)
        )
    return result


def export_paths(output: str | os.PathLike, targets: Iterable[str]) -> dict[str, Path]:
    """Where :func:`write` puts each export beside the sigma file: ``sigma.<target>.yaml``."""
    return {target: Path(output).with_suffix(f".{target}.yaml") for target in targets}


def write(
    calibration: Calibration, output: str | os.PathLike, *, exports: Iterable[str] = ()
) -> list[Path]:
    """Write ``output`` (sigma.yaml) and each export of ``exports`` (``verl``, ``qerl``) beside it
    (:func:`export_paths`); the written paths, sigma file first. Every export is checked first: a
    refused one raises :class:`HwdiffError` and nothing is written, the sigma file included."""
    paths = export_paths(output, exports)
    for target in paths:
        check_export(calibration, target)
    written = [save_sigma(calibration, output)]
    for target, path in paths.items():
        written.append(export(calibration, target, path))
    return written
