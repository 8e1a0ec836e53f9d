"""`moequant plan`: an existing --out (or --profile-out) is refused without --overwrite, before any slow pass."""

import pytest

from moequant.cli.main import main

FAST = ["--samples", "4", "--seq-len", "32", "--quiet", "--no-layer-probe"]


@pytest.fixture
def no_slow_pass(monkeypatch):
    from moequant import api

    def slow(*args, **kwargs):
        raise AssertionError("a slow pass ran before the existing output was refused")

    for name in ("load_tokenizer", "load_profile", "make_plan_for", "plan"):
        monkeypatch.setattr(api, name, slow)


@pytest.mark.parametrize("existing", ["plan.json", "prof"])
def test_an_existing_output_is_refused_without_overwrite(tmp_path, capsys, no_slow_pass, existing):
    edited = '{"hand": "edited"}'
    if existing == "plan.json":
        (tmp_path / "plan.json").write_text(edited)
    else:
        (tmp_path / "prof").mkdir()
    args = ["plan", "--out", str(tmp_path / "plan.json"), "--profile-out", str(tmp_path / "prof"), *FAST]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path / existing} already exists; pass --overwrite" in lines[0], lines
    if existing == "plan.json":
        assert (tmp_path / "plan.json").read_text() == edited  # the hand-edited plan is kept
    with pytest.raises(AssertionError, match="a slow pass ran"):  # --overwrite goes on to plan
        main([*args, "--overwrite"])
