"""Module kinds by what a module is (class lineage and shape), never by isinstance against a
library's classes."""

from __future__ import annotations

from typing import Any

from .norms import (
    _ACTIVATION_MODULES,
    _VLLM_ACTIVATIONS,
    _VLLM_LINEARS,
    is_decoder_layer_name,
    is_layernorm,
    is_norm,
)


# ------------------------------------------------------------------------------------------------
# Module kinds
# ------------------------------------------------------------------------------------------------
def module_kind(name: str, module: Any) -> str:
    """Classify a module by what it is (never by isinstance against transformers' or vLLM's classes):
    one of :data:`KINDS`. Embeddings by meaning (a 2-D ``weight`` with ``num_embeddings`` /
    ``embedding_dim``: torch's, vLLM's ``VocabParallelEmbedding`` and every subclass such as
    vLLM-Ascend's), vLLM's linears and fused activations by lineage (:data:`_VLLM_LINEARS`,
    :data:`_VLLM_ACTIVATIONS`), RMSNorms with or without a bias by :func:`is_norm`; the rest by type,
    class name and qualified name."""
    import torch

    cls = type(module).__name__.lower()
    leaf = name.rsplit(".", 1)[-1]
    lineage = _lineage(module)
    if leaf == "lm_head":  # vLLM's ParallelLMHead is a VocabParallelEmbedding that is never called
        return "head"
    if _is_embedding(module):
        return "embedding"
    if is_norm(module):
        return "rmsnorm"
    if is_layernorm(module):
        return "layernorm"
    if "router" in cls or (leaf == "gate" and _is_moe_parent(name)):
        return "router"
    if isinstance(module, torch.nn.Linear) or (
        cls == "conv1d" and hasattr(module, "nf")
    ):  # GPT-2's Conv1D
        return "linear"
    if lineage & _VLLM_LINEARS:  # they return (output, bias): the output is recorded
        return "linear"
    if lineage & _VLLM_ACTIVATIONS:
        return "activation"
    if cls.endswith("attention"):
        return "attention"
    if "decoderlayer" in cls or is_decoder_layer_name(name):
        return "decoder_layer"
    if ("moe" in cls and ("block" in cls or "sparse" in cls)) or cls.endswith("experts"):
        return "moe"
    if "mlp" in cls:
        return "mlp"
    if type(module).__module__ in _ACTIVATION_MODULES or cls.endswith("activation"):
        return "activation"
    return "other"


def _lineage(module: Any) -> frozenset[str]:
    """The lowercased names of the module's class and every class it inherits from."""
    return frozenset(klass.__name__.lower() for klass in type(module).__mro__)


def _is_embedding(module: Any) -> bool:
    """A lookup table of token vectors: torch's ``nn.Embedding``, or any module with a 2-D ``weight`` and
    integer ``num_embeddings`` / ``embedding_dim`` (vLLM's ``VocabParallelEmbedding``, vLLM-Ascend's
    ``AscendVocabParallelEmbedding``, whose weight holds this rank's rows)."""
    import torch

    if isinstance(module, torch.nn.Embedding):
        return True
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and isinstance(getattr(module, "num_embeddings", None), int)
        and isinstance(getattr(module, "embedding_dim", None), int)
        and weight.shape[-1] == module.embedding_dim
    )


def _is_moe_parent(name: str) -> bool:
    parent = name.rpartition(".")[0].rsplit(".", 1)[-1]
    return parent in ("block_sparse_moe", "mlp", "moe")
