"""Delivery through the consumers' own code: the verl fork (integrations/verl/upstream, cfb21db5) and
QeRL (integrations/qerl/upstream, e8c6e79), each as published and with hwdiff's patch.

Every σ is compared with the planted per-norm schedule of the calibration (σ_start·(σ_end/σ_start)^…
per norm, written here from the schedule's definition), never with the export block."""

import importlib.util
import logging
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from hwdiff import structure
from hwdiff.calibration import Calibration, LayerSigma
from hwdiff.calibration.exporters import (
    export,
    hydra_overrides,
    qerl_block,
    verl_block,
    verl_selection,
)
from hwdiff.calibration.schedule import SigmaSchedule
from hwdiff.errors import HwdiffError

from .conftest import ROOT

K = 4  # stages: the consumers' runs are 2K steps
ONE, TWO, THREE = (
    {"input_layernorm"},
    {"input_layernorm", "post_attention_layernorm"},
    {"input_layernorm", "post_attention_layernorm", "q_norm", structure.FINAL_NORM},
)


def _module(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


verl_check = _module("hwdiff_verl_check", ROOT / "integrations/verl/check.py")
qerl_check = _module("hwdiff_qerl_check", ROOT / "integrations/qerl/check.py")


def _patched(tmp_path_factory, integration: str):
    root = tmp_path_factory.mktemp(integration) / "checkout"
    shutil.copytree(ROOT / "integrations" / integration / "upstream", root)
    subprocess.run(
        ["git", "apply", str(ROOT / "integrations" / integration / "aqn-delivery.patch")],
        cwd=root,
        check=True,
    )
    return root


@pytest.fixture(scope="module")
def verl_patched(tmp_path_factory):
    return _patched(tmp_path_factory, "verl")


@pytest.fixture(scope="module")
def qerl_patched(tmp_path_factory):
    return _patched(tmp_path_factory, "qerl")


def _tiny(kind: str):
    import transformers as tf

    sizes = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    if kind == "dense":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**sizes)).eval()
    if kind == "moe":
        return tf.Qwen3MoeForCausalLM(
            tf.Qwen3MoeConfig(
                **sizes,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                decoder_sparse_step=1,
            )
        ).eval()
    return tf.Qwen2ForCausalLM(
        tf.Qwen2Config(**{k: v for k, v in sizes.items() if k != "head_dim"})
    ).eval()


@pytest.fixture(scope="module")
def models():
    return {kind: _tiny(kind) for kind in ("dense", "moe", "qwen2")}


def planted(
    model,
    noisy: set[str],
    kind: str = "qerl-code",
    start: float = 0.05,
    end: float = 5e-4,
    stages: int = K,
) -> Calibration:
    """A calibration with a distinct multiplier per noisy norm (0.5 … 1.1) and σ = 0 elsewhere."""
    names = verl_check.norm_names(model)
    layers = []
    for i, name in enumerate(names):
        m = 0.5 + 0.1 * (i % 7) if structure.norm_class(name) in noisy else 0.0
        layers.append(
            LayerSigma(
                name,
                structure.layer_index(name),
                None,
                0.0,
                0.0,
                1.0,
                1.0,
                sigma_end=end * m,
                sigma_start=start * m,
                multiplier=m,
            )
        )
    return Calibration(
        tuple(layers), SigmaSchedule(start, end, stages, kind), "local", "output-rms", "planted"
    )


def truth(calibration: Calibration, name: str, step: int, total: int) -> float:
    """The norm's σ at ``step`` from the schedule's definition (QeRL's code, the paper, linear, constant)."""
    layer, k = calibration.layer(name), calibration.schedule.num_stages
    stage = int(min(step, total) // (total / k))
    if layer.sigma_end == 0 or stage == 0:
        return 0.0
    j = min(stage - 1, k - 2)
    a, b, kind = layer.sigma_start, layer.sigma_end, calibration.schedule.kind
    return {
        "qerl-code": a * (b / a) ** (j / (k - 2)),
        "qerl-paper": a * (b / a) ** (j / (k - 1)),
        "linear": a + (b - a) * j / (k - 2),
        "constant": b,
    }[kind]


def test_truth_is_what_hwdiff_schedules(models):
    """The oracle above and hwdiff's schedule agree, so the checks compare with sigma.yaml's values."""
    for kind in ("qerl-code", "qerl-paper", "linear", "constant"):
        cal = planted(models["qwen2"], TWO, kind)
        for name in verl_check.norm_names(models["qwen2"]):
            for step in range(0, 2 * K + 1):
                own = cal.schedule_for(name)
                assert (0.0 if own is None else own.at(step, 2 * K)) == pytest.approx(
                    truth(cal, name, step, 2 * K), rel=1e-12, abs=0
                )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qerl-code", "qerl-paper", "constant", "linear"])
@pytest.mark.parametrize("family", ["dense", "moe"])
@pytest.mark.parametrize("noisy", [ONE, TWO, THREE], ids=["one", "two", "three"])
def test_verl_matrix(kind, family, noisy, models, verl_patched):
    """Patched fork: every norm at every step ÷ the planted truth = 1 within 1e-5 (or the export is
    refused with its reason); the fork as published: check.py fails with one line."""
    model, cal = models[family], planted(models[family], noisy, kind)
    if kind == "linear":
        with pytest.raises(
            HwdiffError, match="verl export refused: verl runs only the exponential schedule"
        ):
            verl_block(cal)
        return
    rows = verl_check.check(verl_patched, cal, model)
    assert rows[-1].startswith("ok:")
    total = 2 * K
    config = verl_check.compose(verl_patched, hydra_overrides(cal), None)
    config.trainer.total_epochs, config.trainer.total_training_steps = 2, total
    for start in (0, total // 2 + 1):  # a fresh run and one resumed from a checkpoint
        syncs = verl_check.simulate(
            verl_patched, config, model, steps_per_epoch=total, test_freq=2, start=start
        )
        assert [s.step for s in syncs if s.phase == "train"] == list(range(start + 1, total + 1))
        for sync in syncs:
            for name, got in sync.sigmas.items():
                want = 0.0 if sync.phase == "validation" else truth(cal, name, sync.step, total)
                assert got == pytest.approx(want, rel=1e-5, abs=0), (sync, name)
    with pytest.raises(
        SystemExit, match=r"^check: .*is not patched: git apply .*aqn-delivery.patch\)$"
    ) as failed:
        verl_check.check(ROOT / "integrations/verl/upstream", cal, model)
    assert "\n" not in str(failed.value)


def test_verl_check_pins_epoch_aware_and_zone_and_replaces_old_multipliers(models, verl_patched):
    """An older base config (epoch-aware, a zone schedule, per-layer and per-norm multipliers) does not
    survive hwdiff's ++ lines."""
    model = models["dense"]
    cal = planted(model, TWO)
    base = {
        "epoch_aware": True,
        "stages_per_epoch": 2,
        "layer_sigma_config": {
            "enabled": True,
            "default_multiplier": 3.0,
            "layer_multipliers": {"0": 9.0, "1": 7.0},
            "norm_multipliers": [["model.layers.0.self_attn.k_norm", 5.0]],
            "zone_schedule": {
                "enabled": True,
                "edge_layers": [0],
                "middle_layers": [1],
                "late_middle_mult": 0.1,
            },
        },
    }
    assert verl_check.check(verl_patched, cal, model, base=base)[-1].startswith("ok:")
    lines = hydra_overrides(cal)
    assert "++trainer.noise_injection.epoch_aware=False" in lines
    assert "++trainer.noise_injection.layer_sigma_config.zone_schedule.enabled=False" in lines
    without_pins = [
        line for line in lines if "epoch_aware" not in line and "zone_schedule" not in line
    ]
    with pytest.raises(SystemExit, match="^check: "):
        verl_check.check(verl_patched, cal, model, overrides=without_pins, base=base)


def test_verl_check_on_the_published_fork_names_what_is_wrong(models):
    """One noisy class, multipliers all 1: still wrong as published (schedule length, validation noise)."""
    model = models["qwen2"]
    cal = planted(model, ONE)
    flat = Calibration(
        tuple(
            l
            if l.sigma_end == 0
            else LayerSigma(l.name, l.layer_index, None, 0, 0, 1, 1, 5e-4, 0.05, 1.0)
            for l in cal.layers
        ),
        cal.schedule,
        "local",
        "output-rms",
        "planted",
    )
    with pytest.raises(SystemExit) as failed:
        verl_check.check(ROOT / "integrations/verl/upstream", flat, model)
    message = str(failed.value)
    assert (
        message.startswith("check: ") and "sigma.yaml says" in message and "not patched" in message
    )


@pytest.mark.slow
def test_verl_and_qerl_check_cli(tmp_path, verl_patched, models):
    from hwdiff.calibration import save

    unpatched = subprocess.run(
        [sys.executable, str(ROOT / "integrations/verl/check.py")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert unpatched.returncode != 0 and unpatched.stderr.strip().count("\n") == 0
    assert unpatched.stderr.startswith("check: ") and "is not patched" in unpatched.stderr
    patched = subprocess.run(
        [sys.executable, str(ROOT / "integrations/verl/check.py"), "--verl", str(verl_patched)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert patched.returncode == 0 and "is patched" in patched.stdout, patched.stderr
    import hwdiff

    tiny = hwdiff.load_model("tiny-qwen2")
    sigma = save(planted(tiny, TWO), tmp_path / "sigma.yaml")
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "integrations/verl/check.py"),
            "--verl",
            str(verl_patched),
            "--sigma",
            str(sigma),
            "--model",
            "tiny-qwen2",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0 and "ok: " in run.stdout and f"all {K} stages" in run.stdout, (
        run.stderr
    )
    qerl = subprocess.run(
        [
            sys.executable,
            str(ROOT / "integrations/qerl/check.py"),
            "--sigma",
            str(sigma),
            "--model",
            "tiny-qwen2",
            "--tree",
            "vllm",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert (
        qerl.returncode != 0
        and qerl.stderr.startswith("check: QeRL injects nothing")
        and qerl.stderr.count("\n") == 1
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qerl-code", "qerl-paper", "constant"])
@pytest.mark.parametrize("noisy", [ONE, TWO], ids=["one", "two"])
def test_qerl_matrix(kind, noisy, models, qerl_patched):
    """Patched QeRL: the same σ on the HF tree and on the vLLM-style tree, equal to the truth; as
    published: nothing injected into the vLLM tree, the global σ on the HF tree."""
    from .vllm_standin import from_hf

    hf = models["qwen2"]
    trees = {"hf": hf, "vllm": from_hf(hf)}
    cal = planted(hf, noisy, kind)
    for tree, model in trees.items():
        assert qerl_check.check(qerl_patched, cal, model)[-1].startswith("ok:"), tree
        with qerl_check.tempfile.TemporaryDirectory() as tmp:
            path = export(cal, "qerl", qerl_check.Path(tmp) / "q.yaml")
            runs, total = qerl_check.simulate(qerl_patched, cal, path, model, "m-nvfp4")
        for step, sigmas in runs:
            for name, got in sigmas.items():
                assert got == pytest.approx(truth(cal, name, step, total), rel=1e-5, abs=0), (
                    tree,
                    step,
                    name,
                )
    with pytest.raises(
        SystemExit, match=r"^check: QeRL injects nothing into this model: none of its 5 RMSNorms"
    ):
        qerl_check.check(ROOT / "integrations/qerl/upstream", cal, trees["vllm"])
    with pytest.raises(
        SystemExit, match=r"^check: step \d+/\d+ \(stage \d+\): .* gets sigma .* in QeRL"
    ):
        qerl_check.check(ROOT / "integrations/qerl/upstream", cal, trees["hf"])


def test_qerl_as_published_skips_non_nvfp4_names(models):
    cal = planted(models["qwen2"], ONE)
    with pytest.raises(
        SystemExit, match="QeRL injects nothing for model name 'qwen2': it runs AQN only when"
    ):
        qerl_check.check(
            ROOT / "integrations/qerl/upstream", cal, models["qwen2"], model_name="qwen2"
        )


def test_qerl_export_carries_per_norm_multipliers_and_says_what_qerl_does(models, tmp_path, caplog):
    cal = planted(models["qwen2"], TWO, "qerl-paper")
    with caplog.at_level(logging.WARNING):
        data = yaml.safe_load(export(cal, "qerl", tmp_path / "q.yaml").read_text())
    assert (
        "nothing is injected there" in caplog.text
        and "restarts its step counter every epoch" in caplog.text
    )
    noisy = {l.name: l.multiplier for l in cal.layers if l.multiplier > 0}
    assert data["norm_multipliers"] == pytest.approx(noisy)
    k = K  # the paper's curve as the code's: same start, end at its last value
    assert data["sigma_end"] == pytest.approx(
        0.05 * (5e-4 / 0.05) ** ((k - 2) / (k - 1)), rel=1e-12
    )
    assert qerl_block(cal) == data


def test_exports_refuse_linear_and_write_nothing(models, tmp_path):
    cal = planted(models["qwen2"], ONE, "linear")
    for target in ("verl", "qerl"):
        with pytest.raises(HwdiffError, match="runs only the exponential schedule"):
            export(cal, target, tmp_path / f"{target}.yaml")
        assert not (tmp_path / f"{target}.yaml").exists()


def test_patterns_are_full_names_and_refused_when_they_cannot_single_out(models):
    """Bamba-like: a silent ``mamba.norm`` class must not switch off the final ``model.norm``; a
    silent norm whose full name is inside a noisy one's cannot be expressed with substrings."""
    names = [
        "model.layers.0.input_layernorm",
        "model.layers.0.mamba.norm",
        "model.layers.1.input_layernorm",
        "model.layers.1.mamba.norm",
        "model.norm",
    ]
    layers = tuple(
        LayerSigma(
            n,
            structure.layer_index(n),
            None,
            0,
            0,
            1,
            1,
            *((0.0, 0.0, 0.0) if "mamba" in n else (5e-4, 0.05, 1.0)),
        )
        for n in names
    )
    cal = Calibration(layers, SigmaSchedule(0.05, 5e-4, K), "local", "output-rms", "planted")
    block = verl_block(cal)["trainer"]["noise_injection"]
    assert verl_selection(names, block["target_modules"], block["exclude_patterns"]) == {
        n for n in names if "mamba" not in n
    }
    nested = ["model.norm", "language_model.model.norm"]
    layers = (
        LayerSigma(nested[0], None, None, 0, 0, 1, 1, 0.0, 0.0, 0.0),
        LayerSigma(nested[1], None, None, 0, 0, 1, 1, 5e-4, 0.05, 1.0),
    )
    with pytest.raises(HwdiffError, match="cannot single out the noisy norms"):
        verl_block(
            Calibration(layers, SigmaSchedule(0.05, 5e-4, K), "local", "output-rms", "planted")
        )


def test_moe_export_targets_every_noisy_class_explicitly(models):
    cal = planted(models["moe"], THREE)
    block = verl_block(cal)["trainer"]["noise_injection"]
    noisy = {l.name for l in cal.layers if l.sigma_end > 0}
    assert (
        set(block["target_modules"]) == noisy and block["exclude_patterns"]
    )  # never [] (the fork's MoE mode)
    assert {structure.norm_class(n) for n in noisy} == THREE


def test_hydra_lines_keep_full_precision(models):
    cal = planted(models["dense"], TWO, start=0.0123456789012, end=0.000123456789012)
    config = verl_check.compose(ROOT / "integrations/verl/upstream", hydra_overrides(cal), None)
    block = verl_block(cal)["trainer"]["noise_injection"]
    got = config.trainer.noise_injection
    assert got.sigma_start == block["sigma_start"] and got.sigma_end == block["sigma_end"]
    assert [list(p) for p in got.layer_sigma_config.norm_multipliers] == block[
        "layer_sigma_config"
    ]["norm_multipliers"]


def _gemma3():
    """Another family: Gemma 3's six norm classes (q/k norms, pre/post feed-forward norms, (1 + w) weights)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        sliding_window=8,
    )
    return tf.Gemma3ForCausalLM(config).eval()


@pytest.mark.slow
@pytest.mark.parametrize("stages", [3, 7])
def test_gemma3_every_class_through_both_patched_consumers(stages, verl_patched, qerl_patched):
    """Gemma 3 (every norm class noisy but post_feedforward_layernorm, which stays at 0), 3 and 7 stages,
    qerl-paper: the patched fork and the patched QeRL (HF tree) give each norm the truth at every step."""
    model = _gemma3()
    noisy = {
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "q_norm",
        "k_norm",
        structure.FINAL_NORM,
    }
    cal = planted(model, noisy, "qerl-paper", stages=stages)
    assert verl_check.check(verl_patched, cal, model)[-1].startswith("ok:")
    total = 2 * stages
    config = verl_check.compose(verl_patched, hydra_overrides(cal), None)
    config.trainer.total_epochs, config.trainer.total_training_steps = 2, total
    seen = set()
    for sync in verl_check.simulate(
        verl_patched, config, model, steps_per_epoch=total, test_freq=2
    ):
        for name, got in sync.sigmas.items():
            want = 0.0 if sync.phase == "validation" else truth(cal, name, sync.step, total)
            assert got == pytest.approx(want, rel=1e-5, abs=0), (sync.step, name)
            seen.add((structure.norm_class(name), want > 0))
    assert ("post_feedforward_layernorm", False) in seen and all((c, True) in seen for c in noisy)
    assert qerl_check.check(qerl_patched, cal, model)[-1].startswith("ok:")


def test_check_clis_refuse_bad_input_in_one_line(tmp_path, verl_patched, qerl_patched, models):
    """A malformed sigma.yaml, a file of another schema, a base config that is not a mapping, a sigma.yaml
    of another model and a family the vLLM stand-in does not build: one line each, non-zero exit."""
    from hwdiff.calibration import save

    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "schema: hwdiff/sigma/2\nlayers: [oops\n"
    )  # the flow list never closes: YAML fails at line 3
    other = tmp_path / "other.yaml"
    other.write_text("hello: 1\n")
    cases = [
        (
            verl_check,
            ["--verl", str(verl_patched), "--sigma", str(broken)],
            "cannot read sigma file .*not valid YAML .*line 3",
        ),
        (
            qerl_check,
            ["--qerl", str(qerl_patched), "--sigma", str(broken)],
            "cannot read sigma file .*not valid YAML",
        ),
        (
            verl_check,
            ["--verl", str(verl_patched), "--sigma", str(other)],
            ".*other.yaml is not a sigma file of schema",
        ),
        (
            qerl_check,
            ["--qerl", str(qerl_patched), "--sigma", str(tmp_path / "missing.yaml")],
            "cannot read sigma file",
        ),
    ]
    import hwdiff

    sigma = save(planted(hwdiff.load_model("tiny-qwen2"), TWO), tmp_path / "sigma.yaml")
    base = tmp_path / "base.yaml"
    base.write_text("trainer: 3\n")
    cases.append(
        (
            verl_check,
            ["--verl", str(verl_patched), "--sigma", str(sigma), "--base-config", str(base)],
            "--base-config .*expected a trainer.noise_injection mapping",
        )
    )
    export_file = tmp_path / "stale.qerl.yaml"
    export_file.write_text(
        "sigma_start: 0.05\nsigma_end: 0.0005\nnum_stages: four\nnorm_multipliers: {}\n"
    )
    cases.append(
        (
            qerl_check,
            ["--qerl", str(qerl_patched), "--sigma", str(sigma), "--sigma-qerl", str(export_file)],
            ".*stale.qerl.yaml: malformed QeRL export",
        )
    )
    cases.append(
        (
            qerl_check,
            ["--qerl", str(qerl_patched), "--sigma", str(sigma), "--sigma-qerl", str(other)],
            ".*other.yaml is not an hwdiff QeRL export",
        )
    )
    for module, argv, message in cases:
        with pytest.raises(SystemExit, match=f"^check: {message}") as failed:
            module.main(argv)
        assert "\n" not in str(failed.value), argv
    cal = planted(models["qwen2"], TWO)
    lines = hydra_overrides(cal)
    unquoted = [
        line.replace('target_modules=["', 'target_modules=[oops, "') for line in lines
    ]  # valid Hydra
    with pytest.raises(
        SystemExit, match=r"^check: cannot read .*oops.* as Hydra would: .*quote every string"
    ):
        verl_check.check(verl_patched, cal, models["qwen2"], overrides=unquoted)
    wordy = [line.replace(f"num_stages={K}", "num_stages=four") for line in lines]
    with pytest.raises(
        SystemExit, match=r"^check: trainer.noise_injection.num_stages = 'four' is not a number"
    ):
        verl_check.check(verl_patched, cal, models["qwen2"], overrides=wordy)
    with pytest.raises(
        SystemExit, match=r"^check: the model's norms differ from sigma.yaml's \(\d+, first "
    ):
        qerl_check.check(qerl_patched, planted(models["qwen2"], TWO), models["dense"])
    with pytest.raises(
        SystemExit,
        match="^check: --tree vllm builds the vLLM stand-in of Qwen2 and Llama only, not "
        "Qwen3ForCausalLM: run with --tree hf",
    ):
        qerl_check.vllm_tree(models["dense"])
