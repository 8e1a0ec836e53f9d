"""The command-line entry point: argparse's own refusals in one line, the hint that resumes an interrupted run."""

import shlex

import pytest

from moequant.cli.main import interrupted_hint, main


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["quantize", "--bits", "abc"],
            "moequant quantize: error: argument --bits: invalid float value: 'abc'",
        ),
        (
            ["plan", "--samples", "many"],
            "moequant plan: error: argument --samples: invalid int value: 'many'",
        ),
        (["quantize", "--calib-mode", "some"], "argument --calib-mode: invalid choice: 'some'"),
        (["eval"], "moequant eval: error: the following arguments are required: folder"),
        (["quantize", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_argparse_refusals_are_one_line(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "--help" in lines[0], err


def test_the_interrupted_hint_names_the_partial_folder_and_the_resume_command(tmp_path):
    argv = ["quantize", "--bits", "3", "--out", str(tmp_path / "my q")]
    err = KeyboardInterrupt()
    assert interrupted_hint(err, argv) == ""  # nothing written yet
    err.moequant_partial = tmp_path / "my q.partial"
    assert interrupted_hint(err, argv) == ""  # the folder is not there: nothing to resume
    (tmp_path / "my q.partial").mkdir()
    again = shlex.join(["moequant", *argv, "--resume"])
    assert interrupted_hint(err, argv) == (
        f"; the finished layers are kept in {tmp_path / 'my q.partial'}; continue with: {again}"
    )
    assert interrupted_hint(err, [*argv, "--resume"]).endswith(f"continue with: {again}")  # --resume once
