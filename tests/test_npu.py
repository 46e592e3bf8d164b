"""The Ascend path (``--device npu``) on the npu stand-in (tests/npu_standin.py, docs/npu-standin.md).

Registering a PrivateUse1 device cannot be undone in a process, so every scenario runs in one
worker process of its own (spawned, module-scoped); this process never imports the stand-in. Each
scenario installs the stand-in for its own ``with`` block and the worker checks, after each one,
that the stand-in left nothing behind. Expected values come from plain forward hooks, numpy and
the stand-in's own facts, never from another hwdiff capture alone.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import runpy
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.npu

ROOT = Path(__file__).resolve().parents[1]
TRACE_ENV = "HWDIFF_NPU_TRACE"  # set by tests/ascend_coverage.py: a JSON file of executed lines
SMALL = dict(limit=6, max_tokens=24, batch_size=4, progress=False)


# -- the worker ------------------------------------------------------------------------------------
def _worker_init() -> None:
    from tests import npu_standin

    if os.environ.get(TRACE_ENV):
        _start_trace()
    # As on an Ascend machine, transformers sees torch_npu when it is first imported.
    with npu_standin.installed():
        import transformers.models.qwen2.modeling_qwen2  # noqa: F401

        import hwdiff  # noqa: F401


def _run(scenario, *args):
    from tests import npu_standin

    try:
        return scenario(*args)
    finally:
        _dump_trace()
        leftovers = [
            name for name in ("torch_npu", "torch_npu.npu", "torch.npu") if name in sys.modules
        ]
        leftovers += ["torch.npu"] if "npu" in vars(torch) else []
        leftovers += ["torch.empty"] if torch.empty is not npu_standin.ORIGINAL_EMPTY else []
        leftovers += ["torch.version.cann"] if hasattr(torch.version, "cann") else []
        assert not leftovers, f"the stand-in left state behind: {leftovers}"


@pytest.fixture(scope="module")
def npu():
    """``npu(scenario, *args)`` runs ``scenario`` in the stand-in's worker process."""
    saved = os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD")
    os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = (
        "0"  # a real torch_npu must not load itself into the worker
    )
    try:
        with ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
        ) as pool:
            pool.submit(int).result(timeout=600)  # start the worker now, in this environment
            yield lambda scenario, *args: pool.submit(_run, scenario, *args).result(timeout=600)
    finally:
        if saved is None:
            del os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"]
        else:
            os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = saved


_LINES: set = set()


def _start_trace() -> None:
    import threading

    watched = {
        str(ROOT / "hwdiff" / name)
        for name in ("ascend.py", "devices.py", "hooks.py", "store/stats.py")
    }

    def local(frame, event, arg):
        if event == "line":
            _LINES.add((frame.f_code.co_filename, frame.f_lineno))
        return local

    def tracer(frame, event, arg):
        if frame.f_code.co_filename in watched:
            _LINES.add((frame.f_code.co_filename, frame.f_lineno))
            return local
        return None

    sys.settrace(tracer)
    threading.settrace(tracer)


def _dump_trace() -> None:
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    old = json.loads(Path(path).read_text()) if Path(path).exists() else []
    merged = sorted({tuple(item) for item in old} | _LINES)
    Path(path).write_text(json.dumps(merged))


# -- scenarios (run in the worker) -----------------------------------------------------------------
def _import_and_resolve():
    from hwdiff.capturing import ascend
    from hwdiff.capturing.devices import device_module, resolve_device, synchronize
    from hwdiff.errors import DeviceError
    from tests import npu_standin

    assert not ascend.is_installed()
    with npu_standin.installed():
        assert ascend.is_installed()
        module = ascend.import_torch_npu()
        assert module.__version__ == npu_standin.TORCH_NPU_VERSION
        assert torch.npu is module.npu  # torch_npu registers itself as torch's npu device module
        device = resolve_device("npu")
        assert device == torch.device("npu", 0) == resolve_device("NPU:0")
        assert device_module(device) is torch.npu
        if not torch.cuda.is_available():
            assert resolve_device("auto") == device
        with pytest.raises(DeviceError, match=r"'npu:1' does not exist: this machine has 1 npu"):
            resolve_device("npu:1")
        x = torch.arange(6.0).reshape(2, 3).to(device)
        assert x.device == device and torch.equal(
            (x * 2).sum(0).cpu(), torch.tensor([6.0, 10.0, 14.0])
        )
        synchronize(device)
    assert not ascend.is_installed()


def _describe_records_versions_and_flags():
    from hwdiff.capturing.devices import describe, resolve_device
    from tests import npu_standin

    with npu_standin.installed():
        device = resolve_device("npu:0")
        info = describe(device)
        assert info["device"] == "npu:0" and info["device_name"] == npu_standin.DEVICE_NAME
        assert info["torch_npu_version"] == npu_standin.TORCH_NPU_VERSION
        assert info["cann_version"] == npu_standin.CANN_VERSION
        assert (
            info["npu_matmul_allow_hf32"] is False and info["npu_conv_allow_hf32"] is True
        )  # torch_npu defaults
        assert all(isinstance(value, (bool, int, float, str)) for value in info.values())
        torch.npu.matmul.allow_hf32, torch.npu.conv.allow_hf32 = True, False
        info = describe(device)
        assert info["npu_matmul_allow_hf32"] is True and info["npu_conv_allow_hf32"] is False


def _cann_version_fallbacks():
    from hwdiff.capturing import ascend
    from tests import npu_standin

    def raising(module="CANN"):
        raise RuntimeError("aclsysGetCANNVersion not found")

    cases = [  # (get_cann_version, torch.version.cann, expected)
        (lambda module="CANN": "8.1.RC1", "not known", "8.1.RC1"),
        (lambda module="CANN": "", "8.0.0", "8.0.0"),  # CANN did not say: collect_env's answer
        (raising, "7.0.RC1", "7.0.RC1"),
        (None, "7.0.0", "7.0.0"),  # torch_npu without get_cann_version
        (None, "not known", "unknown"),
        (lambda module="CANN": "", "", "unknown"),
    ]
    for getter, from_collect_env, expected in cases:
        with npu_standin.installed(get_cann_version=getter, torch_version_cann=from_collect_env):
            assert ascend.describe(0)["cann_version"] == expected, (from_collect_env, expected)


def _missing_and_broken_torch_npu(tmp_path):
    from hwdiff import cli
    from hwdiff.capturing import ascend
    from hwdiff.capturing.devices import resolve_device
    from hwdiff.errors import DeviceError
    from tests import npu_standin

    with npu_standin.hidden():
        assert not ascend.is_installed()
        with pytest.raises(
            DeviceError, match=r"needs the torch_npu package, which is not installed: install"
        ):
            resolve_device("npu")
        assert resolve_device("auto").type in ("cpu", "cuda")
        assert cli.main(["probe-ops", "--device", "npu", "-q", "-o", str(tmp_path / "x.h5")]) == 2
        assert not (tmp_path / "x.h5").exists()
    with npu_standin.installed(broken="libhccl.so: cannot open shared object file"):
        assert ascend.is_installed()
        with pytest.raises(
            DeviceError, match=r"installed but failed to import \(libhccl.so: .*\); install"
        ):
            ascend.import_torch_npu()


def _plain_hooks(model, cap, slot="output", positions=None):
    """What plain forward hooks see for the capture's inputs, moved to the host by ``.cpu()``."""
    from hwdiff.capturing.hooks import select_modules

    seen = {}

    def hook(name):
        def fn(module, args, kwargs, output):
            tensor = output if isinstance(output, torch.Tensor) else output[0]
            if slot == "input":
                tensor = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(name, []).append(tensor.detach().cpu())

        return fn

    device = next(model.parameters()).device
    handles = [
        m.register_forward_hook(hook(n), with_kwargs=True) for n, m, _ in select_modules(model)
    ]
    try:
        ids, mask = (torch.from_numpy(a).to(device) for a in (cap.input_ids, cap.attention_mask))
        with torch.inference_mode():
            for start in range(0, len(ids), SMALL["batch_size"]):
                model(input_ids=ids[start : start + 4], attention_mask=mask[start : start + 4])
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts).float().numpy() for name, parts in seen.items()}


def _full_capture_equals_plain_hooks(tmp_path):
    import hwdiff
    from tests import npu_standin

    with npu_standin.installed():
        import torch_npu

        torch_npu.npu.matmul.allow_hf32 = True
        model = hwdiff.load_model("tiny-qwen2", device="npu", dtype="bfloat16")
        assert next(model.parameters()).device.type == "npu"
        before = dict(npu_standin.COUNTS)
        path = hwdiff.capture(model, tmp_path / "npu.h5", record_inputs=True, **SMALL).path
        counts = {key: npu_standin.COUNTS[key] - before[key] for key in before}
        with hwdiff.open_capture(path) as cap:
            assert (
                cap.meta["device"] == "npu:0" and cap.meta["device_name"] == npu_standin.DEVICE_NAME
            )
            assert (
                cap.meta["cann_version"] == npu_standin.CANN_VERSION
                and cap.meta["npu_matmul_allow_hf32"]
            )
            assert cap.meta["dtype"] == "bfloat16"
            outputs, inputs = _plain_hooks(model, cap), _plain_hooks(model, cap, slot="input")
            assert set(cap.modules) == set(outputs)
            for name in cap.modules:
                assert np.array_equal(cap.activation(name), outputs[name]), name
                assert np.array_equal(cap.activation(name, slot="input"), inputs[name]), name
    # Every slot left the device through an async copy into a pinned buffer, waited for by its event.
    assert counts["async_copies"] == counts["pinned_buffers"] > 0
    assert counts["events_synchronized"] >= counts["events_recorded"] > 0


def _stats_mode_on_the_device(tmp_path):
    import hwdiff
    from tests import npu_standin

    with npu_standin.installed():
        model = hwdiff.load_model("tiny-qwen2", device="npu", dtype="float32")
        before = dict(npu_standin.COUNTS)
        path = hwdiff.capture(
            model, tmp_path / "stats.h5", mode="stats", logprobs=False, **SMALL
        ).path
        counts = {key: npu_standin.COUNTS[key] - before[key] for key in before}
        # every slot's statistics leave the device together: one async copy per forward (6 rows in 4s: 2)
        assert counts["async_copies"] == counts["pinned_buffers"] == 2, counts
        with hwdiff.open_capture(path) as cap:
            assert cap.meta["device"] == "npu:0" and cap.mode == "stats"
            assert cap.meta["stats_accumulation"] == "float32"
            expected = _plain_hooks(model, cap)
            for name in (name for name, info in cap.modules.items() if info.alias_of is None):
                values, got = expected[name].astype(np.float64), cap.stats(name)
                assert got["count"] == values.size and got["nan_count"] == got["inf_count"] == 0, (
                    name
                )
                # Ascend accumulates in float32 (no fast float64): float32-sum agreement, not float64's
                assert got["mean"] == pytest.approx(
                    values.mean(), abs=1e-6 * np.abs(values).max()
                ), name
                assert got["rms"] == pytest.approx(np.sqrt(np.mean(values**2)), rel=1e-5), name
                assert got["min"] == values.min() and got["abs_max"] == np.abs(values).max(), name
        with torch.no_grad():
            model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
        result = hwdiff.capture(model, tmp_path / "nan.h5", mode="stats", **SMALL)
        assert result.nonfinite_modules[0] == "model.layers.2.mlp.up_proj"
        with hwdiff.open_capture(result.path) as cap:
            up = _plain_hooks(model, cap)["model.layers.2.mlp.up_proj"]
            got = cap.stats("model.layers.2.mlp.up_proj")
            assert (
                got["nan_count"] == np.isnan(up).sum() > 0 and got["count"] == np.isfinite(up).sum()
            )
            assert got["max"] == np.nanmax(up)


def _sample_mode_cli_on_the_device(tmp_path):
    import hwdiff
    from hwdiff import cli
    from tests import npu_standin

    out = tmp_path / "sample.h5"
    with npu_standin.installed():
        assert (
            cli.main(
                [
                    "capture",
                    "--device",
                    "npu",
                    "--dtype",
                    "float32",
                    "--mode",
                    "sample",
                    "--tokens",
                    "5",
                    "--limit",
                    "6",
                    "--max-tokens",
                    "24",
                    "--batch-size",
                    "4",
                    "-q",
                    "-o",
                    str(out),
                ]
            )
            == 0
        )
        model = hwdiff.load_model(
            "tiny-qwen2", device="npu", dtype="float32"
        )  # the same seeded weights
        with hwdiff.open_capture(out) as cap:
            assert cap.meta["device"] == "npu:0" and cap.mode == "sample"
            positions, full = cap.sample_positions, _plain_hooks(model, cap)
            for name in ("model.layers.0.input_layernorm", "model.layers.3", "lm_head"):
                expected = np.take_along_axis(full[name], positions[:, :, None], axis=1)
                assert np.array_equal(cap.activation(name), expected), name


def _replay_cli_on_the_device(tmp_path):
    import hwdiff
    from hwdiff import cli
    from tests import npu_standin

    reference = hwdiff.load_model("tiny-qwen2", dtype="float32")
    ref = hwdiff.capture(reference, tmp_path / "cpu.h5", record_inputs=True, **SMALL).path
    out = tmp_path / "replay.h5"
    with npu_standin.installed():
        assert cli.main(["replay", str(ref), "--device", "npu", "-q", "-o", str(out)]) == 0
    with hwdiff.open_capture(out) as rep, hwdiff.open_capture(ref) as cpu:
        assert rep.meta["device"] == "npu:0" and rep.meta["replay_of_device"] == "cpu"
        replayed = [name for name, info in rep.modules.items() if "output" in info.slots]
        assert len(replayed) == len(cpu.modules)
        # The stand-in's kernels are the CPU's: each module on the CPU run's own inputs gives its outputs.
        for name in replayed:
            assert np.array_equal(rep.activation(name), cpu.activation(name)), name


def _probe_ops_cli_on_the_device(tmp_path):
    import hwdiff
    from hwdiff import cli
    from hwdiff.capturing.probe_ops import build
    from tests import npu_standin

    with npu_standin.installed():
        code = cli.main(
            [
                "probe-ops",
                "--device",
                "npu",
                "--dtype",
                "float32",
                "-q",
                "-o",
                str(tmp_path / "ops.h5"),
            ]
        )
        assert code == 0
    ops = {name: (module, values) for name, module, values in build()}
    with hwdiff.open_capture(tmp_path / "ops.h5") as cap:
        assert cap.meta["device"] == "npu:0" and cap.meta["npu_matmul_allow_hf32"] is False
        assert set(cap.modules) == set(ops)
        for name in ("matmul.K64", "matmul.K16384", "rmsnorm", "softmax", "sum"):
            module, values = ops[name]
            with torch.no_grad():
                exact = module(torch.from_numpy(values)).numpy()  # float64 on the host
            got = cap.activation(name)[0].astype(np.float64)
            assert np.linalg.norm(got - exact) <= 1e-6 * np.linalg.norm(exact), name


def _npu_probe_script_records_hf32_and_determinism(tmp_path):
    import hwdiff
    from hwdiff.capturing.probe import run_probe
    from tests import npu_standin

    script = runpy.run_path(str(ROOT / "probes" / "capture_npu.py"), run_name="probe")
    assert script["SETTINGS"]["device"] == "npu:0"
    script["set_flags"].__globals__.update(
        ALLOW_HF32_MATMUL=True, ALLOW_HF32_CONV=False, DETERMINISTIC=True
    )
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with npu_standin.installed():
            out = tmp_path / "probe.h5"
            code = run_probe(
                script["SETTINGS"],
                script["set_flags"],
                "npu probe",
                ["--limit", "2", "--max-tokens", "8", "--mode", "stats", "--output", str(out)],
            )
            assert code == 0
    finally:
        torch.use_deterministic_algorithms(deterministic)
    with hwdiff.open_capture(out) as cap:
        meta = cap.meta
    assert (
        meta["device"] == "npu:0"
        and meta["npu_matmul_allow_hf32"] is True
        and meta["npu_conv_allow_hf32"] is False
    )
    assert (
        meta["deterministic_algorithms"] is True
        and meta["torch_npu_version"] == npu_standin.TORCH_NPU_VERSION
    )


def _stand_in_models_the_async_hazard():
    from hwdiff.capturing.hooks import to_host
    from tests import npu_standin

    with npu_standin.installed():
        import torch_npu  # noqa: F401

        x = torch.arange(4.0).to("npu")
        (host,), event = to_host(x)
        x.add_(100)  # a later kernel: the copy was ordered before it
        assert torch.isnan(host).all()  # not landed: the event was not waited for
        event.synchronize()
        assert torch.equal(host, torch.arange(4.0))


# -- the tests ---------------------------------------------------------------------------------------
def test_import_registers_the_npu_device_and_resolves_it(npu):
    npu(_import_and_resolve)


def test_describe_records_versions_and_hf32_flags(npu):
    npu(_describe_records_versions_and_flags)


def test_cann_version_falls_back_as_torch_npu_versions_differ(npu):
    npu(_cann_version_fallbacks)


def test_missing_or_broken_torch_npu_is_a_clear_error(npu, tmp_path):
    npu(_missing_and_broken_torch_npu, tmp_path)


def test_full_capture_on_npu_equals_plain_forward_hooks(npu, tmp_path):
    npu(_full_capture_equals_plain_hooks, tmp_path)


def test_stats_mode_reduces_on_the_device(npu, tmp_path):
    npu(_stats_mode_on_the_device, tmp_path)


def test_sample_mode_capture_cli_on_npu(npu, tmp_path):
    npu(_sample_mode_cli_on_the_device, tmp_path)


def test_replay_cli_on_npu_reproduces_the_reference_modules(npu, tmp_path):
    npu(_replay_cli_on_the_device, tmp_path)


def test_probe_ops_cli_on_npu(npu, tmp_path):
    npu(_probe_ops_cli_on_the_device, tmp_path)


def test_npu_probe_script_records_hf32_and_determinism(npu, tmp_path):
    npu(_npu_probe_script_records_hf32_and_determinism, tmp_path)


def test_the_stand_in_shows_a_copy_read_before_its_event(npu):
    npu(_stand_in_models_the_async_hazard)


def test_this_process_never_sees_the_stand_in():
    assert "tests.npu_standin" not in sys.modules
    assert not getattr(sys.modules.get("torch_npu"), "STANDIN", False)
    if "torch_npu" not in sys.modules:  # nothing renamed torch's PrivateUse1 backend here
        assert torch._C._get_privateuse1_backend_name() == "privateuseone"
