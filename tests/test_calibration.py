import logging

import numpy as np
import pytest
import yaml

import hwdiff
from hwdiff.aqn import AQNInjector, find_norms
from hwdiff.calibration import calibrate, export, hydra_overrides, load_sigma, save, verify
from hwdiff.errors import HwdiffError

from .conftest import L, run_cli

CAP = dict(limit=8, max_tokens=48, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def inversion(tmp_path_factory):
    """Known σ per norm (spanning 10×) planted with the injector; clean, noisy and local captures."""
    root = tmp_path_factory.mktemp("inversion")
    model = hwdiff.load_model("tiny-qwen2", dtype="float32")
    names = [name for name, _ in find_norms(model)]
    order = np.random.default_rng(0).permutation(len(names))
    planted = dict(zip(names, np.geomspace(2e-3, 2e-2, len(names))[order]))
    clean = hwdiff.capture(model, root / "clean.h5", record_inputs=True, **CAP).path
    with AQNInjector(model, planted) as injector:
        injector.apply(seed=1)
        noisy = hwdiff.capture(model, root / "noisy.h5", **CAP).path
        local = hwdiff.replay(model, clean, root / "local.h5", progress=False).path
    hwdiff.diff(clean, noisy, local=local, out=root / "diff.h5", progress=False)
    hwdiff.diff(clean, noisy, out=root / "plain.h5", progress=False)
    return model, planted, root


def test_planted_aqn_sigma_is_recovered_per_norm(inversion):
    model, planted, root = inversion
    result = calibrate(root / "diff.h5")
    assert result.method == "local" and result.conversion == "rms"
    assert [layer.name for layer in result.layers] == list(planted)
    for layer in result.layers:
        assert layer.sigma_end == pytest.approx(planted[layer.name], rel=0.25), layer.name
        assert layer.block_error == 0  # the sub-blocks' weights are clean: no local error there
        assert layer.sigma_start == pytest.approx(100 * layer.sigma_end)
    measured = calibrate(root / "diff.h5", model=model)
    assert measured.conversion == "measured"
    for layer in measured.layers:
        assert layer.sigma_end == pytest.approx(planted[layer.name], rel=0.25), layer.name


def test_sigma_file_schema_and_round_trip(inversion, tmp_path):
    _, planted, root = inversion
    result = calibrate(root / "diff.h5", factor=50, num_stages=8)
    path = save(result, tmp_path / "sigma.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["schema"] == "hwdiff/sigma/1" and data["method"] == "local"
    assert data["schedule"]["num_stages"] == 8 and len(data["schedule"]["values"]) == 7
    assert data["provenance"]["reference"]["model_spec"] == "tiny-qwen2"
    layer = data["layers"]["model.layers.2.input_layernorm"]
    assert {"measured_error", "weight_rms", "sigma_start", "sigma_end", "multiplier"} <= set(layer)
    loaded = load_sigma(path)
    assert loaded.layer("model.norm").sigma_end == pytest.approx(result.layer("model.norm").sigma_end)
    schedule = loaded.schedule_for("model.norm")
    assert schedule.sigma_start / schedule.sigma_end == pytest.approx(50)


def test_injector_follows_a_loaded_calibration_over_training(inversion, tmp_path):
    model, _, root = inversion
    loaded = load_sigma(save(calibrate(root / "diff.h5"), tmp_path / "s.yaml"))
    injector = AQNInjector(model, loaded)
    assert set(injector.sigmas(0, 100).values()) == {0.0}  # stage 0: no noise
    late = injector.sigmas(99, 100)
    assert late["model.norm"] == pytest.approx(loaded.layer("model.norm").sigma_end)
    early = injector.sigmas(10, 100)
    assert early["model.norm"] == pytest.approx(loaded.layer("model.norm").sigma_start)


def test_verl_and_qerl_exports(inversion, tmp_path, caplog):
    _, _, root = inversion
    result = calibrate(root / "diff.h5")
    block = yaml.safe_load(export(result, "verl", tmp_path / "verl.yaml").read_text())["trainer"]["noise_injection"]
    assert {"enabled", "sigma_start", "sigma_end", "num_stages", "target_modules", "exclude_patterns",
            "layer_sigma_config"} <= set(block)
    config = block["layer_sigma_config"]
    assert config["enabled"] and set(config["layer_multipliers"]) == {str(i) for i in range(L)}
    pair = [result.layer(f"model.layers.1.{n}").multiplier for n in ("input_layernorm", "post_attention_layernorm")]
    assert config["layer_multipliers"]["1"] == pytest.approx(np.sqrt(np.mean(np.square(pair))))
    assert config["default_multiplier"] == pytest.approx(result.layer("model.norm").multiplier)
    assert all(line.lstrip("'").startswith("++trainer.noise_injection.") for line in hydra_overrides(result))
    with caplog.at_level(logging.WARNING):
        qerl = yaml.safe_load(export(result, "qerl", tmp_path / "qerl.yaml").read_text())
    assert set(qerl) == {"sigma_start", "sigma_end", "num_stages"} and "per-layer values" in caplog.text


def test_without_local_errors_the_increments_stand_in_and_say_so(inversion):
    _, planted, root = inversion
    result = calibrate(root / "plain.h5")
    assert result.method == "increments"
    assert "WEAKER ESTIMATE" in result.to_dict()["method_note"]
    assert all(layer.sigma_end >= 0 for layer in result.layers)


def test_closed_loop_verify_reports_induced_over_measured(inversion):
    model, _, root = inversion
    report = verify(calibrate(root / "diff.h5"), model)
    ratios = [entry["ratio"] for entry in report["layers"].values()]
    assert len(ratios) == 2 * L + 1 and all(0.75 < r < 1.33 for r in ratios)


def test_bad_inputs_are_clear_errors(tmp_path, inversion):
    _, _, root = inversion
    model = hwdiff.load_model("tiny-qwen2")
    linear_only = [hwdiff.capture(model, tmp_path / f"{i}.h5", kinds="linear", **CAP).path for i in range(2)]
    hwdiff.diff(*linear_only, out=tmp_path / "nonorm.h5", progress=False)
    with pytest.raises(HwdiffError, match="no RMSNorm outputs"):
        calibrate(tmp_path / "nonorm.h5")
    with pytest.raises(HwdiffError, match="nothing to calibrate"):
        calibrate(_exact_diff(model, tmp_path))
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


def _exact_diff(model, tmp_path):
    paths = [hwdiff.capture(model, tmp_path / f"same{i}.h5", **CAP).path for i in range(2)]
    return hwdiff.diff(*paths, progress=False)


def test_cli_calibrate_and_aqn_check(tmp_path, inversion):
    _, _, root = inversion
    out = tmp_path / "sigma.yaml"
    proc = run_cli("calibrate", root / "diff.h5", "-o", out, "--export", "verl", "--export", "qerl", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "++trainer.noise_injection.sigma_end=" in proc.stdout
    assert out.exists() and out.with_suffix(".verl.yaml").exists() and out.with_suffix(".qerl.yaml").exists()
    check = run_cli("aqn-check", "--model", "tiny-qwen2", "--sigma", out, "--dtype", "bfloat16")
    assert check.returncode == 0, check.stderr
    assert f"matched {2 * L + 1} RMSNorm layers" in check.stdout
    bad = run_cli("calibrate", tmp_path / "missing.h5", "-o", tmp_path / "x.yaml")
    assert bad.returncode == 2 and "no such diff file" in bad.stderr and "Traceback" not in bad.stderr
