"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for tests (the real Hub cannot be reached).

It answers the requests `huggingface_hub.HfApi` sends for `create_repo` and `upload_folder` (blocking or
`run_as_future=True`), read from huggingface_hub 2.4's source:

    POST /api/repos/create                              create_repo (409 when it exists: exist_ok=True reuses it)
    POST /api/{type}s/{ns}/{name}/preupload/{revision}  how each file will be sent: always "regular" (base64 in
                                                        the commit), so no Xet or LFS transfer is ever attempted;
                                                        with the oid of the file already there, so the client
                                                        skips unchanged files as it does against the Hub
    POST /api/{type}s/{ns}/{name}/commit/{revision}     the commit (ndjson: header, then one line per file)
    GET  /api/{type}s/{ns}/{name}[/revision/{revision}] repo_info (the client asks when nothing changed)
    POST /api/validate-yaml                             README metadata check (create_commit without hf_xet)
    GET  /api/whoami-v2

Everything it receives is recorded in `events`, in order, so a test can assert exactly what was created and
uploaded: ("create_repo", {...}) and ("commit", Commit). A commit to a branch that does not exist is refused
(404 RevisionNotFound), as the Hub does; `create_branch` makes one. `hold_uploads()` makes every upload wait at
its first request (preupload) until `release_uploads()`, to test what happens while an upload is still running.

Bounded: request bodies over 64 MiB are refused, a held upload waits at most `HOLD_LIMIT_S`, and the server
shuts itself down after `LIFETIME_S` even if a test forgets to stop it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

USER = "fake-user"
MAX_BODY = 64 * 1024 * 1024
LIFETIME_S = 300.0
HOLD_LIMIT_S = 60.0

_REPO_PATH = re.compile(
    r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>preupload|commit|revision)/(?P<rev>.+))?$"
)


def git_blob_sha1(data: bytes) -> str:
    """The oid huggingface_hub computes for a regular file (git's blob hash)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class Commit:
    repo_id: str
    revision: str
    message: str
    description: str
    files: dict[str, bytes]  # path in the repository -> content
    deleted: list[str]
    token: str | None
    oid: str = ""


@dataclasses.dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]]  # branch -> the files at its head
    heads: dict[str, str]  # branch -> head commit oid


class FakeHub:
    def __init__(self):
        self.events: list[tuple[str, object]] = []
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for debugging
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._released.set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._deadline = threading.Timer(LIFETIME_S, self.stop)
        self._deadline.daemon = True
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeHub:
        self._thread.start()
        self._deadline.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._released.set()  # nothing stays held
        self._deadline.cancel()
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ for tests
    def commits(self, repo_id: str | None = None) -> list[Commit]:
        return [e for kind, e in self.events if kind == "commit" and (repo_id is None or e.repo_id == repo_id)]

    def repo_creations(self) -> list[dict]:
        return [e for kind, e in self.events if kind == "create_repo"]

    def take(self) -> list[tuple[str, object]]:
        """The events so far; then forget everything (repositories too), as a fresh Hub."""
        with self._lock:
            events, self.events, self.repos = self.events, [], {}
        return events

    def create_repo(self, repo_id: str, private: bool = False) -> None:
        with self._lock:
            self.repos[repo_id] = Repo(repo_id, private, {"main": {}}, {"main": _oid(repo_id, "main", 0)})

    def create_branch(self, repo_id: str, branch: str) -> None:
        with self._lock:
            repo = self.repos[repo_id]
            repo.branches[branch] = dict(repo.branches["main"])
            repo.heads[branch] = repo.heads["main"]

    def hold_uploads(self) -> None:
        self._released.clear()

    def release_uploads(self) -> None:
        self._released.set()

    # ------------------------------------------------------------------ the API
    def handle(self, method: str, path: str, headers, body: bytes):
        """Return (status, json_or_none, extra headers)."""
        self.requests.append((method, path))
        token = _token(headers)
        if path == "/api/whoami-v2" and method == "GET":
            return (200, {"type": "user", "name": USER}, {}) if token else (401, {"error": "Invalid credentials"}, {})
        if path == "/api/validate-yaml" and method == "POST":
            return 200, {"errors": [], "warnings": []}, {}
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body), token)
        match = _REPO_PATH.match(path)
        if match is None:
            return 404, {"error": f"fake Hub: no route for {method} {path}"}, {}
        repo_id, op = match["repo"], match["op"]
        revision = unquote(match["rev"]) if match["rev"] else "main"
        with self._lock:
            repo = self.repos.get(repo_id)
        if repo is None or match["type"] != "models":
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        if revision not in repo.branches:
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        if method == "GET" and op in (None, "revision"):
            return 200, {"id": repo_id, "sha": repo.heads[revision], "private": repo.private, "siblings": []}, {}
        if method == "POST" and op == "preupload":
            if not self._released.wait(HOLD_LIMIT_S):
                return 400, {"error": "fake Hub: upload held too long"}, {}
            tree = repo.branches[revision]
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(tree[f["path"]]) if f["path"] in tree else None,
                }
                for f in json.loads(body)["files"]
            ]
            return 200, {"files": files}, {}
        if method == "POST" and op == "commit":
            return self._commit(repo, revision, body, token)
        return 404, {"error": f"fake Hub: no route for {method} {path}"}, {}

    def _create_repo(self, payload: dict, token: str | None):
        if token is None:  # the Hub: creating a repository needs a user
            return 401, {"error": "Invalid username or password."}, {}
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("visibility") == "private"
        with self._lock:
            exists = repo_id in self.repos
            self.events.append(
                ("create_repo", {"repo_id": repo_id, "private": private, "token": token, "existed": exists})
            )
            if not exists:
                self.repos[repo_id] = Repo(repo_id, private, {"main": {}}, {"main": _oid(repo_id, "main", 0)})
        if exists:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}, {}

    def _commit(self, repo: Repo, revision: str, body: bytes, token: str | None):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files, deleted = {}, []
        for line in lines:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(line["value"]["path"])
            elif line["key"] != "header":  # lfsFile: never asked for (preupload says "regular")
                return 400, {"error": f"fake Hub: unsupported commit operation {line['key']}"}, {}
        with self._lock:
            tree = repo.branches[revision]
            for path in deleted:
                for name in [n for n in tree if n == path or n.startswith(path.rstrip("/") + "/")]:
                    del tree[name]
            tree.update(files)
            commit = Commit(
                repo.repo_id, revision, header["summary"], header.get("description", ""), files, deleted, token
            )
            commit.oid = _oid(repo.repo_id, revision, len(self.commits()) + 1)
            repo.heads[revision] = commit.oid
            self.events.append(("commit", commit))
        return (
            200,
            {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}", "commitOid": commit.oid, "success": True},
            {},
        )


def _oid(*parts) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()


def _token(headers) -> str | None:
    auth = headers.get("Authorization") or headers.get("authorization")
    return auth.split(" ", 1)[1] if auth and auth.lower().startswith("bearer ") else None


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._reply(413, {"error": "fake Hub: request too large"}, {})
                return
            body = self.rfile.read(length) if length else b""
            try:
                status, payload, extra = hub.handle(method, urlsplit(self.path).path, self.headers, body)
            except Exception as e:  # a bug in the fake shows up in the client's error, not as a hang
                status, payload, extra = 500, {"error": f"fake Hub: {type(e).__name__}: {e}"}, {}
            self._reply(status, payload, extra)

        def _reply(self, status, payload, extra):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def log_message(self, *args):  # quiet
            pass

    return Handler
