"""From measured error to AQN noise: the σ math and the sigma file (torch-free).

AQN adds Z ~ N(0, σ²) channel-wise to an RMSNorm weight w (QeRL eq. 10): the norm output
y = w⊙x̂ becomes (w+Z)⊙x̂, so Δy = Z⊙x̂ and E‖Δy‖² = σ²·Σ_t‖x̂_t‖² = σ²·N (x̂ has unit rms per
token; N = tokens × channels). A relative error ε of the norm output is therefore reproduced by

    σ = ε · rms(y_ref)            (conversion ``output-rms``, exact in expectation)

with rms(y_ref) the rms of the reference norm output over real tokens — whatever the weights and
however x̂'s power is spread over channels (the old shortcut ε·rms(w) is off by several times with
outlier channels). Gemma's y = (1+w)⊙x̂ changes nothing: Δy is still Z⊙x̂.

Which ε: for every norm, the local error (a replay, ``diff --local``) the hardware adds in the norm
(ε_norm) and in the sub-block it feeds (ε_block). Noise at the norm reaches the sub-block's output
through a gain g (relative error there per unit σ): ``output-rms`` assumes g = 1/rms(y) (the
sub-block passes a relative error on unchanged); ``measured`` measures g on a float32 copy of the
model (:mod:`hwdiff.measure.sigma_probe`). Then σ_end = √((ε_norm·rms(y))² + (ε_block/g)²). Without local
errors calibrate refuses: the divergence-increment estimate was measured 1.1–21× off.

The schedule: σ_end per norm; one global schedule (the median σ_end, QeRL's stage formula) and a
multiplier per norm, as the verl fork applies it. σ_start follows a stated rule
(:func:`start_rule`): ``factor``·σ_end, capped at QeRL's largest σ_start relative to the weights."""

from __future__ import annotations

from ..common.lazy import reexport

# every name the module had before it became a package (defined there or imported into it), and where it is now
_EXPORTS = {
    "SigmaSchedule": "types",
    "_num": "types",
    "SCHEMA": "types",
    "READABLE_SCHEMAS": "types",
    "CONVERSIONS": "types",
    "QERL_PRESETS": "types",
    "UNATTRIBUTED_NOTE": "types",
    "METHOD_NOTE": "types",
    "CONVERSION_NOTES": "types",
    "LayerSigma": "types",
    "VerifyLayer": "types",
    "VerifyResult": "types",
    "StageRounding": "types",
    "PolicyCheck": "types",
    "Calibration": "types",
    "__version__": "sigmafile",
    "HwdiffError": "sigmafile",
    "save_sigma": "sigmafile",
    "load_sigma": "sigmafile",
    "save": "sigmafile",
    "write_yaml": "sigmafile",
    "to_dict": "sigmafile",
    "_layer_dict": "sigmafile",
    "read_sigma": "sigmafile",
    "_calibration": "sigmafile",
    "_layer": "sigmafile",
    "KINDS": "schedule",
    "MIN_STAGES": "schedule",
    "CHANGED_WARNING": "rounding",
    "neighbours": "rounding",
    "_bf16_step": "rounding",
    "changed_fraction": "rounding",
    "layer_index": "norms",
    "LOCAL_OVER_TOTAL": "norms",
    "NormError": "norms",
    "norm_errors": "norms",
    "NormMap": "norms",
    "norm_map": "norms",
    "_nested_power": "norms",
    "Attribution": "norms",
    "attribution": "norms",
    "_zero_reason": "norms",
    "_final_norm_without_head": "norms",
    "layout_notes": "norms",
    "fused_add_norms": "norms",
    "sub_blocks": "norms",
    "_local_error": "norms",
    "_norm_error": "norms",
    "_untrusted": "norms",
    "format_calibration": "text",
    "_law_text": "text",
    "_rounding_lines": "text",
    "_verify_lines": "text",
    "_fmt": "text",
    "format_policy": "text",
    "policy_sentence": "text",
    "QERL_MAX_START": "core",
    "GainRequest": "core",
    "GainProbe": "core",
    "calibrate": "core",
    "norms_to_probe": "core",
    "_gain_request": "core",
    "with_laws": "core",
    "_law_missing": "core",
    "with_sigmas": "core",
    "NEAR_EPS": "core",
    "normalised_rms": "core",
    "_xhat_rms": "core",
    "sigma_end": "core",
    "start_rule": "core",
    "_provenance": "core",
    "with_rounding": "core",
    "reference_weights": "core",
}

# `from hwdiff.calibration import *` gives the public names, as when it was one module
__all__, __getattr__, __dir__ = reexport(__name__, _EXPORTS)
