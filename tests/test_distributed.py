"""Multi-rank capture under torchrun (issue 16): two gloo ranks on the CPU, data and tensor parallel,
a rank killed mid-capture, and directories with a missing or foreign rank file.

Three torchrun launches in all (each pays the torch import twice); expected values are computed here
with numpy from a single-process capture of the same inputs, never from hwdiff's diff."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import hwdiff
from hwdiff.common.outputs import OutputError
from hwdiff.errors import CaptureFormatError, HwdiffError

from .conftest import ROOT, run_cli

ARGS = (
    "--model",
    "tiny-qwen2",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--batch-size",
    "2",
    "--limit",
    "6",
    "--max-tokens",
    "16",
    "-q",
)


def torchrun(*args, script=None, env=None, timeout=120):
    """``torchrun --nproc_per_node 2`` of ``-m hwdiff ARGS`` (or of ``script ARGS``)."""
    target = [str(script)] if script else ["-m", "hwdiff"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *target,
        *map(str, args),
    ]
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its ranks: never leave a rank behind
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """single.h5 (one process, same batches) and the data- and tensor-parallel capture directories."""
    root = tmp_path_factory.mktemp("dist")
    model = hwdiff.load_model("tiny-qwen2", dtype="float32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run with OMP_NUM_THREADS=1: the same CPU kernels
    try:
        hwdiff.capture(
            model,
            root / "single.h5",
            batch_size=2,
            limit=6,
            max_tokens=16,
            progress=False,
            record_inputs=True,
        )
    finally:
        torch.set_num_threads(threads)
    dp = torchrun("capture", *ARGS, "--record-inputs", "-o", root / "dp")
    assert dp.returncode == 0, dp.stderr[-3000:]
    tp = torchrun("capture", *ARGS, "--tp", "2", "-o", root / "tp")
    assert tp.returncode == 0, tp.stderr[-3000:]
    return root


def _logical(path, name):
    with hwdiff.open_capture(path) as cap:
        return cap.activation(name)


def test_data_parallel_is_bit_identical_to_one_process(runs):
    with hwdiff.open_capture(runs / "single.h5") as single, hwdiff.open_capture(runs / "dp") as dp:
        assert set(dp.modules) == set(single.modules) and len(single.modules) > 40
        assert (
            np.array_equal(dp.input_ids, single.input_ids)
            and dp.meta["inputs_fingerprint"] == single.meta["inputs_fingerprint"]
        )
        for name in single.modules:
            assert np.array_equal(single.activation(name), dp.activation(name)), name
            assert np.array_equal(
                single.activation(name, slot="input"), dp.activation(name, slot="input")
            ), name
        assert np.array_equal(
            single.token_logprobs().next_token, dp.token_logprobs().next_token, equal_nan=True
        )
        # rank r computed whole batches r, r + 2, …: 6 sequences in batches of 2 → rows 0,1,4,5 and 2,3
        assert json.loads(dp.meta["rank_files"])[1]["sequences"] == 2
    with hwdiff.open_capture(runs / "dp" / "rank1.h5") as rank1:
        assert (
            rank1.meta["rank"] == 1
            and rank1.meta["world_size"] == 2
            and rank1.meta["local_device"] == "cpu"
        )
        assert rank1.meta["process_group_backend"] == "gloo" and rank1.meta["parallel"] == "data"
        with hwdiff.open_capture(runs / "single.h5") as single:
            name = "model.layers.1.mlp.down_proj"
            assert np.array_equal(rank1.activation(name), single.activation(name)[2:4])
    done = run_cli("diff", runs / "single.h5", runs / "dp", "-q", "--json", runs / "dp.json")
    assert done.returncode == 0, done.stderr
    summary = json.loads((runs / "dp.json").read_text())
    assert summary["modules"] and all(row["exact"] == 1.0 for row in summary["modules"])


def test_tensor_parallel_reassembles_shards(runs):
    with hwdiff.open_capture(runs / "single.h5") as single, hwdiff.open_capture(runs / "tp") as tp:
        assert set(tp.modules) == set(single.modules)
        for name in single.modules:
            ref, got = (
                single.activation(name).astype(np.float64),
                tp.activation(name).astype(np.float64),
            )
            assert ref.shape == got.shape, name
            assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref), name
        # before the first row-parallel sum nothing differs: column shards put back in their place
        name = "model.layers.0.self_attn.q_proj"
        assert np.array_equal(single.activation(name), tp.activation(name))
    with pytest.raises(CaptureFormatError, match="tensor-parallel"):
        hwdiff.open_capture(runs / "tp" / "rank1.h5")
    assert hwdiff.store.verify_file(runs / "tp").ok
    done = run_cli("diff", runs / "single.h5", runs / "tp", "-q", "--json", runs / "tp.json")
    assert done.returncode == 0, done.stderr
    assert not json.loads((runs / "tp.json").read_text())["unmatched"]


def test_every_reader_takes_the_directory(runs, tmp_path):
    shown = run_cli("inspect", runs / "dp")
    assert shown.returncode == 0 and "parallel             data" in shown.stdout
    assert run_cli("inspect", "--verify", runs / "dp").returncode == 0
    replayed = run_cli("replay", runs / "dp", "--device", "cpu", "-o", tmp_path / "local.h5", "-q")
    assert replayed.returncode == 0, replayed.stderr
    with (
        hwdiff.open_capture(tmp_path / "local.h5") as local,
        hwdiff.open_capture(runs / "single.h5") as single,
    ):
        name = "model.layers.2.mlp.down_proj"  # a module replayed on the inputs the ranks stored
        assert np.allclose(local.activation(name), single.activation(name), rtol=0, atol=1e-5)


@pytest.mark.parametrize("damage", ["missing", "foreign", "no manifest"])
def test_incomplete_directories_are_refused(runs, tmp_path, damage):
    broken = tmp_path / "run"
    shutil.copytree(runs / "dp", broken)
    if damage == "missing":
        (broken / "rank1.h5").unlink()
        expected = "rank 1's file rank1.h5 is missing"
    elif damage == "foreign":
        shutil.copy(runs / "tp" / "rank1.h5", broken / "rank1.h5")
        expected = "belongs to another run"
    else:
        (broken / "manifest.h5").unlink()
        expected = "without manifest.h5"
    with pytest.raises(CaptureFormatError, match=expected):
        hwdiff.open_capture(broken)
    done = run_cli("diff", runs / "single.h5", broken)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and expected in done.stderr


@pytest.mark.slow
def test_a_rank_killed_mid_capture_leaves_no_capture(runs, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(runs / "dp", target)  # an earlier capture at the output path
    before = digest(target)
    done = torchrun(
        "capture",
        *ARGS,
        "-o",
        target,
        script=ROOT / "tests" / "dist_fault.py",
        env={"HWDIFF_TEST_KILL_RANK": "1"},
    )
    assert done.returncode != 0
    assert digest(target) == before
    for entry in tmp_path.iterdir():  # nothing else there reads as a capture
        if entry != target:
            with pytest.raises(HwdiffError):
                hwdiff.open_capture(entry)


def test_batches_are_dealt_whole(tmp_path):
    from hwdiff.capturing.distributed import batch_rows

    assert batch_rows(7, 2, 0, 2).tolist() == [0, 1, 4, 5]
    assert batch_rows(7, 2, 1, 2).tolist() == [2, 3, 6]
    with pytest.raises(HwdiffError, match="every rank needs at least one"):
        batch_rows(2, 2, 1, 2)


def test_device_map_splits_layers_and_keeps_results(tmp_path):
    from hwdiff.capturing import devicemap

    model = hwdiff.load_model("tiny-qwen2", dtype="float32")
    blocks = devicemap.plan(model, ["cuda:0", "cuda:1"])
    assert [blocks[f"model.layers.{i}"] for i in range(4)] == [
        "cuda:0",
        "cuda:0",
        "cuda:1",
        "cuda:1",
    ]
    assert blocks["model.embed_tokens"] == "cuda:0" and blocks["model.norm"] == "cuda:1"
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        devicemap.dispatch(
            model, ["cpu", "cpu"]
        )  # the hooks and moves of a split, on the devices this CI has
        assert torch.equal(model(input_ids=ids).logits, expected)
    hwdiff.capture(model, tmp_path / "c.h5", limit=2, max_tokens=8, progress=False)
    with hwdiff.open_capture(tmp_path / "c.h5") as cap:
        devices = json.loads(cap.meta["module_devices"])
        assert devices["model.layers.3.mlp.down_proj"] == "cpu" and devices["lm_head"] == "cpu"


def test_a_damaged_rank_file_is_reported_through_the_directory(runs, tmp_path):
    from hwdiff.errors import CorruptDataError

    broken = tmp_path / "run"
    shutil.copytree(runs / "dp", broken)
    name = "model.layers.1.mlp.down_proj"
    with h5py.File(broken / "rank1.h5", "r") as handle:
        offset = handle[f"modules/{name}/0/output"].id.get_chunk_info(0).byte_offset
    data = bytearray((broken / "rank1.h5").read_bytes())
    data[offset + 5] ^= 0x10
    (broken / "rank1.h5").write_bytes(bytes(data))
    with hwdiff.open_capture(broken) as cap:
        with pytest.raises(CorruptDataError, match="rank files of its directory"):
            cap.activation(name)
    found = hwdiff.store.verify_file(broken)
    assert not found.ok and found.problems[0][0] == f"rank1.h5:/modules/{name}/0/output"


@pytest.mark.slow
def test_tensor_parallel_of_a_llama_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    ids = np.random.default_rng(0).integers(0, 256, (4, 16))
    np.save(tmp_path / "ids.npy", ids)
    args = (
        "--model",
        tmp_path / "llama",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--batch-size",
        "2",
        "--inputs",
        tmp_path / "ids.npy",
        "-q",
    )
    single = run_cli("capture", *args, "-o", tmp_path / "single.h5")
    assert single.returncode == 0, single.stderr
    done = torchrun("capture", *args, "--tp", "2", "-o", tmp_path / "tp")
    assert done.returncode == 0, done.stderr[-3000:]
    with (
        hwdiff.open_capture(tmp_path / "single.h5") as one,
        hwdiff.open_capture(tmp_path / "tp") as tp,
    ):
        assert set(tp.modules) == set(one.modules) and "model.layers.1.mlp.act_fn" in one.modules
        for name in one.modules:
            ref, got = (
                one.activation(name).astype(np.float64),
                tp.activation(name).astype(np.float64),
            )
            assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref), name


@pytest.mark.parametrize(
    "command",
    [
        ("replay", "{dp}", "-o", "{dp}/rank0.h5"),
        ("diff", "{single}", "{dp}", "-o", "{dp}/manifest.h5"),
        ("diff", "{single}", "{dp}", "--csv", "{dp}/rank1.h5"),
    ],
)
def test_no_output_is_written_inside_an_input_capture_directory(runs, tmp_path, command):
    """The files of a multi-rank capture are the input: an output among them is refused before any work."""
    dp = tmp_path / "dp"
    shutil.copytree(runs / "dp", dp)
    before = digest(dp)
    argv = [part.format(dp=dp, single=runs / "single.h5") for part in command]
    done = run_cli(*argv)
    assert (
        done.returncode == 2
        and done.stderr.count("hwdiff: error:") == 1
        and "inside the input" in done.stderr
    )
    assert digest(dp) == before


def test_a_capture_directory_holding_other_files_is_not_replaced(runs, tmp_path):
    """Replacing an earlier capture directory deletes it whole: one that also holds a user's files is
    refused (before torchrun would start), and nothing in it changes."""
    from hwdiff.store.ranks import check_target

    target = tmp_path / "dp"
    shutil.copytree(runs / "dp", target)
    (target / "NOTES.txt").write_text("mine")
    before = digest(target)
    with pytest.raises(OutputError, match="also holds NOTES.txt"):
        check_target(target)
    assert digest(target) == before
    (target / "NOTES.txt").unlink()
    check_target(target)  # only the capture's own files: may be replaced


def test_calibration_finds_a_directory_reference(runs):
    """calibrate reads the reference capture a diff points to for its norm weights, the law evidence
    and the verify probe's token ids: a multi-rank directory is such a capture, not 'not at hand'."""
    from types import SimpleNamespace

    from hwdiff.calibration import reference_weights
    from hwdiff.measure.sigma_probe import PROBE_PROMPTS, PROBE_TOKENS, _probe_inputs

    diff = SimpleNamespace(
        reference={"path": str(runs / "dp")}
    )  # the one field of a DiffResult it reads
    norms = [
        SimpleNamespace(name="model.norm"),
        SimpleNamespace(name="model.layers.0.input_layernorm"),
    ]
    weights = reference_weights(diff, tuple(norms))
    with hwdiff.open_capture(runs / "single.h5") as single:
        assert weights is not None and set(weights) == {norm.name for norm in norms}
        assert all(np.array_equal(weights[name], single.weight(name)) for name in weights)
        ids, mask = _probe_inputs(None, str(runs / "dp"))
        assert np.array_equal(ids, single.input_ids[:PROBE_PROMPTS, :PROBE_TOKENS])
