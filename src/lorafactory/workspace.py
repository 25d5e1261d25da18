"""Per-character folders, stage artifacts and their manifests.

Layout::

    <workspace>/lorafactory.db          state store (SQLite default)
    <workspace>/<slug>/config.toml       the run's effective settings
    <workspace>/<slug>/<stage>/          a finished artifact, manifest.json written last
    <workspace>/<slug>/<stage>.partial/  an artifact being built; swapped in when complete
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field

from lorafactory.errors import StageError

MANIFEST = "manifest.json"
FINGERPRINT = ".fingerprint"
STAGES = ("crawl", "prepare", "train", "evaluate", "release")
MAX_SLUG = 64
_TRACKED_PACKAGES = (
    "lorafactory",
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "dghs-imgutils",
    "onnxruntime",
    "numpy",
)


def slugify(name: str) -> str:
    """ASCII, lowercase, underscores: ``'Surtr (Arknights)'`` -> ``'surtr_arknights'``.

    At most ``MAX_SLUG`` characters (it names folders and released files): a longer one keeps its
    start and ends with a hash of the whole name, so distinct names stay distinct.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")
    if not slug:
        slug = "char_" + "".join(f"{ord(c):x}" for c in name)[:24]
    if len(slug) > MAX_SLUG:
        slug = slug[: MAX_SLUG - 9].rstrip("_") + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return slug


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _file_mode() -> int:
    """The mode a plain ``open()`` gives a new file under the process's umask (read once, at import)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``; the file gets the
    usual permissions (a temporary file's are owner-only), so reports and releases can be shared."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str).encode("utf-8"))


class Manifest(BaseModel):
    """What an artifact is, what made it, and what it holds."""

    stage: str
    fingerprint: str = Field(description="Hash of the settings and upstream fingerprints that produced it.")
    inputs: dict[str, str] = Field(default_factory=dict, description="Upstream stage -> fingerprint.")
    code_version: str = Field("", description="The stage's output version (empty in older manifests).")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="The settings sections it was made with (runtime settings left out)."
    )
    versions: dict[str, str] = Field(default_factory=package_versions)
    counts: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, int] = Field(default_factory=dict, description="Every file of the artifact -> its size.")
    pruned: dict[str, int] = Field(
        default_factory=dict,
        description="Files `lorafactory prune` removed -> their size: the artifact stays up to date, and is made "
        "again only for a stage that reads them.",
    )
    created_at: datetime = Field(default_factory=utcnow)


def list_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder`` (the manifest itself excluded)."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def damage(artifact: Path, manifest: Manifest) -> str | None:
    """What changed in a finished artifact since its manifest was written (None: all files intact)."""
    for name, size in manifest.files.items():
        path = artifact / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
    return None


def read_manifest(artifact: Path) -> Manifest | None:
    """The artifact's manifest, or None when it is absent or unreadable (an unfinished artifact)."""
    try:
        return Manifest.model_validate_json((artifact / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class CharacterDir:
    """One character's folder inside a workspace."""

    root: Path
    slug: str

    @property
    def path(self) -> Path:
        return self.root / self.slug

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    def artifact(self, stage: str) -> Path:
        return self.path / stage

    def partial(self, stage: str) -> Path:
        return self.path / f"{stage}.partial"

    def manifest(self, stage: str) -> Manifest | None:
        return read_manifest(self.artifact(stage))

    def begin(
        self, stage: str, marker: str, resumable: bool = False, misfit: Callable[[str], str | None] | None = None
    ) -> Path:
        """The folder to build ``stage``'s artifact in: fresh, or for a resumable stage, the unfinished
        folder of an interrupted run whose marker (what it is being made with) fits this one. ``misfit``
        says why a saved marker does not (None when it does); by default the two must be equal.

        An unfinished resumable folder made with other settings is never discarded silently.
        """
        partial = self.partial(stage)
        saved = partial / FINGERPRINT
        if resumable and saved.is_file():
            text = saved.read_text()
            why = misfit(text) if misfit is not None else (None if text == marker else "other settings made it")
            if why is None:
                return partial
            raise StageError(
                f"an interrupted {stage} in {partial} cannot be resumed ({why}); "
                f"restore its settings to resume it, or rerun with --force {stage} to discard it"
            )
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        saved.write_text(marker)
        return partial

    def commit(self, stage: str, manifest: Manifest) -> Path:
        """Write the manifest last, then swap the partial folder in place of the old artifact."""
        partial = self.partial(stage)
        (partial / FINGERPRINT).unlink(missing_ok=True)
        manifest = manifest.model_copy(update={"files": list_files(partial)})
        write_json_atomic(partial / MANIFEST, manifest.model_dump(mode="json"))
        final = self.artifact(stage)
        old = self.path / f"{stage}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        if old.exists():
            shutil.rmtree(old)
        return final

    def invalidate(self, stage: str) -> None:
        """Remove a finished artifact (used by --force)."""
        for folder in (self.artifact(stage), self.partial(stage)):
            if folder.exists():
                shutil.rmtree(folder)


class Workspace:
    """The root folder that holds every character and, by default, the state database."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    @property
    def default_db_url(self) -> str:
        return f"sqlite:///{self.root / 'lorafactory.db'}"

    def character(self, slug: str) -> CharacterDir:
        return CharacterDir(self.root, slug)

    def characters(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "config.toml").is_file())
