"""Op-level probes: the sources of GPU-vs-NPU error measured directly, one op at a time.

``hwdiff probe-ops --device D --dtype T -o ops.h5`` runs each op below on seeded inputs that are
exactly representable in bfloat16, float16, float32 and float64 (bf16-rounded normals kept inside
float16's normal range), so every run starts from identical values, and stores each output in the
capture format as a pseudo-module (kind ``op``): ``hwdiff diff`` then compares devices op by op,
and against ``--device cpu --dtype float64`` as the golden.

- ``matmul.K<K>``: [64, K] @ [K, 64] for K = 64 … 16384 (an ``nn.Linear``, so the Linear emulation
  profiles apply): the accumulation order and precision of the GEMM.
- ``cast``: float32 values (not bf16-representable) converted to the run's dtype: one rounding.
- ``silu``, ``gelu``, ``exp``, ``tanh``: activation and transcendental kernels, on [64, 4096].
- ``softmax``: over rows of 1024 (exponentials and a normalizing sum).
- ``rmsnorm``: hidden 1536 with a weight spread around 1 (an RMSNorm module: the RMSNorm profiles
  apply).
- ``sum``, ``mean``: reductions over rows of 16384.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Callable

import numpy as np
import torch

from .._version import __version__
from ..common import outputs
from ..store.writer import CaptureWriter, Register
from . import devices
from .emulate import describe, emulation
from .hooks import slot_record
from .inputs import Inputs
from .models import dtype_name, resolve_dtype
from .run import CaptureResult

MATMUL_KS = tuple(64 * 2**i for i in range(9))  # 64 … 16384
ROWS = 64


class ProbeRMSNorm(torch.nn.Module):
    """RMSNorm as models write it: float32 statistics, output in the input's dtype times the weight."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * normed.to(x.dtype)


class Lambda(torch.nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> None:
        super().__init__()
        self.fn, self.label = fn, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class Cast(torch.nn.Module):
    """float32 in, the run's dtype out (the input is not cast before the op)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.target)


def representable(
    rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0
) -> np.ndarray:
    """Normals rounded to bfloat16 with |x| ≥ 2^-12: exact in bf16, fp16, fp32 and fp64."""
    values = torch.from_numpy(rng.standard_normal(shape) * scale).bfloat16().double().numpy()
    tiny = np.abs(values) < 2.0**-12
    values[tiny] = np.copysign(2.0**-12, values[tiny])
    return values


def build(seed: int = 0) -> list[tuple[str, torch.nn.Module, np.ndarray]]:
    """(name, module, float64 input) of every op; modules are in float64 until moved."""
    rng = np.random.Generator(np.random.PCG64(seed))
    ops: list[tuple[str, torch.nn.Module, np.ndarray]] = []
    for k in MATMUL_KS:
        linear = torch.nn.Linear(k, ROWS, bias=False, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(representable(rng, (ROWS, k))))
        ops.append((f"matmul.K{k}", linear, representable(rng, (ROWS, k))))
    ops.append(
        ("cast", Cast(), rng.standard_normal((ROWS, 4096)).astype(np.float32).astype(np.float64))
    )
    wide = representable(rng, (ROWS, 4096), 2.0)
    ops += [
        ("silu", torch.nn.SiLU(), wide),
        ("gelu", torch.nn.GELU(), wide),
        ("exp", Lambda(torch.exp, "exp"), np.clip(wide, -8, 8)),
        ("tanh", torch.nn.Tanh(), wide),
        ("softmax", torch.nn.Softmax(dim=-1), representable(rng, (ROWS, 1024), 2.0)),
    ]
    norm = ProbeRMSNorm(1536).double()
    with torch.no_grad():
        norm.weight.copy_(
            torch.from_numpy(representable(rng, (1536,), 0.1) + 1.0).bfloat16().double()
        )
    ops.append(("rmsnorm", norm, representable(rng, (ROWS, 1536))))
    long = representable(rng, (ROWS, 16384))
    ops += [
        ("sum", Lambda(lambda x: x.sum(-1), "sum"), long),
        ("mean", Lambda(lambda x: x.mean(-1), "mean"), long),
    ]
    return ops


def fingerprint(ops: list[tuple[str, torch.nn.Module, np.ndarray]]) -> str:
    """SHA-256 over every op's name, input and parameters: the same on any device and dtype."""
    digest = hashlib.sha256(b"hwdiff-probe-ops/1")
    for name, module, values in ops:
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(values).tobytes())
        for param in module.parameters():
            digest.update(param.detach().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def probe_ops(
    path: str | os.PathLike,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    emulate: list[str] | None = None,
    progress: bool = True,
) -> CaptureResult:
    """Run every op on ``device`` in ``dtype`` and write the outputs as a capture at ``path``."""
    from tqdm.auto import tqdm

    outputs.check_outputs([], [path])
    started = time.perf_counter()
    torch_device, torch_dtype = devices.resolve_device(device), resolve_dtype(dtype)
    ops = build(seed)
    identity = fingerprint(ops)
    marker = Inputs(
        np.zeros((1, 1), dtype=np.int64),
        np.ones((1, 1), dtype=np.int64),
        source=f"probe-ops:seed={seed}",
    )
    meta = devices.describe(torch_device)
    meta.update(
        hwdiff_version=__version__,
        dtype=dtype_name(torch_dtype),
        model_spec="probe-ops",
        model_fingerprint=identity,
        model_seed=seed,
        batch_size=1,
        attn_implementation="none",
        inputs_fingerprint=identity,
    )  # the op inputs are defined by the probe, not by token ids
    container = torch.nn.ModuleDict({name.replace(".", "_"): module for name, module, _ in ops})
    container.to(device=torch_device, dtype=torch_dtype)
    with emulation(container, emulate) as profiles:
        meta["emulate"] = describe(profiles)
        writer = CaptureWriter(path, meta=meta, inputs=marker, mode="full")
        try:
            with torch.inference_mode():
                for order, (name, module, values) in enumerate(
                    tqdm(
                        ops, desc=f"probe-ops on {torch_device}", disable=not progress, leave=False
                    )
                ):
                    _run_op(writer, order, name, module, values, torch_device, torch_dtype)
            devices.synchronize(torch_device)
            final = writer.finish({"capture_seconds": time.perf_counter() - started})
        except BaseException:
            writer.abort()
            raise
    return CaptureResult(
        final,
        len(ops),
        1,
        1,
        final.stat().st_size,
        time.perf_counter() - started,
        tuple(writer.nonfinite),
    )


def _run_op(
    writer: CaptureWriter,
    order: int,
    name: str,
    module: torch.nn.Module,
    values: np.ndarray,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    x = torch.from_numpy(values).to(device)
    if isinstance(module, Cast):
        module.target = dtype
        x = x.float()
    else:
        x = x.to(dtype)
    output = module(x).unsqueeze(0)  # a leading "batch" axis of 1, as every capture slot has
    writer.put(
        Register(
            name,
            "op",
            type(module).__name__ if not isinstance(module, Lambda) else module.label,
            order,
        )
    )
    writer.put(slot_record(name, 0, "output", 0, output))
