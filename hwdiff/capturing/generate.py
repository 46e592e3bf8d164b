"""``hwdiff generate``: greedy decoding of fixed prompts, with the log-prob of every generated token.

Two devices (or dtypes, or kernel paths) that agree to rounding still choose different tokens where
the top two candidates are nearly tied, and from there on they write different texts. A generation
file stores, per prompt, the greedy continuation and each generated token's log-probability (with
entropy and top-k, as :mod:`hwdiff.capturing.logprobs` does for captures); ``hwdiff diff`` of two of them
(:func:`hwdiff.compare.generation.diff_generations`) says where each pair of continuations splits.

Decoding is transformers' own ``generate`` (``do_sample=False``, one beam, one prompt at a time so
that no padding enters), and every chosen token is checked to be an argmax of its raw logits: a
model whose generation config adds logits processors (repetition penalty, ...) is refused rather
than stored as greedy.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import HwdiffError
from ..store.format import GENERATE_MODE
from ..store.writer import CaptureWriter
from .logprobs import DEFAULT_TOPK, compute_dtype, distribution_stats
from .models import dtype_name
from .run import CaptureOptions, _resolve_inputs, capture_metadata, model_device_and_dtype

PAD = -1  # ids after a sequence ended (EOS) in /generation/ids


@dataclass(frozen=True)
class GenerateResult:
    """What :func:`generate` wrote."""

    path: Path
    prompts: int
    max_new_tokens: int
    generated: int  # tokens generated over all prompts
    seconds: float

    def __str__(self) -> str:
        return (
            f"wrote {self.path} ({self.prompts} prompts, up to {self.max_new_tokens} new tokens each, "
            f"{self.generated} generated, {self.seconds:.1f} s)"
        )


def generate(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    inputs: Any = None,
    max_new_tokens: int = 16,
    topk: int = DEFAULT_TOPK,
    max_tokens: int | None = 128,
    limit: int | None = None,
    progress: bool = True,
) -> GenerateResult:
    """Greedy-decode up to ``max_new_tokens`` after each prompt of ``inputs`` and write a generation
    file at ``path`` (layout: :mod:`hwdiff.store`, root ``mode = "generate"``).

    ``inputs``: as for :func:`hwdiff.capture` (None: the shipped prompts), cut to ``max_tokens`` and
    the first ``limit`` sequences; each prompt is its real (unmasked) tokens. Log-probs of the
    generated tokens are log_softmax of the raw logits in float64 (float32 on devices without it).
    """
    if max_new_tokens < 1 or topk < 1:
        raise HwdiffError(
            f"max_new_tokens and topk must be at least 1, got {max_new_tokens} and {topk}"
        )
    started = time.perf_counter()
    opts = CaptureOptions(
        max_tokens=max_tokens, limit=limit, batch_size=1, progress=progress, logprob_topk=topk
    )
    device, dtype = model_device_and_dtype(model)
    inputs = _resolve_inputs(model, inputs, opts)
    rows = [
        _decode(model, ids[mask.astype(bool)], max_new_tokens, topk, device)
        for ids, mask in zip(inputs.input_ids, inputs.attention_mask)
    ]
    meta = capture_metadata(model, device, dtype, "full", False, opts)
    meta.update(max_new_tokens=max_new_tokens, generation_topk=topk)
    writer = CaptureWriter(path, meta=meta, inputs=inputs, mode=GENERATE_MODE, synchronous=True)
    try:
        writer.write_generation(
            _stack(rows, max_new_tokens, topk),
            {
                "max_new_tokens": max_new_tokens,
                "strategy": "greedy",
                "topk": topk,
                "pad": PAD,
                "compute_dtype": dtype_name(compute_dtype(device)),
                "head_dtype": dtype_name(dtype),
            },
        )
        final = writer.finish({"capture_seconds": time.perf_counter() - started})
    except BaseException:
        writer.abort()
        raise
    generated = sum(len(row["ids"]) for row in rows)
    return GenerateResult(
        final, len(rows), max_new_tokens, generated, time.perf_counter() - started
    )


def _decode(
    model: torch.nn.Module, prompt: np.ndarray, max_new_tokens: int, topk: int, device: torch.device
) -> dict[str, np.ndarray]:
    """One prompt: generated ids and, per generated token, its log-prob, the entropy and top-k."""
    ids = torch.from_numpy(prompt).to(device)[None]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, ids.shape[1] :]
    logits = torch.stack([step[0] for step in out.logits])[
        : len(new)
    ]  # [new, vocab], raw (before processors)
    stats = distribution_stats(logits, topk, compute_dtype(device))
    logprobs = stats.pop("logprobs")
    chosen = logprobs.gather(-1, new[:, None])[:, 0]
    best = logprobs.max(-1).values
    if not torch.equal(chosen, best):
        step = int(torch.nonzero(chosen != best)[0, 0])
        raise HwdiffError(
            f"generate chose a token that is not the argmax of the raw logits at step {step}: the "
            "model's generation config changes greedy decoding (repetition penalty or another "
            "logits processor); use a model without those settings"
        )
    row = {"ids": new.cpu().numpy(), "logprobs": chosen.cpu().numpy()}
    row.update({name: value.cpu().numpy() for name, value in stats.items()})
    return row


def _stack(rows: list[dict[str, np.ndarray]], n: int, k: int) -> dict[str, np.ndarray]:
    """Per-prompt rows → ``[prompts, n]`` arrays, padded with :data:`PAD` ids and NaN log-probs."""

    def padded(name: str, fill: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        out = np.full((len(rows), n, *shape), fill, dtype=dtype)
        for i, row in enumerate(rows):
            out[i, : len(row[name])] = row[name]
        return out

    float_dtype = rows[0]["logprobs"].dtype
    return {
        "ids": padded("ids", PAD, (), np.int64),
        "lengths": np.array([len(r["ids"]) for r in rows], np.int64),
        "logprobs": padded("logprobs", np.nan, (), float_dtype),
        "entropy": padded("entropy", np.nan, (), float_dtype),
        "topk_ids": padded("topk_ids", PAD, (k,), np.int64),
        "topk_logprobs": padded("topk_logprobs", np.nan, (k,), float_dtype),
    }
