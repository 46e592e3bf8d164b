"""Robustness cards against numbers computed here: Δlogp from the logits in numpy, greedy answers
from transformers' own generate, a planted logit sharpening (lm_head × 3) with a known ratio."""

import json

import numpy as np
import pytest
import torch
import yaml

import hwdiff
from hwdiff.aqn import AQNInjector, find_norms
from hwdiff.calibration import load_sigma
from hwdiff.errors import HwdiffError
from hwdiff.measure.robustness_run import (
    Options,
    RobustnessCard,
    compare_cards,
    extract_answer,
    format_card,
    is_correct,
    load_card,
    robustness,
)

from .conftest import run_cli

SIGMA = 0.05  # on every norm of float32 tiny-qwen2: clearly visible in the log-probs, cheap to run


def _sigma_file(path, model, sigma=SIGMA):
    """A hand-written sigma file (schema hwdiff/sigma/2): σ_end = ``sigma`` on every RMSNorm, Gaussian."""
    layers = {
        name: {"sigma_start": sigma * 10, "sigma_end": sigma, "multiplier": 1.0}
        for name, _ in find_norms(model)
    }
    data = {
        "schema": "hwdiff/sigma/2",
        "layers": layers,
        "schedule": {"sigma_start": sigma * 10, "sigma_end": sigma, "num_stages": 10},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _byte_ids(text):
    return [
        256,
        *text.encode("utf-8"),
    ]  # hwdiff's byte-level tokenizer for the built-in models, written out


QUESTIONS = [
    "Ann has 3 apples and buys 4 more. How many?",
    "What is 12 times 7?",
    "A box holds 9 pens. How many pens in 5 boxes?",
    "Subtract 18 from 50.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("robustness")
    model = hwdiff.load_model("tiny-qwen2", dtype="float32")
    return model, _sigma_file(root / "sigma.yaml", model), root


def _prompts(path, answers):
    path.write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(QUESTIONS, answers))
    )
    return path


def test_extract_answer_and_comparison():
    assert extract_answer("so she pays 12 + 9 = 21 dollars.") == "21"
    assert extract_answer("total: 1,250.5 km") == "1250.5"
    assert extract_answer("it falls to -3 degrees") == "-3"
    assert extract_answer("no digits here") == ""
    assert is_correct("21", "21") and is_correct("21.0", "21") and is_correct("1250", "1,250")
    assert not is_correct("", "21") and not is_correct("20", "21")


def test_token_statistics_equal_numpy_recomputation_and_weights_restored(tiny):
    model, sigma, root = tiny
    before = {n: m.weight.detach().clone() for n, m in find_norms(model)}
    prompts = _prompts(root / "p_tok.jsonl", ["7"] * 4)
    card = robustness(
        model,
        sigma,
        options=Options(draws=3, seed=5, prompts=prompts, max_new_tokens=0, progress=False),
    )
    assert all(torch.equal(before[n], m.weight) for n, m in find_norms(model))
    rows = [_byte_ids(q) for q in QUESTIONS]
    width = max(
        map(len, rows)
    )  # the same right-padded batch the card ran (padding changes float32 rounding)
    ids = torch.tensor([r + [258] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])

    def logp(i):  # log p(next token) in float64 at every real position but the last
        logits = model(input_ids=ids, attention_mask=mask).logits[i].double().numpy()
        logits -= logits.max(-1, keepdims=True)
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        n = len(rows[i])
        return lp[np.arange(n - 1), ids[i, 1:n].numpy()]

    clean = [logp(i) for i in range(4)]
    expected_abs, expected_k3 = np.zeros((3, 4)), np.zeros((3, 4))
    with torch.no_grad(), AQNInjector(model, load_sigma(sigma)) as injector:
        for d, seed in enumerate(card.meta["draw_seeds"]):
            injector.apply(seed=seed)
            for i in range(4):
                delta = logp(i) - clean[i]
                expected_abs[d, i], expected_k3[d, i] = (
                    np.abs(delta).mean(),
                    (np.expm1(delta) - delta).mean(),
                )
    np.testing.assert_allclose(card.emulated.mean_abs, expected_abs, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(card.emulated.k3_kl, expected_k3, rtol=1e-9, atol=1e-15)
    counts = np.array([len(c) for c in clean])
    pooled = (expected_abs * counts).sum() / (3 * counts.sum())
    stat = card.summary()["emulated"]["token"]["mean_abs"]
    assert stat["value"] == pytest.approx(pooled, rel=1e-12)
    assert stat["low"] < pooled < stat["high"]
    assert expected_abs.min() > 1e-3  # the noise did act


def _numeric_model():
    """tiny-qwen2 (float32, lm_head untied) whose digit rows lean towards the mean final hidden state, so that
    its greedy continuations are mostly digits: answers to extract, some of which the noise changes."""
    model = hwdiff.load_model("tiny-qwen2", dtype="float32")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(
        model.model.embed_tokens.weight.detach().clone(), requires_grad=False
    )
    with torch.no_grad():
        hidden = torch.cat(
            [
                model.model(input_ids=torch.tensor([_byte_ids(q)])).last_hidden_state[0]
                for q in QUESTIONS
            ]
        ).mean(0)
        model.lm_head.weight[48:58] += hidden / hidden.pow(2).sum()  # bytes '0'..'9'
    return model


def _greedy_answers(model, n):
    out = []
    for q in QUESTIONS:
        ids = torch.tensor([_byte_ids(q)])
        seq = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=n,
        )[0, ids.shape[1] :]
        out.append(
            extract_answer(
                bytes(t for t in seq.tolist() if t < 256).decode("utf-8", errors="replace")
            )
        )
    return out


@pytest.mark.slow
def test_answer_flips_agree_with_transformers_generate(tiny):
    _, _, root = tiny
    model = _numeric_model()
    sigma = _sigma_file(root / "sigma_numeric.yaml", model)
    n = 8
    card = robustness(
        model,
        sigma,
        options=Options(
            draws=2,
            seed=11,
            prompts=_prompts(root / "p0.jsonl", ["0"] * 4),
            max_new_tokens=n,
            progress=False,
        ),
    )
    with torch.no_grad():
        clean = _greedy_answers(model, n)
        noisy = []
        with AQNInjector(model, load_sigma(sigma)) as injector:
            for seed in card.meta["draw_seeds"]:
                injector.apply(seed=seed)
                noisy.append(_greedy_answers(model, n))
    assert card.emulated.clean_answers == tuple(clean) and card.emulated.answers == tuple(
        map(tuple, noisy)
    )
    # references chosen now, so that both kinds of flip can occur: the clean answer for the first half, draw 0's
    # for the second; the card's answer statistics are a function of its stored answers and the references
    refs = tuple(clean[:2]) + tuple(noisy[0][2:])
    answers = RobustnessCard(card.meta, card.emulated, None, refs).summary()["emulated"][
        "sequence"
    ]["answers"]
    right_clean = [is_correct(c, r) for c, r in zip(clean, refs)]
    r2w = sum(
        rc and not is_correct(a, r) for row in noisy for a, r, rc in zip(row, refs, right_clean)
    )
    w2r = sum(
        not rc and is_correct(a, r) for row in noisy for a, r, rc in zip(row, refs, right_clean)
    )
    assert (answers["right_to_wrong_total"], answers["wrong_to_right_total"]) == (r2w, w2r)
    assert answers["accuracy_clean"] == pytest.approx(np.mean(right_clean))
    assert r2w + w2r > 0  # the comparison is not between two zeros


def _untied_copy(model, root, scale):
    """model saved as a checkpoint with an untied lm_head whose weights are × ``scale``."""
    copy = hwdiff.load_model("tiny-qwen2", dtype="float32")
    copy.config.tie_word_embeddings = False
    copy.lm_head.weight = torch.nn.Parameter(
        copy.model.embed_tokens.weight.detach().clone() * scale, requires_grad=False
    )
    copy.save_pretrained(root)
    return hwdiff.load_model(str(root), dtype="float32")


def _ids_prompts(path):
    path.write_text(
        "".join(json.dumps({"input_ids": _byte_ids(q), "answer": "1"}) + "\n" for q in QUESTIONS)
    )
    return path


def test_planted_sharper_logits_are_less_robust_with_ratio_near_3(tiny, tmp_path):
    model, sigma, root = tiny
    base, sharp = _untied_copy(model, tmp_path / "a", 1.0), _untied_copy(model, tmp_path / "b", 3.0)
    opts = Options(
        draws=3, prompts=_ids_prompts(tmp_path / "ids.jsonl"), max_new_tokens=0, progress=False
    )
    card_a, card_b = robustness(base, sigma, options=opts), robustness(sharp, sigma, options=opts)
    result = compare_cards(card_a, card_b)
    assert result.verdict == "B is less robust"
    assert 2.5 < result.ratios["mean_abs"]["value"] < 3.3
    assert result.ratios["mean_abs"]["low"] > 2


@pytest.mark.slow
def test_same_checkpoint_other_seeds_no_detectable_difference_and_cards_round_trip(tiny, tmp_path):
    model, sigma, root = tiny
    prompts = _prompts(tmp_path / "p.jsonl", ["7"] * 4)
    paths = [tmp_path / f"card{seed}.json" for seed in (1, 2)]
    for seed, path in zip((1, 2), paths):
        robustness(
            model,
            sigma,
            options=Options(draws=4, seed=seed, prompts=prompts, max_new_tokens=4, progress=False),
            output=path,
        )
    result = compare_cards(*paths)
    assert result.verdict == "no detectable difference", result.summary()
    low, high = result.ratios["mean_abs"]["low"], result.ratios["mean_abs"]["high"]
    assert low < 1 < high
    again = load_card(paths[0])
    assert again.summary()["emulated"] == json.loads(paths[0].read_text())["emulated"]


def test_cards_of_other_prompts_or_noise_are_refused(tiny, tmp_path):
    model, sigma, root = tiny
    prompts = _prompts(tmp_path / "p.jsonl", ["7"] * 4)
    base = Options(draws=2, prompts=prompts, max_new_tokens=0, progress=False)
    a = robustness(model, sigma, options=base)
    fewer = robustness(
        model,
        sigma,
        options=Options(draws=2, prompts=prompts, limit=3, max_new_tokens=0, progress=False),
    )
    other = robustness(model, _sigma_file(tmp_path / "s2.yaml", model, 0.01), options=base)
    with pytest.raises(HwdiffError, match="differ in prompts"):
        compare_cards(a, fewer)
    with pytest.raises(HwdiffError, match="noise law"):
        compare_cards(a, other)
    (tmp_path / "x.json").write_text(json.dumps({"schema": "hwdiff/diff-summary/1"}))
    with pytest.raises(HwdiffError, match="not a robustness card"):
        load_card(tmp_path / "x.json")
    from hwdiff.measure.robustness_run import save_card

    save_card(a, tmp_path / "a.json")
    for key in ("cells", "draws"):  # a card with a part cut away: one line, not a KeyError
        data = json.loads((tmp_path / "a.json").read_text())
        del data[key]
        (tmp_path / "cut.json").write_text(json.dumps(data))
        with pytest.raises(HwdiffError, match=f"malformed robustness card .no '{key}'"):
            load_card(tmp_path / "cut.json")


def test_pair_of_other_inputs_is_refused(tiny, tmp_path):
    model, sigma, root = tiny
    cap = dict(limit=2, max_tokens=16, kinds=["head"], progress=False)
    a = hwdiff.capture(model, tmp_path / "a.h5", **cap).path
    b = hwdiff.capture(model, tmp_path / "b.h5", **cap).path
    with pytest.raises(HwdiffError, match="other inputs"):
        robustness(
            model,
            sigma,
            options=Options(draws=2, limit=3, max_new_tokens=0, progress=False),
            pair=[(a, b)],
        )


def test_pair_of_one_file_mixed_kinds_or_two_capture_pairs_is_refused(tiny, tmp_path):
    """Each refused before any draw: the same file twice would be a measured pair of exactly 0, a second
    capture pair would silently replace the first."""
    from hwdiff.capturing.generate import generate

    model, sigma, root = tiny
    opts = Options(draws=2, limit=2, max_tokens=16, max_new_tokens=0, progress=False)
    cap = dict(limit=2, max_tokens=16, kinds=["head"], progress=False)
    a = hwdiff.capture(model, tmp_path / "a.h5", **cap).path
    b = hwdiff.capture(model, tmp_path / "b.h5", **cap).path
    gen = generate(
        model, tmp_path / "g.h5", limit=2, max_tokens=16, max_new_tokens=2, progress=False
    ).path
    for pair, match in (
        ([(a, a)], "the same file twice"),
        ([(a, gen)], "one is a generation file"),
        ([(a, b), (b, a)], "two capture pairs"),
    ):
        with pytest.raises(HwdiffError, match=match):
            robustness(model, sigma, options=opts, pair=pair)
    assert not (tmp_path / "card.json").exists()


def test_a_pair_whose_reference_ran_in_another_dtype_is_said(tiny, tmp_path, caplog):
    model, sigma, root = tiny  # float32
    cap = dict(limit=2, max_tokens=16, kinds=["head"], progress=False)
    bf16 = hwdiff.load_model("tiny-qwen2", dtype="bfloat16")
    a = hwdiff.capture(model, tmp_path / "a.h5", **cap).path
    b = hwdiff.capture(bf16, tmp_path / "b.h5", **cap).path
    opts = Options(draws=2, limit=2, max_tokens=16, max_new_tokens=0, progress=False)
    with caplog.at_level("WARNING", logger="hwdiff.measure.robustness_run"):
        robustness(model, sigma, options=opts, pair=[(a, b)])
    assert "ran with" not in caplog.text
    with caplog.at_level("WARNING", logger="hwdiff.measure.robustness_run"):
        robustness(model, sigma, options=opts, pair=[(b, a)])
    assert "ran with dtype bfloat16 (card: float32)" in caplog.text


def test_norms_the_sigma_file_does_not_name_are_counted_and_said(tiny, tmp_path):
    model, _, root = tiny
    names = [name for name, _ in find_norms(model)]
    data = yaml.safe_load(_sigma_file(tmp_path / "all.yaml", model).read_text())
    del data["layers"][names[-1]]
    (tmp_path / "some.yaml").write_text(yaml.safe_dump(data))
    card = robustness(
        model,
        tmp_path / "some.yaml",
        options=Options(draws=2, limit=2, max_tokens=16, max_new_tokens=0, progress=False),
    )
    s = card.summary()["sigma"]
    assert (s["norms"], s["noised"], s["not_in_file"]) == (len(names), len(names) - 1, [names[-1]])
    assert f"σ_end on {len(names) - 1} of {len(names)} norms" in format_card(card.summary())
    assert f"the file names none of {names[-1]}" in format_card(card.summary())


def test_prompt_rows_without_tokens_are_refused_not_shifted(tiny, tmp_path):
    """hwdiff.capturing.inputs drops a row without tokens; its answer must not slide onto the next prompt."""
    model, sigma, root = tiny
    rows = [{"input_ids": [], "answer": "9"}] + [
        {"input_ids": _byte_ids(q), "answer": "7"} for q in QUESTIONS[:2]
    ]
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(HwdiffError, match="1 of its first 3 rows hold no tokens"):
        robustness(
            model, sigma, options=Options(draws=2, prompts=path, max_new_tokens=2, progress=False)
        )


def test_a_sigma_file_without_noise_is_refused(tiny, tmp_path):
    model, _, root = tiny
    data = yaml.safe_load(_sigma_file(tmp_path / "zero.yaml", model).read_text())
    for layer in data[
        "layers"
    ].values():  # every norm named, each with σ 0 (as a calibration's σ = 0 norms)
        layer.update(sigma_start=0.0, sigma_end=0.0)
    (tmp_path / "zero.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(HwdiffError, match="noise on none of this model's"):
        robustness(
            model,
            tmp_path / "zero.yaml",
            options=Options(draws=2, limit=1, max_tokens=8, max_new_tokens=0, progress=False),
        )


def test_a_binary_file_as_sigma_is_a_clear_error(tiny, tmp_path):
    model, _, root = tiny
    cap = hwdiff.capture(
        model, tmp_path / "c.h5", limit=1, max_tokens=8, kinds=["head"], progress=False
    ).path
    with pytest.raises(HwdiffError, match="not a sigma file"):
        robustness(
            model,
            cap,
            options=Options(draws=2, limit=1, max_tokens=8, max_new_tokens=0, progress=False),
        )


def test_split_line_without_changed_continuations():
    from hwdiff.measure.robustness_card import _answer_lines

    seq = {
        "split_positions": {"histogram": [], "median": None, "min": None},
        "answers": {"available": False, "reason": "no tokenizer"},
    }
    assert _answer_lines({"sequence": seq}, {})[0] == "emulated: no continuation changed"
    seq["split_positions"] = {"histogram": [0, 1], "median": 1.0, "min": 1}
    assert _answer_lines({"sequence": seq}, {})[0] == "emulated: first split median 1, min 1"


@pytest.mark.slow
def test_emulated_within_half_to_twice_the_measured_sdpa_eager_pair(tmp_path):
    """The acceptance check on tiny-qwen2: capture x2, replay, diff --local, calibrate, then the card."""
    from hwdiff.calibration import calibrate, save

    cap = dict(limit=6, max_tokens=32, progress=False)
    ref = hwdiff.load_model("tiny-qwen2", dtype="bfloat16")
    eager = hwdiff.load_model("tiny-qwen2", dtype="bfloat16", attn_implementation="eager")
    hwdiff.capture(ref, tmp_path / "ref.h5", record_inputs=True, **cap)
    hwdiff.capture(eager, tmp_path / "tgt.h5", **cap)
    hwdiff.replay(eager, tmp_path / "ref.h5", tmp_path / "local.h5", progress=False)
    hwdiff.diff(
        tmp_path / "ref.h5",
        tmp_path / "tgt.h5",
        local=tmp_path / "local.h5",
        out=tmp_path / "diff.h5",
        progress=False,
    )
    sigma = save(calibrate(tmp_path / "diff.h5"), tmp_path / "sigma.yaml")
    card = robustness(
        ref,
        sigma,
        options=Options(draws=3, limit=6, max_tokens=32, max_new_tokens=0, progress=False),
        pair=[(tmp_path / "ref.h5", tmp_path / "tgt.h5")],
    )
    ratio = card.summary()["emulated_vs_measured"]["mean_abs_ratio"]
    assert 0.5 <= ratio["value"] <= 2, ratio
    assert ratio["low"] < ratio["value"] < ratio["high"]


@pytest.mark.slow
def test_cli_card_compare_and_bad_input(tiny, tmp_path):
    model, sigma, root = tiny
    common = [
        "--model",
        "tiny-qwen2",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--sigma",
        sigma,
        "--draws",
        "2",
        "--limit",
        "2",
        "--max-tokens",
        "24",
        "--max-new-tokens",
        "3",
        "-q",
    ]
    proc = run_cli("robustness", *common, "-o", tmp_path / "a.json")
    assert proc.returncode == 0, proc.stderr
    assert (
        "mean |Δlogp|" in proc.stdout
        and json.loads((tmp_path / "a.json").read_text())["draws"] == 2
    )
    proc = run_cli(
        "robustness",
        "--compare",
        tmp_path / "a.json",
        tmp_path / "a.json",
        "-o",
        tmp_path / "cmp.json",
    )
    assert proc.returncode == 0 and "verdict at 95%: no detectable difference" in proc.stdout, (
        proc.stderr
    )
    bad = run_cli("robustness", "--model", "tiny-qwen2")
    assert (
        bad.returncode == 2 and bad.stderr.startswith("hwdiff: error:") and "--sigma" in bad.stderr
    )
    bad = run_cli("robustness", "--compare", tmp_path / "a.json", sigma)
    assert bad.returncode == 2 and "robustness card" in bad.stderr and "Traceback" not in bad.stderr


def test_output_over_the_prompts_or_into_the_checkpoint_is_refused(tiny, tmp_path):
    model, sigma, root = tiny
    prompts = _prompts(tmp_path / "p.jsonl", ["7"] * 4)
    before = prompts.read_bytes()
    common = ["--sigma", sigma, "--draws", "2", "--max-new-tokens", "0", "--device", "cpu", "-q"]
    bad = run_cli(
        "robustness", "--model", "tiny-qwen2", "--prompts", prompts, *common, "-o", prompts
    )
    assert (
        bad.returncode == 2
        and "would destroy the input" in bad.stderr
        and "Traceback" not in bad.stderr
    )
    assert prompts.read_bytes() == before
    with pytest.raises(HwdiffError, match="would destroy the input"):
        robustness(
            model,
            sigma,
            options=Options(draws=2, prompts=prompts, max_new_tokens=0, progress=False),
            output=prompts,
        )
    assert prompts.read_bytes() == before
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    bad = run_cli("robustness", "--model", ckpt, *common, "-o", ckpt / "config.json")
    assert (
        bad.returncode == 2
        and "inside the input" in bad.stderr
        and (ckpt / "config.json").read_text() == "{}"
    )


@pytest.mark.slow
def test_report_shows_the_card(tiny, tmp_path):
    model, sigma, root = tiny
    cap = dict(limit=2, max_tokens=16, kinds=["head"], progress=False)
    a = hwdiff.capture(model, tmp_path / "a.h5", **cap).path
    b = hwdiff.capture(model, tmp_path / "b.h5", **cap).path
    hwdiff.diff(a, b, json_path=tmp_path / "diff.json", progress=False)
    card = robustness(
        model,
        sigma,
        options=Options(draws=2, limit=2, max_tokens=16, max_new_tokens=0, progress=False),
        pair=[(a, b)],
        output=tmp_path / "card.json",
    )
    page = hwdiff.report(
        tmp_path / "diff.json", tmp_path / "report", robustness=tmp_path / "card.json"
    )
    text = page.index.read_text()
    value = card.summary()["emulated"]["token"]["mean_abs"]["value"]
    assert "Robustness to the calibrated noise" in text and f"{value:.4g}" in text
    assert "Robustness to the calibrated noise" in page.markdown.read_text()


def _synthetic(values, seed):
    """A card from planted per-(draw, prompt) values (no model): token statistics only."""
    from hwdiff.measure.robustness_run import Cells

    meta = {
        "model": {
            "spec": "planted",
            "fingerprint": "sha256:0",
            "dtype": "float32",
            "device": "cpu",
            "attn_implementation": "sdpa",
        },
        "sigma": {"fingerprint": "sha256:1"},
        "prompts": {"fingerprint": "sha256:2"},
        "max_new_tokens": 0,
        "confidence": 0.95,
        "draws": values.shape[0],
        "seed": seed,
    }
    cells = Cells(
        positions=np.full(values.shape[1], 10.0),
        mean_abs=values,
        k3_kl=values**2 / 2,
        top1_agreement=np.ones_like(values),
    )
    return RobustnessCard(meta, cells, None, ("",) * values.shape[1])


def test_verdicts_on_planted_cells():
    rng = np.random.default_rng(0)
    prompt_level = rng.uniform(
        0.02, 0.06, 24
    )  # prompts differ; draws scatter 10% around each prompt's level

    def draw():
        return prompt_level * rng.normal(1, 0.1, (6, 24))

    a, same = _synthetic(draw(), 0), _synthetic(draw(), 1)
    worse, better = _synthetic(1.5 * draw(), 2), _synthetic(0.6 * draw(), 3)
    assert compare_cards(a, same).verdict == "no detectable difference"
    result = compare_cards(a, worse)
    assert (
        result.verdict == "B is less robust"
        and result.ratios["mean_abs"]["low"] < 1.5 < result.ratios["mean_abs"]["high"]
    )
    assert compare_cards(a, better).verdict == "B is more robust"
    pooled = (a.emulated.mean_abs * 10).sum() / (6 * 240)
    assert a.summary()["emulated"]["token"]["mean_abs"]["value"] == pytest.approx(pooled, rel=1e-12)
