import json

import numpy as np
import pytest
import torch

from hwdiff.capturing.inputs import ByteTokenizer, Inputs, load_inputs, prompts_path
from hwdiff.errors import InputsError


def test_shipped_prompt_set_has_at_least_64_distinct_problems():
    rows = [json.loads(line) for line in prompts_path().read_text().splitlines()]
    questions = {row["question"] for row in rows}
    assert len(rows) >= 64 and len(questions) == len(rows)
    assert all(row["answer"] for row in rows)


def test_default_inputs_are_byte_tokens_right_padded_with_a_mask():
    inputs = load_inputs(max_tokens=48, limit=5)
    assert inputs.shape == (5, 48)
    first = json.loads(prompts_path().read_text().splitlines()[0])["question"]
    assert inputs.input_ids[0, 0] == ByteTokenizer.bos_token_id
    assert bytes(inputs.input_ids[0, 1:48].astype(np.uint8).tolist()) == first.encode()[:47]
    short = load_inputs(max_tokens=None, limit=5)
    lengths = short.attention_mask.sum(axis=1)
    assert short.shape[1] == lengths.max() and (lengths < short.shape[1]).any()
    row = int(np.argmin(lengths))
    assert (short.input_ids[row, lengths[row] :] == ByteTokenizer.pad_token_id).all()


def test_fingerprint_depends_on_ids_only():
    a, b = load_inputs(limit=3), load_inputs(limit=3)
    assert a.fingerprint == b.fingerprint
    ids = a.input_ids.copy()
    ids[0, 1] += 1
    assert Inputs(ids, a.attention_mask, "x").fingerprint != a.fingerprint


def test_token_ids_from_npy_jsonl_txt_and_arrays(tmp_path):
    ids = np.arange(24, dtype=np.int64).reshape(3, 8)
    np.save(tmp_path / "ids.npy", ids)
    (tmp_path / "ids.jsonl").write_text(
        "\n".join(json.dumps({"input_ids": row.tolist()}) for row in ids)
    )
    (tmp_path / "p.txt").write_text("one\n\ntwo two\n")
    from_npy = load_inputs(tmp_path / "ids.npy")
    assert from_npy.fingerprint == load_inputs(str(tmp_path / "ids.jsonl")).fingerprint
    assert from_npy.fingerprint == load_inputs(torch.from_numpy(ids)).fingerprint
    assert np.array_equal(load_inputs(ids, max_tokens=5, limit=2).input_ids, ids[:2, :5])
    assert load_inputs(tmp_path / "p.txt").shape == (2, 8)


def test_batches_cover_every_row_once():
    inputs = load_inputs(limit=10, max_tokens=16)
    starts = [(start, len(ids)) for start, ids, _ in inputs.batches(4)]
    assert starts == [(0, 4), (4, 4), (8, 2)]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", "{not json", "not valid JSON"),
        ("bad2.jsonl", '{"foo": 1}', "expected an object"),
        ("bad.csv", "1,2", "unknown type"),
        ("missing.npy", None, "cannot read"),
    ],
)
def test_unreadable_inputs_are_clear_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(InputsError, match=message):
        load_inputs(tmp_path / name)


def test_out_of_vocabulary_ids_and_float_arrays_are_refused():
    with pytest.raises(InputsError, match="vocabulary"):
        load_inputs(np.array([[1, 2, 999]])).check_vocab(320)
    with pytest.raises(InputsError, match="integers"):
        load_inputs(np.ones((2, 3)))
