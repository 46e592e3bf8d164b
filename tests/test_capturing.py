import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

import hwdiff
from hwdiff.capturing import sample_positions
from hwdiff.capturing.hooks import select_modules
from hwdiff.errors import CaptureFormatError, HwdiffError
from hwdiff.store import STATS_FIELDS

from .conftest import ROOT, L

SMALL = dict(limit=6, max_tokens=24, batch_size=4, progress=False)


def _plain_hook_outputs_on(model, cap, device):
    return _plain_hook_outputs(model, cap, SMALL["batch_size"], device=device)


def _plain_hook_outputs(model, cap, batch_size, slot="output", device="cpu"):
    """What plain forward hooks return for the capture's stored inputs, concatenated over batches."""
    seen = {}

    def hook(name):
        def fn(module, args, kwargs, output):
            tensor = output if isinstance(output, torch.Tensor) else output[0]
            if slot == "input":
                tensor = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(name, []).append(tensor.detach().clone())

        return fn

    handles = [
        m.register_forward_hook(hook(n), with_kwargs=True) for n, m, _ in select_modules(model)
    ]
    try:
        ids = torch.from_numpy(cap.input_ids).to(device)
        mask = torch.from_numpy(cap.attention_mask).to(device)
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                model(
                    input_ids=ids[start : start + batch_size],
                    attention_mask=mask[start : start + batch_size],
                )
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts).float().cpu().numpy() for name, parts in seen.items()}


@pytest.mark.parametrize("fixture", ["tiny_fp32", "tiny_bf16"])
def test_every_stored_activation_equals_a_plain_forward_hook(request, tmp_path, fixture):
    model = request.getfixturevalue(fixture)
    path = hwdiff.capture(model, tmp_path / "c.h5", record_inputs=True, **SMALL).path
    with hwdiff.open_capture(path) as cap:
        expected_out = _plain_hook_outputs(model, cap, SMALL["batch_size"])
        expected_in = _plain_hook_outputs(model, cap, SMALL["batch_size"], slot="input")
        assert set(cap.modules) == set(expected_out)
        for name in cap.modules:
            stored = cap.activation(name)
            assert stored.dtype == np.float32
            assert np.array_equal(stored.view(np.uint32), expected_out[name].view(np.uint32)), name
            if name != "model.embed_tokens":
                assert np.array_equal(cap.activation(name, slot="input"), expected_in[name]), name


def test_two_bf16_captures_are_bit_identical_and_share_fingerprints_with_fp32(
    tmp_path, tiny_bf16, tiny_fp32
):
    paths = [hwdiff.capture(tiny_bf16, tmp_path / f"bf16-{i}.h5", **SMALL).path for i in range(2)]
    fp32 = hwdiff.capture(tiny_fp32, tmp_path / "fp32.h5", **SMALL).path
    with (
        hwdiff.open_capture(paths[0]) as a,
        hwdiff.open_capture(paths[1]) as b,
        hwdiff.open_capture(fp32) as c,
    ):
        assert a.meta["dtype"] == "bfloat16" and c.meta["dtype"] == "float32"
        assert (
            a.meta["model_fingerprint"]
            == b.meta["model_fingerprint"]
            == c.meta["model_fingerprint"]
        )
        assert (
            a.meta["inputs_fingerprint"]
            == b.meta["inputs_fingerprint"]
            == c.meta["inputs_fingerprint"]
        )
        with h5py.File(paths[0]) as ha, h5py.File(paths[1]) as hb:
            for name in a.modules:
                raw_a, raw_b = ha[f"modules/{name}/0/output"], hb[f"modules/{name}/0/output"]
                assert raw_a.dtype == np.uint16 and raw_a.attrs["dtype"] == "bfloat16"
                assert np.array_equal(raw_a[...], raw_b[...]), name


def test_capture_lists_2l_plus_1_norms_with_their_weights(tmp_path, tiny_bf16):
    path = hwdiff.capture(tiny_bf16, tmp_path / "c.h5", kinds="rmsnorm", **SMALL).path
    with hwdiff.open_capture(path) as cap:
        assert len(cap.modules) == 2 * L + 1
        assert all(info.kind == "rmsnorm" and info.has_weight for info in cap.modules.values())
        weight = cap.weight("model.layers.2.post_attention_layernorm")
        assert np.array_equal(
            weight, tiny_bf16.model.layers[2].post_attention_layernorm.weight.float().numpy()
        )


def test_a_tensor_returned_by_two_modules_is_stored_once_as_a_link(tmp_path, tiny_fp32):
    path = hwdiff.capture(tiny_fp32, tmp_path / "c.h5", **SMALL).path
    with h5py.File(path) as handle:
        link = handle["modules/model.layers.0.self_attn/0"].get("output", getlink=True)
        assert isinstance(link, h5py.SoftLink)
        assert link.path == "/modules/model.layers.0.self_attn.o_proj/0/output"
    with hwdiff.open_capture(path) as cap:
        assert cap.modules["model.layers.0.mlp"].alias_of == "model.layers.0.mlp.down_proj/0/output"
        assert np.array_equal(
            cap.activation("model.layers.0.mlp"), cap.activation("model.layers.0.mlp.down_proj")
        )


def test_sample_mode_keeps_the_stored_positions_of_each_sequence(tmp_path, tiny_fp32):
    full = hwdiff.capture(tiny_fp32, tmp_path / "full.h5", **SMALL).path
    sampled = hwdiff.capture(
        tiny_fp32, tmp_path / "s.h5", mode="sample", tokens=5, seed=3, **SMALL
    ).path
    with hwdiff.open_capture(full) as f, hwdiff.open_capture(sampled) as s:
        positions = s.sample_positions
        assert positions.shape == (6, 5)
        assert np.array_equal(positions, sample_positions(f.inputs, 5, 3))
        assert (np.take_along_axis(f.attention_mask, positions, 1) == 1).all()
        rows = np.arange(6)[:, None]
        for name in ("model.embed_tokens", "model.layers.1.mlp.act_fn", "lm_head"):
            assert np.array_equal(s.activation(name), f.activation(name)[rows, positions])


def test_stats_mode_stores_float64_statistics_only(tmp_path, tiny_bf16):
    full = hwdiff.capture(tiny_bf16, tmp_path / "full.h5", **SMALL).path
    stats = hwdiff.capture(tiny_bf16, tmp_path / "st.h5", mode="stats", **SMALL).path
    with hwdiff.open_capture(full) as f, hwdiff.open_capture(stats) as s:
        assert os.path.getsize(stats) < os.path.getsize(full) / 20
        assert s.meta["stats_accumulation"] == "float64" and "stats_accumulation" not in f.meta
        for name in ("model.layers.0.input_layernorm", "lm_head"):
            values = f.activation(name).astype(np.float64)
            got = s.stats(name)
            assert set(got) == set(STATS_FIELDS)
            assert (
                got["count"] == values.size
                and got["max"] == values.max()
                and got["min"] == values.min()
            )
            assert got["mean"] == pytest.approx(values.mean(), rel=1e-12)
            assert got["std"] == pytest.approx(values.std(), rel=1e-9)
        with pytest.raises(HwdiffError, match="statistics, not activations"):
            s.activation("lm_head")


def test_chunked_iteration_reassembles_the_activation(tmp_path, tiny_fp32):
    path = hwdiff.capture(tiny_fp32, tmp_path / "c.h5", **SMALL).path
    with hwdiff.open_capture(path) as cap:
        chunks = list(cap.iter_chunks("model.layers.3", rows=4))
        assert [len(c) for c in chunks] == [4, 2]
        assert np.array_equal(np.concatenate(chunks), cap.activation("model.layers.3"))


def test_nan_activations_are_counted_and_reported(tmp_path):
    model = hwdiff.load_model("tiny-qwen2")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    result = hwdiff.capture(model, tmp_path / "nan.h5", **SMALL)
    assert result.nonfinite_modules[0] == "model.layers.2.mlp.up_proj"
    with hwdiff.open_capture(result.path) as cap:
        # one NaN weight poisons output column 0 at every position: 6 sequences x 24 tokens
        assert cap.nonfinite("model.layers.2.mlp.up_proj") == (6 * 24, 0)
        assert cap.nonfinite("model.layers.1.mlp.up_proj") == (0, 0)


def test_a_failed_capture_keeps_the_existing_file(tmp_path, tiny_fp32):
    target = tmp_path / "keep.h5"
    target.write_bytes(b"previous result")

    class Boom(RuntimeError):
        pass

    def explode(*_):
        raise Boom

    handle = tiny_fp32.model.layers[1].register_forward_hook(explode)
    try:
        with pytest.raises(Boom):
            hwdiff.capture(tiny_fp32, target, **SMALL)
    finally:
        handle.remove()
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.h5"]


def test_a_capture_killed_midway_leaves_nothing_a_reader_accepts(tmp_path):
    target = tmp_path / "killed.h5"
    target.write_bytes(b"previous result")
    script = textwrap.dedent(f"""
        import sys, time, hwdiff
        model = hwdiff.load_model("tiny-qwen2")
        def stall(module, args, output):
            if stall.calls == 1:
                print("stalled", flush=True)
                time.sleep(600)
            stall.calls += 1
        stall.calls = 0
        model.model.layers[3].register_forward_hook(stall)
        hwdiff.capture(model, {str(target)!r}, limit=8, max_tokens=24, batch_size=2, progress=False)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout.readline().strip() == "stalled"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert target.read_bytes() == b"previous result"
    partials = [p for p in tmp_path.iterdir() if p.name != "killed.h5"]
    assert partials, "the killed run should have left its temporary file"
    for partial in partials:
        with pytest.raises(CaptureFormatError):
            hwdiff.open_capture(partial)


def test_unknown_mode_and_bad_options_are_clear_errors(tmp_path, tiny_fp32):
    with pytest.raises(HwdiffError, match="unknown capture mode"):
        hwdiff.capture(tiny_fp32, tmp_path / "x.h5", mode="everything")
    with pytest.raises(HwdiffError, match="batch_size"):
        hwdiff.capture(tiny_fp32, tmp_path / "x.h5", batch_size=0)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_capture_equals_plain_hooks_on_cuda(tmp_path):
    model = hwdiff.load_model("tiny-qwen2", device="cuda", dtype="bfloat16")
    path = hwdiff.capture(model, tmp_path / "c.h5", **SMALL).path
    with hwdiff.open_capture(path) as cap:
        assert cap.meta["device"] == "cuda:0" and cap.meta["cuda_version"]
        expected = _plain_hook_outputs_on(model, cap, "cuda")
        for name in cap.modules:
            assert np.array_equal(cap.activation(name), expected[name]), name


def test_stats_count_nan_and_describe_the_finite_values(tmp_path):
    model = hwdiff.load_model("tiny-qwen2")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    full = hwdiff.capture(model, tmp_path / "full.h5", **SMALL).path
    result = hwdiff.capture(model, tmp_path / "st.h5", mode="stats", **SMALL)
    assert result.nonfinite_modules[0] == "model.layers.2.mlp.up_proj"
    with hwdiff.open_capture(full) as f, hwdiff.open_capture(result.path) as s:
        values = f.activation("model.layers.2.mlp.up_proj").astype(np.float64)
        finite = values[np.isfinite(values)]
        got = s.stats("model.layers.2.mlp.up_proj")
        assert got["nan_count"] == 6 * 24 and got["inf_count"] == 0 and got["count"] == finite.size
        assert got["mean"] == pytest.approx(finite.mean(), rel=1e-12)
        assert got["min"] == finite.min() and got["abs_max"] == np.abs(finite).max()


def test_writer_queue_bounds_host_memory(tmp_path, tiny_fp32):
    from hwdiff.store import CaptureWriter

    inputs = hwdiff.load_inputs(limit=4, max_tokens=16)
    writer = CaptureWriter(tmp_path / "w.h5", meta={}, inputs=inputs, mode="full", max_bytes=1)
    with hwdiff.record(tiny_fp32, sink=writer) as rec:
        rec.row0 = 0
        tiny_fp32(input_ids=torch.from_numpy(inputs.input_ids))
    writer.finish()
    assert writer._queued_bytes == 0
    with hwdiff.open_capture(tmp_path / "w.h5") as cap:
        assert np.array_equal(
            cap.activation("lm_head"),
            tiny_fp32(input_ids=torch.from_numpy(inputs.input_ids)).logits.detach().numpy(),
        )


@pytest.mark.parametrize("mode", ["full", "stats", "sample"])
def test_cpu_captures_write_synchronously_and_match_the_writer_thread(
    monkeypatch, tmp_path, tiny_bf16, mode
):
    """On the CPU the hooks write without copies; the writer-thread path (used on accelerators)
    must store the very same bits and statistics."""
    import hwdiff.capturing.run as capturing  # where capture() looks CaptureWriter up
    from hwdiff.store import CaptureWriter

    made = []

    class Recording(CaptureWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.synchronous)

    monkeypatch.setattr(capturing, "CaptureWriter", Recording)
    direct = hwdiff.capture(
        tiny_bf16, tmp_path / "direct.h5", mode=mode, record_inputs=True, **SMALL
    ).path
    monkeypatch.setattr(
        capturing,
        "CaptureWriter",
        lambda *args, **kwargs: Recording(*args, **{**kwargs, "synchronous": False}),
    )
    threaded = hwdiff.capture(
        tiny_bf16, tmp_path / "threaded.h5", mode=mode, record_inputs=True, **SMALL
    ).path
    assert made == [True, False]
    with h5py.File(direct) as a, h5py.File(threaded) as b:
        names = []
        a["modules"].visit(names.append)
        datasets = [n for n in names if isinstance(a["modules"][n], h5py.Dataset)]
        assert datasets and datasets == [
            n for n in _visit(b["modules"]) if isinstance(b["modules"][n], h5py.Dataset)
        ]
        for name in datasets:
            x, y = a["modules"][name], b["modules"][name]
            assert (
                np.array_equal(x[...], y[...], equal_nan=x.dtype.kind == "f")
                if x.dtype.names is None
                else x[...].tobytes() == y[...].tobytes()
            ), name
            assert dict(x.attrs) == dict(y.attrs), name


def _visit(group):
    names = []
    group.visit(names.append)
    return names


def test_an_activation_changed_in_place_after_its_hook_is_stored_as_it_was(tmp_path):
    class Doubles(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)

        def forward(self, input_ids, attention_mask=None, **_):
            x = self.inner(input_ids.float()[..., None].expand(*input_ids.shape, 4) / 256)
            y = x.clone()
            x.mul_(2.0)  # the recorded output of `inner` changes after its hook ran
            return x + y

    model = Doubles()
    inputs = hwdiff.load_inputs(limit=2, max_tokens=8)
    path = hwdiff.capture(
        model, tmp_path / "c.h5", inputs=inputs, modules="inner", progress=False
    ).path
    with hwdiff.open_capture(path) as cap, torch.no_grad():
        ids = torch.from_numpy(cap.input_ids)
        expected = model.inner(ids.float()[..., None].expand(*ids.shape, 4) / 256).numpy()
        assert np.array_equal(cap.activation("inner"), expected)


def test_stats_reduced_on_device_travel_in_one_copy_per_forward(tmp_path, tiny_bf16, monkeypatch):
    """The accelerator path of stats mode, run on the CPU: every slot's parts are stacked on the device
    and copied to the host once per forward (2 forwards here, not one copy per module), and the
    stored statistics are those of the full capture's activations."""
    import hwdiff.capturing.hooks as hooks

    full = hwdiff.capture(tiny_bf16, tmp_path / "full.h5", **SMALL).path
    copies = []
    real_to_host = hooks.to_host
    monkeypatch.setattr(hooks, "_batched_stats", lambda tensor: True)
    monkeypatch.setattr(hooks, "to_host", lambda *t: copies.append(t[0].shape) or real_to_host(*t))
    stats = hwdiff.capture(
        tiny_bf16, tmp_path / "st.h5", mode="stats", logprobs=False, **SMALL
    ).path
    with hwdiff.open_capture(full) as f, hwdiff.open_capture(stats) as s:
        stored = [name for name in s.modules if s.modules[name].alias_of is None]
        assert copies == [(len(stored), 9)] * 2  # -(-6 // 4) forwards, one [slots, 9] buffer each
        for name in stored:
            values = f.activation(name).astype(np.float64)
            got = s.stats(name)
            assert (
                got["count"] == values.size
                and got["max"] == values.max()
                and got["min"] == values.min()
            ), name
            assert got["mean"] == pytest.approx(values.mean(), rel=1e-9, abs=1e-12), name
            assert got["rms"] == pytest.approx(np.sqrt(np.mean(values**2)), rel=1e-9), name
