"""Robustness cards (docs/robustness.md): the per-(draw, prompt) values of :func:`hwdiff.measure.robustness_run.robustness`,
their statistics with bootstrap intervals, the JSON card (schema :data:`SCHEMA`), the comparison of two
cards with a verdict, and the card's terminal and HTML renderings. numpy only.

Intervals: percentile bootstrap (:data:`RESAMPLES` resamples, fixed seed) over prompts and draws,
both resampled; a measured pair has one "draw", so its interval is over prompts only.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..common.numbers import json_number as _num
from ..errors import HwdiffError

SCHEMA = "hwdiff/robustness-card/1"
COMPARISON_SCHEMA = "hwdiff/robustness-comparison/1"
RESAMPLES = 2000
BOOTSTRAP_SEED = 20260101
TOKEN_STATS = ("mean_abs", "k3_kl", "top1_agreement")
INTERVAL_RULE = (
    "{c:.0%} percentile bootstrap interval, {n} resamples; the emulated side resamples prompts and "
    "draws (a new prompt set and new noise draws), the measured pair prompts only"
)
ANSWER_RULE = (
    "the last number in the decoded greedy continuation (digits with an optional sign, thousands commas "
    "and decimal part; commas dropped), compared numerically with the prompt's 'answer'; no number = wrong"
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Cells:
    """One side's per-draw, per-prompt values, arrays ``[draws, prompts]`` (a measured pair: 1 draw).

    Token level (None when not measured): ``mean_abs``, ``k3_kl``, ``top1_agreement`` per prompt,
    weighted by ``positions`` [prompts] when pooled. Sequence level (None when not measured):
    ``split`` (first differing generated position, −1 when identical), ``answers`` (the extracted
    answer under noise, "" when none) and ``clean_answers`` [prompts] (the clean side's)."""

    positions: np.ndarray | None = None
    mean_abs: np.ndarray | None = None
    k3_kl: np.ndarray | None = None
    top1_agreement: np.ndarray | None = None
    split: np.ndarray | None = None
    answers: tuple[tuple[str, ...], ...] | None = None
    clean_answers: tuple[str, ...] | None = None

    @property
    def has_tokens(self) -> bool:
        return self.mean_abs is not None

    @property
    def has_sequences(self) -> bool:
        return self.split is not None

    def to_json(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            return value.tolist() if isinstance(value, np.ndarray) else value

        return {name: plain(getattr(self, name)) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Cells | None":
        if data is None:
            return None
        arrays = {
            name: None if data.get(name) is None else np.asarray(data[name], dtype=np.float64)
            for name in ("positions", "mean_abs", "k3_kl", "top1_agreement", "split")
        }
        answers = data.get("answers")
        return cls(
            **arrays,
            answers=None if answers is None else tuple(tuple(row) for row in answers),
            clean_answers=None
            if data.get("clean_answers") is None
            else tuple(data["clean_answers"]),
        )


@dataclass(frozen=True)
class RobustnessCard:
    """The result of :func:`robustness`: provenance (``meta``), the emulated cells, the measured
    pair's cells (None without ``--pair``) and the prompts' reference answers ("" where none)."""

    meta: dict[str, Any]
    emulated: Cells
    measured: Cells | None
    references: tuple[str, ...]

    @property
    def confidence(self) -> float:
        return float(self.meta["confidence"])

    def summary(self) -> dict[str, Any]:
        """The JSON card (schema :data:`SCHEMA`): provenance, statistics with intervals, raw cells."""
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        sides = {"emulated": describe(self.emulated, self.references, self.confidence, rng)}
        sides["measured"] = (
            None
            if self.measured is None
            else describe(self.measured, self.references, self.confidence, rng)
        )
        return {
            "schema": SCHEMA,
            **self.meta,
            "interval_rule": INTERVAL_RULE.format(c=self.confidence, n=RESAMPLES),
            "answer_rule": ANSWER_RULE,
            **sides,
            "emulated_vs_measured": self.versus_measured(rng),
            "cells": {
                "emulated": self.emulated.to_json(),
                "measured": None if self.measured is None else self.measured.to_json(),
                "references": list(self.references),
            },
        }

    def versus_measured(self, rng: np.random.Generator) -> dict[str, Any] | None:
        """Emulated / measured ratio of each token statistic, bootstrapped over prompts (paired) and draws."""
        if self.measured is None or not self.measured.has_tokens:
            return None
        out = {}
        for stat in ("mean_abs", "k3_kl"):
            out[f"{stat}_ratio"] = _ratio(self.measured, self.emulated, stat, self.confidence, rng)
        return out


def extract_answer(text: str) -> str:
    """The answer in a continuation (see :data:`ANSWER_RULE`): its last number, commas dropped; "" when none."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else ""


def is_correct(answer: str, reference: str) -> bool:
    """``answer`` equals ``reference`` as numbers (relative 1e-9); an empty answer is never correct."""
    try:
        got, want = float(answer), float(reference.replace(",", ""))
    except ValueError:
        return False
    return abs(got - want) <= 1e-9 * max(1.0, abs(want))


# ---- statistics ------------------------------------------------------------------------------------
def _pooled(values: np.ndarray, weights: np.ndarray) -> float:
    """Weighted mean over prompts (``weights`` [prompts]) of the mean over draws of ``values`` [draws, prompts]."""
    return float((values * weights).sum() / (weights.sum() * values.shape[0]))


def _boot(
    values: np.ndarray, weights: np.ndarray, prompts: np.ndarray, draws: np.ndarray
) -> np.ndarray:
    """Pooled value per resample: ``prompts`` [B, P] and ``draws`` [B, D] index arrays."""
    v = values[draws[:, :, None], prompts[:, None, :]]
    w = weights[prompts]
    return (v * w[:, None, :]).sum((1, 2)) / (w.sum(1) * values.shape[0])


def _indices(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, size, (RESAMPLES, size))


def _interval(point: float, boot: np.ndarray, confidence: float) -> dict[str, float | None]:
    finite = boot[np.isfinite(boot)]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail]) if finite.size else (math.nan, math.nan)
    return {"value": _num(point), "low": _num(float(low)), "high": _num(float(high))}


def _stat(
    values: np.ndarray,
    weights: np.ndarray,
    confidence: float,
    rng: np.random.Generator,
    prompts: np.ndarray | None = None,
) -> dict[str, float | None]:
    prompts = _indices(rng, values.shape[1]) if prompts is None else prompts
    boot = _boot(values, weights, prompts, _indices(rng, values.shape[0]))
    return _interval(_pooled(values, weights), boot, confidence)


def _paired_boot(
    a: Cells, b: Cells, stat: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' resampled pooled ``stat`` with the same prompts resampled (their draws independently)."""
    prompts = _indices(rng, a.positions.size)
    return tuple(
        _boot(getattr(c, stat), c.positions, prompts, _indices(rng, getattr(c, stat).shape[0]))
        for c in (a, b)
    )


def _ratio(
    den: Cells, num: Cells, stat: str, confidence: float, rng: np.random.Generator
) -> dict[str, Any]:
    """``num`` / ``den`` of a pooled token statistic with its interval; no value (and why) when ``den`` is 0."""
    bottom = _pooled(getattr(den, stat), den.positions)
    if bottom == 0:
        return {
            "value": None,
            "low": None,
            "high": None,
            "why": f"no ratio: {stat} is exactly 0 on the denominator's side (bit-identical log-probs)",
        }
    boot_den, boot_num = _paired_boot(den, num, stat, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _interval(
            _pooled(getattr(num, stat), num.positions) / bottom, boot_num / boot_den, confidence
        )


def answer_matrix(
    cells: Cells, references: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(answered [prompts] bool: has a reference answer, clean correct [prompts], noisy correct [draws, prompts])."""
    answered = np.array([bool(r) for r in references])
    clean = np.array(
        [is_correct(a, r) for a, r in zip(cells.clean_answers, references)], dtype=np.float64
    )
    noisy = np.array(
        [[is_correct(a, r) for a, r in zip(row, references)] for row in cells.answers],
        dtype=np.float64,
    )
    return answered, clean, noisy


def describe(
    cells: Cells, references: Sequence[str], confidence: float, rng: np.random.Generator
) -> dict[str, Any]:
    """One side's statistics with intervals (JSON)."""
    out: dict[str, Any] = {
        "draws": int((cells.mean_abs if cells.has_tokens else cells.split).shape[0])
    }
    if cells.has_tokens:
        out["token"] = {
            "positions": int(cells.positions.sum()),
            **{s: _stat(getattr(cells, s), cells.positions, confidence, rng) for s in TOKEN_STATS},
        }
    if cells.has_sequences:
        out["sequence"] = _describe_sequences(cells, references, confidence, rng)
    return out


def _describe_sequences(
    cells: Cells, references: Sequence[str], confidence: float, rng: np.random.Generator
) -> dict[str, Any]:
    ones = np.ones(cells.split.shape[1])
    splits = cells.split[cells.split >= 0].astype(int)
    out = {
        "prompts": int(cells.split.shape[1]),
        "continuation_changed": _stat((cells.split >= 0).astype(float), ones, confidence, rng),
        "split_positions": {
            "histogram": np.bincount(splits).tolist() if splits.size else [],
            "median": float(np.median(splits)) if splits.size else None,
            "min": int(splits.min()) if splits.size else None,
        },
    }
    if cells.answers is None:
        out["answers"] = {
            "available": False,
            "reason": "the model has no tokenizer to decode its continuations",
        }
        return out
    changed_answer = np.array(
        [[a != c for a, c in zip(row, cells.clean_answers)] for row in cells.answers], float
    )
    out["answer_changed"] = _stat(changed_answer, ones, confidence, rng)
    answered, clean, noisy = answer_matrix(cells, references)
    if not answered.any():
        out["answers"] = {"available": False, "reason": "no prompt carries a reference 'answer'"}
        return out
    sub = noisy[:, answered]
    c = clean[answered]
    out["answers"] = {
        "available": True,
        "prompts_with_reference": int(answered.sum()),
        "accuracy_clean": float(c.mean()),
        "accuracy_noisy": _stat(sub, np.ones(sub.shape[1]), confidence, rng),
        "right_to_wrong_per_draw": float((c[None] * (1 - sub)).sum(1).mean()),
        "wrong_to_right_per_draw": float(((1 - c[None]) * sub).sum(1).mean()),
        "right_to_wrong_total": int((c[None] * (1 - sub)).sum()),
        "wrong_to_right_total": int(((1 - c[None]) * sub).sum()),
    }
    return out


# ---- cards on disk, comparison --------------------------------------------------------------------
def save_card(card: RobustnessCard, path: str | os.PathLike) -> Path:
    from ..common.outputs import write_text

    return write_text(path, json.dumps(card.summary(), indent=1))


def save_comparison(result: "Comparison", path: str | os.PathLike) -> Path:
    from ..common.outputs import write_text

    return write_text(path, json.dumps(result.summary(), indent=1))


def load_card(path: str | os.PathLike) -> RobustnessCard:
    """A card written by :func:`save_card`; refuses other files and other schema versions."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HwdiffError(f"cannot read robustness card {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else None
        raise HwdiffError(f"{path} is not a robustness card of schema {SCHEMA} (schema {found!r})")
    meta_keys = (
        "hwdiff_version",
        "created_utc",
        "model",
        "sigma",
        "prompts",
        "draws",
        "seed",
        "draw_seeds",
        "max_new_tokens",
        "confidence",
        "pair",
        "cost",
    )
    try:
        cells = data["cells"]
        return RobustnessCard(
            {k: data[k] for k in meta_keys},
            Cells.from_json(cells["emulated"]),
            Cells.from_json(cells["measured"]),
            tuple(cells["references"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        missing = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise HwdiffError(
            f"{path}: malformed robustness card ({missing}): write it again with hwdiff robustness -o"
        ) from None


COMPARABLE = (
    ("prompts", "fingerprint", "prompts"),
    ("sigma", "fingerprint", "noise law (sigma file)"),
    ("model", "dtype", "dtype"),
    ("model", "device", "device"),
    ("model", "attn_implementation", "attention implementation"),
)


def check_comparable(a: RobustnessCard, b: RobustnessCard) -> None:
    """Two cards compare only over the same prompts, noise law, dtype, device, kernels and continuation length."""
    for group, key, what in COMPARABLE:
        if a.meta[group][key] != b.meta[group][key]:
            raise HwdiffError(
                f"the cards differ in {what}: {a.meta[group][key]} against {b.meta[group][key]}; "
                "make both with the same --prompts/--limit/--max-tokens, --sigma, --dtype, --device "
                "and --attn-impl"
            )
    if a.meta["max_new_tokens"] != b.meta["max_new_tokens"]:
        raise HwdiffError(
            f"the cards differ in max_new_tokens: {a.meta['max_new_tokens']} against "
            f"{b.meta['max_new_tokens']}"
        )


@dataclass(frozen=True)
class Comparison:
    """Card B against card A: ``ratios`` (B / A of mean |Δlogp| and K3 KL) and ``differences`` (B − A of
    top-1 agreement, continuation changed, noisy accuracy), each ``{value, low, high}``; ``verdict`` from
    the mean |Δlogp| ratio's interval."""

    a: dict[str, Any]
    b: dict[str, Any]
    confidence: float
    ratios: dict[str, dict]
    differences: dict[str, dict]
    verdict: str
    reason: str = field(default="")

    def summary(self) -> dict[str, Any]:
        return {
            "schema": COMPARISON_SCHEMA,
            "a": self.a,
            "b": self.b,
            "confidence": self.confidence,
            "interval_rule": (
                f"{self.confidence:.0%} percentile bootstrap, {RESAMPLES} resamples: the same "
                "prompts resampled on both sides, each card's draws independently"
            ),
            "ratios_b_over_a": self.ratios,
            "differences_b_minus_a": self.differences,
            "verdict": self.verdict,
            "verdict_rule": self.reason,
        }


def compare_cards(
    a: RobustnessCard | str | os.PathLike,
    b: RobustnessCard | str | os.PathLike,
    *,
    confidence: float | None = None,
) -> Comparison:
    """Is checkpoint B more or less robust than A? (default confidence: the smaller of the two cards')."""
    a, b = (load_card(c) if isinstance(c, (str, os.PathLike)) else c for c in (a, b))
    check_comparable(a, b)
    conf = confidence if confidence is not None else min(a.confidence, b.confidence)
    if not 0.5 <= conf < 1:
        raise HwdiffError(f"confidence must be in [0.5, 1), got {conf}")
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    ratios = {
        stat: _ratio(a.emulated, b.emulated, stat, conf, rng) for stat in ("mean_abs", "k3_kl")
    }
    differences = {"top1_agreement": _difference(a, b, "top1_agreement", conf, rng)}
    if a.emulated.has_sequences and b.emulated.has_sequences:
        differences["continuation_changed"] = _difference(a, b, "changed", conf, rng)
    verdict, rule = _verdict(ratios["mean_abs"], conf)
    return Comparison(_who(a), _who(b), conf, ratios, differences, verdict, rule)


def _difference(
    a: RobustnessCard, b: RobustnessCard, stat: str, conf: float, rng: np.random.Generator
) -> dict:
    def values(card: RobustnessCard) -> tuple[np.ndarray, np.ndarray]:
        cells = card.emulated
        if stat == "changed":
            return (cells.split >= 0).astype(float), np.ones(cells.split.shape[1])
        return getattr(cells, stat), cells.positions

    (va, wa), (vb, wb) = values(a), values(b)
    prompts = _indices(rng, va.shape[1])
    boot = _boot(vb, wb, prompts, _indices(rng, vb.shape[0])) - _boot(
        va, wa, prompts, _indices(rng, va.shape[0])
    )
    return _interval(_pooled(vb, wb) - _pooled(va, wa), boot, conf)


def _verdict(ratio: dict, conf: float) -> tuple[str, str]:
    rule = (
        f"from the {conf:.0%} interval of mean |Δlogp| B / A under the same noise: above 1 → B less robust, "
        "below 1 → B more robust, containing 1 → no detectable difference"
    )
    low, high = ratio["low"], ratio["high"]
    if low is None or high is None:
        return "undetermined", rule + " (no finite interval)"
    if low > 1:
        return "B is less robust", rule
    if high < 1:
        return "B is more robust", rule
    return "no detectable difference", rule


def _who(card: RobustnessCard) -> dict[str, Any]:
    return {
        "model": card.meta["model"]["spec"],
        "fingerprint": card.meta["model"]["fingerprint"],
        "draws": card.meta["draws"],
        "seed": card.meta["seed"],
    }


# ---- terminal --------------------------------------------------------------------------------------
def _fmt(stat: dict | None, spec: str = ".4g") -> str:
    if not stat or stat.get("value") is None:
        return "-"
    low, high = stat["low"], stat["high"]
    bounds = "" if low is None else f" [{low:{spec}}, {high:{spec}}]"
    return f"{stat['value']:{spec}}{bounds}"


_ROWS = (
    ("mean |Δlogp| (nats)", "token", "mean_abs", ".4g"),
    ("K3 KL", "token", "k3_kl", ".3g"),
    ("top-1 agreement", "token", "top1_agreement", ".3f"),
    ("continuation changed", "sequence", "continuation_changed", ".3f"),
    ("extracted answer changed", "sequence", "answer_changed", ".3f"),
)


def format_card(summary: dict[str, Any]) -> str:
    """The terminal summary of a card's JSON (:meth:`RobustnessCard.summary`)."""
    m, s, p = summary["model"], summary["sigma"], summary["prompts"]
    lines = [
        f"robustness of {m['spec']} ({m['dtype']}, {m['device']}, {m['attn_implementation']}) to "
        f"{s['source']}: σ_end on {s['noised']} of {s['norms']} norms (median {s['sigma_end_median']:.3g}, "
        f"{'/'.join(s['laws'])}, ρ {s['rho']:.2f})" + _unnamed_note(s.get("not_in_file") or []),
        f"{summary['draws']} draws (seed {summary['seed']}), {p['count']} prompts ({p['tokens']} tokens), "
        f"{summary['max_new_tokens']} new tokens; {summary['cost']['seconds']:.1f} s",
        f"intervals: {summary['interval_rule']}",
        "",
        f"{'':28}{'emulated (noise)':34}measured pair",
    ]
    em, me = summary["emulated"], summary["measured"] or {}
    for label, level, key, spec in _ROWS:
        lines.append(
            f"{label:28}{_fmt(em.get(level, {}).get(key), spec):34}{_fmt(me.get(level, {}).get(key), spec)}"
        )
    lines += _answer_lines(em, me)
    versus = summary.get("emulated_vs_measured")
    if versus:
        lines.append(
            f"emulated / measured mean |Δlogp|: {_fmt(versus['mean_abs_ratio'], '.3g')}   "
            f"K3: {_fmt(versus['k3_kl_ratio'], '.3g')}"
        )
    return "\n".join(lines)


def _unnamed_note(names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"; the file names none of {shown}: no noise there"


def _answer_lines(em: dict, me: dict) -> list[str]:
    lines = []
    for name, side in (("emulated", em), ("measured", me)):
        seq = side.get("sequence")
        if not seq:
            continue
        hist = seq["split_positions"]
        lines.append(
            f"{name}: no continuation changed"
            if hist["median"] is None
            else f"{name}: first split median {hist['median']:g}, min {hist['min']:g}"
        )
        answers = seq["answers"]
        if not answers["available"]:
            lines.append(f"{name} answers: {answers['reason']}")
            continue
        lines.append(
            f"{name} answers ({answers['prompts_with_reference']} prompts): accuracy clean "
            f"{answers['accuracy_clean']:.3f}, under noise {_fmt(answers['accuracy_noisy'], '.3f')}; "
            f"right→wrong {answers['right_to_wrong_per_draw']:.2f}/draw, wrong→right "
            f"{answers['wrong_to_right_per_draw']:.2f}/draw"
        )
    return lines


def format_comparison(result: Comparison) -> str:
    ratio = result.ratios
    lines = [
        f"A: {result.a['model']} ({result.a['fingerprint'][:19]}…, {result.a['draws']} draws, seed {result.a['seed']})",
        f"B: {result.b['model']} ({result.b['fingerprint'][:19]}…, {result.b['draws']} draws, seed {result.b['seed']})",
        f"mean |Δlogp| B/A {_fmt(ratio['mean_abs'], '.3g')}   K3 KL B/A {_fmt(ratio['k3_kl'], '.3g')}",
    ]
    lines += [f"{name} B−A {_fmt(value, '+.3f')}" for name, value in result.differences.items()]
    lines.append(f"verdict at {result.confidence:.0%}: {result.verdict}")
    return "\n".join(lines)


def card_html(summary: dict[str, Any]) -> str:
    """The report's section for a card: emulated vs measured with intervals, then provenance."""
    import html

    e = html.escape
    em, me = summary["emulated"], summary["measured"] or {}
    rows = "".join(
        f"<tr><td>{e(label)}</td><td>{e(_fmt(em.get(level, {}).get(key), spec))}</td>"
        f"<td>{e(_fmt(me.get(level, {}).get(key), spec))}</td></tr>"
        for label, level, key, spec in _ROWS
    )
    versus = summary.get("emulated_vs_measured")
    ratio = (
        f"<p>emulated / measured mean |Δlogp|: <b>{e(_fmt(versus['mean_abs_ratio'], '.3g'))}</b></p>"
        if versus
        else "<p>No measured pair on this card (<code>--pair REF.h5 TGT.h5</code> adds one).</p>"
    )
    notes = "".join(f"<li>{e(line)}</li>" for line in _answer_lines(em, me))
    head = format_card(summary).split("\n")[:3]
    return (
        f"<h2>Robustness to the calibrated noise</h2><p>{'<br>'.join(map(e, head))}</p>"
        f"<table><tr><th>statistic</th><th>emulated (noise draws)</th><th>measured pair</th></tr>{rows}</table>"
        f"{ratio}<ul>{notes}</ul><p><small>{e(summary['answer_rule'])}; definitions: docs/robustness.md</small></p>"
    )
