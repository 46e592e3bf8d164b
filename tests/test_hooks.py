import pytest
import torch

import hwdiff
from hwdiff.errors import SelectionError
from hwdiff.hooks import module_kind, select_modules

from .conftest import L


def test_default_selection_covers_every_kind_but_other(tiny_fp32):
    kinds = {}
    for name, _, kind in select_modules(tiny_fp32):
        kinds.setdefault(kind, []).append(name)
    assert len(kinds["rmsnorm"]) == 2 * L + 1
    assert kinds["embedding"] == ["model.embed_tokens"] and kinds["head"] == ["lm_head"]
    assert len(kinds["linear"]) == 7 * L and len(kinds["activation"]) == L
    assert len(kinds["attention"]) == len(kinds["mlp"]) == len(kinds["decoder_layer"]) == L
    assert "other" not in kinds


def test_selection_by_regex_and_kind(tiny_fp32):
    names = [name for name, _, _ in select_modules(tiny_fp32, r"layers\.1\.", kinds=["linear"])]
    assert names == [f"model.layers.1.{p}" for p in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert [n for n, _, _ in select_modules(tiny_fp32, kinds="rmsnorm")][-1] == "model.norm"


@pytest.mark.parametrize("modules, kinds, message", [
    ("no_such_module", None, "matches no module"),
    ("(", None, "invalid module regex"),
    (None, ["bogus"], "unknown module kind"),
])
def test_bad_selection_is_a_clear_error(tiny_fp32, modules, kinds, message):
    with pytest.raises(SelectionError, match=message):
        select_modules(tiny_fp32, modules, kinds)


def test_kind_is_found_by_class_name_without_transformers_classes():
    class AscendRMSNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))  # the rule: class name and a 1-D weight

    class FancyMLP(torch.nn.Module):
        pass

    assert module_kind("x", AscendRMSNorm()) == "rmsnorm"
    assert module_kind("x", FancyMLP()) == "mlp"
    assert module_kind("x", torch.nn.GELU()) == "activation"
    assert module_kind("lm_head", torch.nn.Linear(2, 2)) == "head"


def test_record_leaves_no_hook_behind_and_does_not_change_outputs(tiny_fp32):
    ids = torch.randint(0, 256, (2, 12))
    before = tiny_fp32(input_ids=ids).logits
    with hwdiff.record(tiny_fp32, record_inputs=True) as rec:
        during = tiny_fp32(input_ids=ids).logits
        tiny_fp32(input_ids=ids)
    assert torch.equal(before, during)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_fp32.modules())
    norm_out = rec.activations[("model.norm", 0, "output")]
    assert len(norm_out) == 2 and torch.equal(norm_out[0], norm_out[1])
    assert torch.equal(rec.activations[("lm_head", 0, "output")][0], before)
    # the MLP returns down_proj's very tensor: recorded once and shared, not copied twice
    assert rec.activations[("model.layers.0.mlp", 0, "output")][0] is \
        rec.activations[("model.layers.0.mlp.down_proj", 0, "output")][0]


def test_hooks_are_removed_when_the_forward_raises(tiny_fp32):
    with pytest.raises(IndexError):
        with hwdiff.record(tiny_fp32):
            tiny_fp32(input_ids=torch.tensor([[100000]]))
    assert all(not m._forward_hooks for m in tiny_fp32.modules())
