"""A loopback Hugging Face Hub that serves the snapshots of a Hugging Face cache, read-only: enough for a first
run online (huggingface_hub's downloads, and the repository info and file trees that imgutils lists models with)
to fill an empty cache from the stand-in one.

Files are answered as the Hub answers them (the commit in ``X-Repo-Commit``, an ``ETag``, the size), repositories
and files it lacks with the Hub's 404s and error codes.
"""

from __future__ import annotations

import hashlib
import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from lorafactory.testing.fake_hub import git_blob_id
from lorafactory.testing.loopback import LoopbackServer

KINDS = ("models", "datasets", "spaces")


class CacheHub(LoopbackServer):
    def __init__(self, cache: Path) -> None:
        self.cache, self._server = cache, None

    def snapshot(self, kind: str, repo: str) -> Path | None:
        """The folder of a repository's (only) snapshot in the cache; None when the cache lacks it."""
        from huggingface_hub.file_download import repo_folder_name

        snapshots = self.cache / repo_folder_name(repo_id=repo, repo_type=kind.removesuffix("s")) / "snapshots"
        found = sorted(snapshots.iterdir()) if snapshots.is_dir() else []
        return found[0] if found else None

    def start(self) -> CacheHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                return

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                url = urlparse(self.path)
                parts = unquote(url.path).strip("/").split("/")
                if ".." in parts or len(parts) < 2:  # nothing outside the cache's snapshots
                    return self._send(404, b"{}", body)
                api = parts[0] == "api"
                parts = parts[1:] if api else parts
                kind = parts.pop(0) if parts[0] in KINDS else "models"
                repo, rest = "/".join(parts[:2]), parts[2:]
                snapshot = hub.snapshot(kind, repo)
                if snapshot is None:
                    return self._send(
                        404, b'{"error": "Repository not found"}', body, {"X-Error-Code": "RepoNotFound"}
                    )
                if api:
                    return self._api(snapshot, repo, rest, parse_qs(url.query), body)
                if len(rest) < 3 or rest[0] != "resolve":
                    return self._send(404, b"{}", body)
                path = snapshot.joinpath(*rest[2:])
                if not path.is_file():
                    return self._send(404, b'{"error": "Entry not found"}', body, {"X-Error-Code": "EntryNotFound"})
                data = path.read_bytes()
                headers = {"X-Repo-Commit": snapshot.name, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                self._send(200, data, body, headers, "application/octet-stream")

            def _api(self, snapshot: Path, repo: str, rest: list[str], query: dict, body: bool) -> None:
                """Repository info (``/api/models/org/name[/revision/rev]``), file trees (``…/tree/rev[/path]``)."""
                if not rest or rest[0] == "revision":
                    files = sorted(p for p in snapshot.rglob("*") if p.is_file())
                    siblings = [{"rfilename": p.relative_to(snapshot).as_posix()} for p in files]
                    answer: object = {"id": repo, "sha": snapshot.name, "siblings": siblings}
                elif rest[0] == "tree" and len(rest) >= 2:
                    folder = snapshot.joinpath(*rest[2:])
                    recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
                    answer = [
                        _entry(p, snapshot) for p in sorted(folder.rglob("*") if recursive else folder.iterdir())
                    ]
                else:
                    return self._send(404, b"{}", body)
                self._send(200, json.dumps(answer).encode(), body)

            def _send(
                self, status: int, data: bytes, body: bool, headers: dict | None = None, kind: str = "application/json"
            ) -> None:
                self.send_response(status)
                for name, value in {"Content-Type": kind, "Content-Length": str(len(data)), **(headers or {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self._serve(Handler)
        return self


def _entry(path: Path, snapshot: Path) -> dict:
    """A file tree entry as the Hub lists it."""
    name = path.relative_to(snapshot).as_posix()
    if path.is_dir():
        return {"type": "directory", "path": name, "oid": hashlib.sha1(name.encode()).hexdigest()}
    data = path.read_bytes()
    return {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
