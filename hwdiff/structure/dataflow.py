"""Data flow: every norm's role (pre, post, nested, final, parallel, unresolved), measured on one
traced forward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..errors import HwdiffError
from .kinds import module_kind
from .norms import is_decoder_layer_name, is_layernorm, is_norm, norm_specs_from_names
from .semantics import _takes_residual

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
    token_major: dict[str, int] = field(
        default_factory=dict
    )  # module → k of its [tokens·k, …] rows

    def role(self, name: str) -> NormRole | None:
        return next((n for n in self.norms if n.name == name), None)

    def to_json(self) -> str:
        import json

        return json.dumps(
            {
                "schema": DATAFLOW_SCHEMA,
                "sub_blocks": self.sub_blocks,
                "token_major": self.token_major,
                "norms": [
                    {
                        "name": n.name,
                        "role": n.role,
                        "sub_block": n.sub_block,
                        "producer": n.producer,
                        "consumers": list(n.consumers),
                        "gated": n.gated,
                        "reason": n.reason,
                    }
                    for n in self.norms
                ],
            }
        )

    @classmethod
    def from_json(cls, text: str | None) -> "DataFlow | None":
        """The record of a capture, or None when it has none (captures before this record: the name rule)."""
        import json

        if not text:
            return None
        data = json.loads(text)
        if data.get("schema") != DATAFLOW_SCHEMA:
            raise HwdiffError(
                f"unknown data-flow record schema {data.get('schema')!r} (expected {DATAFLOW_SCHEMA})"
            )
        norms = tuple(
            NormRole(
                n["name"],
                n["role"],
                n["sub_block"],
                n.get("producer"),
                tuple(n.get("consumers", ())),
                bool(n.get("gated")),
                n.get("reason", ""),
            )
            for n in data["norms"]
        )
        return cls(
            norms,
            dict(data["sub_blocks"]),
            {k: int(v) for k, v in (data.get("token_major") or {}).items()},
        )


class _Tracer:
    """Forward pre/post hooks on every module, keeping every tensor they see alive (so that no storage
    is reused during the trace): which module produced, and which consumed, each storage."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.keep: list[Any] = []
        self.produced: dict[
            tuple[int, int], list[str]
        ] = {}  # value → modules that returned it (in call order)
        self.consumed: dict[tuple[int, int], list[str]] = {}  # value → modules called with it
        self.inputs: dict[
            str, list[tuple[int, int]]
        ] = {}  # module → values of its first call's tensor arguments
        self.tensor_args: dict[str, int] = {}  # module → tensor arguments of its first call
        self.row_tensors: dict[
            str, list
        ] = {}  # module → its first call's [tokens·k, …] tensors (k ≥ 2)
        self.origin: dict[
            tuple[int, int], tuple[int, int]
        ] = {}  # value → the value it is a same-size copy of

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
        items = (
            value.values()
            if isinstance(value, dict)
            else value
            if isinstance(value, (tuple, list))
            else (value,)
        )
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
            flat = [
                a
                for arg in (*args, *(kwargs or {}).values())
                for a in (arg if isinstance(arg, (tuple, list)) else (arg,))
            ]
            tensors = [t for t in flat if isinstance(t, torch.Tensor) and t.numel() > 1]
            if (
                len(tensors) == 1
                and isinstance(out, torch.Tensor)
                and out is not tensors[0]
                and out.numel() == tensors[0].numel()
            ):
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
            handles.append(
                module.register_forward_hook(
                    _row_hook(tracer.row_tensors, name, rows), with_kwargs=True
                )
            )
        # not inference mode: it keeps no version counters
        with torch.no_grad(), _SameValue(tracer):
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    flow = dataflow_from_trace(tracer, modules)
    return DataFlow(
        flow.norms,
        flow.sub_blocks,
        _token_major_rows(model, modules, input_ids, tracer.row_tensors),
    )


def _token_major_rows(
    model: Any, modules: Sequence[tuple[str, Any]], input_ids: Any, first: dict[str, list]
) -> dict[str, int]:
    """Modules called with ``[sequences·tokens·k, …]`` rows (k ≥ 2: Qwen3-Next's gated norm sees
    ``[b·t·heads, d]``) whose rows provably run token-major: changing the last token of every sequence
    changes exactly rows ``t = T-1`` of ``[b, t, k]`` in every such tensor of the call (the model is
    causal: a token changes no earlier row). Those can be stored per token as ``[b, t, k, …]``."""
    import torch

    batch, tokens = int(input_ids.shape[0]), int(input_ids.shape[1])
    other = input_ids.clone()
    other[:, -1] = torch.where(
        input_ids[:, 0] != input_ids[:, -1], input_ids[:, 0], input_ids[:, -1] ^ 1
    )
    if not first:  # no module saw such rows: no second forward
        return {}
    runs = [
        first,
        _row_tensors(model, [(n, m) for n, m in modules if n in first], other, batch * tokens),
    ]
    found = {}
    for name, rows in runs[0].items():
        second = runs[1].get(name)
        if second is None or len(second) != len(rows):
            continue
        ks = {t.shape[0] // (batch * tokens) for t in rows}
        if len(ks) == 1 and all(
            _changed_last_token(a, b, batch, tokens) for a, b in zip(rows, second)
        ):
            found[name] = ks.pop()
    return found


def _row_tensors(
    model: Any, modules: Sequence[tuple[str, Any]], ids: Any, rows: int
) -> dict[str, list]:
    """Per module, the tensors of its first call (arguments and output) with ``rows·k`` rows, k ≥ 2."""
    import torch

    seen: dict[str, list] = {}
    handles = [
        module.register_forward_hook(_row_hook(seen, name, rows), with_kwargs=True)
        for name, module in modules
    ]
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
        items = (
            value
            if isinstance(value, (tuple, list))
            else tuple(value.values())
            if isinstance(value, dict)
            else (value,)
        )
        return [
            t.detach().float().clone()
            for t in items
            if isinstance(t, torch.Tensor)
            and t.dim() >= 2
            and t.is_floating_point()
            and t.shape[0] > rows
            and t.shape[0] % rows == 0
        ]

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
    outermost = {
        l for l in layers if not any(a in layers for a in _ancestors(l))
    }  # decoder layers, not experts
    for (
        name,
        module,
    ) in modules:  # sub-blocks no norm touches: their local error must still be shown
        parent = name.rpartition(".")[0]
        if (
            parent in outermost
            and name in tracer.inputs
            and not is_norm(module)
            and not is_layernorm(module)
            and any(True for _ in module.parameters())
        ):
            sub_blocks.setdefault(name, _block_kind(name, by_name, False))
    return DataFlow(tuple(roles), sub_blocks)


def _norm_role(
    name: str, module: Any, tracer: _Tracer, layers: set[str], by_name: Mapping[str, Any]
) -> NormRole:
    ancestors = _ancestors(name)
    gated = tracer.tensor_args.get(name, 0) > 1 and not _takes_residual(module)
    if name not in tracer.inputs:
        return NormRole(
            name, "unresolved", None, gated=gated, reason="never called in the traced forward"
        )
    container = next((a for a in ancestors if a in layers), None)  # its decoder layer
    inside = [a for a in ancestors if container is not None and a.startswith(container + ".")]
    if inside:  # inside a child of its layer: a nested norm
        return NormRole(name, "nested", inside[0], gated=gated)
    exclude = set(ancestors) | {name} | {n for n in by_name if n.startswith(name + ".")}
    own_input = tracer.inputs[name][0]
    producers = _outermost(tracer.produced.get(own_input, []), exclude)
    siblings = [
        p
        for p in producers
        if _same_level(p, container)
        and not is_norm(by_name[p])
        and not any(l == p or l.startswith(p + ".") for l in layers)
    ]  # a decoder layer is no sub-block
    consumers = tuple(_outermost(_consumers_of(name, tracer), exclude))
    producer = siblings[-1] if siblings else None
    if producer is not None:
        return NormRole(name, "post", producer, producer, consumers, gated)
    if container is None:  # outside the layers: the final norm feeds the head
        heads = [c for c in consumers if not any(c.startswith(l + ".") for l in layers)]
        if len(heads) == 1:
            return NormRole(name, "final", heads[0], None, consumers, gated)
        return NormRole(
            name,
            "unresolved",
            None,
            None,
            consumers,
            gated,
            f"outside the decoder layers and feeding {', '.join(consumers) or 'no module'}, not one head",
        )
    blocks = [c for c in consumers if _same_level(c, container)]
    if len(blocks) == 1:
        return NormRole(name, "pre", blocks[0], None, consumers, gated)
    if len(blocks) > 1:
        return NormRole(
            name,
            "parallel",
            None,
            None,
            consumers,
            gated,
            f"feeds {len(blocks)} sub-blocks in parallel ({', '.join(blocks)}): hwdiff does not split one "
            "norm's σ between sub-blocks",
        )
    return NormRole(
        name,
        "unresolved",
        None,
        None,
        consumers,
        gated,
        "neither fed by a sub-block's output nor feeding one (a norm between plain tensor operations)",
    )


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


_NAME_RULE_ROLES = {
    "pre_attention": "pre",
    "pre_mlp": "pre",
    "post_attention": "post",
    "post_mlp": "post",
    "q_norm": "nested",
    "k_norm": "nested",
    "final": "final",
}


def name_rule_disagreements(flow: DataFlow, module_names: Sequence[str]) -> list[str]:
    """The cross-check: norms whose measured ``(role, sub-block)`` differs from what the name rule
    (:func:`norm_specs_from_names`) says, one line each (the measurement is what hwdiff uses)."""
    specs = {
        spec.name: spec
        for spec in norm_specs_from_names(module_names, {}, norms=[n.name for n in flow.norms])
    }
    lines = []
    for role in flow.norms:
        spec = specs[role.name]
        named = (_NAME_RULE_ROLES.get(spec.role, "unknown"), spec.subblock)
        if named != (role.role, role.sub_block):
            lines.append(
                f"{role.name}: measured {role.role} of {role.sub_block}, the name rule says {named[0]} of "
                f"{named[1]}"
            )
    return lines


def dataflow_of_capture(model: Any, input_ids: Any) -> DataFlow | None:
    """The data-flow record for a capture: traced on the first sequence's first :data:`TRACE_TOKENS`
    tokens (on the model's device); None for a model that is not an ``nn.Module`` taking
    ``input_ids``."""
    import torch

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.as_tensor(input_ids[:1, :TRACE_TOKENS], dtype=torch.int64, device=device)
    return trace_dataflow(model, ids)
