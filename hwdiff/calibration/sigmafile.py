"""The sigma file, read and written in one place (``hwdiff/sigma/2``; ``hwdiff/sigma/1`` of hwdiff 0.1 is read too).

:func:`save_sigma` writes a :class:`~hwdiff.calibration.types.Calibration` as ``sigma.yaml``
(:func:`to_dict`), :func:`load_sigma` reads one back; both on the types alone, not on calibrate's
math, so the injector reads sigma files without importing it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import HwdiffError
from .schedule import SigmaSchedule
from .types import (
    CONVERSION_NOTES,
    METHOD_NOTE,
    QERL_PRESETS,
    READABLE_SCHEMAS,
    SCHEMA,
    UNATTRIBUTED_NOTE,
    Calibration,
    LayerSigma,
    PolicyCheck,
    StageRounding,
    VerifyResult,
)


def save_sigma(calibration: Calibration, path: str | os.PathLike) -> Path:
    """Write ``sigma.yaml`` (schema ``hwdiff/sigma/2``) atomically."""
    return write_yaml(Path(path), to_dict(calibration))


def load_sigma(path: str | os.PathLike) -> Calibration:
    """Read a ``sigma.yaml`` (schema 2, or 1 of hwdiff 0.1); refuses other schemas and out-of-range values."""
    return read_sigma(Path(path))


save = save_sigma


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as YAML at ``path``, written by the output rule of :mod:`hwdiff.common.outputs`."""
    import yaml

    from ..common.outputs import write_text

    return write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def to_dict(calibration: Calibration) -> dict[str, Any]:
    """The sigma file's content (schema ``hwdiff/sigma/2``), in the order it is written."""
    c, s = calibration, calibration.schedule
    return {
        "schema": SCHEMA,
        "hwdiff_version": __version__,
        "method": c.method,
        "method_note": METHOD_NOTE,
        "conversion": c.conversion,
        "conversion_note": CONVERSION_NOTES[c.conversion],
        "schedule": {
            "kind": s.kind,
            "sigma_start": s.sigma_start,
            "sigma_end": s.sigma_end,
            "num_stages": s.num_stages,
            "factor": c.factor,
            "start_rule": c.start_rule,
            "values": list(s.values),
        },
        "qerl_presets": {
            name: {"sigma_start": a, "sigma_end": b} for name, (a, b) in QERL_PRESETS.items()
        },
        "layers": {layer.name: _layer_dict(layer) for layer in c.layers},
        "skipped": dict(c.skipped),
        "zero_sigma": dict(c.zero_sigma),
        "roles_from": c.roles_from,
        "unattributed": {
            "sub_blocks": dict(c.unattributed),
            "fraction_of_total": c.unattributed_fraction,
            "note": UNATTRIBUTED_NOTE,
        },
        "unreproduced": list(c.unreproduced),
        "correlation": {"kind": "ar1-depth", "rho": c.rho, "note": c.correlation_note},
        "rounding": None
        if c.rounding_dtype is None
        else {
            "dtype": c.rounding_dtype,
            "stages": [
                {
                    "stage": r.stage,
                    "sigma": r.sigma,
                    "min_changed": r.min_changed,
                    "median_changed": r.median_changed,
                    "weakest": r.weakest,
                }
                for r in c.rounding
            ],
        },
        "warnings": list(c.warnings),
        "provenance": c.provenance,
        **({"verify": c.verify.to_dict()} if c.verify is not None else {}),
        **({"policy_check": c.policy.to_dict()} if c.policy is not None else {}),
    }


def _layer_dict(layer: LayerSigma) -> dict[str, Any]:
    out = {
        "layer_index": layer.layer_index,
        "sub_block": layer.sub_block,
        "norm_error": layer.norm_error,
        "block_error": layer.block_error,
        "target_error": layer.target_error,
        "output_rms": layer.output_rms,
        "weight_rms": layer.weight_rms,
        "sigma_start": layer.sigma_start,
        "sigma_end": layer.sigma_end,
        "multiplier": layer.multiplier,
    }
    if layer.gain_block is not None:
        out["gain_block"] = layer.gain_block
    if layer.role:
        out.update(role=layer.role, accounts_for=layer.accounts_for)
    if layer.normalised_rms != 1.0:
        out["normalised_rms"] = layer.normalised_rms
    out.update(law=layer.law, df=layer.df, law_why=layer.law_why)
    return out


def read_sigma(path: Path) -> Calibration:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise HwdiffError(
            f"{path} is not a sigma file (not text: a binary file such as a capture?)"
        ) from None
    except OSError as exc:
        raise HwdiffError(f"cannot read sigma file {path}: {exc}") from exc
    except (
        yaml.YAMLError
    ) as exc:  # its message spans lines (context, caret): one line with the position
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise HwdiffError(
            f"cannot read sigma file {path}: not valid YAML ({problem}{where})"
        ) from exc
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema not in READABLE_SCHEMAS:
        raise HwdiffError(
            f"{path} is not a sigma file of schema {' or '.join(READABLE_SCHEMAS)} (schema {schema!r})"
        )
    try:
        return _calibration(data, schema)
    except (KeyError, TypeError, ValueError, HwdiffError) as exc:
        raise HwdiffError(f"{path}: malformed sigma file ({exc})") from exc


def _calibration(data: dict, schema: str) -> Calibration:
    sched = data["schedule"]
    schedule = SigmaSchedule(
        float(sched["sigma_start"]),
        float(sched["sigma_end"]),
        int(sched["num_stages"]),
        sched.get("kind", "qerl-code"),
    )
    layers = tuple(_layer(name, entry) for name, entry in data["layers"].items())
    conversion = data.get("conversion", "output-rms")
    if (
        schema == "hwdiff/sigma/1"
    ):  # hwdiff 0.1: sigma = eps * rms(w) ("rms"), verify at the norm itself
        conversion = {"rms": "output-rms"}.get(conversion, conversion)
        return Calibration(
            layers,
            schedule,
            data.get("method", "local"),
            conversion,
            f"factor {sched.get('factor', 100.0)} (hwdiff 0.1)",
            data.get("provenance", {}),
        )
    rounding = data.get("rounding") or {}
    return Calibration(
        layers,
        schedule,
        data.get("method", "local"),
        conversion,
        sched.get("start_rule", ""),
        data.get("provenance", {}),
        dict(data.get("skipped") or {}),
        tuple(
            StageRounding(
                int(r["stage"]),
                float(r["sigma"]),
                float(r["min_changed"]),
                float(r["median_changed"]),
                r["weakest"],
            )
            for r in rounding.get("stages", [])
        ),
        rounding.get("dtype"),
        VerifyResult.from_dict(data["verify"]) if data.get("verify") else None,
        tuple(data.get("warnings") or ()),
        float((data.get("correlation") or {}).get("rho", 0.0)),
        (data.get("correlation") or {}).get("note", ""),
        dict(data.get("zero_sigma") or {}),
        dict((data.get("unattributed") or {}).get("sub_blocks") or {}),
        float((data.get("unattributed") or {}).get("fraction_of_total") or 0.0),
        tuple(data.get("unreproduced") or ()),
        data.get("roles_from", ""),
        PolicyCheck.from_dict(data["policy_check"]) if data.get("policy_check") else None,
    )


def _layer(name: str, entry: dict) -> LayerSigma:
    values = {key: float(entry[key]) for key in ("sigma_start", "sigma_end", "multiplier")}
    if min(values.values()) < 0 or not all(map(math.isfinite, values.values())):
        raise ValueError(f"negative or non-finite value for {name}")
    weight_rms = float(entry.get("weight_rms", 1.0))
    # schema 1 stored no output rms; its sigma was eps * rms(w), so rms(w) stands in for it there
    output_rms = float(entry.get("output_rms", weight_rms))
    gain = entry.get("gain_block")
    return LayerSigma(
        name=name,
        layer_index=entry.get("layer_index"),
        sub_block=entry.get("sub_block"),
        norm_error=float(entry.get("norm_error", entry.get("measured_error", 0.0))),
        block_error=float(entry.get("block_error", 0.0)),
        output_rms=output_rms,
        weight_rms=weight_rms,
        gain_block=None if gain is None else float(gain),
        law=entry.get("law", "gaussian"),
        df=None if entry.get("df") is None else float(entry["df"]),
        law_why=entry.get("law_why", ""),
        role=entry.get("role", ""),
        accounts_for=entry.get("accounts_for"),
        normalised_rms=float(entry.get("normalised_rms", 1.0)),
        **values,
    )
