"""The torch side of calibration: sub-block gains measured on the model, and the closed-loop verify.

Both inject noise at one norm at a time into float32 copies (in bf16 a small σ is mostly rounded
away: the nominal σ is not what acts). With the reference capture at hand (it recorded every
module's inputs: calibrate needs a replay), only the norm and the sub-block it feeds run, on the
arguments the reference recorded for them (its first :data:`PROBE_ROWS` sequences, real tokens
only; the sub-block's main input is the noisy norm output) — no whole-model forward. What acted is
measured, not assumed: the realized σ is rms(Δy) at the norm's own output — exactly the
channel-power-weighted rms of the realized weight change, sqrt(Σ_c Δw_c²·P_c / Σ_c P_c) with
P_c = Σ_t x̂_tc² — and the induced error is read at the output of the sub-block.

Why the estimate is not a few seeds: for small σ the induced change is linear in the channel noise
Z, so E‖Δout‖² = σ²·‖J‖²_F (J: the sub-block output's Jacobian in the norm weights, whatever the
law of Z), and a draw is a Hutchinson estimate of it with a relative variance near 2 when a few
outlier channels dominate J (real checkpoints' massive activations): two or three seeds put the
gain 0.5–2× off. So the :data:`LOUDEST` channels of largest power are perturbed one at a time
(their terms exactly) and Rademacher draws estimate the rest until the relative standard error is
below :data:`TARGET_SE`; the verify states that standard error beside each ratio.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

from ..calibration.types import Calibration, VerifyLayer, VerifyResult
from ..errors import HwdiffError

log = logging.getLogger(__name__)
VERIFY_BAND = (0.67, 1.5)
PROBE_PROMPTS, PROBE_TOKENS = 4, 48  # the whole-model probe (no reference capture at hand)
PROBE_ROWS = 8  # sequences of the reference capture the sub-block probe runs
MIN_DRAWS, MAX_DRAWS, TARGET_SE = 4, 256, 0.02
LOUDEST = 8  # channels of largest power whose contribution is computed exactly (estimate)


class _Blocks:
    """Norms and the sub-blocks they feed as float32 copies, called on the arguments a reference
    capture recorded for them (its first :data:`PROBE_ROWS` sequences); errors over real tokens."""

    def __init__(self, model: Any, reference: str) -> None:
        import torch

        from ..capturing.replaying import _MaskRebuilder
        from ..store.reader import open_capture

        self.model, self.reference = model, reference
        self.cap = open_capture(reference)
        self.rows = slice(0, min(PROBE_ROWS, self.cap.input_ids.shape[0]))
        self.real = torch.from_numpy(self.cap.attention_mask[self.rows].astype(bool))
        self.masks = _MaskRebuilder(model, self.cap, torch.device("cpu"), torch.float32)

    def close(self) -> None:
        self.cap.close()

    def pair(self, norm: str, block: str | None) -> "_Pair":
        return _Pair(self, norm, block)

    def call(self, name: str) -> tuple[list, dict, tuple]:
        """(args, kwargs, where the main input sits) of ``name``'s first recorded call, float32."""
        import numpy as np
        import torch

        from ..store.format import FLAT
        from ..structure.callspec import decode_call, unsupported

        spec = self.cap.call_spec(name, 0) if name in self.cap.modules else None
        why = "no recorded arguments" if spec is None else unsupported(spec)
        if why is None and self.cap.layout(name, 0, "input") == FLAT:
            why = "its rows are stored flat"
        if why:
            raise HwdiffError(
                f"{name}: {why} in {self.reference}; the sub-block probe needs a reference captured "
                "with --record-inputs"
            )

        def load(slot: str) -> Any:
            values = torch.from_numpy(
                np.ascontiguousarray(self.cap.read(name, 0, slot, (self.rows,)))
            )
            return values.float() if values.is_floating_point() else values

        args, kwargs = decode_call(spec, load)
        if "attention_mask" in kwargs and self.masks.needed:
            kwargs["attention_mask"] = self.masks.build(self.rows, name)
        main = next(
            (("args", i) for i, e in enumerate(spec["args"]) if e.get("slot") == "input"),
            next(
                (("kwargs", k) for k, e in spec["kwargs"].items() if e.get("slot") == "input"), None
            ),
        )
        if main is None:
            raise HwdiffError(f"{name}: its recorded call has no main input to replace")
        return args, kwargs, main


class _Pair:
    """One norm (float32 copy) and its sub-block (float32 copy, or None), clean outputs kept."""

    def __init__(self, blocks: _Blocks, norm: str, block: str | None) -> None:
        import torch

        from ..structure import norm_offset

        self.blocks = blocks
        self.norm = copy.deepcopy(blocks.model.get_submodule(norm)).float().eval()
        self.norm_call = blocks.call(norm)
        self.block = (
            copy.deepcopy(blocks.model.get_submodule(block)).float().eval() if block else None
        )
        self.block_call = blocks.call(block) if block else None
        self.weight = self.norm.weight.detach().clone()
        with torch.inference_mode():
            self.y = self._norm()
            self.out = self._block(self.y) if block else self.y
        real = blocks.real
        self.out_norm = float(self.out[real].double().norm())
        self.offset = norm_offset(self.norm)

    def _norm(self) -> Any:
        from ..structure import output_by_meaning

        args, kwargs, _ = self.norm_call
        return output_by_meaning(self.norm, self.norm(*args, **kwargs))

    def _block(self, y: Any) -> Any:
        from ..structure import output_by_meaning

        args, kwargs, (where, key) = self.block_call
        args, kwargs = list(args), dict(kwargs)
        (args if where == "args" else kwargs)[key] = y
        return output_by_meaning(self.block, self.block(*args, **kwargs))

    def draw(
        self, sigma: float, rng: Any, law: str = "gaussian", df: float | None = None
    ) -> tuple[float, float, Any]:
        """(realized σ, induced relative error, Δy over real tokens) of one draw of σ at the norm."""
        from ..compare.laws import standardized

        return self.apply(standardized(law, df, rng, self.weight.numel()) * sigma)

    def apply(self, noise: Any) -> tuple[float, float, Any]:
        """(realized σ, induced relative error, Δy over real tokens) of the weight change ``noise``."""
        import torch

        with torch.inference_mode():
            self.norm.weight.copy_(self.weight + torch.from_numpy(noise).float())
            try:
                y = self._norm()
            finally:
                self.norm.weight.copy_(self.weight)
            out = self._block(y) if self.block is not None else y
        real = self.blocks.real
        delta = (y - self.y)[real].double()
        induced = (
            float((out - self.out)[real].double().norm()) / self.out_norm
            if self.out_norm
            else math.nan
        )
        return float(delta.pow(2).mean().sqrt()), induced, delta

    def loudest(self, count: int) -> Any:
        """The ``count`` channels of largest power Σ_t x̂_tc² (the outlier channels), as indices."""
        import numpy as np

        power = self.x_hat().pow(2).sum(dim=0).numpy()
        return np.argsort(power)[::-1][:count].copy()

    def x_hat(self) -> Any:
        """The normalised input x̂ (the norm with an effective weight of 1), over real tokens."""
        import torch

        with torch.inference_mode():
            self.norm.weight.fill_(1.0 - self.offset)
            try:
                return self._norm()[self.blocks.real].double()
            finally:
                self.norm.weight.copy_(self.weight)


@dataclass(frozen=True)
class Estimate:
    """rms over draws of the induced error and of the realized σ, their ratio (the gain) and its
    relative standard error (delta method over the draws)."""

    induced: float
    realized: float
    draws: int
    induced_se: float  # relative standard error of ``induced``
    gain_se: float  # relative standard error of induced / realized

    @property
    def gain(self) -> float:
        return self.induced / self.realized if self.realized else math.nan


def estimate(pair: _Pair, sigma: float, seed: int) -> Estimate:
    """E‖Δout‖² for σ at ``pair``'s norm, in the linear regime: the :data:`LOUDEST` channels of
    largest power exactly, one each (their Hutchinson terms are what makes a draw of all channels
    swing 2× on a real checkpoint), plus Rademacher draws over the other channels until the relative
    standard error is below TARGET_SE. Unbiased for any zero-mean noise of variance σ² per channel."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed))
    size = pair.weight.numel()
    loud = pair.loudest(min(LOUDEST, size))
    exact_e2 = exact_r2 = 0.0
    for channel in loud:
        noise = np.zeros(size)
        noise[channel] = sigma
        realized, induced, _ = pair.apply(noise)
        exact_e2 += induced * induced
        exact_r2 += realized * realized
    rest = np.ones(size, dtype=bool)
    rest[loud] = False
    e2, r2 = [], []
    while rest.any() and len(e2) < MAX_DRAWS:
        realized, induced, _ = pair.apply(
            np.where(rest, rng.choice([-1.0, 1.0], size), 0.0) * sigma
        )
        e2.append(induced * induced)
        r2.append(realized * realized)
        if len(e2) >= MIN_DRAWS and _se(exact_e2, e2) <= TARGET_SE:
            break
    induced = math.sqrt(exact_e2 + (float(np.mean(e2)) if e2 else 0.0))
    realized = math.sqrt(exact_r2 + (float(np.mean(r2)) if r2 else 0.0))
    return Estimate(induced, realized, len(loud) + len(e2), _se(exact_e2, e2), _se(exact_e2, e2))


def _se(exact: float, squares: list[float]) -> float:
    """Relative standard error of sqrt(exact + mean(squares)) (half that of the sum)."""
    import numpy as np

    if len(squares) < 2:
        return 0.0 if not squares and exact > 0 else math.inf
    a = np.asarray(squares)
    total = exact + a.mean()
    return float(0.5 * a.std(ddof=1) / math.sqrt(a.size) / total) if total > 0 else math.inf


def law_noise(
    pair: _Pair, sigma: float, seed: int, law: str, df: float | None, draws: int = 2
) -> Any:
    """The weight noise recovered from the change that ``draws`` draws of ``law`` make at the norm's
    output (hwdiff.compare.laws.equivalent_noise): what the law check of the verify fits."""
    import numpy as np

    from ..compare.laws import equivalent_noise

    rng = np.random.Generator(np.random.PCG64(seed))
    x_hat = pair.x_hat().numpy()
    return np.concatenate(
        [equivalent_noise(pair.draw(sigma, rng, law, df)[2].numpy(), x_hat) for _ in range(draws)]
    )


def _reference_path(reference: str | None) -> str | None:
    """The reference capture when it is on disk (a file, or a multi-rank capture's directory)."""
    from pathlib import Path

    return reference if reference and Path(reference).exists() else None


class _Probe:
    """A float32 copy of ``model`` run on fixed unpadded inputs, recording ``names``' outputs."""

    def __init__(
        self,
        model: Any,
        names: Iterable[str],
        reference: str | None = None,
        *,
        keep_inputs: bool = False,
    ) -> None:
        import torch

        self.model = copy.deepcopy(model).float().eval()
        self.names = sorted(set(names))
        self.keep_inputs = (
            keep_inputs  # the norms' inputs, for the law of the induced noise (verify)
        )
        ids, mask = _probe_inputs(model, reference)
        length = int(mask.sum(axis=1).min())  # a common length: no padding anywhere
        device = next(self.model.parameters()).device
        self.ids = torch.from_numpy(ids[:, :length].astype("int64")).to(device)
        self.clean = self.run()

    def run(self) -> dict[str, Any]:
        import torch

        from ..capturing.hooks import record

        with (
            torch.no_grad(),
            record(
                self.model,
                [f"^{re.escape(n)}$" for n in self.names],
                record_inputs=self.keep_inputs,
            ) as rec,
        ):
            self.model(input_ids=self.ids, use_cache=False)
        out = {
            key[0]: values[0].double()
            for key, values in rec.activations.items()
            if key[2] == "output" and key[1] == 0
        }
        self.inputs = {
            key[0]: values[0].double()
            for key, values in rec.activations.items()
            if key[2] == "input" and key[1] == 0
        }
        return out

    def inject(
        self, norm: str, sigma: float, seed: int, law: str = "gaussian", df: float | None = None
    ) -> tuple[float, dict[str, float]]:
        """(realized σ at ``norm``, {module: relative L2 error induced there}) for σ at ``norm`` alone;
        keeps the induced change at the norm's output in ``self.last_delta``."""
        from ..aqn import AQNInjector

        with AQNInjector(self.model, {norm: sigma}, law=law, df=df, check_count=False) as injector:
            injector.apply(seed=seed)
            noisy = self.run()
        self.last_delta = noisy[norm] - self.clean[norm]
        realized = float(self.last_delta.pow(2).mean().sqrt())
        return realized, {name: _relative(self.clean[name], noisy[name]) for name in self.names}

    def induced_noise(self, norm: str) -> Any:
        """The weight noise that explains the last induced change at ``norm`` (hwdiff.compare.laws.equivalent_noise)."""
        from ..compare.laws import equivalent_noise

        x = self.inputs[norm].reshape(-1, self.inputs[norm].shape[-1]).numpy()
        x_hat = x / ((x * x).mean(axis=1, keepdims=True) + 1e-6) ** 0.5
        return equivalent_noise(self.last_delta.reshape(-1, x.shape[-1]).numpy(), x_hat)


def _probe_inputs(model: Any, reference: str | None) -> tuple[Any, Any]:
    """Token ids and mask to probe with: the first prompts the reference capture ran (the inputs the
    error was measured on; no tokenizer needed), else the shipped prompts through the model's tokenizer."""
    from pathlib import Path

    if (
        reference and Path(reference).exists()
    ):  # a capture file, or a multi-rank capture's directory
        from ..store.reader import open_capture

        with open_capture(reference) as cap:
            ids, mask = (
                cap.input_ids[:PROBE_PROMPTS, :PROBE_TOKENS],
                cap.attention_mask[:PROBE_PROMPTS, :PROBE_TOKENS],
            )
        if mask.sum(axis=1).min() > 0:
            return ids, mask
    from ..capturing.inputs import load_inputs
    from ..capturing.run import model_tokenizer

    inputs = load_inputs(
        tokenizer=model_tokenizer(model), max_tokens=PROBE_TOKENS, limit=PROBE_PROMPTS
    )
    return inputs.input_ids, inputs.attention_mask


def _relative(reference: Any, other: Any) -> float:
    norm = float(reference.norm())
    return float((other - reference).norm()) / norm if norm else math.nan


def measure_gains(
    model: Any,
    norms: list[tuple[str, str | None]],
    *,
    seeds: int = 2,
    probe_rel: float = 1e-3,
    reference: str | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Relative error at each norm's sub-block output per unit realized σ (norms without a sub-block
    are left out). The probe σ is ``probe_rel`` × rms of the norm's clean output. With ``reference``
    on disk: the norm and sub-block alone on its recorded arguments, draws until the gain's standard
    error is below TARGET_SE (``seeds`` is then unused); else whole-model forwards over the shipped
    prompts with ``seeds`` draws."""
    pairs = [(norm, block) for norm, block in norms if block]
    if not pairs:
        return {}
    path = _reference_path(reference)
    if path is None:
        return _measure_gains_whole(model, pairs, seeds, probe_rel, reference)
    from tqdm.auto import tqdm

    blocks, gains = _Blocks(model, path), {}
    try:
        for index, (norm, block) in enumerate(
            tqdm(pairs, desc="gains", unit="norm", disable=not progress, leave=False)
        ):
            pair = blocks.pair(norm, block)
            sigma = probe_rel * float(pair.y[blocks.real].double().pow(2).mean().sqrt())
            found = estimate(pair, sigma, seed=1000 * index)
            gains[norm] = found.gain
            log.info(
                "gain %s -> %s: %.4g per unit sigma (±%.1f%%, %d draws)",
                norm,
                block,
                found.gain,
                100 * found.gain_se,
                found.draws,
            )
    finally:
        blocks.close()
    return gains


def _measure_gains_whole(
    model: Any, pairs: list[tuple[str, str]], seeds: int, probe_rel: float, reference: str | None
) -> dict[str, float]:
    probe = _Probe(model, [n for pair in pairs for n in pair], reference)
    gains = {}
    for index, (norm, block) in enumerate(pairs):
        sigma = probe_rel * float(probe.clean[norm].pow(2).mean().sqrt())
        runs = [probe.inject(norm, sigma, seed=1000 * index + s) for s in range(seeds)]
        gains[norm] = _rms([errors[block] for _, errors in runs]) / _rms(
            [realized for realized, _ in runs]
        )
        log.info("gain %s -> %s: %.4g per unit sigma", norm, block, gains[norm])
    return gains


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def verify(
    calibration: Calibration,
    model: Any,
    *,
    seeds: int = 3,
    band: tuple[float, float] = VERIFY_BAND,
    progress: bool = False,
) -> VerifyResult:
    """Inject each norm's σ_end alone into float32 copies and compare the relative error it induces at
    the sub-block output (at the norm when it feeds none) with the error the hardware makes there: the
    sub-block's local error and the norm's own error carried through the gain that acted in this very
    injection (induced error / realized σ) — the hardware's norm error reaches the sub-block through
    the same gain as the noise. So the check isolates what calibrate assumed or measured elsewhere: the
    gain applied to the sub-block's own error, and σ itself. A ratio outside ``band`` fails. Norms
    with σ_end = 0 are not injected. With the reference capture on disk only the norm and its
    sub-block run, draws until the ratio's standard error is below TARGET_SE, stated per norm;
    else whole-model forwards with ``seeds`` draws."""
    layers = [layer for layer in calibration.layers if layer.sigma_end > 0]
    if not layers:
        raise HwdiffError("no norm has sigma_end > 0: nothing to verify")
    reference = (calibration.provenance.get("reference") or {}).get("path")
    path = _reference_path(reference)
    if path is None:
        return _verify_whole(layers, model, seeds, band, reference, calibration.unreproduced)
    from tqdm.auto import tqdm

    from ..compare.laws import fit_law

    blocks, checks = _Blocks(model, path), []
    try:
        for index, layer in enumerate(
            tqdm(layers, desc="verify", unit="norm", disable=not progress, leave=False)
        ):
            pair = blocks.pair(layer.name, layer.sub_block)
            found = estimate(pair, layer.sigma_end, seed=7919 * index)
            target = math.hypot(found.gain * layer.norm_error * layer.output_rms, layer.block_error)
            fitted = fit_law(
                law_noise(pair, layer.sigma_end, 7919 * index + 1, layer.law, layer.df)
            )
            # the ratio's uncertainty: the induced error's own (the target's norm part moves with the gain)
            checks.append(
                VerifyLayer(
                    layer.name,
                    layer.sub_block or layer.name,
                    target,
                    found.induced,
                    found.realized,
                    layer.law,
                    fitted.law,
                    fitted.df,
                    draws=found.draws,
                    ratio_se=found.induced_se,
                )
            )
    finally:
        blocks.close()
    method = (
        f"sigma_end injected at one norm at a time into float32 copies of the norm and the sub-block it feeds, "
        f"run on the arguments the reference capture recorded for them (first {PROBE_ROWS} sequences, real "
        f"tokens); the expected induced error: the {LOUDEST} channels of largest power one at a time, exactly, plus "
        f"Rademacher draws over the rest until its relative standard error is below {TARGET_SE:.0%} (at least "
        f"{MIN_DRAWS}, at most {MAX_DRAWS}); induced = relative L2 error at the sub-block output; the law check "
        "fits 2 draws of the calibrated law"
    )
    return VerifyResult(
        tuple(checks), band, max(c.draws for c in checks), method, calibration.unreproduced
    )


def _verify_whole(
    layers: list,
    model: Any,
    seeds: int,
    band: tuple[float, float],
    reference: str | None,
    unreproduced: tuple[str, ...],
) -> VerifyResult:
    import numpy as np

    from ..compare.laws import fit_law

    probe = _Probe(
        model, [n for l in layers for n in (l.name, l.sub_block) if n], reference, keep_inputs=True
    )
    checks = []
    for index, layer in enumerate(layers):
        where = layer.sub_block or layer.name
        runs, noise = [], []
        for s in range(seeds):
            runs.append(
                probe.inject(
                    layer.name, layer.sigma_end, seed=7919 * index + s, law=layer.law, df=layer.df
                )
            )
            noise.append(probe.induced_noise(layer.name))
        induced_error, realized = _rms([e[where] for _, e in runs]), _rms([r for r, _ in runs])
        gain = (
            induced_error / realized if realized else math.nan
        )  # the gain that acted, measured here
        target = math.hypot(gain * layer.norm_error * layer.output_rms, layer.block_error)
        fitted = fit_law(np.concatenate(noise))
        checks.append(
            VerifyLayer(
                layer.name,
                where,
                target,
                induced_error,
                realized,
                layer.law,
                fitted.law,
                fitted.df,
                draws=seeds,
            )
        )
    method = (
        f"sigma_end injected at one norm at a time into a float32 copy of the model ({seeds} seeds, the first "
        f"{PROBE_PROMPTS} prompts of the reference capture, cut to a common length; the reference capture was "
        "not at hand for the sub-block probe); induced = relative L2 error at the sub-block output"
    )
    return VerifyResult(tuple(checks), band, seeds, method, unreproduced)


def reference_model(diff: Any, *, spec: str | None = None, device: str = "cpu") -> Any:
    """The model of a diff's reference capture (its spec, seed, dtype and attention kernels), or ``spec`` instead."""
    from ..capturing.models import load_model
    from ..compare.io import load_diff

    reference = load_diff(diff, arrays=False).reference
    model_spec = spec or reference.get("model_spec")
    if not model_spec or str(model_spec).startswith("object:"):
        raise HwdiffError("the diff does not name a loadable reference model; pass --model SPEC")
    attn = reference.get("attn_implementation")
    return load_model(
        str(model_spec),
        device=device,
        dtype=str(reference.get("dtype", "float32")),
        attn_implementation=attn if attn and attn != "unknown" else None,
    )
