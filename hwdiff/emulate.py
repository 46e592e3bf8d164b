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
  order (another reduction order), in float32.

Profiles act through forward hooks that replace a module's output, or (aqn) through the weights;
they are registered before hwdiff's recording hooks, so what is recorded is the perturbed output.
Each capture records the profiles in its ``emulate`` attribute.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .errors import HwdiffError
from .structure import is_norm, norm_offset


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
        raise HwdiffError(f"unknown emulation profile {name!r}: expected one of {', '.join(PROFILES)}")
    params = dict(_DEFAULTS[name])
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in params:
            raise HwdiffError(f"emulation profile {name} takes {', '.join(params) or 'no parameters'}; got {item!r}")
        try:
            params[key] = float(value)
        except ValueError:
            raise HwdiffError(f"emulation parameter {key} of {name} must be a number, got {value!r}") from None
    if (params.get("block", 1) < 1 or params.get("chunk", 1) < 1 or params.get("sigma", 0) < 0
            or params.get("seed", 0) < 0 or not all(map(math.isfinite, params.values()))):
        raise HwdiffError(f"emulation profile {text!r} has an out-of-range parameter")
    return Profile(name, params)


def describe(profiles: list[Profile]) -> str:
    return ";".join(map(str, profiles))


@contextlib.contextmanager
def emulation(model: torch.nn.Module, profiles: list[Profile | str] | None) -> Iterator[list[Profile]]:
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
def _replace_outputs(model: torch.nn.Module, select: Callable[[torch.nn.Module], bool],
                     compute: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        x = args[0] if args else kwargs["hidden_states"]
        return compute(module, x).to(output.dtype)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if select(m)]
    if not handles:
        raise HwdiffError(f"the emulation profile matched no module in {type(model).__name__}")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _linear_fp32(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = module.bias.float() if module.bias is not None else None
    return F.linear(x.float(), module.weight.float(), bias)


def _truncate_bf16(values: torch.Tensor) -> torch.Tensor:
    """float32 → the bfloat16 value toward zero (low 16 bits cleared), as float32."""
    return (values.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def _bf16_truncate(model: torch.nn.Module, params: dict) -> Any:
    return _replace_outputs(model, lambda m: isinstance(m, torch.nn.Linear),
                            lambda m, x: _truncate_bf16(_linear_fp32(m, x)))


def _bf16_block_accum(model: torch.nn.Module, params: dict) -> Any:
    block = int(params["block"])

    def compute(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        x, weight = x.float(), module.weight.float()
        total = torch.zeros(*x.shape[:-1], weight.shape[0], dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[-1], block):
            partial = F.linear(x[..., start:start + block], weight[:, start:start + block])
            total = (total + partial).bfloat16().float()
        if module.bias is not None:
            total = (total + module.bias.float()).bfloat16().float()
        return total

    return _replace_outputs(model, lambda m: isinstance(m, torch.nn.Linear), compute)


def _approx_silu(model: torch.nn.Module, params: dict) -> Any:
    return _replace_outputs(model, _is_silu, lambda m, x: x.float() * torch.sigmoid(x.bfloat16()).float())


def _rmsnorm_order(model: torch.nn.Module, params: dict) -> Any:
    chunk = int(params["chunk"])

    def compute(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        x32 = x.float()
        squares = x32 * x32
        total = torch.zeros_like(squares[..., :1])
        for start in reversed(range(0, squares.shape[-1], chunk)):
            total = total + squares[..., start:start + chunk].sum(-1, keepdim=True)
        normed = x32 * torch.rsqrt(total / squares.shape[-1] + eps)
        if norm_offset(module):  # (1 + w) norms scale in float32, then cast (Gemma's order)
            return (normed * (module.weight.float() + norm_offset(module))).to(x.dtype)
        return module.weight * normed.to(x.dtype)

    return _replace_outputs(model, is_norm, compute)


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
                noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * params["sigma"]
                norm.weight.copy_((weight.float() + noise.to(weight.device)).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for norm, weight in zip(norms, clean):
                norm.weight.copy_(weight)


_APPLY: dict[str, Callable[[torch.nn.Module, dict], Any]] = {
    "aqn": _aqn, "bf16-truncate": _bf16_truncate, "bf16-block-accum": _bf16_block_accum,
    "approx-silu": _approx_silu, "rmsnorm-order": _rmsnorm_order,
}
