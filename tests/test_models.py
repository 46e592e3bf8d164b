import pytest
import torch

import hwdiff
from hwdiff.capturing.models import fingerprint, model_info, qwen25_15b_config, resolve_dtype
from hwdiff.errors import ModelSpecError

from .conftest import L


def _norms(model):
    return [
        name for name, module in model.named_modules() if "rmsnorm" in type(module).__name__.lower()
    ]


def test_tiny_qwen2_has_2l_plus_1_norms_with_weights_spread_around_one(tiny_fp32):
    assert tiny_fp32.config.num_hidden_layers == L and tiny_fp32.config.hidden_size == 256
    assert len(_norms(tiny_fp32)) == 2 * L + 1
    weight = tiny_fp32.model.layers[0].input_layernorm.weight
    assert abs(weight.mean().item() - 1.0) < 0.03
    assert 0.07 < weight.std().item() < 0.13


def test_fingerprint_is_the_same_whatever_the_dtype_and_repeatable(tiny_fp32, tiny_bf16):
    assert next(tiny_bf16.parameters()).dtype == torch.bfloat16
    assert model_info(tiny_fp32).fingerprint == model_info(tiny_bf16).fingerprint
    again = hwdiff.load_model("tiny-qwen2", dtype="float16")
    assert model_info(again).fingerprint == model_info(tiny_fp32).fingerprint
    assert torch.equal(again.lm_head.weight.float(), tiny_fp32.lm_head.weight.half().float())


def test_seed_changes_weights_and_fingerprint(tiny_fp32):
    other = hwdiff.load_model("tiny-qwen2", seed=1)
    assert model_info(other).fingerprint != model_info(tiny_fp32).fingerprint
    assert not torch.equal(other.model.embed_tokens.weight, tiny_fp32.model.embed_tokens.weight)


def test_local_checkpoint_loads_with_from_pretrained_and_keeps_the_fingerprint(tmp_path, tiny_fp32):
    tiny_fp32.save_pretrained(tmp_path / "ckpt")
    loaded = hwdiff.load_model(
        str(tmp_path / "ckpt"), dtype="bfloat16", attn_implementation="eager"
    )
    assert model_info(loaded).spec == str(tmp_path / "ckpt")
    assert model_info(loaded).fingerprint == model_info(tiny_fp32).fingerprint
    assert loaded.config._attn_implementation == "eager"
    assert torch.equal(loaded.model.norm.weight, tiny_fp32.model.norm.weight.bfloat16())


def test_fingerprint_of_a_foreign_model_is_computed_from_its_weights():
    layer = torch.nn.Linear(3, 2)
    assert model_info(layer).fingerprint == fingerprint(layer)
    assert model_info(layer).spec.startswith("object:")


def test_qwen25_arch_matches_the_reference_facts():
    config = qwen25_15b_config()
    facts = dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    assert {key: getattr(config, key) for key in facts} == facts
    assert (
        config.rope_parameters["rope_theta"] == 1e6
        if hasattr(config, "rope_parameters")
        else config.rope_theta == 1e6
    )


@pytest.mark.parametrize("spec", ["no/such/thing", "./missing-dir", "not a model"])
def test_unknown_spec_is_a_clear_error(spec):
    with pytest.raises(ModelSpecError, match="model"):
        hwdiff.load_model(spec)


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ModelSpecError, match="unknown dtype"):
        resolve_dtype("float8")


def test_builtin_weights_match_the_reference_capture_made_on_another_machine(tiny_bf16):
    """data/reference/ was captured on an H100 machine with other torch / transformers versions."""
    from .conftest import ROOT

    with hwdiff.open_capture(ROOT / "data/reference/tiny-qwen2-cuda-bf16-sdpa.h5") as ref:
        assert model_info(tiny_bf16).fingerprint == ref.meta["model_fingerprint"]
        assert tiny_bf16.lm_head.weight is tiny_bf16.model.embed_tokens.weight
        assert torch.equal(
            torch.from_numpy(ref.weight("model.layers.1.input_layernorm")),
            tiny_bf16.model.layers[1].input_layernorm.weight.float(),
        )


def test_builtin_built_directly_in_bfloat16_equals_the_float32_build_cast(tiny_fp32, monkeypatch):
    """The bfloat16 build never holds a float32 copy, yet has the float32 build's values rounded once,
    the same buffers, and the fingerprint that hashing the float32 model gives (the generic
    function, not the build's own hash). A tiny fill chunk forces several chunks per parameter."""
    import hwdiff.capturing.models as models

    monkeypatch.setattr(models, "_FILL_CHUNK", 1000)
    built = hwdiff.load_model("tiny-qwen2", dtype="bfloat16")
    assert model_info(built).fingerprint == fingerprint(tiny_fp32)
    assert all(p.dtype == torch.bfloat16 for p in built.parameters())
    assert built.lm_head.weight is built.model.embed_tokens.weight
    reference = tiny_fp32.state_dict()
    for name, tensor in built.state_dict().items():
        assert torch.equal(tensor, reference[name].bfloat16()), name
    cast = hwdiff.load_model("tiny-qwen2", dtype="float32").to(
        torch.bfloat16
    )  # the old way: build, then cast
    for (name, ours), (_, theirs) in zip(built.named_buffers(), cast.named_buffers()):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name
