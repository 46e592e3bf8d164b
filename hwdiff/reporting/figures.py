"""The report's figures (matplotlib, Agg). Each function draws one PNG and returns its caption."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

KIND_ORDER = ("embedding", "rmsnorm", "linear", "attention", "activation", "mlp", "decoder_layer", "head", "op", "other")
QERL_DEFAULT = (0.05, 0.0005, 10)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _outputs(summary: dict) -> list[dict]:
    return [m for m in summary["modules"] if m["slot"] == "output" and not m.get("alias_of")]


def error_vs_depth(summary: dict, path: Path, floor: float) -> str:
    plt = _plt()
    modules = _outputs(summary)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for kind in KIND_ORDER:
        points = [(i, m) for i, m in enumerate(modules) if m["kind"] == kind and m["rel_l2"]]
        if points:
            x = [i for i, _ in points]
            top.semilogy(x, [m["rel_l2"] for _, m in points], "o-", ms=3, lw=0.8, label=kind)
            bottom.plot(x, [m["sqnr_db"] for _, m in points], "o-", ms=3, lw=0.8, label=kind)
    top.axhline(floor, color="k", ls="--", lw=0.8, label="one rounding of the dtype")
    top.set_ylabel("relative L2 error")
    bottom.set_ylabel("SQNR (dB)")
    bottom.set_xlabel("module, in forward order")
    top.legend(fontsize=7, ncol=4)
    top.set_title("Error vs depth per module kind (exact modules are not drawn)")
    _save(fig, path)
    return "Relative L2 error (log) and SQNR of every module output in forward order, per kind; the dashed line is one rounding to the dtype."


def one_minus_cos(summary: dict, path: Path) -> str:
    plt = _plt()
    modules = [m for m in _outputs(summary) if m["one_minus_cos"] > 0]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.semilogy(range(len(modules)), [m["one_minus_cos"] for m in modules], ".-", lw=0.6)
    ax.set_ylabel("1 − cosine")
    ax.set_xlabel("module with an error, in forward order")
    ax.set_title("1 − cos vs depth (cosine alone prints 1.0 at bf16-level error)")
    _save(fig, path)
    return "1 − cosine similarity of each module output that is not bit-identical, in forward order (log)."


def ulp_by_kind(summary: dict, arrays: dict, edges: np.ndarray, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    totals: dict[str, np.ndarray] = {}
    for m in _outputs(summary):
        hist = arrays.get(f"{m['name']}/{m['call']}/output", {}).get("ulp_hist")
        if hist is not None:
            totals[m["kind"]] = totals.get(m["kind"], 0) + np.asarray(hist)
    for kind in KIND_ORDER:
        if kind in totals and totals[kind].sum():
            cumulative = np.cumsum(totals[kind]) / totals[kind].sum()
            ax.step(np.maximum(edges, 1 / 32), cumulative, where="post", label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("ULP distance in the target dtype (0 drawn at 1/32)")
    ax.set_ylabel("fraction of elements ≤ x")
    ax.axvline(1, color="k", ls="--", lw=0.8)
    ax.legend(fontsize=7)
    ax.set_title("ULP distance distribution per module kind")
    _save(fig, path)
    return "Cumulative distribution of the ULP distance per module kind; left of the dashed line: within one ulp."


def error_histogram(module: dict, arrays: dict, path: Path) -> str:
    from scipy import stats

    plt = _plt()
    data = arrays.get(f"{module['name']}/{module['call']}/output", {})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    counts, edges = np.asarray(data.get("err_hist", [])), np.asarray(data.get("err_edges", []))
    sample = np.asarray(data.get("err_sample", []), dtype=np.float64)
    sample = sample[sample != 0]
    fit = module.get("fit", {})
    if counts.size and counts.sum():
        centers, width = (edges[1:] + edges[:-1]) / 2, edges[1] - edges[0]
        total = counts.sum()
        left.bar(centers, counts, width=width, color="0.7", label="sampled errors")
        x = np.linspace(edges[0], edges[-1], 400)
        if "gaussian" in fit:
            g = fit["gaussian"]
            left.plot(x, total * width * stats.norm.pdf(x, g["mu"], g["sigma"]), label="Gaussian fit")
        if "student_t" in fit:
            t = fit["student_t"]
            left.plot(x, total * width * stats.t.pdf(x, t["df"], t["loc"], t["scale"]), label=f"Student-t (df={t['df']:.3g})")
        left.set_yscale("log")
        left.set_ylim(bottom=0.5)
        left.legend(fontsize=7)
    left.set_title(f"{module['name']}: error t − r (best: {fit.get('best')})", fontsize=9)
    if sample.size > 10 and "gaussian" in fit:
        quantiles = np.sort((sample - fit["gaussian"]["mu"]) / max(fit["gaussian"]["sigma"], 1e-300))
        theory = stats.norm.ppf((np.arange(1, quantiles.size + 1) - 0.5) / quantiles.size)
        right.plot(theory, quantiles, ".", ms=2)
        right.plot(theory, theory, "k--", lw=0.8)
        right.set_xlabel("Gaussian quantile")
        right.set_ylabel("standardized error quantile")
    right.set_title("QQ plot against the Gaussian fit", fontsize=9)
    _save(fig, path)
    return (f"Errors of {module['name']} ({module['kind']}): histogram of the sampled differing elements with the "
            "fitted Gaussian and Student-t (log y), and a QQ plot against the Gaussian.")


def correlation(summary: dict, path: Path) -> str | None:
    corr = summary.get("correlation")
    if not corr:
        return None
    plt = _plt()
    names = [n.replace("model.", "") for n in corr["names"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, key, title in ((axes[0], "accumulated", "accumulated error"), (axes[1], "increments", "per-layer increments")):
        matrix = np.array([[np.nan if v is None else v for v in row] for row in corr[key]], dtype=float)
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_title(f"Pearson correlation: {title}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "Correlation of the residual-stream error between layers: accumulated (left) and the increments each layer adds (right)."


def local_vs_propagated(summary: dict, path: Path) -> str | None:
    modules = [m for m in _outputs(summary) if m.get("local_rel_l2") is not None]
    if not modules:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.8))
    x = range(len(modules))
    ax.semilogy(x, [max(m["rel_l2"] or 0, 1e-12) for m in modules], ".-", lw=0.6, label="total")
    ax.semilogy(x, [max(m["local_rel_l2"], 1e-12) for m in modules], "o", ms=3, label="local (replay)")
    ax.semilogy(x, [max(m["propagated_rel_l2"], 1e-12) for m in modules], "-", lw=0.8, label="propagated")
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("module, in forward order")
    ax.set_ylabel("relative L2")
    ax.legend(fontsize=7)
    ax.set_title("Local vs propagated error (local below 1e-6 is bit-identical)")
    _save(fig, path)
    return "Each module's total error, the part it adds itself (local, from a replay) and the part it inherits."


def golden(summary: dict, path: Path) -> str | None:
    modules = [m for m in _outputs(summary) if m.get("golden")]
    if not modules:
        return None
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    x = range(len(modules))
    top.semilogy(x, [max(m["golden"]["reference_rel_l2"], 1e-12) for m in modules], ".-", label="reference vs golden")
    top.semilogy(x, [max(m["golden"]["target_rel_l2"], 1e-12) for m in modules], ".-", label="target vs golden")
    top.legend(fontsize=7)
    top.set_ylabel("relative L2")
    bottom.plot(x, [m["golden"]["ratio"] or np.nan for m in modules], ".-")
    bottom.axhline(1, color="k", ls="--", lw=0.8)
    bottom.set_ylabel("target / reference")
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
            left.semilogy(steps, [max(schedule.at(int(s), 1000), 1e-9) for s in steps], lw=0.7)
    left.set_ylim(bottom=1e-5)
    left.set_xlabel("training step (of 1000)")
    left.set_ylabel("σ")
    left.set_title("σ vs training step, one line per norm", fontsize=9)
    names = [layer.name.replace("model.", "").replace("layers.", "L") for layer in calibration.layers]
    right.bar(range(len(names)), [layer.sigma_end for layer in calibration.layers])
    right.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    right.set_ylabel("σ_end")
    right.set_title("Calibrated σ_end per norm", fontsize=9)
    _save(fig, path)
    return "The calibrated schedule of every norm over training (stage 0 has no noise) and each norm's σ_end."


def qerl_vs_hardware(levels: dict[str, float], path: Path) -> tuple[str, int | None]:
    """QeRL's default schedule against each layer's hardware-equivalent σ; returns the caption and the
    first stage at which QeRL's σ is below the median hardware level (None: never)."""
    from ..schedule import SigmaSchedule

    plt = _plt()
    qerl = SigmaSchedule(*QERL_DEFAULT)
    steps = np.arange(0, 1001)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.semilogy(steps, [max(qerl.at(int(s), 1000), 1e-9) for s in steps], "k", lw=2, label="QeRL default 0.05 → 0.0005")
    values = sorted(v for v in levels.values() if v > 0)
    for name, value in levels.items():
        if value > 0:
            ax.axhline(value, color="tab:red", alpha=0.25, lw=0.8)
    median = float(np.median(values)) if values else math.nan
    if values:
        ax.axhline(median, color="tab:red", lw=1.8, label=f"hardware error as σ (median {median:.2g}; thin: each norm)")
    below = next((i for i, v in enumerate(qerl.values, start=1) if values and v < median), None)
    ax.set_ylim(1e-5, 0.1)
    ax.set_xlabel("training step (of 1000)")
    ax.set_ylabel("σ")
    ax.legend(fontsize=8)
    ax.set_title("Are QeRL's σ values right for hardware errors?")
    _save(fig, path)
    text = ("QeRL's default schedule against the σ that reproduces the measured GPU-vs-NPU error at each norm. "
            + (f"From stage {below} on, the injected noise is below the median hardware error." if below else
               "The injected noise stays above the median hardware error through every stage."))
    return text, below


def rl_histogram(block: dict, path: Path) -> str:
    """Histogram of Δlogp = logp_target − logp_reference over real next-token positions (the JSON
    ``rl_impact`` block), log count axis, with the ±1e-3 and ±1e-2 thresholds marked."""
    plt = _plt()
    counts = np.asarray(block["histogram"]["counts"], dtype=float)
    edges = np.asarray(block["histogram"]["edges"], dtype=float)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    ax.set_yscale("log")
    for threshold, style in ((1e-3, ":"), (1e-2, "--")):
        if threshold < edges[-1]:
            for sign in (-1, 1):
                ax.axvline(sign * threshold, color="k", ls=style, lw=0.8)
    ax.set_xlabel("Δlogp = logp(target) − logp(reference), nats")
    ax.set_ylabel("positions")
    ax.set_title(f"Token log-prob mismatch over {block['positions']} next-token positions")
    _save(fig, path)
    return (f"Distribution of Δlogp of the next input token at every real position; dotted ±1e-3, dashed ±1e-2 "
            f"(where inside the range). Mean |Δlogp| {block['mean_abs']:.3g}, "
            f"{block['frac_above_0.001']:.1%} of positions above 1e-3.")
