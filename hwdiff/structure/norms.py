"""Norms, decoder layers and sub-blocks by name: which modules are norms, their effective scale,
layer indices, norm specs and counts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from ..errors import HwdiffError

KINDS = (
    "embedding",
    "rmsnorm",
    "layernorm",
    "linear",
    "attention",
    "mlp",
    "moe",
    "mixer",
    "router",
    "activation",
    "decoder_layer",
    "head",
    "other",
)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?=\.|$)")
_LAYER_ITEM = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.\d+$")
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "moe")
# vLLM's linear layers and fused activations, by lineage: a class counts when any class it inherits from
# has one of these names, so vLLM-Ascend's subclasses (AscendSiluAndMul, AscendSiluAndMul310, Ascend*Linear)
# and platform variants are known without being listed.
_VLLM_LINEARS = frozenset(
    (
        "linearbase",
        "qkvparallellinear",
        "mergedcolumnparallellinear",
        "rowparallellinear",
        "columnparallellinear",
        "replicatedlinear",
    )
)
_VLLM_ACTIVATIONS = frozenset(
    (
        "siluandmul",
        "geluandmul",
        "mulandsilu",
        "siluandmulwithclamp",
        "swigluoaiandmul",
        "fatreluandmul",
        "quickgelu",
        "newgelu",
        "fastgelu",
    )
)

# model_type → norms per decoder layer (plus one final norm): docs/design.md#the-aqn-injector.
NORMS_PER_LAYER = {
    "qwen2": 2,
    "llama": 2,
    "mistral": 2,
    "qwen2_moe": 2,
    "mixtral": 2,
    "gemma": 2,
    "qwen3": 4,
    "qwen3_moe": 4,
    "gemma2": 4,
    "gemma3": 6,
    "gemma3_text": 6,
}


# ------------------------------------------------------------------------------------------------
# Norms
# ------------------------------------------------------------------------------------------------
def is_norm(module: Any) -> bool:
    """The RMSNorm rule: ``'rmsnorm'`` in the lowercased class name and a 1-D ``weight``."""
    import torch

    weight = getattr(module, "weight", None)
    return (
        "rmsnorm" in type(module).__name__.lower()
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
    )


def is_layernorm(module: Any) -> bool:
    """A LayerNorm (``torch.nn.LayerNorm`` or a class named ``*LayerNorm``), not an RMSNorm."""
    import torch

    name = type(module).__name__.lower()
    return isinstance(module, torch.nn.LayerNorm) or (
        name.endswith("layernorm") and "rms" not in name
    )


def find_norms(model: Any) -> list[tuple[str, Any]]:
    """``(qualified name, module)`` of every RMSNorm (:func:`is_norm`), in registration order."""
    return [(name, module) for name, module in model.named_modules() if name and is_norm(module)]


def layernorm_names(model: Any) -> list[str]:
    """Qualified names of the LayerNorm modules of ``model`` (for messages: AQN needs RMSNorm)."""
    return [name for name, module in model.named_modules() if name and is_layernorm(module)]


def aqn_needs_rmsnorm(layernorms: Sequence[str]) -> str:
    """The one wording of "this model normalises with LayerNorm: AQN does not apply (yet)"."""
    shown = ", ".join(layernorms[:3]) + (" …" if len(layernorms) > 3 else "")
    return (
        f"the model normalises with LayerNorm ({len(layernorms)} modules: {shown}). AQN (QeRL) is defined on "
        "RMSNorm weights; noise on LayerNorm weights is a possible later extension that hwdiff does not do"
    )


def offset_from_class(class_name: str) -> float | None:
    """1.0 for the ``(1 + w)`` norm classes known by name (``Gemma*RMSNorm``), None when the name
    alone does not tell (use :func:`norm_offset` on the module)."""
    lower = class_name.lower()
    if "rmsnorm" in lower and lower.startswith("gemma"):
        return 1.0
    return None


_OFFSETS: dict[type, float] = {}


def norm_offset(module: Any) -> float:
    """The constant the norm adds to its stored weight: 1.0 for ``x̂ * (1 + w)``, 0.0 for ``x̂ * w``.
    Known classes by name, any other class by one probe call with its weight zeroed (cached per class)."""
    cls = type(module)
    if cls not in _OFFSETS:
        known = offset_from_class(cls.__name__)
        _OFFSETS[cls] = known if known is not None else _probe_offset(module)
    return _OFFSETS[cls]


def _probe_offset(module: Any) -> float:
    """Call the norm once with its weight — and its bias, if it has one (vLLM-Ascend's ``AscendRMSNorm``
    of a quantised checkpoint adds one) — zeroed: a ``w`` norm then outputs zeros, a ``(1 + w)`` norm
    does not. A gated norm (``norm(x, gate)``) gets a gate whose activation is non-zero."""
    import torch

    weight = module.weight
    zeroed = [t for t in (weight, getattr(module, "bias", None)) if isinstance(t, torch.Tensor)]
    saved = [t.detach().clone() for t in zeroed]
    probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(
        weight.device, weight.dtype
    )
    extra = [torch.full_like(probe, 2.0) for _ in range(_required_tensor_arguments(module) - 1)]
    try:
        with torch.no_grad():
            for tensor in zeroed:
                tensor.zero_()
            output = module.forward(
                probe, *extra
            )  # not __call__: no hooks (the probe may run inside one)
    finally:
        with torch.no_grad():
            for tensor, value in zip(zeroed, saved):
                tensor.copy_(value)
    output = output[0] if isinstance(output, tuple) else output
    return 1.0 if bool(output.detach().float().abs().max() > 0) else 0.0


def _required_tensor_arguments(module: Any) -> int:
    """How many positional arguments without a default the module's forward takes (at least 1)."""
    import inspect

    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return 1
    required = [
        p
        for p in parameters
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return max(1, len(required))


def norm_weight_effective(module: Any) -> Any:
    """The scale the norm actually applies, float32 on the weight's device: ``offset + w``."""
    return module.weight.detach().float() + norm_offset(module)


def effective_scale(weight: Any, offset: float) -> Any:
    """``offset + w`` of a stored weight (numpy or torch), in float64 / float32."""
    return (weight.astype("float64") if hasattr(weight, "astype") else weight.float()) + offset


# ------------------------------------------------------------------------------------------------
# Layers and sub-blocks
# ------------------------------------------------------------------------------------------------
def layer_index(name: str) -> int | None:
    """Decoder-layer index of a qualified module name (``model.layers.3.mlp`` → 3), or None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


FINAL_NORM = "final norm"


def norm_class(name: str) -> str:
    """A norm's role in its decoder layer (its last name component: ``input_layernorm``, ``q_norm`` …),
    or ``final norm`` for a norm outside the decoder layers."""
    return FINAL_NORM if layer_index(name) is None else name.rsplit(".", 1)[-1]


def depth_chains(names: Iterable[str]) -> list[list[str]]:
    """``names`` grouped by their path inside the decoder layer (``input_layernorm``,
    ``self_attn.q_norm``; Zamba2's ``shared_transformer.input_layernorm``, of twice the width, is not
    ``input_layernorm``), each group in layer order; a name outside the decoder layers stands alone."""
    chains: dict[str, list[tuple[int, str]]] = {}
    singles = []
    for name in names:
        match = _LAYER.search(name)
        if match is None:
            singles.append([name])
        else:
            chains.setdefault(name[match.end() :], []).append((int(match.group(1)), name))
    return [[name for _, name in sorted(chain)] for chain in chains.values()] + singles


def is_decoder_layer_name(name: str) -> bool:
    """``model.layers.3`` / ``transformer.h.3``: an item of the decoder-layer list."""
    return bool(_LAYER_ITEM.search(name))


def decoder_layers(model: Any) -> list[tuple[int, str, Any]]:
    """``(index, qualified name, module)`` of every decoder layer, in index order."""
    found = [
        (layer_index(name), name, module)
        for name, module in model.named_modules()
        if is_decoder_layer_name(name)
    ]
    return sorted(((i, n, m) for i, n, m in found if i is not None), key=lambda item: item[0])


@dataclass(frozen=True)
class NormSpec:
    """One RMSNorm and where noise on its weight shows.

    ``role``: ``pre_attention``, ``pre_mlp``, ``post_attention``, ``post_mlp`` (Gemma 2/3's
    post-norms: they normalise a sub-block's *output*), ``q_norm``, ``k_norm`` (the attention core),
    ``final`` (feeds the head) or ``other``. ``subblock``: the module the norm feeds (pre-norms,
    final norm), whose output it normalises (post-norms), or the attention module containing the core
    (q/k norms); None when that module is not among the names. ``observe``: ``(module, slot)`` whose
    value carries the norm's noise first: the sub-block's output for pre-norms and the final norm,
    the norm's own output for post-norms, the input of the attention's output projection (the core's
    output) for q/k norms. ``offset``: 1.0 for ``(1 + w)`` norms, else 0.0."""

    name: str
    layer: int | None
    role: str
    subblock: str | None
    observe: tuple[str, str] | None
    offset: float = 0.0
    class_name: str = ""


def norm_specs(model: Any) -> list[NormSpec]:
    """A :class:`NormSpec` for every RMSNorm of ``model``, in registration order."""
    names = [name for name, _ in model.named_modules() if name]
    norms = find_norms(model)
    return norm_specs_from_names(
        names,
        {n: type(m).__name__ for n, m in norms},
        offsets={n: norm_offset(m) for n, m in norms},
        norms=[n for n, _ in norms],
    )


def norm_specs_from_names(
    names: Sequence[str],
    class_names: Mapping[str, str],
    *,
    offsets: Mapping[str, float] | None = None,
    norms: Iterable[str] | None = None,
) -> list[NormSpec]:
    """The same as :func:`norm_specs`, from qualified module names (a capture's, in forward or
    registration order) and class names, without the model. ``norms``: which names are RMSNorms
    (default: those whose class name contains ``rmsnorm``). ``offsets``: known offsets (a capture's
    ``weight_offset`` attributes); otherwise the class rule :func:`offset_from_class` decides."""
    present = set(names)
    chosen = (
        list(norms)
        if norms is not None
        else [n for n in names if "rmsnorm" in class_names.get(n, "").lower()]
    )
    specs = []
    for name in chosen:
        cls = class_names.get(name, "")
        offset = (offsets or {}).get(name)
        if offset is None:
            offset = offset_from_class(cls) or 0.0
        role, subblock, observe = _role(name, present)
        specs.append(NormSpec(name, layer_index(name), role, subblock, observe, float(offset), cls))
    return specs


def _role(name: str, present: set[str]) -> tuple[str, str | None, tuple[str, str] | None]:
    parent, _, leaf = name.rpartition(".")
    sibling = _sibling(parent, present)
    if leaf in ("q_norm", "k_norm", "query_norm", "key_norm"):
        role = "q_norm" if leaf.startswith("q") else "k_norm"
        core_out = next(
            (
                f"{parent}.{proj}"
                for proj in ("o_proj", "out_proj", "dense", "c_proj")
                if f"{parent}.{proj}" in present
            ),
            None,
        )
        return role, parent or None, (core_out, "input") if core_out else None
    if layer_index(name) is None:
        head = next((n for n in ("lm_head", "model.lm_head") if n in present), None)
        return "final", head, (head, "output") if head else None
    post_norm_layout = f"{parent}.pre_feedforward_layernorm" in present
    if leaf in ("input_layernorm", "ln_1", "attention_norm"):
        block = sibling(_ATTENTION_NAMES)
        return "pre_attention", block, (block, "output") if block else None
    if leaf == "post_attention_layernorm" and post_norm_layout:
        return "post_attention", sibling(_ATTENTION_NAMES), (name, "output")
    if leaf in ("post_attention_layernorm", "pre_feedforward_layernorm", "ln_2", "ffn_norm"):
        block = sibling(_MLP_NAMES)
        return "pre_mlp", block, (block, "output") if block else None
    if leaf == "post_feedforward_layernorm":
        return "post_mlp", sibling(_MLP_NAMES), (name, "output")
    return "other", None, None


def _sibling(parent: str, present: set[str]):
    def find(candidates: Sequence[str]) -> str | None:
        return next((f"{parent}.{c}" for c in candidates if f"{parent}.{c}" in present), None)

    return find


# ------------------------------------------------------------------------------------------------
# Norm counts
# ------------------------------------------------------------------------------------------------
def expected_norm_count(model_or_config: Any) -> int | None:
    """The RMSNorm count a known family must have (Qwen2 / Llama / Mistral / Qwen2-MoE / Mixtral
    2L+1; Qwen3, Qwen3-MoE, Gemma 2 4L+1; Gemma 3 6L+1; Qwen2.5-1.5B: 57), else None."""
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config
    per_layer = NORMS_PER_LAYER.get(getattr(config, "model_type", None) or "")
    layers = getattr(config, "num_hidden_layers", None)
    return per_layer * layers + 1 if per_layer is not None and isinstance(layers, int) else None


def check_norm_layout(
    names: Sequence[str], model_or_config: Any = None, *, what: str = "RMSNorm"
) -> None:
    """Raise :class:`HwdiffError` unless ``names`` (qualified norm names) has the family's expected
    count, or — for a family hwdiff does not know — the same set of norms in every decoder layer."""
    expected = expected_norm_count(model_or_config) if model_or_config is not None else None
    model_type = getattr(getattr(model_or_config, "config", model_or_config), "model_type", None)
    if expected is not None:
        if len(names) != expected:
            raise HwdiffError(
                f"matched {len(names)} {what} layers, expected {expected} for {model_type}: "
                f"{', '.join(list(names)[:4])} …"
            )
        return
    per_layer: dict[int, set[str]] = {}
    for name in names:
        index = layer_index(name)
        if index is not None:
            per_layer.setdefault(index, set()).add(_LAYER.sub(".layers.#", name, count=1))
    kinds = _layer_kinds(model_or_config)  # hybrid models: the same norms within each kind of layer
    layouts = {(kinds.get(index), frozenset(leaves)) for index, leaves in per_layer.items()}
    if len({kind for kind, _ in layouts}) != len(layouts):
        counts = {index: len(leaves) for index, leaves in sorted(per_layer.items())}
        raise HwdiffError(
            f"the decoder layers carry different sets of {what} modules ({counts} per layer): "
            "an unknown layout, refusing to guess which norms AQN should touch"
        )


def _layer_kinds(model: Any) -> dict[int, frozenset]:
    """Each decoder layer's kind, read from the model: the classes of its children that are not norms
    (a mamba layer and an attention layer of Bamba differ; two Llama layers do not). Empty without a
    model (names only: every layer must then carry the same norms)."""
    if not hasattr(model, "named_modules"):
        return {}
    return {
        index: frozenset(type(child).__name__ for child in module.children() if not is_norm(child))
        for index, _, module in decoder_layers(model)
    }
