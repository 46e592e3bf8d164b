import h5py
import numpy as np
import pytest
import torch

from hwdiff.errors import CaptureFormatError
from hwdiff.store import SCHEMA, _chunk_shape, decode, encode, nonfinite_counts, open_capture


def test_bfloat16_round_trips_bit_exactly_through_uint16():
    values = torch.randn(1000).to(torch.bfloat16)
    values[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
    stored = encode(values)
    assert stored.dtype == np.uint16
    decoded = decode(stored, "bfloat16")
    assert np.array_equal(decoded.view(np.uint32), values.float().numpy().view(np.uint32))


def test_nonfinite_counts_read_bfloat16_bits():
    values = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 3.0]).to(torch.bfloat16)
    assert nonfinite_counts(encode(values), "bfloat16") == (1, 2)
    assert nonfinite_counts(values.float().numpy(), "float32") == (1, 2)


def test_chunks_are_one_row_and_at_most_4_mib():
    assert _chunk_shape((64, 128, 256), 2) == (1, 128, 256)
    chunk = _chunk_shape((4, 128, 151936), 2)
    assert chunk[0] == 1 and np.prod(chunk) * 2 <= 4 << 20


def _h5(path, **attrs):
    with h5py.File(path, "w") as handle:
        handle.attrs.update(attrs)
        handle.create_group("modules")
    return path


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({}, "not an hwdiff capture"),
        ({"schema": "other/thing/1"}, "not an hwdiff capture"),
        ({"schema": "hwdiff/capture/2"}, "upgrade hwdiff"),
        ({"schema": SCHEMA, "complete": False}, "incomplete"),
    ],
)
def test_reader_refuses_what_it_does_not_understand(tmp_path, attrs, message):
    with pytest.raises(CaptureFormatError, match=message):
        open_capture(_h5(tmp_path / "x.h5", **attrs))


def test_reader_refuses_non_hdf5_missing_and_truncated_files(tmp_path, tiny_bf16):
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CaptureFormatError, match="not an HDF5 file"):
        open_capture(tmp_path / "text.h5")
    with pytest.raises(CaptureFormatError, match="no such file"):
        open_capture(tmp_path / "nope.h5")
    import hwdiff

    whole = hwdiff.capture(
        tiny_bf16, tmp_path / "whole.h5", limit=2, max_tokens=16, progress=False
    ).path
    data = whole.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptureFormatError, match="truncated"):
        open_capture(tmp_path / "cut.h5")


def _all_datasets(path):
    found = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(
            lambda name, node: (
                found.__setitem__(name, node) if isinstance(node, h5py.Dataset) else None
            )
        )
        return {
            name: (dict(node._filters), node[()])
            for name, node in found.items()
            if name.startswith("modules/")
        }


def test_every_compression_is_lossless_and_filters_what_it_says(tmp_path, tiny_bf16):
    """Each filter stores the very bits of the uncompressed capture (bfloat16 patterns included), and
    the activations carry the filter named (HDF5's ids: gzip deflate, lzf 32000, Blosc 32001, Blosc2 32026)."""
    import hwdiff
    from hwdiff.store import COMPRESSIONS

    pytest.importorskip("hdf5plugin")
    ids = np.arange(2 * 24).reshape(2, 24) % 200
    plain = tmp_path / "plain.h5"
    hwdiff.capture(tiny_bf16, plain, inputs=ids, modules=r"layers\.0\.", progress=False)
    reference = _all_datasets(plain)
    expected_filter = {"gzip": "gzip", "lzf": "lzf", "lz4": "32001", "zstd": "32026"}
    for name in COMPRESSIONS:
        path = tmp_path / f"{name}.h5"
        hwdiff.capture(
            tiny_bf16, path, inputs=ids, modules=r"layers\.0\.", progress=False, compression=name
        )
        stored = _all_datasets(path)
        assert stored.keys() == reference.keys()
        for key, (filters, values) in stored.items():
            assert (
                np.array_equal(values, reference[key][1])
                and values.dtype == reference[key][1].dtype
            ), (name, key)
            if values.ndim >= 2:
                assert expected_filter[name] in filters and "fletcher32" in filters, (
                    name,
                    key,
                    filters,
                )
        with open_capture(path) as capture:  # the reader decodes them like any other file
            first = next(n for n in capture.modules if capture.modules[n].alias_of is None)
            with open_capture(plain) as base:
                assert np.array_equal(capture.activation(first), base.activation(first))


@pytest.mark.parametrize("action", ["read", "write"])
def test_plugin_compression_without_hdf5plugin_is_one_clear_line(tmp_path, tiny_bf16, action):
    """Without hdf5plugin an lz4 file is not called damaged, and an lz4 capture is refused up front."""
    import subprocess
    import sys

    import hwdiff

    pytest.importorskip("hdf5plugin")
    path = tmp_path / "lz4.h5"
    if action == "read":
        hwdiff.capture(
            tiny_bf16,
            path,
            inputs=np.arange(16).reshape(1, 16),
            modules=r"layers\.0\.mlp$",
            progress=False,
            compression="lz4",
        )
        argv = ["diff", str(path), str(path), "-o", str(tmp_path / "d.h5")]
    else:
        argv = [
            "capture",
            "--model",
            "tiny-qwen2",
            "--compression",
            "lz4",
            "-o",
            str(path),
            "--limit",
            "1",
        ]
    code = (
        "import sys; sys.modules['hdf5plugin'] = None; from hwdiff.cli import main; "
        f"sys.exit(main({argv!r}))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stderr.splitlines() if line.startswith("hwdiff: error")]
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 1 and "hdf5plugin" in lines[0] and "damaged" not in lines[0], run.stderr


@pytest.mark.parametrize(
    "family, mode, record_inputs",
    [
        ("qwen2", "full", True),
        ("qwen2", "sample", False),
        ("qwen2", "stats", True),
        ("mixtral", "full", True),
        ("gemma3", "full", False),
        ("gpt2", "stats", False),
    ],
)
def test_module_index_says_what_walking_the_groups_finds(tmp_path, family, mode, record_inputs):
    """/module_index (what the writer knew) against a walk of the HDF5 groups, for aliases, recorded
    inputs, routed experts (MoE, calls keyed by expert), (1 + w) norms, stats and sample files; and a
    file whose groups changed after writing falls back to the walk."""
    import hwdiff
    from hwdiff.store import _indexed_modules, _walk_modules

    from .test_families import build

    model = hwdiff.load_model("tiny-qwen2") if family == "qwen2" else build(family).eval()
    ids = np.random.default_rng(1).integers(3, 200, (3, 20))
    path = hwdiff.capture(
        model,
        tmp_path / "c.h5",
        inputs=ids,
        mode=mode,
        record_inputs=record_inputs,
        batch_size=2,
        progress=False,
    ).path
    with h5py.File(path, "r") as handle:
        indexed, walked = _indexed_modules(handle), _walk_modules(handle)
    assert indexed is not None and len(walked) > 5
    assert list(indexed) == list(walked) and indexed == walked
    with h5py.File(path, "a") as handle:
        del handle["modules"][next(iter(walked))]
    with h5py.File(path, "r") as handle:
        assert _indexed_modules(handle) is None
    with open_capture(path) as capture:
        assert list(capture.modules) == list(walked)[1:]


def test_fast_attributes_are_what_h5py_writes(tmp_path):
    """set_attrs writes str / int / float / bool through HDF5's own calls: the same HDF5 types and
    values as h5py's attrs[...] = ..., and anything else (or a name already there) through h5py."""
    from hwdiff.store import set_attrs

    values = {
        "text": "Qwen2RMSNorm",
        "unicode": "σ → ε",
        "empty": "",
        "int": 3,
        "big": 2**40 + 7,
        "negative": -5,
        "float": 1.0e-6,
        "bool": True,
        "false": False,
        "array": np.arange(3),
        "list": [1.5, 2.5],
        "numpy": np.float32(2.5),
    }
    with h5py.File(tmp_path / "a.h5", "w", libver=("v110", "v110")) as handle:
        ours, theirs = handle.create_group("ours"), handle.create_group("theirs")
        theirs.attrs.update(values)
        set_attrs(ours, values)
        set_attrs(ours, {"int": 4})  # already there: replaced, as attrs[...] = ... replaces
        theirs.attrs["int"] = 4
    with h5py.File(tmp_path / "a.h5", "r") as handle:
        ours, theirs = handle["ours"], handle["theirs"]
        assert sorted(ours.attrs) == sorted(theirs.attrs)
        for key in values:
            a, b = ours.attrs[key], theirs.attrs[key]
            assert type(a) is type(b) and np.array_equal(a, b), key
            assert ours.attrs.get_id(key).get_type() == theirs.attrs.get_id(key).get_type(), key
            assert ours.attrs.get_id(key).shape == theirs.attrs.get_id(key).shape, key


def test_a_virtual_dataset_over_plugin_compressed_sources_asks_for_hdf5plugin(tmp_path):
    """A multi-rank manifest reads its rank files through virtual datasets, which carry no filters of
    their own: without hdf5plugin, an lz4 rank file is named as needing it, not as damaged."""
    import subprocess
    import sys

    hdf5plugin = pytest.importorskip("hdf5plugin")
    with h5py.File(tmp_path / "rank0.h5", "w") as handle:
        handle.create_dataset(
            "x",
            data=np.arange(64.0).reshape(4, 16),
            chunks=(1, 16),
            fletcher32=True,
            **hdf5plugin.Blosc(cname="lz4", shuffle=hdf5plugin.Blosc.BITSHUFFLE),
        )
    layout = h5py.VirtualLayout(shape=(4, 16), dtype="f8")
    layout[:] = h5py.VirtualSource("rank0.h5", "x", shape=(4, 16))
    with h5py.File(tmp_path / "manifest.h5", "w", libver="latest") as handle:
        handle.create_virtual_dataset("x", layout)
    code = (
        "import sys; sys.modules['hdf5plugin'] = None; import h5py; from hwdiff.store import read_checked; "
        f"read_checked(h5py.File({str(tmp_path / 'manifest.h5')!r}, 'r')['x'])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert (
        run.returncode != 0
        and "HwdiffError" in run.stderr
        and "needs the hdf5plugin package" in run.stderr
    ), run.stderr
    assert "damaged" not in run.stderr.splitlines()[-1]
    with h5py.File(
        tmp_path / "manifest.h5", "r"
    ) as handle:  # with the plugin, the values come through
        from hwdiff.store import read_checked

        assert np.array_equal(read_checked(handle["x"]), np.arange(64.0).reshape(4, 16))
