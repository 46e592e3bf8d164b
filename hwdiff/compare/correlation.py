"""Error correlation across layers along the residual stream, and per-token error-norm correlation.

Residual-stream positions are the embedding output and each decoder layer's output (all the same
shape). For each position i the error e_i = t_i − r_i over real tokens; the increments are
d_0 = e_0, d_i = e_i − e_{i−1}: the error that layer i added to the stream. Pearson correlations are
taken over all aligned elements (NaN/Inf elements count as zero error) in one streamed pass over
those positions; a position with no error at all has no correlation (NaN, listed in ``exact``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store.reader import Capture, plan_blocks
from .align import Pair


@dataclass(frozen=True)
class Correlation:
    names: tuple[str, ...]
    accumulated: np.ndarray  # [n, n] Pearson of the accumulated errors e_i
    increments: np.ndarray  # [n, n] Pearson of the per-layer increments d_i
    exact: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Correlation({len(self.names)} residual-stream positions)"


class _Gram:
    def __init__(self, n: int) -> None:
        self.gram = np.zeros((n, n))
        self.sums = np.zeros(n)
        self.count = 0

    def add(self, rows: np.ndarray) -> None:
        self.gram += rows @ rows.T
        self.sums += rows.sum(axis=1)
        self.count += rows.shape[1]

    def pearson(self) -> np.ndarray:
        n = max(self.count, 1)
        mean = self.sums / n
        cov = self.gram / n - np.outer(mean, mean)
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = cov / np.outer(sd, sd)
        corr[sd == 0, :] = np.nan
        corr[:, sd == 0] = np.nan
        return np.clip(corr, -1.0, 1.0)


def residual_positions(pairs: list[Pair]) -> list[Pair]:
    """The embedding output and the decoder layers' outputs (call 0), when they share one shape."""
    chosen = [
        p
        for p in pairs
        if p.slot == "output" and p.call == 0 and p.kind in ("embedding", "decoder_layer")
    ]
    shapes = {p.shape for p in chosen}
    return chosen if len(chosen) >= 2 and len(shapes) == 1 else []


def correlate(
    reference: Capture,
    target: Capture,
    positions: list[Pair],
    mask: np.ndarray | None,
    max_elements: int,
) -> Correlation:
    """Stream the residual-stream positions block by block and build both correlation matrices."""
    accumulated, increments = _Gram(len(positions)), _Gram(len(positions))
    shape = positions[0].shape
    for index in plan_blocks(shape, max(1, max_elements // len(positions))):
        block_mask = (
            mask[index[0], index[1] if len(index) > 1 else slice(None)]
            if mask is not None
            else None
        )
        errors = None
        for row, pair in enumerate(positions):
            errors = _errors(
                reference, target, pair, index, block_mask, errors, row, len(positions)
            )
        assert errors is not None  # positions is not empty (positions[0] above)
        if not np.isfinite(errors.sum()):  # rare: NaN/Inf elements count as zero error
            errors = np.nan_to_num(errors, nan=0.0, posinf=0.0, neginf=0.0, copy=False)
        accumulated.add(errors)
        errors[1:] -= errors[:-1].copy()
        increments.add(errors)
    acc = accumulated.pearson()
    exact = tuple(p.name for p, value in zip(positions, np.diag(accumulated.gram)) if value == 0)
    return Correlation(tuple(p.name for p in positions), acc, increments.pearson(), exact)


def _errors(
    reference: Capture,
    target: Capture,
    pair: Pair,
    index: tuple,
    mask: np.ndarray | None,
    errors: np.ndarray | None,
    row: int,
    rows: int,
) -> np.ndarray:
    """Write t − r (float64, real tokens, flattened) of one position into ``errors[row]``, allocating
    ``errors`` [rows, elements] on the first call; returns it."""
    r = reference.read(pair.name, pair.call, pair.slot, index)
    t = target.read(pair.name, pair.call, pair.slot, index)
    if mask is not None and not mask.all():
        r, t = r[mask], t[mask]
    if errors is None:
        errors = np.empty((rows, r.size))
    with np.errstate(invalid="ignore"):  # inf − inf: zeroed with the other non-finite errors
        np.subtract(t.reshape(-1), r.reshape(-1), out=errors[row], dtype=np.float64)
    return errors


def token_correlation(names: list[str], norms: list[np.ndarray]) -> np.ndarray:
    """Pearson correlation of per-token error norms between modules (any shapes with a token axis)."""
    if len(norms) < 2:
        return np.zeros((len(norms), len(norms)))
    stacked = np.stack(norms)
    sd = stacked.std(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(stacked)
    corr[sd == 0, :] = np.nan
    corr[:, sd == 0] = np.nan
    return corr
