"""MoE routers compared token by token: which real tokens chose other experts in the target than in
the reference, and the masks that keep a routed expert's rows to the tokens sent to it."""

from __future__ import annotations

import logging

import numpy as np

from ..store.reader import Capture
from ..structure import token_axis
from .align import Pair
from .divergence import (  # noqa: F401
    _growth,
    first_difference,
    first_divergence,
    with_budgets,
    with_local_budgets,
)
from .results import (
    RoutedToken,
    RoutingDiff,
)

log = logging.getLogger(__name__)


def _token_mask(pair: Pair, mask: np.ndarray | None) -> np.ndarray | None:
    """The real-token mask over the slot's leading axes up to its token axis (found by
    :func:`hwdiff.structure.token_axis`: ``[sequences, tokens, …]``, ``[sequences, heads, tokens, …]``
    …), or None when the slot has no token axis."""
    if mask is None:
        return None
    axis = token_axis(pair.shape, *mask.shape)
    if axis is None:
        return None
    sequences, tokens = mask.shape
    return np.broadcast_to(
        mask.reshape(sequences, *([1] * (axis - 1)), tokens), pair.shape[: axis + 1]
    )


def _routed_mask(
    ref: Capture, tgt: Capture, pair: Pair, token_mask: np.ndarray | None
) -> np.ndarray | None:
    """A routed expert's slot compares only the tokens both sides routed to it (the others hold no
    data); tokens routed on one side only are routing differences, reported by the router."""
    ref_present, tgt_present = (cap.present(pair.name, pair.call, pair.slot) for cap in (ref, tgt))
    if ref_present is None and tgt_present is None:
        return token_mask
    both = np.logical_and(
        ref_present if ref_present is not None else True,
        tgt_present if tgt_present is not None else True,
    )
    return (
        both
        if token_mask is None
        else token_mask & both.reshape(both.shape + (1,) * (token_mask.ndim - 2))
    )


def _nothing_routed(ref: Capture, tgt: Capture, pair: Pair, mask: np.ndarray | None) -> bool:
    token_mask = _routed_mask(ref, tgt, pair, _token_mask(pair, mask))
    return token_mask is not None and not token_mask.any()


def compare_routing(ref: Capture, tgt: Capture, pair: Pair) -> RoutingDiff:
    """The router's chosen experts per real token, reference against target."""
    chosen = [
        np.sort(cap.activation(pair.name, pair.call, "routing").astype(np.int64), axis=-1)
        for cap in (ref, tgt)
    ]
    real = (
        ref.attention_mask.astype(bool)
        if ref.mode == "full"
        else np.ones(chosen[0].shape[:2], dtype=bool)
    )
    differs = np.any(chosen[0] != chosen[1], axis=-1) & real
    changed = tuple(
        RoutedToken(
            int(s), int(t), tuple(map(int, chosen[0][s, t])), tuple(map(int, chosen[1][s, t]))
        )
        for s, t in zip(*np.nonzero(differs))
    )
    return RoutingDiff(pair.name, pair.call, int(real.sum()), changed)
