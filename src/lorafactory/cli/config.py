"""`lorafactory config show`: the effective settings."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lorafactory.cli.base import (
    USER_ERRORS,
    ConfigOpt,
    PresetOpt,
    SetOpt,
    WorkspaceOpt,
    config_app,
    fail,
    settings_for,
)
from lorafactory.config import to_toml


@config_app.command("show")
def config_show(
    name: Optional[str] = typer.Argument(None, help="Character whose saved settings to start from."),
    workspace: Path = WorkspaceOpt,
    config: Optional[Path] = ConfigOpt,
    preset: Optional[str] = PresetOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Print the effective settings as TOML."""
    try:
        settings = settings_for(workspace, name, config, preset, set_ or [])
    except USER_ERRORS as exc:
        fail(exc)
    sys.stdout.write(to_toml(settings))
