"""``hwdiff report``: an HTML page (plus Markdown) with figures, readable offline, answering three
questions first — where do the devices first diverge, which layers are worst, which σ to use."""

from __future__ import annotations

import html
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common import outputs
from ..compare.io import load_diff
from ..compare.metrics import ulp_edges, unit_roundoff
from ..compare.results import DiffResult, LayerDiff
from ..compare.rl import RLImpact
from ..errors import HwdiffError
from . import figures

_FLAG_KEYS = (
    "device_name",
    "dtype",
    "torch_version",
    "cuda_version",
    "cudnn_version",
    "driver_version",
    "torch_npu_version",
    "cann_version",
    "attn_implementation",
    "cuda_matmul_allow_tf32",
    "cudnn_allow_tf32",
    "npu_matmul_allow_hf32",
    "deterministic_algorithms",
    "cpu_threads",
    "emulate",
    "model_spec",
    "model_fingerprint",
    "inputs_fingerprint",
    "hwdiff_version",
    "created_utc",
)


@dataclass(frozen=True)
class ReportResult:
    index: Path
    markdown: Path
    figures: tuple[Path, ...]

    def __str__(self) -> str:
        return f"wrote {self.index} ({len(self.figures)} figures, Markdown in {self.markdown.name})"


def report(
    diff: Any, out_dir: str | os.PathLike, *, sigma: Any = None, robustness: Any = None
) -> ReportResult:
    """Write ``out_dir/index.html``, ``out_dir/report.md`` and ``out_dir/figures/*.png``.

    ``diff``: a diff.h5 (histograms included), a diff JSON or a :class:`DiffResult` (read by
    :func:`hwdiff.compare.io.load_diff`); ``sigma``: a sigma.yaml or
    :class:`~hwdiff.calibration.Calibration` (adds the σ figures, the bf16 effectiveness table and the
    QeRL comparison); ``robustness``: a robustness card (JSON from ``hwdiff robustness -o``, or a
    :class:`~hwdiff.measure.robustness_run.RobustnessCard`) adds its section. Only the report's own files are written (each replaced atomically once the whole
    report is rendered, index.html last); anything else in ``out_dir`` is left alone.
    """
    from ..calibration.core import calibrate
    from ..calibration.sigmafile import load_sigma
    from ..calibration.types import Calibration

    out = Path(out_dir)
    sources = [item for item in (diff, sigma, robustness) if isinstance(item, (str, os.PathLike))]
    outputs.check_outputs(
        sources, [out / "index.html", out / "report.md"], folders=[out, out / "figures"]
    )
    result = load_diff(diff)  # read once: the figures, the facts and the implied σ use it
    calibration = sigma if isinstance(sigma, Calibration) or sigma is None else load_sigma(sigma)
    card = _robustness_summary(robustness)
    why_none = None
    if calibration is None:
        try:
            implied = calibrate(result)
        except (
            HwdiffError
        ) as exc:  # the report still shows the diff; the σ box says why there is no σ
            implied, why_none = None, str(exc)
    else:
        implied = calibration
    temp = outputs.temporary(out / "report")
    try:
        (temp / "figures").mkdir(parents=True)
        sections = _figures(result, calibration, implied, temp / "figures")
        facts = _facts(result, calibration, implied, why_none)
        (temp / "index.html").write_text(
            _html(result, facts, sections, calibration, card), encoding="utf-8"
        )
        (temp / "report.md").write_text(_markdown(result, facts, sections, card), encoding="utf-8")
        drawn = _install(temp, out)
    except OSError as exc:
        raise outputs.write_error(exc, out) from exc
    finally:
        outputs.discard(temp)
    return ReportResult(out / "index.html", out / "report.md", drawn)


def _install(temp: Path, out: Path) -> tuple[Path, ...]:
    """Move a rendered report into ``out``: its figures, then report.md, then index.html; figures
    that the previous report there showed and this one does not are removed, nothing else."""
    (out / "figures").mkdir(parents=True, exist_ok=True)
    previous = _figures_shown(out / "index.html")
    drawn = tuple(sorted((temp / "figures").glob("*.png")))
    installed = tuple(outputs.commit(png, out / "figures" / png.name) for png in drawn)
    for name in previous - {png.name for png in drawn}:
        (out / "figures" / name).unlink(missing_ok=True)
    outputs.commit(temp / "report.md", out / "report.md")
    outputs.commit(temp / "index.html", out / "index.html")
    return installed


def _figures_shown(index: Path) -> set[str]:
    """The figure files an earlier hwdiff report page links to."""
    try:
        return set(
            re.findall(
                r'src="figures/([\w.-]+\.png)"', index.read_text(encoding="utf-8", errors="replace")
            )
        )
    except OSError:
        return set()


def _rel_l2(module: LayerDiff) -> float:
    """A module's relative L2 error for ranking and showing; 0 when not finite (the diff's JSON null)."""
    value = module.metrics.rel_l2
    return value if math.isfinite(value) else 0.0


def _floor(result: DiffResult) -> tuple[float, str]:
    dtypes = [result.reference.get("dtype", "float32"), result.target.get("dtype", "float32")]
    dtype = max(dtypes, key=unit_roundoff)
    return 0.425 * unit_roundoff(dtype), dtype


def _figures(
    result: DiffResult, calibration: Any, implied: Any, folder: Path
) -> list[tuple[str, str, str]]:
    """(title, file name, caption) of every figure drawn; the histograms from the diff's arrays (a
    diff.h5 or a DiffResult; a JSON summary has none). The ULP bins are :func:`ulp_edges`, with which
    the diff counted them (diff.h5 stores a copy)."""
    floor, _ = _floor(result)
    arrays, edges = result.arrays, ulp_edges()
    drawn = [
        (
            "Error vs depth",
            "error_vs_depth.png",
            figures.error_vs_depth(result, folder / "error_vs_depth.png", floor),
        ),
        (
            "1 − cos vs depth",
            "one_minus_cos.png",
            figures.one_minus_cos(result, folder / "one_minus_cos.png"),
        ),
    ]
    if arrays:
        drawn.append(
            (
                "ULP distribution",
                "ulp.png",
                figures.ulp_by_kind(result, arrays, edges, folder / "ulp.png"),
            )
        )
        for index, module in enumerate(_chosen(result)):
            name = f"errors_{index}.png"
            drawn.append(
                (
                    f"Error distribution: {module.name}",
                    name,
                    figures.error_histogram(module, arrays, folder / name),
                )
            )
    for title, name, draw in (
        ("Cross-layer correlation", "correlation.png", figures.correlation),
        ("Local vs propagated error", "local.png", figures.local_vs_propagated),
        ("Golden attribution", "golden.png", figures.golden),
    ):
        drawn.append((title, name, draw(result, folder / name)))
    if result.rl_impact is not None:
        drawn.append(
            (
                "Token log-prob mismatch (Δlogp)",
                "rl_delta.png",
                figures.rl_histogram(result.rl_impact, folder / "rl_delta.png"),
            )
        )
    if calibration is not None:
        drawn.append(
            (
                "σ schedule per norm",
                "sigma.png",
                figures.sigma_schedule(calibration, folder / "sigma.png"),
            )
        )
    if implied is not None:
        pair = f"{result.target.get('device')}-vs-{result.reference.get('device')}"
        caption, _ = figures.qerl_vs_hardware(
            {l.name: l.sigma_end for l in implied.layers}, folder / "qerl.png", pair
        )
        drawn.insert(0, ("Are QeRL's σ values right for hardware errors?", "qerl.png", caption))
    return [
        (title, name, caption) for title, name, caption in drawn if caption
    ]  # None: nothing to draw


def _chosen(result: DiffResult) -> list[LayerDiff]:
    """Histograms for: the worst module, the first divergence, and one norm per block (first, middle, last)."""
    outputs = [m for m in result.outputs if not m.exact and not m.alias_of]
    if not outputs:
        return []
    chosen = [max(outputs, key=_rel_l2)]
    first = result.first_divergence
    if first:
        chosen += [m for m in outputs if m.name == first.detected_at]
    norms = [m for m in outputs if m.kind == "rmsnorm"]
    if norms:
        chosen += [norms[0], norms[len(norms) // 2], norms[-1]]
    unique: list[LayerDiff] = []
    for module in chosen:
        if module.name not in [m.name for m in unique]:
            unique.append(module)
    return unique[:5]


def _facts(
    result: DiffResult, calibration: Any, implied: Any, why_none: str | None = None
) -> dict[str, str]:
    floor, dtype = _floor(result)
    outputs = list(result.outputs)
    worst = sorted((m for m in outputs if not m.alias_of), key=lambda m: -_rel_l2(m))[:5]
    last = outputs[-1] if outputs else None
    facts = {
        "first": _first_fact(result),
        "rule": result.divergence_rule or "",
        "worst": "; ".join(
            f"{m.name} ({_rel_l2(m):.3g} = {_rel_l2(m) / floor:.1f}× one {dtype} rounding)"
            for m in worst
            if _rel_l2(m)
        )
        or "none: the captures are bit-identical",
        "verdict": _verdict(last, floor, dtype) if last else "no modules were compared",
    }
    nonfinite = _nonfinite(outputs)
    if nonfinite:
        facts["verdict"] = f"{nonfinite} {facts['verdict']}"
    facts["sigma"] = _sigma_fact(calibration or implied, calibration is None, why_none)
    facts["rl"], facts["rl_published"] = _rl_fact(result.rl_impact, result.rl_absent)
    return facts


def _rl_fact(rl: RLImpact | None, absent: str) -> tuple[str, str]:
    """("Does it matter for RL?" answer, the comparison with published figures); ``absent``: why there is no block."""
    from ..compare.rl import SLIME_GATE, published_comparison

    if rl is None:
        return f"not measured: {absent}", ""
    text = (
        f"Over {rl.positions} real next-token positions: mean |Δlogp| {rl.mean_abs:.3g}, max "
        f"{rl.max_abs:.3g}, {rl.frac_above[0]:.1%} above 1e-3 and {rl.frac_above[1]:.1%} "
        f"above 1e-2, mean exp(|Δlogp|) {rl.mean_exp_abs:.4f}, K3 KL {rl.k3_kl:.3g}, top-{rl.topk} "
        f"KL {rl.topk_kl:.3g}, top-1 agreement "
        f"{rl.top1_agreement:.1%}. slime's mean |Δlogp| ≤ {SLIME_GATE:g} gate: "
        f"{'passes' if rl.mean_abs <= SLIME_GATE else 'fails'}. mean exp(|Δlogp|) is NeMo-RL's "
        "log-prob consistency metric (its docs, 'Add New Models')."
    )
    return text, "Published figures (sources in docs/rl-impact.md): " + "; ".join(
        published_comparison(rl)
    ) + "."


def _first_fact(result: DiffResult) -> str:
    """The first difference and the first divergence, each said for what it is."""
    difference, first = result.first_difference, result.first_divergence
    if difference is None:
        return "nowhere: every module output is bit-identical"
    differing = round((1 - difference.equal_frac) * difference.numel)
    text = (
        f"The first non-identical module output is {difference.name} ({differing} of {difference.numel or '?'} "
        f"elements differ, relative L2 {difference.rel_l2:.3g}). "
    )
    if first is None:
        local = any(m.local is not None and m.local.verdict is not None for m in result.layers)
        return text + (
            "No module's own (local, replayed) error is beyond rounding."
            if local
            else "No module output is beyond what rounding explains."
        )
    where = first.name + (
        f" (seen at the input of {first.detected_at})" if first.origin == "input" else ""
    )
    if first.basis == "local":
        return (
            text
            + f"The first divergence, the origin, is {where}: its local error (replay) is beyond rounding — {first.reasons}."
        )
    return text + (
        f"The first module beyond rounding is {where} — {first.reasons}; without a replay "
        "(--local) it may carry error propagated from the first non-identical module."
    )


def _nonfinite(outputs: list[LayerDiff]) -> str:
    """A sentence on NaN/Inf in the compared outputs, naming the first module (forward order) that holds them."""
    found = [m for m in outputs if m.metrics.nan_inf.any and not m.alias_of]
    if not found:
        return ""
    n = found[0].metrics.nan_inf
    return (
        f"WARNING: NaN/Inf in {len(found)} module output(s), first at {found[0].name} (reference "
        f"{n.ref_nan} NaN {n.ref_inf} Inf, target {n.target_nan} NaN {n.target_inf} Inf); those "
        "elements are left out of every number below."
    )


def _verdict(last: LayerDiff, floor: float, dtype: str) -> str:
    if last.exact:
        return f"The final output ({last.name}) is bit-identical on both sides."
    ratio = last.metrics.rel_l2 / floor
    size = (
        "within a few roundings of the dtype"
        if ratio < 3
        else "well above one rounding of the dtype"
    )
    return (
        f"At the final output ({last.name}) the two sides differ by relative L2 {last.metrics.rel_l2:.3g}, "
        f"{ratio:.1f}× the error of a single {dtype} rounding ({floor:.3g}): {size}; "
        f"{last.metrics.equal_frac:.1%} of its elements are bit-identical."
    )


def _sigma_fact(calibration: Any, implied: bool, why_none: str | None = None) -> str:
    from ..calibration.types import QERL_PRESETS

    if calibration is None:
        return f"no σ: {why_none or 'no calibration'}"
    active = [l.sigma_end for l in calibration.layers if l.sigma_end > 0]
    s = calibration.schedule
    source = (
        (
            f"estimated here from the diff ({calibration.conversion} conversion; run hwdiff calibrate --verify for "
            "the file and its check)"
        )
        if implied
        else f"from the sigma file ({calibration.method}, {calibration.conversion} conversion)"
    )
    span = f"{min(active):.3g} – {max(active):.3g}" if active else "0"
    presets = "; ".join(f"{name} {a:g} → {b:g}" for name, (a, b) in QERL_PRESETS.items())
    verify = ""
    if calibration.verify is not None:
        lo, hi = calibration.verify.band
        verify = (
            f" Verify: {'passed' if calibration.verify.passed else 'FAILED'} — σ_end injected alone induces "
            f"{lo:g}–{hi:g}× the target error at the sub-block output"
            f"{'' if calibration.verify.passed else f' except at {len(calibration.verify.failed)} norm(s)'}."
        )
    policy = ""
    if getattr(calibration, "policy", None) is not None:
        from ..measure.policy_check import policy_sentence

        policy = " " + policy_sentence(calibration.policy)
    return (
        f"σ_end {s.sigma_end:.3g} (median over norms; per norm {span}), σ_start {s.sigma_start:.3g} "
        f"({calibration.start_rule}), {s.num_stages} stages — {source}. For comparison: {presets}.{verify}"
        f"{policy}{_law_fact(calibration)}"
    )


def _law_fact(calibration: Any) -> str:
    """The noise law and correlation calibrate chose, in words (docs/calibrate.md, "Noise laws")."""
    noisy = [l for l in calibration.layers if l.sigma_end > 0]
    if not noisy:
        return ""
    counts: dict[str, int] = {}
    for layer in noisy:
        counts[layer.law] = counts.get(layer.law, 0) + 1
    law, count = max(counts.items(), key=lambda item: item[1])
    df = next((l.df for l in noisy if l.law == "student_t" and l.df), None)
    example = next((l.law_why for l in noisy if l.law == law and l.law_why), "")
    text = (
        f" Noise law: {law}{f' (df {df:.2f})' if law == 'student_t' and df else ''} for {count} of {len(noisy)} "
        f"norms" + (f" — e.g. {example}" if example else "")
    )
    if getattr(calibration, "correlation_note", ""):
        text += f"; depth correlation ρ = {calibration.rho:g}: {calibration.correlation_note}"
    return text + "."


def _meta_rows(result: DiffResult) -> list[tuple[str, str, str]]:
    ref, tgt = result.reference, result.target

    def show(value: Any) -> str:
        text = str(value)
        return text[:23] + "…" if text.startswith("sha256:") else text

    return [
        (key, show(ref.get(key, "—")), show(tgt.get(key, "—")))
        for key in ("device", *_FLAG_KEYS)
        if key in ref or key in tgt
    ]


def _worst_rows(result: DiffResult, count: int = 15) -> list[LayerDiff]:
    outputs = [m for m in result.outputs if not m.alias_of]
    return sorted(outputs, key=lambda m: -_rel_l2(m))[:count]


def _robustness_summary(card: Any) -> dict | None:
    """The JSON of a robustness card given as a path or a card (None: no robustness section)."""
    if card is None:
        return None
    from ..measure.robustness_run import load_card

    return (load_card(card) if isinstance(card, (str, os.PathLike)) else card).summary()


def _html(
    result: DiffResult, facts: dict, sections: list, calibration: Any, card: dict | None = None
) -> str:
    e = html.escape
    ref, tgt = result.reference, result.target
    meta = "".join(
        f"<tr><td>{e(k)}</td><td>{e(a)}</td><td>{e(b)}</td></tr>" for k, a, b in _meta_rows(result)
    )
    rows = "".join(
        f"<tr><td>{e(m.name)}</td><td>{e(m.kind)}</td><td>{_rel_l2(m):.3g}</td><td>{m.metrics.one_minus_cos:.2g}</td>"
        f"<td>{m.metrics.equal_frac:.1%}</td><td>{_ulp_cell(m)}</td><td>{e(_fit_cell(m))}</td>"
        f"<td>{e(m.verdict.describe()) or '—'}</td></tr>"
        for m in _worst_rows(result)
    )
    figs = "".join(
        f'<figure><h3>{e(t)}</h3><img src="figures/{n}" alt="{e(t)}"><figcaption>{e(c)}</figcaption></figure>'
        for t, n, c in sections
    )
    effect = _effectiveness_html(result, calibration)
    if card is not None:
        from ..measure.robustness_run import card_html

        effect += card_html(card)
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>hwdiff: {e(str(tgt.get("device")))} vs {e(str(ref.get("device")))}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}}
.answers{{background:#f3f6fb;border-left:5px solid #2a5db0;padding:.6em 1em}} .answers dt{{font-weight:bold;margin-top:.5em}}
table{{border-collapse:collapse;font-size:.85em}} td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}
img{{max-width:100%}} figure{{margin:1.5em 0}} figcaption{{font-size:.85em;color:#555}}</style></head><body>
<h1>hwdiff report</h1>
<p>target <b>{e(str(tgt.get("device")))}</b> ({e(str(tgt.get("device_name")))}, {e(str(tgt.get("dtype")))}) against reference
<b>{e(str(ref.get("device")))}</b> ({e(str(ref.get("device_name")))}, {e(str(ref.get("dtype")))}){", golden " + e(str(result.golden.get("device"))) + " " + e(str(result.golden.get("dtype"))) if result.golden else ""}</p>
<dl class="answers">
<dt>Where do the devices first diverge?</dt><dd>{e(facts["first"])}<br><small>{e(facts["rule"])}</small></dd>
<dt>Which layers are worst?</dt><dd>{e(facts["worst"])}</dd>
<dt>Verdict</dt><dd>{e(facts["verdict"])}</dd>
<dt>Which σ to use?</dt><dd>{e(facts["sigma"])}</dd>
<dt>Does it matter for RL?</dt><dd>{e(facts["rl"])}<br><small>{e(facts["rl_published"])}</small></dd>
</dl>
<h2>Captures</h2><table><tr><th>field</th><th>reference</th><th>target</th></tr>{meta}</table>
<h2>Worst modules</h2><table><tr><th>module</th><th>kind</th><th>rel L2</th><th>1−cos</th><th>bit-identical</th><th>ULP p99 (coarser dtype)</th><th>best fit (law)</th><th>beyond rounding</th></tr>{rows}</table>
{effect}
<h2>Figures</h2>{_figures_note(result, figs)}{figs}
<p style="font-size:.8em;color:#777">hwdiff {e(str(result.hwdiff_version))} · definitions: docs/diff.md, docs/calibrate.md</p>
</body></html>
"""


def _effectiveness_html(result: DiffResult, calibration: Any) -> str:
    if calibration is None:
        return ""
    rows = _effectiveness_rows(result, calibration)
    if not rows:
        return (
            "<h2>bf16 effectiveness</h2><p>The reference capture's norm weights were not found "
            f"({html.escape(str(result.reference.get('path')))}); run <code>hwdiff aqn-check</code>.</p>"
        )
    body = "".join(
        f"<tr><td>{stage}</td><td>{lo:.3g} – {hi:.3g}</td><td>{changed:.1%}</td><td>{warn}</td></tr>"
        for stage, lo, hi, changed, warn in rows
    )
    return (
        f"<h2>bf16 effectiveness ({html.escape(str(result.reference.get('dtype')))} weights)</h2><table><tr><th>stage</th>"
        f"<th>σ (min – max over norms)</th><th>changed elements (min over norms)</th><th>note</th></tr>{body}</table>"
    )


def _effectiveness_rows(result: DiffResult, calibration: Any) -> list[tuple]:
    """Per stage: σ range and the smallest fraction of weight elements that change in the training
    dtype — calibrate's exact rounding check (:func:`hwdiff.calibration.with_rounding`), computed here
    for a sigma file that lacks it."""
    from ..calibration.core import reference_weights, with_rounding
    from ..calibration.rounding import CHANGED_WARNING

    if not calibration.rounding:
        calibration = with_rounding(
            calibration,
            reference_weights(result, calibration.layers),
            str(result.reference.get("dtype", "float32")),
        )
    noisy = [l.multiplier for l in calibration.layers if l.multiplier > 0]
    return [
        (
            r.stage,
            r.sigma * min(noisy),
            r.sigma * max(noisy),
            r.min_changed,
            "noise mostly rounded away" if r.min_changed < CHANGED_WARNING else "",
        )
        for r in calibration.rounding
    ]


def _figures_note(result: DiffResult, figs: str) -> str:
    """Why error figures are missing: a bit-identical diff has no error to draw."""
    if result.exact:
        return "<p>No error figures: the captures are bit-identical, there is no error to draw.</p>"
    return "" if figs else "<p>No figures: nothing compared has data to draw.</p>"


def _ulp_cell(module: LayerDiff) -> str:
    p99 = module.metrics.ulp.p99
    return f"{p99 if math.isfinite(p99) else math.inf:.3g} ({module.verdict.coarse_dtype})"


def _fit_cell(module: LayerDiff) -> str:
    """The best law, and whether the absolute or the relative error follows it better."""
    fit = module.fit
    if fit.law == "relative":
        return f"{fit.relative.best} (relative error)"
    return fit.best + (" (absolute error)" if fit.law else "")


def _markdown(result: DiffResult, facts: dict, sections: list, card: dict | None = None) -> str:
    ref, tgt = result.reference, result.target
    lines = [
        f"# hwdiff report: {tgt.get('device')} vs {ref.get('device')}",
        "",
        f"- **Where they first differ and diverge**: {facts['first']}",
        f"- **Worst layers**: {facts['worst']}",
        f"- **Verdict**: {facts['verdict']}",
        f"- **σ to use**: {facts['sigma']}",
        f"- **Does it matter for RL?** {facts['rl']} {facts['rl_published']}".rstrip(),
        "",
        "| | reference | target |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {a} | {b} |" for k, a, b in _meta_rows(result)]
    lines += [
        "",
        "| module | kind | rel L2 | bit-identical | ULP p99 (coarser dtype) | best fit (law) | beyond rounding |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {m.name} | {m.kind} | {_rel_l2(m):.3g} | {m.metrics.equal_frac:.1%} | {_ulp_cell(m)} | "
        f"{_fit_cell(m)} | {m.verdict.describe() or '—'} |"
        for m in _worst_rows(result)
    ]
    if card is not None:
        from ..measure.robustness_run import format_card

        lines += ["", "## Robustness to the calibrated noise", "", "```", format_card(card), "```"]
    for title, name, caption in sections:
        lines += ["", f"## {title}", "", f"![{title}](figures/{name})", "", caption]
    return "\n".join(lines) + "\n"


__all__ = ["report", "ReportResult"]
