"""Token log-probabilities (hwdiff/capturing/logprobs.py): the blocked normaliser against numpy float64, and the
source: the model's own output logits, after the logit scaling / soft-capping some families apply
past their head module."""

import numpy as np
import pytest
import torch

import hwdiff
from hwdiff.capturing import logprobs as lp


def _reference(logits: np.ndarray, ids: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """log_softmax, entropy, next-token log-prob and top-k in numpy float64, written out directly."""
    z = logits.astype(np.float64)
    top = z.max(-1, keepdims=True)
    logp = z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))
    p = np.exp(logp)
    entropy = -np.where(p > 0, p * logp, 0.0).sum(-1)
    following = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    order = np.argsort(-logp, -1, kind="stable")[..., :k]
    return {
        "next_token": following,
        "entropy": entropy,
        "topk_ids": order,
        "topk_logprobs": np.take_along_axis(logp, order, -1),
    }


@pytest.mark.parametrize("vocab,scale", [(50, 3.0), (8192, 3.0), (1000, 40.0), (3, 1e-3)])
def test_float64_path_equals_numpy_float64(vocab, scale, monkeypatch):
    """Within 1e-12 nats of numpy float64 (the stated error is a few float64 ulp), over several row blocks."""
    monkeypatch.setitem(
        lp._BLOCK_BYTES, "cpu", 4096
    )  # forces many blocks, partial last one included
    rng = np.random.default_rng(vocab)
    logits = (rng.normal(0, scale, (3, 7, vocab))).astype(np.float32)
    ids = rng.integers(0, vocab, (3, 7))
    out = lp.token_logprobs(torch.from_numpy(logits), torch.from_numpy(ids), k=4)
    ref = _reference(logits, ids, 4)
    assert out["next_token"].dtype == torch.float64 and torch.isnan(out["next_token"][:, -1]).all()
    np.testing.assert_allclose(
        out["next_token"][:, :-1].numpy(), ref["next_token"], rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(out["entropy"].numpy(), ref["entropy"], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(out["topk_ids"].numpy(), ref["topk_ids"][..., : min(4, vocab)])
    np.testing.assert_allclose(
        out["topk_logprobs"].numpy(), ref["topk_logprobs"], rtol=0, atol=1e-12
    )


def test_masked_words_add_nothing_to_the_entropy_and_nan_logits_stay_nan():
    """A −inf logit (a masked word) has p = 0: the entropy is that of the other words, not NaN; a row
    with a NaN logit is NaN throughout."""
    logits = torch.tensor([[[0.0, 1.0, -float("inf"), 2.0], [0.5, float("nan"), 0.0, 0.0]]])
    out = lp.token_logprobs(logits, torch.tensor([[3, 2]]), k=2)
    p = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    assert out["entropy"][0, 0].item() == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-14)
    assert out["next_token"][0, 0].item() == -float("inf")  # the masked word is the next token here
    assert torch.isnan(out["entropy"][0, 1]) and torch.isnan(out["topk_logprobs"][0, 1]).all()


def test_logits_are_left_untouched():
    logits = torch.randn(1, 4, 16)
    before = logits.clone()
    lp.token_logprobs(logits, torch.zeros(1, 4, dtype=torch.int64), dtype=torch.float32)
    assert torch.equal(logits, before)


def _granite():
    import transformers as tf

    return tf.GraniteForCausalLM(tf.GraniteConfig(logits_scaling=4.0, **_SIZES))


def _cohere():
    import transformers as tf

    return tf.CohereForCausalLM(tf.CohereConfig(logit_scale=0.25, **_SIZES))


def _gemma2():
    import transformers as tf

    return tf.Gemma2ForCausalLM(
        tf.Gemma2Config(final_logit_softcapping=0.5, head_dim=16, sliding_window=16, **_SIZES)
    )


def _phi3():
    import transformers as tf

    return tf.Phi3ForCausalLM(tf.Phi3Config(**_SIZES))


_SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.mark.parametrize(
    "build,rescaled",
    [(_granite, True), (_cohere, True), (_gemma2, True), (_phi3, False)],
    ids=["granite", "cohere", "gemma2", "phi3"],
)
def test_logprobs_are_those_of_the_models_own_output_logits(build, rescaled, tmp_path):
    """Saved, loaded by path and captured: /logprobs equals log_softmax of the model's own
    ``output.logits`` (computed here), not of the head module's output, which Granite, Cohere and
    Gemma 2 rescale or soft-cap afterwards (Phi-3, which does not, is the control)."""
    torch.manual_seed(0)
    build().save_pretrained(tmp_path / "model")
    model = hwdiff.load_model(str(tmp_path / "model"))
    ids = np.random.default_rng(0).integers(3, 128, (2, 12))
    path = hwdiff.capture(
        model, tmp_path / "c.h5", inputs=hwdiff.load_inputs(ids), kinds="head", progress=False
    ).path
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), output_hidden_states=True)
        head_logits = model.lm_head(out.hidden_states[-1]).numpy()
    ref = _reference(out.logits.numpy(), ids, 8)
    with hwdiff.open_capture(path) as cap:
        stored = cap.token_logprobs()
    assert stored.attrs["source"] == "logits"
    np.testing.assert_allclose(stored.next_token[:, :-1], ref["next_token"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(stored.entropy, ref["entropy"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(stored.topk_logprobs, ref["topk_logprobs"], rtol=0, atol=1e-12)
    from_head = _reference(head_logits, ids, 8)["next_token"]
    gap = np.abs(from_head - ref["next_token"]).max()
    assert (
        gap > 1e-2 if rescaled else gap < 1e-5
    )  # the head's output is the wrong source where it is rescaled
