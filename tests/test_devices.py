import pytest
import torch

from hwdiff.capturing import ascend
from hwdiff.capturing.devices import describe, resolve_device, synchronize
from hwdiff.errors import DeviceError


def test_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    synchronize(torch.device("cpu"))


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu:0", "npu0"])
def test_unknown_device_names_the_accepted_forms(spec):
    with pytest.raises(DeviceError, match=r"unknown device .* cpu, cuda\[:N\], npu\[:N\] or auto"):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="not available"):
        resolve_device("cuda:0")


@pytest.mark.skipif(ascend.is_installed(), reason="needs a machine without torch_npu")
def test_npu_without_torch_npu_says_what_to_install():
    with pytest.raises(DeviceError, match="torch_npu"):
        resolve_device("npu")


def test_cpu_description_records_versions_and_numerics_flags():
    info = describe(torch.device("cpu"))
    assert info["device"] == "cpu" and info["device_name"]
    assert info["torch_version"] == torch.__version__
    for flag in (
        "cuda_matmul_allow_tf32",
        "cudnn_allow_tf32",
        "deterministic_algorithms",
        "cpu_threads",
    ):
        assert flag in info
    assert all(isinstance(value, (bool, int, float, str)) for value in info.values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_description_has_backend_versions():
    info = describe(resolve_device("cuda"))
    assert info["cuda_version"] and info["cudnn_version"] and info["device_name"]
