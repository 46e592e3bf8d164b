import numpy as np

import hwdiff
from hwdiff.demo import run_demo


def test_demo_writes_two_captures_that_differ_only_by_attention_kernel(tmp_path, capsys):
    reference, target = run_demo(
        tmp_path, model_spec="tiny-qwen2", limit=4, max_tokens=24, progress=False
    )
    assert "wrote" in capsys.readouterr().out
    with hwdiff.open_capture(reference) as ref, hwdiff.open_capture(target) as tgt:
        assert (
            ref.meta["attn_implementation"] == "sdpa" and tgt.meta["attn_implementation"] == "eager"
        )
        assert ref.meta["inputs_fingerprint"] == tgt.meta["inputs_fingerprint"]
        # the kernel path changes nothing before the first attention, and changes its output
        assert np.array_equal(
            ref.activation("model.layers.0.self_attn.q_proj"),
            tgt.activation("model.layers.0.self_attn.q_proj"),
        )
        assert not np.array_equal(
            ref.activation("model.layers.0.self_attn"), tgt.activation("model.layers.0.self_attn")
        )


def test_demo_main_captures_inspects_and_diffs(tmp_path, capsys):
    from hwdiff.demo import main

    assert main(["--out", str(tmp_path), "--model", "tiny-qwen2", "--limit", "16", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "first divergence  model.layers.0.self_attn" in printed
    for name in (
        "reference-cpu-bf16-sdpa.h5",
        "target-cpu-bf16-eager.h5",
        "diff.h5",
        "diff.json",
        "diff.csv",
    ):
        assert (tmp_path / name).exists() and str(tmp_path / name) in printed
