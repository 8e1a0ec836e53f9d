"""Options and helpers every command shares: the calibration size from the model, the default output folder,
the command line as recorded in reports."""

import json

import pytest

from moequant.cli.common import calib_config, command_line, default_out
from moequant.cli.main import build_parser


def _folder(tmp_path, config: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("command", ["quantize", "plan", "profile", "sweep"])
def test_the_commands_resolve_the_size_from_the_model(tmp_path, command):
    m = _folder(tmp_path / "m", {"max_position_embeddings": 32768})
    parser = build_parser()
    args = parser.parse_args([command, m])
    assert (args.samples, args.seq_len) == (None, None)
    assert (calib_config(args, m).samples, calib_config(args, m).seq_len) == (128, 2048)
    assert calib_config(args, None).seq_len == 256  # the bundled model
    given = parser.parse_args([command, m, "--samples", "4", "--seq-len", "32"])
    assert (calib_config(given, m).samples, calib_config(given, m).seq_len) == (4, 32)
    help_text = parser._subparsers._group_actions[0].choices[command].format_help()
    assert "128 x 2048" in " ".join(help_text.split())


def test_default_out_names_the_model_and_the_label():
    assert default_out(None, "3.0b") == "tiny-moe-moequant-3.0b"  # the bundled model
    assert default_out("Qwen/Qwen3-30B-A3B", "4b") == "Qwen3-30B-A3B-moequant-4b"  # a Hub id: its name
    assert default_out("/models/mixtral/", "rtn-4b") == "mixtral-moequant-rtn-4b"


def test_command_line_records_only_what_differs_from_the_defaults():
    args = build_parser().parse_args(
        ["quantize", "my model", "--bits", "3", "--samples", "64", "--uniform", "--quiet", "--seed", "0"]
    )
    # --quiet is not recorded, --seed 0 is the default; a value with a space is quoted
    assert command_line(args, "model") == "moequant quantize 'my model' --bits 3.0 --samples 64 --uniform"
    bundled = build_parser().parse_args(["quantize"])
    assert command_line(bundled, "model") == "moequant quantize"
