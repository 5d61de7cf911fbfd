"""A Hub-compatible server on loopback for the tests: the HTTP endpoints `huggingface_hub` calls to create a model
repository, commit files to it (regular uploads) and download snapshots, over a folder, with token auth.

No package on PyPI provides one that runs here (hf-local-hub needs a Go binary its wheel does not ship), so the
tests start this one as a separate process and point the real client at it with HF_ENDPOINT:

    python tests/hub_server.py ROOT TOKEN      # prints the port it listens on, then serves until killed
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class Store:
    """Repositories as folders: ROOT/<user>/<name>/files/..., and a commit id that changes with every commit."""

    def __init__(self, root: Path):
        self.root = root

    def folder(self, repo: str) -> Path:
        return self.root / repo

    def exists(self, repo: str) -> bool:
        return (self.folder(repo) / "commit").exists()

    def commit_id(self, repo: str) -> str:
        return (self.folder(repo) / "commit").read_text()

    def files(self, repo: str) -> list[str]:
        base = self.folder(repo) / "files"
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())

    def create(self, repo: str, private: bool) -> None:
        (self.folder(repo) / "files").mkdir(parents=True, exist_ok=True)
        (self.folder(repo) / "private").write_text(json.dumps(private))
        (self.folder(repo) / "commit").write_text(hashlib.sha1(repo.encode()).hexdigest())

    def commit(self, repo: str, files: dict[str, bytes]) -> str:
        for path, content in files.items():
            target = self.folder(repo) / "files" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        digest = hashlib.sha1(self.commit_id(repo).encode())
        for path in sorted(files):
            digest.update(path.encode() + files[path])
        (self.folder(repo) / "commit").write_text(digest.hexdigest())
        return digest.hexdigest()


def handler_for(store: Store, token: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, value, headers: dict | None = None):
            self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _not_found(self, code: str = "RepoNotFound"):
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": code})

        def _authorized(self) -> bool:
            if self.headers.get("authorization") == f"Bearer {token}":
                return True
            self._json(401, {"error": "Invalid credentials"})
            return False

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_POST(self):  # noqa: N802
            path = urlparse(self.path).path
            if not self._authorized():
                return
            if path == "/api/repos/create":
                request = json.loads(self._body())
                repo = f"{request.get('organization') or 'user'}/{request['name']}"
                if store.exists(repo):
                    return self._json(409, {"error": "You already created this model repo", "url": repo})
                store.create(repo, bool(request.get("private")))
                return self._json(200, {"url": f"http://{self.headers['host']}/{repo}"})
            if path == "/api/validate-yaml":
                self._body()
                return self._json(200, {"errors": [], "warnings": []})
            parts = path.split("/")  # /api/models/<user>/<name>/<action>/<revision>
            repo, action = "/".join(parts[3:5]), parts[5] if len(parts) > 5 else ""
            if not store.exists(repo):
                return self._not_found()
            if action == "preupload":
                files = json.loads(self._body())["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            if action == "commit":
                files = {}
                for line in self._body().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                commit = store.commit(repo, files)
                return self._json(200, {"commitUrl": f"http://{self.headers['host']}/{repo}/commit/{commit}",
                                        "commitOid": commit, "pullRequestUrl": None})
            self._json(404, {"error": f"unknown endpoint {path}"})

        def do_GET(self):  # noqa: N802
            self._get(head=False)

        def do_HEAD(self):  # noqa: N802
            self._get(head=True)

        def _get(self, head: bool):
            path = unquote(urlparse(self.path).path)
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:  # /api/models/<user>/<name>/(revision|tree)/<revision>[/...]
                repo, action = "/".join(parts[2:4]), parts[4] if len(parts) > 4 else ""
                if not store.exists(repo):
                    return self._not_found()
                if action == "revision" or not action:
                    return self._json(200, {"id": repo, "modelId": repo, "sha": store.commit_id(repo),
                                            "private": False, "siblings": [{"rfilename": f}
                                                                           for f in store.files(repo)]})
                if action == "tree":
                    base = store.folder(repo) / "files"
                    return self._json(200, [{"type": "file", "path": f, "size": (base / f).stat().st_size,
                                             "oid": hashlib.sha1((base / f).read_bytes()).hexdigest()}
                                            for f in store.files(repo)])
            elif len(parts) >= 5 and parts[2] == "resolve":  # /<user>/<name>/resolve/<revision>/<file>
                repo, file = "/".join(parts[:2]), "/".join(parts[4:])
                target = store.folder(repo) / "files" / file
                if not store.exists(repo):
                    return self._not_found()
                if not target.is_file():
                    return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                          "X-Repo-Commit": store.commit_id(repo)})
                content = target.read_bytes()
                return self._send(200, content, {"X-Repo-Commit": store.commit_id(repo),
                                                 "ETag": f'"{hashlib.sha1(content).hexdigest()}"'}, head=head)
            self._json(404, {"error": f"unknown endpoint {path}"})

    return Handler


def main() -> None:
    root, token = Path(sys.argv[1]), sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(Store(root), token))
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
