"""Noise laws and depth correlation: the injector draws them, calibrate recovers them from a planted truth."""

import math

import numpy as np
import pytest

import hwdiff
from hwdiff.aqn import AQNInjector, find_norms
from hwdiff.calibration import calibrate, load_sigma, save
from hwdiff.compare.laws import mixing_matrix, standardized
from hwdiff.errors import HwdiffError

from .conftest import L

CAP = dict(limit=8, max_tokens=48, batch_size=4, progress=False)


@pytest.mark.parametrize(
    "law,df,kurtosis", [("gaussian", None, 0.0), ("student_t", 8.0, 1.5), ("laplace", None, 3.0)]
)
def test_standardized_laws_have_unit_std_and_their_kurtosis(law, df, kurtosis):
    x = standardized(law, df, np.random.default_rng(0), 2_000_000)
    assert x.std() == pytest.approx(1.0, abs=0.01)
    excess = ((x - x.mean()) ** 4).mean() / x.var() ** 2 - 3  # t(8): 6/(8-4); Laplace: 3
    assert excess == pytest.approx(kurtosis, abs=0.25)


def test_student_t_needs_df_above_two():
    with pytest.raises(HwdiffError, match="df > 2"):
        standardized("student_t", 2.0, np.random.default_rng(0), 10)
    with pytest.raises(HwdiffError, match="df > 2"):
        AQNInjector(hwdiff.load_model("tiny-qwen2"), 1e-2, law="student_t", df=1.5)


def test_mixing_matrix_gives_ar1_and_repairs_a_matrix_that_is_not_positive_definite():
    m = mixing_matrix(4, 0.8)
    assert np.allclose(m @ m.T, 0.8 ** np.abs(np.subtract.outer(range(4), range(4))))
    bad = np.array([[1, 0.9, -0.9], [0.9, 1, 0.9], [-0.9, 0.9, 1.0]])  # not positive definite
    fixed = mixing_matrix(3, matrix=bad) @ mixing_matrix(3, matrix=bad).T
    assert np.allclose(np.diag(fixed), 1) and np.linalg.eigvalsh(fixed).min() > 0


def _plant(root, *, law, df=None, rho=None, sigma=1e-2):
    """Inject the law into tiny-qwen2 (fp32), capture, replay, diff --local; returns the weight noise drawn."""
    model = hwdiff.load_model("tiny-qwen2", dtype="float32")
    clean = hwdiff.capture(model, root / "clean.h5", record_inputs=True, **CAP).path
    before = {n: m.weight.detach().double().numpy().copy() for n, m in find_norms(model)}
    with AQNInjector(model, sigma, law=law, df=df, rho=rho) as injector:
        injector.apply(seed=11)
        drawn = {n: m.weight.detach().double().numpy() - before[n] for n, m in find_norms(model)}
        noisy = hwdiff.capture(model, root / "noisy.h5", **CAP).path
        local = hwdiff.replay(model, clean, root / "local.h5", progress=False).path
    hwdiff.diff(clean, noisy, local=local, out=root / "diff.h5", progress=False)
    return drawn


def test_planted_student_t_is_recognised_with_its_df_and_sigma(tmp_path):
    drawn = _plant(tmp_path, law="student_t", df=3.0)
    result = calibrate(tmp_path / "diff.h5")
    laws = [layer.law for layer in result.layers]
    assert laws.count("student_t") > len(laws) / 2, laws
    dfs = {layer.df for layer in result.layers if layer.law == "student_t"}
    assert len(dfs) == 1 and 2.3 <= dfs.pop() <= 4.2  # pooled over the norms
    for (
        layer
    ) in result.layers:  # σ: the realized std of the drawn noise (x̂'s power is near uniform here)
        assert layer.sigma_end == pytest.approx(np.sqrt(np.mean(drawn[layer.name] ** 2)), rel=0.2)
    assert abs(result.rho) < 0.2  # independent draws: no correlation recommended
    loaded = load_sigma(save(result, tmp_path / "s.yaml"))
    assert [l.law for l in loaded.layers] == laws and loaded.layer(
        result.layers[0].name
    ).df == result.layers[0].df


def test_planted_gaussian_stays_gaussian(tmp_path):
    _plant(tmp_path, law="gaussian")
    laws = [layer.law for layer in calibrate(tmp_path / "diff.h5").layers]
    assert laws.count("gaussian") > len(laws) / 2, laws


def test_planted_depth_correlation_is_recovered(tmp_path):
    drawn = _plant(tmp_path, law="gaussian", rho=0.8)
    # the truth: the drawn noise of consecutive input_layernorms correlates as planted
    truth = np.mean(
        [
            np.corrcoef(
                drawn[f"model.layers.{i}.input_layernorm"],
                drawn[f"model.layers.{i + 1}.input_layernorm"],
            )[0, 1]
            for i in range(L - 1)
        ]
    )
    assert truth == pytest.approx(0.8, abs=0.1)
    result = calibrate(tmp_path / "diff.h5")
    assert result.rho == pytest.approx(0.8, abs=0.15), result.correlation_note


def test_injector_follows_the_calibrated_law_and_correlation(tmp_path):
    _plant(tmp_path, law="student_t", df=3.0, rho=0.8)
    result = calibrate(tmp_path / "diff.h5")
    model = hwdiff.load_model("tiny-qwen2", dtype="float32")
    with AQNInjector(model, result) as injector:
        assert injector.rho == result.rho and all(
            law[0] in ("student_t", "laplace", "gaussian") for law in injector.laws.values()
        )
        assert injector.laws[result.layers[0].name] == (result.layers[0].law, result.layers[0].df)
        sigmas = injector.apply(seed=0)
    assert all(math.isfinite(v) for v in sigmas.values())


def test_verify_checks_the_law_it_injects(tmp_path):
    from hwdiff.measure.sigma_probe import verify

    _plant(tmp_path, law="student_t", df=3.0)
    result = calibrate(tmp_path / "diff.h5")
    check = verify(result, hwdiff.load_model("tiny-qwen2", dtype="float32"))
    heavy = [c for c in check.layers if c.law == "student_t"]
    assert heavy and sum(c.law_induced == "student_t" for c in heavy) > len(heavy) / 2
    assert check.passed  # the planted σ at the norm: induced / target near 1


def test_depth_correlation_pairs_only_norms_at_the_same_place_in_their_layers():
    """Zamba2's hybrid layer holds ``shared_transformer.input_layernorm`` (width 2·hidden: it normalises
    the hidden state concatenated with the embeddings) beside the mamba layers' ``input_layernorm``
    (width hidden); grouping by the last name component paired them and calibrate crashed in
    np.corrcoef. Planted: two 64-wide norms with correlated noise, one 128-wide norm between them."""
    from hwdiff.calibration.law_evidence import _evidence

    rng = np.random.default_rng(0)
    a = rng.normal(size=64)
    b = 0.6 * a + 0.8 * rng.normal(size=64)
    noise = {
        "model.layers.0.input_layernorm": a,
        "model.layers.1.shared_transformer.input_layernorm": rng.normal(size=128),
        "model.layers.2.input_layernorm": b,
    }
    evidence = _evidence(noise)
    assert evidence.rho_measured == pytest.approx(float(np.corrcoef(a, b)[0, 1]), rel=1e-12)


class _Capture:
    """What law_evidence._noise reads from a capture: modules and activations by slot."""

    def __init__(self, **slots):
        self.slots, self.modules = slots, {"norm": None}

    def activation(self, name, call=0, slot="output"):
        return self.slots[slot]


def test_equivalent_noise_of_a_per_head_norm_is_taken_over_its_last_axis():
    """q/k norms and Qwen3-Next's gated norm are stored [batch, tokens, heads, head_dim] and normalise each
    head's vector: planted weight noise z (one value per head_dim channel) is recovered exactly. It was
    normalised over the heads axis (a wrong Z) and, pooled with 1-D norms, crashed calibrate."""
    from hwdiff.calibration.law_evidence import EPS, _noise

    rng = np.random.default_rng(0)
    x, w, z = rng.normal(size=(2, 5, 3, 8)), 1 + 0.1 * rng.normal(size=8), 0.01 * rng.normal(size=8)
    x_hat = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + EPS)
    mask = np.ones((2, 5), dtype=bool)
    mask[1, 3:] = False  # padding: its rows carry garbage that must not count
    y_loc = x_hat * (w + z)
    y_loc[1, 3:] += 100.0
    found = _noise(_Capture(input=x, output=x_hat * w), _Capture(output=y_loc), "norm", mask)
    assert found.shape == (8,) and np.allclose(found, z, rtol=1e-9, atol=1e-15)
