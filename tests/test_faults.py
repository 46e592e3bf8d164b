"""Bad inputs and faults through the CLI (issue 11): every case ends in the exit code it should, one
``hwdiff: error:`` line and no traceback, with every input and earlier output byte-identical and no
``.partial`` file left behind.

One tiny capture set (tiny-qwen2, 2 sequences x 16 tokens) is shared by the whole module; an autouse
guard hashes it before and after every test.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from .conftest import ROOT, run_cli

SMALL = ("--device", "cpu", "--limit", "2", "--max-tokens", "16", "-q")


# ------------------------------------------------------------------------------------------------
# fixtures and checks
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """ref (with inputs), tgt (eager attention), local (replay of ref), a second reference with its
    own replay, diff.h5 / diff.json of ref vs tgt with --local, sigma.yaml."""
    import hwdiff
    from hwdiff.capturing.replaying import replay

    root = tmp_path_factory.mktemp("faults-pair")
    sdpa = hwdiff.load_model("tiny-qwen2", dtype="bfloat16")
    eager = hwdiff.load_model("tiny-qwen2", dtype="bfloat16", attn_implementation="eager")
    opts = dict(limit=2, max_tokens=16, progress=False)
    files = {
        "ref": hwdiff.capture(sdpa, root / "ref.h5", record_inputs=True, **opts).path,
        "tgt": hwdiff.capture(eager, root / "tgt.h5", **opts).path,
        "ref2": hwdiff.capture(sdpa, root / "ref2.h5", record_inputs=True, **opts).path,
    }
    files["local"] = replay(eager, files["ref"], root / "local.h5", progress=False).path
    files["other_local"] = replay(
        eager, files["ref2"], root / "other-local.h5", progress=False
    ).path
    hwdiff.diff(
        files["ref"],
        files["tgt"],
        root / "diff.h5",
        local=files["local"],
        json_path=root / "diff.json",
        progress=False,
    )
    files.update(diff=root / "diff.h5", json=root / "diff.json")
    files["sigma"] = hwdiff.save_sigma(hwdiff.calibrate(files["diff"]), root / "sigma.yaml")
    files["root"] = root
    return files


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _partials(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.name.endswith(".partial")]


@pytest.fixture(autouse=True)
def guard(pair, tmp_path):
    """Every shared input byte-identical after each test; no temporary left anywhere."""
    before = _hashes(pair["root"])
    yield
    assert _hashes(pair["root"]) == before, "a shared input file changed"
    assert not _partials(pair["root"], tmp_path)


def one_error(proc, *fragments, rc=2):
    """Exit code ``rc``, exactly one ``hwdiff: error:`` line holding every fragment, no traceback."""
    assert proc.returncode == rc, (proc.returncode, proc.stderr[-2000:])
    for noise in ("Traceback", "Exception ignored", "Segmentation"):
        assert noise not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hwdiff: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def previous(path: Path, content: bytes = b"previous result, must survive") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return content


# ------------------------------------------------------------------------------------------------
# 1. report -o DIR writes only its own files
# ------------------------------------------------------------------------------------------------
def test_report_into_a_folder_with_other_files_keeps_them_and_replaces_only_its_own(pair, tmp_path):
    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    others = {
        "notes.txt": b"my notes",
        "capture.h5": pair["ref"].read_bytes(),
        "sub/keep.bin": b"\x00\x01",
        "diff.h5": pair["diff"].read_bytes(),
    }
    for name, data in others.items():
        (results / name).write_bytes(data)
    proc = run_cli("report", results / "diff.h5", "-q", "-o", results)
    assert proc.returncode == 0, proc.stderr
    assert (results / "index.html").is_file() and (results / "report.md").is_file()
    assert list((results / "figures").glob("*.png"))
    # again, as `-o .`: a figure the old page showed and the new one does not draw goes; others stay
    others["figures/mine.png"] = b"not hwdiff's"
    (results / "figures" / "mine.png").write_bytes(others["figures/mine.png"])
    (results / "figures" / "golden.png").write_bytes(b"a figure an older report showed")
    index = (results / "index.html").read_text()
    (results / "index.html").write_text(
        index.replace("</body>", '<img src="figures/golden.png"></body>')
    )
    proc = run_cli("report", "diff.h5", "-q", "-o", ".", cwd=results)
    assert proc.returncode == 0, proc.stderr
    for name, data in others.items():
        assert (results / name).read_bytes() == data, name
    assert not (results / "figures" / "golden.png").exists()
    assert "figures/golden.png" not in (results / "index.html").read_text()


# ------------------------------------------------------------------------------------------------
# 2. an output equal to an input, or to another output: refused before any work
# ------------------------------------------------------------------------------------------------
OUTPUT_IS_INPUT = {
    "diff -o ref": ("diff", "{ref}", "{tgt}", "-o", "{ref}"),
    "diff --csv ref": ("diff", "{ref}", "{tgt}", "--csv", "{ref}"),
    "diff --json tgt": ("diff", "{ref}", "{tgt}", "--json", "{tgt}"),
    "diff -o local": ("diff", "{ref}", "{tgt}", "--local", "{local}", "-o", "{local}"),
    "replay -o ref": ("replay", "{ref}", "--device", "cpu", "-o", "{ref}"),
    "calibrate -o diff.h5": ("calibrate", "{diff}", "-o", "{diff}"),
    "calibrate -o diff.json": ("calibrate", "{json}", "-o", "{json}"),
    "report --sigma sigma.yaml -o its folder": (
        "report",
        "{diff}",
        "--sigma",
        "{sigma}",
        "-o",
        "{sigma}",
    ),
}


@pytest.mark.parametrize("args", OUTPUT_IS_INPUT.values(), ids=OUTPUT_IS_INPUT.keys())
def test_output_equal_to_an_input_is_refused(pair, args):
    proc = run_cli(*[arg.format(**pair) for arg in args])
    one_error(proc, "output")


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_output_linked_to_an_input_is_refused(pair, tmp_path, link):
    alias = tmp_path / "alias.h5"
    (os.symlink if link == "symlink" else os.link)(pair["ref"], alias)
    one_error(run_cli("diff", pair["ref"], pair["tgt"], "-q", "-o", alias), "is the input")


@pytest.mark.parametrize("flags", [("-o", "--json"), ("-o", "--csv"), ("--json", "--csv")])
def test_two_outputs_of_one_command_must_differ(pair, tmp_path, flags):
    same = tmp_path / "same"
    proc = run_cli("diff", pair["ref"], pair["tgt"], "-q", flags[0], same, flags[1], same)
    one_error(proc, "same file")
    assert not same.exists()


def test_capture_inputs_file_as_output_is_refused(tmp_path):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(1, 9, dtype=np.int64)[None])
    content = ids.read_bytes()
    one_error(run_cli("capture", *SMALL, "--inputs", ids, "-o", ids), "is the input")
    assert ids.read_bytes() == content


# ------------------------------------------------------------------------------------------------
# 3. disk full: one line naming the path and the free space; the earlier file survives
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("disk-full cases mount a small tmpfs, which needs root")
    mount = tmp_path_factory.mktemp("tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte."""
    filler = folder / "filler"
    block = b"\xff" * (64 << 10)
    with open(filler, "wb", buffering=0) as handle:
        for size in (len(block), 4096, 1):
            try:
                while True:
                    handle.write(block[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


DISK_FULL = {
    "capture": ("capture", *SMALL, "-o", "{out}"),
    "replay": ("replay", "{ref}", "--device", "cpu", "-q", "-o", "{out}"),
    "probe-ops": ("probe-ops", "--device", "cpu", "-q", "-o", "{out}"),
    "diff -o": ("diff", "{ref}", "{tgt}", "-q", "-o", "{out}"),
    "diff --json": ("diff", "{ref}", "{tgt}", "-q", "--json", "{out}"),
    "calibrate --export verl": ("calibrate", "{diff}", "-q", "--export", "verl", "-o", "{out}"),
    "report": ("report", "{diff}", "-q", "-o", "{folder}"),
}


@pytest.mark.parametrize("args", DISK_FULL.values(), ids=DISK_FULL.keys())
def test_disk_full_is_one_line_and_keeps_the_earlier_file(pair, full_disk, args):
    out, folder = full_disk / "out.file", full_disk / "report"
    earlier = previous(folder / "index.html" if args[0] == "report" else out)
    filler = _fill(full_disk)
    try:
        proc = run_cli(*[arg.format(out=out, folder=folder, **pair) for arg in args])
    finally:
        filler.unlink()
    one_error(proc, "no space left", "MiB free")
    assert (folder / "index.html" if args[0] == "report" else out).read_bytes() == earlier
    assert sorted(p.name for p in full_disk.rglob("*")) == sorted(
        ["report", "index.html"] if args[0] == "report" else ["out.file"]
    )
    shutil.rmtree(folder, ignore_errors=True)
    out.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# 4. unwritable locations: refused before the work
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def read_only(tmp_path):
    """A read-only folder: a read-only bind mount as root (root ignores permission bits), else mode 555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "old.h5").write_bytes(b"old")
    if os.geteuid() == 0:
        done = subprocess.run(
            ["mount", "--bind", "-o", "ro", str(folder), str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount here: {done.stderr.strip()}")
        yield folder
        subprocess.run(["umount", str(folder)], check=False)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


UNWRITABLE = {
    "capture": ("capture", *SMALL, "-o", "{ro}/new.h5"),
    "capture over an old file": ("capture", *SMALL, "-o", "{ro}/old.h5"),
    "replay": ("replay", "{ref}", "--device", "cpu", "-q", "-o", "{ro}/new.h5"),
    "diff -o": ("diff", "{ref}", "{tgt}", "-q", "-o", "{ro}/d.h5"),
    "calibrate": ("calibrate", "{diff}", "-q", "-o", "{ro}/s.yaml"),
    "report": ("report", "{diff}", "-q", "-o", "{ro}/report"),
    "capture into a subfolder of it": ("capture", *SMALL, "-o", "{ro}/a/b/new.h5"),
}


@pytest.mark.parametrize("args", UNWRITABLE.values(), ids=UNWRITABLE.keys())
def test_read_only_folder_is_refused_before_the_work(pair, read_only, args):
    started = time.perf_counter()
    proc = run_cli(*[arg.format(ro=read_only, **pair) for arg in args])
    one_error(proc, str(read_only))
    assert time.perf_counter() - started < 30  # refused before any model is loaded or file read
    assert sorted(p.name for p in read_only.iterdir()) == ["old.h5"]
    assert (read_only / "old.h5").read_bytes() == b"old"


def test_existing_directory_as_capture_output_is_refused(tmp_path):
    one_error(run_cli("capture", *SMALL, "-o", tmp_path), "existing directory")


def test_existing_file_as_report_folder_is_refused(pair, tmp_path):
    target = tmp_path / "report"
    earlier = previous(target)
    one_error(run_cli("report", pair["diff"], "-q", "-o", target), "existing file")
    assert target.read_bytes() == earlier


# ------------------------------------------------------------------------------------------------
# 5. signals mid-capture
# ------------------------------------------------------------------------------------------------
def _capture_until_written(out: Path) -> subprocess.Popen:
    """Start a capture of 16 sequences (batch 1) and return once its temporary holds > 256 KiB."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hwdiff",
            "capture",
            "--device",
            "cpu",
            "--limit",
            "16",
            "--max-tokens",
            "64",
            "--batch-size",
            "1",
            "-q",
            "-o",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        temps = _partials(out.parent)
        if temps and temps[0].stat().st_size > 256 << 10:
            return proc
        time.sleep(0.02)
    proc.kill()
    pytest.fail(
        f"the capture never wrote part of its file (rc {proc.poll()}): {proc.stderr.read()[-500:]}"
    )


@pytest.mark.parametrize(
    "signum, rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_signal_mid_capture_removes_the_temporary(tmp_path, signum, rc):
    out = tmp_path / "cap.h5"
    earlier = previous(out)
    proc = _capture_until_written(out)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    one_error(
        subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), "interrupted", rc=rc
    )
    assert out.read_bytes() == earlier


def test_sigkill_leftover_is_removed_at_the_next_write_there(tmp_path):
    out = tmp_path / "cap.h5"
    earlier = previous(out)
    proc = _capture_until_written(out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    left = _partials(tmp_path)
    assert len(left) == 1 and out.read_bytes() == earlier
    proc = run_cli(
        "capture",
        "--device",
        "cpu",
        "--limit",
        "1",
        "--max-tokens",
        "8",
        "-q",
        "-o",
        tmp_path / "next.h5",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert (
        len(lines) == 1
        and "removed" in lines[0]
        and str(left[0]) in lines[0]
        and "no longer running" in lines[0]
    )
    assert not _partials(tmp_path) and out.read_bytes() == earlier


# ------------------------------------------------------------------------------------------------
# 6. corruption: checksums name the dataset; NaN/Inf are shown
# ------------------------------------------------------------------------------------------------
def _flip_byte(path: Path, dataset: str) -> None:
    """Flip one bit inside the first chunk of ``dataset`` with plain file I/O (h5py would recompute
    the checksum)."""
    with h5py.File(path, "r") as handle:
        node = handle[dataset]
        assert node.fletcher32
        info = node.id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + info.size // 2)
        byte = raw.read(1)
        raw.seek(info.byte_offset + info.size // 2)
        raw.write(bytes([byte[0] ^ 0x04]))


OUTPUT = "/modules/model.layers.1.mlp.down_proj/0/output"
INPUT = "/modules/model.layers.1.input_layernorm/0/input"
CORRUPT = {
    "inspect --verify": (OUTPUT, ("inspect", "--verify", "{bad}")),
    "diff": (OUTPUT, ("diff", "{bad}", "{tgt}", "-q", "-o", "{out}")),
    "replay": (INPUT, ("replay", "{bad}", "--device", "cpu", "-q", "-o", "{out}")),
}


@pytest.mark.parametrize("dataset, args", CORRUPT.values(), ids=CORRUPT.keys())
def test_a_flipped_byte_is_an_error_naming_the_dataset(pair, tmp_path, dataset, args):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(pair["ref"].read_bytes())
    _flip_byte(bad, dataset)
    out = tmp_path / "out.h5"
    earlier = previous(out)
    proc = run_cli(*[arg.format(bad=bad, out=out, **pair) for arg in args])
    one_error(proc, dataset)
    assert out.read_bytes() == earlier
    if args[0] == "inspect":
        assert f"damaged  {dataset}: checksum failed" in proc.stdout


def test_an_intact_capture_and_diff_verify(pair):
    for name in ("ref", "diff"):
        proc = run_cli("inspect", "--verify", pair[name])
        assert proc.returncode == 0 and "every checksum holds" in proc.stdout, proc.stderr


def test_nan_and_inf_are_warned_about_in_terminal_table_report_and_verify(pair, tmp_path):
    bad = tmp_path / "nan.h5"
    bad.write_bytes(pair["tgt"].read_bytes())
    first = "model.layers.1.self_attn.o_proj"
    with h5py.File(
        bad, "r+"
    ) as handle:  # through h5py: the checksum stays valid, the values do not
        node = handle[f"/modules/{first}/0/output"]
        values = node[...]
        values[0, 0, :3] = [0x7FC0, 0x7F80, 0xFF80]  # bfloat16 NaN, +Inf, -Inf
        node[...] = values
        later = handle["/modules/model.layers.3.mlp.down_proj/0/output"]
        values = later[...]
        values[1, 0, 0] = 0x7FC0
        later[...] = values
    proc = run_cli("diff", pair["ref"], bad, "-q", "--top", "100", "-o", tmp_path / "d.h5")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "NaN/Inf" in line]
    assert len(warnings) == 1 and warnings[0].startswith("hwdiff: warning:")
    assert (
        "in 2 module output(s)" in warnings[0]
        and first in warnings[0]
        and "1 NaN 2 Inf" in warnings[0]
    )
    assert any(line.startswith("WARNING") and first in line for line in proc.stdout.splitlines())
    header = next(line for line in proc.stdout.splitlines() if line.startswith("module"))
    assert "NaN+Inf ref/tgt" in header
    assert any(
        line.startswith(first) and line.rstrip().endswith("0/3")
        for line in proc.stdout.splitlines()
    )
    assert run_cli("report", tmp_path / "d.h5", "-q", "-o", tmp_path / "rep").returncode == 0
    verdict = next(
        line
        for line in (tmp_path / "rep" / "report.md").read_text().splitlines()
        if "**Verdict**" in line
    )
    assert "NaN/Inf in 2 module output(s)" in verdict and first in verdict
    one_error(run_cli("inspect", "--verify", bad), first, "its values were changed")


# ------------------------------------------------------------------------------------------------
# 7. arguments with surprising meanings
# ------------------------------------------------------------------------------------------------
BAD_ARGUMENTS = {
    "--limit 0": (("--limit", "0"), "--limit"),
    "--limit -1": (("--limit", "-1"), "--limit"),
    "--max-tokens -5": (("--max-tokens", "-5"), "--max-tokens"),
    "--max-tokens 0": (("--max-tokens", "0"), "--max-tokens"),
    "--batch-size 0": (("--batch-size", "0"), "--batch-size"),
    "--seed -1": (("--seed", "-1"), "--seed"),
    "--attn-impl bogus": (("--attn-impl", "bogus"), "bogus"),
    "aqn sigma nan": (("--emulate", "aqn:sigma=nan"), "aqn:sigma=nan"),
    "aqn sigma inf": (("--emulate", "aqn:sigma=inf"), "aqn:sigma=inf"),
}


@pytest.mark.parametrize("args, fragment", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_capture_argument_out_of_range_is_one_line(tmp_path, args, fragment):
    out = tmp_path / "x.h5"
    one_error(run_cli("capture", "--device", "cpu", "-q", *args, "-o", out), fragment)
    assert not out.exists()


def test_float_token_ids_are_refused_not_truncated(tmp_path):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([[1.7, 2.2, 3.9]]))
    one_error(
        run_cli("capture", *SMALL, "--inputs", ids, "-o", tmp_path / "x.h5"), "float64", "integers"
    )


def test_explicit_token_ids_are_used_whole_unless_max_tokens_is_given(tmp_path, tiny_bf16):
    import hwdiff

    ids = np.arange(1, 201, dtype=np.int64)[
        None
    ]  # 200 tokens: more than the 128 that prompts are cut to
    whole = hwdiff.capture(
        tiny_bf16, tmp_path / "whole.h5", inputs=ids, modules=["^model.norm$"], progress=False
    )
    cut = hwdiff.capture(
        tiny_bf16,
        tmp_path / "cut.h5",
        inputs=ids,
        modules=["^model.norm$"],
        max_tokens=50,
        progress=False,
    )
    assert (whole.tokens, cut.tokens) == (200, 50)
    with hwdiff.open_capture(whole.path) as cap:
        assert np.array_equal(cap.input_ids, ids)


# ------------------------------------------------------------------------------------------------
# 8. diff --local must be a replay of the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "local, fragment", [("tgt", "is not a replay"), ("other_local", "replay of another capture")]
)
def test_local_that_is_not_a_replay_of_the_reference_is_refused(pair, local, fragment):
    one_error(
        run_cli("diff", pair["ref"], pair["tgt"], "-q", "--local", pair[local]),
        fragment,
        "--allow-any-local",
    )


def test_allow_any_local_overrides(pair):
    proc = run_cli(
        "diff", pair["ref"], pair["tgt"], "-q", "--local", pair["other_local"], "--allow-any-local"
    )
    assert proc.returncode == 0, proc.stderr
    assert "local" in proc.stdout


# ------------------------------------------------------------------------------------------------
# 9. a closed pipe
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["diff", "inspect"])
def test_closed_pipe_exits_quietly(pair, command):
    args = (
        ["diff", pair["ref"], pair["tgt"], "-q"] if command == "diff" else ["inspect", pair["ref"]]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hwdiff", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    proc.stdout.close()  # the reader is gone before anything is printed, as with `| head` on a long table
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 141, stderr
    assert stderr == ""


# ------------------------------------------------------------------------------------------------
# 10. a mistyped --model fails at once, each line once
# ------------------------------------------------------------------------------------------------
def test_model_spec_that_looks_like_a_missing_local_path_fails_at_once(tmp_path):
    (tmp_path / "models").mkdir()
    for spec, fragment in (("./models/qwen", "does not exist"), ("models/qwen", "models/ exists")):
        one_error(run_cli("capture", *SMALL, "--model", spec, "-o", "x.h5", cwd=tmp_path), fragment)


def test_uncached_hub_id_with_unreachable_hub_fails_fast_with_one_line(tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    }
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hwdiff",
            "capture",
            *SMALL,
            "--model",
            "Qwen/No-Such-Model-Typo",
            "-o",
            str(tmp_path / "x.h5"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert time.perf_counter() - started < 20
    one_error(proc, "Qwen/No-Such-Model-Typo", "cannot be reached")
    assert len(proc.stderr.splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# 11. no argument, usage errors
# ------------------------------------------------------------------------------------------------
def test_no_argument_prints_the_help():
    proc = run_cli()
    assert proc.returncode == 0 and proc.stderr == ""
    assert (
        proc.stdout.startswith("usage: hwdiff")
        and "capture" in proc.stdout
        and "diff" in proc.stdout
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("capture", "--kinds", "foo", "-o", "x.h5"), "unknown kind foo"),
        (("capture", "--mode", "everything", "-o", "x.h5"), "--mode"),
        (("capture",), "-o/--output"),
        (("frobnicate",), "frobnicate"),
        (("diff", __file__), "target"),  # an existing file: a missing one is refused first
        (
            ("calibrate", "--stages", "1", "d.h5"),
            "--stages",
        ),  # before the diff file, which does not exist
        (("calibrate", "--stages", "2", "d.h5"), "--stages: must be at least 3"),
    ],
    ids=[
        "kinds foo",
        "mode",
        "missing -o",
        "unknown command",
        "missing target",
        "stages 1",
        "stages 2",
    ],
)
def test_usage_errors_are_one_line(args, fragment):
    proc = run_cli(*args)
    one_error(proc, fragment)
    assert "usage:" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# 12. the demo's "next:" hint names a command that runs
# ------------------------------------------------------------------------------------------------
def test_demo_hint_names_a_command_that_runs():
    import shlex

    from hwdiff.demo import hwdiff_command

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*shlex.split(hwdiff_command()), "--version"],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.getcwd(),
    )  # the hint may be relative to the folder it was printed in
    assert proc.returncode == 0 and proc.stdout.startswith("hwdiff "), proc.stderr


def test_an_interrupt_swallowed_inside_a_callback_still_stops_the_write(tmp_path):
    """Python drops an exception raised while it runs a weakref callback (and prints "Exception
    ignored in"): a Ctrl-C that lands there must still stop the run before any output is committed,
    with no such noise."""
    target = tmp_path / "out.txt"
    script = f"""
import os, signal, sys, weakref
from hwdiff.common import outputs
outputs.install_signal_handlers()
class Thing:
    pass
def callback(_):
    os.kill(os.getpid(), signal.SIGINT)
    sum(range(1000))  # the handler runs here, inside the callback, and its exception is dropped
thing = Thing()
ref = weakref.ref(thing, callback)
del thing
print("still running", flush=True)
outputs.write_text({str(target)!r}, "x")
"""
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "still running" in run.stdout and "Exception ignored" not in run.stderr, (
        run.stdout,
        run.stderr,
    )
    assert run.returncode != 0 and "Interrupted: SIGINT" in run.stderr
    assert not target.exists() and not list(tmp_path.iterdir())
