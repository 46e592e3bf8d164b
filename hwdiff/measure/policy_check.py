"""The policy-level check of a calibration: every norm's σ_end injected at once, against the hardware pair.

The per-norm ``--verify`` checks each norm alone at its sub-block. This check asks the question RL
cares about: with all of the calibrated noise in the model at once (each norm's σ_end, law and depth
correlation, drawn by :class:`~hwdiff.aqn.AQNInjector`), do the policy's next-token log-probabilities
move as much as the hardware pair moved them? It is :func:`hwdiff.measure.robustness_run.robustness` at the
token level (no greedy decoding), on the reference capture's own prompts, with the diff's two
captures as the measured pair: mean |Δlogp|, K3 KL and top-1 agreement of the noisy model against
its clean self (``draws`` noise draws), the same figures of the pair (equal to the diff's RL block,
checked), and the noise/hardware ratio of the first two with its bootstrap interval (prompts resampled
paired, draws independently: :data:`hwdiff.measure.robustness_card.INTERVAL_RULE`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..calibration.text import format_policy, policy_sentence  # noqa: F401 (re-exported: they were defined here)
from ..calibration.types import PolicyCheck
from ..errors import HwdiffError

DRAWS = 4
STATS = ("mean_abs", "k3_kl", "top1_agreement")
RATIO_STATS = ("mean_abs", "k3_kl")
AGREE_RTOL = 1e-6  # the pair's pooled figures against the diff's RL block


def policy_check(
    calibration: Any,
    model: Any,
    diff: Any,
    *,
    draws: int = DRAWS,
    seed: int = 0,
    confidence: float = 0.95,
    progress: bool = True,
) -> PolicyCheck:
    """Inject ``calibration``'s σ_end everywhere into ``model`` (the reference's checkpoint, dtype and
    kernels) ``draws`` times on the prompts of the diff's reference capture, and set the token-level
    effect beside the diff's hardware pair. The model's weights are restored bit for bit on return."""
    from ..compare.io import load_diff
    from ..store.reader import open_capture
    from .robustness_run import Options, robustness

    result = load_diff(diff, arrays=False)
    rl = result.rl_impact
    if rl is None:
        raise HwdiffError(
            "policy check: the diff has no RL block to compare with "
            f"({result.rl_absent or 'an older diff'}): capture both sides with log-probs "
            "(without --no-logprobs) and diff again"
        )
    paths = []
    for side, meta in (("reference", result.reference), ("target", result.target)):
        path = meta.get("path")
        if not path or not Path(path).exists():
            raise HwdiffError(
                f"policy check: the diff's {side} capture {path!r} is not at hand (the check measures "
                "the pair per prompt from the two captures): keep the captures where diff read them"
            )
        paths.append(Path(path))
    with open_capture(paths[0]) as cap:
        inputs = cap.inputs
    options = Options(
        draws=draws,
        seed=seed,
        prompts=inputs,
        limit=None,
        max_tokens=inputs.shape[1],
        max_new_tokens=0,
        confidence=confidence,
        progress=progress,
    )
    card = robustness(model, calibration, options=options, pair=[(paths[0], paths[1])])
    data = card.summary()
    emulated, measured = data["emulated"]["token"], data["measured"]["token"]
    hardware = {stat: rl.value(stat) for stat in STATS}
    for stat in (
        STATS
    ):  # the pair, pooled over prompts, is the diff's RL block: anything else is another pair
        pooled = measured[stat]["value"]
        if pooled is None or not math.isclose(
            pooled, hardware[stat], rel_tol=AGREE_RTOL, abs_tol=1e-12
        ):
            raise HwdiffError(
                f"policy check: the captures give {stat} {pooled} but the diff's RL block says "
                f"{hardware[stat]}: the captures changed since the diff; diff them again"
            )
    versus = data["emulated_vs_measured"]
    return PolicyCheck(
        {stat: emulated[stat] for stat in STATS},
        hardware,
        {stat: versus[f"{stat}_ratio"] for stat in RATIO_STATS},
        draws,
        seed,
        int(inputs.shape[0]),
        int(emulated["positions"]),
        confidence,
        data["interval_rule"],
        {k: str(data["model"][k]) for k in ("dtype", "attn_implementation", "device")},
    )
