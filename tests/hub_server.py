"""A small in-memory Hugging Face Hub look-alike for tests of push_to_hub / from_pretrained(repo_id).

No real Hub is reachable from the test machines and no installable Hub server takes uploads, so this
serves the few routes huggingface_hub uses for a model repository (checked against huggingface_hub
2.x by logging every request; anything else answers 404 and is recorded in `server.unknown`):

    POST /api/repos/create                         create a repository
    POST /api/validate-yaml                        model card metadata check (always fine)
    POST /api/models/{repo}/preupload/{rev}        every file is uploaded inline ("regular")
    POST /api/models/{repo}/commit/{rev}           NDJSON commit: header, then base64 files
    GET  /api/models/{repo}[/revision/{rev}]       repository info with the file list
    GET  /api/models/{repo}/tree/{rev}[/{path}]    file listing
    HEAD/GET /{repo}/resolve/{rev}/{path}          file download (ETag, X-Repo-Commit)

Usage:
    with HubServer() as hub:            # starts on 127.0.0.1, a free port
        env["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class _Repo:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.sha = hashlib.sha1(b"empty").hexdigest()
        self.commits = 0


class HubServer:
    """Thread-backed local Hub. Attributes: `url`, `repos` (repo_id -> files), `log`, `unknown`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.repos: dict[str, _Repo] = {}
        self.log: list[str] = []
        self.unknown: list[str] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            server_state = hub

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server_state: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    # ---------------------------------------------------------------- helpers
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str, message: str):
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, repo_id: str) -> _Repo | None:
        return self.server_state.repos.get(repo_id)

    def _info(self, repo_id: str, repo: _Repo) -> dict:
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.sha,
            "private": False,
            "siblings": [{"rfilename": name, "size": len(data)} for name, data in sorted(repo.files.items())],
        }

    # ---------------------------------------------------------------- routing
    def _route(self):
        state = self.server_state
        path = unquote(urlparse(self.path).path)
        state.log.append(f"{self.command} {path}")
        body = self._body() if self.command in ("POST", "PUT") else b""

        if self.command == "POST" and path == "/api/repos/create":
            req = json.loads(body or b"{}")
            name = req.get("name", "")
            repo_id = f"{req['organization']}/{name}" if req.get("organization") else name
            if "/" not in repo_id:
                repo_id = f"user/{repo_id}"
            with state._lock:
                existed = repo_id in state.repos
                state.repos.setdefault(repo_id, _Repo())
            answer = {"url": f"{state.url}/{repo_id}", "name": repo_id, "id": repo_id}
            if existed:  # like the Hub: 409, and the body still gives the url (read with exist_ok=True)
                message = "You already created this model repo"
                return self._json(409, {**answer, "error": message}, {"X-Error-Code": "RepoExists", "X-Error-Message": message})
            return self._json(200, answer)

        if self.command == "POST" and path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})

        m = re.fullmatch(r"/api/models/(.+?)/preupload/([^/]+)", path)
        if self.command == "POST" and m:
            if self._repo(m.group(1)) is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            files = json.loads(body or b"{}").get("files", [])
            return self._json(
                200,
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )

        m = re.fullmatch(r"/api/models/(.+?)/commit/([^/]+)", path)
        if self.command == "POST" and m:
            repo_id = m.group(1)
            repo = self._repo(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            with state._lock:
                for line in body.splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    key, value = item.get("key"), item.get("value", {})
                    if key == "file":
                        content = value["content"]
                        data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                        repo.files[value["path"]] = data
                    elif key == "deletedFile":
                        repo.files.pop(value["path"], None)
                    elif key == "lfsFile":  # never asked for: preupload answers "regular"
                        return self._error(400, "BadRequest", "this test server takes inline files only")
                repo.commits += 1
                repo.sha = hashlib.sha1(f"{repo_id}:{repo.commits}".encode()).hexdigest()
            return self._json(
                200, {"commitUrl": f"{state.url}/{repo_id}/commit/{repo.sha}", "commitOid": repo.sha, "success": True}
            )

        m = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
        if self.command == "GET" and m and "/tree/" not in path:
            repo = self._repo(m.group(1))
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            return self._json(200, self._info(m.group(1), repo))

        m = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(?:/(.*))?", path)
        if self.command == "GET" and m:
            repo = self._repo(m.group(1))
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            prefix = (m.group(3) or "").strip("/")
            entries = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in sorted(repo.files.items())
                if not prefix or name.startswith(prefix + "/")
            ]
            return self._json(200, entries)

        m = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if self.command in ("GET", "HEAD") and m:
            repo = self._repo(m.group(1))
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            data = repo.files.get(m.group(3))
            if data is None:
                return self._error(404, "EntryNotFound", "Entry not found")
            etag = '"' + hashlib.sha1(data).hexdigest() + '"'
            return self._send(
                200, data, {"ETag": etag, "X-Repo-Commit": repo.sha}, content_type="application/octet-stream"
            )

        state.unknown.append(f"{self.command} {path}")
        return self._error(404, "NotFound", f"route not served by the test hub: {self.command} {path}")

    do_GET = do_HEAD = do_POST = do_PUT = _route
