"""Publishing a release folder to the Hugging Face Hub (huggingface_hub).

The upload is resumable and never sends a file twice: the repository's current files are listed
first and only new or changed files are committed, one commit per kept step and one for the top
level (model card last, so the card never points at files that are not there yet). A transient
failure is retried with backoff; a rerun after an interruption uploads only what is missing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from lorafactory.errors import ConfigError, StageError
from lorafactory.progress import Progress
from lorafactory.release.remote import Service, call_with_retries

TOKEN_ENV = "HF_TOKEN"
NOT_PUBLISHED = {"manifest.json"}  # the stage's own bookkeeping
HUB = Service("the Hub", "token", TOKEN_ENV, "lorafactory publish")


@dataclass
class PublishReport:
    target: str  # the repository URL (or id, for a dry run)
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def outcome(self) -> str:
        """One line: what was uploaded, or what a dry run would upload."""
        if self.dry_run:
            return f"would upload {len(self.uploaded)} files to {self.target}"
        return f"{self.target}: {len(self.uploaded)} files uploaded, {len(self.unchanged)} already there"

    @property
    def listing(self) -> list[str]:
        """A dry run's files, one per line."""
        return self.uploaded


def release_files(release_dir: Path) -> list[str]:
    """The files of a release folder to publish, as POSIX paths relative to it."""
    return sorted(
        p.relative_to(release_dir).as_posix()
        for p in release_dir.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(release_dir).parts)
        and p.name not in NOT_PUBLISHED
    )


def commit_groups(files: list[str]) -> list[tuple[str, list[str]]]:
    """(name, files) per commit: each kept step, then the top level with README.md last."""
    steps: dict[str, list[str]] = {}
    top: list[str] = []
    for name in files:
        parts = name.split("/")
        if parts[0] == "steps" and len(parts) > 2:
            steps.setdefault(parts[1], []).append(name)
        else:
            top.append(name)
    top.sort(key=lambda name: name == "README.md")
    return [
        (f"step {step}", names)
        for step, names in sorted(steps.items(), key=lambda item: int(item[0]) if item[0].isdigit() else 0)
    ] + ([("model card and best step", top)] if top else [])


def _same(local: Path, remote) -> bool:
    """Whether the repository already holds this exact file (git blob id, or LFS sha256)."""
    data = local.read_bytes()
    if getattr(remote, "lfs", None):
        sha = remote.lfs["sha256"] if isinstance(remote.lfs, dict) else remote.lfs.sha256
        return hashlib.sha256(data).hexdigest() == sha
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == remote.blob_id


def _call(what: str, action, *args, **kwargs):
    from huggingface_hub.errors import HfHubHTTPError

    return call_with_retries(HUB, what, lambda: action(*args, **kwargs), (HfHubHTTPError, OSError))


def publish_to_hub(
    release_dir: Path, repo: str, *, private: bool, endpoint: str, progress: Progress, dry_run: bool = False
) -> PublishReport:
    """Create ``repo`` (``name`` or ``owner/name``) if needed and upload the release's new or changed files."""
    files = release_files(release_dir)
    if not files:
        raise StageError(f"{release_dir} holds no release files; run `lorafactory release` first")
    if dry_run:
        return PublishReport(repo, uploaded=files, dry_run=True)
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise ConfigError(f"publishing to the Hub needs a token: set {TOKEN_ENV} (a write token), or use --dry-run")
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.is_offline_mode():
        raise ConfigError("HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it to publish")
    api = HfApi(endpoint=endpoint, token=token)
    if "/" not in repo:
        repo = f"{_call('read the token owner', api.whoami)['name']}/{repo}"
    url = str(_call(f"create {repo}", api.create_repo, repo, private=private, exist_ok=True))
    remote = {
        entry.path: entry
        for entry in _call(f"list {repo}", lambda: list(api.list_repo_tree(repo, recursive=True)))
        if hasattr(entry, "blob_id")
    }
    report = PublishReport(url)
    groups = commit_groups(files)
    with progress.task(f"uploading to {repo}", total=len(files)) as task:
        for name, group in groups:
            changed = [f for f in group if f not in remote or not _same(release_dir / f, remote[f])]
            report.unchanged += [f for f in group if f not in changed]
            if changed:
                operations = [
                    CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(release_dir / f)) for f in changed
                ]
                _call(
                    f"upload {name} to {repo}",
                    api.create_commit,
                    repo,
                    operations,
                    commit_message=f"lorafactory: {name}",
                )
                report.uploaded += changed
            task.advance(len(group))
    return report
