import json

import h5py
import pytest

import hwdiff
from hwdiff.capturing.replaying import model_for
from hwdiff.errors import HwdiffError

from .conftest import L, run_cli

CAP = dict(limit=8, max_tokens=32, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def attn_pair(tmp_path_factory):
    """bf16 captures of tiny-qwen2 with sdpa and with eager attention, inputs recorded."""
    root = tmp_path_factory.mktemp("attn")
    paths = {}
    for attn in ("sdpa", "eager"):
        model = hwdiff.load_model("tiny-qwen2", dtype="bfloat16", attn_implementation=attn)
        paths[attn] = hwdiff.capture(model, root / f"{attn}.h5", record_inputs=True, **CAP).path
    return paths


def _with_local_error(result):
    return {layer.name for layer in result.outputs if not layer.exact}


def _attention_and_parents():
    return {f"model.layers.{i}.self_attn" for i in range(L)} | {
        f"model.layers.{i}" for i in range(L)
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replay_on_the_same_device_and_dtype_is_bit_exact(tmp_path, dtype):
    model = hwdiff.load_model("tiny-qwen2", dtype=dtype)
    reference = hwdiff.capture(model, tmp_path / "ref.h5", record_inputs=True, **CAP).path
    local = hwdiff.replay(model, reference, tmp_path / "local.h5", progress=False).path
    result = hwdiff.diff(reference, local, progress=False)
    assert result.exact and not result.unmatched
    assert len(result.outputs) == 13 * L + 3  # every captured module was replayed


def test_recorded_call_arguments_are_stored_once_and_linked(attn_pair):
    with h5py.File(attn_pair["eager"]) as handle:
        first = handle["modules/model.layers.0.self_attn/0"]
        spec = json.loads(first.attrs["call_spec"])
        assert spec["kwargs"]["hidden_states"] == {"slot": "input"}
        assert spec["kwargs"]["position_embeddings"]["type"] == "tuple"
        later = handle["modules/model.layers.3.self_attn/0"]
        link = later.get("input.position_embeddings.0", getlink=True)
        # inputs are recorded before each call (pre-hooks): layer 0 stores them first, everyone else links
        assert isinstance(link, h5py.SoftLink) and link.path.startswith("/modules/model.layers.0/")


def test_sdpa_vs_eager_first_divergence_and_replay_localize_attention(tmp_path, attn_pair):
    result = hwdiff.diff(attn_pair["sdpa"], attn_pair["eager"], progress=False)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert result.layer(f"model.layers.0.self_attn.{proj}").exact
    assert result.first_divergence.name == "model.layers.0.self_attn"
    eager = hwdiff.load_model("tiny-qwen2", dtype="bfloat16", attn_implementation="eager")
    local = hwdiff.replay(eager, attn_pair["sdpa"], tmp_path / "local.h5", progress=False).path
    replayed = hwdiff.diff(attn_pair["sdpa"], local, progress=False)
    assert _with_local_error(replayed) == _attention_and_parents()
    # a kernel difference, not a different computation: the mask was rebuilt for eager
    assert replayed.layer("model.layers.0.self_attn").metrics.rel_l2 < 0.01


def test_diff_with_local_separates_local_and_propagated_error(tmp_path, attn_pair):
    eager = hwdiff.load_model("tiny-qwen2", dtype="bfloat16", attn_implementation="eager")
    local = hwdiff.replay(eager, attn_pair["sdpa"], tmp_path / "local.h5", progress=False).path
    result = hwdiff.diff(
        attn_pair["sdpa"],
        attn_pair["eager"],
        local=local,
        json_path=tmp_path / "d.json",
        progress=False,
    )
    first_attention = result.layer("model.layers.0.self_attn").local
    assert first_attention.local_rel_l2 == pytest.approx(
        first_attention.total_rel_l2
    )  # nothing inherited yet
    linear = result.layer("model.layers.2.mlp.up_proj").local
    assert linear.local_rel_l2 == 0 and linear.propagated_rel_l2 == pytest.approx(
        linear.total_rel_l2
    )
    assert 0.5 < linear.amplification < 2
    module = next(
        m
        for m in json.loads((tmp_path / "d.json").read_text())["modules"]
        if m["name"] == "model.layers.2.mlp.up_proj" and m["slot"] == "output"
    )
    assert module["local_rel_l2"] == 0 and module["amplification"] == pytest.approx(
        linear.amplification
    )


def test_replay_refuses_what_it_cannot_replay(tmp_path):
    model = hwdiff.load_model("tiny-qwen2")
    plain = hwdiff.capture(model, tmp_path / "plain.h5", **CAP).path
    with pytest.raises(HwdiffError, match="--record-inputs"):
        hwdiff.replay(model, plain, tmp_path / "x.h5", progress=False)
    sampled = hwdiff.capture(
        model, tmp_path / "s.h5", mode="sample", record_inputs=True, **CAP
    ).path
    with pytest.raises(HwdiffError, match="full capture"):
        hwdiff.replay(model, sampled, tmp_path / "x.h5", progress=False)
    recorded = hwdiff.capture(model, tmp_path / "r.h5", record_inputs=True, **CAP).path
    with pytest.raises(HwdiffError, match="not the one captured"):
        hwdiff.replay(
            hwdiff.load_model("tiny-qwen2", seed=3), recorded, tmp_path / "x.h5", progress=False
        )
    assert not (tmp_path / "x.h5").exists()


def test_model_for_rebuilds_the_captured_builtin(attn_pair):
    model = model_for(attn_pair["sdpa"], device="cpu")
    assert str(next(model.parameters()).dtype) == "torch.bfloat16"
    with hwdiff.open_capture(attn_pair["sdpa"]) as ref:
        assert (
            hwdiff.capturing.models.model_info(model).fingerprint == ref.meta["model_fingerprint"]
        )


def test_cli_replay_and_diff_local(tmp_path, attn_pair):
    local = tmp_path / "local.h5"
    proc = run_cli(
        "replay", attn_pair["sdpa"], "--device", "cpu", "--attn-impl", "eager", "-q", "-o", local
    )
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(
        "diff", attn_pair["sdpa"], attn_pair["eager"], "--local", local, "-q", "--top", "5"
    )
    assert proc.returncode == 0 and "amplif." in proc.stdout
    bad = run_cli("replay", tmp_path / "missing.h5", "-o", tmp_path / "y.h5")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no such file" in bad.stderr


def test_a_mask_replay_cannot_rebuild_names_the_implementation_that_needs_none():
    """Zamba2's ``hybrid`` layer type is no mask kind hwdiff can rebuild: replay under sdpa of an eager
    reference is refused with the way out (replay with the reference's implementation), not a bare no."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from hwdiff.capturing.replaying import _MaskRebuilder

    config = SimpleNamespace(
        _attn_implementation="sdpa", layer_types=["mamba", "hybrid"], hidden_size=8
    )
    ref = SimpleNamespace(
        meta={"attn_implementation": "eager"}, attention_mask=np.ones((1, 4), dtype=np.int64)
    )
    masks = _MaskRebuilder(SimpleNamespace(config=config), ref, torch.device("cpu"), torch.float32)
    assert (
        masks.build(slice(0, 1), "model.layers.0.mamba", None) is None
    )  # a mamba layer keeps its padding mask
    with pytest.raises(
        HwdiffError, match=r"layer 1 uses 'hybrid' attention.*\(--attn-impl eager\)$"
    ):
        masks.build(
            slice(0, 1), "model.layers.1.shared_transformer.self_attn", torch.zeros(1, 1, 4, 4)
        )
