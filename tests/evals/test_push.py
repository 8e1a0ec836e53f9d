"""`moequant push` against a fake Hub on 127.0.0.1: every file arrives byte for byte, the token never leaks.

The fake server implements only what huggingface_hub's create_repo / create_branch / upload_folder call:
POST /api/repos/create, POST /api/models/<repo>/branch/<b>, POST /api/validate-yaml,
POST /api/models/<repo>/preupload/<rev> (safetensors -> "lfs", the rest -> "regular"),
POST /<repo>.git/info/lfs/objects/batch + PUT of the object (basic LFS transfer), and
POST /api/models/<repo>/commit/<rev> (NDJSON: base64 regular files, LFS pointers by sha256).
It listens on loopback only and is shut down at the end of each test.
"""

import base64
import hashlib
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import moequant  # noqa: F401
from moequant import api
from moequant.arch.tiny import byte_tokenizer, tiny_model
from moequant.calibration.data import CalibData
from moequant.cli.main import main
from moequant.config import Method, QuantizeConfig, QuantSpec

TOKEN = "hf_SECRETSECRET"
REPO = "someone/tiny-moequant"


class FakeHub:
    def __init__(self):
        self.requests = []  # (method, path, headers)
        self.created, self.branches, self.lfs = [], [], {}
        self.commits = []  # {"revision", "header", "files": {path: bytes}}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep the test output clean
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reply(self, obj, status=200):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self._body()
                hub.requests.append(("POST", self.path, dict(self.headers)))
                path = self.path.split("?")[0]
                base = f"http://127.0.0.1:{hub.port}"
                if path == "/api/repos/create":
                    req = json.loads(body)
                    hub.created.append(req)
                    repo = f"{req['organization']}/{req['name']}"
                    if req["name"] == "forbidden":
                        return self._reply(
                            {"error": "You don't have the rights to create a model under this namespace"}, 403
                        )
                    return self._reply({"url": f"{base}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._reply({"errors": [], "warnings": []})
                if "/branch/" in path:
                    hub.branches.append(path.rsplit("/branch/", 1)[1])
                    return self._reply({})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._reply(
                        {
                            "files": [
                                {
                                    "path": f["path"],
                                    "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                                    "shouldIgnore": False,
                                }
                                for f in files
                            ]
                        }
                    )
                if path.endswith(".git/info/lfs/objects/batch"):
                    objs = json.loads(body)["objects"]
                    return self._reply(
                        {
                            "transfer": "basic",
                            "objects": [
                                {
                                    "oid": o["oid"],
                                    "size": o["size"],
                                    "actions": {
                                        "upload": {"href": f"{base}/lfs-upload/{o['oid']}", "header": {}}
                                    },
                                }
                                for o in objs
                            ],
                        }
                    )
                if "/commit/" in path:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files = {}
                    for item in lines[1:]:
                        v = item["value"]
                        if item["key"] == "file":
                            files[v["path"]] = base64.b64decode(v["content"])
                        elif item["key"] == "lfsFile":
                            files[v["path"]] = hub.lfs.get(v["oid"], b"<missing lfs object>")
                    rev = path.rsplit("/commit/", 1)[1]
                    hub.commits.append({"revision": rev, "header": lines[0], "files": files})
                    return self._reply(
                        {
                            "commitUrl": f"{base}/{REPO}/commit/{'a' * 40}",
                            "commitOid": "a" * 40,
                            "pullRequestUrl": None,
                        }
                    )
                return self._reply({"error": f"fake hub: no route {path}"}, 404)

            def do_PUT(self):
                body = self._body()
                hub.requests.append(("PUT", self.path, dict(self.headers)))
                if self.path.startswith("/lfs-upload/"):
                    oid = self.path.rsplit("/", 1)[1]
                    assert hashlib.sha256(body).hexdigest() == oid
                    hub.lfs[oid] = body
                    return self._reply({})
                return self._reply({"error": "no route"}, 404)

            def do_GET(self):
                hub.requests.append(("GET", self.path, dict(self.headers)))
                return self._reply({"error": "fake hub: no GET route"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # loopback only, free port
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


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
