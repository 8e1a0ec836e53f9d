"""`moequant plan`: an existing --out (or --profile-out) is refused without --overwrite, before any slow pass; a
plan from a saved profile (--profile) profiles nothing and equals the plan that profiles."""

import json

import pytest

from moequant import api
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


def test_plan_command_plans_from_a_saved_profile_without_profiling(
    tmp_path, monkeypatch, bundled_profile, profile_calib, one_thread
):
    """`moequant plan --profile` of a saved `moequant profile` folder (conftest.bundled_profile, made with the
    same calibration flags on one thread, as here) plans, layer probe included, exactly as a plan that
    profiles, and profiles nothing."""
    calib = profile_calib
    assert main(["plan", *calib, "--bits", "3.2", "--out", str(tmp_path / "a.json")]) == 0

    def no_profiling(*args, **kwargs):
        raise AssertionError("moequant plan --profile profiled again")

    monkeypatch.setattr(api, "profile_pass", no_profiling)
    argv = [
        "plan",
        *calib,
        "--bits",
        "3.2",
        "--profile",
        str(bundled_profile),
        "--out",
        str(tmp_path / "b.json"),
    ]
    assert main(argv) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["layers"] == b["layers"] and a["estimate"] == b["estimate"]
