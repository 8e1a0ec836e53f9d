"""Hub ids as MODEL arguments, against the fake Hub on 127.0.0.1 (tests/hub_server.py).

The served repository is the bundled tiny MoE plus a decoy `pytorch_model.bin`, a `modeling_tiny.py` and a
README: a download must fetch config, tokenizer and safetensors only (the code only with trust_remote_code),
send the token without ever printing it, and turn every failure into one line.
"""

import json
import logging
import socket
from pathlib import Path

import pytest
from hub_server import FakeHub

from moequant.checkpoint.bundled import bundled_model_path
from moequant.checkpoint.hub_source import hub_id_of, local_model, resolve_model
from moequant.cli.main import main
from moequant.errors import CheckpointError, HubError

TOKEN = "hf_DOWNLOADSECRET"
REPO = "someorg/tiny-moe-hub"
WANTED = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _repo_files(tag: bytes = b"") -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in bundled_model_path().iterdir() if p.is_file()}
    files["README.md"] = b"# tiny" + tag
    files["pytorch_model.bin"] = b"PICKLE" + tag  # the decoy: never downloaded
    files["modeling_tiny.py"] = b"# custom code" + tag
    return files


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache, no stored login token
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_HUB_DISABLE_XET", True)
    with FakeHub() as server:
        server.add_model(REPO, _repo_files())
        server.add_model(REPO, _repo_files(b" v1"), revision="v1")
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def _one_line_error(err: str, command: str) -> None:
    assert err.startswith(f"moequant {command}: error:"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_download_fetches_only_what_moequant_reads(hub):
    folder = resolve_model(REPO)
    assert {p.name for p in folder.iterdir()} == WANTED
    assert (folder / "model.safetensors").read_bytes() == (
        bundled_model_path() / "model.safetensors"
    ).read_bytes()
    assert hub_id_of(folder) == REPO
    downloads = [p for p in hub.paths() if "/resolve/" in p]
    assert downloads and not any(p.endswith((".bin", ".py", "README.md")) for p in downloads)
    assert f"/api/models/{REPO}/revision/main" in hub.paths("GET")

    with_code = resolve_model(REPO, trust_remote_code=True)
    assert {p.name for p in with_code.iterdir()} == WANTED | {"modeling_tiny.py"}


def test_revision_reaches_the_server(hub):
    main_folder, v1 = resolve_model(REPO), resolve_model(REPO, revision="v1")
    assert f"/api/models/{REPO}/revision/v1" in hub.paths("GET")
    assert main_folder != v1 and v1.name == hub.models[REPO]["v1"][0]  # the snapshot of v1's commit


def test_local_folders_and_bundled_aliases_never_touch_the_network(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = Path(REPO)  # a folder spelled like the Hub id wins
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    assert resolve_model(REPO) == local and local_model(REPO) == REPO
    for alias in (None, "bundled", "tiny-moe", "moequant/tiny-moe"):
        assert resolve_model(alias) == bundled_model_path()
    assert local_model(None) is None and local_model("tiny-moe") == "tiny-moe"
    assert not hub.requests
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model("./no/such/folder")


def test_the_token_is_sent_and_never_shown(hub, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    folder = resolve_model(REPO, revision="v1")
    assert (folder / "config.json").is_file()
    assert hub.requests
    for method, path, headers in hub.requests:
        assert headers.get("authorization") == f"Bearer {TOKEN}", (method, path)
    out = capsys.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert REPO in logged  # moequant logs what it fetched
    for text in (out.out, out.err, logged):
        assert TOKEN not in text


def test_unknown_ids_revisions_and_gated_repos_are_one_line(hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["plan", "someorg/no-such-model", "--quiet"]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "plan")
    assert "someorg/no-such-model" in err and "HF_TOKEN" in err and TOKEN not in err

    assert main(["profile", REPO, "--revision", "no-such-branch", "--quiet"]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "profile")
    assert "no-such-branch" in err and "--revision" in err

    hub.gated.add(REPO)
    assert main(["quantize", REPO, "--uniform", "--method", "rtn", "--quiet"]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "quantize")
    assert "gated" in err and REPO in err and TOKEN not in err


def test_offline_with_an_empty_cache_is_one_line(hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["quantize", REPO, "--uniform", "--method", "rtn", "--quiet"]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "quantize")
    assert REPO in err and "HF_HUB_OFFLINE" in err
    assert not hub.requests


def test_offline_reads_the_cache(hub, monkeypatch):
    folder = resolve_model(REPO)
    n = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(REPO) == folder
    assert len(hub.requests) == n


def test_an_unreachable_hub_is_one_line(hub, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(HubError, match="cannot be reached"):
        resolve_model(REPO)
    assert main(["sweep", REPO, "--quiet"]) == 2
    _one_line_error(capsys.readouterr().err, "sweep")


def test_eval_baseline_hub_ids_resolve(hub):
    from moequant.evals.evaluate import resolve_baseline

    assert Path(resolve_baseline(Path("q"), REPO, {})) == resolve_model(REPO)
    assert Path(resolve_baseline(Path("q"), None, {"model": REPO})) == resolve_model(REPO)


def test_quantize_a_hub_id_end_to_end(hub, monkeypatch, tmp_path, capsys, caplog, small_calib):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "q"
    argv = ["quantize", REPO, "--revision", "v1", "--uniform", "--bits", "4", "--method", "rtn"]
    argv += ["--calib", str(small_calib), "--samples", "4", "--seq-len", "32", "--out", str(out), "--debug"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["status"] == "complete"
    assert f"/api/models/{REPO}/revision/v1" in hub.paths("GET")
    report = json.loads((out / "quant_report.json").read_text())
    assert report["model"] == REPO  # the snapshot folder it read, named by its repo id
    assert f"base_model: {REPO}" in (out / "README.md").read_text()  # the card links the Hub original
    captured = capsys.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for text in (captured.out, captured.err, logged):
        assert TOKEN not in text
