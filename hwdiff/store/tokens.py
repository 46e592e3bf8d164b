"""The token ids of a run, as every capture file holds them in ``/inputs``: :class:`Inputs`, checked
on creation, with the fingerprint a capture records as ``inputs_fingerprint``. Reading prompts, files
and arrays into it is :mod:`hwdiff.capturing.inputs`; the writer, the reader and the rank manifest take it here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import InputsError


@dataclass(frozen=True, eq=False)
class Inputs:
    """Token ids ``[sequences, tokens]`` (int64) with their attention mask (1 = real token)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise InputsError(
                f"token ids must be a 2-D [sequences, tokens] array with a mask of the same shape; "
                f"got ids {self.input_ids.shape} and mask {self.attention_mask.shape}"
            )
        if self.input_ids.size == 0:
            raise InputsError(f"inputs from {self.source} hold no tokens")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    @property
    def num_real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the shape, ids and mask: equal inputs give equal fingerprints on any machine."""
        digest = hashlib.sha256(repr(self.shape).encode())
        digest.update(np.ascontiguousarray(self.input_ids, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(self.attention_mask, dtype="<i8").tobytes())
        return "sha256:" + digest.hexdigest()

    def batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(first row, ids, mask)`` for consecutive batches of up to ``batch_size`` rows."""
        for start in range(0, self.shape[0], batch_size):
            stop = start + batch_size
            yield start, self.input_ids[start:stop], self.attention_mask[start:stop]

    def check_vocab(self, vocab_size: int) -> None:
        """Raise when a real token id falls outside ``[0, vocab_size)``."""
        real = self.input_ids[self.attention_mask.astype(bool)]
        if real.size and (real.min() < 0 or real.max() >= vocab_size):
            raise InputsError(
                f"token ids from {self.source} span [{real.min()}, {real.max()}] but the model's "
                f"vocabulary has {vocab_size} entries"
            )

    def __repr__(self) -> str:
        return f"Inputs({self.shape[0]} sequences x {self.shape[1]} tokens, from {self.source})"
