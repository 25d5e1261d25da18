"""A loopback stand-in for the Hugging Face Hub's repository API, enough for huggingface_hub's
``create_repo``, ``list_repo_tree`` and ``create_commit`` (every file uploaded as a regular blob).

It keeps the repositories in memory, checks the Bearer token, records every uploaded path, and can
fail chosen commits, so tests can check resumed publishing never uploads a file twice.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

from lorafactory.testing.loopback import LoopbackServer, json_handler


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as a regular file's ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)  # commit messages, oldest first


@dataclass
class FakeHub(LoopbackServer):
    tokens: set[str]
    user: str = "tester"
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    uploads: list[str] = field(default_factory=list)  # every path received in a commit, in order
    requests: list[str] = field(default_factory=list)  # "METHOD /path" of every request
    commit_faults: list[int] = field(
        default_factory=list
    )  # HTTP status for the next commits, in order (0 = let it succeed)
    _server: ThreadingHTTPServer | None = None

    # --- the API ----------------------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes, token: str | None) -> tuple[int, dict | list]:
        self.requests.append(f"{method} {path}")
        if token not in self.tokens:
            return 401, {"error": "Invalid credentials in Authorization header"}
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": self.user, "auth": {"accessToken": {"role": "write"}}}
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_card(json.loads(body)["content"])
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = FakeRepo(
                private=payload.get("visibility") == "private" or bool(payload.get("private"))
            )
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        parts = path.split("/")  # /api/models/<ns>/<name>/<action>/<revision>[/...]
        if len(parts) < 7 or parts[:3] != ["", "api", "models"]:
            return 404, {"error": "not found"}
        repo_id, action = f"{parts[3]}/{parts[4]}", parts[5]
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}
        if method == "GET" and action == "tree":
            return 200, [
                {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
                for name, data in sorted(repo.files.items())
            ]
        if method == "POST" and action == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if method == "POST" and action == "commit":
            status = self.commit_faults.pop(0) if self.commit_faults else 0
            return self._commit(repo_id, repo, body) if status == 0 else (status, {"error": "injected failure"})
        return 404, {"error": "not found"}

    @staticmethod
    def _validate_card(content: str) -> tuple[int, dict]:
        """The Hub checks a README's YAML front matter before accepting it."""
        import yaml

        if not content.startswith("---\n") or "\n---" not in content[4:]:
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(content[4 : content.index("\n---", 4)])
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "the metadata must be a mapping"}]}
        return 200, {"errors": [], "warnings": []}

    def _commit(self, repo_id: str, repo: FakeRepo, body: bytes) -> tuple[int, dict]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        for item in lines:
            if item["key"] == "file":
                value = item["value"]
                repo.files[value["path"]] = base64.b64decode(value["content"])
                self.uploads.append(value["path"])
            elif item["key"] == "deletedFile":
                repo.files.pop(item["value"]["path"], None)
        repo.commits.append(header["summary"])
        oid = hashlib.sha1(f"{repo_id}{len(repo.commits)}".encode()).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}

    # --- the server --------------------------------------------------------------------

    def start(self) -> FakeHub:
        self._serve(
            json_handler(lambda method, path, _query, body, token: (*self.handle(method, path, body, token), {}))
        )
        return self
