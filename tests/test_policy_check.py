"""calibrate --policy-check: all σ_end at once against the hardware pair, checked against a noise draw and
log-probs computed here (torch log_softmax, numpy) and against the two captures read directly."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

import hwdiff
from hwdiff.aqn import AQNInjector
from hwdiff.calibration import calibrate, load_sigma
from hwdiff.compare.io import load_diff
from hwdiff.compare.output import summary
from hwdiff.errors import HwdiffError
from hwdiff.measure.policy_check import policy_check
from hwdiff.store import open_capture

from .conftest import run_cli

SMALL = dict(limit=4, max_tokens=32, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """bf16 sdpa vs eager on tiny-qwen2, replay, diff --local (log-probs captured by default)."""
    root = tmp_path_factory.mktemp("policy")
    paths = [
        hwdiff.capture(
            hwdiff.load_model("tiny-qwen2", dtype="bfloat16", attn_implementation=attn),
            root / f"{attn}.h5",
            record_inputs=True,
            **SMALL,
        ).path
        for attn in ("sdpa", "eager")
    ]
    eager = hwdiff.load_model("tiny-qwen2", dtype="bfloat16", attn_implementation="eager")
    local = hwdiff.replay(eager, paths[0], root / "local.h5", progress=False).path
    hwdiff.diff(*paths, local=local, out=root / "diff.h5", progress=False)
    return root, paths


def _logp(model, ids, mask):
    """log p(token t+1 | ≤ t) in float32 and the positions where tokens t and t+1 are real."""
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(
        -1, torch.from_numpy(ids[:, 1:, None]).long()
    )[..., 0]
    return logp.numpy().astype(np.float64), (mask[:, :-1] & mask[:, 1:]).astype(bool)


@pytest.mark.slow
def test_policy_check_matches_direct_draws_and_the_captures(pair):
    root, (ref_path, tgt_path) = pair
    calibration = calibrate(root / "diff.h5")
    model = hwdiff.load_model("tiny-qwen2", dtype="bfloat16", attn_implementation="sdpa")
    check = policy_check(calibration, model, root / "diff.h5", draws=3, seed=5, progress=False)
    with open_capture(ref_path) as ref:
        ids, mask = ref.input_ids.astype(np.int64), ref.attention_mask.astype(np.int64)
        ref_lp = ref.token_logprobs()
    with open_capture(tgt_path) as tgt:
        tgt_lp = tgt.token_logprobs()
    real = (mask[:, :-1] & mask[:, 1:]).astype(bool)
    # the hardware side: the two captures' own next-token log-probs, pooled over real positions
    delta = (
        tgt_lp.next_token[:, :-1].astype(np.float64) - ref_lp.next_token[:, :-1].astype(np.float64)
    )[real]
    assert check.hardware["mean_abs"] == pytest.approx(np.abs(delta).mean(), rel=1e-6)
    assert check.hardware["k3_kl"] == pytest.approx(np.mean(np.expm1(delta) - delta), rel=1e-5)
    # the noise side: the same draws made here (seeds as robustness derives them), log-probs by torch
    seeds = [int(s) for s in np.random.SeedSequence(5).generate_state(3)]
    clean, real_here = _logp(model, ids, mask)
    assert (real_here == real).all() and check.positions == real.sum()
    injector = AQNInjector(model, calibration)
    means = []
    for seed in seeds:
        injector.apply(seed=seed)
        noisy, _ = _logp(model, ids, mask)
        injector.restore()
        means.append(np.abs(noisy - clean)[real].mean())
    assert check.emulated["mean_abs"]["value"] == pytest.approx(np.mean(means), rel=1e-3)
    ratio = check.ratio["mean_abs"]
    assert ratio["value"] == pytest.approx(np.mean(means) / np.abs(delta).mean(), rel=1e-3)
    assert ratio["low"] <= ratio["value"] <= ratio["high"]
    assert (
        0 < check.emulated["top1_agreement"]["value"] <= 1
        and check.draws == 3
        and check.prompts == ids.shape[0]
    )


@pytest.mark.slow
def test_cli_policy_check_in_output_sigma_file_and_report(pair, tmp_path):
    root, _ = pair
    done = run_cli(
        "calibrate",
        root / "diff.h5",
        "-o",
        tmp_path / "sigma.yaml",
        "--policy-check",
        "--policy-draws",
        "2",
        "-q",
    )
    assert done.returncode == 0, done.stderr
    assert "policy check: all sigma_end at once, 2 draws" in done.stdout
    data = yaml.safe_load((tmp_path / "sigma.yaml").read_text())
    rl = load_diff(root / "diff.h5").rl_impact
    block = data["policy_check"]
    for stat in ("mean_abs", "k3_kl", "top1_agreement"):  # the hardware side is the diff's RL block
        assert block["hardware"][stat] == pytest.approx(rl.value(stat), rel=1e-9)
    loaded = load_sigma(tmp_path / "sigma.yaml").policy
    assert loaded is not None and loaded.to_dict() == block
    out = tmp_path / "report"
    hwdiff.report(root / "diff.h5", out, sigma=tmp_path / "sigma.yaml")
    assert "Policy check (all σ_end at once, 2 draws" in (out / "index.html").read_text(
        encoding="utf-8"
    )


def test_policy_check_refuses_without_the_target_capture(pair, tmp_path):
    root, _ = pair
    result = load_diff(root / "diff.h5")
    moved = replace(result, target={**result.target, "path": str(tmp_path / "gone.h5")})
    (tmp_path / "diff.json").write_text(json.dumps(summary(moved)))
    model = hwdiff.load_model("tiny-qwen2", dtype="bfloat16")
    with pytest.raises(HwdiffError, match="target capture .* is not at hand"):
        policy_check(calibrate(root / "diff.h5"), model, tmp_path / "diff.json", progress=False)
