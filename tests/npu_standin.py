"""A stand-in Ascend NPU for tests: an importable fake ``torch_npu`` whose ``npu`` device holds real
tensors, backed by the CPU, so hwdiff's NPU code path runs in CI without the hardware.

What is real: ``import torch_npu`` registers the ``npu`` device the way torch_npu does
(``torch.utils.rename_privateuse1_backend("npu")``, ``generate_methods_for_privateuse1_backend``,
``torch._register_device_module("npu", torch_npu.npu)``, PrivateUse1 hooks and device guard), so
``torch.device("npu:0")``, ``model.to("npu:0")``, ``tensor.device.type == "npu"`` and ``torch.npu``
are torch's own mechanisms. Tensors on ``npu:0`` are :class:`NpuTensor`\\ s: wrapper tensors whose
device is ``npu:0``; every aten op on them runs on the CPU tensor they wrap (``__torch_dispatch__``)
and its result is wrapped again. Factories with ``device="npu"`` reach PrivateUse1 kernels
registered with :mod:`torch.library`.

What is modelled: the single default stream. A non-blocking copy from the device into a pinned
host buffer does not land until an event recorded after it is synchronized (or the device is),
and pinned buffers start filled with NaN (integers: their maximum), so reading a copy before its
event completes reads garbage, as on the hardware. Kernels themselves run eagerly.

What is imitated from torch_npu's Python API (read from Ascend/pytorch): ``torch_npu.__version__``,
``torch_npu.npu.{is_available, device_count, current_device, set_device, synchronize,
get_device_name, Event, Stream, current_stream, get_cann_version}``, ``torch.npu.matmul.allow_hf32``
(default off) and ``torch.npu.conv.allow_hf32`` (default on) stored as ``torch_npu._C`` options as
torch_npu stores them, and ``torch.version.cann`` (set by torch_npu's ``collect_env`` at import).

What it cannot prove: Ascend kernels and CANN numerics (every result is the CPU's), HCCL, real
concurrency between streams and the host, pinned-memory allocation (PyTorch's Python backend cannot
provide a pinned allocator: ``torch.empty(..., pin_memory=True)`` is served by this module while it
is installed), more than one device. See docs/npu-standin.md.

:func:`installed` installs it for a ``with`` block and removes every trace it can on exit; the
PrivateUse1 name, hooks and guard cannot be unregistered in a process, so tests use it in a
dedicated worker process (tests/test_npu.py).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
import weakref
from typing import Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_map

DEVICE_NAME = "Ascend910B3 (hwdiff stand-in)"
TORCH_NPU_VERSION = "2.13.0+standin"
CANN_VERSION = "8.2.RC1"
NPU = "npu"
_MODULES = ("torch_npu", "torch_npu.npu", "torch_npu.version", "torch_npu._C")
ORIGINAL_EMPTY = torch.empty


class NpuTensor(torch.Tensor):
    """A tensor on ``npu:0`` that wraps a CPU tensor (``raw``) and runs every op on it."""

    raw: torch.Tensor
    __torch_function__ = (
        torch._C._disabled_torch_function_impl
    )  # results keep their own type (.cpu() is CPU)

    @staticmethod
    def __new__(cls, raw: torch.Tensor) -> "NpuTensor":
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            raw.shape,
            strides=raw.stride(),
            storage_offset=raw.storage_offset(),
            dtype=raw.dtype,
            device=torch.device(NPU, 0),
            requires_grad=raw.requires_grad,
        )
        wrapper.raw = raw
        return wrapper

    def __repr__(self) -> str:  # never through the dispatcher
        return f"NpuTensor({self.raw!r})"

    @classmethod
    def __torch_dispatch__(
        cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default and not isinstance(args[0], NpuTensor):
            return _device_to_host(
                args[0],
                args[1],
                bool(args[2]) if len(args) > 2 else kwargs.get("non_blocking", False),
            )
        if any(isinstance(v, torch.device) and v.type == "cpu" for v in (*args, *kwargs.values())):
            STREAM.synchronize()  # to("cpu") and kin: a blocking copy to the host waits for the stream
            return func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        tensors = [a for a in _flat_tensors(args, kwargs) if isinstance(a, NpuTensor)]
        inputs = {id(a.raw): a for a in tensors}
        # As torch does: in inference mode a view of a normal tensor is a normal tensor.
        normal_view = func.is_view and tensors and not tensors[0].is_inference()
        with torch.inference_mode(False) if normal_view else contextlib.nullcontext():
            return tree_map(lambda value: _rewrap(value, inputs, func), out)


def _unwrap(value: Any) -> Any:
    if isinstance(value, NpuTensor):
        return value.raw
    if isinstance(value, torch.device) and value.type == NPU:
        return torch.device("cpu")
    return value


def _flat_tensors(args: tuple, kwargs: dict) -> list:
    found: list = []
    tree_map(lambda v: found.append(v) if isinstance(v, torch.Tensor) else None, (args, kwargs))
    return found


def _rewrap(value: Any, inputs: dict, func: Any) -> Any:
    if not isinstance(value, torch.Tensor) or isinstance(value, NpuTensor):
        return value
    same = inputs.get(id(value))
    if same is None:
        return NpuTensor(value)
    if (
        same.shape != value.shape or same.stride() != value.stride()
    ):  # out= / in-place resize: cannot follow
        raise RuntimeError(
            f"npu stand-in: {func} changed the shape of an npu tensor in place; register "
            "a PrivateUse1 kernel for it in tests/npu_standin.py"
        )
    return same


class _Stream:
    """The default stream's device-to-host copies, in order; kernels themselves run eagerly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.submitted = 0  # copies ever enqueued
        self.completed = 0

    def enqueue(self, host: torch.Tensor, value: torch.Tensor) -> None:
        with self._lock:
            self._pending.append((host, value))
            self.submitted += 1

    def complete(self, upto: int) -> None:
        """Land every copy enqueued before the ``upto``-th."""
        with (
            self._lock,
            torch.inference_mode(),
        ):  # the device writes the buffer: no autograd rules apply
            while self.completed < upto:
                host, value = self._pending.pop(0)
                host.copy_(value)
                self.completed += 1

    def synchronize(self) -> None:
        self.complete(self.submitted)


STREAM = _Stream()
_PINNED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
COUNTS = {"pinned_buffers": 0, "async_copies": 0, "events_recorded": 0, "events_synchronized": 0}


def _device_to_host(host: torch.Tensor, source: "NpuTensor", non_blocking: bool) -> torch.Tensor:
    if non_blocking and _PINNED.get(id(host)) is host:
        # The copy reads the source in stream order (now) and lands when the stream gets there.
        STREAM.enqueue(host, source.raw.clone())
        COUNTS["async_copies"] += 1
        return host
    STREAM.synchronize()  # pageable or blocking: the host waits
    return host.copy_(source.raw)


def _pinned_empty(original: Callable) -> Callable:
    def empty(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        tensor = original(*args, **kwargs)
        if pin_memory:
            tensor.fill_(
                float("nan")
                if tensor.is_floating_point()
                else (True if tensor.dtype == torch.bool else torch.iinfo(tensor.dtype).max)
            )
            _PINNED[id(tensor)] = tensor
            COUNTS["pinned_buffers"] += 1
        return tensor

    return empty


class Event:
    """torch_npu.npu.Event: ``record`` marks the stream's position, ``synchronize`` waits for it."""

    def __init__(
        self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False
    ) -> None:
        self._mark: int | None = None

    def record(self, stream: Any = None) -> None:
        self._mark = STREAM.submitted
        COUNTS["events_recorded"] += 1

    def synchronize(self) -> None:
        if self._mark is not None:  # like torch_npu: an event never recorded completes at once
            STREAM.complete(self._mark)
        COUNTS["events_synchronized"] += 1

    def query(self) -> bool:
        return self._mark is None or STREAM.completed >= self._mark

    def wait(self, stream: Any = None) -> None:
        """Kernels run eagerly, so a device-side wait has nothing to order."""


class Stream:
    """torch_npu.npu.Stream: the one stream of the stand-in."""

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        self.device = torch.device(NPU, 0)

    def synchronize(self) -> None:
        STREAM.synchronize()

    def record_event(self, event: Event | None = None) -> Event:
        event = event or Event()
        event.record(self)
        return event

    def wait_stream(self, stream: "Stream") -> None:
        pass

    def wait_event(self, event: Event) -> None:
        pass


class _Options:
    """torch_npu._C's option store: ``_npu_setOption(dict)`` / ``_npu_getOption(name) -> bytes | None``."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def set(self, option: dict) -> None:
        self.values.update({key: str(value).encode() for key, value in option.items()})

    def get(self, name: str) -> bytes | None:
        return self.values.get(name)


OPTIONS = _Options()


class _AllowHF32Matmul:
    """As torch_npu.npu.npu_config._allowHF32Matmul: an option, off unless set to "enable"."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "allow_hf32":
            OPTIONS.set({"ALLOW_MATMUL_HF32": "enable" if value else "disable"})

    def __getattr__(self, name: str) -> Any:
        if name == "allow_hf32":
            value = OPTIONS.get("ALLOW_MATMUL_HF32")
            return value is not None and value.decode() == "enable"
        raise AttributeError(name)


class _AllowHF32Conv:
    """As torch_npu.npu.npu_config._allowHF32Conv: on unless set to "disable"."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "allow_hf32":
            OPTIONS.set({"ALLOW_CONV_HF32": "enable" if value else "disable"})

    def __getattr__(self, name: str) -> Any:
        if name == "allow_hf32":
            value = OPTIONS.get("ALLOW_CONV_HF32")
            return value is None or value.decode() in ("", "enable")
        raise AttributeError(name)


def _device_index(device: Any) -> int:
    if device is None:
        return 0
    if isinstance(device, int):
        return device
    return torch.device(device).index or 0


def _check_index(device: Any) -> int:
    index = _device_index(device)
    if not 0 <= index < 1:
        raise AssertionError(f"Invalid device id {index}: the stand-in has one npu")
    return index


def _npu_module(behaviour: dict) -> types.ModuleType:
    """``torch_npu.npu`` (also ``torch.npu`` once imported)."""
    npu = types.ModuleType("torch_npu.npu")
    npu.is_available = lambda: True
    npu.device_count = lambda: 1
    npu.current_device = lambda: 0
    npu.set_device = _check_index
    npu.is_initialized = lambda: True
    npu._lazy_init = lambda: None
    npu._is_in_bad_fork = lambda: False
    npu.is_bf16_supported = lambda: True
    npu.manual_seed = npu.manual_seed_all = lambda seed: None
    npu.synchronize = lambda device=None: (_check_index(device), STREAM.synchronize())[1]
    npu.get_device_name = lambda device_name=None: (_check_index(device_name), DEVICE_NAME)[1]
    npu.Event, npu.Stream = Event, Stream
    npu.current_stream = npu.default_stream = lambda device=None: Stream(device)
    npu.matmul, npu.conv = _AllowHF32Matmul(), _AllowHF32Conv()
    if behaviour["get_cann_version"] is not None:  # torch_npu before 2025 has no such function
        npu.get_cann_version = behaviour["get_cann_version"]
    return npu


def _torch_npu_module(behaviour: dict) -> types.ModuleType:
    package = types.ModuleType("torch_npu")
    package.__path__ = []  # a package, so "torch_npu.npu" imports
    package.__version__ = TORCH_NPU_VERSION
    package.STANDIN = True
    version = types.ModuleType("torch_npu.version")
    version.__version__, version.git_version = TORCH_NPU_VERSION, "0" * 40
    c_ext = types.ModuleType("torch_npu._C")
    c_ext._npu_setOption, c_ext._npu_getOption = OPTIONS.set, OPTIONS.get
    package.version, package._C = version, c_ext
    package.npu = _npu_module(behaviour)
    package.npu_fusion_attention = _no_kernel(
        "npu_fusion_attention"
    )  # transformers imports it on Ascend
    return package


def _no_kernel(name: str) -> Callable:
    def kernel(*_: Any, **__: Any) -> Any:
        raise NotImplementedError(f"torch_npu.{name}: the npu stand-in has no Ascend kernels")

    return kernel


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return True

    def has_primary_context(self, device_index: int) -> bool:
        return True

    def is_built(self) -> bool:
        return True


class _Guard(torch._C._acc.DeviceGuard):
    def type_(self) -> Any:
        return torch._C._autograd.DeviceType.PrivateUse1


_PROCESS_WIDE = False


def _register_privateuse1() -> None:
    """What torch_npu does at import and no process can undo: name, methods, hooks, guard."""
    global _PROCESS_WIDE
    if _PROCESS_WIDE:
        return
    torch.utils.rename_privateuse1_backend(NPU)
    torch.utils.generate_methods_for_privateuse1_backend(
        for_tensor=True, for_module=True, for_storage=False
    )
    torch._C._acc.register_python_privateuseone_hook(_Hooks())
    torch._C._acc.register_python_privateuseone_device_guard(_Guard())
    _PROCESS_WIDE = True


def _factory(op: Any) -> Callable:
    """A PrivateUse1 kernel for a factory: build on the CPU, wrap."""

    def kernel(*args: Any, **kwargs: Any) -> NpuTensor:
        kwargs = {**kwargs, "device": torch.device("cpu")}
        kwargs.pop("pin_memory", None)
        return NpuTensor(op(*args, **kwargs))

    return kernel


_FACTORIES = (
    "empty.memory_format",
    "empty_strided",
    "arange",
    "arange.start",
    "arange.start_step",
    "scalar_tensor",
    "linspace",
)


def _kernels() -> torch.library.Library:
    library = torch.library.Library("aten", "IMPL")
    for name in _FACTORIES:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet), overload or "default")
        library.impl(name, _factory(op), "PrivateUse1")
    return library


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``import torch_npu``; importing registers the device as torch_npu does."""

    def __init__(self, state: "_State") -> None:
        self.state = state

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name in _MODULES:
            return importlib.machinery.ModuleSpec(name, self, is_package=name == "torch_npu")
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        if self.state.broken is not None:
            raise ImportError(self.state.broken)
        package = self.state.package()
        if spec.name == "torch_npu":
            return package
        return {
            "torch_npu.npu": package.npu,
            "torch_npu.version": package.version,
            "torch_npu._C": package._C,
        }[spec.name]

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ == "torch_npu":
            for name, sub in (("npu", module.npu), ("version", module.version), ("_C", module._C)):
                sys.modules[f"torch_npu.{name}"] = sub
            self.state.register(module)


class _State:
    """One installation: what it registered, so that :meth:`remove` can undo it."""

    def __init__(self, behaviour: dict, broken: str | None) -> None:
        self.behaviour, self.broken = behaviour, broken
        self.finder = _Finder(self)
        self._package: types.ModuleType | None = None
        self.library: torch.library.Library | None = None
        self.had_cann = hasattr(torch.version, "cann")

    def package(self) -> types.ModuleType:
        if self._package is None:
            self._package = _torch_npu_module(self.behaviour)
        return self._package

    def register(self, package: types.ModuleType) -> None:
        _register_privateuse1()
        torch._register_device_module(NPU, package.npu)
        self.library = _kernels()
        torch.empty = _pinned_empty(ORIGINAL_EMPTY)
        torch.version.cann = self.behaviour["torch_version_cann"]

    def remove(self) -> None:
        STREAM.synchronize()
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        for name in (*_MODULES, "torch.npu"):
            sys.modules.pop(name, None)
        if "npu" in vars(torch):
            delattr(torch, "npu")
        if self.library is not None:
            self.library._destroy()
        torch.empty = ORIGINAL_EMPTY
        if not self.had_cann and hasattr(torch.version, "cann"):
            del torch.version.cann


def _default_cann(module: str = "CANN") -> str:
    return CANN_VERSION if module == "CANN" else ""


@contextlib.contextmanager
def installed(
    *,
    get_cann_version: Callable[..., str] | None = _default_cann,
    torch_version_cann: str = "not known",
    broken: str | None = None,
) -> Iterator[None]:
    """Make ``import torch_npu`` find the stand-in for the ``with`` block (``broken``: its import
    raises ImportError with that message, as a torch_npu without CANN libraries does).
    ``get_cann_version`` (None: absent, as in older torch_npu) and ``torch_version_cann`` replace
    the CANN facts torch_npu reports."""
    for name in _MODULES:
        if name in sys.modules:
            raise RuntimeError(f"{name} is already imported: the stand-in would not be what runs")
    options = dict(OPTIONS.values)
    state = _State(
        {"get_cann_version": get_cann_version, "torch_version_cann": torch_version_cann}, broken
    )
    sys.meta_path.insert(0, state.finder)
    try:
        yield
    finally:
        state.remove()
        OPTIONS.values = options


@contextlib.contextmanager
def hidden() -> Iterator[None]:
    """Make torch_npu unimportable for the ``with`` block, even where it is installed."""
    saved = {name: sys.modules.pop(name) for name in _MODULES if name in sys.modules}
    sys.modules["torch_npu"] = None  # type: ignore[assignment]  # find_spec gives None, import raises
    try:
        yield
    finally:
        del sys.modules["torch_npu"]
        sys.modules.update(saved)
