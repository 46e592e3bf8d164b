"""Per-slot summary statistics for ``stats`` captures, reduced where the tensor lives.

A batch is reduced to a 9-vector of *parts* (count, sum, sum of squares, sum of |x|, min, max, NaN
count, Inf count, and 0 spare) on its own device, so an accelerator sends 72 bytes instead of the
activation. Parts accumulate in float64 (float32 on devices without a fast float64, i.e. Ascend:
the root attribute ``stats_accumulation`` of a stats capture records which) and merge across
batches in float64 on the host. Sums, min and max cover the finite values only; NaN and Inf are
counted. ``std`` is derived as
sqrt(E[x²] − E[x]²), exact enough in float64 for activations whose mean is not 1e8 times their spread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..common import jit

if (
    TYPE_CHECKING
):  # torch is imported where a tensor is reduced, so readers of captures never load it
    import torch

FIELDS = (
    "count",
    "mean",
    "std",
    "rms",
    "min",
    "max",
    "abs_mean",
    "abs_max",
    "nan_count",
    "inf_count",
)
DTYPE = np.dtype([(field, "<f8") for field in FIELDS])
_FLOAT64_DEVICES = ("cpu", "cuda")


def accumulation_dtype(device: "torch.device") -> "torch.dtype":
    """float64 where the device has a fast one, float32 elsewhere (Ascend)."""
    import torch

    return torch.float64 if device.type in _FLOAT64_DEVICES else torch.float32


def partial_stats(tensor: "torch.Tensor") -> "torch.Tensor":
    """The parts vector of one tensor, computed on its device without a host synchronization."""
    import torch

    x = tensor.detach()
    if x.device.type == "cpu" and x.is_floating_point() and jit.available():
        return _compiled_parts(x)
    if not x.is_floating_point():
        x = x.to(torch.float64 if x.device.type in _FLOAT64_DEVICES else torch.float32)
    acc = accumulation_dtype(x.device)
    # Any, not Optional: torch is untyped here, and an Optional would not narrow when assigned below
    low: Any = None
    high: Any = None
    if x.device.type == "cpu" and x.numel():
        low, high = torch.aminmax(x)  # NaN propagates: both finite means neither NaN nor Inf
    if low is not None and bool(torch.isfinite(low) & torch.isfinite(high)):
        finite, nan, inf = x, x.new_zeros((), dtype=acc), x.new_zeros((), dtype=acc)
    else:
        is_finite = torch.isfinite(x)
        finite = torch.where(is_finite, x, 0)
        low = torch.where(is_finite, x, float("inf")).amin()
        high = torch.where(is_finite, x, float("-inf")).amax()
        nan = torch.isnan(x).sum().to(acc)
        inf = (x.numel() - is_finite.sum()).to(acc) - nan
    count = x.numel() - nan - inf
    parts = [
        count,
        finite.sum(dtype=acc),
        torch.linalg.vector_norm(finite, 2, dtype=acc) ** 2,
        torch.linalg.vector_norm(finite, 1, dtype=acc),
        low.to(acc),
        high.to(acc),
        nan,
        inf,
        x.new_zeros((), dtype=acc),
    ]
    return torch.stack([part.to(acc).reshape(()) for part in parts])


def _compiled_parts(x: "torch.Tensor") -> "torch.Tensor":
    """The parts vector of a CPU float tensor in one compiled pass (:mod:`hwdiff.common.jit`), float64."""
    import torch

    if x.dtype == torch.bfloat16:  # its bit patterns: the kernel widens them as it reads
        values = x.contiguous().view(-1).view(torch.int16).numpy().view(np.uint16)
    else:
        values = (
            (x if x.dtype in (torch.float32, torch.float64) else x.float())
            .contiguous()
            .view(-1)
            .numpy()
        )
    partial = np.zeros((jit.chunks(values.size), 8))
    compiled = jit.kernels()
    assert compiled is not None  # the caller checked jit.available()
    (compiled.stats_parts if len(partial) > 1 else compiled.stats_parts_serial)(values, partial)
    count, total, squares, absolute = partial[:, :4].sum(axis=0)
    nan, inf = partial[:, 6:].sum(axis=0)
    parts = [
        count,
        total,
        squares,
        absolute,
        partial[:, 4].min(),
        partial[:, 5].max(),
        nan,
        inf,
        0.0,
    ]
    return torch.tensor(parts, dtype=torch.float64)


class RunningStats:
    """Merges parts vectors of successive batches (float64, on the host)."""

    def __init__(self) -> None:
        self.parts = np.array([0, 0, 0, 0, np.inf, -np.inf, 0, 0, 0], dtype=np.float64)

    def add(self, parts: np.ndarray) -> None:
        parts = parts.astype(np.float64)
        self.parts[[0, 1, 2, 3, 6, 7]] += parts[[0, 1, 2, 3, 6, 7]]
        self.parts[4] = min(self.parts[4], parts[4]) if parts[0] else self.parts[4]
        self.parts[5] = max(self.parts[5], parts[5]) if parts[0] else self.parts[5]

    @property
    def nonfinite(self) -> bool:
        return bool(self.parts[6] or self.parts[7])

    def record(self) -> np.ndarray:
        """The stored float64 record (:data:`FIELDS`)."""
        count, total, squares, abs_total, low, high, nan, inf, _ = self.parts
        n = max(count, 1.0)
        mean = total / n
        row = (
            count,
            mean,
            max(squares / n - mean * mean, 0.0) ** 0.5,
            (squares / n) ** 0.5,
            low,
            high,
            abs_total / n,
            max(abs(low), abs(high)) if count else 0.0,
            nan,
            inf,
        )
        return np.array(row, dtype=DTYPE)
