"""apply_schedule on a vLLM-style module tree: class names, fused modules, weight syncs."""

import numpy as np
import pytest
import torch

from hwdiff.aqn import apply_schedule, find_norms
from hwdiff.calibration import Calibration, LayerSigma
from hwdiff.calibration.schedule import SigmaSchedule
from hwdiff.errors import HwdiffError

H, LAYERS = 4096, 3  # wide norms: the std of 4096 draws is within 2% of σ


class RMSNorm(
    torch.nn.Module
):  # vLLM's class name and call signature: norm(x) or norm(x, residual)
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))

    def forward(self, x, residual=None):
        if residual is not None:
            x = x + residual
            residual = x
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return out if residual is None else (out, residual)


class QKVParallelLinear(torch.nn.Linear):
    pass


class MergedColumnParallelLinear(torch.nn.Linear):
    pass


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(H), RMSNorm(H)
        self.self_attn = torch.nn.Module()
        self.self_attn.qkv_proj = QKVParallelLinear(8, 24)
        self.mlp = torch.nn.Module()
        self.mlp.gate_up_proj = MergedColumnParallelLinear(8, 16)


class Qwen2ForCausalLM(torch.nn.Module):  # vLLM's tree: model.layers.N.*, model.norm, config
    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"model_type": "qwen2", "num_hidden_layers": LAYERS})()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(Layer() for _ in range(LAYERS))
        self.model.norm = RMSNorm(H)
        torch.manual_seed(0)
        for _, norm in find_norms(self):
            norm.weight.data.normal_(1.0, 0.1)


def _calibration(multipliers: dict[str, float]) -> Calibration:
    schedule = SigmaSchedule(2e-2, 2e-4, 10)
    layers = tuple(
        LayerSigma(name, None, None, 0.0, 0.0, 1.0, 1.0, m * 2e-4, m * 2e-2, m)
        for name, m in multipliers.items()
    )
    return Calibration(layers, schedule, "local", "output-rms", "given")


def _qerl_sigma(step: int, total: int, start: float, end: float, k: int) -> float:
    """QeRL's get_sigma_by_step over its sigma_trend, written out here."""
    trend = [start * (end / start) ** (j / (k - 2)) for j in range(k - 1)]
    interval = int(min(step, total) // (total / k))
    return 0.0 if interval == 0 else trend[min(interval - 1, k - 2)]


def test_apply_schedule_hits_exactly_the_vllm_style_norms_with_qerls_stage_sigma():
    model = Qwen2ForCausalLM()
    names = [n for n, _ in find_norms(model)]
    assert len(names) == 2 * LAYERS + 1
    rng = np.random.default_rng(1)
    multipliers = {n: float(rng.uniform(0.5, 2.0)) for n in names}
    multipliers[names[1]] = 0.0  # a norm that gets no noise
    calibration = _calibration(multipliers)
    clean = {n: m.weight.detach().clone() for n, m in find_norms(model)}
    for step in (0, 15, 37, 99):
        sigmas = apply_schedule(model, calibration, step, 100, seed=step)
        stage_sigma = _qerl_sigma(step, 100, 2e-2, 2e-4, 10)
        for name, module in find_norms(model):
            expected = multipliers[name] * stage_sigma
            assert sigmas[name] == pytest.approx(expected, rel=1e-12)
            realized = float(
                (module.weight.detach() - clean[name]).std()
            )  # from the clean weights: no accumulation
            assert realized == pytest.approx(expected, rel=0.05, abs=1e-12), (name, step)
    fused = [n for n, m in model.named_modules() if type(m).__name__.endswith("ParallelLinear")]
    assert len(fused) == 2 * LAYERS and not set(fused) & set(names)


def test_apply_schedule_follows_weight_syncs():
    model = Qwen2ForCausalLM()
    calibration = _calibration({n: 1.0 for n, _ in find_norms(model)})
    apply_schedule(model, calibration, 99, 100, seed=1)
    synced = {n: torch.full((H,), 2.0) for n, _ in find_norms(model)}
    with torch.no_grad():  # a full weight sync: the trainer overwrites the noisy norm weights
        for name, module in find_norms(model):
            module.weight.copy_(synced[name])
    apply_schedule(model, calibration, 99, 100, seed=2)
    for name, module in find_norms(model):  # noise now sits on the new clean weights
        assert float((module.weight.detach() - synced[name]).mean()) == pytest.approx(0, abs=2e-5)
        assert float((module.weight.detach() - synced[name]).std()) == pytest.approx(2e-4, rel=0.05)


def test_apply_schedule_refuses_trees_without_norms_or_with_a_wrong_count():
    with pytest.raises(HwdiffError, match="no RMSNorm"):
        apply_schedule(torch.nn.Linear(2, 2), 1e-3, 1, 2)
    model = Qwen2ForCausalLM()
    model.model.extra = RMSNorm(H)  # 2L + 2 norms in a Qwen2 tree
    with pytest.raises(HwdiffError, match="expected 7"):
        apply_schedule(model, 1e-3, 1, 2)
