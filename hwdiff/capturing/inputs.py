"""Inputs: the shipped prompt set, token-id files and arrays, batched and padded with a mask.

Every capture of one run holds the same ``[sequences, tokens]`` id matrix, right-padded to a common
length, so all batches concatenate along the batch axis and two devices provably ran the same thing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputsError
from ..store.tokens import Inputs  # defined in store, which reads it back

PROMPTS_FILE = "prompts/math_word_problems.jsonl"
DEFAULT_MAX_TOKENS = (
    128  # prompts and files; explicit token ids are used whole unless cut on request
)
_TEXT_KEYS = ("question", "text", "prompt")


class ByteTokenizer:
    """Byte-level ids for the built-in models: UTF-8 bytes 0–255, then BOS 256 and PAD 258."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *text.encode("utf-8")]


def load_inputs(
    source: Any = None,
    *,
    tokenizer: Any = None,
    max_tokens: int | None = 128,
    limit: int | None = None,
) -> Inputs:
    """Build :class:`Inputs` from the shipped prompts (``None``), a file, or token ids.

    ``source``: None → the shipped math word problems; a path to ``.jsonl`` (``{"input_ids": [...]}``
    or ``{"question"|"text"|"prompt": "..."}`` per line), ``.txt`` (one prompt per line) or ``.npy``
    (int array, 1-D or ``[sequences, tokens]``); or a tensor / array / list of token ids. Texts are
    tokenized with ``tokenizer`` (None → :class:`ByteTokenizer`). Sequences are cut to ``max_tokens``
    and right-padded to the longest; ``limit`` keeps the first N sequences. Both must be at least 1
    (None: no cut, all sequences).
    """
    check_counts(max_tokens=max_tokens, limit=limit)
    tokenizer = tokenizer or ByteTokenizer()
    if source is None:
        sequences, name = _read_file(prompts_path(), tokenizer), f"shipped:{PROMPTS_FILE}"
    elif isinstance(source, (str, Path)):
        sequences, name = _read_file(Path(source), tokenizer), str(source)
    else:
        return _from_array(source, max_tokens, limit)
    return _pad(sequences[:limit] if limit else sequences, max_tokens, _pad_id(tokenizer), name)


def check_counts(**counts: int | None) -> None:
    """Refuse a count (``max_tokens``, ``limit``, ...) below 1: 0 and negative numbers have no meaning here."""
    for name, value in counts.items():
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
        ):
            raise InputsError(
                f"{name} must be a whole number of at least 1 (or None for no limit), got {value!r}"
            )


def prompts_path() -> Path:
    """The shipped prompt file: the repository's data/ in a checkout, share/hwdiff/ once installed."""
    candidates = [
        Path(__file__).resolve().parents[2]
        / "data"
        / PROMPTS_FILE,  # hwdiff/capturing/inputs.py -> the checkout
        Path(sys.prefix) / "share" / "hwdiff" / PROMPTS_FILE,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise InputsError(
        f"the shipped prompt set is missing (looked in {', '.join(map(str, candidates))})"
    )


def _read_file(path: Path, tokenizer: Any) -> list[list[int]]:
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if array.dtype.kind not in "iu":
                raise InputsError(
                    f"{path} holds {array.dtype} values; token ids must be integers (save them with "
                    "an integer dtype, e.g. numpy.int64)"
                )
            return [[int(token) for token in row] for row in np.atleast_2d(array)]
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputsError(f"cannot read inputs file {path}: {exc}") from exc
    if path.suffix == ".jsonl":
        return [_jsonl_row(line, path, number, tokenizer) for number, line in _lines(text)]
    if path.suffix == ".txt":
        return [list(tokenizer.encode(line)) for _, line in _lines(text)]
    raise InputsError(f"inputs file {path} has an unknown type: expected .jsonl, .txt or .npy")


def _lines(text: str) -> list[tuple[int, str]]:
    return [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _jsonl_row(line: str, path: Path, number: int, tokenizer: Any) -> list[int]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputsError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    if isinstance(row, dict) and "input_ids" in row:
        return [int(token) for token in row["input_ids"]]
    for key in _TEXT_KEYS:
        if isinstance(row, dict) and isinstance(row.get(key), str):
            return list(tokenizer.encode(row[key]))
    raise InputsError(
        f"{path}:{number}: expected an object with 'input_ids' or one of {', '.join(_TEXT_KEYS)}"
    )


def _from_array(source: Any, max_tokens: int | None, limit: int | None) -> Inputs:
    try:
        array = np.asarray(source.detach().cpu() if hasattr(source, "detach") else source)
    except (TypeError, ValueError) as exc:
        raise InputsError(f"cannot use {type(source).__name__} as token ids: {exc}") from exc
    if array.dtype.kind not in "iu":
        raise InputsError(f"token ids must be integers, got dtype {array.dtype}")
    array = np.atleast_2d(array).astype(np.int64)[:limit, :max_tokens]
    return Inputs(array, np.ones_like(array), source="array")


def _pad(
    sequences: Sequence[list[int]], max_tokens: int | None, pad_id: int, source: str
) -> Inputs:
    sequences = [seq[:max_tokens] for seq in sequences if seq]
    if not sequences:
        raise InputsError(f"inputs from {source} hold no tokens")
    width = max(map(len, sequences))
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return Inputs(ids, mask, source=source)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0
