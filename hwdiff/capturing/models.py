"""Model loading: built-in seeded random models, local checkpoints and hub ids, with a fingerprint.

The fingerprint hashes the weights as loaded, before any cast or move, so the same checkpoint gives
the same fingerprint whatever device or dtype a capture runs in.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ModelSpecError
from .checkpoints import (
    check_hub_id,
    dtype_name,  # noqa: F401  (callers import it from here, where the dtypes are)
    fingerprint,
    hash_tensor,
    recorded_fingerprint,
    resolve,
)

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of a model loaded by :func:`load_model`.

    ``tokenizer`` is a path or hub id for ``AutoTokenizer``, or None for hwdiff's byte-level ids.
    """

    spec: str
    fingerprint: str
    tokenizer: str | None
    seed: int | None
    trust_remote_code: bool = (
        False  # the checkpoint's own code was allowed to run (model and tokenizer)
    )


_INFO: "weakref.WeakKeyDictionary[torch.nn.Module, ModelInfo]" = weakref.WeakKeyDictionary()


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``, ``"bf16"``, ``torch.bfloat16`` … → ``torch.bfloat16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelSpecError(
            f"unknown dtype {dtype!r}: expected one of float32, bfloat16, float16, float64"
        ) from None


def tiny_qwen2_config(attn_implementation: str | None = None) -> Any:
    """Qwen2 architecture at toy size: 4 layers, hidden 256, byte-level vocabulary, tied embeddings."""
    return _qwen2_config(
        vocab_size=320,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        attn_implementation=attn_implementation,
    )


def qwen25_15b_config(attn_implementation: str | None = None) -> Any:
    """The Qwen2.5-1.5B-Instruct architecture (docs/design.md#numbers-to-know)."""
    return _qwen2_config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        attn_implementation=attn_implementation,
    )


def _qwen2_config(attn_implementation: str | None, **sizes: int) -> Any:
    from transformers import Qwen2Config

    config = Qwen2Config(
        **sizes,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=True,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=False,
    )
    if attn_implementation:
        config._attn_implementation = attn_implementation
    return config


BUILTIN: dict[str, Callable[[str | None], Any]] = {
    "tiny-qwen2": tiny_qwen2_config,
    "qwen2.5-1.5b-arch": qwen25_15b_config,
}
REAL = (
    "smollm2-135m",
)  # real trained checkpoints (hwdiff.capturing.checkpoints.REAL): converted once, cached


def load_model(
    spec: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    *,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a model in eval mode with gradients off, fingerprinted before the cast to ``dtype``.

    ``spec`` is a built-in name (``tiny-qwen2``, ``qwen2.5-1.5b-arch``: seeded random weights from
    ``seed``; ``smollm2-135m``: the real SmolLM2-135M-Instruct, :mod:`hwdiff.capturing.checkpoints`), a local
    checkpoint directory, or a Hugging Face hub id. ``attn_implementation`` None
    keeps transformers' default (``sdpa``); ``"eager"`` selects the plain matmul-softmax path.
    """
    from .devices import resolve_device

    if seed < 0:
        raise ModelSpecError(f"seed must be 0 or more, got {seed}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if (
        spec in BUILTIN
    ):  # built directly in dtype on the device; the fingerprint is of the float32 weights
        model, digest = _build_random(spec, attn_implementation, seed, torch_device, torch_dtype)
        info = ModelInfo(spec=spec, fingerprint=digest, tokenizer=None, seed=seed)
    elif (
        spec in REAL
    ):  # a real checkpoint, converted once into hwdiff's cache (hwdiff.capturing.checkpoints)
        model, info = _load_real(spec, attn_implementation)
    else:
        model = _from_pretrained(spec, attn_implementation, trust_remote_code)
        info = ModelInfo(
            spec=spec,
            fingerprint=fingerprint(model),
            tokenizer=spec,
            seed=None,
            trust_remote_code=trust_remote_code,
        )
    model = model.to(device=torch_device, dtype=torch_dtype).eval().requires_grad_(False)
    _INFO[model] = info
    return model


def _load_real(spec: str, attn_implementation: str | None) -> tuple[torch.nn.Module, ModelInfo]:
    """A real built-in (``smollm2-135m``): its converted folder (or hub id), checked against the
    fingerprint recorded at conversion."""

    where, source = resolve(spec)
    model = _from_pretrained(where, attn_implementation)
    digest = fingerprint(model)
    recorded = recorded_fingerprint(where) if Path(where).is_dir() else None
    if recorded is not None and recorded != digest:
        raise ModelSpecError(
            f"{spec}: the converted weights in {where} no longer match the fingerprint recorded at "
            f"conversion ({recorded[:19]}…, now {digest[:19]}…); delete that folder to convert again"
        )
    log.info("hwdiff: %s from %s (%s)", spec, where, source)
    return model, ModelInfo(spec=spec, fingerprint=digest, tokenizer=where, seed=None)


def model_info(model: torch.nn.Module) -> ModelInfo:
    """Provenance of ``model``: as recorded by :func:`load_model`, else computed from its weights now.

    A model not loaded by hwdiff is fingerprinted in its current dtype, so captures of it in two
    dtypes get different fingerprints; load it with :func:`load_model` to avoid that.
    """
    info = _INFO.get(model)
    if info is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        info = ModelInfo(
            spec=f"object:{name}", fingerprint=fingerprint(model), tokenizer=None, seed=None
        )
        _INFO[model] = info
    return info


def _build_random(
    spec: str, attn_implementation: str | None, seed: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, str]:
    """A built-in model with seeded random weights, and its fingerprint.

    The parameters are created directly in ``dtype`` on ``device`` (no float32 copy of the model, so
    a bfloat16 build needs about its own size in memory) and filled chunk by chunk from the float32
    values of :func:`_seeded_values`; the fingerprint hashes those float32 values as
    :func:`fingerprint` hashes a float32 model, so it does not depend on ``dtype`` or ``device``.
    """
    from transformers import Qwen2ForCausalLM

    config = BUILTIN[spec](attn_implementation)
    try:
        with _skip_transformers_init(), _parameters_on_meta():  # every parameter is filled below
            model = Qwen2ForCausalLM(config)
    except ValueError as exc:  # e.g. an attention implementation transformers does not know
        raise ModelSpecError(f"cannot build {spec}: {_first_line(exc)}") from exc
    model.tie_weights()  # skipped along with the init by some transformers versions
    digest = _materialize_seeded(model, seed, device, dtype)
    return model.to(
        device=device, dtype=dtype
    ), digest  # buffers (rotary frequencies) cast as before


def _skip_transformers_init() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


@contextlib.contextmanager
def _parameters_on_meta() -> Any:
    """Parameters registered inside this scope live on the meta device (no memory); buffers stay real."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


_FILL_CHUNK = 1 << 24  # float32 values generated at a time (64 MiB)


def _materialize_seeded(
    model: torch.nn.Module, seed: int, device: torch.device, dtype: torch.dtype
) -> str:
    """Replace the meta parameters by real ones in ``dtype`` filled with the seeded values; return
    the fingerprint of the float32 values (state-dict keys in name order, as :func:`fingerprint`)."""
    state = model.state_dict(keep_vars=True)  # key → meta parameter or real buffer
    seeds: dict[int, str] = {}  # a tied parameter takes the values of its first name
    for name, param in model.named_parameters():
        seeds.setdefault(id(param), name)
    real: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                if id(param) not in real:
                    real[id(param)] = torch.nn.Parameter(
                        torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False
                    )
                module._parameters[name] = real[id(param)]
    digest, filled = hashlib.sha256(), set()
    for key in sorted(state):
        tensor = state[key]
        if id(tensor) not in real:  # a persistent buffer: hashed as built, as fingerprint() would
            hash_tensor(digest, key, tensor.detach().to("cpu").contiguous())
            continue
        target = real[id(tensor)].data.view(-1)
        digest.update(f"{key}|float32|{tuple(tensor.shape)}\n".encode())
        offset = 0
        for values in _seeded_values(seeds[id(tensor)], tensor, seed):
            digest.update(values.tobytes())
            if id(tensor) not in filled:
                with torch.no_grad():
                    target[offset : offset + values.size].copy_(torch.from_numpy(values))
            offset += values.size
        filled.add(id(tensor))
    return "sha256:" + digest.hexdigest()


def _seeded_values(name: str, param: torch.Tensor, seed: int) -> Any:
    """The float32 values of parameter ``name`` in chunks of :data:`_FILL_CHUNK`, from numpy's PCG64
    keyed by (seed, crc32(name)): independent of transformers' own init (which changes between
    versions), so two machines with different library versions build bit-identical weights. RMSNorm
    weights are N(1, 0.1²), spread around one so that calibration math sees unequal weights. A
    generator's stream does not depend on how it is cut into calls, so chunks give the same values."""
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))
    std, mean = np.float32(_init_std(name, param)), np.float32(_init_mean(name))
    remaining = param.numel()
    while remaining > 0:
        values = rng.standard_normal(min(remaining, _FILL_CHUNK), dtype=np.float32)
        values *= std
        values += mean
        remaining -= values.size
        yield values


def _init_std(name: str, param: torch.Tensor) -> float:
    if "norm" in name:
        return 0.1
    if name.endswith("bias") or "embed" in name:
        return 0.02
    return float(param.shape[-1]) ** -0.5  # keeps activations O(1) through each Linear


def _init_mean(name: str) -> float:
    return 1.0 if "norm" in name else 0.0


def _from_pretrained(
    spec: str, attn_implementation: str | None, trust_remote_code: bool = False
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = Path(os.path.expanduser(spec))
    if not path.is_dir() and (path.exists() or not _HUB_ID.match(spec)):
        found = "is not a directory" if path.exists() else "does not exist"
        raise ModelSpecError(
            f"unknown model spec {spec!r} ({path.resolve()} {found}): expected a built-in ({', '.join((*BUILTIN, *REAL))}), "
            "a local checkpoint directory, or a Hugging Face hub id"
        )
    if not path.is_dir():
        check_hub_id(spec, path)
    # Code shipped with a checkpoint runs only when the user says so; False (never None) refuses at
    # once instead of transformers' interactive prompt.
    kwargs: dict[str, Any] = {"dtype": "auto", "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else spec, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        where = "local checkpoint" if path.is_dir() else "hub id (no local directory of that name)"
        hint = (
            "; it ships its own Python code: pass --trust-remote-code (trust_remote_code=True) if you trust it"
            if "trust_remote_code" in str(exc) and not trust_remote_code
            else ""
        )
        raise ModelSpecError(
            f"could not load model {spec!r} as a {where}: {_first_line(exc)}{hint}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
