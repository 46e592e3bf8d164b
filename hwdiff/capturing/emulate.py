"""Emulation profiles: named, documented numerical perturbations for ground truth on the CPU.

``hwdiff capture --emulate PROFILE[:k=v,...]`` (repeatable; also ``replay``) runs the model with a
known perturbation, so that diff, replay and calibrate can be checked against an answer:

- ``aqn[:sigma=0.01,seed=0]`` — AQN itself: Gaussian noise N(0, σ²) on every RMSNorm weight, drawn
  in float32, added to a float32 copy of the clean weight and cast once; restored on exit.
- ``bf16-truncate`` — every Linear computed in float32 and its output truncated (rounded toward
  zero) to bfloat16 instead of rounded to nearest.
- ``bf16-block-accum[:block=64]`` — every Linear accumulates in float32 within blocks of ``block``
  inputs and rounds the running sum to bfloat16 after each block (a bf16 accumulator).
- ``approx-silu`` — SiLU as x·sigmoid(x) with the sigmoid evaluated in bfloat16 (a lower-precision
  activation kernel).
- ``rmsnorm-order[:chunk=32]`` — RMSNorm with the mean of squares summed chunk by chunk in reverse
  order (another reduction order), in float32. Gated norms (``norm(x, gate)``) are computed with their
  gate, in the form the module is measured to compute (:func:`_norm_form`).

Profiles act through forward hooks that replace a module's output, or (aqn) through the weights;
they are registered before hwdiff's recording hooks, so what is recorded is the perturbed output.
A Linear whose forward returns more than a tensor (Llama 4's router) is run again with its linear
product replaced where it is computed (:class:`_LinearProduct`).
Each capture records the profiles in its ``emulate`` attribute.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ..errors import HwdiffError
from ..structure import input_by_meaning, is_fused_norm, is_norm, norm_offset


@dataclass(frozen=True)
class Profile:
    name: str
    params: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        args = ",".join(f"{key}={value:g}" for key, value in sorted(self.params.items()))
        return f"{self.name}:{args}" if args else self.name


_DEFAULTS: dict[str, dict[str, float]] = {
    "aqn": {"sigma": 0.01, "seed": 0},
    "bf16-truncate": {},
    "bf16-block-accum": {"block": 64},
    "approx-silu": {},
    "rmsnorm-order": {"chunk": 32},
}
PROFILES = tuple(_DEFAULTS)


def parse(text: str) -> Profile:
    """``"aqn:sigma=0.02"`` → Profile("aqn", {"sigma": 0.02, "seed": 0})."""
    name, _, rest = text.strip().partition(":")
    if name not in _DEFAULTS:
        raise HwdiffError(
            f"unknown emulation profile {name!r}: expected one of {', '.join(PROFILES)}"
        )
    params = dict(_DEFAULTS[name])
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in params:
            raise HwdiffError(
                f"emulation profile {name} takes {', '.join(params) or 'no parameters'}; got {item!r}"
            )
        try:
            params[key] = float(value)
        except ValueError:
            raise HwdiffError(
                f"emulation parameter {key} of {name} must be a number, got {value!r}"
            ) from None
    if (
        params.get("block", 1) < 1
        or params.get("chunk", 1) < 1
        or params.get("sigma", 0) < 0
        or params.get("seed", 0) < 0
        or not all(map(math.isfinite, params.values()))
    ):
        raise HwdiffError(f"emulation profile {text!r} has an out-of-range parameter")
    return Profile(name, params)


def describe(profiles: list[Profile]) -> str:
    return ";".join(map(str, profiles))


@contextlib.contextmanager
def emulation(
    model: torch.nn.Module, profiles: list[Profile | str] | None
) -> Iterator[list[Profile]]:
    """Apply ``profiles`` to ``model`` for the duration of a ``with`` block; everything is undone on exit."""
    if isinstance(profiles, (str, Profile)):  # one profile given on its own, not in a list
        profiles = [profiles]
    parsed = [p if isinstance(p, Profile) else parse(p) for p in (profiles or [])]
    with contextlib.ExitStack() as stack:
        for profile in parsed:
            stack.enter_context(_APPLY[profile.name](model, profile.params))
        yield parsed


def _is_silu(module: torch.nn.Module) -> bool:
    return type(module).__name__.lower() in ("silu", "siluactivation")


@contextlib.contextmanager
def _replace_outputs(
    model: torch.nn.Module,
    select: Callable[[torch.nn.Module], bool],
    compute: Callable[[torch.nn.Module, tuple, dict, torch.Tensor], torch.Tensor],
) -> Iterator[None]:
    """Replace the output of every selected module by ``compute(module, args, kwargs, output)``, where
    the module returns one tensor. A selected Linear whose forward returns anything else (a router
    returning ``(scores, logits)`` from ``super().forward``: Llama 4) is run again with its linear
    product replaced where it is computed (:class:`_LinearProduct`), so that everything it derives
    from the product (top-k, scores) is derived from the emulated one."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return compute(module, args, kwargs, output).to(output.dtype)
        if not isinstance(module, torch.nn.Linear):
            raise HwdiffError(
                f"the emulation cannot replace the output of {type(module).__name__}: it returns "
                f"{type(output).__name__}, not a tensor"
            )
        with _LinearProduct(module, compute) as product:
            again = module.forward(*args, **kwargs)  # not __call__: no hooks run twice
        if not product.hits:
            raise HwdiffError(
                f"{type(module).__name__} returns {type(output).__name__} and computes no linear "
                "product of its own weight that the emulation could replace"
            )
        return again

    handles = [
        m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if select(m)
    ]
    if not handles:
        raise HwdiffError(f"the emulation profile matched no module in {type(model).__name__}")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _main_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))


class _LinearProduct(torch.overrides.TorchFunctionMode):
    """Inside one Linear's forward: ``F.linear(x, module.weight, bias)`` answered by the emulation."""

    def __init__(self, module: torch.nn.Linear, compute: Callable) -> None:
        super().__init__()
        self.module, self.compute, self.hits = module, compute, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) > 1 and args[1] is self.module.weight:
            exact = func(*args, **kwargs)
            self.hits += 1
            return self.compute(self.module, args[:1], {}, exact).to(
                exact.dtype
            )  # the mode is off in here
        return func(*args, **kwargs)


def _linear_fp32(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = module.bias.float() if module.bias is not None else None
    return F.linear(x.float(), module.weight.float(), bias)


def _truncate_bf16(values: torch.Tensor) -> torch.Tensor:
    """float32 → the bfloat16 value toward zero (low 16 bits cleared), as float32."""
    return (values.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def _bf16_truncate(model: torch.nn.Module, params: dict) -> Any:
    return _replace_outputs(
        model,
        lambda m: isinstance(m, torch.nn.Linear),
        lambda m, args, kwargs, out: _truncate_bf16(_linear_fp32(m, _main_input(args, kwargs))),
    )


def _bf16_block_accum(model: torch.nn.Module, params: dict) -> Any:
    block = int(params["block"])

    def compute(
        module: torch.nn.Linear, args: tuple, kwargs: dict, output: torch.Tensor
    ) -> torch.Tensor:
        x, weight = _main_input(args, kwargs).float(), module.weight.float()
        total = torch.zeros(*x.shape[:-1], weight.shape[0], dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[-1], block):
            partial = F.linear(x[..., start : start + block], weight[:, start : start + block])
            total = (total + partial).bfloat16().float()
        if module.bias is not None:
            total = (total + module.bias.float()).bfloat16().float()
        return total

    return _replace_outputs(model, lambda m: isinstance(m, torch.nn.Linear), compute)


def _approx_silu(model: torch.nn.Module, params: dict) -> Any:
    def compute(
        module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor
    ) -> torch.Tensor:
        x = _main_input(args, kwargs)
        return x.float() * torch.sigmoid(x.bfloat16()).float()

    return _replace_outputs(model, _is_silu, compute)


def _rmsnorm_order(model: torch.nn.Module, params: dict) -> Any:
    chunk = int(params["chunk"])

    def compute(
        module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor
    ) -> torch.Tensor:
        x, gate = _norm_arguments(module, args, kwargs)
        form = _norm_form(module, x, gate, output)
        return _rms_norm(module, x, gate, form, lambda s: _reverse_chunk_mean(s, chunk))

    return _replace_outputs(model, is_norm, compute)


def _norm_arguments(
    module: torch.nn.Module, args: tuple, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, gate)`` of a norm call: the gate of a gated norm (``norm(x, gate)``: Qwen3-Next, Bamba,
    Mamba 2) is its second tensor argument of x's shape. A fused add+norm's ``residual`` is refused."""
    if is_fused_norm(module) and input_by_meaning(module, args, kwargs) is not _main_input(
        args, kwargs
    ):
        raise HwdiffError(
            f"rmsnorm-order does not emulate {type(module).__name__} called with a residual "
            "(a fused add+norm): emulate on the Hugging Face layout"
        )
    x = _main_input(args, kwargs)
    rest = [
        *args[1:],
        *(value for key, value in kwargs.items() if key not in ("hidden_states", "input")),
    ]
    gate = next((t for t in rest if isinstance(t, torch.Tensor) and t.shape == x.shape), None)
    return x, gate


_FORMS = ("plain", "norm-then-gate", "gate-then-norm")


def _norm_form(
    module: torch.nn.Module, x: torch.Tensor, gate: torch.Tensor | None, output: torch.Tensor
) -> str:
    """What the norm computes, by measurement: the one formula (plain ``w·x̂``; gated ``w·x̂·act(gate)``
    as Qwen3-Next; gated ``w·(x·act(gate))^`` as Bamba / Mamba 2, per group of ``group_size``) that
    reproduces the module's own output (relative L2 below 1e-2; the forms differ by O(1)). Refuses a
    norm none of them reproduces (a bias, another activation): its reordering would be wrong."""
    forms = ("plain",) if gate is None else _FORMS[1:]
    reference = output.detach().double()
    scale = float(reference.norm()) or 1.0
    with torch.no_grad():
        errors = {
            form: float(
                (_rms_norm(module, x, gate, form, _forward_mean).double() - reference).norm()
            )
            / scale
            for form in forms
        }
    best = min(errors, key=errors.get)
    if errors[best] > 1e-2:
        raise HwdiffError(
            f"rmsnorm-order cannot emulate {type(module).__name__}: no known RMSNorm form reproduces "
            f"its output (relative L2 {', '.join(f'{k} {v:.3g}' for k, v in errors.items())})"
        )
    return best


def _forward_mean(squares: torch.Tensor) -> torch.Tensor:
    return squares.mean(-1, keepdim=True)


def _reverse_chunk_mean(squares: torch.Tensor, chunk: int) -> torch.Tensor:
    """The mean of squares over the last axis, summed chunk by chunk in reverse order (float32)."""
    total = torch.zeros_like(squares[..., :1])
    for start in reversed(range(0, squares.shape[-1], chunk)):
        total = total + squares[..., start : start + chunk].sum(-1, keepdim=True)
    return total / squares.shape[-1]


def _rms_norm(
    module: torch.nn.Module,
    x: torch.Tensor,
    gate: torch.Tensor | None,
    form: str,
    mean: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The norm's output in ``form`` with the mean of squares taken by ``mean``, in the order of
    operations and casts transformers' norms use."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    act = _gate_activation(module)
    source = x.float() * act(gate.float()) if form == "gate-then-norm" else x.float()
    hidden = source.shape[-1]
    group = int(getattr(module, "group_size", 0) or hidden)
    group = group if hidden % group == 0 else hidden
    grouped = source.reshape(*source.shape[:-1], hidden // group, group)
    normed = (grouped * torch.rsqrt(mean(grouped * grouped) + eps)).reshape(source.shape)
    offset = norm_offset(module)
    if offset:  # (1 + w) norms scale in float32, then cast (Gemma's order)
        y = (normed * (module.weight.float() + offset)).to(x.dtype)
    else:
        y = module.weight * normed.to(x.dtype)
    if form == "norm-then-gate":
        y = (y * act(gate.float())).to(x.dtype)
    return y


def _gate_activation(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    name = getattr(module, "activation", "silu")
    if not isinstance(name, str) or name in ("silu", "swish"):
        return F.silu
    from transformers.activations import ACT2FN

    return ACT2FN[name]


@contextlib.contextmanager
def _aqn(model: torch.nn.Module, params: dict) -> Iterator[None]:
    norms = [m for m in model.modules() if is_norm(m)]
    if not norms:
        raise HwdiffError(f"the aqn profile found no RMSNorm in {type(model).__name__}")
    generator = torch.Generator().manual_seed(int(params["seed"]))
    clean = [norm.weight.detach().clone() for norm in norms]
    try:
        with torch.no_grad():
            for norm, weight in zip(norms, clean):
                noise = (
                    torch.randn(weight.shape, generator=generator, dtype=torch.float32)
                    * params["sigma"]
                )
                norm.weight.copy_((weight.float() + noise.to(weight.device)).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for norm, weight in zip(norms, clean):
                norm.weight.copy_(weight)


_APPLY: dict[str, Callable[[torch.nn.Module, dict], Any]] = {
    "aqn": _aqn,
    "bf16-truncate": _bf16_truncate,
    "bf16-block-accum": _bf16_block_accum,
    "approx-silu": _approx_silu,
    "rmsnorm-order": _rmsnorm_order,
}
