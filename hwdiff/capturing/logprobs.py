"""Token log-probabilities at the head, computed on the device without keeping the logits.

RL frameworks judge the mismatch between the engine that generated a rollout and the one that
trains on it by per-token log-probabilities (docs/rl-impact.md). Full logits of a 150k-word
vocabulary are gigabytes per batch, so a capture keeps, per position, only: the log-prob of the next
input token (teacher forcing on the fixed inputs), the entropy, and the top-k ids and log-probs
(stored in ``/logprobs``, :mod:`hwdiff.store`).

They are computed from the model's own output ``logits`` (after any logit scaling or soft-capping
the model applies past its head module; the head module's output only when the model returns no
``logits``) in float64 on devices that have it (CPU, CUDA) and float32 elsewhere (Ascend NPUs have
no general float64 kernels). Why not float32 everywhere: a log-prob near −12 carries ±0.5 ulp =
±5e-7 in float32, which is 5e-4 of a 1e-3 Δlogp and makes the K3 estimate of a dense pair (1e-5)
visibly noisy; float64 makes the stored numbers exact functions of the logits. Only the normaliser
(log Σ exp, and the entropy beside it) is computed over the whole vocabulary, one block of rows at a
time; the stored log-probs are logits minus it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from ..store.format import LOGPROB_FIELDS
from ..store.writer import LogProbRecord
from .hooks import first_tensor, module_kind, to_host
from .models import dtype_name

DEFAULT_TOPK = 8
DEFINITION = (
    "next_token[s, t] = log_softmax(logits[s, t])[input_ids[s, t+1]] (NaN at the last position); "
    "entropy[s, t] = -sum_v p log p; topk_*: the k largest log_softmax(logits[s, t]), best first"
)


def compute_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device computes it (CPU, CUDA), else float32 (recorded in the file)."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def distribution_stats(logits: torch.Tensor, k: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``entropy`` [..., ] and ``topk_ids`` / ``topk_logprobs`` [..., k] of ``logits`` [..., V], plus
    the full ``logprobs`` [..., V] in ``dtype`` (the caller drops it after use)."""
    logprobs = torch.log_softmax(logits.to(dtype), dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    top = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
    return {
        "logprobs": logprobs,
        "entropy": entropy,
        "topk_ids": top.indices.to(torch.int64),
        "topk_logprobs": top.values,
    }


# Working memory of one block of rows in log_normalizer: on the CPU small enough to stay in the cache
# (1 MiB: 4-5x faster than whole-batch passes at 8k words), elsewhere large enough to keep kernel
# launches few.
_BLOCK_BYTES = {"cpu": 1 << 20}
_DEVICE_BLOCK_BYTES = 256 << 20


def log_normalizer(logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, entropy)`` [rows] of ``logits`` [rows, V]: log Σ_v exp(logits) and −Σ_v p log p, in ``dtype``.

    Blocks of rows, each one pass of exp in ``dtype`` over ``logits − max`` (max-shifted, so no
    overflow). Entropy as ``log S − Σ e·z / S`` with ``z = logits − max``, ``e = exp z``, ``S = Σ e``: the
    same value as −Σ p log p. A word of logit −inf has p = 0 and adds 0 to the entropy (0·log 0 = 0).
    NaN or +inf logits make the row's lse and entropy NaN."""
    with _one_thread(logits.device):
        return _log_normalizer(logits, dtype)


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """torch's CPU ops on one thread for a while (restored after). The blocks of
    :func:`log_normalizer` are too small to share: split over two threads each of their ~8 ops waits
    for the other thread, which on a loaded machine made the whole 10-70x slower (docs/benchmarks.md);
    on one thread it is as fast as on two on an idle machine."""
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _log_normalizer(logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rows, vocab = logits.shape
    itemsize = torch.finfo(dtype).bits // 8
    budget = _BLOCK_BYTES.get(logits.device.type, _DEVICE_BLOCK_BYTES)
    block = max(1, budget // max(1, vocab * itemsize))
    lse = torch.empty(rows, dtype=dtype, device=logits.device)
    entropy = torch.empty(rows, dtype=dtype, device=logits.device)
    for start in range(0, rows, block):
        part = logits[start : start + block]
        top = part.amax(-1, keepdim=True).to(dtype)
        shifted = part.to(dtype, copy=True).sub_(top)
        weights = shifted.exp()
        total = weights.sum(-1)
        log_total = total.log()
        lse[start : start + block] = top[:, 0] + log_total
        weighted = weights.mul_(shifted).sum(-1)
        masked = (
            weighted.isnan() & top[:, 0].isfinite()
        )  # a −inf logit: 0·(−inf) is NaN, its term is 0
        if masked.any():
            weighted[masked] = torch.where(shifted[masked].isneginf(), 0, weights[masked]).sum(-1)
        entropy[start : start + block] = log_total - weighted / total
    return lse, entropy


def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    k: int = DEFAULT_TOPK,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The :data:`~hwdiff.store.LOGPROB_FIELDS` of one batch, on the logits' device.

    ``logits`` [batch, tokens, vocab] (any float dtype), ``input_ids`` [batch, tokens]. Log-probs in
    nats, in ``dtype`` (default :func:`compute_dtype`). Only the normaliser needs the whole vocabulary
    (:func:`log_normalizer`, blocks of rows, a few MiB of working memory); a stored log-prob is the
    logit, widened exactly to ``dtype``, minus it, and the top-k are taken on the logits themselves
    (log_softmax is monotonic). Against log_softmax in float64 the float64 path differs by a few
    ulp of float64 (≤ 1e-13 nats measured at 8k and 152k words): docs/benchmarks.md."""
    dtype = dtype or compute_dtype(logits.device)
    batch, tokens, vocab = logits.shape
    flat = logits.reshape(batch * tokens, vocab)
    lse, entropy = log_normalizer(flat, dtype)
    lse, entropy = lse.view(batch, tokens), entropy.view(batch, tokens)
    ids = input_ids.to(logits.device)
    following = logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].to(dtype) - lse[:, :-1]
    nan = torch.full((batch, 1), float("nan"), dtype=dtype, device=logits.device)
    top = torch.topk(logits, min(k, vocab), dim=-1)
    return {
        "next_token": torch.cat([following, nan], dim=1),
        "entropy": entropy,
        "topk_ids": top.indices.to(torch.int64),
        "topk_logprobs": top.values.to(dtype) - lse[..., None],
    }


def find_head(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The one module of kind ``head`` (:func:`hwdiff.capturing.hooks.module_kind`), or None."""
    heads = [
        (name, module)
        for name, module in model.named_modules()
        if name and module_kind(name, module) == "head"
    ]
    return heads[0] if len(heads) == 1 else None


class _State:
    """What the hooks of one :func:`record_logprobs` scope share: the batch's ids and the next row."""

    def __init__(self) -> None:
        self.row0 = 0
        self.ids: torch.Tensor | None = None
        self.batches = (
            0  # batches recorded: 0 after the run means the model has no head and no logits
        )


def output_logits(output: Any) -> torch.Tensor | None:
    """The ``logits`` of a model's output (a transformers ``ModelOutput`` or a dict), or None."""
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


@contextlib.contextmanager
def record_logprobs(
    model: torch.nn.Module, put: Callable[[LogProbRecord], None], k: int = DEFAULT_TOPK
) -> Iterator[_State]:
    """Hook ``model`` so that every top-level forward (called with ``input_ids=``) sends a
    :class:`~hwdiff.store.LogProbRecord` of its batch to ``put``; rows are numbered in call order
    from 0, as :meth:`hwdiff.capturing.inputs.Inputs.batches` yields them.

    The source is the model's own output ``logits``: what generation samples from and RL frameworks
    score, after any scaling or soft-capping the model applies past its head module (Granite divides
    by ``logits_scaling``, Cohere multiplies by ``logit_scale``, Gemma 2 soft-caps). Only a model whose
    output has no ``logits`` (a tuple output) falls back to its head module's output, and the file's
    ``source`` attribute names it. A model with neither records nothing (``state.batches`` stays 0).
    Hooks removed on exit."""
    if k < 1:
        raise ValueError(f"top-k must be at least 1, got {k}")
    state = _State()
    head = find_head(model)
    head_out: list[torch.Tensor | None] = [None]

    def before(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        state.ids = kwargs.get("input_ids", args[0] if args else None)
        head_out[0] = None

    def emit(logits: torch.Tensor | None, source: str) -> None:
        ids = state.ids
        if logits is None or ids is None or logits.dim() != 3 or logits.shape[:2] != ids.shape:
            return
        arrays = token_logprobs(logits.detach(), ids, k)
        hosts, event = to_host(*(arrays[name] for name in LOGPROB_FIELDS))
        attrs = {
            "topk": k,
            "compute_dtype": dtype_name(arrays["entropy"].dtype),
            "head_dtype": dtype_name(logits.dtype),
            "source": source,
            "definition": DEFINITION,
        }
        put(LogProbRecord(state.row0, dict(zip(LOGPROB_FIELDS, hosts)), attrs, event))
        state.row0 += ids.shape[0]
        state.batches += 1

    def after_model(_: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        logits = output_logits(output)
        if logits is not None:
            emit(logits, "logits")
        elif head is not None:
            emit(head_out[0], head[0])
        head_out[0] = None

    def keep_head(_: torch.nn.Module, __: tuple, output: Any) -> None:
        head_out[0] = first_tensor(output)

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after_model, with_kwargs=True),
    ]
    if head is not None:
        handles.append(head[1].register_forward_hook(keep_head))
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
