"""Where a show's files live, under ``<workspace>/_shows/<show>/``."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lorafactory.workspace import Workspace, slugify

SHOWS = "_shows"


@dataclass(frozen=True)
class ShowDir:
    root: Path

    @property
    def episodes(self) -> Path:
        return self.root / "episodes"

    @property
    def references(self) -> Path:
        return self.root / "references"

    @property
    def contact(self) -> Path:
        return self.root / "contact"

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def names_path(self) -> Path:
        return self.root / "names.toml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def manifest(self) -> dict | None:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else None


def show_dir(workspace: Workspace, show: str) -> ShowDir:
    return ShowDir(workspace.root / SHOWS / slugify(show))


def shows(workspace: Workspace) -> list[ShowDir]:
    """The workspace's shows that have a manifest, by name."""
    root = workspace.root / SHOWS
    found = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [ShowDir(p) for p in found if (p / "manifest.json").is_file()]


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no space used), or a copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
