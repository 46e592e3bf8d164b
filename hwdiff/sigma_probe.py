"""The torch side of calibration: sub-block gains measured on the model, and the closed-loop verify.

Both inject noise at one norm at a time into a float32 copy of the model (in bf16 a small σ is
mostly rounded away: the nominal σ is not what acts) and run the shipped prompts, cut to a common
length so that every position is a real token. What acted is measured, not assumed: the realized
σ is rms(Δy) at the norm's own output — exactly the channel-power-weighted rms of the realized
weight change, sqrt(Σ_c Δw_c²·P_c / Σ_c P_c) with P_c = Σ_t x̂_tc² — and the induced error is
read at the output of the sub-block the norm feeds.
"""
from __future__ import annotations

import copy
import logging
import math
import re
from typing import Any, Iterable

from .calibration import Calibration, VerifyLayer, VerifyResult, load_summary
from .errors import HwdiffError

log = logging.getLogger(__name__)
VERIFY_BAND = (0.67, 1.5)
PROBE_PROMPTS, PROBE_TOKENS = 4, 48


class _Probe:
    """A float32 copy of ``model`` run on fixed unpadded inputs, recording ``names``' outputs."""

    def __init__(self, model: Any, names: Iterable[str], reference: str | None = None, *,
                 keep_inputs: bool = False) -> None:
        import torch

        self.model = copy.deepcopy(model).float().eval()
        self.names = sorted(set(names))
        self.keep_inputs = keep_inputs  # the norms' inputs, for the law of the induced noise (verify)
        ids, mask = _probe_inputs(model, reference)
        length = int(mask.sum(axis=1).min())  # a common length: no padding anywhere
        device = next(self.model.parameters()).device
        self.ids = torch.from_numpy(ids[:, :length].astype("int64")).to(device)
        self.clean = self.run()

    def run(self) -> dict[str, Any]:
        import torch

        from .hooks import record

        with torch.no_grad(), record(self.model, [f"^{re.escape(n)}$" for n in self.names],
                                            record_inputs=self.keep_inputs) as rec:
            self.model(input_ids=self.ids, use_cache=False)
        out = {key[0]: values[0].double() for key, values in rec.activations.items()
               if key[2] == "output" and key[1] == 0}
        self.inputs = {key[0]: values[0].double() for key, values in rec.activations.items()
                       if key[2] == "input" and key[1] == 0}
        return out

    def inject(self, norm: str, sigma: float, seed: int, law: str = "gaussian",
               df: float | None = None) -> tuple[float, dict[str, float]]:
        """(realized σ at ``norm``, {module: relative L2 error induced there}) for σ at ``norm`` alone;
        keeps the induced change at the norm's output in ``self.last_delta``."""
        from .aqn import AQNInjector

        with AQNInjector(self.model, {norm: sigma}, law=law, df=df, check_count=False) as injector:
            injector.apply(seed=seed)
            noisy = self.run()
        self.last_delta = noisy[norm] - self.clean[norm]
        realized = float(self.last_delta.pow(2).mean().sqrt())
        return realized, {name: _relative(self.clean[name], noisy[name]) for name in self.names}

    def induced_noise(self, norm: str) -> Any:
        """The weight noise that explains the last induced change at ``norm`` (hwdiff.laws.equivalent_noise)."""
        from .laws import equivalent_noise

        x = self.inputs[norm].reshape(-1, self.inputs[norm].shape[-1]).numpy()
        x_hat = x / ((x * x).mean(axis=1, keepdims=True) + 1e-6) ** 0.5
        return equivalent_noise(self.last_delta.reshape(-1, x.shape[-1]).numpy(), x_hat)


def _probe_inputs(model: Any, reference: str | None) -> tuple[Any, Any]:
    """Token ids and mask to probe with: the first prompts the reference capture ran (the inputs the
    error was measured on; no tokenizer needed), else the shipped prompts through the model's tokenizer."""
    from pathlib import Path

    if reference and Path(reference).exists():  # a capture file, or a multi-rank capture's directory
        from .store import open_capture

        with open_capture(reference) as cap:
            ids, mask = cap.input_ids[:PROBE_PROMPTS, :PROBE_TOKENS], cap.attention_mask[:PROBE_PROMPTS, :PROBE_TOKENS]
        if mask.sum(axis=1).min() > 0:
            return ids, mask
    from .capturing import model_tokenizer
    from .inputs import load_inputs

    inputs = load_inputs(tokenizer=model_tokenizer(model), max_tokens=PROBE_TOKENS, limit=PROBE_PROMPTS)
    return inputs.input_ids, inputs.attention_mask


def _relative(reference: Any, other: Any) -> float:
    norm = float(reference.norm())
    return float((other - reference).norm()) / norm if norm else math.nan


def measure_gains(model: Any, norms: list[tuple[str, str | None]], *, seeds: int = 2,
                  probe_rel: float = 1e-3, reference: str | None = None) -> dict[str, float]:
    """Relative error at each norm's sub-block output per unit realized σ (norms without a sub-block
    are left out). The probe σ is ``probe_rel`` × rms of the norm's clean output. ``reference``: a
    capture whose first prompts to run (default: the shipped prompts, tokenized)."""
    pairs = [(norm, block) for norm, block in norms if block]
    if not pairs:
        return {}
    probe = _Probe(model, [n for pair in pairs for n in pair], reference)
    gains = {}
    for index, (norm, block) in enumerate(pairs):
        sigma = probe_rel * float(probe.clean[norm].pow(2).mean().sqrt())
        runs = [probe.inject(norm, sigma, seed=1000 * index + s) for s in range(seeds)]
        gains[norm] = _rms([errors[block] for _, errors in runs]) / _rms([realized for realized, _ in runs])
        log.info("gain %s -> %s: %.4g per unit sigma", norm, block, gains[norm])
    return gains


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def verify(calibration: Calibration, model: Any, *, seeds: int = 3,
           band: tuple[float, float] = VERIFY_BAND) -> VerifyResult:
    """Inject each norm's σ_end alone (``seeds`` draws) into a float32 copy of ``model`` and compare the
    relative error it induces at the sub-block output (at the norm when it feeds none) with the error
    the hardware makes there: the sub-block's local error and the norm's own error carried through the
    gain that acted in this very injection (induced error / realized σ) — the hardware's norm error
    reaches the sub-block through the same gain as the noise. So the check isolates what calibrate
    assumed or measured elsewhere: the gain applied to the sub-block's own error, and σ itself. A ratio
    outside ``band`` fails. Norms with σ_end = 0 are not injected."""
    layers = [layer for layer in calibration.layers if layer.sigma_end > 0]
    if not layers:
        raise HwdiffError("no norm has sigma_end > 0: nothing to verify")
    import numpy as np

    from .laws import fit_law

    reference = (calibration.provenance.get("reference") or {}).get("path")
    probe = _Probe(model, [n for l in layers for n in (l.name, l.sub_block) if n], reference, keep_inputs=True)
    checks = []
    for index, layer in enumerate(layers):
        where = layer.sub_block or layer.name
        runs, noise = [], []
        for s in range(seeds):
            runs.append(probe.inject(layer.name, layer.sigma_end, seed=7919 * index + s, law=layer.law, df=layer.df))
            noise.append(probe.induced_noise(layer.name))
        induced_error, realized = _rms([e[where] for _, e in runs]), _rms([r for r, _ in runs])
        gain = induced_error / realized if realized else math.nan  # the gain that acted, measured here
        target = math.hypot(gain * layer.norm_error * layer.output_rms, layer.block_error)
        fitted = fit_law(np.concatenate(noise))
        checks.append(VerifyLayer(layer.name, where, target, induced_error, realized, layer.law, fitted.law, fitted.df))
    method = (f"sigma_end injected at one norm at a time into a float32 copy of the model ({seeds} seeds, the first "
              f"{PROBE_PROMPTS} prompts of the reference capture, cut to a common length); induced = relative L2 "
              "error at the sub-block output")
    return VerifyResult(tuple(checks), band, seeds, method, calibration.unreproduced)


def reference_model(diff: Any, *, spec: str | None = None, device: str = "cpu") -> Any:
    """The model of a diff's reference capture (its spec, seed and dtype), or ``spec`` instead."""
    from .models import load_model

    reference = load_summary(diff).get("reference") or {}
    model_spec = spec or reference.get("model_spec")
    if not model_spec or str(model_spec).startswith("object:"):
        raise HwdiffError("the diff does not name a loadable reference model; pass --model SPEC")
    return load_model(str(model_spec), device=device, dtype=str(reference.get("dtype", "float32")))
