"""How robust is a checkpoint to the measured hardware error? (docs/robustness.md)

Draws the calibrated AQN noise (each norm's σ_end, law and depth correlation from a sigma file, by
:class:`~hwdiff.aqn.AQNInjector`) ``draws`` times, and measures each noisy copy against the clean
model on the same prompts: token level with :func:`hwdiff.compare.rl.rl_impact` (mean |Δlogp|, K3
KL, top-1 agreement on the prompts' own next tokens), sequence level with :func:`hwdiff.capturing.generate.generate`
and :func:`hwdiff.compare.generation.diff_generations` (greedy continuations: changed or not, first
split position, the extracted answer against the reference answer). A measured device pair (two
captures and / or two generation files of the same prompts) is measured by the same code, so the
robustness card shows emulated and measured side by side. The card itself — statistics, intervals,
JSON, comparison, renderings — is :mod:`hwdiff.measure.robustness_card`; its public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._version import __version__
from ..errors import HwdiffError
from .robustness_card import (
    ANSWER_RULE,
    COMPARISON_SCHEMA,
    INTERVAL_RULE,
    RESAMPLES,
    SCHEMA,
    TOKEN_STATS,
    Cells,
    Comparison,
    RobustnessCard,
    answer_matrix,
    card_html,
    check_comparable,
    compare_cards,
    describe,
    extract_answer,
    format_card,
    format_comparison,
    is_correct,
    load_card,
    save_card,
    save_comparison,
)

__all__ = [
    "Options",
    "robustness",
    "sigma_fingerprint",
    "SCHEMA",
    "COMPARISON_SCHEMA",
    "RESAMPLES",
    "INTERVAL_RULE",
    "ANSWER_RULE",
    "Cells",
    "RobustnessCard",
    "Comparison",
    "answer_matrix",
    "card_html",
    "check_comparable",
    "compare_cards",
    "describe",
    "extract_answer",
    "format_card",
    "format_comparison",
    "is_correct",
    "load_card",
    "save_card",
    "save_comparison",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    """What :func:`robustness` runs: ``draws`` noise draws (seeded from ``seed``), the first ``limit``
    prompts of ``prompts`` (None: the shipped math word problems) cut to ``max_tokens`` tokens, greedy
    continuations of ``max_new_tokens`` tokens (0: no sequence level), forwards of ``batch_size``
    prompts, intervals at ``confidence``."""

    draws: int = 8
    seed: int = 0
    prompts: str | os.PathLike | None = None
    limit: int | None = 16
    max_tokens: int = 128
    max_new_tokens: int = 32
    batch_size: int = 16
    confidence: float = 0.95
    progress: bool = True

    def check(self) -> None:
        from ..capturing.inputs import check_counts

        check_counts(
            draws=self.draws,
            limit=self.limit,
            max_tokens=self.max_tokens,
            batch_size=self.batch_size,
        )
        if self.draws < 2:
            raise HwdiffError(
                f"--draws must be at least 2 (an interval over draws needs two), got {self.draws}"
            )
        if not 0.5 <= self.confidence < 1:
            raise HwdiffError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.max_new_tokens < 0:
            raise HwdiffError(
                f"max_new_tokens must be 0 (no sequence level) or more, got {self.max_new_tokens}"
            )


def robustness(
    model: Any,
    sigma: Any,
    *,
    options: Options | None = None,
    pair: Sequence[tuple[Any, Any]] = (),
    output: str | os.PathLike | None = None,
) -> RobustnessCard:
    """Measure ``model`` (an hwdiff-loaded torch model) under ``options.draws`` draws of the noise in
    ``sigma`` (a sigma.yaml path or a :class:`~hwdiff.calibration.Calibration`) against its clean self.

    ``pair``: up to two (reference, target) file pairs of a measured device pair over the same prompts
    — two captures with ``/logprobs`` (token level) and / or two generation files from ``hwdiff
    generate`` with the same ``max_new_tokens`` (sequence level). ``output``: write the card's JSON
    there. The model's weights are restored bit for bit on return."""
    import torch

    from ..aqn import AQNInjector
    from ..calibration.sigmafile import load_sigma

    opts = options or Options()
    opts.check()
    if getattr(model, "training", False):
        raise HwdiffError(
            "the model is in training mode (dropout would add noise of its own to every draw): "
            "call model.eval() first, or load it with hwdiff.load_model"
        )
    from ..common.outputs import check_outputs

    check_outputs(
        [p for both in pair for p in both]
        + ([sigma] if isinstance(sigma, (str, os.PathLike)) else [])
        + ([opts.prompts] if isinstance(opts.prompts, (str, os.PathLike)) else []),
        [output],
    )
    calibration = load_sigma(sigma) if isinstance(sigma, (str, os.PathLike)) else sigma
    started = time.perf_counter()
    inputs, references = _prompts(model, opts)
    measured = _measured(pair, inputs, model, opts)
    injector = AQNInjector(model, calibration)
    applied = injector.sigmas()  # the model's norms: σ_end of the file, 0 where it names none
    unnamed = sorted(set(applied) - {layer.name for layer in calibration.layers})
    if not any(value > 0 for value in applied.values()):
        raise HwdiffError(
            f"the sigma file puts noise on none of this model's {len(applied)} RMSNorms (every "
            "σ_end is 0 or unnamed): every draw would equal the clean model, a robustness of exactly 0 "
            "measured"
        )
    if unnamed:
        log.warning(
            "the sigma file names %d of this model's %d RMSNorms; no noise on the other %d: %s",
            len(applied) - len(unnamed),
            len(applied),
            len(unnamed),
            ", ".join(unnamed[:4]),
        )
    seeds = [int(s) for s in np.random.SeedSequence(opts.seed).generate_state(opts.draws)]
    log.info(
        "robustness: %d draws x %d prompts: %d forwards of %d prompts, %d greedy decodes of up to %d tokens",
        opts.draws,
        inputs.shape[0],
        opts.draws + 1,
        inputs.shape[0],
        (opts.draws + 1) * inputs.shape[0] * bool(opts.max_new_tokens),
        opts.max_new_tokens,
    )
    with (
        tempfile.TemporaryDirectory(prefix="hwdiff-robustness-") as work,
        torch.no_grad(),
        injector,
    ):
        emulated = _emulate(model, injector, inputs, seeds, Path(work), opts)
    card = RobustnessCard(
        _meta(
            model,
            calibration,
            sigma,
            applied,
            inputs,
            opts,
            seeds,
            pair,
            time.perf_counter() - started,
        ),
        emulated,
        measured,
        references,
    )
    if output is not None:
        save_card(card, output)
    return card


def _emulate(
    model: Any, injector: Any, inputs: Any, seeds: list[int], work: Path, opts: Options
) -> Cells:
    """The clean run, then one noisy run per seed (noise from the clean float32 weights each time)."""
    from tqdm.auto import tqdm

    clean = _token_logprobs(model, inputs, opts.batch_size)
    clean_gen = _generate(model, inputs, work / "clean.h5", opts)
    rows = []
    for draw, seed in enumerate(
        tqdm(seeds, desc="robustness draws", unit="draw", disable=not opts.progress)
    ):
        injector.apply(seed=seed)
        noisy = _token_logprobs(model, inputs, opts.batch_size)
        noisy_gen = _generate(model, inputs, work / f"draw{draw}.h5", opts)
        injector.restore()
        rows.append(
            (_token_cells(clean, noisy, inputs), _sequence_cells(clean_gen, noisy_gen, model))
        )
    return _stack(rows)


def _stack(rows: list[tuple[dict, dict | None]]) -> Cells:
    token = {stat: np.stack([r[0][stat] for r in rows]) for stat in TOKEN_STATS}
    seq = rows[0][1]
    decoded = seq is not None and seq["answers"] is not None
    return Cells(
        positions=rows[0][0]["positions"],
        **token,
        split=None if seq is None else np.stack([r[1]["split"] for r in rows]),
        answers=tuple(r[1]["answers"] for r in rows) if decoded else None,
        clean_answers=seq["clean_answers"] if decoded else None,
    )


def _token_logprobs(model: Any, inputs: Any, batch_size: int) -> Any:
    """``TokenLogProbs`` of the prompts' own next tokens from the model's output logits."""
    import torch

    from ..capturing.logprobs import token_logprobs
    from ..capturing.run import model_device_and_dtype
    from ..store.format import LOGPROB_FIELDS
    from ..store.reader import TokenLogProbs

    device = model_device_and_dtype(model)[0]
    parts = []
    for _, ids, mask in inputs.batches(batch_size):
        ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        logits = model(input_ids=ids_t, attention_mask=mask_t).logits
        parts.append({k: v.cpu().numpy() for k, v in token_logprobs(logits, ids_t).items()})
    arrays = [np.concatenate([p[name] for p in parts]) for name in LOGPROB_FIELDS]
    return TokenLogProbs(*arrays, attrs={"compute_dtype": str(arrays[0].dtype)})


def _token_cells(ref: Any, tgt: Any, inputs: Any) -> dict[str, np.ndarray]:
    """Per prompt: :func:`hwdiff.compare.rl.rl_impact` of its rows (Δlogp = target − reference)."""
    from ..compare.rl import rl_impact
    from ..store.reader import TokenLogProbs

    def row(side: Any, p: int) -> Any:
        return TokenLogProbs(
            *(
                getattr(side, f)[p : p + 1]
                for f in ("next_token", "entropy", "topk_ids", "topk_logprobs")
            ),
            side.attrs,
        )

    impacts = [
        rl_impact(
            row(ref, p), row(tgt, p), inputs.attention_mask[p : p + 1], inputs.input_ids[p : p + 1]
        )
        for p in range(inputs.shape[0])
    ]
    out = {stat: np.array([getattr(i, stat) for i in impacts]) for stat in TOKEN_STATS}
    out["positions"] = np.array([i.positions for i in impacts], dtype=np.float64)
    return out


def _generate(model: Any, inputs: Any, path: Path, opts: Options) -> Path | None:
    if not opts.max_new_tokens:
        return None
    from ..capturing.generate import generate

    with (
        contextlib.redirect_stderr(open(os.devnull, "w"))
        if not opts.progress
        else contextlib.nullcontext()
    ):
        return generate(
            model, path, inputs=inputs, max_new_tokens=opts.max_new_tokens, progress=False
        ).path


def _sequence_cells(clean: Path | None, noisy: Path | None, model: Any) -> dict | None:
    """Split position per prompt (−1 identical) and both sides' extracted answers, from two generation files."""
    if clean is None or noisy is None:
        return None
    from ..compare.generation import diff_generations

    splits = diff_generations(clean, noisy, allow_model_mismatch=True)
    decode = _decoder(model)
    return {
        "split": np.array(
            [-1 if p.split is None else p.split for p in splits.prompts], dtype=np.float64
        ),
        "answers": None if decode is None else _answers(noisy, decode),
        "clean_answers": None if decode is None else _answers(clean, decode),
    }


def _answers(path: Path, decode: Any) -> tuple[str, ...]:
    from ..store.reader import open_capture

    with open_capture(path) as cap:
        gen = cap.generation()
        return tuple(
            extract_answer(decode([int(t) for t in ids[:n]]))
            for ids, n in zip(gen.ids, gen.lengths)
        )


def _decoder(model: Any) -> Any:
    """Token ids → text: the model's tokenizer, UTF-8 bytes for the built-in byte-level models, None
    (no answers: the card says why) for a checkpoint without a loadable tokenizer."""
    from ..capturing.run import model_tokenizer

    try:
        tokenizer = model_tokenizer(model)
    except HwdiffError as exc:
        log.warning("no answers extracted: %s", exc)
        return None
    if hasattr(tokenizer, "decode"):
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return lambda ids: bytes(t for t in ids if 0 <= t < 256).decode("utf-8", errors="replace")


def _prompts(model: Any, opts: Options) -> tuple[Any, tuple[str, ...]]:
    """The prompts as token ids, and each prompt's reference answer ("" where the file has none)."""
    from ..capturing.inputs import prompts_path
    from ..capturing.run import CaptureOptions, _resolve_inputs

    inputs = _resolve_inputs(
        model, opts.prompts, CaptureOptions(max_tokens=opts.max_tokens, limit=opts.limit)
    )
    path = (
        prompts_path()
        if opts.prompts is None
        else Path(opts.prompts)
        if isinstance(opts.prompts, (str, os.PathLike))
        else None
    )
    answers: list[str] = []
    if path is not None and path.suffix == ".jsonl":
        rows = [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        rows = rows[: opts.limit] if opts.limit else rows
        if (
            len(rows) != inputs.shape[0]
        ):  # hwdiff.capturing.inputs drops rows without tokens: answers would shift
            raise HwdiffError(
                f"{path}: {len(rows) - inputs.shape[0]} of its first {len(rows)} rows hold no tokens "
                "(an empty question or input_ids): their answers cannot be matched to the prompts; "
                "remove those rows"
            )
        answers = [str(r.get("answer", "")) if isinstance(r, dict) else "" for r in rows]
    answers = (answers + [""] * inputs.shape[0])[: inputs.shape[0]]
    return inputs, tuple(answers)


# ---- the measured pair ----------------------------------------------------------------------------
def _measured(
    pair: Sequence[tuple[Any, Any]], inputs: Any, model: Any, opts: Options
) -> Cells | None:
    """The measured pair's cells: token level from two captures, sequence level from two generation files."""
    if not pair:
        return None
    from ..store.reader import open_capture

    token: dict[str, np.ndarray] = {}
    seq: dict | None = None
    from ..common.outputs import same_file

    kinds: set[str] = set()
    for ref_path, tgt_path in pair:
        if same_file(Path(ref_path), Path(tgt_path)):
            raise HwdiffError(
                f"--pair {ref_path} {tgt_path}: the same file twice (a pair of one run measures "
                "nothing): give the reference device's file and the target device's"
            )
        with open_capture(ref_path) as ref, open_capture(tgt_path) as tgt:
            kind = "generation" if ref.is_generation else "capture"
            if (kind == "generation") != tgt.is_generation:
                raise HwdiffError(
                    f"--pair {ref_path} {tgt_path}: one is a generation file and the other a capture"
                )
            if kind in kinds:
                raise HwdiffError(
                    f"--pair given two {kind} pairs: give at most one pair of captures (token level) "
                    "and one of generation files (sequence level)"
                )
            kinds.add(kind)
            _check_pair(ref, tgt, inputs, model, opts)
            _warn_other_run(ref, model)
            if kind == "capture":
                token = _capture_cells(ref, tgt, inputs)
            else:
                seq = _sequence_cells(Path(ref_path), Path(tgt_path), model)
    return Cells(
        positions=token.get("positions"),
        **{s: token[s][None] if token else None for s in TOKEN_STATS},
        split=None if seq is None else seq["split"][None],
        answers=None if seq is None or seq["answers"] is None else (seq["answers"],),
        clean_answers=None if seq is None else seq["clean_answers"],
    )


def _capture_cells(ref: Any, tgt: Any, inputs: Any) -> dict[str, np.ndarray]:
    sides = [ref.token_logprobs(), tgt.token_logprobs()]
    if None in sides:
        raise HwdiffError(
            f"--pair: {ref.path if sides[0] is None else tgt.path} has no token log-probabilities "
            "(/logprobs): capture again with this hwdiff, without --no-logprobs"
        )
    return _token_cells(sides[0], sides[1], inputs)


def _check_pair(ref: Any, tgt: Any, inputs: Any, model: Any, opts: Options) -> None:
    """The pair ran the card's prompts and checkpoint; generation files the card's max_new_tokens."""
    from ..capturing.models import model_info

    for cap in (ref, tgt):
        if cap.meta.get("inputs_fingerprint") != inputs.fingerprint:
            raise HwdiffError(
                f"--pair {cap.path} ran other inputs than this card's prompts ({inputs!r}): capture "
                "the pair with the same --prompts/--inputs, --limit and --max-tokens"
            )
        if cap.meta.get("model_fingerprint") != model_info(model).fingerprint:
            raise HwdiffError(
                f"--pair {cap.path} is of another checkpoint (model fingerprint "
                f"{cap.meta.get('model_fingerprint')} against {model_info(model).fingerprint})"
            )
        if (
            cap.is_generation
            and int(cap.generation().attrs["max_new_tokens"]) != opts.max_new_tokens
        ):
            raise HwdiffError(
                f"--pair {cap.path} generated {cap.generation().attrs['max_new_tokens']} new tokens, "
                f"this card {opts.max_new_tokens}: use the same --max-new-tokens"
            )


def _warn_other_run(ref: Any, model: Any) -> None:
    """The card should run as the pair's reference did (docs/robustness.md): say so where it does not."""
    from ..capturing.models import dtype_name
    from ..capturing.run import model_device_and_dtype

    dtype = dtype_name(model_device_and_dtype(model)[1])
    attn = str(getattr(model.config, "_attn_implementation", None) or "unknown")
    ran = {
        "dtype": ref.meta.get("dtype"),
        "attn_implementation": ref.meta.get("attn_implementation"),
    }
    differs = [
        f"{k} {v} (card: {here})"
        for (k, v), here in zip(ran.items(), (dtype, attn))
        if v and v != here
    ]
    if differs:
        log.warning(
            "--pair reference %s ran with %s: the card's clean side is not the pair's reference, so the "
            "noise is not the only difference between its sides (run the card in the reference's dtype and "
            "kernels)",
            ref.path,
            ", ".join(differs),
        )


# ---- provenance ----------------------------------------------------------------------------------
def sigma_fingerprint(calibration: Any) -> str:
    """SHA-256 of the noise law the draws use: each norm's σ_end, law and df, and ρ (not the file's bytes:
    the same values saved again match)."""
    rows = sorted(
        (layer.name, repr(float(layer.sigma_end)), layer.law, repr(layer.df))
        for layer in calibration.layers
    )
    digest = hashlib.sha256(
        json.dumps([rows, repr(float(getattr(calibration, "rho", 0.0) or 0.0))]).encode()
    )
    return "sha256:" + digest.hexdigest()


def _file_sha256(path: str | os.PathLike) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _meta(
    model: Any,
    calibration: Any,
    sigma: Any,
    applied: dict[str, float],
    inputs: Any,
    opts: Options,
    seeds: list[int],
    pair: Sequence[tuple[Any, Any]],
    seconds: float,
) -> dict[str, Any]:
    from datetime import datetime, timezone

    from ..capturing.models import dtype_name, model_info
    from ..capturing.run import model_device_and_dtype

    info = model_info(model)
    device, dtype = model_device_and_dtype(model)
    sigmas = [float(layer.sigma_end) for layer in calibration.layers]
    named = {layer.name for layer in calibration.layers}
    return {
        "hwdiff_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "spec": info.spec,
            "fingerprint": info.fingerprint,
            "dtype": dtype_name(dtype),
            "device": str(device),
            "attn_implementation": str(
                getattr(model.config, "_attn_implementation", None) or "unknown"
            ),
        },
        "sigma": {
            "source": str(sigma) if isinstance(sigma, (str, os.PathLike)) else "object",
            "fingerprint": sigma_fingerprint(calibration),
            "file_sha256": _file_sha256(sigma) if isinstance(sigma, (str, os.PathLike)) else None,
            "norms": len(applied),
            "noised": sum(v > 0 for v in applied.values()),
            "not_in_file": sorted(set(applied) - named),
            "sigma_end_median": float(np.median(sigmas)) if sigmas else 0.0,
            "laws": sorted({layer.law for layer in calibration.layers}),
            "rho": float(getattr(calibration, "rho", 0.0) or 0.0),
        },
        "prompts": {
            "source": inputs.source,
            "fingerprint": inputs.fingerprint,
            "count": inputs.shape[0],
            "tokens": inputs.num_real_tokens,
        },
        "draws": opts.draws,
        "seed": opts.seed,
        "draw_seeds": seeds,
        "max_new_tokens": opts.max_new_tokens,
        "confidence": opts.confidence,
        "pair": [[str(a), str(b)] for a, b in pair],
        "cost": {
            "seconds": round(seconds, 2),
            "forwards": opts.draws + 1,
            "batch_size": opts.batch_size,
            "greedy_decodes": (opts.draws + 1) * inputs.shape[0] * bool(opts.max_new_tokens),
            "note": "draws run one after another (each is another set of weights); the prompts of a draw "
            "run batched; greedy decoding runs one prompt at a time (no padding)",
        },
    }
