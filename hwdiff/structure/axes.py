"""Axes and attention masks: the token axis of a recorded output, MoE row layouts and routing, each
layer's mask type."""

from __future__ import annotations

import re
from typing import Any, Sequence

from ..errors import HwdiffError


# ------------------------------------------------------------------------------------------------
# Axes and attention masks
# ------------------------------------------------------------------------------------------------
def token_axis(shape: Sequence[int], batch: int, tokens: int) -> int | None:
    """The axis of a recorded output (batch rows first) that runs over the sequence's tokens:
    1 for ``[batch, tokens, …]``, 2 for ``[batch, heads, tokens, head_dim]`` (Gemma 3's q/k norms),
    None when the output has no token axis (or its first axis is not the batch). When several axes
    have the sequence length, axis 1 wins."""
    if len(shape) < 2 or shape[0] != batch:
        return None
    axes = [axis for axis in range(1, len(shape)) if shape[axis] == tokens]
    return axes[0] if axes else None


def row_layout(shape: Sequence[int], batch: int, tokens: int, experts: int | None = None) -> str:
    """How a module's output rows relate to the forward's ``batch`` × ``tokens`` inputs, decided by
    the measured counts (never by the first axis alone): ``"experts"`` (``[experts, batch·tokens, …]``:
    every token at every expert, Llama 4's experts and their ``act_fn``) or ``"expert-rows"``
    (``[experts·batch·tokens, …]``) inside an MoE block of ``experts`` experts; ``""`` (batch rows
    first, or no rows at all); ``"tokens"`` (flattened ``[batch·tokens, …]`` rows: shared experts,
    routers, fused experts) or ``"routed"`` (any other number of rows, 0 included: the tokens routed
    to one expert)."""
    if not shape or not batch:
        return ""
    rows = batch * tokens
    if experts and experts > 1 and len(shape) >= 2 and tuple(shape[:2]) == (experts, rows):
        return "experts"  # [experts, batch·tokens] is never [batch, tokens] (that needs batch = experts = 1)
    if experts and experts > 1 and shape[0] == experts * rows:
        return "expert-rows"
    if shape[0] == batch:
        return ""
    return "tokens" if shape[0] == rows else "routed"


def expert_count(output: Any, config: Any = None) -> int | None:
    """How many experts a router chooses from: the width of the float ``[tokens, experts]`` scores or
    logits it returns, else the config's ``num_local_experts`` / ``num_experts``; None when neither tells."""
    import torch

    items = output if isinstance(output, (tuple, list)) else (output,)
    scores = next(
        (
            t
            for t in items
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2
        ),
        None,
    )
    if scores is not None:
        return int(scores.shape[-1])
    config = getattr(config, "text_config", None) or config
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def experts_per_token(config: Any) -> int | None:
    """k of the model's top-k routing (``num_experts_per_tok``, ``moe_topk``, ``top_k``), or None."""
    config = getattr(config, "text_config", None) or config
    for key in ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def routing_indices(output: Any, top_k: int | None) -> Any:
    """The experts a router chose per token (int64 ``[tokens, k]``): the integer tensor it returns
    (transformers' ``*TopKRouter``), else the top-k of the logits it returns (a plain ``gate``
    Linear); None when neither can be told."""
    import torch

    items = output if isinstance(output, (tuple, list)) else (output,)
    chosen = next(
        (
            t
            for t in items
            if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2
        ),
        None,
    )
    if chosen is not None:
        return chosen.long()
    logits = next(
        (
            t
            for t in items
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2
        ),
        None,
    )
    if logits is None or not top_k:
        return None
    return torch.topk(logits.float(), top_k, dim=-1).indices


def expert_from_name(relative_name: str) -> int | None:
    """The expert a per-expert module computes (``experts.<e>…`` inside its MoE block), or None."""
    match = re.search(r"(?:^|\.)experts\.(\d+)(?:\.|$)", relative_name)
    return int(match.group(1)) if match else None


def expert_index(relative_name: str, call: int, indices: Any) -> int | None:
    """Which expert a routed call inside an MoE block computes: ``experts.<e>…`` by name, else (fused
    experts, one call per expert hit, in ascending expert order as transformers' loop runs them) the
    ``call``-th expert the block's routing hit."""
    import torch

    named = expert_from_name(relative_name)
    if named is not None:
        return named
    hit = torch.unique(indices).tolist()
    return int(hit[call]) if call < len(hit) else None


def routed_tokens(indices: Any, expert: int) -> Any:
    """The flattened token indices routed to ``expert``, in the order MoE loops gather them
    (``torch.where`` over [top-k slot, token]: slot first, then token)."""
    import torch

    _, tokens = torch.nonzero((indices == expert).T, as_tuple=True)
    return tokens


_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def padding_only(config: Any, layer: int | None) -> bool:
    """Whether decoder layer ``layer`` is, by ``config.layer_types``, no attention layer (``mamba``,
    ``linear_attention``, …): its mixer takes at most the plain padding mask."""
    layer_types = getattr(config, "layer_types", None)
    if not layer_types or layer is None or layer >= len(layer_types):
        return False
    kind = str(layer_types[layer])
    return kind not in _ATTENTION_LAYER_TYPES and (
        kind == "linear_attention" or "attention" not in kind
    )


def attention_type(config: Any, layer: int | None) -> tuple[str, int | None]:
    """``(kind, size)`` of the mask decoder layer ``layer`` attends with: ``("full", None)``,
    ``("sliding", window)`` or ``("chunked", chunk)``, from ``config.layer_types`` when the config has
    it, else from ``sliding_window`` (Mistral: every layer) / ``attention_chunk_size``."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        if layer is None:
            kinds = set(layer_types)
            if kinds != {"full_attention"}:
                raise HwdiffError(
                    f"a module outside the decoder layers takes an attention mask, and the layers mix "
                    f"{', '.join(sorted(kinds))}: cannot tell which mask it needs"
                )
            return "full", None
        kind = layer_types[layer]
        if kind == "full_attention":
            return "full", None
        if kind == "sliding_attention":
            if window is None:
                raise HwdiffError(
                    f"layer {layer} uses sliding attention, but the config has no sliding_window"
                )
            return "sliding", int(window)
        if kind == "chunked_attention":
            return "chunked", int(getattr(config, "attention_chunk_size"))
        raise HwdiffError(
            f"layer {layer} uses {kind!r} attention, whose mask hwdiff cannot rebuild"
        )
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk:
        return "chunked", int(chunk)
    if window is not None and getattr(config, "use_sliding_window", True) is not False:
        return "sliding", int(window)
    return "full", None
