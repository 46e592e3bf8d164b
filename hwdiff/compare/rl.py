"""Does it matter for RL? Token log-prob mismatch between two captures (docs/rl-impact.md).

RL frameworks compare the log-probability the rollout engine gave each sampled token with the one
the trainer computes. Here both captures ran the same fixed inputs, and the tokens scored are the
next input tokens (teacher forcing), read from each capture's ``/logprobs`` group. The reference
plays the rollout engine, the target the trainer: Δlogp = logp_target − logp_reference.

Positions: t is a real next-token position when tokens t and t+1 are both real (attention mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..common.numbers import json_number as _num
from ..errors import HwdiffError
from ..store.reader import Capture, TokenLogProbs

THRESHOLDS = (1e-3, 1e-2)
WORST = 10
HIST_BINS = 81
K3_DEFINITION = (
    "K3 = mean over positions of (r - 1) - log r with r = p_target(x)/p_reference(x) = exp(Δlogp), "
    "x the scored token: Schulman's k3 estimator of KL(reference || target), the reference taken as "
    "the sampling (rollout) policy; here x are the fixed input tokens, not samples"
)
TOPK_KL_DEFINITION = (
    "KL(reference || target) of the two top-k distributions restricted to the tokens in both top-k "
    "sets and renormalised over that intersection (only there are both log-probs stored); "
    "positions with an empty intersection are left out and counted"
)
TOP1_DEFINITION = (
    "top-1 agreement: the sets of tokens tied at the top of each side (within the stored top-k) "
    "share a token"
)

# Published figures (docs/rl-impact.md gives the sources in full): (key, metric, low, high, what, source).
# Only figures whose public source states them; the ones hwdiff had only second hand were dropped.
PUBLISHED = (
    (
        "mean_abs",
        "mean |Δlogp|",
        0.011,
        0.025,
        "GPU rollout vs trainer stacks",
        "vllm-project/vime#64 (~0.011) and #274 (GPU typical < 0.025)",
    ),
    (
        "mean_abs",
        "mean |Δlogp|",
        0.0139,
        0.0139,
        "a fixed Ascend 910B stack",
        "vllm-project/vime#274",
    ),
    ("mean_abs", "mean |Δlogp|", 0.0, 0.1, "slime's CI gate", "THUDM/slime#1968"),
)
SLIME_GATE = 0.1


@dataclass(frozen=True)
class WorstToken:
    """One scored token: ``prompt`` row, ``position`` t (the token scored is ``input_ids[prompt, t+1]``)."""

    prompt: int
    position: int
    token: int
    ref_logprob: float
    target_logprob: float

    @property
    def delta(self) -> float:
        return self.target_logprob - self.ref_logprob


@dataclass(frozen=True)
class RLImpact:
    """Token log-prob mismatch over ``positions`` real next-token positions (log-probs in nats).

    ``frac_above``: fraction with |Δlogp| above each of :data:`THRESHOLDS`; ``k3_kl``, ``topk_kl``,
    ``top1_agreement``: see the ``*_DEFINITION`` strings; ``topk_kl_positions``: positions with a
    non-empty top-k intersection (the ones ``topk_kl`` averages); ``hist_*``: histogram of Δlogp."""

    positions: int
    mean_abs: float
    max_abs: float
    frac_above: tuple[float, ...]
    mean_exp_abs: float
    k3_kl: float
    topk_kl: float
    topk_kl_positions: int
    topk_overlap: float  # mean size of the top-k intersection / k
    top1_agreement: float
    topk: int
    worst: tuple[WorstToken, ...]
    hist_counts: tuple[int, ...]
    hist_edges: tuple[float, ...]
    compute_dtype: str

    def value(self, key: str) -> float:
        """A statistic by its JSON key (``mean_abs``, ``frac_above_1e-3``, ...)."""
        if key.startswith("frac_above_"):
            return self.frac_above[THRESHOLDS.index(float(key[len("frac_above_") :]))]
        return float(getattr(self, key))


def real_next_token_mask(attention_mask: np.ndarray) -> np.ndarray:
    """bool [sequences, tokens]: position t is real when tokens t and t+1 are both real."""
    real = attention_mask.astype(bool)
    mask = np.zeros_like(real)
    mask[:, :-1] = real[:, :-1] & real[:, 1:]
    return mask


def rl_impact(
    ref: TokenLogProbs, tgt: TokenLogProbs, attention_mask: np.ndarray, input_ids: np.ndarray
) -> RLImpact:
    """Compare the stored token log-probs of two runs over the same inputs (float64 throughout)."""
    mask = real_next_token_mask(attention_mask)
    if not mask.any():
        raise HwdiffError(
            "no real next-token position: every sequence has fewer than two real tokens"
        )
    lr, lt = ref.next_token.astype(np.float64)[mask], tgt.next_token.astype(np.float64)[mask]
    delta = lt - lr
    absd = np.abs(delta)
    kl, kl_count, overlap = topk_kl(ref, tgt, mask)
    rows, cols = np.nonzero(mask)
    order = np.argsort(-absd, kind="stable")[:WORST]
    worst = tuple(
        WorstToken(
            int(rows[i]),
            int(cols[i]),
            int(input_ids[rows[i], cols[i] + 1]),
            float(lr[i]),
            float(lt[i]),
        )
        for i in order
    )
    span = float(absd.max()) or 1.0
    counts, edges = np.histogram(delta, bins=np.linspace(-span, span, HIST_BINS + 1))
    return RLImpact(
        positions=int(mask.sum()),
        mean_abs=float(absd.mean()),
        max_abs=float(absd.max()),
        frac_above=tuple(float(np.mean(absd > t)) for t in THRESHOLDS),
        mean_exp_abs=float(np.mean(np.exp(absd))),
        k3_kl=float(np.mean(np.expm1(delta) - delta)),
        topk_kl=kl,
        topk_kl_positions=kl_count,
        topk_overlap=overlap,
        top1_agreement=top1_agreement(ref, tgt, mask),
        topk=min(ref.topk, tgt.topk),
        worst=worst,
        hist_counts=tuple(int(c) for c in counts),
        hist_edges=tuple(float(e) for e in edges),
        compute_dtype=f"{ref.attrs.get('compute_dtype')}/{tgt.attrs.get('compute_dtype')}",
    )


def topk_kl(ref: TokenLogProbs, tgt: TokenLogProbs, mask: np.ndarray) -> tuple[float, int, float]:
    """(mean KL over positions with a non-empty intersection, their count, mean intersection size / k);
    see :data:`TOPK_KL_DEFINITION`. The top-k sets are compared as sets (order and ties do not matter)."""
    k = min(ref.topk, tgt.topk)
    ids_r, ids_t = ref.topk_ids[mask][:, :k], tgt.topk_ids[mask][:, :k]
    lp_r, lp_t = (
        ref.topk_logprobs[mask][:, :k].astype(np.float64),
        tgt.topk_logprobs[mask][:, :k].astype(np.float64),
    )
    match = ids_r[:, :, None] == ids_t[:, None, :]  # [positions, k_ref, k_target]
    in_both = match.any(-1)
    # the target's log-prob of each of the reference's top-k tokens, where the target has it too
    lt_of_r = np.where(in_both, np.einsum("pij,pj->pi", match.astype(np.float64), lp_t), -np.inf)
    kl = np.full(len(ids_r), np.nan)
    usable = in_both.any(-1)
    if usable.any():
        keep = in_both[usable]
        p = _renormalised(np.where(in_both, lp_r, -np.inf)[usable])
        q = _renormalised(lt_of_r[usable])
        kl[usable] = (
            np.where(keep, np.exp(p), 0.0) * (np.where(keep, p, 0.0) - np.where(keep, q, 0.0))
        ).sum(-1)
    count = int(usable.sum())
    return (float(np.nanmean(kl)) if count else math.nan), count, float(in_both.sum(-1).mean() / k)


def _renormalised(logp: np.ndarray) -> np.ndarray:
    """log-probs renormalised over the finite entries of each row (``-inf`` entries are left out)."""
    top = logp.max(-1, keepdims=True)
    return logp - top - np.log(np.exp(logp - top).sum(-1, keepdims=True))


def top1_agreement(ref: TokenLogProbs, tgt: TokenLogProbs, mask: np.ndarray) -> float:
    """Fraction of positions where the tied-at-the-top token sets of the two sides intersect."""

    def tied(side: TokenLogProbs) -> tuple[np.ndarray, np.ndarray]:
        ids, lp = side.topk_ids[mask], side.topk_logprobs[mask]
        return ids, lp == lp[:, :1]

    ids_r, top_r = tied(ref)
    ids_t, top_t = tied(tgt)
    both = (ids_r[:, :, None] == ids_t[:, None, :]) & top_r[:, :, None] & top_t[:, None, :]
    return float(both.any((1, 2)).mean())


def rl_for(ref: Capture, tgt: Capture) -> tuple[RLImpact | None, str]:
    """The RL block of a diff, or (None, why it is absent)."""
    ref_logprobs, tgt_logprobs = ref.token_logprobs(), tgt.token_logprobs()
    if ref_logprobs is None or tgt_logprobs is None:
        sides = ((ref, ref_logprobs), (tgt, tgt_logprobs))
        missing = [str(cap.path) for cap, logprobs in sides if logprobs is None]
        return None, (
            f"no token log-probabilities in {', '.join(missing)} (captured by an hwdiff without them, "
            "with logprobs off, or from a model without a head): capture again for the RL block"
        )
    if not real_next_token_mask(ref.attention_mask).any():
        return None, "no real next-token position: every sequence has fewer than two real tokens"
    return rl_impact(ref_logprobs, tgt_logprobs, ref.attention_mask, ref.input_ids), ""


def published_comparison(rl: RLImpact) -> list[str]:
    """One factual line per published figure: this pair's value beside it."""
    lines = []
    for key, metric, low, high, what, source in PUBLISHED:
        value = rl.value(key)
        shown = f"{value:.4f}" if key == "mean_exp_abs" else f"{value:.3g}"
        span = f"{low:g}" if low == high else f"{low:g}–{high:g}"
        if low == 0.0:  # a gate
            where = "passes" if value <= high else "fails"
            lines.append(f"{metric} {shown}: {where} {what} (≤ {high:g}; {source})")
            continue
        where = "below" if value < low else "above" if value > high else "within"
        lines.append(f"{metric} {shown}: {where} {span} for {what} ({source})")
    return lines


def rl_summary(rl: RLImpact | None, absent: str = "") -> dict:
    """The JSON ``rl_impact`` block (``{"available": false, "reason": ...}`` when absent)."""
    if rl is None:
        return {"available": False, "reason": absent}
    return {
        "available": True,
        "positions": rl.positions,
        "position_rule": "t is real when tokens t and t+1 are real",
        "delta": "logp_target - logp_reference (nats)",
        "compute_dtype": rl.compute_dtype,
        "mean_abs": rl.mean_abs,
        "max_abs": rl.max_abs,
        **{f"frac_above_{t:g}": f for t, f in zip(THRESHOLDS, rl.frac_above)},
        "mean_exp_abs": rl.mean_exp_abs,
        "k3_kl": rl.k3_kl,
        "k3_kl_definition": K3_DEFINITION,
        "topk": rl.topk,
        "topk_kl": _num(rl.topk_kl),
        "topk_kl_positions": rl.topk_kl_positions,
        "topk_overlap": rl.topk_overlap,
        "topk_kl_definition": TOPK_KL_DEFINITION,
        "top1_agreement": rl.top1_agreement,
        "top1_definition": TOP1_DEFINITION,
        "worst": [
            {
                "prompt": w.prompt,
                "position": w.position,
                "token": w.token,
                "ref_logprob": w.ref_logprob,
                "target_logprob": w.target_logprob,
                "delta": w.delta,
            }
            for w in rl.worst
        ],
        "histogram": {"counts": list(rl.hist_counts), "edges": list(rl.hist_edges)},
        "published": published_comparison(rl),
    }


CSV_FIELDS = (
    "positions",
    "mean_abs",
    "max_abs",
    "frac_above_0.001",
    "frac_above_0.01",
    "mean_exp_abs",
    "k3_kl",
    "topk",
    "topk_kl",
    "topk_kl_positions",
    "topk_overlap",
    "top1_agreement",
)


def csv_rows(block: dict) -> list[dict]:
    """Rows (metric, value) of the RL CSV; the worst tokens follow as ``worst_<i>`` rows."""
    if not block["available"]:
        return [{"metric": "available", "value": False, "note": block["reason"]}]
    rows = [{"metric": key, "value": block[key], "note": ""} for key in CSV_FIELDS]
    rows += [
        {
            "metric": f"worst_{i}",
            "value": w["delta"],
            "note": f"prompt {w['prompt']} position {w['position']} token {w['token']}",
        }
        for i, w in enumerate(block["worst"], 1)
    ]
    return rows


def format_rl(rl: RLImpact | None, absent: str = "") -> list[str]:
    """The terminal lines of the RL block."""
    if rl is None:
        return [f"RL impact  absent: {absent}"]
    lines = [
        f"RL impact  {rl.positions} next-token positions, Δlogp = target − reference (nats, {rl.compute_dtype})",
        f"  mean |Δlogp| {rl.mean_abs:.4g}   max {rl.max_abs:.4g}   > 1e-3 {rl.frac_above[0]:.1%}   "
        f"> 1e-2 {rl.frac_above[1]:.1%}   mean exp(|Δlogp|) {rl.mean_exp_abs:.5f}",
        f"  K3 KL(ref||target) {rl.k3_kl:.3g}   top-{rl.topk} KL (intersection, renormalised) {rl.topk_kl:.3g}   "
        f"top-1 agreement {rl.top1_agreement:.1%}",
    ]
    worst = ", ".join(
        f"p{w.prompt}@{w.position} tok {w.token} Δ{w.delta:+.3g}" for w in rl.worst[:3]
    )
    lines.append(f"  worst tokens: {worst}")
    return lines
