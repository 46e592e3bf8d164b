"""What a model looks like: the one place that knows norms, decoder layers, sub-blocks and token axes.

Everything that needs the network's shape — capture kinds, the token axis of each output, replay's
attention masks, emulation, the AQN injector, the calibrator's norm → sub-block map — asks this
module instead of keeping its own copy of a rule.

- **Norms** are matched by class name, never by isinstance against transformers' classes:
  ``'rmsnorm' in type(m).__name__.lower()`` with a 1-D ``weight`` (HF's ``Qwen2RMSNorm``, vLLM's
  ``RMSNorm`` and vLLM-Ascend's ``AscendRMSNorm`` all match). Some norms compute ``x̂ * (1 + w)``
  with ``w`` stored near 0 (Gemma, Gemma 2/3): their *effective scale* is ``1 + w``. They are
  recognised by class (``Gemma*RMSNorm``) or, for any other class, by calling the module once with
  its weight zeroed (a ``w`` norm then outputs zeros, a ``(1 + w)`` norm does not).
- **LayerNorm** modules (GPT-2's ``ln_1``/``ln_2``/``ln_f``) are a kind of their own; AQN does not
  apply to them (yet): :func:`layernorm_names` lets the injector and calibrator name them.
- **Decoder layers** are the items of a ``layers`` / ``h`` / ``blocks`` list; a module's layer index
  is read from its qualified name (:func:`layer_index`), so it works on a capture's module names
  without the model.
- **Sub-blocks**: each norm's :class:`NormSpec` says where the noise on its weight shows
  (:func:`norm_specs` from a model, :func:`norm_specs_from_names` from a capture's names).
- **Expected norm counts** per family (:func:`expected_norm_count`) and a generic check that every
  decoder layer carries the same set of norms (:func:`check_norm_layout`).
- **Token axis** of a recorded output (:func:`token_axis`) and each layer's **attention mask type**
  (:func:`attention_type`).
- **Call semantics** of modules whose tuple outputs or in-place updates are not "the first tensor":
  fused add+norms called ``norm(x, residual)`` (vLLM's ``RMSNorm`` / ``GemmaRMSNorm``, vLLM-Ascend's
  ``AscendRMSNorm``: :data:`FUSED_NORMS`, :func:`register_fused_norm`) and decoder layers that return
  ``(sub-block output, residual)`` (vLLM's): :func:`output_by_meaning`, :func:`input_by_meaning`; and
  whether a call overwrote its arguments, measured per call (:func:`writes_into_arguments`).

Importing this module does not import torch (calibration reads diff files without it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .errors import HwdiffError, SemanticsError

KINDS = ("embedding", "rmsnorm", "layernorm", "linear", "attention", "mlp", "moe", "mixer", "router", "activation",
         "decoder_layer", "head", "other")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?=\.|$)")
_LAYER_ITEM = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.\d+$")
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "moe")
# vLLM's linear layers and fused activations, by lineage: a class counts when any class it inherits from
# has one of these names, so vLLM-Ascend's subclasses (AscendSiluAndMul, AscendSiluAndMul310, Ascend*Linear)
# and platform variants are known without being listed.
_VLLM_LINEARS = frozenset(("linearbase", "qkvparallellinear", "mergedcolumnparallellinear", "rowparallellinear",
                           "columnparallellinear", "replicatedlinear"))
_VLLM_ACTIVATIONS = frozenset(("siluandmul", "geluandmul", "mulandsilu", "siluandmulwithclamp", "swigluoaiandmul",
                               "fatreluandmul", "quickgelu", "newgelu", "fastgelu"))

# model_type → norms per decoder layer (plus one final norm): docs/design.md#the-aqn-injector.
NORMS_PER_LAYER = {
    "qwen2": 2, "llama": 2, "mistral": 2, "qwen2_moe": 2, "mixtral": 2, "gemma": 2,
    "qwen3": 4, "qwen3_moe": 4, "gemma2": 4,
    "gemma3": 6, "gemma3_text": 6,
}


# ------------------------------------------------------------------------------------------------
# Norms
# ------------------------------------------------------------------------------------------------
def is_norm(module: Any) -> bool:
    """The RMSNorm rule: ``'rmsnorm'`` in the lowercased class name and a 1-D ``weight``."""
    import torch

    weight = getattr(module, "weight", None)
    return "rmsnorm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1


def is_layernorm(module: Any) -> bool:
    """A LayerNorm (``torch.nn.LayerNorm`` or a class named ``*LayerNorm``), not an RMSNorm."""
    import torch

    name = type(module).__name__.lower()
    return isinstance(module, torch.nn.LayerNorm) or (name.endswith("layernorm") and "rms" not in name)


def find_norms(model: Any) -> list[tuple[str, Any]]:
    """``(qualified name, module)`` of every RMSNorm (:func:`is_norm`), in registration order."""
    return [(name, module) for name, module in model.named_modules() if name and is_norm(module)]


def layernorm_names(model: Any) -> list[str]:
    """Qualified names of the LayerNorm modules of ``model`` (for messages: AQN needs RMSNorm)."""
    return [name for name, module in model.named_modules() if name and is_layernorm(module)]


def aqn_needs_rmsnorm(layernorms: Sequence[str]) -> str:
    """The one wording of "this model normalises with LayerNorm: AQN does not apply (yet)"."""
    shown = ", ".join(layernorms[:3]) + (" …" if len(layernorms) > 3 else "")
    return (f"the model normalises with LayerNorm ({len(layernorms)} modules: {shown}). AQN (QeRL) is defined on "
            "RMSNorm weights; noise on LayerNorm weights is a possible later extension that hwdiff does not do")


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
    probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    extra = [torch.full_like(probe, 2.0) for _ in range(_required_tensor_arguments(module) - 1)]
    try:
        with torch.no_grad():
            for tensor in zeroed:
                tensor.zero_()
            output = module.forward(probe, *extra)  # not __call__: no hooks (the probe may run inside one)
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
    required = [p for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
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
            chains.setdefault(name[match.end():], []).append((int(match.group(1)), name))
    return [[name for _, name in sorted(chain)] for chain in chains.values()] + singles


def is_decoder_layer_name(name: str) -> bool:
    """``model.layers.3`` / ``transformer.h.3``: an item of the decoder-layer list."""
    return bool(_LAYER_ITEM.search(name))


def decoder_layers(model: Any) -> list[tuple[int, str, Any]]:
    """``(index, qualified name, module)`` of every decoder layer, in index order."""
    found = [(layer_index(name), name, module) for name, module in model.named_modules() if is_decoder_layer_name(name)]
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
    return norm_specs_from_names(names, {n: type(m).__name__ for n, m in norms},
                                 offsets={n: norm_offset(m) for n, m in norms}, norms=[n for n, _ in norms])


def norm_specs_from_names(names: Sequence[str], class_names: Mapping[str, str], *,
                          offsets: Mapping[str, float] | None = None,
                          norms: Iterable[str] | None = None) -> list[NormSpec]:
    """The same as :func:`norm_specs`, from qualified module names (a capture's, in forward or
    registration order) and class names, without the model. ``norms``: which names are RMSNorms
    (default: those whose class name contains ``rmsnorm``). ``offsets``: known offsets (a capture's
    ``weight_offset`` attributes); otherwise the class rule :func:`offset_from_class` decides."""
    present = set(names)
    chosen = list(norms) if norms is not None else [n for n in names if "rmsnorm" in class_names.get(n, "").lower()]
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
        core_out = next((f"{parent}.{proj}" for proj in ("o_proj", "out_proj", "dense", "c_proj")
                         if f"{parent}.{proj}" in present), None)
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
    per_layer = NORMS_PER_LAYER.get(getattr(config, "model_type", None))
    layers = getattr(config, "num_hidden_layers", None)
    return per_layer * layers + 1 if per_layer is not None and isinstance(layers, int) else None


def check_norm_layout(names: Sequence[str], model_or_config: Any = None, *, what: str = "RMSNorm") -> None:
    """Raise :class:`HwdiffError` unless ``names`` (qualified norm names) has the family's expected
    count, or — for a family hwdiff does not know — the same set of norms in every decoder layer."""
    expected = expected_norm_count(model_or_config) if model_or_config is not None else None
    model_type = getattr(getattr(model_or_config, "config", model_or_config), "model_type", None)
    if expected is not None:
        if len(names) != expected:
            raise HwdiffError(f"matched {len(names)} {what} layers, expected {expected} for {model_type}: "
                              f"{', '.join(list(names)[:4])} …")
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
        raise HwdiffError(f"the decoder layers carry different sets of {what} modules ({counts} per layer): "
                          "an unknown layout, refusing to guess which norms AQN should touch")


def _layer_kinds(model: Any) -> dict[int, frozenset]:
    """Each decoder layer's kind, read from the model: the classes of its children that are not norms
    (a mamba layer and an attention layer of Bamba differ; two Llama layers do not). Empty without a
    model (names only: every layer must then carry the same norms)."""
    if not hasattr(model, "named_modules"):
        return {}
    return {index: frozenset(type(child).__name__ for child in module.children() if not is_norm(child))
            for index, _, module in decoder_layers(model)}


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
    if isinstance(module, torch.nn.Linear) or (cls == "conv1d" and hasattr(module, "nf")):  # GPT-2's Conv1D
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
    return (isinstance(weight, torch.Tensor) and weight.dim() == 2
            and isinstance(getattr(module, "num_embeddings", None), int)
            and isinstance(getattr(module, "embedding_dim", None), int) and weight.shape[-1] == module.embedding_dim)


def _is_moe_parent(name: str) -> bool:
    parent = name.rpartition(".")[0].rsplit(".", 1)[-1]
    return parent in ("block_sparse_moe", "mlp", "moe")


# ------------------------------------------------------------------------------------------------
# Data flow: every norm's role, measured on one traced forward
# ------------------------------------------------------------------------------------------------
ROLES = ("pre", "post", "nested", "final", "parallel", "unresolved")
DATAFLOW_SCHEMA = "hwdiff/dataflow/1"
TRACE_TOKENS = 16


@dataclass(frozen=True)
class NormRole:
    """What one RMSNorm does in the traced forward.

    ``role``: ``pre`` (its output feeds ``sub_block``, a sibling module of its layer), ``post`` (its
    input is ``sub_block``'s output: it normalises that sub-block's output, OLMo2 / Gemma 2), ``nested``
    (it sits inside ``sub_block``: q/k norms, DeepSeek's q_a/kv_a layernorms, a mamba mixer's gated
    norm), ``final`` (outside the layers, feeds the head ``sub_block``), ``parallel`` (its output feeds
    several sub-blocks at once: refused) or ``unresolved`` (none of these: refused). ``gated``: the norm
    is called with more than one tensor (``norm(x, gate)``). ``reason``: why a refused norm has no role."""

    name: str
    role: str
    sub_block: str | None
    producer: str | None = None
    consumers: tuple[str, ...] = ()
    gated: bool = False
    reason: str = ""

    @property
    def resolved(self) -> bool:
        return self.role in ("pre", "post", "nested", "final")


@dataclass(frozen=True)
class DataFlow:
    """The measured structure of a model: each norm's :class:`NormRole` and each sub-block's kind
    (``attention``, ``mlp``, ``moe``, ``mixer``, ``head``). Stored in a capture as JSON (root
    attribute ``dataflow``, schema ``hwdiff/dataflow/1``)."""

    norms: tuple[NormRole, ...]
    sub_blocks: dict[str, str]
    token_major: dict[str, int] = field(default_factory=dict)  # module → k of its [tokens·k, …] rows

    def role(self, name: str) -> NormRole | None:
        return next((n for n in self.norms if n.name == name), None)

    def to_json(self) -> str:
        import json

        return json.dumps({"schema": DATAFLOW_SCHEMA, "sub_blocks": self.sub_blocks, "token_major": self.token_major,
                           "norms": [{"name": n.name, "role": n.role, "sub_block": n.sub_block, "producer": n.producer,
                                      "consumers": list(n.consumers), "gated": n.gated, "reason": n.reason}
                                     for n in self.norms]})

    @classmethod
    def from_json(cls, text: str | None) -> "DataFlow | None":
        """The record of a capture, or None when it has none (captures before this record: the name rule)."""
        import json

        if not text:
            return None
        data = json.loads(text)
        if data.get("schema") != DATAFLOW_SCHEMA:
            raise HwdiffError(f"unknown data-flow record schema {data.get('schema')!r} (expected {DATAFLOW_SCHEMA})")
        norms = tuple(NormRole(n["name"], n["role"], n["sub_block"], n.get("producer"), tuple(n.get("consumers", ())),
                               bool(n.get("gated")), n.get("reason", "")) for n in data["norms"])
        return cls(norms, dict(data["sub_blocks"]), {k: int(v) for k, v in (data.get("token_major") or {}).items()})


class _Tracer:
    """Forward pre/post hooks on every module, keeping every tensor they see alive (so that no storage
    is reused during the trace): which module produced, and which consumed, each storage."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.keep: list[Any] = []
        self.produced: dict[tuple[int, int], list[str]] = {}  # value → modules that returned it (in call order)
        self.consumed: dict[tuple[int, int], list[str]] = {}  # value → modules called with it
        self.inputs: dict[str, list[tuple[int, int]]] = {}  # module → values of its first call's tensor arguments
        self.tensor_args: dict[str, int] = {}  # module → tensor arguments of its first call
        self.row_tensors: dict[str, list] = {}  # module → its first call's [tokens·k, …] tensors (k ≥ 2)
        self.origin: dict[tuple[int, int], tuple[int, int]] = {}  # value → the value it is a same-size copy of

    def resolve(self, key: tuple[int, int]) -> tuple[int, int]:
        while key in self.origin:
            key = self.origin[key]
        return key

    def link(self, derived: Any, source: Any) -> None:
        """``derived`` is ``source`` passed through an operation of one tensor that keeps its size (a
        scalar multiplier, a cast, a view): the same value for the data flow (Falcon-H1 feeds its
        attention ``normed * attention_in_multiplier``). An operation of two tensors (a residual add)
        makes a new value."""
        self.keep += [derived, source]
        key, origin = _value_key(derived), self.resolve(_value_key(source))
        if key != origin:
            self.origin[key] = origin

    def _storages(self, value: Any) -> list[tuple[int, int]]:
        """``(storage address, version)`` of every tensor in ``value`` (views share both with their
        base; an in-place update moves the version, so an updated tensor is a new value)."""
        import torch

        found = []
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor) and item.numel():
                self.keep.append(item)
                found.append(self.resolve(_value_key(item)))
            elif isinstance(item, (tuple, list, dict)) and item is not value:
                found += self._storages(item)
        return found

    def pre(self, name: str):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            storages = self._storages(args) + self._storages(kwargs)
            self.inputs.setdefault(name, storages)
            self.tensor_args.setdefault(name, len(storages))
            for storage in storages:
                self.consumed.setdefault(storage, []).append(name)
        return hook

    def post(self, name: str):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            for storage in self._storages(output):
                self.produced.setdefault(storage, []).append(name)
        return hook


def _same_value_mode() -> type:
    from torch.overrides import TorchFunctionMode

    class SameValue(TorchFunctionMode):
        """Links every torch operation's output to its one tensor input when the sizes match
        (:meth:`_Tracer.link`); tensors of one element count as scalars."""

        def __init__(self, tracer: "_Tracer") -> None:
            super().__init__()
            self.tracer = tracer

        def __torch_function__(self, func, types, args=(), kwargs=None):
            import torch

            out = func(*args, **(kwargs or {}))
            flat = [a for arg in (*args, *(kwargs or {}).values())
                    for a in (arg if isinstance(arg, (tuple, list)) else (arg,))]
            tensors = [t for t in flat if isinstance(t, torch.Tensor) and t.numel() > 1]
            if (len(tensors) == 1 and isinstance(out, torch.Tensor) and out is not tensors[0]
                    and out.numel() == tensors[0].numel()):
                self.tracer.link(out, tensors[0])
            return out

    return SameValue


def _SameValue(tracer: "_Tracer") -> Any:
    return _same_value_mode()(tracer)


def _value_key(tensor: Any) -> tuple[int, int]:
    """``(storage address, version)``; a tensor without a readable storage (a tensor subclass, an
    inference tensor made outside) is keyed by its identity, which no view or other tensor shares."""
    try:
        return tensor.untyped_storage().data_ptr(), tensor._version
    except (RuntimeError, NotImplementedError, TypeError):
        return -id(tensor), 0


def trace_dataflow(model: Any, input_ids: Any) -> DataFlow:
    """Run ``model`` once on ``input_ids`` (a few tokens are enough: every module is called) with hooks
    on every module and read each RMSNorm's role from who produced its input and who consumed its
    output (:class:`NormRole`). Hooks are removed before returning; the model is not changed."""
    import torch

    tracer = _Tracer(model)
    modules = [(name, module) for name, module in model.named_modules() if name]
    handles = []
    try:
        rows = int(input_ids.shape[0] * input_ids.shape[1])
        for name, module in modules:
            handles.append(module.register_forward_pre_hook(tracer.pre(name), with_kwargs=True))
            handles.append(module.register_forward_hook(tracer.post(name), with_kwargs=True))
            handles.append(module.register_forward_hook(_row_hook(tracer.row_tensors, name, rows), with_kwargs=True))
        # not inference mode: it keeps no version counters
        with torch.no_grad(), _SameValue(tracer):
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    flow = dataflow_from_trace(tracer, modules)
    return DataFlow(flow.norms, flow.sub_blocks, _token_major_rows(model, modules, input_ids, tracer.row_tensors))


def _token_major_rows(model: Any, modules: Sequence[tuple[str, Any]], input_ids: Any,
                      first: dict[str, list]) -> dict[str, int]:
    """Modules called with ``[sequences·tokens·k, …]`` rows (k ≥ 2: Qwen3-Next's gated norm sees
    ``[b·t·heads, d]``) whose rows provably run token-major: changing the last token of every sequence
    changes exactly rows ``t = T-1`` of ``[b, t, k]`` in every such tensor of the call (the model is
    causal: a token changes no earlier row). Those can be stored per token as ``[b, t, k, …]``."""
    import torch

    batch, tokens = int(input_ids.shape[0]), int(input_ids.shape[1])
    other = input_ids.clone()
    other[:, -1] = torch.where(input_ids[:, 0] != input_ids[:, -1], input_ids[:, 0], input_ids[:, -1] ^ 1)
    if not first:  # no module saw such rows: no second forward
        return {}
    runs = [first, _row_tensors(model, [(n, m) for n, m in modules if n in first], other, batch * tokens)]
    found = {}
    for name, first in runs[0].items():
        second = runs[1].get(name)
        if second is None or len(second) != len(first):
            continue
        ks = {t.shape[0] // (batch * tokens) for t in first}
        if len(ks) == 1 and all(_changed_last_token(a, b, batch, tokens) for a, b in zip(first, second)):
            found[name] = ks.pop()
    return found


def _row_tensors(model: Any, modules: Sequence[tuple[str, Any]], ids: Any, rows: int) -> dict[str, list]:
    """Per module, the tensors of its first call (arguments and output) with ``rows·k`` rows, k ≥ 2."""
    import torch

    seen: dict[str, list] = {}
    handles = [module.register_forward_hook(_row_hook(seen, name, rows), with_kwargs=True) for name, module in modules]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _row_hook(seen: dict[str, list], name: str, rows: int):
    """A forward hook keeping, for ``name``'s first call, copies of the tensors (arguments and output)
    with ``rows·k`` rows, k ≥ 2."""
    import torch

    def pick(value: Any) -> list:
        items = value if isinstance(value, (tuple, list)) else tuple(value.values()) if isinstance(value, dict) else (value,)
        return [t.detach().float().clone() for t in items if isinstance(t, torch.Tensor) and t.dim() >= 2
                and t.is_floating_point() and t.shape[0] > rows and t.shape[0] % rows == 0]

    def run(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if name not in seen:
            tensors = pick(args) + pick(kwargs) + pick(output)
            if tensors:
                seen[name] = tensors
    return run


def _changed_last_token(a: Any, b: Any, batch: int, tokens: int) -> bool:
    import torch

    changed = (a != b).reshape(a.shape[0], -1).any(dim=1).reshape(batch, tokens, -1)
    expected = torch.zeros_like(changed)
    expected[:, -1] = True
    return bool(changed[:, -1].any()) and bool(torch.equal(changed, expected))


def _layers(modules: Sequence[tuple[str, Any]]) -> set[str]:
    """The "layer" containers: items of a ``ModuleList`` (decoder layers; a norm's layer is the
    outermost such item above it), and, as a cross-check by name, :func:`is_decoder_layer_name`."""
    import torch

    found = {name for name, _ in modules if is_decoder_layer_name(name)}
    for name, module in modules:
        if isinstance(module, torch.nn.ModuleList):
            found.update(f"{name}.{index}" for index in range(len(module)))
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _outermost(names: Iterable[str], exclude: set[str]) -> list[str]:
    chosen = [n for n in dict.fromkeys(names) if n not in exclude]
    return [n for n in chosen if not any(a in chosen for a in _ancestors(n))]


def dataflow_from_trace(tracer: _Tracer, modules: Sequence[tuple[str, Any]]) -> DataFlow:
    """Each norm's role from a finished trace (see :func:`trace_dataflow`)."""
    by_name = dict(modules)
    layers = _layers(modules)
    norms = [(name, module) for name, module in modules if is_norm(module)]
    roles, sub_blocks = [], {}
    for name, module in norms:
        role = _norm_role(name, module, tracer, layers, by_name)
        roles.append(role)
        if role.sub_block and role.role != "nested":
            sub_blocks[role.sub_block] = _block_kind(role.sub_block, by_name, role.role == "final")
        elif role.sub_block:
            sub_blocks.setdefault(role.sub_block, _block_kind(role.sub_block, by_name, False))
    outermost = {l for l in layers if not any(a in layers for a in _ancestors(l))}  # decoder layers, not experts
    for name, module in modules:  # sub-blocks no norm touches: their local error must still be shown
        parent = name.rpartition(".")[0]
        if (parent in outermost and name in tracer.inputs and not is_norm(module) and not is_layernorm(module)
                and any(True for _ in module.parameters())):
            sub_blocks.setdefault(name, _block_kind(name, by_name, False))
    return DataFlow(tuple(roles), sub_blocks)


def _norm_role(name: str, module: Any, tracer: _Tracer, layers: set[str], by_name: Mapping[str, Any]) -> NormRole:
    ancestors = _ancestors(name)
    gated = tracer.tensor_args.get(name, 0) > 1 and not _takes_residual(module)
    if name not in tracer.inputs:
        return NormRole(name, "unresolved", None, gated=gated, reason="never called in the traced forward")
    container = next((a for a in ancestors if a in layers), None)  # its decoder layer
    inside = [a for a in ancestors if container is not None and a.startswith(container + ".")]
    if inside:  # inside a child of its layer: a nested norm
        return NormRole(name, "nested", inside[0], gated=gated)
    exclude = set(ancestors) | {name} | {n for n in by_name if n.startswith(name + ".")}
    own_input = tracer.inputs[name][0]
    producers = _outermost(tracer.produced.get(own_input, []), exclude)
    siblings = [p for p in producers if _same_level(p, container) and not is_norm(by_name[p])
                and not any(l == p or l.startswith(p + ".") for l in layers)]  # a decoder layer is no sub-block
    consumers = tuple(_outermost(_consumers_of(name, tracer), exclude))
    producer = siblings[-1] if siblings else None
    if producer is not None:
        return NormRole(name, "post", producer, producer, consumers, gated)
    if container is None:  # outside the layers: the final norm feeds the head
        heads = [c for c in consumers if not any(c.startswith(l + ".") for l in layers)]
        if len(heads) == 1:
            return NormRole(name, "final", heads[0], None, consumers, gated)
        return NormRole(name, "unresolved", None, None, consumers, gated,
                        f"outside the decoder layers and feeding {', '.join(consumers) or 'no module'}, not one head")
    blocks = [c for c in consumers if _same_level(c, container)]
    if len(blocks) == 1:
        return NormRole(name, "pre", blocks[0], None, consumers, gated)
    if len(blocks) > 1:
        return NormRole(name, "parallel", None, None, consumers, gated,
                        f"feeds {len(blocks)} sub-blocks in parallel ({', '.join(blocks)}): hwdiff does not split one "
                        "norm's σ between sub-blocks")
    return NormRole(name, "unresolved", None, None, consumers, gated,
                    "neither fed by a sub-block's output nor feeding one (a norm between plain tensor operations)")


def _consumers_of(name: str, tracer: _Tracer) -> list[str]:
    outputs = [s for s, producers in tracer.produced.items() if name in producers]
    return [c for s in outputs for c in tracer.consumed.get(s, [])]


def _same_level(module: str, container: str | None) -> bool:
    """A direct child of the layer ``container`` (a sibling of the norm), or any module outside the layers."""
    if container is None:
        return True
    return module.rpartition(".")[0] == container


def _block_kind(name: str, by_name: Mapping[str, Any], head: bool) -> str:
    """A sub-block's kind by what it holds: ``head`` (fed by the final norm), ``attention`` (the
    class says so), ``moe`` (it holds a router or experts), ``mlp`` (only linears and an activation),
    else ``mixer`` (mamba, linear attention, convolution)."""
    if head:
        return "head"
    module = by_name[name]
    kind = module_kind(name, module)
    if kind in ("attention", "moe", "mlp"):
        return kind
    children = [(f"{name}.{n}", m) for n, m in module.named_modules() if n]
    child_kinds = {module_kind(n, m) for n, m in children}
    if "router" in child_kinds or any(n.rsplit(".", 1)[-1] == "experts" for n, _ in children):
        return "moe"
    if child_kinds and child_kinds <= {"linear", "activation"}:
        return "mlp"
    return "mixer"


_NAME_RULE_ROLES = {"pre_attention": "pre", "pre_mlp": "pre", "post_attention": "post", "post_mlp": "post",
                    "q_norm": "nested", "k_norm": "nested", "final": "final"}


def name_rule_disagreements(flow: DataFlow, module_names: Sequence[str]) -> list[str]:
    """The cross-check: norms whose measured ``(role, sub-block)`` differs from what the name rule
    (:func:`norm_specs_from_names`) says, one line each (the measurement is what hwdiff uses)."""
    specs = {spec.name: spec for spec in norm_specs_from_names(module_names, {}, norms=[n.name for n in flow.norms])}
    lines = []
    for role in flow.norms:
        spec = specs[role.name]
        named = (_NAME_RULE_ROLES.get(spec.role, "unknown"), spec.subblock)
        if named != (role.role, role.sub_block):
            lines.append(f"{role.name}: measured {role.role} of {role.sub_block}, the name rule says {named[0]} of "
                         f"{named[1]}")
    return lines


def dataflow_of_capture(model: Any, input_ids: Any) -> DataFlow | None:
    """The data-flow record for a capture: traced on the first sequence's first :data:`TRACE_TOKENS`
    tokens (on the model's device); None for a model that is not an ``nn.Module`` taking
    ``input_ids``."""
    import torch

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.as_tensor(input_ids[:1, :TRACE_TOKENS], dtype=torch.int64, device=device)
    return trace_dataflow(model, ids)


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
    scores = next((t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2), None)
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
    chosen = next((t for t in items if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2), None)
    if chosen is not None:
        return chosen.long()
    logits = next((t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2), None)
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
    return kind not in _ATTENTION_LAYER_TYPES and (kind == "linear_attention" or "attention" not in kind)


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
                raise HwdiffError(f"a module outside the decoder layers takes an attention mask, and the layers mix "
                                  f"{', '.join(sorted(kinds))}: cannot tell which mask it needs")
            return "full", None
        kind = layer_types[layer]
        if kind == "full_attention":
            return "full", None
        if kind == "sliding_attention":
            return "sliding", int(window)
        if kind == "chunked_attention":
            return "chunked", int(getattr(config, "attention_chunk_size"))
        raise HwdiffError(f"layer {layer} uses {kind!r} attention, whose mask hwdiff cannot rebuild")
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk:
        return "chunked", int(chunk)
    if window is not None and getattr(config, "use_sliding_window", True) is not False:
        return "sliding", int(window)
    return "full", None


# ------------------------------------------------------------------------------------------------
# Call semantics: tuple outputs and in-place updates, by meaning
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedNorm:
    """How a fused add+norm class answers ``norm(x, residual)``: the tuple element holding the normed
    output (``normed``) and the one holding the new residual stream ``x + residual`` (``residual``).
    Whether a call overwrites its arguments is not a property of the class (vLLM picks the kernel per
    platform at run time): it is measured on every call (:func:`writes_into_arguments`)."""

    normed: int = 0
    residual: int = 1


# The tuple order, read from the sources (docs/vllm.md): vLLM's RMSNorm / GemmaRMSNorm and vLLM-Ascend's
# AscendRMSNorm / AscendGemmaRMSNorm return (normed, x + residual) — new tensors or, on some platforms
# (vLLM's fused_add_rms_norm on CUDA, Intel XPU), x and residual overwritten in place. A class not listed
# here is resolved by meaning (:func:`_normed_element`).
FUSED_NORMS: dict[str, FusedNorm] = {
    "RMSNorm": FusedNorm(0, 1),
    "GemmaRMSNorm": FusedNorm(0, 1),
    "AscendRMSNorm": FusedNorm(0, 1),
    "AscendGemmaRMSNorm": FusedNorm(0, 1),
}


def register_fused_norm(class_name: str, *, normed: int = 0, residual: int = 1) -> None:
    """Declare the tuple order of another fused add+norm class, by class name."""
    if {normed, residual} != {0, 1}:
        raise HwdiffError(f"a fused norm returns (normed, residual) in some order: got elements {normed}, {residual}")
    FUSED_NORMS[class_name] = FusedNorm(normed, residual)
    _DETECTED.pop(class_name, None)


_PARAMS: dict[type, Any] = {}
_DETECTED: dict[str, FusedNorm] = {}  # order found by meaning for an unregistered class


def _signature(module: Any) -> Any:
    """The signature of the module's real forward: vLLM's CustomOp classes dispatch ``forward(*args,
    **kwargs)`` to ``forward_native`` / ``forward_cuda`` / ``forward_oot``, which name the arguments."""
    import inspect

    cls = type(module)
    if cls not in _PARAMS:
        found = None
        for method in ("forward_native", "forward"):
            function = getattr(cls, method, None)
            if function is None:
                continue
            try:
                signature = inspect.signature(function)
            except (TypeError, ValueError):  # a forward without a Python signature
                continue
            if any(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in list(signature.parameters.values())[1:]):
                found = signature
                break
        _PARAMS[cls] = found
    return _PARAMS[cls]


def _takes_residual(module: Any) -> bool:
    signature = _signature(module)
    return signature is not None and "residual" in signature.parameters


def is_fused_norm(module: Any) -> bool:
    """An RMSNorm that takes a ``residual`` argument (a fused add+norm: vLLM / vLLM-Ascend)."""
    return is_norm(module) and _takes_residual(module)


def is_residual_layer(module: Any) -> bool:
    """A decoder layer called ``layer(positions, hidden_states, residual)`` that returns
    ``(sub-block output, residual)`` (vLLM): its residual stream is the sum of the two."""
    return not is_norm(module) and "decoderlayer" in type(module).__name__.lower() and _takes_residual(module)


def _arguments(module: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    try:
        return dict(_signature(module).bind(module, *args, **kwargs).arguments)
    except TypeError:
        return {}


def input_by_meaning(module: Any, args: tuple, kwargs: dict) -> Any:
    """The module's input as the residual stream it reads, when that is not its first argument: a
    fused norm called with a residual normalises ``x + residual``; a vLLM decoder layer reads
    ``hidden_states + residual``. None: the first tensor argument is the input."""
    if is_fused_norm(module):
        bound = _arguments(module, args, kwargs)
        x, residual = bound.get("x", args[0] if args else None), bound.get("residual")
    elif is_residual_layer(module):
        bound = _arguments(module, args, kwargs)
        x, residual = bound.get("hidden_states"), bound.get("residual")
    else:
        return None
    if residual is None or x is None:
        return x
    return residual + x  # as HF adds the stream: residual + sub-block output (exact in the tensors' dtype)


def _tensors(value: Any) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return [item for item in items if isinstance(item, torch.Tensor)]


def writes_into_arguments(output: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a call returned a tensor that lives in the memory of one of its tensor arguments —
    measured on the call, whatever the class: vLLM's ``fused_add_rms_norm`` (CUDA, XPU) returns ``x`` and
    ``residual`` overwritten, an in-place rotary embedding returns its query and key, vLLM-Ascend adds a
    norm's bias with ``x.add_``. Such an output holds new values in an old tensor: it must be recorded
    as itself, never as a link to what was recorded for that tensor before."""
    inputs = {_storage(t) for t in (*_tensors(args), *_tensors(kwargs))} - {None}
    return bool(inputs) and any(_storage(t) in inputs for t in _tensors(output))


def _storage(tensor: Any) -> int | None:
    """Where a tensor's memory starts (its storage's address); None for an empty or storage-less tensor."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr() if storage.nbytes() else None
    except (RuntimeError, NotImplementedError):  # a wrapper tensor subclass without a storage of its own
        return None


def output_by_meaning(module: Any, output: Any) -> Any:
    """The tensor a module's output *means*: the normed element of a fused norm's tuple (by the class
    rule of :data:`FUSED_NORMS`, else found by meaning, :func:`_normed_element`), the residual stream
    ``hidden + residual`` of a vLLM decoder layer, else the first tensor (of a tuple / dict). Raises
    :class:`SemanticsError` when a fused norm's elements cannot be told apart."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    items = list(output.values()) if isinstance(output, dict) else list(output) if isinstance(output, (tuple, list)) else []
    tensors = [item for item in items if isinstance(item, torch.Tensor)]
    pair = len(items) == 2 and len(tensors) == 2 and tensors[0].shape == tensors[1].shape
    if pair and is_fused_norm(module):
        rule = FUSED_NORMS.get(type(module).__name__) or _DETECTED.get(type(module).__name__)
        if rule is None:
            rule = _DETECTED[type(module).__name__] = _normed_element(module, tensors)
        return tensors[rule.normed]
    if pair and is_residual_layer(module):
        return tensors[1] + tensors[0]
    return tensors[0] if tensors else None


def _normed_element(module: Any, tensors: list) -> FusedNorm:
    """Which of two tensors a fused norm of an unregistered class returned is the normed one: the one
    whose every row, divided by the effective weight, has rms 1 (to 2 %), when exactly one does."""
    import torch

    scale = norm_weight_effective(module)
    channels = scale.abs() > 1e-6 * float(scale.abs().max())
    unit = []
    for tensor in tensors:
        rows = (tensor.detach().float()[..., channels] / scale[channels].to(tensor.device)).reshape(-1, int(channels.sum()))
        rms = rows.pow(2).mean(dim=-1).sqrt()
        unit.append(bool(rows.shape[0]) and bool(torch.all((rms - 1).abs() < 0.02)))
    if unit.count(True) != 1:
        raise SemanticsError(
            f"{type(module).__name__} returns two tensors and hwdiff cannot tell which is the normed output "
            f"(unit rms after the weight: {unit}); declare its order with "
            "hwdiff.structure.register_fused_norm(class_name, normed=..., residual=...)")
    normed = unit.index(True)
    return FusedNorm(normed, 1 - normed)


def flat_sequences(positions: Any) -> tuple[int, int]:
    """``(sequences, tokens)`` of a flattened batch (vLLM: ``input_ids`` and ``positions`` are
    ``[num_tokens]``, the scheduled requests one after another), told from its positions: every
    sequence must be a whole prompt — positions ``0 … T-1`` — and all of the same length T, so that
    the ``[num_tokens, …]`` rows reshape exactly to ``[sequences, tokens, …]``. Raises
    :class:`SemanticsError` saying why otherwise (a decode step, a chunked or prefix-cached prefill,
    prompts of different lengths, padding, M-RoPE positions)."""
    import torch

    if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
        shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise SemanticsError(f"positions of shape {shape}, not [num_tokens] (M-RoPE or no positions): the "
                             "sequences of the batch cannot be told")
    flat = positions.detach().to("cpu", torch.int64)
    starts = torch.nonzero(flat == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        raise SemanticsError("the batch does not start at position 0 (a decode step, a chunked or prefix-cached "
                             "prefill): it is not whole prompts")
    tokens = (starts[1] if len(starts) > 1 else len(flat)) - starts[0]
    if len(flat) % tokens or not torch.equal(flat, torch.arange(tokens).repeat(len(flat) // tokens)):
        raise SemanticsError(f"the {len(flat)} tokens of the batch are not prompts of one length (positions "
                             f"{flat[:8].tolist()} …): equal-length prompts make [num_tokens] reshape exactly to "
                             "[sequences, tokens]; use prompts of one length")
    return len(flat) // tokens, tokens
