"""A fake Hugging Face Hub on 127.0.0.1 for the tests: what `push` uploads and what `snapshot_download` reads.

Uploads (huggingface_hub's create_repo / create_branch / upload_folder): POST /api/repos/create,
POST /api/models/<repo>/branch/<b>, POST /api/validate-yaml, POST /api/models/<repo>/preupload/<rev>
(safetensors -> "lfs", the rest -> "regular"), POST /<repo>.git/info/lfs/objects/batch + PUT of the object
(basic LFS transfer), and POST /api/models/<repo>/commit/<rev> (NDJSON: base64 regular files, LFS pointers by
sha256).

Downloads (snapshot_download / hf_hub_download) of the repos given to `add_model`: GET
/api/models/<repo>/revision/<rev> (sha, siblings), GET /api/models/<repo>/tree/<rev> (the file listing),
HEAD/GET /<repo>/resolve/<rev>/<file> (ETag, X-Repo-Commit, Content-Length). Unknown repos answer 404
RepoNotFound, unknown revisions 404 RevisionNotFound, repos in `gated` 403 GatedRepo (the X-Error-Code header
huggingface_hub maps to its error types).

Every request is recorded as (method, path, headers) in `requests`. It listens on loopback only; use it as a
context manager, which shuts it down.
"""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

REPO = "someone/tiny-moequant"  # the push tests' target repository


def git_blob_sha(data: bytes) -> str:
    """The git blob id the Hub reports as a file's oid / ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.requests = []  # (method, path, headers)
        self.created, self.branches, self.lfs = [], [], {}
        self.commits = []  # {"revision", "header", "files": {path: bytes}}
        self.models = {}  # repo -> {revision: (commit sha, {filename: bytes})}: what downloads serve
        self.gated = set()  # repos that answer 403 GatedRepo
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

            def _error(self, status, code, message, head=False):
                data = b"" if head else json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, head: bool):
                """The download routes: /api/models/<repo>/revision/<rev>, /api/models/<repo>/tree/<rev>,
                HEAD/GET /<repo>/resolve/<rev>/<file>. Returns False when the path is none of them."""
                path = unquote(self.path.split("?")[0])
                api = path.startswith("/api/models/")
                rest = path[len("/api/models/") :] if api else path[1:]
                for kind in ("revision", "tree") if api else ("resolve",):
                    if f"/{kind}/" in rest:
                        repo, tail = rest.split(f"/{kind}/", 1)
                        break
                else:
                    return False
                if repo in hub.gated:
                    self._error(403, "GatedRepo", f"Access to model {repo} is restricted.", head)
                    return True
                if repo not in hub.models:
                    self._error(404, "RepoNotFound", "Repository not found", head)
                    return True
                rev, _, filename = tail.partition("/") if kind == "resolve" else (tail.rstrip("/"), "", "")
                found = hub.models[repo].get(rev) or next(
                    (v for v in hub.models[repo].values() if v[0] == rev), None
                )
                if found is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                    return True
                sha, files = found
                if kind == "revision":
                    self._reply(
                        {"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in sorted(files)]}
                    )
                elif kind == "tree":
                    self._reply(
                        [
                            {"type": "file", "path": f, "size": len(b), "oid": git_blob_sha(b)}
                            for f, b in sorted(files.items())
                        ]
                    )
                elif filename not in files:
                    self._error(404, "EntryNotFound", f"{filename} does not exist", head)
                else:
                    data = files[filename]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("ETag", f'"{git_blob_sha(data)}"')
                    self.send_header("X-Repo-Commit", sha)
                    self.end_headers()
                    if not head:
                        self.wfile.write(data)
                return True

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path, dict(self.headers)))
                if not self._serve(head=True):
                    self._error(404, "EntryNotFound", "fake hub: no HEAD route", head=True)

            def do_GET(self):
                hub.requests.append(("GET", self.path, dict(self.headers)))
                if not self._serve(head=False):
                    self._reply({"error": "fake hub: no GET route"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # loopback only, free port
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_model(self, repo: str, files: dict[str, bytes], revision: str = "main") -> str:
        """Serve `files` as `repo` at `revision`; returns the revision's commit sha."""
        sha = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        self.models.setdefault(repo, {})[revision] = (sha, dict(files))
        return sha

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.requests if method in (None, m)]

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
