"""`moequant push` against a fake Hub on 127.0.0.1: every file arrives byte for byte, the token never leaks.

The fake server (tests/hub_server.py, shared with the download tests) speaks what huggingface_hub's
create_repo / create_branch / upload_folder call; it listens on loopback only and is shut down at the end of
each test.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
from hub_server import REPO, FakeHub

import moequant  # noqa: F401
from moequant import api
from moequant.arch.tiny import byte_tokenizer, tiny_model
from moequant.calibration.data import CalibData
from moequant.cli.main import main
from moequant.config import Method, QuantizeConfig, QuantSpec

TOKEN = "hf_SECRETSECRET"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("push") / "tiny-q"
    model = tiny_model("mixtral", seed=1)
    data = CalibData(
        torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0)), ["x"] * 4, "ids"
    )
    plan = api.make_uniform_plan(model, QuantSpec(Method.RTN, 4, 32))
    api.quantize(model, plan, data, out, QuantizeConfig(progress=False), tokenizer=byte_tokenizer())
    return out


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login token
    monkeypatch.setattr(hc, "HF_HUB_DISABLE_XET", True)  # basic LFS transfer (the fake hub speaks no xet)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        yield hub


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_every_file_and_never_leaks_the_token(folder, hub_env, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    assert main(["push", str(folder), REPO, "--private", "--debug"]) == 0
    out = capsys.readouterr()
    assert "pushed" in out.out
    local = _local_files(folder)  # after the push: the card now names the repo
    assert f'from_pretrained("{REPO}"' in local["README.md"].decode()
    assert hub_env.created == [
        {"name": "tiny-moequant", "organization": "someone", "visibility": "private", "type": "model"}
    ]
    assert len(hub_env.commits) == 1
    commit = hub_env.commits[0]
    assert commit["revision"] == "main"
    assert set(commit["files"]) == set(local)
    for name, data in local.items():
        assert commit["files"][name] == data, name
    assert any(p.endswith(".safetensors") for p in commit["files"])  # the LFS path was exercised
    assert len(hub_env.lfs) == sum(p.endswith(".safetensors") for p in local)
    for method, path, headers in hub_env.requests:
        if method == "POST":
            assert headers.get("authorization") == f"Bearer {TOKEN}", path
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert any(r.name.startswith("huggingface_hub") for r in caplog.records)  # the client's debug log
    for text in (out.out, out.err, logged):
        assert TOKEN not in text


def test_push_to_a_revision_creates_the_branch(folder, hub_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(folder), REPO, "--revision", "v1"]) == 0
    assert hub_env.branches == ["v1"]
    assert [c["revision"] for c in hub_env.commits] == ["v1"]
    assert hub_env.created[0].get("visibility") != "private"
    assert TOKEN not in capsys.readouterr().out


def test_no_token_is_a_clear_error(folder, hub_env, capsys):
    assert main(["push", str(folder), REPO]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "HF_TOKEN" in err and "Traceback" not in err
    assert "`hf auth login`" in err and "huggingface-cli" not in err  # the CLI huggingface_hub installs now
    assert not hub_env.requests  # nothing was sent


def test_server_and_input_errors_are_one_line_without_the_token(folder, hub_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(folder), "someone/forbidden"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moequant push: error:") and "403" in err and len(err.strip().splitlines()) == 1
    assert TOKEN not in err and not hub_env.commits
    assert main(["push", str(folder), "someone/bad/repo/id"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moequant push: error:") and TOKEN not in err and "Traceback" not in err


def test_incomplete_folders_are_refused(folder, hub_env, monkeypatch, tmp_path, capsys):
    import shutil

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    partial = tmp_path / "x.partial"
    shutil.copytree(folder, partial)
    assert main(["push", str(partial), REPO]) == 2
    assert ".partial" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["quantization_config"]["status"] = "incomplete"
    (broken / "config.json").write_text(json.dumps(cfg))
    assert main(["push", str(broken), REPO]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "missing"), REPO]) == 2
    assert not hub_env.requests


def test_hand_edited_cards_are_kept(folder, hub_env, monkeypatch, tmp_path):
    import shutil

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    mine = tmp_path / "mine"
    shutil.copytree(folder, mine)
    text = (mine / "README.md").read_text().replace("# ", "# My edited title\n\n# ", 1)
    (mine / "README.md").write_text(text)
    assert main(["push", str(mine), REPO]) == 0
    assert hub_env.commits[0]["files"]["README.md"].decode() == text
