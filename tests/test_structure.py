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
    assert not structure.is_norm(torch.nn.LayerNorm(4)) and structure.is_layernorm(
        torch.nn.LayerNorm(4)
    )


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


LLAMA = [
    "model.embed_tokens",
    "model.layers.0",
    "model.layers.0.self_attn",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp",
    "model.layers.0.input_layernorm",
    "model.layers.0.post_attention_layernorm",
    "model.norm",
    "lm_head",
]
GEMMA3 = [
    "model.layers.0.input_layernorm",
    "model.layers.0.self_attn",
    "model.layers.0.self_attn.q_norm",
    "model.layers.0.self_attn.k_norm",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.post_attention_layernorm",
    "model.layers.0.pre_feedforward_layernorm",
    "model.layers.0.mlp",
    "model.layers.0.post_feedforward_layernorm",
    "model.norm",
    "lm_head",
]


def _roles(names, cls):
    specs = structure.norm_specs_from_names(names, {n: cls for n in names if "norm" in n})
    return {
        s.name.replace("model.layers.0.", ""): (s.role, s.subblock, s.observe, s.offset)
        for s in specs
    }


def test_llama_style_norms_feed_attention_and_mlp():
    roles = _roles(LLAMA, "LlamaRMSNorm")
    assert roles["input_layernorm"][:2] == ("pre_attention", "model.layers.0.self_attn")
    assert roles["post_attention_layernorm"][:3] == (
        "pre_mlp",
        "model.layers.0.mlp",
        ("model.layers.0.mlp", "output"),
    )
    assert roles["model.norm"][:2] == ("final", "lm_head") and roles["model.norm"][3] == 0.0


def test_gemma_post_norms_are_outputs_of_their_sub_block_and_qk_norms_feed_the_core():
    roles = _roles(GEMMA3, "Gemma3RMSNorm")
    assert roles["post_attention_layernorm"][:3] == (
        "post_attention",
        "model.layers.0.self_attn",
        ("model.layers.0.post_attention_layernorm", "output"),
    )
    assert roles["pre_feedforward_layernorm"][:2] == ("pre_mlp", "model.layers.0.mlp")
    assert roles["post_feedforward_layernorm"][:2] == ("post_mlp", "model.layers.0.mlp")
    assert roles["self_attn.q_norm"][:3] == (
        "q_norm",
        "model.layers.0.self_attn",
        ("model.layers.0.self_attn.o_proj", "input"),
    )
    assert all(role[3] == 1.0 for role in roles.values())


@pytest.mark.parametrize(
    "model_type, layers, per_layer",
    [
        ("qwen2", 28, 2),
        ("llama", 3, 2),
        ("mistral", 2, 2),
        ("qwen2_moe", 2, 2),
        ("mixtral", 2, 2),
        ("qwen3", 2, 4),
        ("gemma2", 2, 4),
        ("gemma3_text", 2, 6),
        ("gpt2", 2, None),
    ],
)
def test_expected_norm_counts_per_family(model_type, layers, per_layer):
    class Config:
        pass

    config = Config()
    config.model_type, config.num_hidden_layers = model_type, layers
    expected = None if per_layer is None else per_layer * layers + 1
    assert structure.expected_norm_count(config) == expected


def test_unknown_family_needs_the_same_norms_in_every_layer():
    same = [
        "m.layers.0.a_norm",
        "m.layers.0.b_norm",
        "m.layers.1.a_norm",
        "m.layers.1.b_norm",
        "m.norm",
    ]
    structure.check_norm_layout(same)
    with pytest.raises(HwdiffError, match="different sets"):
        structure.check_norm_layout(same[:3])


def test_token_axis_of_each_layout():
    assert structure.token_axis((2, 40, 16), 2, 40) == 1
    assert (
        structure.token_axis((2, 4, 40, 16), 2, 40) == 2
    )  # Gemma 3 q_norm: [batch, heads, tokens, dim]
    assert structure.token_axis((80, 16), 2, 40) is None  # flattened rows
    assert structure.token_axis((2, 16), 2, 40) is None


def test_attention_type_per_layer():
    from transformers import Gemma3TextConfig, MistralConfig, Qwen2Config

    gemma = Gemma3TextConfig(
        num_hidden_layers=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"]
    )
    assert structure.attention_type(gemma, 0) == ("sliding", 16) and structure.attention_type(
        gemma, 1
    ) == ("full", None)
    assert structure.attention_type(MistralConfig(sliding_window=16), 1) == ("sliding", 16)
    assert structure.attention_type(MistralConfig(sliding_window=None), 1) == ("full", None)
    assert structure.attention_type(Qwen2Config(num_hidden_layers=2), 1) == ("full", None)
    with pytest.raises(HwdiffError, match="which mask"):
        structure.attention_type(gemma, None)
    # a sliding layer whose config names no window: a clear refusal, not int(None)
    windowless = Gemma3TextConfig(
        num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]
    )
    windowless.sliding_window = None
    with pytest.raises(HwdiffError, match="layer 0 uses sliding attention, but the config has no"):
        structure.attention_type(windowless, 0)


def test_effective_scale_of_stored_weights():
    assert np.allclose(
        structure.effective_scale(np.array([0.0, 0.5], dtype=np.float32), 1.0), [1.0, 1.5]
    )


# ------------------------------------------------------------------------------------------------
# Data flow: roles measured on one traced forward
# ------------------------------------------------------------------------------------------------
# Expected roles of layer 0's norms (and the final norm), read by hand from transformers 5.24's modeling
# files: OLMo2 normalises each sub-block's output (modeling_olmo2.py, Olmo2DecoderLayer.forward); DeepSeek's
# q_a/kv_a layernorms sit inside the attention between its down- and up-projections; Bamba's and Qwen3-Next's
# mixers call a gated norm(x, gate) inside; Llama 4's MoE block is a class of its own with a tuple router.
L0 = "model.layers.0."
EXPECTED_ROLES = {
    "olmo2": {
        "self_attn.q_norm": ("nested", "self_attn"),
        "self_attn.k_norm": ("nested", "self_attn"),
        "post_attention_layernorm": ("post", "self_attn"),
        "post_feedforward_layernorm": ("post", "mlp"),
    },
    "deepseek_v3": {
        "input_layernorm": ("pre", "self_attn"),
        "self_attn.q_a_layernorm": ("nested", "self_attn"),
        "self_attn.kv_a_layernorm": ("nested", "self_attn"),
        "post_attention_layernorm": ("pre", "mlp"),
    },
    "llama4": {
        "input_layernorm": ("pre", "self_attn"),
        "post_attention_layernorm": ("pre", "feed_forward"),
    },
    "bamba": {
        "input_layernorm": ("pre", "mamba"),
        "mamba.norm": ("nested", "mamba"),
        "pre_ff_layernorm": ("pre", "feed_forward"),
    },
    "qwen3_next": {
        "input_layernorm": ("pre", "linear_attn"),
        "linear_attn.norm": ("nested", "linear_attn"),
        "post_attention_layernorm": ("pre", "mlp"),
    },
    "qwen3_moe": {
        "input_layernorm": ("pre", "self_attn"),
        "self_attn.q_norm": ("nested", "self_attn"),
        "self_attn.k_norm": ("nested", "self_attn"),
        "post_attention_layernorm": ("pre", "mlp"),
    },
    "gemma3": {
        "input_layernorm": ("pre", "self_attn"),
        "self_attn.q_norm": ("nested", "self_attn"),
        "post_attention_layernorm": ("post", "self_attn"),
        "pre_feedforward_layernorm": ("pre", "mlp"),
        "post_feedforward_layernorm": ("post", "mlp"),
    },
    "llama": {"input_layernorm": ("pre", "self_attn"), "post_attention_layernorm": ("pre", "mlp")},
}
SUB_BLOCK_KINDS = {
    "llama4": {"feed_forward": "moe"},
    "bamba": {"mamba": "mixer", "feed_forward": "mlp"},
    "qwen3_next": {"linear_attn": "mixer", "mlp": "moe"},
    "deepseek_v3": {"self_attn": "attention"},
}


@pytest.mark.parametrize("family", list(EXPECTED_ROLES))
def test_data_flow_gives_every_norm_its_role(family):
    from .test_families import build

    model = build(family).eval()
    flow = structure.trace_dataflow(model, torch.arange(3, 19)[None])
    roles = {r.name: r for r in flow.norms}
    assert set(roles) == {n for n, _ in structure.find_norms(model)}  # every norm, once
    for leaf, (role, block) in EXPECTED_ROLES[family].items():
        assert (roles[L0 + leaf].role, roles[L0 + leaf].sub_block) == (role, L0 + block), leaf
    final = [r for r in flow.norms if structure.layer_index(r.name) is None]
    assert [(r.role, r.sub_block) for r in final] == [("final", "lm_head")]
    for leaf, kind in SUB_BLOCK_KINDS.get(family, {}).items():
        assert flow.sub_blocks[L0 + leaf] == kind
    gated = {r.name for r in flow.norms if r.gated}
    assert gated == {n for n in roles if n.endswith(("mamba.norm", "linear_attn.norm"))}
    assert (
        structure.DataFlow.from_json(flow.to_json()) == flow
    )  # stored in the capture, read back equal


class GatedRMSNorm(PlainRMSNorm):  # norm(x, gate), gate required (as Qwen3NextRMSNormGated)
    def forward(self, x, gate):
        return super().forward(x) * torch.nn.functional.silu(gate)


class Parallel(torch.nn.Module):
    """A decoder layer with one norm feeding attention and MLP in parallel (GPT-J / Cohere style)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.input_layernorm = PlainRMSNorm(dim)
        self.self_attn, self.mlp = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        normed = self.input_layernorm(x)
        return x + self.self_attn(normed) + self.mlp(normed)


class TinyParallelLM(torch.nn.Module):
    def __init__(self, dim: int = 8, vocab: int = 32) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList([Parallel(dim), Parallel(dim)])
        self.norm, self.lm_head = PlainRMSNorm(dim), torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def test_falcon_h1_input_norm_feeds_mamba_and_attention_in_parallel():
    """Falcon-H1 feeds its attention ``normed * attention_in_multiplier``: a same-size operation of one
    tensor keeps the value, so the trace sees both consumers and refuses the norm by name."""
    from .test_families import build

    flow = structure.trace_dataflow(build("falcon_h1").eval(), torch.arange(3, 19)[None])
    role = flow.role(L0 + "input_layernorm")
    assert role.role == "parallel" and role.sub_block is None
    assert f"{L0}mamba, {L0}self_attn" in role.reason
    assert (
        flow.role(L0 + "pre_ff_layernorm").role,
        flow.role(L0 + "pre_ff_layernorm").sub_block,
    ) == ("pre", L0 + "feed_forward")


def test_gated_norm_offset_probe_passes_a_gate():
    assert structure.norm_offset(GatedRMSNorm()) == 0.0  # it raised: forward() missing 'gate'


def test_a_norm_feeding_two_sub_blocks_is_refused_by_name():
    flow = structure.trace_dataflow(TinyParallelLM().eval(), torch.arange(3, 19)[None])
    roles = {r.name: r for r in flow.norms}
    assert roles["layers.0.input_layernorm"].role == "parallel"
    assert "layers.0.self_attn, layers.0.mlp" in roles["layers.0.input_layernorm"].reason
    assert (roles["norm"].role, roles["norm"].sub_block) == ("final", "lm_head")


def test_name_rule_is_a_cross_check_that_names_where_it_differs():
    from .test_families import build

    for family, differs in (("llama", set()), ("olmo2", {"post_attention_layernorm"})):
        model = build(family).eval()
        flow = structure.trace_dataflow(model, torch.arange(3, 19)[None])
        lines = structure.name_rule_disagreements(flow, [n for n, _ in model.named_modules() if n])
        assert {line.split(":")[0].rsplit(".", 1)[-1] for line in lines} == differs, lines
