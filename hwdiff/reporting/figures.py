"""The report's figures (matplotlib, Agg). Each function draws one PNG and returns its caption, or
None when it has nothing to draw (a figure is never an empty axis)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..compare.results import DiffResult, LayerDiff
    from ..compare.rl import RLImpact

KIND_ORDER = (
    "embedding",
    "rmsnorm",
    "linear",
    "attention",
    "activation",
    "mlp",
    "moe",
    "mixer",
    "decoder_layer",
    "head",
    "op",
    "other",
)
QERL_DEFAULT = (0.05, 0.0005, 10)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, *, tight: bool = True) -> None:
    """Write the figure (every figure of the report goes through here) and close it."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, **({} if tight else {"bbox_inches": "tight"}))
    _plt().close(fig)


def _outputs(diff: DiffResult) -> list[LayerDiff]:
    return [m for m in diff.outputs if not m.alias_of]


def _finite(value: float) -> float | None:
    """The value, or None where it is not finite (as the diff's JSON writes it: nothing to draw)."""
    return value if math.isfinite(value) else None


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def short_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``L3.self_attn.q_proj``."""
    return _LAYER.sub(lambda m: f"L{m.group(1)}.", name.replace("model.", "", 1)).strip(".")


def depth_ticks(ax: Any, names: list[str], *, max_labels: int = 40) -> None:
    """Label a forward-order axis with module names: every module when there are few, else the
    first module of each decoder layer (``L<n>``, thinned to ``max_labels``) and the modules outside
    the layers (embedding, final norm, head)."""
    if len(names) <= max_labels:
        ax.set_xticks(range(len(names)), [short_name(n) for n in names], rotation=90, fontsize=6)
        return
    ticks, labels, seen = [], [], set()
    for i, name in enumerate(names):
        match = _LAYER.search(name)
        key = match.group(1) if match else name
        if key not in seen:
            seen.add(key)
            ticks.append(i)
            labels.append(f"L{key}" if match else short_name(name))
    step = max(1, math.ceil(len(ticks) / max_labels))
    keep = [k for k in range(len(ticks)) if k % step == 0 or not _LAYER.search(names[ticks[k]])]
    ax.set_xticks([ticks[k] for k in keep], [labels[k] for k in keep], rotation=90, fontsize=6)
    ax.set_xticks(ticks, minor=True)


def error_vs_depth(diff: DiffResult, path: Path, floor: float) -> str | None:
    modules = _outputs(diff)
    if not any(_finite(m.metrics.rel_l2) for m in modules):
        return None  # bit-identical: nothing to draw
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for kind in KIND_ORDER:
        points = [
            (i, m) for i, m in enumerate(modules) if m.kind == kind and _finite(m.metrics.rel_l2)
        ]
        if points:
            x = [i for i, _ in points]
            top.semilogy(x, [m.metrics.rel_l2 for _, m in points], "o-", ms=3, lw=0.8, label=kind)
            bottom.plot(
                x, [_finite(m.metrics.sqnr_db) for _, m in points], "o-", ms=3, lw=0.8, label=kind
            )
    top.axhline(floor, color="k", ls="--", lw=0.8, label="one rounding of the dtype")
    top.set_ylabel("relative L2 error")
    bottom.set_ylabel("SQNR (dB)")
    depth_ticks(bottom, [m.name for m in modules])
    bottom.set_xlabel("module, in forward order")
    top.legend(fontsize=7, ncol=4)
    top.set_title("Error vs depth per module kind (bit-identical modules are not drawn)")
    _save(fig, path)
    return (
        "Relative L2 error (log) and SQNR of every module output in forward order, per kind; the dashed line "
        "is one rounding to the dtype."
    )


def one_minus_cos(diff: DiffResult, path: Path) -> str | None:
    modules = _outputs(diff)
    points = [
        (i, m.metrics.one_minus_cos) for i, m in enumerate(modules) if m.metrics.one_minus_cos > 0
    ]
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.semilogy([i for i, _ in points], [v for _, v in points], ".-", lw=0.6)
    ax.set_xlim(-0.5, len(modules) - 0.5)
    depth_ticks(ax, [m.name for m in modules])
    ax.set_ylabel("1 − cosine")
    ax.set_xlabel("module, in forward order (bit-identical modules are not drawn)")
    ax.set_title("1 − cos vs depth (cosine alone prints 1.0 at bf16-level error)")
    _save(fig, path)
    return "1 − cosine similarity of each module output that is not bit-identical, in forward order (log)."


def ulp_by_kind(diff: DiffResult, arrays: dict, edges: np.ndarray, path: Path) -> str | None:
    totals: dict[str, np.ndarray] = {}
    dtypes = set()
    for m in _outputs(diff):
        hist = arrays.get(f"{m.name}/{m.call}/output", {}).get("ulp_hist")
        if hist is not None and not m.exact:
            totals[m.kind] = totals.get(m.kind, 0) + np.asarray(hist)
            dtypes.add(m.verdict.coarse_dtype)
    if not any(total.sum() for total in totals.values()):
        return None  # bit-identical: every distance is 0
    occupied = max(int(np.flatnonzero(total)[-1]) for total in totals.values() if total.sum())
    right = float(edges[occupied + 1]) if occupied + 1 < edges.size else float(edges[-1]) * 2
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind in KIND_ORDER:
        if kind in totals and totals[kind].sum():
            cumulative = np.cumsum(totals[kind]) / totals[kind].sum()
            ax.step(np.maximum(edges, 1 / 32), cumulative, where="post", label=kind)
    ax.set_xscale("log")
    ax.set_xlim(
        1 / 32, max(right, 2.0)
    )  # up to the largest distance measured, not the histogram's last edge
    ax.set_xlabel(
        f"ULP distance in {'/'.join(sorted(dtypes))}, the coarser dtype of the pair (0 drawn at 1/32)"
    )
    ax.set_ylabel("fraction of elements ≤ x")
    ax.axvline(1, color="k", ls="--", lw=0.8)
    ax.legend(fontsize=7)
    ax.set_title("ULP distance distribution per module kind (modules with an error)")
    _save(fig, path)
    return (
        "Cumulative distribution of the ULP distance, in the coarser dtype of the pair, per module kind over the "
        "modules that are not bit-identical; left of the dashed line: within one ulp."
    )


def error_histogram(module: LayerDiff, arrays: dict, path: Path) -> str | None:
    from scipy import stats

    data = arrays.get(f"{module.name}/{module.call}/output", {})
    counts, edges = np.asarray(data.get("err_hist", [])), np.asarray(data.get("err_edges", []))
    if not counts.size or not counts.sum():
        return None
    sample = np.asarray(data.get("err_sample", []), dtype=np.float64)
    sample = sample[sample != 0]
    fit = module.fit
    quantile_plot = sample.size > 10 and "gaussian" in fit.fits
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if quantile_plot else 1, figsize=(10, 3.6), squeeze=False)
    left = axes[0][0]
    centers, width = (edges[1:] + edges[:-1]) / 2, edges[1] - edges[0]
    total = counts.sum()
    left.bar(centers, counts, width=width, color="0.7", label="sampled errors")
    x = np.linspace(edges[0], edges[-1], 400)
    if "gaussian" in fit.fits:
        g = fit.fits["gaussian"].params
        left.plot(x, total * width * stats.norm.pdf(x, g["mu"], g["sigma"]), label="Gaussian fit")
    if "student_t" in fit.fits:
        t = fit.fits["student_t"].params
        left.plot(
            x,
            total * width * stats.t.pdf(x, t["df"], t["loc"], t["scale"]),
            label=f"Student-t (df={t['df']:.3g})",
        )
    left.set_yscale("log")
    left.set_ylim(0.5, total * 2)
    left.legend(fontsize=7)
    law = f"; the {fit.law} error fits better" if fit.law else ""
    left.set_title(f"{short_name(module.name)}: error t − r (best: {fit.best}{law})", fontsize=9)
    if quantile_plot:
        right = axes[0][1]
        gaussian = fit.fits["gaussian"].params
        quantiles = np.sort((sample - gaussian["mu"]) / max(gaussian["sigma"], 1e-300))
        theory = stats.norm.ppf((np.arange(1, quantiles.size + 1) - 0.5) / quantiles.size)
        right.plot(theory, quantiles, ".", ms=2)
        right.plot(theory, theory, "k--", lw=0.8)
        right.set_xlabel("Gaussian quantile")
        right.set_ylabel("standardized error quantile")
        right.set_title("QQ plot against the Gaussian fit", fontsize=9)
    _save(fig, path)
    relative = fit.relative
    law_text = (
        f" The relative error e/|r| is best described by a {relative.best} law and describes the error "
        f"{'better' if fit.law == 'relative' else 'less well'} than the absolute one."
        if relative is not None and relative.best != "none"
        else ""
    )
    return (
        f"Errors of {module.name} ({module.kind}): histogram of the sampled errors with the fitted Gaussian "
        "and Student-t of the differing elements (log y)"
        + (", and a QQ plot against the Gaussian." if quantile_plot else ".")
        + law_text
    )


def correlation(diff: DiffResult, path: Path) -> str | None:
    corr = diff.correlation
    if corr is None:
        return None
    exact = set(corr.exact)
    keep = [
        i for i, name in enumerate(corr.names) if name not in exact
    ]  # no error: no correlation to draw
    if len(keep) < 2:
        return None
    plt = _plt()
    names = [short_name(corr.names[i]) for i in keep]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, values, title in (
        (axes[0], corr.accumulated, "accumulated error"),
        (axes[1], corr.increments, "per-layer increments"),
    ):
        matrix = np.where(np.isfinite(values), values, np.nan)[np.ix_(keep, keep)]
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_title(f"Pearson correlation: {title}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8)
    _save(fig, path, tight=False)
    left_out = (
        f" Bit-identical positions, which have no correlation, are left out: {', '.join(sorted(exact))}."
        if exact
        else ""
    )
    return (
        "Correlation of the residual-stream error between layers: accumulated (left) and the increments each "
        "layer adds (right)." + left_out
    )


def local_vs_propagated(diff: DiffResult, path: Path) -> str | None:
    modules = [m for m in _outputs(diff) if m.local is not None]
    if not modules:
        return None
    if not any(_finite(m.metrics.rel_l2) for m in modules):
        return None

    def positive(
        values: list[float | None],
    ) -> list[float]:  # zero (bit-identical) is not drawn on a log axis
        return [value if value else np.nan for value in values]

    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.4))
    x = range(len(modules))
    ax.semilogy(
        x, positive([_finite(m.metrics.rel_l2) for m in modules]), ".-", lw=0.6, label="total"
    )
    ax.semilogy(
        x, positive([m.local.local_rel_l2 for m in modules]), "o", ms=3, label="local (replay)"
    )
    ax.semilogy(
        x, positive([m.local.propagated_rel_l2 for m in modules]), "x", ms=4, label="propagated"
    )
    depth_ticks(ax, [m.name for m in modules])
    ax.set_xlabel("module, in forward order")
    ax.set_ylabel("relative L2")
    ax.legend(fontsize=7)
    ax.set_title("Local vs propagated error (zero — bit-identical — is not drawn)")
    _save(fig, path)
    return (
        "Each module's total error, the part it adds itself (local, from a replay) and the part it inherits "
        "(propagated); a missing marker is zero: a module whose total error is all local has no propagated part."
    )


def golden(diff: DiffResult, path: Path) -> str | None:
    modules = [m for m in _outputs(diff) if m.golden is not None]
    if not modules:
        return None
    if not any(m.golden.reference_rel_l2 or m.golden.target_rel_l2 for m in modules):
        return None
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    x = range(len(modules))
    for side, label in (
        ("reference_rel_l2", "reference vs golden"),
        ("target_rel_l2", "target vs golden"),
    ):
        top.semilogy(x, [getattr(m.golden, side) or np.nan for m in modules], ".-", label=label)
    top.legend(fontsize=7)
    top.set_ylabel("relative L2")
    ratios = [m.golden.ratio if math.isfinite(m.golden.ratio) else np.nan for m in modules]
    bottom.plot(x, ratios, ".-")
    bottom.axhline(1, color="k", ls="--", lw=0.8)
    bottom.set_ylabel("target / reference")
    depth_ticks(bottom, [m.name for m in modules])
    bottom.set_xlabel("module, in forward order")
    top.set_title("Which side is off: each side's error against the golden capture")
    _save(fig, path)
    return "Each side's error against the golden capture, and their ratio (above 1: the target is further from the truth)."


def sigma_schedule(calibration: Any, path: Path) -> str:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(0, 1001)
    for layer in calibration.layers:
        schedule = calibration.schedule_for(layer.name)
        if schedule is not None:
            left.semilogy(steps, _noisy(schedule, steps), lw=0.7)
    _stage_zero(left, calibration.schedule.num_stages)
    left.set_xlabel("training step (of 1000)")
    left.set_ylabel("σ")
    left.set_title("σ vs training step, one line per norm", fontsize=9)
    names = [
        layer.name.replace("model.", "").replace("layers.", "L") for layer in calibration.layers
    ]
    right.bar(range(len(names)), [layer.sigma_end for layer in calibration.layers])
    right.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    right.set_ylabel("σ_end")
    right.set_title("Calibrated σ_end per norm", fontsize=9)
    _save(fig, path)
    return (
        "The calibrated schedule of every norm over training (stage 0, shaded, has no noise and is not drawn on "
        "the log axis) and each norm's σ_end."
    )


def _noisy(schedule: Any, steps: np.ndarray, total: int = 1000) -> np.ndarray:
    """σ at each step, NaN where it is 0 (stage 0): zero has no place on a log axis."""
    values = np.array([schedule.at(int(s), total) for s in steps], dtype=float)
    values[values <= 0] = np.nan
    return values


def _stage_zero(ax: Any, stages: int, total: int = 1000) -> None:
    ax.axvspan(0, total / stages, color="0.9", zorder=0)
    ax.text(
        total / stages / 2,
        0.5,
        "stage 0:\nno noise",
        transform=ax.get_xaxis_transform(),
        ha="center",
        va="center",
        fontsize=7,
        color="0.4",
    )


def qerl_vs_hardware(
    levels: dict[str, float], path: Path, pair: str = "GPU-vs-NPU"
) -> tuple[str, int | None]:
    """QeRL's default schedule against each layer's hardware-equivalent σ; returns the caption and the
    first stage at which QeRL's σ is below the median hardware level (None: never). ``pair`` names
    the two sides of the diff in the caption ("cuda:0-vs-npu:0")."""
    from ..calibration.schedule import SigmaSchedule

    plt = _plt()
    qerl = SigmaSchedule(*QERL_DEFAULT)
    steps = np.arange(0, 1001)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.semilogy(steps, _noisy(qerl, steps), "k", lw=2, label="QeRL default 0.05 → 0.0005")
    _stage_zero(ax, qerl.num_stages)
    values = sorted(v for v in levels.values() if v > 0)
    for name, value in levels.items():
        if value > 0:
            ax.axhline(value, color="tab:red", alpha=0.25, lw=0.8)
    median = float(np.median(values)) if values else math.nan
    if values:
        ax.axhline(
            median,
            color="tab:red",
            lw=1.8,
            label=f"hardware error as σ (median {median:.2g}; thin: each norm)",
        )
    below = next((i for i, v in enumerate(qerl.values, start=1) if values and v < median), None)
    ax.set_ylim(1e-5, 0.1)
    ax.set_xlabel("training step (of 1000)")
    ax.set_ylabel("σ")
    ax.legend(fontsize=8)
    ax.set_title("Are QeRL's σ values right for hardware errors?")
    _save(fig, path)
    text = (
        f"QeRL's default schedule against the σ that reproduces the measured {pair} error at each norm "
        "(stage 0, shaded, injects no noise). "
        + (
            f"From stage {below} on, the injected noise is below the median hardware error."
            if below
            else "The injected noise stays above the median hardware error through every stage."
        )
    )
    return text, below


def rl_histogram(rl: RLImpact, path: Path) -> str:
    """Histogram of Δlogp = logp_target − logp_reference over real next-token positions (the diff's
    RL block), log count axis, with the ±1e-3 and ±1e-2 thresholds marked."""
    plt = _plt()
    counts = np.asarray(rl.hist_counts, dtype=float)
    edges = np.asarray(rl.hist_edges, dtype=float)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    ax.set_yscale("log")
    for threshold, style in ((1e-3, ":"), (1e-2, "--")):
        if threshold < edges[-1]:
            for sign in (-1, 1):
                ax.axvline(sign * threshold, color="k", ls=style, lw=0.8)
    ax.set_xlabel("Δlogp = logp(target) − logp(reference), nats")
    ax.set_ylabel("positions")
    ax.set_title(f"Token log-prob mismatch over {rl.positions} next-token positions")
    _save(fig, path)
    return (
        f"Distribution of Δlogp of the next input token at every real position; dotted ±1e-3, dashed ±1e-2 "
        f"(where inside the range). Mean |Δlogp| {rl.mean_abs:.3g}, "
        f"{rl.frac_above[0]:.1%} of positions above 1e-3."
    )
