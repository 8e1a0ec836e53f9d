"""`moequant profile`: an existing output folder is refused without --overwrite, before the profile pass; the
command on each family; its errors in one line."""

import json

import pytest

from moequant.arch.tiny import save_tiny
from moequant.cli.main import main


def test_an_existing_output_is_refused_without_overwrite(tmp_path, capsys, monkeypatch):
    from moequant import api

    def slow(*args, **kwargs):
        raise AssertionError("a slow pass ran before the existing output was refused")

    monkeypatch.setattr(api, "load_tokenizer", slow)
    (tmp_path / "prof").mkdir()
    (tmp_path / "prof" / "profile.json").write_text("{}")
    args = ["profile", "--samples", "4", "--seq-len", "32", "--quiet", "--out", str(tmp_path / "prof")]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path / 'prof'} already exists; pass --overwrite" in lines[0], lines
    assert (tmp_path / "prof" / "profile.json").read_text() == "{}"
    with pytest.raises(AssertionError, match="a slow pass ran"):
        main([*args, "--overwrite"])


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_profile_command_on_each_family(tmp_path, model_type):
    save_tiny(model_type, tmp_path / "model")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. 0123456789 " * 40)
    rc = main(
        [
            "profile",
            str(tmp_path / "model"),
            "--calib",
            str(text),
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / "prof"),
            "--quiet",
        ]
    )
    assert rc == 0
    meta = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert meta["tokens"] == 4 * 32
    assert (tmp_path / "prof" / "moments.safetensors").exists()


def test_profile_command_errors_are_one_line(tmp_path, capsys):
    save_tiny("olmoe", tmp_path / "model")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    rc = main(
        [
            "profile",
            str(tmp_path / "model"),
            "--calib",
            str(short),
            "--seq-len",
            "64",
            "--out",
            str(tmp_path / "p"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "shorter than the sequence length" in err and "Traceback" not in err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert (
        main(["profile", str(tmp_path / "model"), "--calib", str(empty), "--out", str(tmp_path / "p")]) == 2
    )
    assert "empty" in capsys.readouterr().err
