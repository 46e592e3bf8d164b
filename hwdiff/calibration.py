"""From measured error to AQN noise: per-norm σ schedules, exports for verl and QeRL.

AQN adds Z ~ N(0, σ²) to an RMSNorm weight w, so the norm output w⊙x̂ becomes (w+Z)⊙x̂: a relative
perturbation of RMS ≈ σ/rms(w). Reading that backwards, a relative error ε at the place a norm
feeds is matched by σ ≈ ε·rms(w) (the "rms" conversion). For each norm hwdiff takes the error the
hardware introduces in the norm itself (ε_norm) and in the sub-block it feeds (ε_block:
input_layernorm → self_attn, post_attention_layernorm → mlp, final norm → lm_head), as local errors
from a replay (``diff --local``), combines them as independent powers and converts:
σ_end = rms(w)·√(ε_norm² + ε_block²). With a model at hand the conversion can be measured instead
("measured"): a small known σ₀ injected at that norm alone induces relative errors g_norm·σ₀ at
the norm and g_block·σ₀ at the sub-block output, and σ_end = √((ε_norm/g_norm)² + (ε_block/g_block)²).
Without local errors the divergence *increments* stand in (ε_norm: the error added between the
norm's input and output; ε_block: between the norm's output and the sub-block's), a weaker estimate
that the output names.

Per norm: σ_end as above, σ_start = factor·σ_end (QeRL's ratio 100 by default), K stages; the global
schedule uses the median σ_end and each norm's ``multiplier`` = its σ_end / the median.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import HwdiffError
from .schedule import SigmaSchedule

log = logging.getLogger(__name__)
SCHEMA = "hwdiff/sigma/1"
SUB_BLOCK_KINDS = ("attention", "mlp", "head")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class LayerSigma:
    """The calibrated noise of one RMSNorm."""

    name: str
    layer_index: int | None
    sub_block: str | None
    norm_error: float  # relative error the hardware adds in the norm
    block_error: float  # relative error the hardware adds in the sub-block the norm feeds
    weight_rms: float
    sigma_end: float
    sigma_start: float
    multiplier: float
    gain_norm: float | None = None  # measured conversion: relative error per unit σ at the norm
    gain_block: float | None = None  # ... and at the sub-block's output

    @property
    def measured_error(self) -> float:
        return math.hypot(self.norm_error, self.block_error)


@dataclass(frozen=True)
class Calibration:
    layers: tuple[LayerSigma, ...]
    schedule: SigmaSchedule
    method: str  # "local" or "increments"
    conversion: str  # "rms" or "measured"
    factor: float
    provenance: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] | None = None

    def layer(self, name: str) -> LayerSigma:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def schedule_for(self, name: str) -> SigmaSchedule | None:
        """The per-norm schedule (the global one times the norm's multiplier), or None if not calibrated."""
        try:
            layer = self.layer(name)
        except KeyError:
            return None
        if layer.sigma_end == 0:
            return None  # the hardware adds no error here: no noise
        return replace(self.schedule, sigma_start=layer.sigma_start, sigma_end=layer.sigma_end)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "hwdiff_version": __version__, "method": self.method,
            "method_note": METHOD_NOTES[self.method], "conversion": self.conversion,
            "schedule": {"kind": self.schedule.kind, "sigma_start": self.schedule.sigma_start,
                         "sigma_end": self.schedule.sigma_end, "num_stages": self.schedule.num_stages,
                         "factor": self.factor, "values": list(self.schedule.values)},
            "layers": {layer.name: _layer_dict(layer) for layer in self.layers},
            "provenance": self.provenance,
            **({"verify": self.verify} if self.verify is not None else {}),
        }


METHOD_NOTES = {
    "local": "local errors from a replay of the reference's inputs on the target device (diff --local)",
    "increments": "WEAKER ESTIMATE: no local errors were given, so the measured divergence increments "
                  "(error added between a norm's input and its sub-block's output, inherited error included "
                  "only as far as it grows there) stand in; replay the reference on the target device and "
                  "diff with --local for the preferred measurement",
}


def _layer_dict(layer: LayerSigma) -> dict[str, Any]:
    out = {"layer_index": layer.layer_index, "sub_block": layer.sub_block, "measured_error": layer.measured_error,
           "norm_error": layer.norm_error, "block_error": layer.block_error, "weight_rms": layer.weight_rms,
           "sigma_start": layer.sigma_start, "sigma_end": layer.sigma_end, "multiplier": layer.multiplier}
    if layer.gain_norm is not None:
        out.update(gain_norm=layer.gain_norm, gain_block=layer.gain_block)
    return out


# ------------------------------------------------------------------------------------------------
def calibrate(diff: Any, *, factor: float = 100.0, num_stages: int = 10, kind: str = "qerl-code",
              model: Any = None, probe_sigma: float = 1e-3) -> Calibration:
    """Per-norm σ schedules from a diff (a DiffResult, a diff.h5 or a diff JSON summary).

    ``model``: when given, the σ ↔ error conversion is measured on it (see the module docstring)
    instead of assumed. Raises :class:`HwdiffError` for a diff without RMSNorm outputs, a diff
    with no error at all, or an out-of-range schedule.
    """
    if not (factor >= 1 and math.isfinite(factor)):
        raise HwdiffError(f"factor (σ_start / σ_end) must be ≥ 1, got {factor}")
    summary = load_summary(diff)
    modules = [m for m in summary["modules"]]
    norms = [m for m in modules if m["kind"] == "rmsnorm" and m["slot"] == "output"]
    if not norms:
        raise HwdiffError("the diff has no RMSNorm outputs: capture the norms (the default module selection does)")
    method = "local" if all(m.get("local_rel_l2") is not None for m in norms) else "increments"
    errors = {m["name"]: _errors(m, modules, method) for m in norms}
    gains = _measure_gains(model, [(m["name"], errors[m["name"]][2]) for m in norms], probe_sigma) if model else {}
    sigmas = {name: _sigma(errors[name], _weight_rms(m), gains.get(name)) for name, m in
              ((m["name"], m) for m in norms)}
    positive = [value for value in sigmas.values() if value > 0]
    if not positive:
        raise HwdiffError("the diff shows no error at any RMSNorm or sub-block: there is nothing to calibrate")
    center = statistics.median(positive)
    schedule = SigmaSchedule(factor * center, center, num_stages, kind)
    layers = tuple(LayerSigma(
        name=m["name"], layer_index=_layer_index(m["name"]), sub_block=errors[m["name"]][2],
        norm_error=errors[m["name"]][0], block_error=errors[m["name"]][1], weight_rms=_weight_rms(m),
        sigma_end=sigmas[m["name"]], sigma_start=factor * sigmas[m["name"]], multiplier=sigmas[m["name"]] / center,
        gain_norm=gains.get(m["name"], (None, None))[0], gain_block=gains.get(m["name"], (None, None))[1],
    ) for m in norms)
    return Calibration(layers, schedule, method, "measured" if gains else "rms", factor, _provenance(summary, diff))


def load_summary(diff: Any) -> dict[str, Any]:
    """The ``hwdiff/diff-summary/1`` dict of a DiffResult, a diff.h5 or a diff JSON file."""
    from .compare.output import DIFF_SCHEMA, SUMMARY_SCHEMA, summary

    if hasattr(diff, "layers") and hasattr(diff, "first_divergence"):
        return summary(diff)
    path = Path(diff)
    if not path.is_file():
        raise HwdiffError(f"{path}: no such diff file")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HwdiffError(f"{path} is not a diff summary (invalid JSON: {exc})") from exc
        if not isinstance(data, dict) or data.get("schema") != SUMMARY_SCHEMA:
            raise HwdiffError(f"{path} is not a diff summary of schema {SUMMARY_SCHEMA}")
        return data
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if handle.attrs.get("schema") != DIFF_SCHEMA or not handle.attrs.get("complete"):
                raise HwdiffError(f"{path} is not a complete diff file of schema {DIFF_SCHEMA}")
            return json.loads(handle.attrs["summary"])
    except OSError as exc:
        raise HwdiffError(f"{path} is not a readable diff file ({exc})") from exc


def _errors(norm: dict, modules: list[dict], method: str) -> tuple[float, float, str | None]:
    """(ε_norm, ε_block, sub-block name) of one norm."""
    outputs = [m for m in modules if m["slot"] == "output"]
    position = next(i for i, m in enumerate(outputs) if m["name"] == norm["name"])
    block = next((m for m in outputs[position + 1:] if m["kind"] in SUB_BLOCK_KINDS), None)
    if method == "local":
        block_error = (block.get("local_rel_l2") or 0.0) if block else 0.0
        return float(norm["local_rel_l2"]), float(block_error), block["name"] if block else None
    before = _input_error(norm, modules, outputs[:position])
    norm_error = math.sqrt(max(_rel(norm) ** 2 - before ** 2, 0.0))
    block_error = math.sqrt(max(_rel(block) ** 2 - _rel(norm) ** 2, 0.0)) if block else 0.0
    return norm_error, block_error, block["name"] if block else None


def _input_error(norm: dict, modules: list[dict], earlier: list[dict]) -> float:
    recorded = next((m for m in modules if m["name"] == norm["name"] and m["slot"] == "input"), None)
    if recorded is not None:
        return _rel(recorded)
    stream = [m for m in earlier if m["kind"] in ("decoder_layer", "embedding")]
    return _rel(stream[-1]) if stream else 0.0


def _rel(module: dict | None) -> float:
    value = None if module is None else module.get("rel_l2")
    return float(value) if value is not None and math.isfinite(value) else 0.0


def _weight_rms(norm: dict) -> float:
    value = norm.get("weight_rms")
    if value is None:
        raise HwdiffError(f"the diff has no weight for {norm['name']}: diff captures that store norm weights "
                          "(every capture of hwdiff ≥ 0.1 does)")
    return float(value)


def _sigma(errors: tuple[float, float, str | None], weight_rms: float, gains: tuple[float, float] | None) -> float:
    norm_error, block_error, _ = errors
    if gains is None:
        return weight_rms * math.hypot(norm_error, block_error)
    gain_norm, gain_block = gains
    return math.hypot(norm_error / gain_norm if gain_norm else 0.0, block_error / gain_block if gain_block else 0.0)


def _layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _provenance(summary: dict, diff: Any) -> dict[str, Any]:
    return {"diff": str(diff) if isinstance(diff, (str, os.PathLike)) else "in memory",
            "reference": summary.get("reference"), "target": summary.get("target"),
            "golden": summary.get("golden"), "hwdiff_version": __version__}


def _measure_gains(model: Any, norms: list[tuple[str, str | None]], probe_sigma: float) -> dict[str, tuple[float, float]]:
    """Relative error per unit σ at each norm and at its sub-block output, injecting σ₀ at one norm at a time."""
    import torch

    from .aqn import AQNInjector
    from .capturing import model_tokenizer
    from .hooks import record
    from .inputs import load_inputs

    names = [name for name, _ in norms] + [block for _, block in norms if block]
    inputs = load_inputs(tokenizer=model_tokenizer(model), max_tokens=64, limit=4)
    device = next(model.parameters()).device
    ids, mask = (torch.from_numpy(a).to(device) for a in (inputs.input_ids, inputs.attention_mask))

    def run() -> dict[str, torch.Tensor]:
        with torch.inference_mode(), record(model, [f"^{re.escape(n)}$" for n in names]) as rec:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        return {key[0]: values[0].double() for key, values in rec.activations.items() if key[2] == "output"}

    clean = run()
    gains = {}
    for index, (name, block) in enumerate(norms):
        with AQNInjector(model, {name: probe_sigma}) as injector:
            injector.apply(seed=index)
            noisy = run()
        gains[name] = (_relative(clean[name], noisy[name]) / probe_sigma,
                       _relative(clean[block], noisy[block]) / probe_sigma if block else 0.0)
    return gains


def _relative(reference: Any, other: Any) -> float:
    return float((other - reference).norm() / reference.norm())


# ------------------------------------------------------------------------------------------------
def save_sigma(calibration: Calibration, path: str | os.PathLike) -> Path:
    """Write ``sigma.yaml`` (schema ``hwdiff/sigma/1``) atomically."""
    return _write_yaml(Path(path), calibration.to_dict())


def load_sigma(path: str | os.PathLike) -> Calibration:
    """Read a ``sigma.yaml``; refuses other schemas and out-of-range values with a clear message."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise HwdiffError(f"cannot read sigma file {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise HwdiffError(f"{path} is not a sigma file of schema {SCHEMA} (schema {data.get('schema') if isinstance(data, dict) else None!r})")
    try:
        sched = data["schedule"]
        schedule = SigmaSchedule(float(sched["sigma_start"]), float(sched["sigma_end"]), int(sched["num_stages"]),
                                 sched.get("kind", "qerl-code"))
        layers = tuple(_layer_from(name, entry) for name, entry in data["layers"].items())
    except (KeyError, TypeError, ValueError) as exc:
        raise HwdiffError(f"{path}: malformed sigma file ({exc!r})") from exc
    return Calibration(layers, schedule, data.get("method", "local"), data.get("conversion", "rms"),
                       float(sched.get("factor", 100.0)), data.get("provenance", {}), data.get("verify"))


def _layer_from(name: str, entry: dict) -> LayerSigma:
    values = {key: float(entry[key]) for key in ("sigma_start", "sigma_end", "multiplier", "weight_rms")}
    if min(values.values()) < 0 or not all(map(math.isfinite, values.values())):
        raise ValueError(f"negative or non-finite value for {name}")
    return LayerSigma(name=name, layer_index=entry.get("layer_index"), sub_block=entry.get("sub_block"),
                      norm_error=float(entry.get("norm_error", entry.get("measured_error", 0.0))),
                      block_error=float(entry.get("block_error", 0.0)), gain_norm=entry.get("gain_norm"),
                      gain_block=entry.get("gain_block"), **values)


def _write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        temp.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


save = save_sigma


# ------------------------------------------------------------------------------------------------
def layer_multipliers(calibration: Calibration) -> tuple[dict[str, float], float]:
    """verl's per-decoder-layer multipliers and its default multiplier.

    verl scales both norms of a decoder layer by one multiplier; when the two calibrated norms differ,
    hwdiff takes their root mean square, which keeps the layer's total injected noise power. The final
    norm has no layer index and sets ``default_multiplier``."""
    by_index: dict[int, list[float]] = {}
    default = 1.0
    for layer in calibration.layers:
        if layer.layer_index is None:
            default = layer.multiplier
        else:
            by_index.setdefault(layer.layer_index, []).append(layer.multiplier)
    return ({str(i): math.sqrt(sum(m * m for m in ms) / len(ms)) for i, ms in sorted(by_index.items())}, default)


def verl_block(calibration: Calibration) -> dict[str, Any]:
    multipliers, default = layer_multipliers(calibration)
    s = calibration.schedule
    return {"trainer": {"noise_injection": {
        "enabled": True, "sigma_start": s.sigma_start, "sigma_end": s.sigma_end, "num_stages": s.num_stages,
        "target_modules": None, "exclude_patterns": ["lm_head", "embed_tokens"], "layer_types": ["rmsnorm"],
        "epoch_aware": False, "layer_sigma_config": {
            "enabled": True, "default_multiplier": default, "layer_multipliers": multipliers}}}}


def hydra_overrides(calibration: Calibration) -> list[str]:
    """The same block as Hydra ``++`` overrides for a verl command line."""
    block = verl_block(calibration)["trainer"]["noise_injection"]
    prefix = "++trainer.noise_injection"
    multipliers = ", ".join(f"{k}: {v:.6g}" for k, v in block["layer_sigma_config"]["layer_multipliers"].items())
    return [f"{prefix}.enabled=True", f"{prefix}.sigma_start={block['sigma_start']:.6g}",
            f"{prefix}.sigma_end={block['sigma_end']:.6g}", f"{prefix}.num_stages={block['num_stages']}",
            f"'{prefix}.layer_types=[\"rmsnorm\"]'", f"'{prefix}.exclude_patterns=[\"lm_head\", \"embed_tokens\"]'",
            f"{prefix}.layer_sigma_config.enabled=True",
            f"{prefix}.layer_sigma_config.default_multiplier={block['layer_sigma_config']['default_multiplier']:.6g}",
            f"'{prefix}.layer_sigma_config.layer_multipliers={{{multipliers}}}'"]


def export(calibration: Calibration, target: str, path: str | os.PathLike) -> Path:
    """``verl``: the trainer.noise_injection block; ``qerl``: sigma_start / sigma_end / num_stages."""
    if target == "verl":
        return _write_yaml(Path(path), verl_block(calibration))
    if target == "qerl":
        log.warning("the QeRL format has one global schedule: the per-layer values (multipliers %.3g … %.3g) are lost",
                    min(l.multiplier for l in calibration.layers), max(l.multiplier for l in calibration.layers))
        s = calibration.schedule
        return _write_yaml(Path(path), {"sigma_start": s.sigma_start, "sigma_end": s.sigma_end, "num_stages": s.num_stages})
    raise HwdiffError(f"unknown export format {target!r}: expected verl or qerl")


def verify(calibration: Calibration, model: Any, *, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Closed loop on the reference device: inject every norm's σ_end, replay a clean capture's inputs
    with the noise, and compare the error that induces at each norm with the measured error it was
    calibrated from. A ratio near 1 says the σ ↔ error conversion holds on these weights and activations."""
    import tempfile

    from .aqn import AQNInjector
    from .capturing import capture
    from .compare import diff
    from .replaying import replay

    with tempfile.TemporaryDirectory(prefix="hwdiff-verify-") as tmp:
        clean = capture(model, Path(tmp) / "clean.h5", record_inputs=True, limit=8, max_tokens=64, batch_size=4,
                        progress=progress).path
        with AQNInjector(model, {layer.name: layer.sigma_end for layer in calibration.layers}) as injector:
            injector.apply(seed=seed)
            noisy = replay(model, clean, Path(tmp) / "noisy.h5", progress=progress).path
        result = diff(clean, noisy, progress=progress)
    layers = {}
    for layer in calibration.layers:
        induced = result.layer(layer.name).metrics.rel_l2
        measured = layer.measured_error
        layers[layer.name] = {"measured_error": measured, "induced_error": induced,
                              "ratio": induced / measured if measured else math.nan}
    return {"method": "σ_end injected at every norm (float32 noise, seed %d); induced = relative error at the "
                      "norm's output on 8 shipped prompts, replayed with clean inputs" % seed, "layers": layers}


def reference_model(diff: Any, *, spec: str | None = None, device: str = "cpu") -> Any:
    """The model of a diff's reference capture (its spec, seed and dtype), or ``spec`` instead."""
    from .models import load_model

    reference = load_summary(diff).get("reference") or {}
    model_spec = spec or reference.get("model_spec")
    if not model_spec or str(model_spec).startswith("object:"):
        raise HwdiffError("the diff does not name a loadable reference model; pass --model SPEC")
    return load_model(str(model_spec), device=device, dtype=str(reference.get("dtype", "float32")))


def format_calibration(calibration: Calibration) -> str:
    """The terminal summary: method, global schedule, and σ per norm."""
    s = calibration.schedule
    lines = [f"method: {calibration.method} ({METHOD_NOTES[calibration.method]})",
             f"conversion: {calibration.conversion}",
             f"schedule: {s.kind}, {s.num_stages} stages, sigma {s.sigma_start:.3g} -> {s.sigma_end:.3g} "
             f"(QeRL default 0.05 -> 0.0005)", "",
             f"{'norm':<42} {'measured':>9} {'w rms':>7} {'sigma_end':>10} {'sigma_start':>11} {'mult':>6}"
             + ("  induced/measured" if calibration.verify else "")]
    for layer in calibration.layers:
        row = (f"{layer.name:<42} {layer.measured_error:>9.3g} {layer.weight_rms:>7.3f} {layer.sigma_end:>10.3g} "
               f"{layer.sigma_start:>11.3g} {layer.multiplier:>6.2f}")
        if calibration.verify:
            row += f"  {calibration.verify['layers'][layer.name]['ratio']:.2f}"
        lines.append(row)
    return "\n".join(lines)
