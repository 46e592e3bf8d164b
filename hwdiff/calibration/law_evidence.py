"""Which noise law and which depth correlation reproduce a measured local error (numpy + the store).

For each norm: its recorded input x (reference capture, ``--record-inputs``), x̂ = x/rms(x) per token,
and its local error e = local output − reference output over real tokens give the equivalent weight
noise Z_c (:func:`hwdiff.compare.laws.equivalent_noise`); its fits choose the law, Student-t's df is pooled
over the norms that choose it, and consecutive layers' Z of the same norm class give the correlation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..compare.laws import LawFit, depth_correlation, equivalent_noise, fit_law, pooled_df
from ..errors import HwdiffError
from ..structure import depth_chains

if TYPE_CHECKING:
    from ..compare.results import DiffResult

log = logging.getLogger(__name__)
EPS = 1e-6  # the norms' epsilon: negligible against rms(x) of real activations


@dataclass(frozen=True)
class LawEvidence:
    fits: dict[str, LawFit] = field(default_factory=dict)
    df: float | None = None  # pooled over the norms whose best law is student_t
    rho: float = 0.0  # recommended correlation of consecutive layers' noise (0 unless significant)
    rho_measured: float = math.nan
    rho_stderr: float = math.nan
    note: str = ""


def law_evidence(diff: DiffResult, names: list[str]) -> LawEvidence:
    """Law fits of ``names`` from the captures a diff points to; an empty evidence with the
    reason when they are not at hand (never an error: Gaussian is then assumed, and said)."""
    ref_path = diff.reference.get("path")
    loc_path = (diff.local or {}).get("path")
    if (
        not ref_path or not loc_path or not Path(ref_path).exists() or not Path(loc_path).exists()
    ):  # file or directory
        return LawEvidence(
            note="law: Gaussian assumed — the reference and local captures are not at hand"
        )
    from ..store.reader import open_capture

    try:
        with open_capture(ref_path) as ref, open_capture(loc_path) as loc:
            if ref.mode != "full" or loc.mode != "full":
                return LawEvidence(note="law: Gaussian assumed — the law needs full-mode captures")
            mask = ref.attention_mask.astype(bool)
            noise = {name: _noise(ref, loc, name, mask) for name in names}
    except (HwdiffError, OSError) as exc:
        return LawEvidence(note=f"law: Gaussian assumed — {exc}")
    present = {name: z for name, z in noise.items() if z is not None}
    if not present:
        return LawEvidence(
            note="law: Gaussian assumed — the reference has no recorded norm inputs (--record-inputs)"
        )
    return _evidence(present)


def _noise(ref: Any, loc: Any, name: str, mask: np.ndarray) -> np.ndarray | None:
    if name not in ref.modules or name not in loc.modules:
        return None
    try:
        x = ref.activation(name, slot="input")
    except (KeyError, HwdiffError):
        return None
    y_ref, y_loc = ref.activation(name), loc.activation(name)
    if x.shape != y_ref.shape or x.shape[:2] != mask.shape:
        return None
    # [real tokens, …, channels] → one row per normalised vector: q/k norms ([b, t, heads, head_dim]) and
    # Qwen3-Next's gated norm normalise each head's vector over the last axis, which the weight scales
    rows = (-1, x.shape[-1])
    x = x[mask].astype(np.float64).reshape(rows)
    e = (y_loc[mask].astype(np.float64) - y_ref[mask].astype(np.float64)).reshape(rows)
    x_hat = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + EPS)
    return equivalent_noise(e, x_hat)


def _evidence(noise: dict[str, np.ndarray]) -> LawEvidence:
    fits = {name: fit_law(z) for name, z in noise.items() if np.any(z)}
    heavy = [name for name, fit in fits.items() if fit.law == "student_t"]
    df = pooled_df([noise[n] for n in heavy], [fits[n].scale for n in heavy]) if heavy else None
    if df is not None and df <= 2:
        df = 2.05  # a variance must exist for σ to mean anything; the closest law that has one
    fits = {
        name: LawFit(fit.law, df if fit.law == "student_t" else None, fit.scale, fit.n, fit.why)
        for name, fit in fits.items()
    }
    chains = depth_chains(name for name, z in noise.items() if np.any(z))
    values = [
        depth_correlation([noise[name] for name in chain]) for chain in chains if len(chain) > 1
    ]
    values = [v for v in values if math.isfinite(v[0])]
    if not values:
        return LawEvidence(
            fits, df, note="correlation: fewer than two layers with error in any norm class"
        )
    rho = float(np.mean([v[0] for v in values]))
    stderr = float(math.sqrt(sum(v[1] ** 2 for v in values)) / len(values))
    significant = abs(rho) > 3 * stderr
    note = (
        f"consecutive layers' equivalent weight noise correlates at {rho:.2f} ± {stderr:.2f} "
        + ("(significant: recommended)" if significant else "(not significant: 0 recommended)")
    )
    return LawEvidence(fits, df, round(rho, 3) if significant else 0.0, rho, stderr, note)
