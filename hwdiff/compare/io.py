"""Reading a diff back: :func:`load_diff`, the only reader of diff files (diff.h5 and the JSON summary).

The summary (schema ``hwdiff/diff-summary/1``, written by :func:`.output.summary`) is turned back into
the typed :class:`DiffResult` it was written from, every nested type rebuilt; what the summary derives
(``exact``, ``why``, ``ratio``, ``propagated_rel_l2``, ``amplification``, ``factor_per_layer``, the RL
block's ``delta`` and ``published``, ``divergence_rule`` …) is not read: the properties compute it again,
so ``summary(load_diff(path))`` is the file's summary.

JSON has no NaN nor ±inf: the writer stores a non-finite float as null. Each comes back as what it
meant where the field allows only one reading, else as NaN:

- ``rel_l2`` (of a module, the growth, the first divergence / difference): +inf (a zero reference with
  an error; 0/0 is 0, never NaN);
- ``sqnr_db``: +inf for an exact slot (no error), −inf for a zero reference with an error;
- ULP ``p99`` / ``max`` (coarse and fine): +inf (a distance beyond float64's range);
- a verdict's ``bias_z``: ±inf (a zero spread: every error equal), signed as the mean of the bias test
  that set it — :class:`Metrics`'s ``bias`` or ``bias_outward``; a local verdict's full-tensor mean is
  not in the summary, so its sign is ``bias_outward``'s;
- a local error's ``input_rel_l2``: the recorded input's ``rel_l2`` (+inf), NaN without one;
- everything else (``ref_rms``, a verdict's ``rounding_rel`` / ``roundings``, fit statistics, the
  correlation matrices, ``topk_kl``): NaN.

A summary written before hwdiff stored per-module verdicts (data/reference/ holds one) loads with the
verdict of the one rule it applied then, rebuilt from its ``beyond_rounding_frac`` and ``diverges``;
fields it lacks take their defaults (``ref_rms`` NaN, no RL block: :data:`NO_RL_BLOCK`).

Not in the summary, so not restored: :class:`Metrics`'s ``max_ref`` / ``max_target`` (the values at the
largest error; taken from the verdict's outlier when there is one, else NaN). A :class:`LocalDiff`'s
``exact`` is ``local_rel_l2 == 0`` (what the diff sets it from).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import HwdiffError
from .align import Unmatched
from .correlation import Correlation
from .fit import Fit, FitResult
from .metrics import Metrics, NonFinite, UlpStats, lower_precision
from .output import DIFF_SCHEMA, SUMMARY_SCHEMA
from .results import (
    DiffResult,
    FirstDifference,
    FirstDivergence,
    GoldenDiff,
    Growth,
    LayerDiff,
    LocalDiff,
    RoutedToken,
    RoutingDiff,
)
from .rl import THRESHOLDS, RLImpact, WorstToken
from .verdict import Outlier, Verdict

NO_RL_BLOCK = "the diff was made by an hwdiff without the RL block; diff again"
_FIT_STATS = ("loglik", "aic", "bic", "ks_stat", "ks_p")


def load_diff(diff: DiffResult | str | os.PathLike, *, arrays: bool = True) -> DiffResult:
    """A :class:`DiffResult` (returned as it is), a diff.h5 (``hwdiff diff -o``; with ``arrays`` its
    per-slot histograms and samples go into :attr:`DiffResult.arrays`) or a diff JSON summary
    (``--json``; no arrays). Raises :class:`HwdiffError` for a missing, unreadable or foreign file."""
    if isinstance(diff, DiffResult):
        return diff
    path = Path(diff)
    if not path.is_file():
        raise HwdiffError(f"{path}: no such diff file")
    if path.suffix == ".json":
        return from_summary(_json_summary(path), source=path)
    import h5py

    from ..store.h5 import read_checked

    found: dict[str, dict[str, np.ndarray]] = {}
    try:
        with h5py.File(path, "r") as handle:
            if handle.attrs.get("schema") != DIFF_SCHEMA or not handle.attrs.get("complete"):
                raise HwdiffError(f"{path} is not a complete diff file of schema {DIFF_SCHEMA}")
            data = json.loads(handle.attrs["summary"])

            def visit(name: str, node: Any) -> None:
                if isinstance(node, h5py.Dataset) and name.startswith("layers/"):
                    key, field = name[len("layers/") :].rsplit("/", 1)
                    found.setdefault(key, {})[field] = read_checked(node)

            if arrays:
                handle.visititems(visit)
    except OSError as exc:
        raise HwdiffError(f"{path} is not a readable diff file ({exc})") from exc
    return from_summary(data, arrays=found, source=path)


def _json_summary(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HwdiffError(f"{path} is not a diff summary (invalid JSON: {exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != SUMMARY_SCHEMA:
        raise HwdiffError(f"{path} is not a diff summary of schema {SUMMARY_SCHEMA}")
    return data


def from_summary(
    data: dict[str, Any], *, arrays: dict[str, Any] | None = None, source: Any = "the summary"
) -> DiffResult:
    """The :class:`DiffResult` a summary dict was written from (module docstring)."""
    try:
        layers = _layers(data["modules"])
        first = data.get("first_divergence")
        difference = data.get("first_difference")
        rl = data.get("rl_impact")
        return DiffResult(
            reference=data["reference"],
            target=data["target"],
            golden=data.get("golden"),
            layers=layers,
            unmatched=tuple(
                Unmatched(u["name"], u["call"], u["slot"], u["reason"])
                for u in data.get("unmatched", [])
            ),
            correlation=_correlation(data.get("correlation")),
            growth=_growth(data.get("growth")),
            first_divergence=None
            if first is None
            else FirstDivergence(
                first["name"],
                first["call"],
                first["detected_at"],
                first["origin"],
                first["beyond_rounding_frac"],
                _float(first["rel_l2"], math.inf),
                first["rule"],
                first.get("basis", "total"),
                first.get("reasons", ""),
            ),
            first_difference=None
            if difference is None
            else FirstDifference(
                difference["name"],
                difference["call"],
                _float(difference["rel_l2"], math.inf),
                difference["equal_frac"],
                difference.get("numel", 0),
            ),
            arrays=_in_order(arrays or {}, layers),
            local=data.get("local"),
            rl_impact=_rl(rl) if rl and rl.get("available") else None,
            rl_absent=NO_RL_BLOCK
            if rl is None
            else ""
            if rl.get("available")
            else rl.get("reason", ""),
            routing=tuple(
                RoutingDiff(
                    r["name"],
                    r["call"],
                    r["tokens"],
                    tuple(
                        RoutedToken(
                            t["sequence"], t["position"], tuple(t["reference"]), tuple(t["target"])
                        )
                        for t in r["changed"]
                    ),
                )
                for r in data.get("routing", [])
            ),
            hwdiff_version=str(data.get("hwdiff_version", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HwdiffError(
            f"{source} is a malformed diff summary ({type(exc).__name__}: {exc})"
        ) from None


def _in_order(arrays: dict[str, Any], layers: tuple[LayerDiff, ...]) -> dict[str, Any]:
    """The per-slot arrays in forward order, as the diff made them (diff.h5 lists its groups by name)."""
    keys = ["/".join(map(str, layer.key)) for layer in layers]
    return {**{key: arrays[key] for key in keys if key in arrays}, **arrays}


def _float(value: float | None, null: float = math.nan) -> float:
    """A JSON number, ``null`` read as ``null`` (the writer's stand-in for that non-finite value)."""
    return null if value is None else float(value)


def _layers(modules: list[dict[str, Any]]) -> tuple[LayerDiff, ...]:
    inputs = {
        (m["name"], m["call"]): _float(m["rel_l2"], math.inf)
        for m in modules
        if m["slot"] == "input"
    }
    return tuple(_layer(m, inputs) for m in modules)


def _layer(m: dict[str, Any], inputs: dict[tuple[str, int], float]) -> LayerDiff:
    metrics = _metrics(m)
    verdict = (
        _verdict(m["verdict"], (metrics.bias, metrics.rmse)) if "verdict" in m else _first_rule(m)
    )
    if (
        verdict.outlier is not None
    ):  # the values at the largest error, which the summary keeps only here
        metrics = _with_max_values(metrics, verdict.outlier)
    fine = m.get("ulp_fine")
    return LayerDiff(
        name=m["name"],
        call=m["call"],
        slot=m["slot"],
        kind=m["kind"],
        shape=tuple(m["shape"]),
        ref_dtype=m["ref_dtype"],
        target_dtype=m["target_dtype"],
        metrics=metrics,
        fit=_fit(m["fit"]),
        verdict=verdict,
        golden=GoldenDiff(m["golden"]["reference_rel_l2"], m["golden"]["target_rel_l2"])
        if m.get("golden")
        else None,
        alias_of=m.get("alias_of"),
        local=_local(m, metrics.rel_l2, inputs),
        weight_rms=m.get("weight_rms"),
        ulp_fine=None if fine is None else _ulp(fine),
    )


def _metrics(m: dict[str, Any]) -> Metrics:
    nan_inf = m["nan_inf"]
    return Metrics(
        numel=m["numel"],
        equal_frac=m["equal_frac"],
        rel_l2=_float(m["rel_l2"], math.inf),
        sqnr_db=_float(m["sqnr_db"], math.inf if m["rmse"] == 0 else -math.inf),
        cosine=m["cosine"],
        one_minus_cos=m["one_minus_cos"],
        rmse=m["rmse"],
        max_abs=m["max_abs"],
        mean_abs=m["mean_abs"],
        bias=m["bias"],
        err_std=m["err_std"],
        max_at=None if m.get("max_at") is None else tuple(m["max_at"]),
        max_ref=math.nan,
        max_target=math.nan,
        ulp=_ulp(m["ulp"]),
        thousandth_frac=m["thousandth_frac"],
        five_thousandth_frac=m["five_thousandth_frac"],
        nan_inf=NonFinite(
            nan_inf["ref_nan"], nan_inf["ref_inf"], nan_inf["target_nan"], nan_inf["target_inf"]
        ),
        ref_rms=_float(m.get("ref_rms")),
    )


def _with_max_values(metrics: Metrics, outlier: Outlier) -> Metrics:
    return replace(metrics, max_ref=outlier.reference, max_target=outlier.target)


def _ulp(u: dict[str, Any]) -> UlpStats:
    return UlpStats(
        p50=u["p50"],
        p99=_float(u["p99"], math.inf),
        max=_float(u["max"], math.inf),
        le1_frac=u["le1_frac"],
    )


def _verdict(v: dict[str, Any], full_test: tuple[float, float] | None) -> Verdict:
    """``full_test``: (mean, rms) of the error over all elements, when known (the sign of an infinite z)."""
    outlier = v.get("outlier")
    return Verdict(
        rule=v["rule"],
        coarse_dtype=v["coarse_dtype"],
        beyond_ulp_frac=_float(v["beyond_ulp_frac"]),
        rounding_rel=_float(v["rounding_rel"]),
        roundings=_float(v["roundings"]),
        budget=v.get("budget"),
        bias_z=_bias_z(v, full_test),
        bias_effect=_float(v["bias_effect"]),
        bias_outward=_float(v["bias_outward"]),
        outlier=None
        if outlier is None
        else Outlier(
            tuple(outlier["position"]),
            _float(outlier["error"]),
            _float(outlier["reference"]),
            _float(outlier["target"]),
            _float(outlier["ratio"]),
        ),
        reasons=tuple(v["reasons"]),
    )


def _first_rule(m: dict[str, Any]) -> Verdict:
    """The verdict of a summary written before verdicts were stored (hwdiff's first diff rule, the only
    one then: more than 1 % of the sampled elements beyond one ulp of the coarser dtype), from the
    ``beyond_rounding_frac`` and ``diverges`` it kept; the tests it did not run (bias, outlier, rounding
    budget) are NaN / absent."""
    return Verdict(
        rule="ulp",
        coarse_dtype=lower_precision(m["ref_dtype"], m["target_dtype"]),
        beyond_ulp_frac=_float(m["beyond_rounding_frac"]),
        rounding_rel=math.nan,
        roundings=math.nan,
        budget=None,
        bias_z=math.nan,
        bias_effect=math.nan,
        bias_outward=math.nan,
        outlier=None,
        reasons=("ulp",) if m.get("diverges") else (),
    )


def _bias_z(v: dict[str, Any], full_test: tuple[float, float] | None) -> float:
    """A stored z, or ±inf for null: z is infinite exactly when the chosen test's errors have no spread
    (:func:`.verdict._bias`), and carries the sign of that test's mean — the full tensor's when its
    effect |mean| / rms is the one stored (that test runs first and is kept on ties), else the sample's."""
    if v["bias_z"] is not None:
        return float(v["bias_z"])
    mean = v["bias_outward"] or 0.0
    if (
        full_test is not None
        and full_test[1]
        and abs(full_test[0]) / full_test[1] == v["bias_effect"]
    ):
        mean = full_test[0]
    return math.copysign(math.inf, mean)


def _fit(f: dict[str, Any]) -> FitResult:
    fits = {
        name: Fit(
            params={k: _float(x) for k, x in values.items() if k not in _FIT_STATS},
            **{k: _float(values.get(k)) for k in _FIT_STATS},
        )  # an early summary: no bic
        for name, values in f.items()
        if isinstance(values, dict) and name not in ("relative", "not_fitted")
    }
    return FitResult(
        best=f["best"],
        n=f["n"],
        reason=f.get("reason", ""),
        skew=_float(f.get("skew")),
        excess_kurtosis=_float(f.get("excess_kurtosis")),
        fits=fits,
        relative=_fit(f["relative"]) if "relative" in f else None,
        law=f.get("law", ""),
        not_fitted=dict(f.get("not_fitted", {})),
    )


def _local(
    m: dict[str, Any], total_rel_l2: float, inputs: dict[tuple[str, int], float]
) -> LocalDiff | None:
    if "local_rel_l2" not in m:
        return None
    local = m["local_rel_l2"]
    stored = m.get("input_rel_l2")
    return LocalDiff(
        local_rel_l2=local,
        total_rel_l2=total_rel_l2,
        input_rel_l2=float(stored)
        if stored is not None
        else inputs.get((m["name"], m["call"]), math.nan),
        verdict=_verdict(m["local_verdict"], None) if "local_verdict" in m else None,
        exact=local == 0,
    )


def _correlation(c: dict[str, Any] | None) -> Correlation | None:
    if c is None:
        return None
    n = len(c["names"])

    def matrix(rows: list[list[float | None]]) -> np.ndarray:
        return np.array([[_float(v) for v in row] for row in rows], dtype=np.float64).reshape(n, n)

    return Correlation(
        tuple(c["names"]), matrix(c["accumulated"]), matrix(c["increments"]), tuple(c["exact"])
    )


def _growth(g: dict[str, Any] | None) -> Growth | None:
    return (
        None
        if g is None
        else Growth(tuple(g["names"]), tuple(_float(v, math.inf) for v in g["rel_l2"]))
    )


def _rl(block: dict[str, Any]) -> RLImpact:
    return RLImpact(
        positions=block["positions"],
        mean_abs=block["mean_abs"],
        max_abs=block["max_abs"],
        frac_above=tuple(block[f"frac_above_{t:g}"] for t in THRESHOLDS),
        mean_exp_abs=block["mean_exp_abs"],
        k3_kl=block["k3_kl"],
        topk_kl=_float(block["topk_kl"]),
        topk_kl_positions=block["topk_kl_positions"],
        topk_overlap=block["topk_overlap"],
        top1_agreement=block["top1_agreement"],
        topk=block["topk"],
        worst=tuple(
            WorstToken(
                w["prompt"], w["position"], w["token"], w["ref_logprob"], w["target_logprob"]
            )
            for w in block["worst"]
        ),
        hist_counts=tuple(block["histogram"]["counts"]),
        hist_edges=tuple(block["histogram"]["edges"]),
        compute_dtype=block["compute_dtype"],
    )


__all__ = ["from_summary", "load_diff"]
