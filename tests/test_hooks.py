import json

import numpy as np
import pytest
import torch

import hwdiff
from hwdiff.capturing.hooks import module_kind, select_modules
from hwdiff.errors import SelectionError

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
    assert names == [
        f"model.layers.1.{p}"
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    assert [n for n, _, _ in select_modules(tiny_fp32, kinds="rmsnorm")][-1] == "model.norm"


@pytest.mark.parametrize(
    "modules, kinds, message",
    [
        ("no_such_module", None, "matches no module"),
        ("(", None, "invalid module regex"),
        (None, ["bogus"], "unknown module kind"),
    ],
)
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
    assert (
        rec.activations[("model.layers.0.mlp", 0, "output")][0]
        is rec.activations[("model.layers.0.mlp.down_proj", 0, "output")][0]
    )


def test_hooks_are_removed_when_the_forward_raises(tiny_fp32):
    with pytest.raises(IndexError):
        with hwdiff.record(tiny_fp32):
            tiny_fp32(input_ids=torch.tensor([[100000]]))
    assert all(not m._forward_hooks for m in tiny_fp32.modules())


class _ToyMoE(torch.nn.Module):
    """A hand-written MoE: a Linear gate, per-expert modules called with the rows of their tokens
    (with 0 rows when no token chose them), as older transformers and custom code do."""

    def __init__(self, hidden=8, experts=4, k=2):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, experts)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(experts))
        self.k = k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        chosen = self.gate(flat).topk(self.k, -1).indices
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            _, tokens = torch.where((chosen == e).T)
            out.index_add_(0, tokens, expert(flat[tokens]))
        return out.reshape(x.shape)


class _ToyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        import types

        self.config = types.SimpleNamespace(num_experts_per_tok=2, vocab_size=32)
        self.embed = torch.nn.Embedding(32, 8)
        self.mlp = _ToyMoE()
        self.unused = torch.nn.Linear(8, 8)  # selected, never called
        self.lm_head = torch.nn.Linear(8, 32)
        with torch.no_grad():
            self.mlp.gate.bias[3] = -100.0  # expert 3 is never chosen: called with 0 rows

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.lm_head(self.mlp(self.embed(input_ids)))


def test_per_expert_rows_are_stored_at_their_tokens_and_empty_experts_are_not_exact(tmp_path):
    torch.manual_seed(0)
    model = _ToyModel()
    ids = torch.randint(0, 32, (4, 10))
    ref = hwdiff.capture(model, tmp_path / "a.h5", inputs=ids, batch_size=2, progress=False).path
    tgt = hwdiff.capture(model, tmp_path / "b.h5", inputs=ids, batch_size=2, progress=False).path
    x = model.embed(ids).detach().reshape(-1, 8)
    chosen = model.mlp.gate(x).topk(2, -1).indices.reshape(4, 10, 2)
    with hwdiff.open_capture(ref) as cap:
        assert json.loads(cap.meta["never_called"]) == ["unused"]
        assert np.array_equal(
            np.sort(cap.activation("mlp.gate", 0, "routing"), -1), np.sort(chosen.numpy(), -1)
        )
        for e in range(4):
            present = cap.present(f"mlp.experts.{e}", 0)
            assert np.array_equal(present, (chosen == e).any(-1).numpy())
            expected = model.mlp.experts[e](x).detach().reshape(4, 10, 8).numpy()[present]
            assert np.allclose(cap.activation(f"mlp.experts.{e}")[present], expected, atol=1e-6)
        assert not cap.present("mlp.experts.3", 0).any()
    result = hwdiff.diff(ref, tgt, progress=False)
    reasons = {}
    for item in result.unmatched:
        reasons.setdefault((item.name, item.call), []).append(item.reason)
    assert "no real token was routed" in reasons[("mlp.experts.3", 0)][0]
    assert reasons[("unused", 0)] == ["never called in the reference", "never called in the target"]
    assert all(layer.name != "mlp.experts.3" for layer in result.layers)
    assert result.routing[0].changed == () and result.routing[0].tokens == 40


def _llama4(path):
    import transformers

    config = transformers.Llama4TextConfig(
        hidden_size=32,
        intermediate_size=16,
        intermediate_size_mlp=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=64,
        num_local_experts=4,
        num_experts_per_tok=1,
        max_position_embeddings=32,
        attention_chunk_size=32,
    )
    torch.manual_seed(0)
    transformers.Llama4ForCausalLM(config).save_pretrained(path)
    return hwdiff.load_model(str(path), dtype="float32")


@pytest.mark.parametrize(
    "batch_size", [4, 3]
)  # 4 = the expert count: the first axis must not pass for sequences
def test_expert_major_rows_are_stored_by_token_whatever_the_batch_size(batch_size, tmp_path):
    """Llama 4's experts see every token at every expert: act_fn's [experts, sequences·tokens, …] and the
    experts' [experts·sequences·tokens, …] rows are stored [sequences, tokens, experts, …], compared with
    plain forward hooks on one whole-batch forward, rearranged by numpy."""
    model = _llama4(tmp_path / "model")
    ids = np.random.default_rng(0).integers(0, 64, (6, 5))
    raw = {}
    experts = model.model.layers[0].feed_forward.experts
    handles = [
        experts.act_fn.register_forward_hook(
            lambda m, a, out: raw.__setitem__("act_fn", out.detach().numpy())
        ),
        experts.register_forward_hook(
            lambda m, a, out: raw.__setitem__("experts", out.detach().numpy())
        ),
    ]
    with torch.no_grad():
        model(torch.from_numpy(ids))
    for handle in handles:
        handle.remove()
    path = hwdiff.capture(
        model,
        tmp_path / "c.h5",
        inputs=ids,
        batch_size=batch_size,
        record_inputs=True,
        progress=False,
    ).path
    prefix = "model.layers.0.feed_forward.experts"
    with hwdiff.open_capture(path) as cap:
        assert json.loads(cap.meta["unrecorded"]) == {}
        act = raw["act_fn"].reshape(4, 6, 5, -1).transpose(1, 2, 0, 3)  # [e, b·t, i] → [b, t, e, i]
        np.testing.assert_array_equal(cap.activation(f"{prefix}.act_fn"), act)
        out = raw["experts"].reshape(4, 6, 5, -1).transpose(1, 2, 0, 3)
        np.testing.assert_array_equal(cap.activation(prefix), out)
    replayed = hwdiff.replay(model, path, tmp_path / "r.h5", progress=False).path
    result = hwdiff.diff(path, replayed, progress=False)
    by_name = {layer.name: layer for layer in result.outputs}
    assert by_name[prefix].exact
    # act_fn ran on a strided chunk at capture and on a contiguous copy in replay: SiLU's two CPU kernels
    # differ by an ulp, a wrong row order would differ by O(1)
    assert by_name[f"{prefix}.act_fn"].metrics.rel_l2 < 1e-6


class _AddingMLP(torch.nn.Module):
    """Llama 4's MoE pattern: ``out = child(x); out.add_(…); return out`` — the parent returns its
    child's very tensor, changed in place after the child's hook saw it."""

    def __init__(self):
        super().__init__()
        self.down_proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        out = self.down_proj(x)
        out.add_(1.0)
        return out


class _InPlaceToy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.mlp = _AddingMLP()
        self.lm_head = torch.nn.Linear(8, 16)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.lm_head(self.mlp(self.embed(input_ids)))


@pytest.mark.parametrize("grad_mode", ["inference_mode", "no_grad"])
def test_a_parent_that_changes_its_childs_output_in_place_is_not_stored_as_a_link(
    grad_mode, tmp_path
):
    torch.manual_seed(0)
    model = _InPlaceToy().eval()
    ids = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        child = model.mlp.down_proj(model.embed(ids)).numpy()  # independent: plain calls
    if grad_mode == "inference_mode":  # hwdiff.capture runs the forward under inference mode
        path = hwdiff.capture(model, tmp_path / "c.h5", inputs=ids.numpy(), progress=False).path
        with hwdiff.open_capture(path) as cap:
            stored = {name: cap.activation(name) for name in ("mlp.down_proj", "mlp")}
            assert cap.modules["mlp"].alias_of is None
    else:
        with hwdiff.record(model, kinds=["linear", "mlp"]) as rec, torch.no_grad():
            model(ids)
        stored = {
            name: rec.activations[(name, 0, "output")][0].numpy()
            for name in ("mlp.down_proj", "mlp")
        }
    np.testing.assert_array_equal(stored["mlp.down_proj"], child)
    np.testing.assert_allclose(stored["mlp"], child + 1.0, rtol=0, atol=1e-6)


class _SometimesAddingMLP(_AddingMLP):
    def forward(self, x):
        out = self.down_proj(x)
        if bool(x[0, 0, 0] > 0):  # changes its child's output in place in some batches only
            out.add_(1.0)
        return out


def test_a_link_that_a_later_batch_would_break_is_refused(tmp_path):
    """The file holds a slot either as a link or as data for every row: a link decided in the first
    batch cannot be kept when a later batch changes the tensor in place — refused, not half-linked."""
    torch.manual_seed(0)
    model = _InPlaceToy().eval()
    model.mlp = _SometimesAddingMLP()
    with torch.no_grad():
        model.embed.weight[:, 0] = torch.linspace(
            -1, 1, 16
        )  # token t's first channel > 0 iff t >= 8
    ids = np.array(
        [[1, 2, 3], [4, 5, 6], [12, 13, 14], [9, 10, 11]]
    )  # batch 1: unchanged; batch 2: changed
    with pytest.raises(
        hwdiff.HwdiffError, match="mlp/0/output was stored as a link .* changed in place"
    ):
        hwdiff.capture(model, tmp_path / "c.h5", inputs=ids, batch_size=2, progress=False)
    assert not (tmp_path / "c.h5").exists()
