import numpy as np
import pytest
import torch

import hwdiff
from hwdiff.capturing.emulate import emulation, parse
from hwdiff.errors import HwdiffError

from .conftest import run_cli

CAP = dict(limit=6, max_tokens=24, batch_size=3, progress=False)
CONTAINERS = {"decoder_layer"}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    model = hwdiff.load_model("tiny-qwen2", dtype="float32")
    path = hwdiff.capture(
        model, tmp_path_factory.mktemp("emu") / "clean.h5", record_inputs=True, **CAP
    ).path
    return model, path


@pytest.mark.parametrize(
    "profile, perturbed",
    [
        ("aqn:sigma=0.01", {"rmsnorm"}),
        ("bf16-truncate", {"linear", "head", "attention", "mlp"}),
        ("bf16-block-accum:block=32", {"linear", "head", "attention", "mlp"}),
        ("approx-silu", {"activation", "mlp"}),
        ("rmsnorm-order", {"rmsnorm"}),
    ],
)
def test_each_profile_is_localized_by_replay_and_diff(tmp_path, clean, profile, perturbed):
    model, reference = clean
    local = hwdiff.replay(
        model, reference, tmp_path / "local.h5", emulate=[profile], progress=False
    ).path
    result = hwdiff.diff(reference, local, progress=False)
    with_error = {layer.kind for layer in result.outputs if not layer.exact}
    assert (
        with_error == perturbed | CONTAINERS
    )  # the perturbed modules and the layers that contain them
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
    assert ((reference - truncated).abs() <= reference.abs() * 2.0**-7).all()


def test_capture_records_the_profile(tmp_path):
    model = hwdiff.load_model("tiny-qwen2")
    path = hwdiff.capture(
        model, tmp_path / "e.h5", emulate=["bf16-block-accum:block=16"], **CAP
    ).path
    with hwdiff.open_capture(path) as cap:
        assert cap.meta["emulate"] == "bf16-block-accum:block=16"
        assert np.isfinite(cap.activation("lm_head")).all()


@pytest.mark.parametrize(
    "text, message",
    [
        ("fast-math", "unknown emulation profile"),
        ("aqn:mu=1", "takes sigma, seed"),
        ("aqn:sigma=x", "must be a number"),
        ("bf16-block-accum:block=0", "out-of-range"),
    ],
)
def test_bad_profiles_are_clear_errors(text, message):
    with pytest.raises(HwdiffError, match=message):
        parse(text)


def test_cli_emulate(tmp_path):
    proc = run_cli(
        "capture",
        "--device",
        "cpu",
        "--limit",
        "2",
        "--max-tokens",
        "8",
        "-q",
        "--emulate",
        "approx-silu",
        "-o",
        tmp_path / "e.h5",
    )
    assert proc.returncode == 0, proc.stderr
    bad = run_cli(
        "capture",
        "--device",
        "cpu",
        "--limit",
        "2",
        "-q",
        "--emulate",
        "nope",
        "-o",
        tmp_path / "x.h5",
    )
    assert (
        bad.returncode == 2
        and "unknown emulation profile" in bad.stderr
        and "Traceback" not in bad.stderr
    )


# ------------------------------------------------------------------------------------------------
# Linear subclasses that return tuples (Llama 4's router) and gated norms (Qwen3-Next, Bamba)
# ------------------------------------------------------------------------------------------------
def _bf16_round(values: np.ndarray) -> np.ndarray:
    """float32 → nearest bfloat16 (ties to even), as float32: numpy bit arithmetic, not torch."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def _block_accum(x: np.ndarray, weight: np.ndarray, block: int) -> np.ndarray:
    total = np.zeros((x.shape[0], weight.shape[0]), dtype=np.float32)
    for start in range(0, x.shape[1], block):
        total = _bf16_round(
            total + x[:, start : start + block] @ weight[:, start : start + block].T
        )
    return total


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    import transformers

    config = transformers.Llama4TextConfig(
        hidden_size=64,
        intermediate_size=32,
        intermediate_size_mlp=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        num_local_experts=4,
        num_experts_per_tok=1,
        max_position_embeddings=64,
        attention_chunk_size=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama4") / "model"
    transformers.Llama4ForCausalLM(config).save_pretrained(path)
    return hwdiff.load_model(str(path), dtype="float32")


def test_a_linear_that_returns_a_tuple_is_emulated_where_its_product_is_computed(llama4):
    router = llama4.model.layers[
        0
    ].feed_forward.router  # Llama4Router(nn.Linear) returns (scores, logits)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), emulation(llama4, ["bf16-block-accum:block=16"]):
        scores, logits = router(x)
    expected = _block_accum(x.numpy(), router.weight.detach().numpy(), 16)
    np.testing.assert_array_equal(logits.numpy(), expected)
    top = np.argmax(expected, axis=1)  # top-1 routing, sigmoid of the chosen logit, 0 elsewhere
    want = np.zeros_like(expected)
    want[np.arange(10), top] = 1 / (1 + np.exp(-expected[np.arange(10), top]))
    np.testing.assert_allclose(scores.numpy(), want, rtol=1e-6, atol=0)


def test_llama4_capture_and_replay_under_block_accumulation(llama4, tmp_path):
    ids = np.random.default_rng(0).integers(0, 128, (4, 8))
    options = dict(inputs=ids, batch_size=2, progress=False, emulate=["bf16-block-accum:block=16"])
    path = hwdiff.capture(llama4, tmp_path / "e.h5", record_inputs=True, **options).path
    local = hwdiff.replay(
        llama4, path, tmp_path / "r.h5", emulate=["bf16-block-accum:block=16"], progress=False
    ).path
    result = hwdiff.diff(path, local, progress=False)
    router = [layer for layer in result.outputs if layer.name.endswith("feed_forward.router")]
    assert router and all(
        layer.exact for layer in router
    )  # replayed under the same emulation: bit-identical


def _gated(kind: str) -> torch.nn.Module:
    from transformers.models.bamba.modeling_bamba import BambaRMSNormGated
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

    norm = (
        Qwen3NextRMSNormGated(64, eps=1e-6)
        if kind == "qwen3_next"
        else BambaRMSNormGated(64, group_size=16)
    )
    with torch.no_grad():
        norm.weight.copy_(
            torch.exp(0.3 * torch.randn(64, generator=torch.Generator().manual_seed(2)))
        )
    return torch.nn.ModuleDict({"norm": norm})


def _gated_numpy(
    kind: str, x: np.ndarray, gate: np.ndarray, weight: np.ndarray, group: int
) -> np.ndarray:
    """float64 oracle: Qwen3-Next normalises x then multiplies by silu(gate); Bamba multiplies first and
    normalises per group."""
    silu = gate / (1 + np.exp(-gate))
    source = x * silu if kind == "bamba" else x
    grouped = source.reshape(*source.shape[:-1], -1, group)
    normed = (grouped / np.sqrt((grouped**2).mean(-1, keepdims=True) + 1e-6)).reshape(source.shape)
    return weight * normed * (silu if kind == "qwen3_next" else 1.0)


@pytest.mark.parametrize("kind", ["qwen3_next", "bamba"])
def test_rmsnorm_order_calls_a_gated_norm_with_its_gate(kind):
    holder = _gated(kind)
    generator = torch.Generator().manual_seed(3)
    x, gate = torch.randn(6, 64, generator=generator), torch.randn(6, 64, generator=generator)
    with torch.no_grad():
        own = holder["norm"](x, gate)
        with emulation(holder, ["rmsnorm-order:chunk=8"]):
            reordered = holder["norm"](x, gate)
    oracle = _gated_numpy(
        kind,
        x.double().numpy(),
        gate.double().numpy(),
        holder["norm"].weight.detach().double().numpy(),
        64 if kind == "qwen3_next" else 16,
    )
    for value in (
        own,
        reordered,
    ):  # both within float32 rounding of the formula (the bug gave 9.05)
        assert np.linalg.norm(value.double().numpy() - oracle) / np.linalg.norm(oracle) < 1e-6
    assert (
        not torch.equal(reordered, own) or kind == "bamba"
    )  # another order moves some float32 bits


def test_rmsnorm_order_refuses_a_norm_it_cannot_reproduce():
    class BiasRMSNorm(torch.nn.Module):  # w·x̂ + b: no RMSNorm form hwdiff knows
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16))
            self.bias = torch.nn.Parameter(torch.full((16,), 0.5))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) + self.bias

    holder = torch.nn.ModuleDict({"norm": BiasRMSNorm()})
    with (
        emulation(holder, ["rmsnorm-order"]),
        pytest.raises(HwdiffError, match="cannot emulate BiasRMSNorm"),
    ):
        holder["norm"](torch.randn(3, 16))
