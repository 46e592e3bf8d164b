"""Calibration truth: planted σ recovered against numbers computed here (numpy), verify that can fail,
exports that the verl fork reads as intended."""

import logging
import math

import numpy as np
import pytest
import torch
import yaml

import hwdiff
from hwdiff import structure
from hwdiff.aqn import AQNInjector, find_norms
from hwdiff.calibration import (
    QERL_PRESETS,
    calibrate,
    format_calibration,
    load_sigma,
    norms_to_probe,
    save,
    start_rule,
)
from hwdiff.calibration.exporters import export, hydra_overrides
from hwdiff.calibration.rounding import changed_fraction
from hwdiff.errors import HwdiffError
from hwdiff.measure.sigma_probe import verify
from hwdiff.store import open_capture

from .conftest import L, run_cli

CAP = dict(limit=8, max_tokens=48, batch_size=4, progress=False)
OUTLIERS = (
    3,
    40,
    77,
    128,
    190,
    250,
)  # residual channels ×20: ~90% of x̂'s power in 6 of 256 channels


def _concentrated_model(dtype: str):
    """tiny-qwen2 with outlier channels in the residual stream, lognormal norm weights, 0.02 on the outliers."""
    model = hwdiff.load_model("tiny-qwen2", dtype="float32")
    rng = np.random.default_rng(5)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, list(OUTLIERS)] *= 20
        for _, norm in find_norms(model):
            weight = rng.lognormal(-0.5, 0.6, norm.weight.shape[0])
            weight[list(OUTLIERS)] = (
                0.02  # as in real LLMs: small norm weights on the outlier channels
            )
            norm.weight.copy_(torch.from_numpy(weight))
    return model.to(getattr(torch, dtype))


def _effective_sigma(clean_path, name, delta_w, eps=1e-6):
    """σ_eff = sqrt(Σ_c Δw_c²·P_c / Σ_c P_c), P_c = Σ_t x̂_tc² over real tokens (x̂ from the recorded input)."""
    with open_capture(clean_path) as cap:
        x = cap.activation(name, slot="input").astype(np.float64)
        mask = cap.attention_mask.astype(bool)
    x = x[mask]  # [real tokens, channels]
    x_hat = x / np.sqrt((x**2).mean(axis=1, keepdims=True) + eps)
    power = (x_hat**2).sum(axis=0)
    return float(np.sqrt((delta_w**2 * power).sum() / power.sum()))


def _plant(root, dtype, sigmas):
    model = _concentrated_model(dtype)
    names = [name for name, _ in find_norms(model)]
    order = np.random.default_rng(0).permutation(len(names))
    planted = dict(zip(names, np.asarray(sigmas)[order]))
    clean = hwdiff.capture(model, root / "clean.h5", record_inputs=True, **CAP).path
    before = {n: m.weight.detach().double().numpy().copy() for n, m in find_norms(model)}
    with AQNInjector(model, planted) as injector:
        injector.apply(seed=1)
        delta = {n: m.weight.detach().double().numpy() - before[n] for n, m in find_norms(model)}
        noisy = hwdiff.capture(model, root / "noisy.h5", **CAP).path
        local = hwdiff.replay(model, clean, root / "local.h5", progress=False).path
    hwdiff.diff(clean, noisy, local=local, out=root / "diff.h5", progress=False)
    hwdiff.diff(clean, noisy, out=root / "plain.h5", progress=False)
    realized = {n: _effective_sigma(clean, n, delta[n]) for n in names}
    return model, planted, realized, root


@pytest.fixture(scope="module")
def fp32_plant(tmp_path_factory):
    return _plant(tmp_path_factory.mktemp("fp32"), "float32", np.geomspace(2e-3, 2e-2, 2 * L + 1))


@pytest.fixture(scope="module")
def bf16_plant(tmp_path_factory):
    # bf16: σ well above the rounding noise of the norm output (two roundings ≈ 2.3e-3 relative)
    return _plant(tmp_path_factory.mktemp("bf16"), "bfloat16", np.geomspace(1e-2, 4e-2, 2 * L + 1))


@pytest.mark.parametrize("plant", ["fp32_plant", "bf16_plant"])
def test_sigma_recovered_against_the_power_weighted_realized_sigma(plant, request):
    model, planted, realized, root = request.getfixturevalue(plant)
    result = calibrate(root / "diff.h5")
    assert result.method == "local" and result.conversion == "output-rms"
    for layer in result.layers:
        assert layer.block_error == 0  # the sub-blocks' weights are clean: no local error there
        assert layer.sigma_end == pytest.approx(realized[layer.name], rel=0.2), layer.name
    # the old shortcut ε·rms(w) is far off on these activations: the test would catch a regression to it
    shortcut = [l.norm_error * l.weight_rms / realized[l.name] for l in result.layers]
    assert max(abs(np.log(shortcut))) > np.log(1.5)


def test_measured_conversion_on_bf16_within_25_percent_of_realized(bf16_plant):
    model, _, realized, root = bf16_plant
    result = hwdiff.calibrate(root / "diff.h5", model=model)
    assert result.conversion == "measured"
    assert all(l.gain_block is not None and l.gain_block > 0 for l in result.layers if l.sub_block)
    for layer in result.layers:
        assert layer.sigma_end == pytest.approx(realized[layer.name], rel=0.25), layer.name
    # the σ math itself takes the measured gains and touches no model: the same calibration from them
    gains = {l.name: l.gain_block for l in result.layers if l.gain_block is not None}
    assert calibrate(root / "diff.h5", gains=gains) == result


def test_the_sigma_math_refuses_a_model_and_names_the_call_that_measures(fp32_plant):
    model, *_, root = fp32_plant
    with pytest.raises(HwdiffError, match=r"call hwdiff\.calibrate\(diff, model=model\)"):
        calibrate(root / "diff.h5", model=model)


def test_calibrate_asks_for_the_gains_it_uses(fp32_plant):
    *_, root = fp32_plant
    asked = []
    result = calibrate(root / "diff.h5", gains=lambda request: asked.append(request) or {})
    assert result.conversion == "output-rms" and asked == [norms_to_probe(root / "diff.h5")]
    request = asked[0]
    assert request.reference == str(root / "clean.h5")
    assert {name for name, _ in request.norms} == {
        l.name for l in result.layers if l.target_error > 0
    }
    assert all(block == result.layer(name).sub_block for name, block in request.norms)
    with pytest.raises(HwdiffError, match="verify needs the model"):
        hwdiff.calibrate(root / "diff.h5", verify=True)


def test_without_local_errors_calibrate_refuses(fp32_plant):
    *_, root = fp32_plant
    with pytest.raises(HwdiffError, match="needs local errors.*--local"):
        calibrate(root / "plain.h5")


def test_sigma_start_rule_is_bounded_and_stated(fp32_plant, caplog):
    *_, root = fp32_plant
    result = calibrate(root / "diff.h5")
    w_rms = np.median([l.weight_rms for l in result.layers])
    assert result.schedule.sigma_start <= 0.05 * w_rms * (1 + 1e-12)
    assert result.schedule.sigma_start == pytest.approx(
        min(100 * result.schedule.sigma_end, 0.05 * w_rms)
    )
    assert "0.05 x median rms(w_eff)" in result.start_rule
    for layer in result.layers:  # verl's structure: every norm = multiplier × the global schedule
        assert layer.sigma_start == pytest.approx(layer.multiplier * result.schedule.sigma_start)
    start, _, warnings = start_rule(1e-3, 1.0, sigma_start=0.2)
    assert start == 0.2 and "above QeRL's range" in warnings[0]
    text = format_calibration(result)
    assert (
        all(name in text for name in QERL_PRESETS)
        and "0.05 -> 0.0005" in text
        and "0.01 -> 0.0001" in text
    )


def test_rounding_check_matches_a_monte_carlo_and_warns(bf16_plant):
    rng = np.random.default_rng(3)
    w = torch.tensor(rng.lognormal(0, 0.5, 4000) * rng.choice([-1, 1], 4000), dtype=torch.bfloat16)
    for sigma in (5e-4, 4e-3, 2e-2):
        draws = [
            ((w.float() + torch.randn(w.shape) * sigma).bfloat16() != w).double().mean().item()
            for _ in range(20)
        ]
        assert changed_fraction(w.float().numpy(), sigma, "bfloat16") == pytest.approx(
            np.mean(draws), abs=0.01
        )
    # at 1.0 the spacing is 2^-7 above and 2^-8 below: P(|z| beyond 1.95e-3 downwards) = Phi(-3.9) = 4.7e-5
    assert changed_fraction(np.ones(8, np.float32), 5e-4, "bfloat16") == pytest.approx(
        0.5 * math.erfc(3.90625 / math.sqrt(2)), rel=1e-6
    )
    *_, root = bf16_plant
    result = calibrate(root / "diff.h5", num_stages=10)
    assert result.rounding_dtype == "bfloat16" and len(result.rounding) == 9
    changed = [r.min_changed for r in result.rounding]
    assert changed == sorted(changed, reverse=True)  # σ decays stage by stage
    last = result.rounding[
        -1
    ]  # Monte Carlo of the injector's own scheme on the weakest norm's stored weights
    with open_capture(root / "clean.h5") as cap:
        stored = torch.from_numpy(cap.weight(last.weakest)).bfloat16()
    sigma = last.sigma * result.layer(last.weakest).multiplier
    draws = [
        ((stored.float() + torch.randn(stored.shape) * sigma).bfloat16() != stored)
        .double()
        .mean()
        .item()
        for _ in range(50)
    ]
    assert last.min_changed == pytest.approx(np.mean(draws), abs=0.03)
    assert any("rounded away" in w for w in result.warnings) == any(c < 0.5 for c in changed)


def test_sigma_file_schema_and_round_trip(fp32_plant, tmp_path):
    *_, root = fp32_plant
    result = calibrate(root / "diff.h5", factor=50, num_stages=8)
    path = save(result, tmp_path / "sigma.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["schema"] == "hwdiff/sigma/2" and data["method"] == "local"
    assert data["schedule"]["num_stages"] == 8 and len(data["schedule"]["values"]) == 7
    assert data["provenance"]["reference"]["device"] == "cpu"
    layer = data["layers"]["model.layers.2.input_layernorm"]
    assert {
        "target_error",
        "output_rms",
        "weight_rms",
        "sigma_start",
        "sigma_end",
        "multiplier",
    } <= set(layer)
    loaded = load_sigma(path)
    assert loaded.layer("model.norm").sigma_end == pytest.approx(
        result.layer("model.norm").sigma_end
    )
    assert loaded.rounding == result.rounding and loaded.start_rule == result.start_rule


def test_old_schema_1_files_are_read(tmp_path):
    old = {
        "schema": "hwdiff/sigma/1",
        "method": "local",
        "conversion": "rms",
        "schedule": {
            "kind": "qerl-code",
            "sigma_start": 0.1,
            "sigma_end": 0.001,
            "num_stages": 10,
            "factor": 100,
        },
        "layers": {
            "model.norm": {
                "layer_index": None,
                "sub_block": "lm_head",
                "measured_error": 0.001,
                "weight_rms": 1.0,
                "sigma_start": 0.1,
                "sigma_end": 0.001,
                "multiplier": 1.0,
            }
        },
    }
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    loaded = load_sigma(tmp_path / "old.yaml")
    assert loaded.conversion == "output-rms" and loaded.layer("model.norm").sigma_end == 0.001


def test_injector_follows_a_loaded_calibration_over_training(fp32_plant, tmp_path):
    model, _, _, root = fp32_plant
    loaded = load_sigma(save(calibrate(root / "diff.h5"), tmp_path / "s.yaml"))
    injector = AQNInjector(model, loaded)
    assert set(injector.sigmas(0, 100).values()) == {0.0}  # stage 0: no noise
    late = injector.sigmas(99, 100)
    assert late["model.norm"] == pytest.approx(loaded.layer("model.norm").sigma_end)
    early = injector.sigmas(10, 100)
    assert early["model.norm"] == pytest.approx(loaded.layer("model.norm").sigma_start)


@pytest.fixture(scope="module")
def sdpa_vs_eager(tmp_path_factory):
    """The demo's pair, smaller: bf16 sdpa vs eager attention, replay, diff --local."""
    root = tmp_path_factory.mktemp("demo")
    small = dict(limit=4, max_tokens=32, batch_size=4, progress=False)
    paths = [
        hwdiff.capture(
            hwdiff.load_model("tiny-qwen2", dtype="bfloat16", attn_implementation=attn),
            root / f"{attn}.h5",
            record_inputs=True,
            **small,
        ).path
        for attn in ("sdpa", "eager")
    ]
    eager = hwdiff.load_model("tiny-qwen2", dtype="bfloat16", attn_implementation="eager")
    local = hwdiff.replay(eager, paths[0], root / "local.h5", progress=False).path
    hwdiff.diff(*paths, local=local, out=root / "diff.h5", progress=False)
    return root


def test_verify_measures_at_the_sub_block_and_can_fail(sdpa_vs_eager):
    import dataclasses

    root = sdpa_vs_eager
    model = hwdiff.load_model("tiny-qwen2", dtype="bfloat16")
    result = calibrate(root / "diff.h5")
    attention_norms = [l for l in result.layers if l.sigma_end > 0]
    assert {l.name.rsplit(".", 1)[-1] for l in attention_norms} == {
        "input_layernorm"
    }  # only attention differs
    check = verify(result, model)
    assert [c.measured_at for c in check.layers] == [l.sub_block for l in attention_norms]
    assert all(c.measured_at.endswith("self_attn") for c in check.layers)
    ratios = [c.ratio for c in check.layers]
    assert check.passed and all(0.67 <= r <= 1.5 for r in ratios)
    for c, layer in zip(
        check.layers, attention_norms
    ):  # fp32 copy: the realized σ is the nominal one
        assert c.realized_sigma == pytest.approx(layer.sigma_end, rel=0.2)
    wrong = dataclasses.replace(
        result,
        layers=tuple(dataclasses.replace(l, sigma_end=3 * l.sigma_end) for l in result.layers),
    )
    failed = verify(wrong, model)
    assert not failed.passed and all(c.ratio > 1.5 for c in failed.layers)


def test_verify_without_the_reference_capture_runs_whole_model_forwards(sdpa_vs_eager):
    """The fallback when the reference capture is not at hand (moved, another machine): whole-model
    forwards with a fixed number of seeds, and the calibration's unreproduced norms carried over (this
    path once raised NameError)."""
    import dataclasses

    result = calibrate(sdpa_vs_eager / "diff.h5")
    gone = dict(
        result.provenance,
        reference=dict(result.provenance["reference"], path="/nonexistent/ref.h5"),
    )
    moved = dataclasses.replace(
        result, provenance=gone, unreproduced=("model.layers.9.input_layernorm",)
    )
    check = verify(moved, hwdiff.load_model("tiny-qwen2", dtype="bfloat16"), seeds=2)
    assert "reference capture was not at hand" in check.method
    assert [c.name for c in check.layers] == [l.name for l in result.layers if l.sigma_end > 0]
    assert all(c.draws == 2 and math.isfinite(c.ratio) for c in check.layers)
    assert check.unreproduced == ("model.layers.9.input_layernorm",) and not check.passed


def test_cli_verify_strict_fails_on_a_wrong_sigma(sdpa_vs_eager, tmp_path):
    root = sdpa_vs_eager
    good = run_cli(
        "calibrate", root / "diff.h5", "-o", tmp_path / "good.yaml", "--verify", "--strict", "-q"
    )
    assert good.returncode == 0, good.stderr
    assert "verify: PASS" in good.stdout and "at self_attn" in good.stdout
    data = yaml.safe_load((tmp_path / "good.yaml").read_text())
    assert data["verify"]["passed"] and set(data["verify"]["layers"]) == {
        n for n, e in data["layers"].items() if e["sigma_end"] > 0
    }
    for entry in data["layers"].values():
        entry["sigma_end"] *= 3
    (tmp_path / "x3.yaml").write_text(yaml.safe_dump(data))
    bad = run_cli(
        "calibrate",
        root / "diff.h5",
        "--sigma",
        tmp_path / "x3.yaml",
        "-o",
        tmp_path / "checked.yaml",
        "--verify",
        "--strict",
        "-q",
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert (
        "verify: FAIL" in bad.stdout
        and bad.stderr.count("hwdiff: error:") == 1
        and "Traceback" not in bad.stderr
    )


def test_verl_export_of_a_real_calibration_names_every_norm(sdpa_vs_eager, tmp_path, caplog):
    result = calibrate(sdpa_vs_eager / "diff.h5")
    with caplog.at_level(logging.WARNING):
        block = yaml.safe_load(export(result, "verl", tmp_path / "verl.yaml").read_text())[
            "trainer"
        ]["noise_injection"]
    assert "never copies layer_sigma_config" in caplog.text and "aqn-delivery.patch" in caplog.text
    noisy = {l.name for l in result.layers if l.sigma_end > 0}
    assert set(block["target_modules"]) == noisy  # full names, never the fork's automatic mode
    assert set(block["exclude_patterns"]) == {
        l.name for l in result.layers if l.sigma_end == 0
    } | set(result.skipped)
    pairs = dict(block["layer_sigma_config"]["norm_multipliers"])
    for name in noisy:  # each norm's own σ_end over the exported global σ_end
        assert pairs[name] * block["sigma_end"] == pytest.approx(
            result.layer(name).sigma_end, rel=1e-12
        )
    overrides = hydra_overrides(result)
    assert all(line.lstrip("'").startswith("++trainer.noise_injection.") for line in overrides)
    assert "++trainer.noise_injection.epoch_aware=False" in overrides


def test_verl_export_with_two_noisy_classes_reaches_the_fork_per_norm(fp32_plant, tmp_path):
    """Two noisy classes of a real calibration through the patched fork's own code (integrations/verl)."""
    import importlib.util
    import shutil
    import subprocess
    import sys

    from .conftest import ROOT

    *_, root = fp32_plant
    result = calibrate(root / "diff.h5")
    assert len({structure.norm_class(l.name) for l in result.layers if l.sigma_end > 0}) >= 2
    spec = importlib.util.spec_from_file_location(
        "hwdiff_verl_check_c", ROOT / "integrations/verl/check.py"
    )
    check = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = check
    spec.loader.exec_module(check)
    fork = tmp_path / "verl"
    shutil.copytree(ROOT / "integrations/verl/upstream", fork)
    subprocess.run(
        ["git", "apply", str(ROOT / "integrations/verl/aqn-delivery.patch")], cwd=fork, check=True
    )
    model = hwdiff.load_model("tiny-qwen2", dtype="float32")
    assert check.check(fork, result, model)[-1].startswith("ok:")


def test_cli_refused_export_writes_nothing(fp32_plant, tmp_path):
    *_, root = fp32_plant
    out = tmp_path / "sigma.yaml"
    proc = run_cli(
        "calibrate", root / "diff.h5", "-o", out, "--export", "verl", "--schedule", "linear", "-q"
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.count("hwdiff: error:") == 1 and "verl export refused" in proc.stderr
    assert not out.exists() and not out.with_suffix(".verl.yaml").exists()


def test_bad_inputs_are_clear_errors(tmp_path, fp32_plant):
    *_, root = fp32_plant
    model = hwdiff.load_model("tiny-qwen2")
    linear_only = [
        hwdiff.capture(model, tmp_path / f"{i}.h5", kinds="linear", **CAP).path for i in range(2)
    ]
    hwdiff.diff(*linear_only, out=tmp_path / "nonorm.h5", progress=False)
    with pytest.raises(HwdiffError, match="no RMSNorm outputs"):
        calibrate(tmp_path / "nonorm.h5")
    (tmp_path / "other.yaml").write_text("schema: something/else/1\n")
    with pytest.raises(HwdiffError, match="not a sigma file"):
        load_sigma(tmp_path / "other.yaml")
    good = yaml.safe_load(save(calibrate(root / "diff.h5"), tmp_path / "s.yaml").read_text())
    good["layers"]["model.norm"]["sigma_end"] = -0.1
    (tmp_path / "negative.yaml").write_text(yaml.safe_dump(good))
    with pytest.raises(HwdiffError, match="malformed"):
        load_sigma(tmp_path / "negative.yaml")
    with pytest.raises(HwdiffError, match="at least 3"):
        calibrate(root / "diff.h5", num_stages=2)
    with pytest.raises(HwdiffError, match="below the measured sigma_end"):
        calibrate(root / "diff.h5", sigma_start=1e-9)


def test_cli_calibrate_and_aqn_check(tmp_path, fp32_plant):
    *_, root = fp32_plant
    out = tmp_path / "sigma.yaml"
    proc = run_cli(
        "calibrate", root / "diff.h5", "-o", out, "--export", "verl", "--export", "qerl", "-q"
    )
    assert proc.returncode == 0, proc.stderr
    assert "++trainer.noise_injection.sigma_end=" in proc.stdout
    assert (
        out.exists()
        and out.with_suffix(".verl.yaml").exists()
        and out.with_suffix(".qerl.yaml").exists()
    )
    check = run_cli("aqn-check", "--model", "tiny-qwen2", "--sigma", out, "--dtype", "bfloat16")
    assert check.returncode == 0, check.stderr
    assert f"matched {2 * L + 1} RMSNorm layers" in check.stdout
    bad = run_cli("calibrate", tmp_path / "missing.h5", "-o", tmp_path / "x.yaml")
    assert (
        bad.returncode == 2 and "no such diff file" in bad.stderr and "Traceback" not in bad.stderr
    )


def test_law_note_never_calls_a_measured_norm_error_zero():
    """A norm with its own local error (a per-head q_norm, no sub-block) whose law was not fitted is not
    described as having zero error; one whose error lives only in its sub-block is."""
    from hwdiff.calibration import LayerSigma, _law_missing

    own = LayerSigma(
        "model.layers.0.self_attn.q_norm", 0, None, 2.3e-3, 0.0, 1.0, 1.0, 2.4e-3, 0.05, 1.0
    )
    block_only = LayerSigma(
        "model.layers.0.input_layernorm",
        0,
        "model.layers.0.self_attn",
        0.0,
        4e-3,
        1.0,
        1.0,
        4e-3,
        0.05,
        1.0,
    )
    silent = LayerSigma("model.norm", None, None, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0)
    assert "zero" not in _law_missing(own, "") and "not fitted" in _law_missing(own, "")
    assert "own local error is zero" in _law_missing(block_only, "")
    assert _law_missing(silent, "") == "no noise"
    assert _law_missing(own, "law: Gaussian assumed — x") == "law: Gaussian assumed — x"
