import numpy as np
import pytest
import torch

import hwdiff
from hwdiff.emulate import emulation, parse
from hwdiff.errors import HwdiffError

from .conftest import run_cli

CAP = dict(limit=6, max_tokens=24, batch_size=3, progress=False)
CONTAINERS = {"decoder_layer"}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    model = hwdiff.load_model("tiny-qwen2", dtype="float32")
    path = hwdiff.capture(model, tmp_path_factory.mktemp("emu") / "clean.h5", record_inputs=True, **CAP).path
    return model, path


@pytest.mark.parametrize("profile, perturbed", [
    ("aqn:sigma=0.01", {"rmsnorm"}),
    ("bf16-truncate", {"linear", "head", "attention", "mlp"}),
    ("bf16-block-accum:block=32", {"linear", "head", "attention", "mlp"}),
    ("approx-silu", {"activation", "mlp"}),
    ("rmsnorm-order", {"rmsnorm"}),
])
def test_each_profile_is_localized_by_replay_and_diff(tmp_path, clean, profile, perturbed):
    model, reference = clean
    local = hwdiff.replay(model, reference, tmp_path / "local.h5", emulate=[profile], progress=False).path
    result = hwdiff.diff(reference, local, progress=False)
    with_error = {layer.kind for layer in result.outputs if not layer.exact}
    assert with_error == perturbed | CONTAINERS  # the perturbed modules and the layers that contain them
    for layer in result.outputs:  # every module of a perturbed kind is hit, nothing else is
        assert layer.exact == (layer.kind not in perturbed | CONTAINERS), layer.name
    with hwdiff.open_capture(local) as cap:
        assert cap.meta["emulate"] == str(parse(profile))


def test_profiles_leave_the_model_as_it_was(clean):
    model, _ = clean
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with emulation(model, ["aqn:sigma=0.1", "bf16-truncate", "approx-silu"]):
        assert not torch.equal(model.model.norm.weight, before["model.norm.weight"])
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())


def test_truncation_clears_the_low_bits_toward_zero(clean):
    model, _ = clean
    exact = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        x = torch.randn(2, 10, 256)
        reference = exact(x)
        with emulation(model, ["bf16-truncate"]):
            truncated = exact(x)
    bits = truncated.contiguous().view(torch.int32)
    assert (bits & 0xFFFF).eq(0).all()
    assert (truncated.abs() <= reference.abs()).all()
    assert ((reference - truncated).abs() <= reference.abs() * 2.0 ** -7).all()


def test_capture_records_the_profile(tmp_path):
    model = hwdiff.load_model("tiny-qwen2")
    path = hwdiff.capture(model, tmp_path / "e.h5", emulate=["bf16-block-accum:block=16"], **CAP).path
    with hwdiff.open_capture(path) as cap:
        assert cap.meta["emulate"] == "bf16-block-accum:block=16"
        assert np.isfinite(cap.activation("lm_head")).all()


@pytest.mark.parametrize("text, message", [
    ("fast-math", "unknown emulation profile"),
    ("aqn:mu=1", "takes sigma, seed"),
    ("aqn:sigma=x", "must be a number"),
    ("bf16-block-accum:block=0", "out-of-range"),
])
def test_bad_profiles_are_clear_errors(text, message):
    with pytest.raises(HwdiffError, match=message):
        parse(text)


def test_cli_emulate(tmp_path):
    proc = run_cli("capture", "--device", "cpu", "--limit", "2", "--max-tokens", "8", "-q", "--emulate", "approx-silu",
                   "-o", tmp_path / "e.h5")
    assert proc.returncode == 0, proc.stderr
    bad = run_cli("capture", "--device", "cpu", "--limit", "2", "-q", "--emulate", "nope", "-o", tmp_path / "x.h5")
    assert bad.returncode == 2 and "unknown emulation profile" in bad.stderr and "Traceback" not in bad.stderr
