"""vLLM / vLLM-Ascend layouts on hand-built module trees (tests/vllm_standin.py) with the weights of a
Hugging Face model of the same config: fused norms stored by meaning, diffs across layouts
(``--map vllm``), replay + calibrate, the AQN injector, and the capture entry point of a worker."""

import json
import types

import numpy as np
import pytest
import torch
import transformers

import hwdiff
from hwdiff import structure
from hwdiff.aqn import AQNInjector, apply_schedule
from hwdiff.errors import HwdiffError
from hwdiff.vllm import HwdiffWorkerExtension, record_vllm

from . import vllm_standin as S
from .conftest import run_cli

LAYERS, SEQUENCES, TOKENS = 2, 3, 10


def _hf(arch: str, tie: bool | None = None) -> torch.nn.Module:
    """A tiny fp32 HF model with seeded weights, norm weights away from 1 and non-zero q/k/v biases."""
    extra = {"head_dim": 16} if arch == "Qwen3" else {}
    config = getattr(transformers, f"{arch}Config")(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=arch == "Qwen2" if tie is None else tie,
        **extra,
    )
    torch.manual_seed({"Qwen2": 1, "Llama": 2, "Qwen3": 4}[arch])
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval().requires_grad_(False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.exp(0.4 * torch.randn_like(param)))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (SEQUENCES, TOKENS), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=["Qwen2", "Llama"])
def hf(request):
    return _hf(request.param)


@pytest.fixture(scope="module")
def hf_capture(hf, ids, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "hf.h5"
    return hwdiff.capture(hf, path, inputs=ids.numpy(), record_inputs=True, progress=False).path


def _record(model, path, ids, **options):
    with record_vllm(model, path, **options) as report:
        S.run(model, ids)
    return report.path


# ------------------------------------------------------------------------------------------------
# Norm outputs by meaning
# ------------------------------------------------------------------------------------------------
class _Plain:
    """Independent of hwdiff: plain pre-hooks on every norm clone its arguments and recompute the
    normed tensor by the formula (w or 1 + w) · s / sqrt(mean(s²) + eps), s = x + residual."""

    def __init__(self, model):
        self.expected, self.handles = {}, []
        for name, module in model.named_modules():
            if isinstance(module, (S.RMSNorm, S.GemmaRMSNorm)):
                self.handles.append(
                    module.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                )

    def _hook(self, name):
        def hook(module, args, kwargs):
            x = args[0].clone()
            residual = kwargs.get("residual", args[1] if len(args) > 1 else None)
            s = x if residual is None else residual.clone() + x
            scale = (1.0 + module.weight) if isinstance(module, S.GemmaRMSNorm) else module.weight
            self.expected[name] = (
                s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + module.variance_epsilon) * scale
            )

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize(
    "variant",
    [
        "native",
        "cuda-in-place",
        "ascend",
        "gemma",
        "residual-first-registered",
        "residual-first-detected",
        "gemma-xpu-in-place",
        "unlisted-in-place",
    ],
)
def test_stored_norm_outputs_equal_a_plain_recomputation_bit_for_bit(variant, ids, tmp_path):
    """Whether a norm overwrites its arguments is measured per call: vLLM's GemmaRMSNorm in place on XPU
    (new tensors elsewhere), and an in-place class hwdiff has never heard of, are stored right."""
    norm_cls = {
        "ascend": S.AscendRMSNorm,
        "gemma": S.GemmaRMSNorm,
        "residual-first-registered": S.ResidualFirstRMSNorm,
        "residual-first-detected": SwappedRMSNorm,
        "gemma-xpu-in-place": S.GemmaRMSNorm,
        "unlisted-in-place": UnlistedRMSNorm,
    }.get(variant, S.RMSNorm)
    path = {"cuda-in-place": "cuda", "gemma-xpu-in-place": "xpu", "unlisted-in-place": "xpu"}.get(
        variant, "native"
    )
    model = S.from_hf(_hf("Qwen2"), norm_cls=norm_cls, path=path)
    if variant == "residual-first-registered":
        structure.register_fused_norm("ResidualFirstRMSNorm", normed=1, residual=0)
    plain = _Plain(model)
    try:
        path = _record(model, tmp_path / "v.h5", ids, record_inputs=True)
    finally:
        plain.remove()
        structure.FUSED_NORMS.pop("ResidualFirstRMSNorm", None)
        structure._DETECTED.clear()
    assert len(plain.expected) == 2 * LAYERS + 1
    with hwdiff.open_capture(path) as cap:
        for name, expected in plain.expected.items():
            stored = cap.activation(name)
            assert cap.alias_of(name) is None
            np.testing.assert_array_equal(
                stored, expected.reshape(SEQUENCES, TOKENS, -1).numpy(), err_msg=name
            )
        # the residual stream, not the sub-block output, is each decoder layer's output and the next norm's input
        for layer in range(LAYERS - 1):
            np.testing.assert_array_equal(
                cap.activation(f"model.layers.{layer}"),
                cap.activation(f"model.layers.{layer + 1}.input_layernorm", slot="input"),
            )


class SwappedRMSNorm(S.ResidualFirstRMSNorm):
    """Returns (residual, normed) and is declared nowhere: hwdiff must find the normed element by meaning."""


class UnlistedRMSNorm(S.RMSNorm):
    """A fused add+norm of a name no table lists, overwriting its arguments (its xpu path)."""


def test_in_place_updates_do_not_leak_into_earlier_records(ids, tmp_path):
    """vLLM's CUDA path overwrites o_proj's / down_proj's outputs and the residual in place: what was
    stored for them (and for the norms' arguments, recorded before the call) keeps the values they had."""
    hf = _hf("Qwen2")
    native = _record(S.from_hf(hf), tmp_path / "native.h5", ids, record_inputs=True)
    in_place = _record(S.from_hf(hf, path="cuda"), tmp_path / "cuda.h5", ids, record_inputs=True)
    with hwdiff.open_capture(native) as a, hwdiff.open_capture(in_place) as b:
        assert set(a.modules) == set(b.modules)
        for name, info in a.modules.items():
            for slot in ("output", "input", "input.arg0", "input.arg1"):
                try:
                    expected = a.activation(name, slot=slot)
                except HwdiffError:
                    continue
                np.testing.assert_array_equal(
                    b.activation(name, slot=slot), expected, err_msg=f"{name} {slot}"
                )


# ------------------------------------------------------------------------------------------------
# Diffs across layouts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["native", "cuda"])
def test_diff_hf_against_vllm_layout_matches_every_hf_module(hf, hf_capture, ids, path, tmp_path):
    vllm = _record(S.from_hf(hf, path=path), tmp_path / "vllm.h5", ids, record_inputs=True)
    result = hwdiff.diff(
        hf_capture, vllm, layout_map="vllm", json_path=tmp_path / "d.json", progress=False
    )
    with hwdiff.open_capture(hf_capture) as ref:
        hf_outputs = set(ref.modules)
    compared = {layer.name for layer in result.layers if layer.slot == "output"}
    # computed by HF only: the head (vLLM computes logits outside the model's forward) and act_fn = silu(gate)
    hf_only = {"lm_head"} | {f"model.layers.{i}.mlp.act_fn" for i in range(LAYERS)}
    assert compared == hf_outputs - hf_only
    unmatched = {(u.name, u.reason.split(" (")[0]) for u in result.unmatched}
    assert unmatched == (
        {(n, "only in the reference") for n in hf_only if n in hf_outputs}
        | {(f"model.layers.{i}.mlp.act_fn", "only in the target") for i in range(LAYERS)}
        | {(f"model.layers.{i}.self_attn.attn", "only in the target") for i in range(LAYERS)}
        | (set() if hf.config.tie_word_embeddings else {("lm_head", "never called in the target")})
    )
    for layer in result.layers:
        bound = (
            1e-6
            if layer.name.rsplit(".", 1)[-1]
            in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
            else 2e-6
        )
        assert layer.metrics.rel_l2 <= bound, (layer.name, layer.slot, layer.metrics.rel_l2)
    assert result.layer(
        "model.layers.0.self_attn.q_proj"
    ).exact  # before any attention: same arithmetic
    summary = json.loads((tmp_path / "d.json").read_text())
    assert json.loads(summary["target"]["layout_map"])["name"] == "vllm"


def test_the_split_is_checked_and_a_yaml_map_works(hf, hf_capture, ids, tmp_path):
    vllm = _record(S.from_hf(hf), tmp_path / "vllm.h5", ids)
    rules = "\n".join(
        [
            "name: mine",
            "rules:",
            "  - fused: '{p}.qkv_proj'",
            "    into: ['{p}.q_proj', '{p}.k_proj', '{p}.v_proj']",
            "    sizes: [q, kv, kv]",
            "  - fused: '{p}.gate_up_proj'",
            "    into: ['{p}.gate_proj', '{p}.up_proj']",
            "    sizes: [128, 128]",
            "  - drop: '{p}.act_fn'",
            "    class: SiluAndMul",
            "    reason: not HF's act_fn",
        ]
    )
    (tmp_path / "map.yaml").write_text(rules)
    mine = hwdiff.diff(hf_capture, vllm, layout_map=str(tmp_path / "map.yaml"), progress=False)
    assert mine.layer("model.layers.1.mlp.up_proj").metrics.rel_l2 <= 1e-6
    (tmp_path / "bad.yaml").write_text(rules.replace("[q, kv, kv]", "[q, q, kv]"))
    with pytest.raises(HwdiffError, match="cannot split .*qkv_proj.* add up to"):
        hwdiff.diff(hf_capture, vllm, layout_map=str(tmp_path / "bad.yaml"), progress=False)
    with pytest.raises(HwdiffError, match="--map vllm"):
        hwdiff.diff(hf_capture, vllm, progress=False)
    with pytest.raises(HwdiffError, match="matches no module of either"):
        hwdiff.diff(hf_capture, hf_capture, layout_map="vllm", progress=False)


def test_diff_across_layouts_refuses_other_weights(hf, hf_capture, ids, tmp_path):
    other = S.from_hf(hf)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.01)
    vllm = _record(other, tmp_path / "vllm.h5", ids)
    with pytest.raises(HwdiffError, match="different weights: model.norm"):
        hwdiff.diff(hf_capture, vllm, layout_map="vllm", progress=False)


def test_diff_across_layouts_and_dtypes_checks_weights_at_the_coarser_dtype(hf, ids, tmp_path):
    """An HF bfloat16 capture against a float32 vLLM-layout capture of the same weights: their norm
    weights agree once rounded to bfloat16 (docs/vllm.md), so the pair is compared, not refused;
    weights that differ after rounding are still refused."""
    import copy

    half = copy.deepcopy(hf).to(torch.bfloat16)
    hf_bf16 = hwdiff.capture(half, tmp_path / "hf_bf16.h5", inputs=ids.numpy(), progress=False).path
    same = S.from_hf(hf)
    with torch.no_grad():  # float32 weights whose bfloat16 rounding is the HF bfloat16 model's
        same.model.norm.weight.copy_(
            half.model.norm.weight.float() + 1e-4 * half.model.norm.weight.float()
        )
    result = hwdiff.diff(
        hf_bf16, _record(same, tmp_path / "vllm.h5", ids), layout_map="vllm", progress=False
    )
    assert result.layer("model.norm").metrics.rel_l2 > 0
    with torch.no_grad():
        same.model.norm.weight.mul_(1.05)
    with pytest.raises(HwdiffError, match="different weights: model.norm"):
        hwdiff.diff(
            hf_bf16, _record(same, tmp_path / "vllm2.h5", ids), layout_map="vllm", progress=False
        )


def test_cli_diff_with_map(hf, hf_capture, ids, tmp_path):
    vllm = _record(S.from_hf(hf), tmp_path / "vllm.h5", ids)
    done = run_cli("diff", hf_capture, vllm, "--map", "vllm", "-q")
    assert done.returncode == 0, done.stderr
    assert "model.layers.1.self_attn.v_proj" in done.stdout
    missing = run_cli("diff", hf_capture, vllm, "--map", tmp_path / "none.yaml", "-q")
    assert (
        missing.returncode != 0
        and missing.stderr.count("hwdiff: error:") == 1
        and "built-in" in missing.stderr
    )


# ------------------------------------------------------------------------------------------------
# Replay and calibrate: the same σ on either layout
# ------------------------------------------------------------------------------------------------
def _sigmas(model, root, ids, capture, replay_scope):
    names = [name for name, _ in structure.find_norms(model)]
    planted = dict(zip(names, np.geomspace(3e-3, 3e-2, len(names))))
    clean = capture(model, root / "clean.h5", record_inputs=True)
    with AQNInjector(model, planted) as injector:
        injector.apply(seed=1)
        noisy = capture(model, root / "noisy.h5")
        with replay_scope():
            local = hwdiff.replay(model, clean, root / "local.h5", progress=False).path
    result = hwdiff.diff(clean, noisy, local=local, progress=False)
    calibration = hwdiff.calibrate(result)
    return {
        **{layer.name: layer.sigma_end for layer in calibration.layers},
        **dict.fromkeys(calibration.skipped),
    }


@pytest.mark.parametrize("path", ["native", "cuda"])
def test_replay_and_calibrate_give_the_same_sigma_on_both_layouts(ids, path, tmp_path):
    hf = _hf("Qwen2")
    vllm = S.from_hf(hf, path=path)  # cuda: in-place add+norm, in the capture and in the replay
    (tmp_path / "hf").mkdir(), (tmp_path / "vllm").mkdir()
    hf_sigmas = _sigmas(
        hf,
        tmp_path / "hf",
        ids,
        lambda m, p, **o: hwdiff.capture(m, p, inputs=ids.numpy(), progress=False, **o).path,
        lambda: __import__("contextlib").nullcontext(),
    )
    vllm_sigmas = _sigmas(
        vllm,
        tmp_path / "vllm",
        ids,
        lambda m, p, **o: _record(m, p, ids, **o),
        lambda: S.set_forward_context(TOKENS),
    )
    assert set(hf_sigmas) == set(vllm_sigmas) and len(hf_sigmas) == 2 * LAYERS + 1
    assert (
        vllm_sigmas.pop("model.norm") is None
    )  # vLLM never calls lm_head in the model: named, not calibrated
    for name, sigma in vllm_sigmas.items():
        assert sigma > 0 and sigma == pytest.approx(hf_sigmas[name], rel=0.05), name


# ------------------------------------------------------------------------------------------------
# AQN on the vLLM-style trees
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_cls", [S.RMSNorm, S.AscendRMSNorm])
@pytest.mark.parametrize("arch", ["Qwen2", "Llama"])
def test_aqn_injector_and_apply_schedule_find_the_vllm_norms(arch, norm_cls):
    model = S.from_hf(_hf(arch), norm_cls=norm_cls)
    expected = [n for n, m in model.named_modules() if isinstance(m, norm_cls)]
    assert len(expected) == 2 * LAYERS + 1
    clean = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in expected}
    with AQNInjector(
        model, 0.01
    ) as injector:  # the family's count (2L + 1) is checked on construction
        assert injector.targets == expected
        injector.apply(seed=0)
        assert all(
            not torch.equal(dict(model.named_modules())[n].weight, w) for n, w in clean.items()
        )
    assert all(torch.equal(dict(model.named_modules())[n].weight, w) for n, w in clean.items())
    sigmas = apply_schedule(model, 0.01, step=3, total_steps=10, seed=0)
    assert sorted(sigmas) == sorted(expected) and all(value == 0.01 for value in sigmas.values())
    with pytest.raises(HwdiffError, match=f"matched {2 * LAYERS + 1} RMSNorm layers, expected 4"):
        AQNInjector(model, 0.01, expected_count=4)


# ------------------------------------------------------------------------------------------------
# The flattened batch and the worker entry point
# ------------------------------------------------------------------------------------------------
def test_flat_sequences_reshapes_only_whole_prompts_of_one_length():
    assert structure.flat_sequences(torch.arange(5).repeat(3)) == (3, 5)
    assert structure.flat_sequences(torch.tensor([0])) == (1, 1)
    for positions, reason in [
        (torch.tensor([7, 9]), "not whole prompts"),
        (torch.cat([torch.arange(4), torch.arange(3)]), "not prompts of one length"),
        (torch.arange(4).repeat(3, 1), "M-RoPE"),
    ]:
        with pytest.raises(structure.SemanticsError, match=reason):
            structure.flat_sequences(positions)


def test_record_vllm_keeps_the_prefill_and_skips_decode_steps(ids, tmp_path):
    model = S.from_hf(_hf("Qwen2"))
    with record_vllm(model, tmp_path / "v.h5") as report:
        S.run(model, ids)
        with (
            S.set_forward_context(1),
            torch.inference_mode(),
        ):  # a decode step: one new token per sequence
            model(input_ids=ids[:, -1], positions=torch.full((SEQUENCES,), TOKENS))
    assert (report.sequences, report.tokens) == (SEQUENCES, TOKENS) and len(report.skipped) == 1
    with hwdiff.open_capture(report.path) as cap:
        np.testing.assert_array_equal(cap.input_ids, ids.numpy())
        assert cap.meta["layout"] == "vllm" and cap.layout("model.layers.0") == "tokens"
    with pytest.raises(HwdiffError, match="nothing was recorded .*not prompts of one length"):
        with record_vllm(model, tmp_path / "w.h5"):
            with (
                S.set_forward_context(5),
                torch.inference_mode(),
            ):  # (the stand-in's attention cannot do ragged batches)
                model(
                    input_ids=torch.tensor([1, 2, 3, 4, 5]), positions=torch.tensor([0, 1, 2, 0, 1])
                )
    assert not (tmp_path / "w.h5").exists()


def test_worker_extension_records_the_model_the_worker_holds(ids, tmp_path):
    model = S.from_hf(_hf("Llama"))
    worker = types.SimpleNamespace(
        model_runner=types.SimpleNamespace(get_model=lambda: model),
        vllm_config=types.SimpleNamespace(
            parallel_config=types.SimpleNamespace(tensor_parallel_size=1),
            model_config=types.SimpleNamespace(enforce_eager=True),
        ),
    )
    start, stop = HwdiffWorkerExtension.hwdiff_start, HwdiffWorkerExtension.hwdiff_stop
    assert start(worker, str(tmp_path / "rank0.h5"), record_inputs=True) == str(
        tmp_path / "rank0.h5"
    )
    S.run(model, ids)  # the engine's step (llm.generate) between the two collective_rpc calls
    with hwdiff.open_capture(stop(worker)) as cap:
        assert (
            cap.input_ids.shape == (SEQUENCES, TOKENS)
            and "model.layers.1.mlp.gate_up_proj" in cap.modules
        )
    worker.vllm_config.parallel_config.tensor_parallel_size = 2
    with pytest.raises(HwdiffError, match="tensor_parallel_size is 2"):
        start(worker, str(tmp_path / "rank1.h5"))
    worker.vllm_config.parallel_config.tensor_parallel_size = 1
    for key in (
        "pipeline_parallel_size",
        "data_parallel_size",
    ):  # every worker would write the same path
        setattr(worker.vllm_config.parallel_config, key, 2)
        with pytest.raises(HwdiffError, match=f"{key} is 2"):
            start(worker, str(tmp_path / "rank1.h5"))
        setattr(worker.vllm_config.parallel_config, key, 1)
    worker.vllm_config.model_config.enforce_eager = False
    with pytest.raises(HwdiffError, match="enforce_eager=True"):
        start(worker, str(tmp_path / "rank1.h5"))


def test_worker_extension_applies_the_aqn_schedule_the_docs_name(tmp_path):
    """docs/vllm.md sends ``collective_rpc("hwdiff_apply_schedule", …)``: the method exists and puts noise
    on every RMSNorm of the worker's model, σ from the schedule (stage 1 of 10 → σ_start)."""
    model = S.from_hf(_hf("Qwen2"))
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(get_model=lambda: model))
    clean = {n: m.weight.detach().clone() for n, m in structure.find_norms(model)}
    sigmas = HwdiffWorkerExtension.hwdiff_apply_schedule(worker, 0.01, 1, 10, seed=0)
    assert sorted(sigmas) == sorted(clean) and set(sigmas.values()) == {0.01}
    for name, module in structure.find_norms(model):
        assert (module.weight - clean[name]).std().item() == pytest.approx(0.01, rel=0.3)


def test_hwdiff_record_on_a_vllm_model_gives_sequences_and_tokens(ids, tmp_path):
    model = S.from_hf(_hf("Qwen2"), path="cuda")
    with hwdiff.record(model, kinds="rmsnorm") as rec:
        S.run(model, ids)
    stored = _record(model, tmp_path / "v.h5", ids, kinds="rmsnorm")
    with hwdiff.open_capture(stored) as cap:
        for name in cap.modules:
            in_memory = rec.activations[(name, 0, "output")][0]
            assert in_memory.shape == (SEQUENCES, TOKENS, 64)
            np.testing.assert_array_equal(in_memory.numpy(), cap.activation(name))


@pytest.mark.parametrize(
    "text, message",
    [
        ('rules:\n  - {drop: "x", class: "(["}\n', "bad class regex"),
        ('rules:\n  - {fused: "a.qkv", into: [q, k], sizes: [-128, 384]}\n', "part size below 1"),
        ("rules: [\n  - {a: b\n", "not a readable YAML mapping"),
        ('rules:\n  - {rename: "a"}\n', "needs 'to'"),
    ],
)
def test_a_bad_mapping_file_is_one_clear_line(tmp_path, text, message):
    from hwdiff.compare.layouts import load_map

    path = tmp_path / "map.yaml"
    path.write_text(text)
    with pytest.raises(HwdiffError, match=message) as refused:
        load_map(path)
    assert "\n" not in str(refused.value)


# ------------------------------------------------------------------------------------------------
# The trees vLLM and vLLM-Ascend build on other models and chips
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["native", "cuda"])
def test_qwen3_tree_q_and_k_norms_compare_with_hugging_face(path, ids, tmp_path):
    """vLLM's Qwen3 normalises views [num_tokens, heads, head_dim] of q and k, then (cuda) rotates them in
    place: the stored q/k norms are HF's to float32 rounding, and the in-place rotary leaves them as they were."""
    hf = _hf("Qwen3")
    reference = hwdiff.capture(
        hf, tmp_path / "hf.h5", inputs=ids.numpy(), record_inputs=True, progress=False
    ).path
    vllm = _record(S.from_hf(hf, path=path), tmp_path / "vllm.h5", ids, record_inputs=True)
    result = hwdiff.diff(reference, vllm, layout_map="vllm", progress=False)
    for layer in range(LAYERS):
        for norm in ("q_norm", "k_norm"):
            compared = result.layer(f"model.layers.{layer}.self_attn.{norm}")
            assert compared.shape == (SEQUENCES, TOKENS, 4 if norm == "q_norm" else 2, 16)
            assert compared.metrics.rel_l2 <= 1e-6, (norm, compared.metrics.rel_l2)
    assert all(layer.metrics.rel_l2 <= 2e-6 for layer in result.layers), max(
        (layer.metrics.rel_l2, layer.name) for layer in result.layers
    )


@pytest.mark.parametrize("chip", ["910", "310p"])
def test_ascend_embedding_and_activation_are_captured(chip, ids, tmp_path):
    """AscendVocabParallelEmbedding and AscendSiluAndMul (310P: AscendSiluAndMul310, its own forward) are an
    embedding and an activation by what they are: recorded, with the values a plain lookup and swiglu give."""
    model = S.from_hf(_hf("Qwen2"), ascend=chip)
    assert (
        type(model.model.layers[0].mlp.act_fn).__name__
        == {"910": "AscendSiluAndMul", "310p": "AscendSiluAndMul310"}[chip]
    )
    path = _record(model, tmp_path / "npu.h5", ids, record_inputs=True)
    with hwdiff.open_capture(path) as cap:
        assert cap.modules["model.embed_tokens"].kind == "embedding"
        table = model.model.embed_tokens.weight.detach().numpy()
        np.testing.assert_array_equal(cap.activation("model.embed_tokens"), table[ids.numpy()])
        for layer in range(LAYERS):
            act = f"model.layers.{layer}.mlp.act_fn"
            assert cap.modules[act].kind == "activation"
            gate_up = cap.activation(f"model.layers.{layer}.mlp.gate_up_proj").astype(np.float64)
            gate, up = gate_up[..., :128], gate_up[..., 128:]
            np.testing.assert_allclose(
                cap.activation(act), gate / (1 + np.exp(-gate)) * up, rtol=1e-5, atol=1e-6
            )


def test_an_ascend_norm_with_a_bias_keeps_offset_zero_and_its_bias(ids, tmp_path):
    """A quantised checkpoint gives AscendRMSNorm a bias: y = w·x̂ + b. The zero-weight probe zeroes the
    bias too, so the norm is a ``w`` norm (offset 0, not the 1 of a Gemma norm), and the stored output
    carries the bias."""
    model = S.from_hf(_hf("Qwen2"), ascend="910", norm_bias=True)
    structure._OFFSETS.clear()
    with torch.no_grad():
        for _, norm in structure.find_norms(model):
            norm.bias.copy_(
                0.5 + 0.1 * torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(5))
            )
    plain = _Plain(model)
    try:
        path = _record(model, tmp_path / "npu.h5", ids, record_inputs=True)
    finally:
        plain.remove()
        structure._OFFSETS.clear()
    with hwdiff.open_capture(path) as cap:
        for name, expected in plain.expected.items():
            assert cap.modules[name].weight_offset == 0.0, name
            bias = dict(model.named_modules())[name].bias
            np.testing.assert_allclose(
                cap.activation(name),
                (expected + bias).reshape(SEQUENCES, TOKENS, -1).numpy(),
                rtol=1e-6,
                atol=1e-6,
                err_msg=name,
            )


def test_a_tied_head_that_vllm_never_calls_is_listed_not_recorded(ids, tmp_path):
    """vLLM's Llama ties the head by sharing the embedding's weight with a ParallelLMHead it never calls."""
    model = S.from_hf(_hf("Llama", tie=True))
    assert (
        model.lm_head is not model.model.embed_tokens
        and model.lm_head.weight is model.model.embed_tokens.weight
    )
    assert structure.module_kind("lm_head", model.lm_head) == "head"
    with hwdiff.open_capture(_record(model, tmp_path / "v.h5", ids)) as cap:
        assert "lm_head" in json.loads(cap.meta["never_called"])
        assert cap.modules["model.embed_tokens"].kind == "embedding"
