"""Writing a :class:`DiffResult`: JSON summary, CSV table, diff.h5, and the terminal table.

Every file is written under a temporary name and renamed when complete (:mod:`hwdiff.common.outputs`);
every dataset of diff.h5 carries a checksum, as in captures.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..common import outputs
from ..common.numbers import json_number as _num
from ..store.h5 import create_checked
from .metrics import ulp_edges
from .results import DiffResult, LayerDiff
from .rl import csv_rows, format_rl, rl_summary
from .verdict import Verdict

SUMMARY_SCHEMA = "hwdiff/diff-summary/1"
DIFF_SCHEMA = "hwdiff/diff/1"


def layer_summary(layer: LayerDiff) -> dict[str, Any]:
    m = layer.metrics
    out: dict[str, Any] = {
        "name": layer.name,
        "call": layer.call,
        "slot": layer.slot,
        "kind": layer.kind,
        "shape": list(layer.shape),
        "numel": m.numel,
        "ref_dtype": layer.ref_dtype,
        "target_dtype": layer.target_dtype,
        "exact": layer.exact,
        "equal_frac": m.equal_frac,
        "rel_l2": _num(m.rel_l2),
        "sqnr_db": _num(m.sqnr_db),
        "cosine": m.cosine,
        "one_minus_cos": m.one_minus_cos,
        "rmse": m.rmse,
        "max_abs": m.max_abs,
        "mean_abs": m.mean_abs,
        "bias": m.bias,
        "err_std": m.err_std,
        "ref_rms": _num(m.ref_rms),
        "max_at": None if m.max_at is None else list(m.max_at),
        "ulp": {
            "dtype": layer.verdict.coarse_dtype,
            "p50": m.ulp.p50,
            "p99": _num(m.ulp.p99),
            "max": _num(m.ulp.max),
            "le1_frac": m.ulp.le1_frac,
        },
        "thousandth_frac": m.thousandth_frac,
        "five_thousandth_frac": m.five_thousandth_frac,
        "nan_inf": {
            "ref_nan": m.nan_inf.ref_nan,
            "ref_inf": m.nan_inf.ref_inf,
            "target_nan": m.nan_inf.target_nan,
            "target_inf": m.nan_inf.target_inf,
        },
        "beyond_rounding_frac": layer.beyond_rounding_frac,
        "diverges": layer.diverges,
        "alias_of": layer.alias_of,
        "verdict": verdict_summary(layer.verdict),
        "fit": _clean(layer.fit.to_dict()),
    }
    if layer.ulp_fine is not None:
        fine = layer.ulp_fine
        finer = (
            layer.ref_dtype
            if layer.verdict.coarse_dtype == layer.target_dtype
            else layer.target_dtype
        )
        out["ulp_fine"] = {
            "dtype": finer,
            "p50": fine.p50,
            "p99": _num(fine.p99),
            "max": _num(fine.max),
            "le1_frac": fine.le1_frac,
            "from": "fit sample",
        }
    if layer.weight_rms is not None:
        out["weight_rms"] = layer.weight_rms
    if layer.local is not None:
        out.update(
            local_rel_l2=layer.local.local_rel_l2,
            propagated_rel_l2=layer.local.propagated_rel_l2,
            input_rel_l2=_num(layer.local.input_rel_l2),
            amplification=_num(layer.local.amplification),
        )
        if layer.local.verdict is not None:
            out.update(
                local_diverges=layer.local.verdict.diverges,
                local_verdict=verdict_summary(layer.local.verdict),
            )
    if layer.golden is not None:
        out["golden"] = {
            "reference_rel_l2": layer.golden.reference_rel_l2,
            "target_rel_l2": layer.golden.target_rel_l2,
            "ratio": _num(layer.golden.ratio),
        }
    return out


def verdict_summary(verdict: Verdict) -> dict[str, Any]:
    """A :class:`Verdict` as JSON (see :mod:`.verdict`)."""
    outlier = verdict.outlier
    return _clean(
        {
            "rule": verdict.rule,
            "coarse_dtype": verdict.coarse_dtype,
            "beyond_ulp_frac": verdict.beyond_ulp_frac,
            "rounding_rel": verdict.rounding_rel,
            "roundings": verdict.roundings,
            "budget": verdict.budget,
            "bias_z": verdict.bias_z,
            "bias_effect": verdict.bias_effect,
            "bias_outward": verdict.bias_outward,
            "reasons": list(verdict.reasons),
            "why": verdict.describe(),
            "outlier": None
            if outlier is None
            else {
                "position": list(outlier.position),
                "error": outlier.error,
                "reference": outlier.reference,
                "target": outlier.target,
                "ratio": outlier.ratio,
            },
        }
    )


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    return _num(value) if isinstance(value, float) else value


def summary(result: DiffResult) -> dict[str, Any]:
    """The JSON summary (schema ``hwdiff/diff-summary/1``)."""
    corr = result.correlation
    first = result.first_divergence
    difference = result.first_difference
    return {
        "schema": SUMMARY_SCHEMA,
        "hwdiff_version": result.hwdiff_version,
        "reference": result.reference,
        "target": result.target,
        "golden": result.golden,
        "local": result.local,
        "exact": result.exact,
        "modules": [layer_summary(layer) for layer in result.layers],
        "unmatched": [
            {"name": u.name, "call": u.call, "slot": u.slot, "reason": u.reason}
            for u in result.unmatched
        ],
        "routing": [
            {
                "name": r.name,
                "call": r.call,
                "tokens": r.tokens,
                "changed": [
                    {
                        "sequence": t.sequence,
                        "position": t.position,
                        "reference": list(t.reference),
                        "target": list(t.target),
                    }
                    for t in r.changed
                ],
            }
            for r in result.routing
        ],
        "correlation": None
        if corr is None
        else {
            "names": list(corr.names),
            "exact": list(corr.exact),
            "accumulated": _matrix(corr.accumulated),
            "increments": _matrix(corr.increments),
        },
        "growth": None
        if result.growth is None
        else {
            "names": list(result.growth.names),
            "rel_l2": [_num(v) for v in result.growth.rel_l2],
            "factor_per_layer": _num(result.growth.factor_per_layer),
        },
        "first_divergence": None
        if first is None
        else {
            "name": first.name,
            "call": first.call,
            "detected_at": first.detected_at,
            "origin": first.origin,
            "beyond_rounding_frac": first.beyond_rounding_frac,
            "rel_l2": _num(first.rel_l2),
            "rule": first.rule,
            "basis": first.basis,
            "reasons": first.reasons,
        },
        "first_difference": None
        if difference is None
        else {
            "name": difference.name,
            "call": difference.call,
            "rel_l2": _num(difference.rel_l2),
            "equal_frac": difference.equal_frac,
            "numel": difference.numel,
        },
        "divergence_rule": result.divergence_rule,
        "rl_impact": rl_summary(result.rl_impact, result.rl_absent),
    }


def _matrix(matrix: np.ndarray) -> list[list[float | None]]:
    return [[_num(float(v)) for v in row] for row in matrix]


CSV_COLUMNS = (
    "name",
    "call",
    "slot",
    "kind",
    "shape",
    "numel",
    "exact",
    "equal_frac",
    "rel_l2",
    "sqnr_db",
    "cosine",
    "one_minus_cos",
    "rmse",
    "max_abs",
    "mean_abs",
    "bias",
    "err_std",
    "ulp_dtype",
    "ulp_p50",
    "ulp_p99",
    "ulp_max",
    "ulp_le1_frac",
    "thousandth_frac",
    "five_thousandth_frac",
    "ref_nan",
    "ref_inf",
    "target_nan",
    "target_inf",
    "beyond_rounding_frac",
    "roundings",
    "budget",
    "diverges",
    "reasons",
    "outlier_position",
    "fit_best",
    "fit_law",
    "gaussian_mu",
    "gaussian_sigma",
    "gaussian_ks_stat",
    "gaussian_ks_p",
    "student_t_df",
    "student_t_loc",
    "student_t_scale",
    "laplace_loc",
    "laplace_scale",
    "relative_best",
    "relative_gaussian_sigma",
    "local_rel_l2",
    "propagated_rel_l2",
    "input_rel_l2",
    "amplification",
    "golden_reference_rel_l2",
    "golden_target_rel_l2",
    "golden_ratio",
)


def _csv_rows(result: DiffResult) -> Iterator[dict[str, Any]]:
    for layer in result.layers:
        flat = layer_summary(layer)
        row = {key: flat[key] for key in CSV_COLUMNS if key in flat}
        row["shape"] = "x".join(map(str, layer.shape))
        row.update({f"ulp_{k}": v for k, v in flat["ulp"].items()})
        row.update(flat["nan_inf"])
        verdict = flat["verdict"]
        row.update(
            roundings=verdict["roundings"],
            budget=verdict["budget"],
            reasons=" ".join(verdict["reasons"]),
            outlier_position="x".join(map(str, verdict["outlier"]["position"]))
            if verdict["outlier"]
            else "",
        )
        row["fit_best"] = flat["fit"]["best"]
        row["fit_law"] = flat["fit"].get("law", "")
        relative = flat["fit"].get("relative", {})
        row["relative_best"] = relative.get("best", "")
        row["relative_gaussian_sigma"] = relative.get("gaussian", {}).get("sigma", "")
        for model, keys in (
            ("gaussian", ("mu", "sigma", "ks_stat", "ks_p")),
            ("student_t", ("df", "loc", "scale")),
            ("laplace", ("loc", "scale")),
        ):
            for key in keys:
                row[f"{model}_{key}"] = flat["fit"].get(model, {}).get(key, "")
        for key, value in flat.get("golden", {}).items():
            row[f"golden_{key}"] = value
        yield row


def write_outputs(
    result: DiffResult, *, out: Any = None, json_path: Any = None, csv_path: Any = None
) -> None:
    if json_path is not None:
        outputs.write_text(json_path, json.dumps(summary(result), indent=1))
    if csv_path is not None:
        with outputs.atomic_output(csv_path) as temp:
            _write_csv(result, temp)
        with outputs.atomic_output(rl_csv_path(csv_path)) as temp:
            _write_rl_csv(result, temp)
    if out is not None:
        with outputs.atomic_output(out) as temp:
            _write_h5(result, temp)


def _write_csv(result: DiffResult, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(_csv_rows(result))


def rl_csv_path(csv_path: Any) -> Path:
    """Where the RL block's CSV goes beside the per-module CSV: ``table.csv`` → ``table.rl.csv``."""
    path = Path(csv_path)
    return path.with_name(f"{path.stem}.rl{path.suffix or '.csv'}")


def _write_rl_csv(result: DiffResult, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=("metric", "value", "note"))
        writer.writeheader()
        writer.writerows(csv_rows(rl_summary(result.rl_impact, result.rl_absent)))


def _write_h5(result: DiffResult, path: Path) -> None:
    handle = outputs.open_h5(path)
    try:
        handle.attrs.update(schema=DIFF_SCHEMA, summary=json.dumps(summary(result)), complete=False)
        create_checked(handle, "ulp_edges", data=ulp_edges())
        for key, arrays in result.arrays.items():
            group = handle.require_group(f"layers/{key}")
            for name, array in arrays.items():
                create_checked(group, name, data=array)
        if result.correlation is not None:
            group = handle.create_group("correlation")
            group.attrs["names"] = json.dumps(list(result.correlation.names))
            create_checked(group, "accumulated", data=result.correlation.accumulated)
            create_checked(group, "increments", data=result.correlation.increments)
        _write_token_correlation(result, handle)
        handle.attrs["complete"] = True
        handle.close()
    except BaseException:
        outputs.discard_h5(handle, path)  # never let HDF5 write again into a file that failed
        raise


def _write_token_correlation(result: DiffResult, handle: Any) -> None:
    from .correlation import token_correlation

    names, norms = [], []
    for key, arrays in result.arrays.items():
        if key.endswith("/output") and arrays["token_norms"].size:
            names.append(key)
            norms.append(arrays["token_norms"].astype(np.float64))
    if len({n.size for n in norms}) == 1 and len(norms) >= 2:
        group = handle.create_group("token_correlation")
        group.attrs["names"] = json.dumps(names)
        create_checked(group, "matrix", data=token_correlation(names, norms))


def format_table(result: DiffResult, top: int = 25) -> str:
    """The terminal report: what was compared, the first divergence, and the worst modules first."""
    ref, tgt = result.reference, result.target
    lines = [
        f"reference  {ref['path']}  ({ref.get('device')}, {ref.get('dtype')}, {ref.get('attn_implementation')})",
        f"target     {tgt['path']}  ({tgt.get('device')}, {tgt.get('dtype')}, {tgt.get('attn_implementation')})",
    ]
    if result.golden:
        lines.append(
            f"golden     {result.golden['path']}  ({result.golden.get('device')}, {result.golden.get('dtype')})"
        )
    outputs = result.outputs
    exact = sum(layer.exact for layer in outputs)
    lines.append(
        f"compared   {len(outputs)} module outputs ({exact} bit-identical), "
        f"{len(result.layers) - len(outputs)} inputs, {len(result.unmatched)} unmatched"
    )
    lines.append(
        f"first difference  {result.first_difference or 'none: every module output is bit-identical'}"
        + ("  (the first non-identical module output)" if result.first_difference else "")
    )
    first = result.first_divergence
    if first is None:
        local = any(layer.local is not None for layer in result.outputs)
        lines.append(
            "first divergence  none: every "
            + ("local error" if local else "module output")
            + " within what rounding explains"
        )
    else:
        lines.append(f"first divergence  {first}")
        lines.append(
            "                  "
            + (
                "(the origin: its own local error is beyond rounding)"
                if first.basis == "local"
                else "(the first module beyond rounding; without --local it may carry "
                "error propagated from the first difference)"
            )
        )
    if result.growth and not math.isnan(result.growth.factor_per_layer):
        lines.append(
            f"growth     x{result.growth.factor_per_layer:.3g} per decoder layer "
            f"(rel L2 {result.growth.rel_l2[0]:.3g} -> {result.growth.rel_l2[-1]:.3g})"
        )
    warning = nonfinite_warning(result)
    if warning:
        lines.append(f"WARNING    {warning}")
    lines += format_rl(result.rl_impact, result.rl_absent)
    lines += ["", *_table(result, top)]
    for routing in result.routing:
        lines.append(f"routing    {routing}")
    for item in result.unmatched[:10]:
        lines.append(f"unmatched  {item.name}/{item.call}/{item.slot}: {item.reason}")
    return "\n".join(lines)


def nonfinite_warning(result: DiffResult) -> str | None:
    """One line on NaN/Inf in the compared outputs (None when there are none)."""
    found = result.nonfinite
    if not found:
        return None
    n = found[0].metrics.nan_inf
    return (
        f"NaN/Inf in {len(found)} module output(s), first in forward order {found[0].name} (reference "
        f"{n.ref_nan} NaN {n.ref_inf} Inf, target {n.target_nan} NaN {n.target_inf} Inf); those elements are "
        "left out of every metric"
    )


def _table(result: DiffResult, top: int) -> list[str]:
    dtypes = {layer.verdict.coarse_dtype for layer in result.outputs}
    header = [
        "module",
        "kind",
        "rel_l2",
        "1-cos",
        "equal",
        f"ulp p99 ({'/'.join(sorted(dtypes)) or '-'})",
        "max_abs",
        "fit (law)",
    ]
    has_nonfinite = bool(result.nonfinite)
    if has_nonfinite:
        header.append("NaN+Inf ref/tgt")
    has_local = any(layer.local is not None for layer in result.outputs)
    if has_local:
        header += ["local", "amplif."]
    if result.golden:
        header.append("tgt/ref vs golden")
    rows = [header]
    # A module whose output is its child's very tensor (self_attn = o_proj's output) is stored once. Its
    # output numbers are the child's, but its local error (its own replay: the attention core) is its
    # own: with --local it has a row of its own; without, the child's row names it.
    shown = [layer for layer in result.worst() if has_local or not layer.alias_of][:top]
    also = _aliases(result.outputs) if not has_local else {}
    for layer in shown:
        m = layer.metrics
        row = [
            _label(layer, also),
            layer.kind,
            f"{m.rel_l2:.3g}",
            f"{m.one_minus_cos:.2g}",
            f"{m.equal_frac:.1%}",
            f"{m.ulp.p99:.3g}",
            f"{m.max_abs:.3g}",
            "exact" if layer.exact else layer.fit.summary + (" !" if layer.diverges else ""),
        ]
        if has_nonfinite:
            n = m.nan_inf
            row.append(f"{n.ref_nan + n.ref_inf}/{n.target_nan + n.target_inf}")
        if has_local:
            row += (
                [f"{layer.local.local_rel_l2:.3g}", f"{layer.local.amplification:.3g}"]
                if layer.local
                else ["-", "-"]
            )
        if result.golden:
            row.append(f"{layer.golden.ratio:.3g}" if layer.golden else "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _aliases(layers: Any) -> dict[tuple[str, int], list[str]]:
    """``(name, call)`` of a stored output → the modules whose output is that same tensor."""
    found: dict[tuple[str, int], list[str]] = {}
    for layer in layers:
        if layer.alias_of:
            name, call, _ = layer.alias_of.rsplit("/", 2)
            found.setdefault((name, int(call)), []).append(layer.name)
    return found


def _label(layer: LayerDiff, also: dict[tuple[str, int], list[str]]) -> str:
    """The table's module cell: ``name#call``, ``(= child output)`` for a module stored as a link to its
    child's output, ``(= parent output too)`` for the child when the parent has no row of its own."""
    label = layer.name + (f"#{layer.call}" if layer.call else "")
    if layer.alias_of:
        target = layer.alias_of.rsplit("/", 2)[0]
        short = target[len(layer.name) :] if target.startswith(layer.name + ".") else target
        return f"{label} (output = {short})"
    parents = also.get((layer.name, layer.call), [])
    if parents:
        label += (
            " (= "
            + ", ".join(
                p.rsplit(".", 1)[-1] if layer.name.startswith(p + ".") else p for p in parents
            )
            + ")"
        )
    return label
