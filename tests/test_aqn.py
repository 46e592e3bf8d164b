import logging
import math

import numpy as np
import pytest
import torch

from hwdiff.aqn import AQNInjector, check_effectiveness, effectiveness
from hwdiff.calibration.rounding import changed_fraction
from hwdiff.errors import HwdiffError

from .conftest import L


class RMSNorm(torch.nn.Module):  # vLLM's class name, not a transformers subclass
    def __init__(self, hidden):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden) + 0.1 * torch.randn(hidden))

    def forward(self, x):
        return self.weight * x


class AscendRMSNorm(RMSNorm):  # vLLM-Ascend's class name
    pass


class ForeignModel(torch.nn.Module):
    def __init__(self, layers=3, hidden=16):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "input_layernorm": RMSNorm(hidden),
                    "post_attention_layernorm": AscendRMSNorm(hidden),
                    "proj": torch.nn.Linear(hidden, hidden),
                }
            )
            for _ in range(layers)
        )
        self.norm = AscendRMSNorm(hidden)


def test_finds_2l_plus_1_norms_in_hf_and_in_vllm_named_classes(tiny_fp32):
    assert len(AQNInjector(tiny_fp32, 0.01).targets) == 2 * L + 1
    foreign = ForeignModel()
    assert len(AQNInjector(foreign, 0.01, expected_count=7).targets) == 7


def test_refuses_a_model_without_norms_and_a_wrong_count(tiny_fp32):
    with pytest.raises(HwdiffError, match="no RMSNorm"):
        AQNInjector(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)), 0.01)
    with pytest.raises(HwdiffError, match="expected 57"):
        AQNInjector(tiny_fp32, 0.01, expected_count=57)
    with pytest.raises(HwdiffError, match="not RMSNorms"):
        AQNInjector(tiny_fp32, {"model.layers.0.mlp": 0.01})


def test_qwen25_layout_expects_57_norms():
    from hwdiff.aqn import expected_norm_count
    from hwdiff.capturing.models import qwen25_15b_config

    class Shell(torch.nn.Module):
        config = qwen25_15b_config()

    assert expected_norm_count(Shell()) == 57


def test_apply_resamples_from_clean_weights_and_restore_is_bit_exact(tiny_bf16, caplog):
    before = {name: w.clone() for name, w in tiny_bf16.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="hwdiff.aqn"):
        with AQNInjector(tiny_bf16, 0.05) as injector:
            injector.apply(seed=1)
            first = tiny_bf16.model.norm.weight.clone()
            injector.apply(seed=1)
            assert torch.equal(
                first, tiny_bf16.model.norm.weight
            )  # same seed, same noise: nothing accumulated
            injector.apply(seed=2)
            assert not torch.equal(first, tiny_bf16.model.norm.weight)
    assert f"applied noise to {2 * L + 1} RMSNorm layers" in caplog.text
    assert all(torch.equal(w, before[name]) for name, w in tiny_bf16.state_dict().items())


def test_float32_master_path_gives_the_expected_effective_sigma(tiny_fp32, tiny_bf16):
    clean = tiny_fp32.model.layers[1].input_layernorm.weight.clone()
    with AQNInjector(tiny_fp32, 0.01) as injector:
        injector.apply(seed=3)
        delta = tiny_fp32.model.layers[1].input_layernorm.weight - clean
    assert delta.std().item() == pytest.approx(0.01, rel=0.15)
    weight = tiny_bf16.model.layers[1].input_layernorm.weight
    big = effectiveness("w", weight, 0.05, torch.bfloat16)
    assert big.effective_sigma == pytest.approx(0.05, rel=0.15) and big.changed_frac > 0.95


def test_bf16_rounds_away_a_small_sigma_with_a_warning(tiny_bf16, caplog):
    weight = tiny_bf16.model.layers[1].input_layernorm.weight
    small = effectiveness("w", weight, 5e-4, torch.bfloat16)
    assert small.changed_frac < 0.02 and small.effective_sigma < 5e-4
    with caplog.at_level(logging.WARNING, logger="hwdiff.aqn"):
        checks = check_effectiveness(tiny_bf16, 5e-4)
    assert checks[0].min_changed_frac < 0.02
    assert "rounded away" in caplog.text


@pytest.mark.parametrize(
    "dtype, bits", [("bfloat16", 8), ("float16", 11)]
)  # significand bits, the implicit one too
def test_the_exact_changed_fraction_agrees_with_the_injectors_draw(dtype, bits):
    """calibrate's rounding check (hwdiff.calibration.rounding.changed_fraction, exact) and check_effectiveness
    (aqn.effectiveness, one draw of the injector's noise) answer the same question two ways: on the same
    weights and σ they agree within the draw's binomial standard error."""
    n = 120_000
    # planted: w = 1.5 and -0.75 sit mid-binade (half an ulp either side: 2^-bits, 2^-(bits+1)); w = 1.0
    # starts a binade (half an ulp above, 2^-bits, a quarter below); σ = 2^-bits
    sigma = 2.0**-bits
    halves = {
        1.5: (sigma, sigma),
        -0.75: (sigma / 2, sigma / 2),
        1.0: (sigma / 2, sigma),
    }  # w: (below, above)
    planted = np.repeat(np.array(list(halves), dtype=np.float32), n // len(halves))
    # P(w + σz leaves [w - below, w + above]) = (erfc(below/σ√2) + erfc(above/σ√2)) / 2
    expected = np.mean(
        [
            0.5 * (math.erfc(lo / (sigma * math.sqrt(2))) + math.erfc(hi / (sigma * math.sqrt(2))))
            for lo, hi in halves.values()
        ]
    )
    assert changed_fraction(planted, sigma, dtype) == pytest.approx(expected, abs=1e-12)
    torch_dtype = getattr(torch, dtype)
    cases = [(planted, sigma)] + [
        (
            np.asarray(
                torch.tensor(1 + 0.1 * np.random.default_rng(5).standard_normal(n))
                .to(torch_dtype)
                .float()
            ),
            sigma * factor,
        )
        for factor in (0.25, 1, 4)
    ]
    for seed, (weights, s) in enumerate(cases):
        exact = changed_fraction(weights, s, dtype)
        drawn = effectiveness(
            "w", torch.from_numpy(weights), s, torch_dtype, seed=seed
        ).changed_frac
        se = math.sqrt(
            exact * (1 - exact) / weights.size
        )  # each element changes or not: at most binomial
        assert 0.02 < exact < 0.98 and abs(drawn - exact) < 4 * se, (s, exact, drawn, se)


def test_a_sigma_mapping_leaves_other_norms_clean(tiny_fp32):
    clean = tiny_fp32.model.norm.weight.clone()
    with AQNInjector(tiny_fp32, {"model.layers.0.input_layernorm": 0.02}) as injector:
        used = injector.apply(seed=0)
        assert used["model.norm"] == 0 and torch.equal(tiny_fp32.model.norm.weight, clean)
    assert used["model.layers.0.input_layernorm"] == 0.02
