"""Token log-probabilities at the head, computed on the device without keeping the logits.

RL frameworks judge the mismatch between the engine that generated a rollout and the one that
trains on it by per-token log-probabilities (docs/rl-impact.md). Full logits of a 150k-word
vocabulary are gigabytes per batch, so a capture keeps, per position, only: the log-prob of the next
input token (teacher forcing on the fixed inputs), the entropy, and the top-k ids and log-probs
(stored in ``/logprobs``, :mod:`hwdiff.store`).

They are computed from the head's output (the module of kind ``head``, e.g. ``lm_head``; the
model output's ``logits`` when there is none) in float64 on devices that have it (CPU, CUDA) and
float32 elsewhere (Ascend NPUs have no general float64 kernels). Why not float32 everywhere: a
log-prob near −12 carries ±0.5 ulp = ±5e-7 in float32, which is 5e-4 of a 1e-3 Δlogp and makes the
K3 estimate of a dense pair (1e-5) visibly noisy; float64 makes the stored numbers exact functions
of the logits.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from .hooks import first_tensor, module_kind, to_host
from .models import dtype_name
from .store import LOGPROB_FIELDS, LogProbRecord

DEFAULT_TOPK = 8
DEFINITION = ("next_token[s, t] = log_softmax(logits[s, t])[input_ids[s, t+1]] (NaN at the last position); "
              "entropy[s, t] = -sum_v p log p; topk_*: the k largest log_softmax(logits[s, t]), best first")


def compute_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device computes it (CPU, CUDA), else float32 (recorded in the file)."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def distribution_stats(logits: torch.Tensor, k: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``entropy`` [..., ] and ``topk_ids`` / ``topk_logprobs`` [..., k] of ``logits`` [..., V], plus
    the full ``logprobs`` [..., V] in ``dtype`` (the caller drops it after use)."""
    logprobs = torch.log_softmax(logits.to(dtype), dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    top = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
    return {"logprobs": logprobs, "entropy": entropy, "topk_ids": top.indices.to(torch.int64),
            "topk_logprobs": top.values}


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, k: int = DEFAULT_TOPK,
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The :data:`~hwdiff.store.LOGPROB_FIELDS` of one batch, on the logits' device.

    ``logits`` [batch, tokens, vocab] (any float dtype), ``input_ids`` [batch, tokens]. One row at a
    time, so the working memory is two ``[tokens, vocab]`` arrays in ``dtype`` (default
    :func:`compute_dtype`). Log-probs in nats."""
    dtype = dtype or compute_dtype(logits.device)
    ids = input_ids.to(logits.device)
    rows = []
    for row in range(logits.shape[0]):
        stats = distribution_stats(logits[row], k, dtype)
        following = stats.pop("logprobs")[:-1].gather(-1, ids[row, 1:, None])[:, 0]
        nan = torch.full((1,), float("nan"), dtype=dtype, device=logits.device)
        rows.append({"next_token": torch.cat([following, nan]), **stats})
    return {name: torch.stack([row[name] for row in rows]) for name in LOGPROB_FIELDS}


def find_head(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The one module of kind ``head`` (:func:`hwdiff.hooks.module_kind`), or None."""
    heads = [(name, module) for name, module in model.named_modules() if name and module_kind(name, module) == "head"]
    return heads[0] if len(heads) == 1 else None


class _State:
    """What the hooks of one :func:`record_logprobs` scope share: the batch's ids and the next row."""

    def __init__(self) -> None:
        self.row0 = 0
        self.ids: torch.Tensor | None = None
        self.batches = 0  # batches recorded: 0 after the run means the model has no head and no logits


@contextlib.contextmanager
def record_logprobs(model: torch.nn.Module, put: Callable[[LogProbRecord], None], k: int = DEFAULT_TOPK) -> Iterator[_State]:
    """Hook ``model`` so that every top-level forward (called with ``input_ids=``) sends a
    :class:`~hwdiff.store.LogProbRecord` of its batch to ``put``; rows are numbered in call order
    from 0, as :meth:`hwdiff.inputs.Inputs.batches` yields them. A model with neither a head module
    nor ``logits`` in its output records nothing (``state.batches`` stays 0). Hooks removed on exit."""
    if k < 1:
        raise ValueError(f"top-k must be at least 1, got {k}")
    state = _State()
    head = find_head(model)
    source = head[0] if head else "logits"

    def before(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        state.ids = kwargs.get("input_ids", args[0] if args else None)

    def emit(logits: torch.Tensor | None) -> None:
        ids = state.ids
        if logits is None or ids is None or logits.dim() != 3 or logits.shape[:2] != ids.shape:
            return
        arrays = token_logprobs(logits.detach(), ids, k)
        hosts, event = to_host(*(arrays[name] for name in LOGPROB_FIELDS))
        attrs = {"topk": k, "compute_dtype": dtype_name(arrays["entropy"].dtype), "head_dtype": dtype_name(logits.dtype),
                 "source": source, "definition": DEFINITION}
        put(LogProbRecord(state.row0, dict(zip(LOGPROB_FIELDS, hosts)), attrs, event))
        state.row0 += ids.shape[0]
        state.batches += 1

    def after_model(_: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if head is None:
            emit(getattr(output, "logits", None))

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after_model, with_kwargs=True)]
    if head is not None:
        handles.append(head[1].register_forward_hook(lambda _m, _a, output: emit(first_tensor(output))))
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
