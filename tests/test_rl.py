"""RL impact: head token log-probs in captures, the diff's rl_impact block, greedy generation splits.

Every expected number is computed here from the raw stored logits (numpy, float64) or from
transformers' own ``generate``, never from hwdiff's results.
"""

import json
import math
import shutil

import h5py
import numpy as np
import pytest
import torch

import hwdiff
from hwdiff.capturing.generate import generate
from hwdiff.compare.generation import diff_generations, is_generation_pair
from hwdiff.compare.rl import rl_impact
from hwdiff.errors import HwdiffError
from hwdiff.store import TokenLogProbs

from .conftest import run_cli
from .test_npu import npu  # noqa: F401  (the stand-in's worker fixture)

CAP = dict(kinds="head", batch_size=4, progress=False)


def _padded_inputs():
    """Six shipped prompts cut to 32 tokens, two of them shortened (right padding) so the mask matters."""
    from hwdiff.capturing.inputs import ByteTokenizer, Inputs

    base = hwdiff.load_inputs(limit=6, max_tokens=32)
    ids, mask = base.input_ids.copy(), base.attention_mask.copy()
    for row, length in ((1, 20), (3, 9)):
        ids[row, length:], mask[row, length:] = ByteTokenizer.pad_token_id, 0
    return Inputs(ids, mask, source="test:padded")


GEN_PROMPTS, GEN_TOKENS = 3, 8


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_bf16):
    """Full-mode lm_head captures of the same model, bf16, sdpa (reference) vs eager (target)."""
    root = tmp_path_factory.mktemp("rl")
    eager = hwdiff.load_model("tiny-qwen2", dtype="bfloat16", attn_implementation="eager")
    inputs = _padded_inputs()
    return {
        "sdpa": hwdiff.capture(tiny_bf16, root / "sdpa.h5", inputs=inputs, **CAP).path,
        "eager": hwdiff.capture(eager, root / "eager.h5", inputs=inputs, **CAP).path,
        "root": root,
        "inputs": inputs,
    }


def _log_softmax(z):
    z = z.astype(np.float64)
    top = z.max(-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def _numpy_side(path):
    with h5py.File(path, "r") as handle:
        raw = handle["modules/lm_head/0/output"][...]
        logits = (raw.astype(np.uint32) << 16).view(
            np.float32
        )  # bf16 bit patterns, widened exactly
        ids, mask = (
            handle["inputs/input_ids"][...],
            handle["inputs/attention_mask"][...].astype(bool),
        )
    return _log_softmax(logits), ids, mask


def test_delta_logp_statistics_equal_numpy_from_lm_head_captures(pair):
    ref_lp, ids, mask = _numpy_side(pair["sdpa"])
    tgt_lp, _, _ = _numpy_side(pair["eager"])
    real = np.zeros_like(mask)
    real[:, :-1] = mask[:, :-1] & mask[:, 1:]
    assert (~mask).any() and real.sum() < mask.sum()  # padding present: the mask is exercised
    rows, cols = np.nonzero(real)
    following = ids[rows, cols + 1]
    lr, lt = ref_lp[rows, cols, following], tgt_lp[rows, cols, following]
    delta = lt - lr
    expected = {
        "mean_abs": np.mean(np.abs(delta)),
        "max_abs": np.max(np.abs(delta)),
        "mean_exp_abs": np.mean(np.exp(np.abs(delta))),
        "k3_kl": np.mean(np.exp(delta) - 1 - delta),
    }
    rl = hwdiff.diff(pair["sdpa"], pair["eager"], progress=False).rl_impact
    assert rl.positions == real.sum()
    assert expected["mean_abs"] > 1e-4  # the two kernel paths really differ
    for key, value in expected.items():
        assert getattr(rl, key) == pytest.approx(value, rel=1e-6), key
    for threshold, fraction in zip((1e-3, 1e-2), rl.frac_above):
        assert fraction == np.mean(np.abs(delta) > threshold)
    worst = np.argmax(np.abs(delta))
    assert (rl.worst[0].prompt, rl.worst[0].position, rl.worst[0].token) == (
        rows[worst],
        cols[worst],
        following[worst],
    )
    # top-1 agreement, tie-aware: the sets of tokens at each side's maximum share a token
    top_r = ref_lp[rows, cols] == ref_lp[rows, cols].max(-1, keepdims=True)
    top_t = tgt_lp[rows, cols] == tgt_lp[rows, cols].max(-1, keepdims=True)
    assert rl.top1_agreement == pytest.approx(np.mean((top_r & top_t).any(-1)), rel=1e-12)


def _direct_topk_kl(ref, tgt, mask):
    values = []
    for s, t in zip(*np.nonzero(mask)):
        r = dict(zip(ref.topk_ids[s, t].tolist(), ref.topk_logprobs[s, t].tolist()))
        q = dict(zip(tgt.topk_ids[s, t].tolist(), tgt.topk_logprobs[s, t].tolist()))
        common = sorted(set(r) & set(q))
        if not common:
            continue
        zr = sum(math.exp(r[v]) for v in common)
        zq = sum(math.exp(q[v]) for v in common)
        values.append(
            sum(
                math.exp(r[v])
                / zr
                * (math.log(math.exp(r[v]) / zr) - math.log(math.exp(q[v]) / zq))
                for v in common
            )
        )
    return float(np.mean(values)), len(values)


def test_topk_kl_equals_a_direct_computation(pair):
    with hwdiff.open_capture(pair["sdpa"]) as ref, hwdiff.open_capture(pair["eager"]) as tgt:
        a, b, attention = ref.token_logprobs(), tgt.token_logprobs(), ref.attention_mask
    real = np.zeros(attention.shape, dtype=bool)
    real[:, :-1] = attention[:, :-1].astype(bool) & attention[:, 1:].astype(bool)
    expected, count = _direct_topk_kl(a, b, real)
    rl = hwdiff.diff(pair["sdpa"], pair["eager"], progress=False).rl_impact
    assert rl.topk_kl == pytest.approx(expected, rel=1e-9) and rl.topk_kl_positions == count
    assert 0 < rl.topk_kl < 1e-2


def test_topk_kl_on_planted_partial_overlap():
    """k = 3, the sets share tokens 1 and 2: KL over {1, 2} renormalised, by hand."""

    def side(ids, logps, next_token):
        return TokenLogProbs(
            np.array([[next_token, np.nan]]),
            np.zeros((1, 2)),
            np.array([[ids, ids]]),
            np.log(np.array([[logps, logps]])),
            {},
        )

    ref = side([1, 2, 3], [0.5, 0.3, 0.1], math.log(0.3))
    tgt = side([2, 1, 4], [0.4, 0.35, 0.2], math.log(0.4))
    rl = rl_impact(ref, tgt, np.ones((1, 2)), np.array([[0, 2]]))
    p, q = np.array([0.5, 0.3]) / 0.8, np.array([0.35, 0.4]) / 0.75
    assert rl.topk_kl == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-12)
    assert rl.topk_overlap == pytest.approx(2 / 3)
    assert rl.top1_agreement == 0.0  # 1 vs 2 at the top
    assert rl.positions == 1 and rl.mean_abs == pytest.approx(math.log(0.4 / 0.3), rel=1e-12)


def test_logprobs_are_stored_alike_in_every_mode(pair, tiny_bf16):
    with hwdiff.open_capture(pair["sdpa"]) as cap:
        full = cap.token_logprobs()
    assert (
        full.attrs["source"] == "logits"
        and full.attrs["topk"] == 8
        and full.attrs["compute_dtype"] == "float64"
    )
    path = pair["root"] / "stats.h5"
    hwdiff.capture(tiny_bf16, path, mode="stats", inputs=pair["inputs"], **CAP)
    with hwdiff.open_capture(path) as cap:
        stats = cap.token_logprobs()
    for field in ("next_token", "entropy", "topk_ids", "topk_logprobs"):
        np.testing.assert_array_equal(getattr(stats, field), getattr(full, field))


def test_old_captures_without_logprobs_still_diff_with_the_rl_block_absent(pair, tmp_path):
    old = shutil.copyfile(pair["eager"], tmp_path / "old.h5")
    with h5py.File(old, "r+") as handle:
        del handle["logprobs"]
    result = hwdiff.diff(
        pair["sdpa"],
        old,
        progress=False,
        json_path=tmp_path / "d.json",
        csv_path=tmp_path / "d.csv",
    )
    assert result.rl_impact is None and "old.h5" in result.rl_absent
    block = json.loads((tmp_path / "d.json").read_text())["rl_impact"]
    assert block["available"] is False and "no token log-probabilities" in block["reason"]
    assert (tmp_path / "d.rl.csv").read_text().splitlines()[1].startswith("available,False")
    assert result.layers  # the layer diff itself is unchanged


def test_report_answers_does_it_matter_for_rl(pair, tmp_path):
    result = hwdiff.diff(
        pair["sdpa"],
        pair["eager"],
        progress=False,
        json_path=tmp_path / "d.json",
        csv_path=tmp_path / "d.csv",
    )
    block = json.loads((tmp_path / "d.json").read_text())["rl_impact"]
    assert block["mean_abs"] == result.rl_impact.mean_abs and len(block["worst"]) == 10
    assert "K3" in block["k3_kl_definition"] and "intersection" in block["topk_kl_definition"]
    rows = dict(line.split(",", 1) for line in (tmp_path / "d.rl.csv").read_text().splitlines()[1:])
    assert float(rows["mean_abs"].split(",")[0]) == result.rl_impact.mean_abs
    out = hwdiff.report(result, tmp_path / "report")
    page = out.index.read_text()
    assert "Does it matter for RL?" in page and "slime" in page and "NeMo-RL" in page
    assert (tmp_path / "report" / "figures" / "rl_delta.png").is_file()


def _transformers_greedy(model, prompt):
    ids = torch.from_numpy(prompt)[None]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=GEN_TOKENS,
        )
    return out[0, ids.shape[1] :].numpy()


@pytest.mark.slow
def test_greedy_split_positions_equal_two_transformers_generate_runs(
    tmp_path, tiny_fp32, tiny_bf16
):
    paths = {}
    for name, model in (("fp32", tiny_fp32), ("bf16", tiny_bf16)):
        paths[name] = generate(
            model,
            tmp_path / f"{name}.h5",
            limit=GEN_PROMPTS,
            max_new_tokens=GEN_TOKENS,
            progress=False,
        ).path
    inputs = hwdiff.load_inputs(limit=GEN_PROMPTS)
    expected, stored = [], {}
    for name in paths:
        with hwdiff.open_capture(paths[name]) as cap:
            stored[name] = cap.generation()
    for row, (ids, mask) in enumerate(zip(inputs.input_ids, inputs.attention_mask)):
        prompt = ids[mask.astype(bool)]
        a, b = _transformers_greedy(tiny_fp32, prompt), _transformers_greedy(tiny_bf16, prompt)
        np.testing.assert_array_equal(stored["fp32"].ids[row], a)
        np.testing.assert_array_equal(stored["bf16"].ids[row], b)
        differ = np.flatnonzero(a != b)
        expected.append(int(differ[0]) if differ.size else None)
    result = diff_generations(paths["fp32"], paths["bf16"], json_path=tmp_path / "g.json")
    assert [p.split for p in result.prompts] == expected
    assert any(s is None for s in expected) and any(
        s is not None for s in expected
    )  # both cases exercised
    split = next(p for p in result.prompts if p.split is not None)
    assert split.ref_token != split.target_token and split.abs_delta_at_split >= 0
    histogram = json.loads((tmp_path / "g.json").read_text())["split_positions"]["histogram"]
    assert (
        histogram
        == np.bincount([s for s in expected if s is not None], minlength=GEN_TOKENS).tolist()
    )
    # the stored log-prob of a generated token: log_softmax of a plain forward over prompt + prefix (fp32)
    row, j = 0, 5
    prompt = inputs.input_ids[row][inputs.attention_mask[row].astype(bool)]
    context = torch.from_numpy(np.concatenate([prompt, stored["fp32"].ids[row, :j]]))[None]
    with torch.inference_mode():
        logits = tiny_fp32(input_ids=context).logits[0, -1].double()
    expected_lp = torch.log_softmax(logits, -1)[int(stored["fp32"].ids[row, j])].item()
    assert stored["fp32"].logprobs.next_token[row, j] == pytest.approx(expected_lp, abs=1e-4)


def test_generation_files_of_other_settings_or_kinds_are_refused(tmp_path, pair):
    lib = generate(
        hwdiff.load_model("tiny-qwen2", dtype="bfloat16"),
        tmp_path / "lib.h5",
        limit=1,
        max_new_tokens=3,
        progress=False,
    ).path
    with pytest.raises(HwdiffError, match="layer capture"):
        is_generation_pair(lib, pair["sdpa"])
    with pytest.raises(HwdiffError, match="generation files"):
        hwdiff.diff(lib, lib, progress=False)
    proc = run_cli(
        "generate",
        "--limit",
        "1",
        "--max-new-tokens",
        "2",
        "--dtype",
        "float32",
        "-q",
        "-o",
        tmp_path / "cli.h5",
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 prompts" in proc.stdout
    proc = run_cli("diff", lib, tmp_path / "cli.h5", "-q")
    assert (
        proc.returncode == 2 and "max_new_tokens" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_float32_path_matches_float64_to_float32_rounding():
    """The float32 path (devices without float64) against numpy float64 on planted logits."""
    from hwdiff.capturing.logprobs import token_logprobs

    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0, 3, (2, 5, 50)).astype(np.float32))
    ids = torch.from_numpy(rng.integers(0, 50, (2, 5)))
    out = token_logprobs(logits, ids, k=4, dtype=torch.float32)
    expected = _log_softmax(logits.numpy())
    following = np.take_along_axis(expected[:, :-1], ids.numpy()[:, 1:, None], -1)[..., 0]
    assert out["next_token"].dtype == torch.float32 and torch.isnan(out["next_token"][:, -1]).all()
    np.testing.assert_allclose(out["next_token"][:, :-1].numpy(), following, rtol=0, atol=2e-6)
    np.testing.assert_allclose(
        out["entropy"].numpy(), -(np.exp(expected) * expected).sum(-1), rtol=1e-5
    )
    np.testing.assert_array_equal(
        out["topk_ids"].numpy(), np.argsort(-expected, -1, kind="stable")[..., :4]
    )


def _logprobs_on_the_npu_stand_in(tmp_path):
    from tests import npu_standin

    with npu_standin.installed():
        model = hwdiff.load_model("tiny-qwen2", device="npu", dtype="bfloat16")
        path = hwdiff.capture(
            model, tmp_path / "npu.h5", kinds="head", limit=3, max_tokens=16, progress=False
        ).path
    with hwdiff.open_capture(path) as cap:
        stored, logits, ids = cap.token_logprobs(), cap.activation("lm_head"), cap.input_ids
    assert stored.attrs["compute_dtype"] == "float32" and stored.attrs["source"] == "logits"
    following = np.take_along_axis(_log_softmax(logits)[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(stored.next_token[:, :-1], following, rtol=0, atol=1e-5)


@pytest.mark.npu
def test_logprobs_on_the_npu_stand_in_are_float32_and_match_the_head(npu, tmp_path):  # noqa: F811 (a fixture)
    """The Ascend path (tests/npu_standin.py): computed on the device in float32, copied asynchronously."""
    npu(_logprobs_on_the_npu_stand_in, tmp_path)
