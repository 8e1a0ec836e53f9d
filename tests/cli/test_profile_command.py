"""`moequant profile`: an existing output folder is refused without --overwrite, before the profile pass."""

import pytest

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
