"""hwdiff.structure: the one place that knows norms, layers, sub-blocks, token axes and masks."""
import numpy as np
import pytest
import torch

from hwdiff import structure
from hwdiff.errors import HwdiffError


class PlainRMSNorm(torch.nn.Module):  # x̂ · w, a class name hwdiff has never seen
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class OffsetRMSNorm(PlainRMSNorm):  # x̂ · (1 + w), detectable only by probing
    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_the_norm_rule_needs_the_class_name_and_a_1d_weight():
    class RMSNormNoWeight(torch.nn.Module):
        pass

    class WeirdRMSNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2, 2))

    assert structure.is_norm(PlainRMSNorm())
    assert not structure.is_norm(RMSNormNoWeight()) and not structure.is_norm(WeirdRMSNorm())
    assert not structure.is_norm(torch.nn.LayerNorm(4)) and structure.is_layernorm(torch.nn.LayerNorm(4))


def test_one_plus_w_norms_are_found_by_class_and_by_probing():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert structure.norm_offset(Gemma3RMSNorm(8)) == 1.0
    assert structure.norm_offset(LlamaRMSNorm(8)) == 0.0
    offset = OffsetRMSNorm()
    with torch.no_grad():
        offset.weight.fill_(0.25)
    assert structure.norm_offset(offset) == 1.0 and structure.norm_offset(PlainRMSNorm()) == 0.0
    assert torch.equal(offset.weight, torch.full((8,), 0.25))  # the probe put the weight back
    assert torch.allclose(structure.norm_weight_effective(offset), torch.full((8,), 1.25))


LLAMA = ["model.embed_tokens", "model.layers.0", "model.layers.0.self_attn", "model.layers.0.self_attn.o_proj",
         "model.layers.0.mlp", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
         "model.norm", "lm_head"]
GEMMA3 = ["model.layers.0.input_layernorm", "model.layers.0.self_attn", "model.layers.0.self_attn.q_norm",
          "model.layers.0.self_attn.k_norm", "model.layers.0.self_attn.o_proj",
          "model.layers.0.post_attention_layernorm", "model.layers.0.pre_feedforward_layernorm", "model.layers.0.mlp",
          "model.layers.0.post_feedforward_layernorm", "model.norm", "lm_head"]


def _roles(names, cls):
    specs = structure.norm_specs_from_names(names, {n: cls for n in names if "norm" in n})
    return {s.name.replace("model.layers.0.", ""): (s.role, s.subblock, s.observe, s.offset) for s in specs}


def test_llama_style_norms_feed_attention_and_mlp():
    roles = _roles(LLAMA, "LlamaRMSNorm")
    assert roles["input_layernorm"][:2] == ("pre_attention", "model.layers.0.self_attn")
    assert roles["post_attention_layernorm"][:3] == ("pre_mlp", "model.layers.0.mlp", ("model.layers.0.mlp", "output"))
    assert roles["model.norm"][:2] == ("final", "lm_head") and roles["model.norm"][3] == 0.0


def test_gemma_post_norms_are_outputs_of_their_sub_block_and_qk_norms_feed_the_core():
    roles = _roles(GEMMA3, "Gemma3RMSNorm")
    assert roles["post_attention_layernorm"][:3] == ("post_attention", "model.layers.0.self_attn",
                                                     ("model.layers.0.post_attention_layernorm", "output"))
    assert roles["pre_feedforward_layernorm"][:2] == ("pre_mlp", "model.layers.0.mlp")
    assert roles["post_feedforward_layernorm"][:2] == ("post_mlp", "model.layers.0.mlp")
    assert roles["self_attn.q_norm"][:3] == ("q_norm", "model.layers.0.self_attn",
                                             ("model.layers.0.self_attn.o_proj", "input"))
    assert all(role[3] == 1.0 for role in roles.values())


@pytest.mark.parametrize("model_type, layers, per_layer", [
    ("qwen2", 28, 2), ("llama", 3, 2), ("mistral", 2, 2), ("qwen2_moe", 2, 2), ("mixtral", 2, 2),
    ("qwen3", 2, 4), ("gemma2", 2, 4), ("gemma3_text", 2, 6), ("gpt2", 2, None)])
def test_expected_norm_counts_per_family(model_type, layers, per_layer):
    class Config:
        pass

    config = Config()
    config.model_type, config.num_hidden_layers = model_type, layers
    expected = None if per_layer is None else per_layer * layers + 1
    assert structure.expected_norm_count(config) == expected


def test_unknown_family_needs_the_same_norms_in_every_layer():
    same = ["m.layers.0.a_norm", "m.layers.0.b_norm", "m.layers.1.a_norm", "m.layers.1.b_norm", "m.norm"]
    structure.check_norm_layout(same)
    with pytest.raises(HwdiffError, match="different sets"):
        structure.check_norm_layout(same[:3])


def test_token_axis_of_each_layout():
    assert structure.token_axis((2, 40, 16), 2, 40) == 1
    assert structure.token_axis((2, 4, 40, 16), 2, 40) == 2  # Gemma 3 q_norm: [batch, heads, tokens, dim]
    assert structure.token_axis((80, 16), 2, 40) is None  # flattened rows
    assert structure.token_axis((2, 16), 2, 40) is None


def test_attention_type_per_layer():
    from transformers import Gemma3TextConfig, MistralConfig, Qwen2Config

    gemma = Gemma3TextConfig(num_hidden_layers=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    assert structure.attention_type(gemma, 0) == ("sliding", 16) and structure.attention_type(gemma, 1) == ("full", None)
    assert structure.attention_type(MistralConfig(sliding_window=16), 1) == ("sliding", 16)
    assert structure.attention_type(MistralConfig(sliding_window=None), 1) == ("full", None)
    assert structure.attention_type(Qwen2Config(num_hidden_layers=2), 1) == ("full", None)
    with pytest.raises(HwdiffError, match="which mask"):
        structure.attention_type(gemma, None)


def test_effective_scale_of_stored_weights():
    assert np.allclose(structure.effective_scale(np.array([0.0, 0.5], dtype=np.float32), 1.0), [1.0, 1.5])
