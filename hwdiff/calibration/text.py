"""A calibration as text: the table calibrate prints, the verify and policy-check lines."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .types import METHOD_NOTE, QERL_PRESETS, Calibration, LayerSigma, PolicyCheck, VerifyResult

if TYPE_CHECKING:
    pass
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
def format_calibration(calibration: Calibration) -> str:
    """The terminal summary: method, conversion, schedule vs QeRL's presets, σ per norm, checks."""
    s = calibration.schedule
    presets = "; ".join(f"{name} {a:g} -> {b:g}" for name, (a, b) in QERL_PRESETS.items())
    lines = [
        f"method: {calibration.method} ({METHOD_NOTE})",
        f"conversion: {calibration.conversion}",
        f"schedule: {s.kind}, {s.num_stages} stages, sigma {s.sigma_start:.3g} -> {s.sigma_end:.3g} "
        f"(sigma_start rule: {calibration.start_rule})",
        f"for comparison: {presets}",
        "",
        f"{'norm':<42} {'target err':>10} {'y rms':>7} {'sigma_end':>10} {'sigma_start':>11} {'mult':>6} {'law':>14}"
        + ("  verify (induced/target)" if calibration.verify else ""),
    ]
    for layer in calibration.layers:
        row = (
            f"{layer.name:<42} {layer.target_error:>10.3g} {layer.output_rms:>7.3f} {layer.sigma_end:>10.3g} "
            f"{layer.sigma_start:>11.3g} {layer.multiplier:>6.2f} {_law_text(layer):>14}"
        )
        if calibration.verify and any(v.name == layer.name for v in calibration.verify.layers):
            check = calibration.verify.layer(layer.name)
            row += f"  {check.ratio:.2f} at {check.measured_at.rsplit('.', 2)[-2:][-1]}"
        lines.append(row)
    for name, reason in calibration.skipped.items():
        lines.append(f"{name:<42} skipped: {reason}")
    for name, reason in calibration.zero_sigma.items():
        lines.append(f"{name:<42} sigma 0: {reason}")
    if calibration.roles_from:
        lines.append(f"norm -> sub-block map: {calibration.roles_from}")
    if calibration.unattributed:
        lines.append(
            f"unattributed local error ({calibration.unattributed_fraction:.1%} of the sub-blocks' squared local "
            "error; no norm's sigma carries it):"
        )
        lines += [f"  {name:<40} {error:.3g}" for name, error in calibration.unattributed.items()]
    lines += (
        _rounding_lines(calibration)
        + _verify_lines(calibration.verify)
        + format_policy(calibration.policy)
    )
    if (
        calibration.verify is not None
        and not calibration.verify.passed
        and calibration.conversion == "output-rms"
    ):
        lines.append(
            "  the sub-blocks do not pass a relative error on unchanged here: --conversion measured measures "
            "their gain on the model"
        )
    if calibration.correlation_note:
        lines.append(
            f"\ncorrelation along depth: rho {calibration.rho:g} — {calibration.correlation_note}"
        )
    lines += [f"warning: {w}" for w in calibration.warnings]
    return "\n".join(lines)


def _law_text(layer: LayerSigma) -> str:
    if layer.sigma_end == 0:
        return "-"
    return f"student_t({layer.df:.2f})" if layer.law == "student_t" and layer.df else layer.law


def _rounding_lines(calibration: Calibration) -> list[str]:
    from .rounding import CHANGED_WARNING

    if not calibration.rounding:
        return []
    lines = [
        "",
        f"weight elements changed per stage in {calibration.rounding_dtype} (min / median over norms):",
    ]
    lines += [
        f"  stage {r.stage}: sigma {r.sigma:.3g}: {r.min_changed:.1%} / {r.median_changed:.1%}"
        + ("  <- mostly rounded away" if r.min_changed < CHANGED_WARNING else "")
        for r in calibration.rounding
    ]
    return lines


def _verify_lines(result: VerifyResult | None) -> list[str]:
    if result is None:
        return []
    lo, hi = result.band
    verdict = "PASS" if result.passed else f"FAIL ({len(result.failed)} norm(s) outside)"
    ratios = [l.ratio for l in result.layers]
    errors = [l.ratio_se for l in result.layers if l.ratio_se is not None]
    draws = sorted(l.draws for l in result.layers)
    spread = (
        f"{min(draws)}-{max(draws)} draws per norm, standard error of each ratio at most {max(errors):.1%}"
        if errors
        else f"{result.seeds} seeds, standard error not estimated"
    )
    lines = [
        "",
        f"verify: {verdict} — induced/target {min(ratios):.3g}-{max(ratios):.3g} over {len(ratios)} norms "
        f"(band {lo:g}-{hi:g}) at the sub-block output; {spread}",
    ]
    lines += [
        f"  {l.name}: {l.ratio:.3g}"
        + (f" ± {l.ratio * l.ratio_se:.2g}" if l.ratio_se is not None else "")
        for l in result.failed[:5]
    ]
    if result.unreproduced:
        lines.append(
            f"verify: FAIL — sigma 0 or none at {', '.join(result.unreproduced)} while the sub-block it maps to "
            "has local error"
        )
    checked = [l for l in result.layers if l.law_induced is not None]
    if checked:
        lines.append(
            f"verify law: the noise recovered from the induced error fits the calibrated law at "
            f"{len(checked) - len(result.law_mismatches)} of {len(checked)} norms"
            + "".join(
                f"; {l.name}: {l.law} injected, {l.law_induced} fitted"
                for l in result.law_mismatches[:3]
            )
        )
    return lines


def _fmt(stat: dict[str, Any], spec: str) -> str:
    if stat.get("value") is None:
        return stat.get("why", "no value")
    bounds = "" if stat.get("low") is None else f" [{stat['low']:{spec}}, {stat['high']:{spec}}]"
    return f"{stat['value']:{spec}}{bounds}"


def format_policy(check: PolicyCheck | None) -> list[str]:
    """The terminal lines of the check (none without one)."""
    if check is None:
        return []
    m = check.model
    lines = [
        "",
        f"policy check: all sigma_end at once, {check.draws} draws (seed {check.seed}), {check.prompts} "
        f"prompts ({check.positions} positions), {m.get('dtype')} {m.get('attn_implementation')}; "
        f"intervals {check.confidence:.0%} bootstrap",
        f"  {'':22}{'noise (all norms)':32}{'hardware pair':16}noise / hardware",
    ]
    for label, stat, spec in (
        ("mean |Δlogp| (nats)", "mean_abs", ".4g"),
        ("K3 KL", "k3_kl", ".3g"),
        ("top-1 agreement", "top1_agreement", ".4f"),
    ):
        ratio = _fmt(check.ratio[stat], ".3g") if stat in check.ratio else ""
        lines.append(
            f"  {label:22}{_fmt(check.emulated[stat], spec):32}{check.hardware[stat]:<16{spec}}{ratio}"
        )
    return lines


def policy_sentence(check: PolicyCheck) -> str:
    """One sentence for the report."""
    r, h, e = check.ratio, check.hardware, check.emulated
    return (
        f"Policy check (all σ_end at once, {check.draws} draws, {check.positions} positions): mean |Δlogp| "
        f"{_fmt(e['mean_abs'], '.3g')} under the noise against {h['mean_abs']:.3g} on the hardware pair, ratio "
        f"{_fmt(r['mean_abs'], '.3g')}; K3 KL {_fmt(e['k3_kl'], '.3g')} against {h['k3_kl']:.3g}, ratio "
        f"{_fmt(r['k3_kl'], '.3g')}; top-1 agreement {_fmt(e['top1_agreement'], '.4f')} against "
        f"{h['top1_agreement']:.4f} ({check.confidence:.0%} bootstrap intervals)."
    )
