import subprocess
import sys

import pytest

from .conftest import ROOT, L, run_cli


def _one_clear_line(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hwdiff: error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_capture_then_inspect(tmp_path):
    out = tmp_path / "cap.h5"
    proc = run_cli(
        "capture",
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
        "--limit",
        "3",
        "--max-tokens",
        "16",
        "--record-inputs",
        "-q",
        "-o",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    shown = run_cli("inspect", out)
    assert shown.returncode == 0, shown.stderr
    assert "device               cpu" in shown.stdout and "bfloat16" in shown.stdout
    rows = [line for line in shown.stdout.splitlines() if line.split()[2:3] == ["rmsnorm"]]
    assert len(rows) == 2 * L + 1
    assert "model.norm" in rows[-1] and "weight stored" in rows[-1]
    # Qwen2: two pre-norms per layer (attention, MLP) and the final norm before lm_head
    assert (
        f"{2 * L + 1} norms (final 1, pre {2 * L}); sub-blocks attention {L}, head 1, mlp {L}"
        in shown.stdout
    )


def test_capture_selects_by_regex_and_kind(tmp_path):
    out = tmp_path / "cap.h5"
    proc = run_cli(
        "capture",
        "--device",
        "cpu",
        "--limit",
        "2",
        "--max-tokens",
        "8",
        "-q",
        "--modules",
        r"layers\.0\.",
        "--kinds",
        "linear,rmsnorm",
        "--mode",
        "sample",
        "--tokens",
        "4",
        "-o",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    assert "9 modules" in proc.stdout  # 7 Linear + 2 norms of layer 0


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--model", "no/such/model"], ["no/such/model"]),
        (["--model", "./nowhere"], ["unknown model spec"]),
        (["--device", "tpu"], ["unknown device 'tpu'"]),
        (["--device", "npu"], ["torch_npu"]),
        (
            ["--inputs", "/nonexistent/ids.npy"],
            ["--inputs", "/nonexistent/ids.npy: no such inputs file"],
        ),
        (["--modules", "no_such_module"], ["matches no module"]),
        (["--dtype", "float8"], ["unknown dtype"]),
    ],
)
def test_capture_bad_input_gets_one_clear_line(tmp_path, args, fragments):
    out = tmp_path / "x.h5"
    proc = run_cli(
        "capture", "--device", "cpu", "--limit", "1", "--max-tokens", "8", "-q", *args, "-o", out
    )
    _one_clear_line(proc, *fragments)
    assert not out.exists()


def test_inspect_refuses_non_hdf5_and_truncated_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not a capture")
    _one_clear_line(run_cli("inspect", tmp_path / "notes.txt"), "not an HDF5 file")
    good = tmp_path / "good.h5"
    assert (
        run_cli(
            "capture", "--device", "cpu", "--limit", "2", "--max-tokens", "8", "-q", "-o", good
        ).returncode
        == 0
    )
    data = good.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    _one_clear_line(run_cli("inspect", tmp_path / "cut.h5"), "truncated")
    _one_clear_line(run_cli("inspect", tmp_path / "missing.h5"), "no such file")


def test_help_is_fast_and_lists_the_commands():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hwdiff", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0 and "capture" in proc.stdout and "inspect" in proc.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
    assert (
        "torch" not in imported and "h5py" not in imported
    )  # the parser reads store's names only when parsing


# ---- shared options: one validator per option, the same refusal from every subcommand (hwdiff.cli.args) ----
def _subcommands():
    import argparse

    from hwdiff.cli.parser import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _typed_options():
    """{option (or positional's name): {subcommand: its argparse action}} for every option with a validator."""
    found: dict = {}
    for command, parser in _subcommands().items():
        for action in parser._actions:
            if action.type is not None:
                found.setdefault(
                    action.option_strings[-1] if action.option_strings else action.dest, {}
                )[command] = action
    return found


def _bad_values():
    from hwdiff.cli import args as a

    missing = "/nonexistent/hwdiff-test.file"
    return {
        a.COUNT: "0",
        a.NON_NEGATIVE: "-1",
        a.STAGES: "2",
        a.DRAWS: "1",
        a.CAPTURE: missing,
        a.DIFF_FILE: missing,
        a.SIGMA_FILE: missing,
        a.INPUTS_FILE: missing,
        a.CARD_FILE: missing,
        a.MODE: "everything",
        a.COMPRESSION: "brotli",
        a._kinds: "foo",
        float: "many",
    }


# An option name that means something else in another subcommand, so takes another rule there.
OWN_RULE = {
    "--max-new-tokens": "robustness: 0 is the token level only; generate: 0 tokens is nothing to generate"
}


def _refusal(command, action, value, capsys):
    """The one error line of ``hwdiff COMMAND`` given ``value`` for ``action``, without the subcommand's name."""
    from hwdiff.cli.parser import build_parser

    parser = _subcommands()[command]
    before = [a.dest for a in parser._actions if not a.option_strings and a.dest != "help"]
    if action.option_strings:
        argv = [
            command,
            action.option_strings[-1],
            *[value] * (action.nargs if isinstance(action.nargs, int) else 1),
        ]
    else:  # a positional: the ones before it name an existing file
        argv = [command, *[__file__] * before.index(action.dest), value]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    err, head, tail = (
        capsys.readouterr().err,
        f"hwdiff: error: {command}: ",
        f" (see `hwdiff {command} --help`)\n",
    )
    assert (
        exit_.value.code == 2
        and err.count("\n") == 1
        and err.startswith(head + "argument ")
        and err.endswith(tail)
    )
    return err.removeprefix(head).removesuffix(tail)


@pytest.mark.parametrize("option", sorted(_typed_options()))
def test_every_subcommand_refuses_a_bad_value_of_an_option_the_same_way(option, capsys):
    takers = _typed_options()[option]
    bad = _bad_values()
    assert all(action.type in bad for action in takers.values()), (
        f"{option}: a validator with no bad value here"
    )
    if option not in OWN_RULE:
        assert len({action.type for action in takers.values()}) == 1, (
            f"{option}: validated differently by {takers}"
        )
    refusals = {
        command: _refusal(command, action, bad[action.type], capsys)
        for command, action in takers.items()
    }
    if option not in OWN_RULE:
        assert len(set(refusals.values())) == 1, refusals
    assert all(option.lstrip("-") in refusal for refusal in refusals.values())


def test_an_untyped_option_is_untyped_everywhere_and_alike_options_share_a_validator():
    """--dtype, --device, --model ... are checked by the library (one message everywhere); an option that
    some subcommands validate is validated by all; options of one meaning under two names, alike."""
    from hwdiff.cli import args as a

    typed = _typed_options()
    for command, parser in _subcommands().items():
        for action in parser._actions:
            name = action.option_strings[-1] if action.option_strings else action.dest
            assert action.type is not None or name not in typed, (command, name)
    for one, other, validator in (
        ("--inputs", "--prompts", a.INPUTS_FILE),
        ("--draws", "--policy-draws", a.DRAWS),
        ("--topk", "--logprob-topk", a.COUNT),
        ("--seed", "--draw-seed", a.NON_NEGATIVE),
    ):
        assert {action.type for action in (*typed[one].values(), *typed[other].values())} == {
            validator
        }


@pytest.mark.parametrize(
    "option, capture_option, value",
    [
        ("--limit", "--limit", "0"),
        ("--seed", "--seed", "-1"),
        ("--max-tokens", "--max-tokens", "0"),
        ("--topk", "--logprob-topk", "0"),
    ],
)
def test_generate_refuses_what_capture_refuses(option, capture_option, value, capsys):
    typed = _typed_options()
    refused = _refusal("generate", typed[option]["generate"], value, capsys)
    assert refused == _refusal("capture", typed[capture_option]["capture"], value, capsys).replace(
        capture_option, option
    )
    assert refused == f"argument {option}: must be at least {int(value) + 1}, got {value}"


def test_stages_follow_the_schedule_rule(capsys):
    """calibrate --stages takes what hwdiff.calibration.schedule takes, refused at parse time with its reason."""
    from hwdiff.calibration.schedule import MIN_STAGES, SigmaSchedule
    from hwdiff.cli.parser import build_parser
    from hwdiff.errors import HwdiffError

    with pytest.raises(
        HwdiffError,
        match=f"at least {MIN_STAGES} \\(stage 0 is noise-free\\), got {MIN_STAGES - 1}",
    ):
        SigmaSchedule(0.01, 0.001, MIN_STAGES - 1)
    SigmaSchedule(0.01, 0.001, MIN_STAGES)
    assert (
        build_parser().parse_args(["calibrate", "--stages", str(MIN_STAGES), __file__]).stages
        == MIN_STAGES
    )
    refusal = _refusal(
        "calibrate", _typed_options()["--stages"]["calibrate"], str(MIN_STAGES - 1), capsys
    )
    assert refusal.startswith(
        f"argument --stages: must be at least {MIN_STAGES} (stage 0 is noise-free), got 2"
    )


def test_capture_takes_the_store_modes_and_compressions_and_its_help_names_them(capsys):
    from hwdiff.cli.parser import build_parser
    from hwdiff.store import COMPRESSIONS, MODES

    for option, names in (("--mode", MODES), ("--compression", COMPRESSIONS)):
        for name in names:
            parsed = build_parser().parse_args(["capture", option, name, "-o", "x.h5"])
            assert getattr(parsed, option.lstrip("-")) == name
    shown = " ".join(_subcommands()["capture"].format_help().split())
    assert all(f"{name}:" in shown for name in MODES) and all(
        name in shown for name in COMPRESSIONS
    )


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_command_has_a_handler_and_a_help(command, capsys):
    from hwdiff.cli import HANDLERS
    from hwdiff.cli.parser import build_parser

    assert set(HANDLERS) == set(_subcommands())
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: hwdiff {command} ")
