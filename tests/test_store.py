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


@pytest.mark.parametrize("attrs, message", [
    ({}, "not an hwdiff capture"),
    ({"schema": "other/thing/1"}, "not an hwdiff capture"),
    ({"schema": "hwdiff/capture/2"}, "upgrade hwdiff"),
    ({"schema": SCHEMA, "complete": False}, "incomplete"),
])
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

    whole = hwdiff.capture(tiny_bf16, tmp_path / "whole.h5", limit=2, max_tokens=16, progress=False).path
    data = whole.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptureFormatError, match="truncated"):
        open_capture(tmp_path / "cut.h5")
