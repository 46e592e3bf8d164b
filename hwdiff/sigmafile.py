"""Reading and writing sigma files (``hwdiff/sigma/2``; ``hwdiff/sigma/1`` of hwdiff 0.1 is read too)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .calibration import READABLE_SCHEMAS, Calibration, LayerSigma, StageRounding, VerifyResult
from .errors import HwdiffError
from .policy_check import PolicyCheck
from .schedule import SigmaSchedule


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as YAML at ``path``, written by the output rule of :mod:`hwdiff.outputs`."""
    import yaml

    from .outputs import write_text

    return write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def read_sigma(path: Path) -> Calibration:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise HwdiffError(f"{path} is not a sigma file (not text: a binary file such as a capture?)") from None
    except OSError as exc:
        raise HwdiffError(f"cannot read sigma file {path}: {exc}") from exc
    except yaml.YAMLError as exc:  # its message spans lines (context, caret): one line with the position
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise HwdiffError(f"cannot read sigma file {path}: not valid YAML ({problem}{where})") from exc
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema not in READABLE_SCHEMAS:
        raise HwdiffError(f"{path} is not a sigma file of schema {' or '.join(READABLE_SCHEMAS)} (schema {schema!r})")
    try:
        return _calibration(data, schema)
    except (KeyError, TypeError, ValueError, HwdiffError) as exc:
        raise HwdiffError(f"{path}: malformed sigma file ({exc})") from exc


def _calibration(data: dict, schema: str) -> Calibration:
    sched = data["schedule"]
    schedule = SigmaSchedule(float(sched["sigma_start"]), float(sched["sigma_end"]), int(sched["num_stages"]),
                             sched.get("kind", "qerl-code"))
    layers = tuple(_layer(name, entry) for name, entry in data["layers"].items())
    conversion = data.get("conversion", "output-rms")
    if schema == "hwdiff/sigma/1":  # hwdiff 0.1: sigma = eps * rms(w) ("rms"), verify at the norm itself
        conversion = {"rms": "output-rms"}.get(conversion, conversion)
        return Calibration(layers, schedule, data.get("method", "local"), conversion,
                           f"factor {sched.get('factor', 100.0)} (hwdiff 0.1)", data.get("provenance", {}))
    rounding = data.get("rounding") or {}
    return Calibration(
        layers, schedule, data.get("method", "local"), conversion, sched.get("start_rule", ""),
        data.get("provenance", {}), dict(data.get("skipped") or {}),
        tuple(StageRounding(int(r["stage"]), float(r["sigma"]), float(r["min_changed"]), float(r["median_changed"]),
                            r["weakest"]) for r in rounding.get("stages", [])),
        rounding.get("dtype"), VerifyResult.from_dict(data["verify"]) if data.get("verify") else None,
        tuple(data.get("warnings") or ()), float((data.get("correlation") or {}).get("rho", 0.0)),
        (data.get("correlation") or {}).get("note", ""), dict(data.get("zero_sigma") or {}),
        dict((data.get("unattributed") or {}).get("sub_blocks") or {}),
        float((data.get("unattributed") or {}).get("fraction_of_total") or 0.0), tuple(data.get("unreproduced") or ()),
        data.get("roles_from", ""), PolicyCheck.from_dict(data["policy_check"]) if data.get("policy_check") else None)


def _layer(name: str, entry: dict) -> LayerSigma:
    values = {key: float(entry[key]) for key in ("sigma_start", "sigma_end", "multiplier")}
    if min(values.values()) < 0 or not all(map(math.isfinite, values.values())):
        raise ValueError(f"negative or non-finite value for {name}")
    weight_rms = float(entry.get("weight_rms", 1.0))
    # schema 1 stored no output rms; its sigma was eps * rms(w), so rms(w) stands in for it there
    output_rms = float(entry.get("output_rms", weight_rms))
    gain = entry.get("gain_block")
    return LayerSigma(name=name, layer_index=entry.get("layer_index"), sub_block=entry.get("sub_block"),
                      norm_error=float(entry.get("norm_error", entry.get("measured_error", 0.0))),
                      block_error=float(entry.get("block_error", 0.0)), output_rms=output_rms, weight_rms=weight_rms,
                      gain_block=None if gain is None else float(gain), law=entry.get("law", "gaussian"),
                      df=None if entry.get("df") is None else float(entry["df"]), law_why=entry.get("law_why", ""),
                      role=entry.get("role", ""), accounts_for=entry.get("accounts_for"),
                      normalised_rms=float(entry.get("normalised_rms", 1.0)), **values)
